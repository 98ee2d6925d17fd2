"""Firecracker's HTTP API server: HTTP/1.1 over a Unix stream socket, on the VMM's event loop.

:class:`ApiServer` accepts connections on a listening Unix socket and parses requests with
h11 (sans-I/O: this module only moves bytes between non-blocking sockets and h11).  Each
complete request is handed to ``handler(method, path, body)`` (normally
:meth:`embervm.fc.api.FirecrackerApi.handle`) on the loop's thread, and its
:class:`~embervm.fc.api.Response` is written back with the headers Firecracker's micro_http
sends (``Server: Firecracker API``, ``Connection: keep-alive``, ``Content-Type`` and
``Content-Length`` when there is a body).

What a client can and cannot do (Firecracker's micro_http behaviour where it has one):

* keep-alive and pipelined requests, bodies with ``Content-Length`` (or chunked, which h11
  decodes); ``Expect: 100-continue`` is answered with a 100;
* a body over ``max_payload`` bytes is refused with 400 ``Request payload with size N is
  larger than the limit of M allowed by server.`` (micro_http's text) and the connection is
  closed (the body is not read);
* malformed HTTP answers 400, headers longer than ``max_header_bytes`` 431, then the
  connection is closed;
* a request must arrive whole within ``request_timeout`` seconds of its first byte, a reply
  must be taken by the client within ``request_timeout`` seconds, and a connection with nothing
  in progress is closed after ``idle_timeout`` seconds: so a slow or silent client holds one
  connection slot for a bounded time and never blocks the loop;
* at most ``max_connections`` connections: when full, the longest-idle connection is closed to
  make room; if every connection is busy, the new one gets micro_http's 503 ``Too many open
  connections`` and is closed;
* replies are buffered when the socket would block and flushed when it becomes writable; while
  more than ``HIGH_WATER`` bytes wait, no further pipelined request of that connection is read
  (back-pressure), so the buffer stays bounded.

Every error path closes the connection's fd; the listening socket file is removed by
:meth:`ApiServer.close`.  Counters for Firecracker's ``api_server``, ``get_api_requests``,
``put_api_requests``, ``patch_api_requests`` and ``deprecated_api`` metric groups are kept in
:attr:`ApiServer.metrics`.

h11 is imported when the server is constructed, not with this module, so a caller can bind the
socket (:func:`embervm.fc.sock.bind_unix`, which imports almost nothing) first and answer
``connect()`` within milliseconds of exec.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .sock import bind_unix, remove_socket_file

if TYPE_CHECKING:
    from typing import Any

__all__ = ["ApiServer", "bind_unix", "remove_socket_file"]

log = logging.getLogger(__name__)

#: Firecracker's default ``--http-api-max-payload-size``
DEFAULT_MAX_PAYLOAD = 51200
#: bytes of replies waiting for one connection above which its next requests are not read
HIGH_WATER = 256 * 1024
SERVER_NAME = "Firecracker API"
#: micro_http's answer when the server is full
TOO_MANY_CONNECTIONS = b'{ "error": "Too many open connections" }'

# First path segment -> the counter's stem in Firecracker's per-method request metric groups.
_GET_ROUTES = {"": "instance_info", "machine-config": "machine_cfg", "mmds": "mmds",
               "version": "vmm_version", "hotplug": "hotplug_memory"}
_PUT_ROUTES = {"actions": "actions", "boot-source": "boot_source", "drives": "drive",
               "logger": "logger", "machine-config": "machine_cfg", "cpu-config": "cpu_cfg",
               "metrics": "metrics", "network-interfaces": "network", "mmds": "mmds",
               "vsock": "vsock", "pmem": "pmem", "serial": "serial",
               "hotplug": "hotplug_memory"}
_PATCH_ROUTES = {"drives": "drive", "network-interfaces": "network",
                 "machine-config": "machine_cfg", "mmds": "mmds", "hotplug": "hotplug_memory",
                 "pmem": "pmem"}


def _new_metrics() -> dict[str, dict[str, int]]:
    def group(routes: dict[str, str], fails: bool) -> dict[str, int]:
        out: dict[str, int] = {}
        for stem in dict.fromkeys(routes.values()):
            out[f"{stem}_count"] = 0
            if fails:
                out[f"{stem}_fails"] = 0
        return out

    return {
        "api_server": {
            # Firecracker's two (set by the front end from --start-time-us and friends)
            "process_startup_time_us": 0,
            "process_startup_time_cpu_us": 0,
            # embervm's own
            "requests": 0,
            "bad_requests": 0,
            "connections_accepted": 0,
            "connections_refused": 0,
            "connections_dropped": 0,
            "latency_us_last": 0,
            "latency_us_max": 0,
            "latency_us_total": 0,
        },
        "get_api_requests": group(_GET_ROUTES, False),
        "put_api_requests": group(_PUT_ROUTES, True),
        "patch_api_requests": group(_PATCH_ROUTES, True),
        "deprecated_api": {"deprecated_http_api_calls": 0},
    }


class _Conn:
    """One client connection: its socket, h11 state, reply buffer and deadlines."""

    __slots__ = ("sock", "fd", "h11", "out", "body", "request", "close_after_flush",
                 "reading", "writing", "processing", "busy_since", "stall_since",
                 "last_activity", "closed")

    def __init__(self, sock: socket.socket, h11conn: Any, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.h11 = h11conn
        self.out = bytearray()
        self.body = bytearray()
        self.request: tuple[str, str] | None = None  # (method, target) being received
        self.close_after_flush = False
        self.reading = False
        self.writing = False
        self.processing = False  # inside _process (replies flushed from there must not recurse)
        self.busy_since: float | None = None  # first byte of the request being received
        self.stall_since: float | None = None  # when replies started waiting on the client
        self.last_activity = now
        self.closed = False

    def idle(self) -> bool:
        return self.busy_since is None and not self.out


class ApiServer:
    """The API's HTTP server on ``loop`` (see the module docstring).

    ``handler(method, path, body)`` answers one request (``body`` is None when empty) with an
    object that has ``status``, ``body`` (bytes or None) and ``headers`` (a list of pairs).
    ``listener``: an already bound listening socket (from :func:`bind_unix`) for ``path``;
    without it the socket is bound here.  Construct, use and close it on the loop's thread (or
    before/after the loop runs)."""

    def __init__(self, path: str, loop: Any, handler: Callable[[str, str, bytes | None], Any],
                 *, max_payload: int = DEFAULT_MAX_PAYLOAD, max_connections: int = 256,
                 max_header_bytes: int = 16 * 1024, request_timeout: float = 10.0,
                 idle_timeout: float = 120.0, listener: socket.socket | None = None) -> None:
        import h11  # here, not at module level: see the module docstring

        self._h11 = h11
        self.path = path
        self.loop = loop
        self.handler = handler
        self.max_payload = max_payload
        self.max_connections = max_connections
        self.max_header_bytes = max_header_bytes
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.metrics = _new_metrics()
        self._conns: dict[int, _Conn] = {}
        self._sweep_handle = None
        self._sweep_interval = max(0.02, min(request_timeout, idle_timeout) / 4)
        self._accept_paused = False
        self._closed = False
        self.listener = listener if listener is not None else bind_unix(path)
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)  # close() removes the file only if still ours
        self.listener.setblocking(False)
        loop.add_reader(self.listener.fileno(), self._on_accept)

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    # -- accepting -----------------------------------------------------------------------------

    def _on_accept(self) -> None:
        for _ in range(64):  # bounded per wake-up so other fds get their turn
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds/memory: the listener stays readable, so stop watching it for a
                    # moment instead of spinning; the pending client waits in the backlog.
                    log.warning("API socket: cannot accept a connection (%s); retrying in "
                                "100 ms", e.strerror)
                    self._pause_accept(0.1)
                    return
                log.warning("API socket: accept failed: %s", e.strerror or e)
                continue
            self._admit(sock)

    def _pause_accept(self, delay: float) -> None:
        if self._accept_paused or self._closed:
            return
        self._accept_paused = True
        self.loop.remove_reader(self.listener.fileno())

        def resume() -> None:
            self._accept_paused = False
            if not self._closed:
                self.loop.add_reader(self.listener.fileno(), self._on_accept)

        self.loop.call_later(delay, resume)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if len(self._conns) >= self.max_connections:
            victim = min((c for c in self._conns.values() if c.idle()),
                         key=lambda c: c.last_activity, default=None)
            if victim is None:
                self.metrics["api_server"]["connections_refused"] += 1
                try:  # best effort: the client may not even read it
                    sock.send(b"HTTP/1.1 503 \r\nServer: Firecracker API\r\nConnection: close\r\n"
                              b"Content-Length: %d\r\n\r\n%s"
                              % (len(TOO_MANY_CONNECTIONS), TOO_MANY_CONNECTIONS))
                except OSError:
                    pass
                sock.close()
                return
            log.debug("API socket: full, closing the longest-idle connection")
            self._drop(victim)
        h11conn = self._h11.Connection(self._h11.SERVER,
                                       max_incomplete_event_size=self.max_header_bytes)
        conn = _Conn(sock, h11conn, time.monotonic())
        self._conns[conn.fd] = conn
        self.metrics["api_server"]["connections_accepted"] += 1
        self._set_reading(conn, True)
        if self._sweep_handle is None:
            self._sweep_handle = self.loop.call_later(self._sweep_interval, self._sweep)

    # -- reading and dispatching ---------------------------------------------------------------

    def _set_reading(self, conn: _Conn, on: bool) -> None:
        if conn.reading == on or conn.closed:
            return
        conn.reading = on
        if on:
            self.loop.add_reader(conn.fd, lambda: self._on_readable(conn))
        else:
            self.loop.remove_reader(conn.fd)

    def _on_readable(self, conn: _Conn) -> None:
        if conn.closed:
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("API connection: recv failed: %s", e.strerror or e)
            self._close(conn)
            return
        now = time.monotonic()
        conn.last_activity = now
        if data and conn.busy_since is None:
            conn.busy_since = now
        try:
            conn.h11.receive_data(data)  # b"" means EOF
        except self._h11.RemoteProtocolError as e:  # data after the peer's EOF
            self._protocol_error(conn, e)
            return
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Handle every complete event h11 has buffered, within the back-pressure limit."""
        if conn.processing:
            return
        conn.processing = True
        try:
            self._process_events(conn)
        finally:
            conn.processing = False

    def _process_events(self, conn: _Conn) -> None:
        h11 = self._h11
        while not conn.closed:
            if len(conn.out) > HIGH_WATER:
                self._set_reading(conn, False)  # resumed by _flush once the client reads
                return
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as e:
                self._protocol_error(conn, e)
                return
            if event is h11.NEED_DATA:
                if conn.h11.their_state is h11.IDLE and not conn.h11.trailing_data[0]:
                    conn.busy_since = None  # nothing of a next request yet
                elif conn.busy_since is None:
                    conn.busy_since = time.monotonic()
                if conn.h11.trailing_data[1]:  # EOF in the middle of a request
                    self._close(conn)
                    return
                self._set_reading(conn, True)
                return
            if event is h11.PAUSED:
                # we are still sending a reply; happens only after a protocol switch or close
                self._set_reading(conn, False)
                return
            if isinstance(event, h11.ConnectionClosed):
                # the client shut down its side: finish sending what it asked for, then close
                conn.close_after_flush = True
                self._set_reading(conn, False)
                if not conn.out:
                    self._close(conn)
                return
            if isinstance(event, h11.Request):
                if not self._on_request(conn, event):
                    return
            elif isinstance(event, h11.Data):
                conn.body += event.data
                if len(conn.body) > self.max_payload:  # chunked bodies announce no length
                    self._too_large(conn, len(conn.body))
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch(conn)

    def _on_request(self, conn: _Conn, event: Any) -> bool:
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("utf-8", "replace")
        conn.request = (method, target)
        conn.body = bytearray()
        if event.http_version not in (b"1.0", b"1.1"):  # h11 takes any 1.x+; micro_http not
            self.metrics["api_server"]["bad_requests"] += 1
            version = event.http_version.decode("ascii", "replace")
            self._error_reply(conn, 400, _error_body(f"Invalid HTTP Version: HTTP/{version}"))
            return False
        for name, value in event.headers:
            if name == b"content-length":
                size = int(value)  # h11 has validated it
                if size > self.max_payload:
                    self._too_large(conn, size)
                    return False
        if conn.h11.they_are_waiting_for_100_continue:
            self._send(conn, [self._h11.InformationalResponse(status_code=100, headers=[])])
        return True

    def _dispatch(self, conn: _Conn) -> None:
        assert conn.request is not None
        method, target = conn.request
        body = bytes(conn.body) if conn.body else None
        conn.request = None
        conn.body = bytearray()
        t0 = time.perf_counter()
        try:
            response = self.handler(method, target, body)
            status, payload, headers = response.status, response.body, list(response.headers)
        except Exception as e:  # a handler bug: the client still gets an answer
            log.exception("API handler failed on %s %s", method, target)
            status, headers = 400, []
            payload = _fault(f"Internal error while handling {method} {target}: "
                             f"{type(e).__name__}: {e}")
        latency = int((time.perf_counter() - t0) * 1e6)
        self._count(method, target, status, headers, latency)
        log.debug("API %s %s -> %d (%d us)", method, target, status, latency)
        self._respond(conn, status, payload, headers)
        h11 = self._h11
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            conn.busy_since = None

    # -- replies -------------------------------------------------------------------------------

    def _respond(self, conn: _Conn, status: int, payload: bytes | None,
                 headers: list[tuple[str, str]], close: bool = False) -> None:
        h11 = self._h11
        hdrs = [("Server", SERVER_NAME), ("Connection", "close" if close else "keep-alive")]
        names = {k.lower() for k, _ in headers}
        hdrs += headers
        if payload:
            if "content-type" not in names:
                hdrs.append(("Content-Type", "application/json"))
            hdrs.append(("Content-Length", str(len(payload))))
            events = [h11.Response(status_code=status, headers=hdrs), h11.Data(data=payload),
                      h11.EndOfMessage()]
        else:
            if status >= 200 and status not in (204, 304):
                hdrs.append(("Content-Length", "0"))
            events = [h11.Response(status_code=status, headers=hdrs), h11.EndOfMessage()]
        self._send(conn, events)
        if close or conn.h11.our_state is h11.MUST_CLOSE:
            conn.close_after_flush = True
            self._set_reading(conn, False)
            if not conn.out:
                self._close(conn)

    def _send(self, conn: _Conn, events: list[Any]) -> None:
        try:
            for event in events:
                data = conn.h11.send(event)
                if data:
                    conn.out += data
        except self._h11.LocalProtocolError:
            log.exception("API connection: cannot send a reply in state %s",
                          conn.h11.our_state)
            self._close(conn)
            return
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        while conn.out and not conn.closed:
            try:
                n = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # EPIPE, ECONNRESET: the client is gone
                log.debug("API connection: send failed: %s", e.strerror or e)
                self._close(conn)
                return
            del conn.out[:n]
        if conn.closed:
            return
        if conn.out:
            if conn.stall_since is None:
                conn.stall_since = time.monotonic()
            if not conn.writing:
                conn.writing = True
                self.loop.add_writer(conn.fd, lambda: self._flush(conn))
            return
        conn.stall_since = None
        if conn.writing:
            conn.writing = False
            self.loop.remove_writer(conn.fd)
        if conn.close_after_flush:
            self._close(conn)
        elif not conn.reading:
            # back-pressure released: handle requests h11 already holds, then read again
            self._process(conn)

    # -- errors --------------------------------------------------------------------------------

    def _too_large(self, conn: _Conn, size: int) -> None:
        self.metrics["api_server"]["bad_requests"] += 1
        message = (f"Request payload with size {size} is larger than the limit of "
                   f"{self.max_payload} allowed by server.\nAll previous unanswered requests "
                   "will be dropped.")
        self._error_reply(conn, 400, _error_body(message))

    def _protocol_error(self, conn: _Conn, e: Exception) -> None:
        self.metrics["api_server"]["bad_requests"] += 1
        status = getattr(e, "error_status_hint", 400)
        if status not in (400, 431):
            status = 400
        log.debug("API connection: bad HTTP (%d): %s", status, e)
        self._error_reply(conn, status, _error_body(f"{e}\nAll previous unanswered requests "
                                                    "will be dropped."))

    def _error_reply(self, conn: _Conn, status: int, payload: bytes) -> None:
        """Answer a request the server refuses itself, then close the connection."""
        h11 = self._h11
        conn.request = None
        conn.body = bytearray()
        if conn.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self._respond(conn, status, payload, [], close=True)
        else:  # in the middle of another reply: nothing sensible can be added
            self._close(conn)

    # -- deadlines -----------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Close connections past their deadline (see the module docstring); re-arms itself
        while any connection is open."""
        self._sweep_handle = None
        now = time.monotonic()
        for conn in list(self._conns.values()):
            if conn.stall_since is not None and now - conn.stall_since > self.request_timeout:
                reason = "does not read its replies"
            elif conn.busy_since is not None and now - conn.busy_since > self.request_timeout:
                reason = "sends its request too slowly"
            elif conn.idle() and now - conn.last_activity > self.idle_timeout:
                reason = "is idle"
            else:
                continue
            log.info("API connection dropped: the client %s", reason)
            self._drop(conn)
        if self._conns and not self._closed:
            self._sweep_handle = self.loop.call_later(self._sweep_interval, self._sweep)

    def _drop(self, conn: _Conn) -> None:
        self.metrics["api_server"]["connections_dropped"] += 1
        self._close(conn)

    # -- closing -------------------------------------------------------------------------------

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.reading:
            self.loop.remove_reader(conn.fd)
        if conn.writing:
            self.loop.remove_writer(conn.fd)
        conn.reading = conn.writing = False
        self._conns.pop(conn.fd, None)
        conn.out.clear()
        try:
            conn.sock.close()
        except OSError:
            pass

    def close(self) -> None:
        """Close every connection and the listener, and remove the socket file (if it is still
        the one bound here).  Idempotent."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            self._close(conn)
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        try:
            self.loop.remove_reader(self.listener.fileno())
        except (ValueError, OSError):
            pass
        self.listener.close()
        remove_socket_file(self.path, self._identity)

    # -- metrics -------------------------------------------------------------------------------

    def _count(self, method: str, target: str, status: int, headers: list[tuple[str, str]],
               latency_us: int) -> None:
        m = self.metrics
        server = m["api_server"]
        server["requests"] += 1
        server["latency_us_last"] = latency_us
        server["latency_us_total"] += latency_us
        if latency_us > server["latency_us_max"]:
            server["latency_us_max"] = latency_us
        if any(k.lower() == "deprecation" for k, _ in headers):
            m["deprecated_api"]["deprecated_http_api_calls"] += 1
        first = target.split("?", 1)[0].lstrip("/").split("/", 1)[0]
        table = {"GET": (_GET_ROUTES, "get_api_requests"),
                 "PUT": (_PUT_ROUTES, "put_api_requests"),
                 "PATCH": (_PATCH_ROUTES, "patch_api_requests")}.get(method.upper())
        if table is None or first not in table[0]:
            return
        group = m[table[1]]
        stem = table[0][first]
        group[f"{stem}_count"] += 1
        if status >= 400 and f"{stem}_fails" in group:
            group[f"{stem}_fails"] += 1


def _error_body(message: str) -> bytes:
    """micro_http's error body ``{ "error": "..." }``, as valid JSON (micro_http writes the
    newline in the message raw, which strict JSON parsers reject)."""
    import json

    return b'{ "error": ' + json.dumps(message).encode() + b" }"


def _fault(message: str) -> bytes:
    import json

    return json.dumps({"fault_message": message}).encode()
