"""The control plane's speed, embervm's Firecracker API side by side with QEMU's QMP.

Measured (each over ``runs`` process starts, alternating embervm and QEMU):

* ``sock``: exec -> the control socket accepts a connection (embervm: ``--api-sock``; QEMU:
  ``-qmp unix:...,server=on,wait=off -S``, i.e. before its vCPUs run);
* ``istart``: ``PUT /actions InstanceStart`` sent -> the first ``KVM_RUN`` (embervm logs it at
  Info level with the monotonic clock; embervm only: QEMU has no pre-boot configuration step);
* ``get``/``patch``: per-request latency, median and p99 over 1,000 ``GET /`` and 1,000 ``PATCH
  /machine-config`` on one keep-alive connection before boot, right after the socket accepts
  (so the front end's background warm-up import of the VMM overlaps the first requests);
  QEMU: 1,000 QMP ``query-status``, the closest request to ``GET /`` (QMP has no PATCH
  equivalent).

Run alone: ``python benchmarks/api_bench.py [--runs N] [--requests N]``; ``bench.py`` calls
:func:`measure` for its ``api`` group.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QEMU = "qemu-system-x86_64"


def _embervm() -> list[str]:
    exe = Path(sys.executable).parent / "embervm"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "embervm"]


def _wait_accept(path: str, proc: subprocess.Popen, t0: float, timeout: float = 10.0) -> float:
    """Seconds from ``t0`` until ``path`` accepts a connection (polled every 0.2 ms)."""
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return time.monotonic() - t0
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}") from None
            time.sleep(0.0002)
    raise RuntimeError(f"{path} did not accept within {timeout} s")


class Http:
    """HTTP/1.1 keep-alive requests over a Unix socket, timed one by one."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.buf = b""

    def request(self, method: str, target: str, body: dict | None = None) -> tuple[int, bytes]:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + data)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        header, _, rest = self.buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)content-length:\s*(\d+)", header)
        n = int(m.group(1)) if m else 0
        while len(rest) < n:
            rest += self._recv()
        self.buf = rest[n:]
        return int(header.split(b" ", 2)[1]), rest[:n]

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


class Qmp:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.f = self.sock.makefile("rwb")
        json.loads(self.f.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, cmd: str) -> dict:
        self.f.write(json.dumps({"execute": cmd}).encode() + b"\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg or "error" in msg:
                return msg

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def _percentiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[min(len(xs) - 1, int(len(xs) * 0.99))]


def embervm_run(kernel: Path, initrd: Path, requests: int, tmp: Path) -> dict[str, float]:
    """One embervm process: socket time, request latencies, InstanceStart -> first KVM_RUN."""
    sock = str(tmp / "api.sock")
    log = tmp / "embervm.log"
    t0 = time.monotonic()
    p = subprocess.Popen([*_embervm(), "--api-sock", sock, "--level", "Info", "--log-path",
                          str(log)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        out = {"sock": _wait_accept(sock, p, t0) * 1000}
        c = Http(sock)
        get, patch = [], []
        for _ in range(requests):
            a = time.perf_counter()
            status, _ = c.request("GET", "/")
            get.append(time.perf_counter() - a)
            assert status == 200, status
        for _ in range(requests):
            a = time.perf_counter()
            status, body = c.request("PATCH", "/machine-config", {"mem_size_mib": 128})
            patch.append(time.perf_counter() - a)
            assert status == 204, (status, body)
        out["get_p50"], out["get_p99"] = (x * 1e6 for x in _percentiles(get))
        out["patch_p50"], out["patch_p99"] = (x * 1e6 for x in _percentiles(patch))
        for path, body in (("/boot-source", {"kernel_image_path": str(kernel),
                                             "initrd_path": str(initrd)}),):
            status, text = c.request("PUT", path, body)
            assert status == 204, (path, status, text)
        t_start = time.monotonic()
        status, text = c.request("PUT", "/actions", {"action_type": "InstanceStart"})
        assert status == 204, (status, text)
        c.close()
        deadline = time.monotonic() + 10
        rx = re.compile(r"first KVM_RUN at monotonic (\d+\.\d+)")
        while time.monotonic() < deadline:
            m = rx.search(log.read_text(errors="replace")) if log.exists() else None
            if m:
                out["istart"] = (float(m.group(1)) - t_start) * 1000
                break
            time.sleep(0.01)
        return out
    finally:
        p.kill()
        p.wait()


def qemu_run(requests: int, tmp: Path) -> dict[str, float]:
    sock = str(tmp / "qmp.sock")
    t0 = time.monotonic()
    p = subprocess.Popen([QEMU, "-M", "microvm,acpi=off", "-accel", "kvm", "-nodefaults",
                          "-no-user-config", "-display", "none", "-S", "-qmp",
                          f"unix:{sock},server=on,wait=off"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        out = {"sock": _wait_accept(sock, p, t0) * 1000}
        q = Qmp(sock)
        get = []
        for _ in range(requests):
            a = time.perf_counter()
            q.execute("query-status")
            get.append(time.perf_counter() - a)
        q.close()
        out["get_p50"], out["get_p99"] = (x * 1e6 for x in _percentiles(get))
        return out
    finally:
        p.kill()
        p.wait()


def measure(kernel: Path, initrd: Path, runs: int, requests: int,
            add=None) -> dict[str, dict[str, list[float]]]:
    """``runs`` alternating rounds; returns metric -> vmm -> values.  ``add(key, vmm, value,
    round)`` receives every sample as well (bench.py's Samples.add)."""
    results: dict[str, dict[str, list[float]]] = {}
    have_qemu = subprocess.run(["which", QEMU], capture_output=True).returncode == 0
    for i in range(runs):
        order = ("embervm", "qemu") if i % 2 == 0 else ("qemu", "embervm")
        for vmm in order:
            if vmm == "qemu" and not have_qemu:
                continue
            with tempfile.TemporaryDirectory(prefix="embervm-apibench-") as d:
                r = (embervm_run(kernel, initrd, requests, Path(d)) if vmm == "embervm"
                     else qemu_run(requests, Path(d)))
            for key, value in r.items():
                results.setdefault(key, {}).setdefault(vmm, []).append(value)
                if add is not None:
                    add(f"api_{key}", vmm, value, i)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--requests", type=int, default=1000)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from embervm import images

    res = measure(images.image("vmlinux-base"), images.image("initramfs-tiny"), a.runs,
                  a.requests)
    units = {"sock": "ms", "istart": "ms"}
    for key, per in res.items():
        cells = "  ".join(f"{vmm} {statistics.median(v):.2f}" for vmm, v in per.items())
        print(f"{key:10s} [{units.get(key, 'us')}]  {cells}")
    return 0


if __name__ == "__main__":
    # As bench.py: embervm runs with its bytecode cached, as an installation would.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(ROOT / "out/bench/pycache")
    raise SystemExit(main())
