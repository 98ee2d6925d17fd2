"""The firecracker front end as a process: ``.venv/bin/embervm --api-sock S`` and a
``firecracker`` symlink on PATH.  No guest is booted: GET / answers, SIGTERM before boot ends
the process the way it ends Firecracker (death by the signal) and removes the socket, a second
instance on the same path is refused, and the time from exec to a connectable socket is
printed (no timing assertion: this host is shared)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

EMBERVM = Path(sys.executable).parent / "embervm"


@pytest.fixture
def fc_on_path(tmp_path):
    """A directory on PATH with ``firecracker`` -> .venv/bin/embervm."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "firecracker").symlink_to(EMBERVM)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def start(cmd: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def wait_connect(path: str, proc: subprocess.Popen, timeout: float = 20) -> socket.socket:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read().decode()}")
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            c.connect(path)
            c.settimeout(20)
            return c
        except OSError:
            c.close()
            time.sleep(0.001)
    raise AssertionError("the API socket never accepted")


def get(c: socket.socket, path: str) -> tuple[int, bytes]:
    c.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += c.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                  if ln.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += c.recv(4096)
    return int(head.split()[1]), body


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    finally:
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("via", ["embervm", "firecracker-symlink"])
def test_get_root_answers_and_sigterm_ends_it_like_firecracker(tmp_path, fc_on_path, via):
    sock = str(tmp_path / "api.sock")
    if via == "embervm":
        cmd, env = [str(EMBERVM), "--api-sock", sock, "--id", "e2e-vm"], None
    else:
        cmd, env = ["firecracker", "--api-sock", sock, "--id", "e2e-vm"], fc_on_path
    t0 = time.monotonic()
    proc = start(cmd, env)
    try:
        c = wait_connect(sock, proc)
        t_accept = time.monotonic() - t0
        status, body = get(c, "/")
        t_answer = time.monotonic() - t0
        print(f"\n{via}: connect after {t_accept * 1e3:.0f} ms, first answer after "
              f"{t_answer * 1e3:.0f} ms")
        assert status == 200
        assert b'"id":"e2e-vm"' in body and b'"state":"Not started"' in body
        assert b'"app_name":"Firecracker"' in body
        status, body = get(c, "/version")
        assert status == 200 and b"1.16.1" in body
        c.close()
    finally:
        code = stop(proc)
    assert code == -signal.SIGTERM  # died of SIGTERM, as Firecracker does
    assert not os.path.exists(sock)


def test_second_instance_on_the_same_path_is_refused(tmp_path):
    sock = str(tmp_path / "api.sock")
    first = start([str(EMBERVM), "--api-sock", sock])
    try:
        wait_connect(sock, first).close()
        second = subprocess.run([str(EMBERVM), "--api-sock", sock], capture_output=True,
                                timeout=60)
        assert second.returncode == 1
        assert b"Failed to open the API socket" in second.stderr
        assert os.path.exists(sock)  # the first one's socket is left alone
        c = wait_connect(sock, first)
        assert get(c, "/")[0] == 200  # and still served
        c.close()
    finally:
        stop(first)
    assert not os.path.exists(sock)


def test_version_through_the_symlink(fc_on_path):
    out = subprocess.run(["firecracker", "--version"], env=fc_on_path, capture_output=True,
                         timeout=60)
    assert out.returncode == 0
    assert out.stdout == b"Firecracker v1.16.1\n\n"


def test_sigint_also_ends_it_and_removes_the_socket(tmp_path):
    sock = str(tmp_path / "api.sock")
    proc = start([str(EMBERVM), "--api-sock", sock])
    try:
        wait_connect(sock, proc).close()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    finally:
        stop(proc)
    assert code == -signal.SIGINT
    assert not os.path.exists(sock)
