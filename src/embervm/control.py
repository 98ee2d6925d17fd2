"""The VMM control socket: a line protocol on a Unix stream socket (see docs/control.md).

Each request is one line of words separated by blanks (``balloon set 64``); the first word names
a command, the rest are its arguments.  Each reply is one line of JSON::

    {"ok": true, ...the handler's result...}
    {"ok": false, "error": "what was wrong"}

The server lives on the VMM's :class:`~embervm.eventloop.EventLoop` (non-blocking accept, read
and write; any number of clients up to :data:`MAX_CLIENTS`; requests may be pipelined).  Commands
are plain callables ``handler(args) -> dict`` registered by the VMM and by devices
(``device.control_commands()``); a handler reports bad arguments by raising ``ValueError`` with
a message for the user.  Handlers run on the event-loop thread, like every device back-end.

Everything a client sends is untrusted: lines are bounded (:data:`MAX_LINE`), a client that sends
a longer line gets an error and is disconnected, a client that stops reading its replies stops
being read (back-pressure) and is dropped after :data:`STALL_SECONDS`, and no handler error can
escape into the event loop.

Also a tiny client: ``python -m embervm.control PATH WORD...`` prints the reply line and exits
with status 0 if ``ok`` is true, 1 if not, 2 if the socket cannot be reached.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import ConfigError
from .eventloop import EventLoop, TimerHandle

log = logging.getLogger(__name__)

Handler = Callable[[list[str]], dict[str, Any]]

#: Longest request line in bytes (newline excluded).  Requests are a few words; the bound keeps a
#: client from growing a buffer in the VMM without limit.
MAX_LINE = 4096
#: Concurrent connections; more are answered with an error and closed.
MAX_CLIENTS = 32
#: Unsent reply bytes per client before the server stops reading that client's requests.
MAX_PENDING_OUTPUT = 1 << 16
#: A client whose replies could not be sent for this long is disconnected.
STALL_SECONDS = 10.0
#: How often unsent replies are retried.  The event loop watches fds for reading only, so a
#: client that filled its socket buffer is polled (rare: replies are a few hundred bytes).
RETRY_SECONDS = 0.02
#: After a failed accept (out of file descriptors), how long to wait before trying again.
ACCEPT_RETRY_SECONDS = 0.5
_RECV_SIZE = 4096


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    """One JSON object on one line (``json.dumps`` never emits a raw newline without indent)."""
    # allow_nan=False: NaN/Infinity are not JSON; a handler returning them gets an error reply.
    return json.dumps(reply, allow_nan=False).encode() + b"\n"


def error_reply(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


class _Client:
    __slots__ = ("sock", "fd", "inbuf", "outbuf", "reading", "closing", "retry", "stalled_since")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.reading = True
        self.closing = False
        self.retry: TimerHandle | None = None
        self.stalled_since: float | None = None


class ControlServer:
    """Serves ``commands`` on a Unix stream socket at ``path`` until :meth:`close`.

    A stale socket file at ``path`` (nobody listening) is replaced; a live one, or a path that
    exists and is not a socket, is a :class:`~embervm.errors.ConfigError`.  :meth:`close`
    removes the socket file again (only if it is still the one this server created).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        loop: EventLoop,
        commands: Mapping[str, Handler],
    ) -> None:
        self.path = os.fspath(path)
        self.loop = loop
        self.commands: dict[str, Handler] = dict(commands)
        self.clients: dict[int, _Client] = {}
        self.metrics = {"connections": 0, "requests": 0, "errors": 0, "dropped": 0}
        self._remove_stale(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            sock.listen(16)
            sock.setblocking(False)
            self._ident = _identity(self.path)
        except OSError as e:
            sock.close()
            # strerror is None for Python's own errors (e.g. "AF_UNIX path too long").
            raise ConfigError(f"--control {self.path}: cannot listen: "
                              f"{e.strerror or e}") from None
        self._sock: socket.socket | None = sock
        loop.add_reader(sock.fileno(), self._accept)

    # -- set-up and tear-down ---------------------------------------------------------------

    @staticmethod
    def _remove_stale(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ConfigError(f"--control {path}: {e.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"--control {path}: exists and is not a socket; choose another "
                              "path or remove the file")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except ConnectionRefusedError:
            pass  # nobody listening: a leftover of a VMM that died; replace it
        except FileNotFoundError:
            return
        except OSError as e:
            # EAGAIN (a live server with a full backlog), EACCES, ...: not provably stale.
            raise ConfigError(f"--control {path}: cannot tell whether the existing socket is "
                              f"in use ({e.strerror or e}); remove it or choose another "
                              "path") from None
        else:
            raise ConfigError(f"--control {path}: another process is serving this socket")
        finally:
            probe.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ConfigError(f"--control {path}: cannot remove the stale socket: "
                              f"{e.strerror}") from None

    def close(self) -> None:
        """Disconnect every client, stop listening and remove the socket file (idempotent)."""
        for client in list(self.clients.values()):
            self._drop(client)
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self.loop.remove_reader(sock.fileno())
        sock.close()
        try:
            # Another VMM may have replaced a socket we no longer own: leave that one alone.
            if _identity(self.path) == self._ident:
                os.unlink(self.path)
        except OSError:
            pass

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections ------------------------------------------------------------------------

    def _accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        # Bounded: the backlog holds at most a few connections, and accept stops at EAGAIN.
        for _ in range(64):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and the like: the connection stays queued and the socket readable, so
                # stop watching it for a while instead of spinning; keep serving current clients.
                log.warning("control socket: accept failed: %s", e)
                self.loop.remove_reader(sock.fileno())
                self.loop.call_later(ACCEPT_RETRY_SECONDS, self._watch_listener)
                return
            conn.setblocking(False)
            self.metrics["connections"] += 1
            if len(self.clients) >= MAX_CLIENTS:
                try:
                    conn.send(encode_reply(error_reply(
                        f"too many control connections (at most {MAX_CLIENTS})")))
                except OSError:
                    pass
                conn.close()
                self.metrics["dropped"] += 1
                continue
            client = _Client(conn)
            self.clients[client.fd] = client
            self.loop.add_reader(client.fd, lambda c=client: self._readable(c))

    def _watch_listener(self) -> None:
        if self._sock is not None:
            self.loop.add_reader(self._sock.fileno(), self._accept)

    def _drop(self, client: _Client) -> None:
        if self.clients.pop(client.fd, None) is None:
            return
        if client.retry is not None:
            client.retry.cancel()
        self.loop.remove_reader(client.fd)
        client.sock.close()

    def _readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        client.inbuf += data
        self._serve_lines(client)

    def _serve_lines(self, client: _Client) -> None:
        """Answer every complete line buffered for ``client`` (until it is paused or dropped)."""
        # Bounded by the buffered bytes (at most one recv beyond MAX_LINE): each pass consumes
        # one line.
        while client.fd in self.clients and client.reading:
            nl = client.inbuf.find(b"\n")
            if nl < 0:
                if len(client.inbuf) > MAX_LINE:
                    self._send(client, error_reply(
                        f"request line longer than {MAX_LINE} bytes"), then_close=True)
                return
            line = bytes(client.inbuf[:nl])
            del client.inbuf[: nl + 1]
            if len(line) > MAX_LINE:
                self._send(client, error_reply(f"request line longer than {MAX_LINE} bytes"),
                           then_close=True)
                return
            reply = self.handle_line(line)
            if reply is not None:
                self._send(client, reply)

    # -- requests ---------------------------------------------------------------------------

    def handle_line(self, line: bytes) -> dict[str, Any] | None:
        """The reply to one request line (``None`` for a blank line, which gets no reply)."""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self.metrics["errors"] += 1
            return error_reply("request is not UTF-8 text")
        words = text.split()
        if not words:
            return None
        self.metrics["requests"] += 1
        reply = self.dispatch(words[0], words[1:])
        if not reply.get("ok"):
            self.metrics["errors"] += 1
        return reply

    def dispatch(self, command: str, args: list[str]) -> dict[str, Any]:
        """Run one command; every outcome becomes a reply, nothing is raised."""
        handler = self.commands.get(command)
        if handler is None:
            if command == "help":
                return {"ok": True, "commands": sorted([*self.commands, "help"])}
            known = ", ".join(sorted([*self.commands, "help"]))
            return error_reply(f"unknown command {command!r} (known: {known})")
        try:
            result = handler(args)
        except ValueError as e:
            return error_reply(f"{command}: {e}")
        except Exception as e:  # a handler bug must not take the VMM down
            log.exception("control command %r failed", command)
            return error_reply(f"{command}: internal error: {type(e).__name__}: {e}")
        if not isinstance(result, dict):
            log.error("control command %r returned %r, not a dict", command, type(result))
            return error_reply(f"{command}: internal error: handler returned no result")
        reply = {"ok": True, **result}
        reply["ok"] = True  # a handler cannot turn a success into a failure by accident
        try:
            encode_reply(reply)
        except (TypeError, ValueError) as e:
            log.error("control command %r returned a result JSON cannot encode: %s", command, e)
            return error_reply(f"{command}: internal error: result is not JSON ({e})")
        return reply

    # -- replies ----------------------------------------------------------------------------

    def _send(self, client: _Client, reply: Mapping[str, Any], *, then_close: bool = False) -> None:
        client.outbuf += encode_reply(reply)
        if then_close:
            # Read nothing more from it; close once the error line is out (or on stall).
            client.closing = True
            client.reading = False
            client.inbuf.clear()
            self.loop.remove_reader(client.fd)
        if client.retry is None:  # else the pending retry sends it, in order
            self._flush(client)

    def _flush(self, client: _Client) -> None:
        client.retry = None
        if client.fd not in self.clients:
            return
        try:
            while client.outbuf:
                n = client.sock.send(client.outbuf)
                del client.outbuf[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # EPIPE, ECONNRESET: the client is gone
            self._drop(client)
            return
        if not client.outbuf:
            client.stalled_since = None
            if client.closing:
                self._drop(client)
            elif not client.reading:
                client.reading = True
                self.loop.add_reader(client.fd, lambda c=client: self._readable(c))
                # Lines that arrived while paused are already buffered: serve them now.
                if b"\n" in client.inbuf:
                    self.loop.call_later(0, lambda c=client: self._serve_lines(c))
            return
        now = time.monotonic()
        if client.stalled_since is None:
            client.stalled_since = now
        elif now - client.stalled_since > STALL_SECONDS:
            log.warning("control socket: dropping a client that does not read its replies")
            self.metrics["dropped"] += 1
            self._drop(client)
            return
        if len(client.outbuf) > MAX_PENDING_OUTPUT and client.reading:
            client.reading = False  # back-pressure: no new requests until replies drain
            self.loop.remove_reader(client.fd)
        client.retry = self.loop.call_later(RETRY_SECONDS, lambda c=client: self._flush(c))


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# -- client ---------------------------------------------------------------------------------


def request(path: str | os.PathLike[str], words: Sequence[str], *,
            timeout: float = 10.0) -> dict[str, Any]:
    """Send one request (``words`` joined by spaces) and return the decoded reply.

    Raises ``OSError`` if the socket cannot be reached or closes without a reply, and
    ``ValueError`` for a reply that is not one JSON object.
    """
    line = " ".join(words).encode()
    if b"\n" in line:
        raise ValueError("a request is a single line")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                s.connect(os.fspath(path))
                break
            except BlockingIOError:
                # AF_UNIX with a timeout: a full listen backlog fails at once with EAGAIN
                # instead of waiting; the server accepts soon, so retry until the deadline.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        s.sendall(line + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            chunk = s.recv(_RECV_SIZE)
            if not chunk:
                raise OSError(errno.ECONNRESET, "control socket closed without a reply")
            buf += chunk
    reply = json.loads(buf[: buf.index(b"\n")])
    if not isinstance(reply, dict):
        raise ValueError(f"reply is not a JSON object: {reply!r}")
    return reply


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m embervm.control PATH WORD...``: print the reply line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] in ("-h", "--help"):
        print("usage: python -m embervm.control PATH COMMAND [ARG...]\n"
              "example: python -m embervm.control /tmp/vm.sock balloon set 64", file=sys.stderr)
        return 2
    try:
        reply = request(args[0], args[1:])
    except (OSError, ValueError) as e:
        print(f"embervm.control: {args[0]}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(reply))
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
