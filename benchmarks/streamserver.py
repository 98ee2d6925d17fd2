"""Host endpoint of the stream benchmarks (TCP over TAP, vsock over a Unix socket).

``benchmarks/bench.py`` starts it (inside the benchmark's network namespace for TCP) and the
guest's ``benchtool`` connects to it.  Protocol (see guest/helpers/benchtool.c): the guest sends
one line, ``tx <seconds>`` or ``rx <seconds>``.  ``tx``: the guest sends until it shuts its side
down; the server answers with the byte count (``<n>\\n``).  ``rx``: the server sends for
``<seconds>`` and closes.

Run: ``python streamserver.py tcp ADDRESS PORT`` or ``python streamserver.py unix PATH``; prints
``ready`` once listening and serves until killed.
"""

from __future__ import annotations

import os
import socket
import socketserver
import sys
import time

CHUNK = 128 * 1024
REQUEST_MAX = 64
MAX_SECONDS = 120.0


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        line = b""
        while not line.endswith(b"\n") and len(line) < REQUEST_MAX:
            got = sock.recv(1)
            if not got:
                return
            line += got
        try:
            kind, secs = line.decode().split()
            seconds = min(float(secs), MAX_SECONDS)
        except ValueError:
            return
        if kind == "tx":
            total = 0
            buf = bytearray(CHUNK)
            while n := sock.recv_into(buf):
                total += n
            sock.sendall(f"{total}\n".encode())
        elif kind == "rx":
            data = os.urandom(CHUNK)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)


class TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "tcp":
        server: socketserver.BaseServer = TcpServer((argv[1], int(argv[2])), Handler)
    elif len(argv) == 2 and argv[0] == "unix":
        if os.path.exists(argv[1]):
            os.unlink(argv[1])
        server = UnixServer(argv[1], Handler)
    else:
        print("usage: streamserver.py tcp ADDRESS PORT | unix PATH", file=sys.stderr)
        return 2
    print("ready", flush=True)
    with server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
