"""The Firecracker API's HTTP server (embervm.fc.http) over real Unix sockets, with the event
loop running on a background thread: keep-alive, pipelining, payload limits, hostile clients
(malformed, huge headers, slow, silent, many), back-pressure, and no leaked fds."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest

from embervm.errors import ConfigError
from embervm.eventloop import EventLoop
from embervm.fc.http import ApiServer


@dataclass
class Resp:
    status: int
    body: bytes | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)


def echo_handler(calls: list):
    """Answers 200 with the request as JSON (or 204 for /empty); records every call."""

    def handle(method: str, path: str, body: bytes | None) -> Resp:
        calls.append((method, path, body))
        if path == "/empty":
            return Resp(204)
        if path == "/boom":
            raise RuntimeError("handler bug")
        if path == "/big":
            return Resp(200, b"x" * 1_000_000)
        if path == "/mid":  # more than a socket buffer, less than the server's high water
            return Resp(200, b"m" * 300_000)
        if path == "/deprecated":
            return Resp(204, None, [("Deprecation", "true")])
        status = 400 if "fail" in path else 200
        return Resp(status, json.dumps({"method": method, "path": path,
                                        "body": body.decode() if body else None}).encode())

    return handle


class Served:
    """An ApiServer on a loop run by a background thread."""

    def __init__(self, path: str, **kwargs) -> None:
        self.calls: list = []
        self.loop = EventLoop()
        self.server = ApiServer(path, self.loop, echo_handler(self.calls), **kwargs)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def on_loop(self, fn):
        """Run fn on the loop thread and return its result."""
        done = threading.Event()
        out = []
        self.loop.call_soon_threadsafe(lambda: (out.append(fn()), done.set()))
        assert done.wait(5)
        return out[0]

    def stop(self) -> None:
        self.on_loop(self.server.close)
        self.loop.stop()
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "api.sock")


@pytest.fixture
def served(sock_path):
    s = Served(sock_path, request_timeout=1.0, idle_timeout=2.0)
    yield s
    s.stop()


def connect(path: str) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(path)
    return c


def request(method: str, path: str, body: bytes | None = None, extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}"
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def read_response(c: socket.socket, buf: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One response from c (buf carries bytes already read past the previous one)."""
    while b"\r\n\r\n" not in buf:
        data = c.recv(65536)
        if not data:
            raise EOFError(bytes(buf))
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        data = c.recv(65536)
        if not data:
            raise EOFError(rest)
        rest += data
    buf[:] = rest[length:]
    return status, headers, rest[:length]


def closed_by_server(c: socket.socket, timeout: float = 5) -> bool:
    c.settimeout(timeout)
    try:
        while True:
            data = c.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- the basics -----------------------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection(served, sock_path):
    c = connect(sock_path)
    buf = bytearray()
    for i in range(3):
        c.sendall(request("PUT", f"/drives/d{i}", b'{"a": %d}' % i))
        status, headers, body = read_response(c, buf)
        assert status == 200
        assert headers["server"] == "Firecracker API"
        assert headers["connection"] == "keep-alive"
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {"method": "PUT", "path": f"/drives/d{i}",
                                    "body": f'{{"a": {i}}}'}
    c.sendall(request("GET", "/empty"))
    status, headers, body = read_response(c, buf)
    assert (status, body) == (204, b"")
    assert "content-length" not in headers
    assert served.calls[-1] == ("GET", "/empty", None)
    c.close()


def test_pipelined_requests_are_answered_in_order(served, sock_path):
    c = connect(sock_path)
    c.sendall(b"".join(request("GET", f"/p{i}") for i in range(20)))
    buf = bytearray()
    paths = [json.loads(read_response(c, buf)[2])["path"] for _ in range(20)]
    assert paths == [f"/p{i}" for i in range(20)]
    c.close()


def test_request_split_into_single_bytes_is_reassembled(served, sock_path):
    c = connect(sock_path)
    for b in request("PUT", "/x", b'{"k": 1}'):
        c.send(bytes([b]))
    status, _, body = read_response(c, bytearray())
    assert status == 200 and json.loads(body)["body"] == '{"k": 1}'
    c.close()


def test_expect_100_continue_gets_a_100_then_the_answer(served, sock_path):
    c = connect(sock_path)
    c.sendall(b"PUT /x HTTP/1.1\r\nHost: l\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    buf = bytearray()
    assert read_response(c, buf)[0] == 100
    c.sendall(b"{}")
    assert read_response(c, buf)[0] == 200
    c.close()


def test_chunked_body_is_decoded(served, sock_path):
    c = connect(sock_path)
    c.sendall(b"PUT /x HTTP/1.1\r\nHost: l\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    status, _, body = read_response(c, bytearray())
    assert status == 200 and json.loads(body)["body"] == "abcde"
    c.close()


def test_http_1_0_and_connection_close_end_the_connection_after_the_reply(served, sock_path):
    for raw in (b"GET /a HTTP/1.0\r\n\r\n",
                b"GET /a HTTP/1.1\r\nHost: l\r\nConnection: close\r\n\r\n"):
        c = connect(sock_path)
        c.sendall(raw)
        status, headers, _ = read_response(c, bytearray())
        assert status == 200 and headers["connection"] == "close"
        assert closed_by_server(c)
        c.close()


def test_client_half_close_still_gets_its_replies(served, sock_path):
    c = connect(sock_path)
    c.sendall(request("GET", "/one") + request("GET", "/two"))
    c.shutdown(socket.SHUT_WR)
    buf = bytearray()
    assert json.loads(read_response(c, buf)[2])["path"] == "/one"
    assert json.loads(read_response(c, buf)[2])["path"] == "/two"
    assert closed_by_server(c)
    c.close()
    # the same with a reply still waiting in the server's buffer when the EOF arrives
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.settimeout(5)
    c.connect(sock_path)
    c.sendall(request("GET", "/mid"))
    c.shutdown(socket.SHUT_WR)
    time.sleep(0.3)  # the server has read the EOF before the client reads anything
    status, _, body = read_response(c, bytearray())
    assert status == 200 and body == b"m" * 300_000
    assert closed_by_server(c)
    c.close()


def test_handler_exception_becomes_a_400_and_the_connection_survives(served, sock_path):
    c = connect(sock_path)
    buf = bytearray()
    c.sendall(request("GET", "/boom"))
    status, _, body = read_response(c, buf)
    assert status == 400 and "handler bug" in json.loads(body)["fault_message"]
    c.sendall(request("GET", "/after"))
    assert read_response(c, buf)[0] == 200
    c.close()


def test_get_with_body_reaches_the_handler_which_decides(served, sock_path):
    # The API layer answers "GET request cannot have a body."; the server passes the body on.
    c = connect(sock_path)
    c.sendall(request("GET", "/", b"{}"))
    assert read_response(c, bytearray())[0] == 200
    assert served.calls[-1] == ("GET", "/", b"{}")
    c.close()


# -- payload limits -------------------------------------------------------------------------


def test_body_over_the_limit_is_refused_with_micro_https_message_and_closed(sock_path):
    s = Served(sock_path, max_payload=100)
    try:
        c = connect(sock_path)
        c.sendall(request("PUT", "/ok", b"a" * 100))
        buf = bytearray()
        assert read_response(c, buf)[0] == 200
        c.sendall(b"PUT /big HTTP/1.1\r\nHost: l\r\nContent-Length: 101\r\n\r\n")
        status, headers, body = read_response(c, buf)
        assert status == 400
        assert json.loads(body)["error"].startswith(
            "Request payload with size 101 is larger than the limit of 100 allowed by server.")
        assert closed_by_server(c)
        assert [call[1] for call in s.calls] == ["/ok"]
        c.close()
    finally:
        s.stop()


def test_chunked_body_over_the_limit_is_refused(sock_path):
    s = Served(sock_path, max_payload=10)
    try:
        c = connect(sock_path)
        c.sendall(b"PUT /x HTTP/1.1\r\nHost: l\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
        status, _, body = read_response(c, bytearray())
        assert status == 400 and "size 16 is larger than the limit of 10" in body.decode()
        assert closed_by_server(c)
        assert s.calls == []
        c.close()
    finally:
        s.stop()


# -- hostile clients ------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: l\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: l\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: l\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host (h11 requires it)
])
def test_malformed_http_gets_400_and_is_closed(served, sock_path, raw):
    c = connect(sock_path)
    c.sendall(raw)
    status, headers, body = read_response(c, bytearray())
    assert status == 400
    assert headers["connection"] == "close"
    assert "error" in json.loads(body)
    assert closed_by_server(c)
    assert served.calls == []
    assert served.server.metrics["api_server"]["bad_requests"] == 1
    c.close()


def test_huge_headers_get_431_and_are_closed(served, sock_path):
    c = connect(sock_path)
    c.sendall(b"GET / HTTP/1.1\r\nHost: l\r\nX-Big: " + b"a" * 40_000)
    status, _, _ = read_response(c, bytearray())
    assert status == 431
    assert closed_by_server(c)
    c.close()


def test_slow_client_is_dropped_while_another_is_served(served, sock_path):
    slow = connect(sock_path)
    t0 = time.monotonic()
    raw = request("GET", "/slow")
    dropped_after = None
    for i, b in enumerate(raw):  # one byte every 0.1 s: the request would take seconds
        try:
            slow.send(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            dropped_after = time.monotonic() - t0
            break
        # meanwhile another client is served promptly
        if i % 5 == 0:
            fast = connect(sock_path)
            t1 = time.monotonic()
            fast.sendall(request("GET", "/fast"))
            assert read_response(fast, bytearray())[0] == 200
            assert time.monotonic() - t1 < 0.5
            fast.close()
        time.sleep(0.1)
    if dropped_after is None:
        assert closed_by_server(slow, 3)
        dropped_after = time.monotonic() - t0
    assert 0.9 < dropped_after < 3.5  # request_timeout is 1 s (swept every 0.25 s)
    assert all(call[1] != "/slow" for call in served.calls)
    assert served.server.metrics["api_server"]["connections_dropped"] >= 1
    slow.close()


def test_silent_client_is_dropped_after_the_idle_timeout(served, sock_path):
    c = connect(sock_path)
    t0 = time.monotonic()
    assert closed_by_server(c, 5)
    assert 1.9 < time.monotonic() - t0 < 4  # idle_timeout 2 s
    c.close()


def test_keep_alive_connection_survives_pauses_below_the_idle_timeout(served, sock_path):
    c = connect(sock_path)
    buf = bytearray()
    for _ in range(3):
        c.sendall(request("GET", "/x"))
        assert read_response(c, buf)[0] == 200
        time.sleep(1.2)  # longer than request_timeout, shorter than idle_timeout
    c.close()


def test_hundred_concurrent_connections_are_all_served(served, sock_path):
    clients = [connect(sock_path) for _ in range(100)]
    for i, c in enumerate(clients):  # every request is sent before any answer is read
        c.sendall(request("PUT", f"/c{i}", b"{}"))
    for i, c in enumerate(clients):
        status, _, body = read_response(c, bytearray())
        assert status == 200 and json.loads(body)["path"] == f"/c{i}"
    assert served.on_loop(lambda: served.server.connection_count) == 100
    for c in clients:
        c.close()


def test_connection_cap_evicts_the_longest_idle_then_refuses_with_503(sock_path):
    s = Served(sock_path, max_connections=3, request_timeout=5, idle_timeout=30)
    try:
        idle = [connect(sock_path) for _ in range(3)]
        time.sleep(0.1)
        newer = connect(sock_path)  # the cap is reached: the oldest idle one makes room
        assert closed_by_server(idle[0], 2)
        newer.sendall(request("GET", "/x"))
        assert read_response(newer, bytearray())[0] == 200
        # now make every connection busy (a request in progress), then one more arrives
        for c in (idle[1], idle[2], newer):
            c.sendall(b"GET /x HTTP/1.1\r\n")
        time.sleep(0.2)
        extra = connect(sock_path)
        status, headers, body = read_response(extra, bytearray())
        assert status == 503 and b"Too many open connections" in body
        assert closed_by_server(extra)
        assert s.server.metrics["api_server"]["connections_refused"] == 1
        for c in idle + [newer, extra]:
            c.close()
    finally:
        s.stop()


def test_client_that_does_not_read_is_throttled_then_dropped(sock_path):
    s = Served(sock_path, request_timeout=1.0, idle_timeout=30)
    try:
        c = connect(sock_path)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.setblocking(False)
        sent = 0
        raw = request("GET", "/big")  # 1 MB per reply
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                sent += c.send(raw * 10)
            except BlockingIOError:
                time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                break
        # back-pressure: the server stopped reading, so far fewer requests were handled
        # than sent, and it never buffered more than a few replies
        handled = len(s.calls)
        assert handled < sent // len(raw)
        assert handled < 10
        assert s.on_loop(lambda: s.server.connection_count) == 0  # dropped: never read
        c.close()
    finally:
        s.stop()


# -- the socket file and fds ----------------------------------------------------------------


def test_existing_socket_path_is_refused(sock_path):
    open(sock_path, "w").close()
    loop = EventLoop()
    try:
        with pytest.raises(ConfigError, match="api.sock.*already used"):
            ApiServer(sock_path, loop, echo_handler([]))
    finally:
        loop.close()
    assert os.path.isfile(sock_path)  # not ours: left alone


def test_close_removes_the_socket_file_only_if_still_ours(tmp_path):
    path = str(tmp_path / "a.sock")
    s = Served(path)
    assert os.path.exists(path)
    s.stop()
    assert not os.path.exists(path)
    # a second server replaced the file: closing the first leaves the new one
    loop = EventLoop()
    first = ApiServer(path, loop, echo_handler([]))
    os.unlink(path)
    second = ApiServer(path, loop, echo_handler([]))
    first.close()
    assert os.path.exists(path)
    second.close()
    assert not os.path.exists(path)
    loop.close()


def test_no_fd_leak_across_connections_errors_and_close(tmp_path):
    path = str(tmp_path / "leak.sock")
    before = open_fds()
    s = Served(path, request_timeout=0.3, idle_timeout=0.5, max_connections=5)
    clients = [connect(path) for _ in range(8)]  # some evicted
    clients[-1].sendall(b"GARBAGE\r\n\r\n")  # closed with a 400
    clients[-2].sendall(request("GET", "/x"))
    read_response(clients[-2], bytearray())
    for c in clients:
        c.close()
    time.sleep(0.2)
    c = connect(path)  # left open: close() must close it
    s.stop()
    c.close()
    assert open_fds() == before


def test_metrics_count_routes_failures_deprecations_and_latency(served, sock_path):
    c = connect(sock_path)
    buf = bytearray()
    for raw in (request("GET", "/"), request("GET", "/machine-config"),
                request("PUT", "/drives/rootfs", b"{}"), request("PUT", "/drives/fail", b"{}"),
                request("PATCH", "/mmds", b"{}"), request("GET", "/deprecated")):
        c.sendall(raw)
        read_response(c, buf)
    c.sendall(request("PUT", "/drives/x", b"{}").replace(b"/drives/x", b"/drives/x?y"))
    read_response(c, buf)
    m = served.on_loop(lambda: json.loads(json.dumps(served.server.metrics)))
    assert m["get_api_requests"]["instance_info_count"] == 1
    assert m["get_api_requests"]["machine_cfg_count"] == 1
    assert m["put_api_requests"]["drive_count"] == 3
    assert m["put_api_requests"]["drive_fails"] == 1
    assert m["patch_api_requests"]["mmds_count"] == 1
    assert m["deprecated_api"]["deprecated_http_api_calls"] == 1
    assert m["api_server"]["requests"] == 7
    assert m["api_server"]["latency_us_total"] >= m["api_server"]["latency_us_max"] > 0
    c.close()
