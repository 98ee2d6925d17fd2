"""Helpers for the end-to-end tests: run ``embervm`` as a user would, against the real guest
kernels, and read what the guest printed.  Every failure message carries the console's tail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

GUEST_HELPERS = Path(__file__).resolve().parents[2] / "guest" / "helpers"

SHARED_PREBUILT = Path(__file__).resolve().parents[3] / "shared" / "guest" / "prebuilt"


def kvm_usable() -> str | None:
    """None if /dev/kvm can be used, else the reason it cannot."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


@dataclass
class Run:
    status: int
    console: str
    stderr: str
    seconds: float

    def tail(self, n: int = 40) -> str:
        lines = self.console.splitlines()[-n:]
        return "\n--- guest console (tail) ---\n" + "\n".join(lines) + (
            "\n--- embervm stderr ---\n" + self.stderr[-3000:]
        )


def embervm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "embervm", *args]


def run_embervm(*args: str, timeout: float = 240, env: dict | None = None) -> Run:
    t0 = time.monotonic()
    try:
        p = subprocess.run(
            embervm_cmd(*args), stdin=subprocess.DEVNULL, capture_output=True,
            timeout=timeout, env=env,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        err = (e.stderr or b"").decode(errors="replace")
        raise AssertionError(
            f"embervm did not exit within {timeout}s" + Run(-1, out, err, timeout).tail()
        ) from None
    return Run(p.returncode, p.stdout.decode(errors="replace"),
               p.stderr.decode(errors="replace"), time.monotonic() - t0)


def fnv1a64(data: bytes) -> int:
    """The checksum tinyinit prints (FNV-1a 64-bit)."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def script_disk(path: Path, script: str) -> Path:
    """A disk whose content is a shell script for the busybox init (guest.script=/dev/vdX)."""
    data = script.encode()
    data += b"\0" * (-len(data) % 4096)
    path.write_bytes(data)
    return path


class StepFailed(Exception):
    """A step of a multi-step guest scenario did not happen as expected."""


@dataclass
class Record:
    """What a multi-step scenario observed; a missing value means it stopped before it.

    A scenario (one boot, several phases) fills ``values``; each test reads what it asserts on
    with :meth:`get`, which fails with the step reached and the console tail.
    """

    step: str = "boot"
    failure: str = ""
    console: list[str] = field(default_factory=list)
    stderr: str = ""
    exit_status: int | None = None
    values: dict[str, Any] = field(default_factory=dict)

    def tail(self, n: int = 50) -> str:
        return ("\n--- guest console (tail) ---\n" + "\n".join(self.console[-n:])
                + "\n--- embervm stderr ---\n" + self.stderr[-3000:])

    def get(self, key: str) -> Any:
        if key not in self.values:
            pytest.fail(f"the scenario stopped in step {self.step!r} before {key!r} was "
                        f"measured: {self.failure}" + self.tail())
        return self.values[key]


def build_guest_helper(name: str, outdir: Path) -> Path:
    """Compile guest/helpers/<name>.c into a static binary for the guest (skip without gcc)."""
    gcc = shutil.which("gcc")
    src = GUEST_HELPERS / f"{name}.c"
    if gcc is None:
        pytest.skip(f"gcc is needed to build the static guest helper {src}")
    out = outdir / name
    subprocess.run([gcc, "-static", "-O2", "-s", "-o", str(out), str(src)], check=True,
                   capture_output=True, timeout=300)
    return out


class ConsoleLog:
    """A guest console collected as it arrives: :meth:`write` takes bytes (a Machine's
    ``serial_out``), :meth:`pump` reads a stream (a VMM process's stdout) on a thread;
    :meth:`wait_for` waits for a pattern, failing the scenario step after ``timeout``."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.cond = threading.Condition()

    def write(self, data: bytes) -> None:
        with self.cond:
            self.data += data
            self.cond.notify_all()

    def pump(self, stream) -> ConsoleLog:
        def run() -> None:
            while chunk := stream.read1(4096):
                self.write(chunk)

        threading.Thread(target=run, daemon=True).start()
        return self

    def text(self) -> str:
        with self.cond:
            return self.data.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (m := rx.search(self.data.decode(errors="replace"))):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StepFailed(f"no {pattern!r} on the console within {timeout} s")
                self.cond.wait(left)
            return m
