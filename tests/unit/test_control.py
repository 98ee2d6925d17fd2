"""The control socket: line protocol, JSON replies, hostile clients, socket file lifetime.

The server runs on a real EventLoop in a background thread (as on the VMM's main thread); the
tests are ordinary blocking clients.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embervm import control
from embervm.control import MAX_CLIENTS, MAX_LINE, ControlServer, request
from embervm.errors import ConfigError
from embervm.eventloop import EventLoop


def echo(args: list[str]) -> dict:
    return {"args": args}


def bad_args(args: list[str]) -> dict:
    raise ValueError("needs a number")


def crash(args: list[str]) -> dict:
    raise RuntimeError("handler bug")


def big(args: list[str]) -> dict:
    return {"blob": "x" * 50_000}


COMMANDS = {
    "echo": echo,
    "bad": bad_args,
    "crash": crash,
    "notdict": lambda args: [1, 2],
    "notjson": lambda args: {"value": object()},
    "nan": lambda args: {"value": float("nan")},
    "big": big,
}


class Running:
    """A ControlServer on an EventLoop served by a background thread."""

    def __init__(self, path: Path, commands=COMMANDS) -> None:
        self.path = path
        self.loop = EventLoop()
        self.server = ControlServer(path, self.loop, commands)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join(5)
        self.server.close()
        self.loop.close()

    def call_in_loop(self, fn):
        """Run ``fn`` on the loop thread and wait for its result."""
        done = threading.Event()
        out = []
        self.loop.call_soon_threadsafe(lambda: (out.append(fn()), done.set()))
        assert done.wait(5)
        return out[0]


@pytest.fixture
def sock_path(tmp_path) -> Path:
    return tmp_path / "vm.sock"


@pytest.fixture
def running(sock_path):
    r = Running(sock_path)
    yield r
    r.stop()


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def read_lines(s: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before {n} replies: {buf!r}"
        buf += chunk
    lines = buf.split(b"\n")
    assert lines[n:] == [b""], "more than the expected replies"
    return [json.loads(x) for x in lines[:n]]


# -- protocol -------------------------------------------------------------------------------


def test_a_request_line_gets_one_json_line_with_ok_and_the_handler_result(running):
    assert request(running.path, ["echo", "a", "b"]) == {"ok": True, "args": ["a", "b"]}


def test_words_are_split_on_any_blanks(running):
    s = connect(running.path)
    s.sendall(b"  echo\t1   2 \r\n")
    assert read_lines(s, 1) == [{"ok": True, "args": ["1", "2"]}]


def test_unknown_command_is_an_error_naming_it_and_the_known_ones(running):
    reply = request(running.path, ["frob"])
    assert reply["ok"] is False
    assert "'frob'" in reply["error"] and "echo" in reply["error"]


def test_help_lists_the_commands(running):
    reply = request(running.path, ["help"])
    assert reply["ok"] is True and "echo" in reply["commands"]


def test_handler_value_error_becomes_an_error_reply_with_its_message(running):
    assert request(running.path, ["bad"]) == {"ok": False, "error": "bad: needs a number"}


@pytest.mark.parametrize("cmd", ["crash", "notdict", "notjson", "nan"])
def test_handler_bugs_become_internal_errors_and_the_server_keeps_serving(running, cmd):
    reply = request(running.path, [cmd])
    assert reply["ok"] is False and "internal error" in reply["error"]
    assert request(running.path, ["echo"])["ok"] is True


def test_pipelined_requests_in_one_packet_are_answered_in_order(running):
    s = connect(running.path)
    s.sendall(b"echo 1\necho 2\n\nfrob\necho 3\n")
    replies = read_lines(s, 4)  # the blank line gets no reply
    assert [r.get("args") for r in replies] == [["1"], ["2"], None, ["3"]]
    assert replies[2]["ok"] is False


def test_a_request_split_across_sends_is_one_request(running):
    s = connect(running.path)
    for part in (b"ec", b"ho 4", b"2", b"\n"):
        s.sendall(part)
        time.sleep(0.02)
    assert read_lines(s, 1) == [{"ok": True, "args": ["42"]}]


def test_several_clients_are_served_concurrently(running):
    clients = [connect(running.path) for _ in range(5)]
    for i, s in enumerate(clients):
        s.sendall(f"echo {i}\n".encode())
    for i, s in enumerate(clients):
        assert read_lines(s, 1) == [{"ok": True, "args": [str(i)]}]


def test_non_utf8_request_is_an_error(running):
    s = connect(running.path)
    s.sendall(b"echo \xff\xfe\n")
    [reply] = read_lines(s, 1)
    assert reply["ok"] is False and "UTF-8" in reply["error"]


# -- hostile clients ---------------------------------------------------------------------------


def test_an_overlong_line_gets_an_error_and_the_connection_is_closed(running):
    s = connect(running.path)
    s.sendall(b"echo " + b"x" * (MAX_LINE + 10))
    [reply] = read_lines(s, 1)
    assert reply["ok"] is False and "longer than" in reply["error"]
    assert s.recv(10) == b""  # closed by the server
    assert request(running.path, ["echo"])["ok"] is True


def test_a_line_of_exactly_max_length_is_accepted(running):
    s = connect(running.path)
    s.sendall(b"echo " + b"y" * (MAX_LINE - 5) + b"\n")
    [reply] = read_lines(s, 1)
    assert reply["ok"] is True and len(reply["args"][0]) == MAX_LINE - 5


def test_disconnected_clients_are_forgotten(running):
    for _ in range(3):
        s = connect(running.path)
        s.sendall(b"echo half-a-li")
        s.close()
    deadline = time.monotonic() + 5
    while running.call_in_loop(lambda: len(running.server.clients)):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_connections_beyond_the_limit_get_an_error_and_are_closed(running):
    held = []
    for _ in range(MAX_CLIENTS):  # one by one, each surely accepted before the next
        s = connect(running.path)
        s.sendall(b"echo\n")
        read_lines(s, 1)
        held.append(s)
    extra = connect(running.path)
    [reply] = read_lines(extra, 1)
    assert reply["ok"] is False and "too many" in reply["error"]
    held.pop().close()
    deadline = time.monotonic() + 5
    while True:  # the freed slot becomes available again
        try:
            reply = request(running.path, ["echo"], timeout=2)
        except OSError:
            reply = {}
        if reply.get("ok"):
            break
        assert time.monotonic() < deadline, reply
        time.sleep(0.05)
    for s in held:
        s.close()


def test_a_client_that_never_reads_does_not_block_others_and_is_dropped(sock_path, monkeypatch):
    monkeypatch.setattr(control, "STALL_SECONDS", 0.5)
    r = Running(sock_path)
    try:
        hog = connect(r.path)
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:  # pipeline far more replies than the socket buffers hold, read none
            hog.sendall(b"big\n" * 400)
        except OSError:
            pass
        for _ in range(3):
            assert request(r.path, ["echo", "x"], timeout=5)["ok"] is True
        deadline = time.monotonic() + 10
        while r.call_in_loop(lambda: len(r.server.clients)) > 0:
            assert time.monotonic() < deadline, "the stalled client was never dropped"
            time.sleep(0.05)
        assert r.server.metrics["dropped"] >= 1
        hog.close()
    finally:
        r.stop()


def test_replies_are_delivered_completely_to_a_slow_reader(running):
    s = connect(running.path)
    s.sendall(b"big\n" * 20)  # ~1 MB of replies, more than a socket buffer
    time.sleep(0.3)
    replies = read_lines(s, 20)
    assert all(len(r["blob"]) == 50_000 for r in replies)


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory):
    loop = EventLoop()
    server = ControlServer(tmp_path_factory.mktemp("ctl") / "s.sock", loop, COMMANDS)
    yield server
    server.close()
    loop.close()


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.sampled_from([b"echo", b"bad", b"crash", b"nan", b"help", b" ",
                                           b"\t", b"\xff", b"\x00", b"\r"]),
                          max_size=6).map(b"".join)))
def test_any_request_bytes_get_one_json_reply_or_none_and_never_raise(idle_server, line):
    reply = idle_server.handle_line(line)
    if reply is None:
        assert not line.decode("utf-8").split()
    else:
        assert isinstance(reply["ok"], bool)
        assert control.encode_reply(reply).count(b"\n") == 1


# -- socket file -------------------------------------------------------------------------------


def test_close_removes_the_socket_file_and_is_idempotent(sock_path):
    loop = EventLoop()
    server = ControlServer(sock_path, loop, COMMANDS)
    assert sock_path.is_socket()
    server.close()
    server.close()
    assert not sock_path.exists()
    loop.close()


def test_a_stale_socket_file_is_replaced(sock_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file remains, nobody listens
    r = Running(sock_path)
    try:
        assert request(sock_path, ["echo"])["ok"] is True
    finally:
        r.stop()


def test_a_live_socket_is_not_taken_over(running):
    loop = EventLoop()
    try:
        with pytest.raises(ConfigError, match="another process"):
            ControlServer(running.path, loop, COMMANDS)
    finally:
        loop.close()
    assert request(running.path, ["echo"])["ok"] is True


def test_a_path_that_is_not_a_socket_is_a_config_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep me")
    loop = EventLoop()
    try:
        with pytest.raises(ConfigError, match="not a socket"):
            ControlServer(f, loop, COMMANDS)
        with pytest.raises(ConfigError, match="cannot listen"):
            ControlServer(tmp_path / "missing-dir" / "s", loop, COMMANDS)
        with pytest.raises(ConfigError, match="cannot listen: .*too long"):
            ControlServer(tmp_path / ("x" * 120), loop, COMMANDS)
    finally:
        loop.close()
    assert f.read_text() == "keep me"


def test_close_leaves_a_socket_that_replaced_ours_alone(sock_path):
    loop = EventLoop()
    server = ControlServer(sock_path, loop, COMMANDS)
    os.unlink(sock_path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(sock_path))
    server.close()
    assert sock_path.is_socket()
    other.close()
    loop.close()


# -- the command-line client -------------------------------------------------------------------


def run_client(*args: str) -> subprocess.CompletedProcess:
    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ, PYTHONPATH=str(src))
    return subprocess.run([sys.executable, "-m", "embervm.control", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_command_line_client_prints_the_reply_and_exits_by_ok(running):
    p = run_client(str(running.path), "echo", "hi")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"ok": True, "args": ["hi"]}
    p = run_client(str(running.path), "bad")
    assert p.returncode == 1 and json.loads(p.stdout)["ok"] is False


def test_command_line_client_reports_an_unreachable_socket(tmp_path):
    p = run_client(str(tmp_path / "nothing.sock"), "status")
    assert p.returncode == 2 and "nothing.sock" in p.stderr
    assert run_client().returncode == 2
