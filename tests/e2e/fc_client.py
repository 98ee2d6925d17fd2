"""A minimal client for the Firecracker API over a Unix socket, for the e2e tests (the real
external client, pyrecracker, has its own test)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock = s


class Api:
    def __init__(self, sock: str) -> None:
        self.sock = sock

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = UnixHTTPConnection(self.sock)
        try:
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
        finally:
            conn.close()

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, out = self.call(method, path, body)
        if status not in (200, 204):
            raise AssertionError(f"{method} {path} -> {status} {out}")
        return out


def wait_for_socket(path: str, proc: subprocess.Popen | None = None, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
                return
            except OSError:
                pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the VMM exited with {proc.returncode} before its socket")
        time.sleep(0.01)
    raise AssertionError(f"no API socket at {path} within {timeout} s")
