"""virtio-console end to end: the real guest's hvc0 on embervm's console device.

Boot 1 (``--console socket:PATH``, shared by most tests): the test connects to the socket as the
one client and talks to a guest script through hvc0:

* guest → host: the script writes 1 MiB of host-made random bytes (a file in the initramfs) to
  hvc0; the host checks it byte for byte;
* host → guest: after the script put hvc0 in raw mode (busybox ``stty raw -echo -iexten``, so
  the line discipline neither echoes nor rewrites bytes), the host sends 1 MiB of fresh random
  bytes and the script reports their sha256;
* SIZE: the script reports ``stty size`` (the device's 80x24, read at probe) and waits until a
  ``console resize 132 43`` on the control socket reaches the tty;
* reset and re-probe: the script unbinds and re-binds ``virtio_console`` through sysfs, then
  round-trips data again.

``--append console=ttyS0`` makes the serial port /dev/console for this boot: init and the
script's shell keep /dev/console open for their whole life, and Linux cannot re-attach a tty
that is still held open to the re-probed port (writes to it fail with EIO after the unbind, see
docs/devices/console.md), so the script opens /dev/hvc0 itself and closes it before the unbind.
The kernel still names hvc0 as a console (embervm appends ``console=hvc0``).

Boot 2 (``--console stdio --serial null``): /dev/console is hvc0 (the default), so init's own
output reaching embervm's stdout proves the stdio back-end, and a line written to embervm's
stdin once the guest is up is read by the guest's shell.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e_helpers import Run, embervm_cmd

from embervm.control import request
from embervm.testing.initramfs import extend_initramfs

MIB = 1 << 20
AGAIN = 64 << 10
SIZE_AFTER = (132, 43)
TIMEOUT = 300.0

SOCKET_SCRIPT = rf"""
exec 3<>/dev/hvc0
stty raw -echo -iexten <&3
echo "HVC-HELLO size=[$(stty size <&3)] consoles=[$(cat /sys/class/tty/console/active)]" >&3
echo "TX-BEGIN $(sha256sum < /tx.bin | cut -c1-64)" >&3
cat /tx.bin >&3
echo "TX-END" >&3
echo "RX-READY" >&3
t0=$(cut -d' ' -f1 /proc/uptime)
head -c {MIB} <&3 > /tmp/rx
t1=$(cut -d' ' -f1 /proc/uptime)
echo "RX-DONE bytes=$(wc -c < /tmp/rx) sha=$(sha256sum < /tmp/rx | cut -c1-64) t0=$t0 t1=$t1" >&3
echo "SIZE-WAIT" >&3
i=0
while [ $i -lt 600 ]; do
    s=$(stty size <&3)
    [ "$s" = "{SIZE_AFTER[1]} {SIZE_AFTER[0]}" ] && break
    sleep 0.1
    i=$((i + 1))
done
echo "SIZE-AFTER [$s]" >&3
exec 3>&-
drv=/sys/bus/virtio/drivers/virtio_console
dev=$(ls $drv | grep '^virtio')
echo $dev > $drv/unbind
u=$?
echo $dev > $drv/bind
b=$?
exec 3<>/dev/hvc0
stty raw -echo -iexten <&3
echo "REBOUND dev=[$dev] unbind=$u bind=$b" >&3
echo "RX2-READY" >&3
echo "RX2-DONE sha=$(head -c {AGAIN} <&3 | sha256sum | cut -c1-64)" >&3
echo "CONSOLE-DONE" >&3
"""

STDIO_SCRIPT = r"""
echo "STDIO-HELLO consoles=[$(cat /sys/class/tty/console/active)]"
read -t 120 -r line
echo "STDIN-LINE [$line]"
"""
STDIN_LINE = "hello from the host's stdin"


@dataclass
class Session:
    """What one socket-console boot produced; each test asserts on its part."""

    run: Run | None = None
    stream: bytes = b""  # everything the guest wrote to hvc0, as the client received it
    tx_payload: bytes = b""
    rx_payload: bytes = b""
    rx2_payload: bytes = b""
    resize_reply: dict = field(default_factory=dict)
    rx_send_seconds: float = 0.0
    failure: str = ""  # the first step that did not happen

    def tail(self) -> str:
        text = self.stream.decode(errors="replace")
        lines = [ln.rstrip("\r") for ln in text.splitlines()]
        lines = [ln for ln in lines if ln.isprintable()][-30:]
        head = f"\nfailed step: {self.failure}" if self.failure else ""
        run = self.run.tail() if self.run else ""
        return head + "\n--- hvc0 (printable lines, tail) ---\n" + "\n".join(lines) + run


class _Client:
    """The test's end of the console socket: a reader thread collecting the guest's output."""

    def __init__(self, path: Path, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(os.fspath(path))
                break
            except OSError:
                self.sock.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.buf = bytearray()
        self.eof = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.eof = True
                    self.cond.notify_all()
                    return
                self.buf += data
                self.cond.notify_all()

    def wait(self, pattern: bytes, timeout: float = TIMEOUT) -> re.Match[bytes] | None:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.buf)
                if m or self.eof:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 1.0))

    def snapshot(self) -> bytes:
        with self.cond:
            return bytes(self.buf)


def _finish(proc: subprocess.Popen, out: Path, err: Path, t0: float) -> Run:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return Run(proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"),
               time.monotonic() - t0)


@pytest.fixture(scope="module")
def session(kernel_full, initrd_busybox, tmp_path_factory) -> Session:
    d = tmp_path_factory.mktemp("console")
    s = Session(tx_payload=os.urandom(MIB), rx_payload=os.urandom(MIB),
                rx2_payload=os.urandom(AGAIN))
    initrd = extend_initramfs(
        initrd_busybox,
        {"console-test.sh": SOCKET_SCRIPT.encode(), "tx.bin": (s.tx_payload, 0o644)},
        d / "initrd.cpio",
    )
    hvc, ctl = d / "hvc.sock", d / "ctl.sock"
    out, err = d / "stdout", d / "stderr"
    t0 = time.monotonic()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            embervm_cmd("run", "--kernel", str(kernel_full), "--initrd", str(initrd),
                        "--mem", "128", "--serial", "stdio", "--console", f"socket:{hvc}",
                        "--control", str(ctl),
                        "--append", "console=ttyS0 guest.script=/console-test.sh"),
            stdin=subprocess.DEVNULL, stdout=fo, stderr=fe)
    try:
        client = _Client(hvc, proc)
        if client.wait(rb"RX-READY\n") is None:
            s.failure = "RX-READY"
        else:
            t = time.monotonic()
            client.sock.sendall(s.rx_payload)  # blocks while the guest is not reading: fine
            s.rx_send_seconds = time.monotonic() - t
            if client.wait(rb"SIZE-WAIT\n") is None:
                s.failure = "SIZE-WAIT"
            else:
                s.resize_reply = request(ctl, ["console", "resize", str(SIZE_AFTER[0]),
                                               str(SIZE_AFTER[1])])
                if client.wait(rb"RX2-READY\n") is None:
                    s.failure = "RX2-READY"
                else:
                    client.sock.sendall(s.rx2_payload)
                    if client.wait(rb"CONSOLE-DONE\n") is None:
                        s.failure = "CONSOLE-DONE"
        if s.failure:
            proc.kill()
        s.run = _finish(proc, out, err, t0)
        client.wait(rb"(?!)", timeout=10)  # drain to EOF
        s.stream = client.snapshot()
        client.sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return s


def _line(s: Session, pattern: bytes) -> re.Match[bytes]:
    m = re.search(pattern, s.stream)
    assert m, f"no hvc0 line matching {pattern!r}" + s.tail()
    return m


def test_guest_output_through_hvc0_reaches_the_socket_client(session):
    m = _line(session, rb"HVC-HELLO size=\[[\d ]*\] consoles=\[([^\]]*)\]")
    assert b"hvc0" in m.group(1).split(), session.tail()


def test_guest_writes_1mib_to_the_host_intact(session):
    m = _line(session, rb"TX-BEGIN ([0-9a-f]{64})\n")
    assert m.group(1).decode() == hashlib.sha256(session.tx_payload).hexdigest(), session.tail()
    got = session.stream[m.end() : m.end() + MIB]
    assert len(got) == MIB, session.tail()
    assert got == session.tx_payload, "guest output corrupted on the way" + session.tail()
    assert session.stream[m.end() + MIB :].startswith(b"TX-END\n"), session.tail()


def test_host_sends_1mib_to_a_guest_reader_intact(session):
    m = _line(session, rb"RX-DONE bytes=(\d+) sha=([0-9a-f]{64}) t0=([\d.]+) t1=([\d.]+)")
    assert int(m.group(1)) == MIB, session.tail()
    assert m.group(2).decode() == hashlib.sha256(session.rx_payload).hexdigest(), session.tail()
    print(f"guest read 1 MiB from hvc0 in {float(m.group(4)) - float(m.group(3)):.1f} s "
          f"(host sendall returned after {session.rx_send_seconds:.1f} s)")


def test_console_size_is_80x24_at_boot_and_follows_a_resize(session):
    m = _line(session, rb"HVC-HELLO size=\[([\d ]*)\]")
    assert m.group(1) == b"24 80", session.tail()
    assert session.resize_reply == {"ok": True, "cols": SIZE_AFTER[0], "rows": SIZE_AFTER[1]}
    after = _line(session, rb"SIZE-AFTER \[([\d ]*)\]")
    assert after.group(1).decode() == f"{SIZE_AFTER[1]} {SIZE_AFTER[0]}", session.tail()


def test_console_works_after_driver_unbind_and_bind(session):
    m = _line(session, rb"REBOUND dev=\[(virtio\d+)\] unbind=(\d+) bind=(\d+)")
    assert m.group(2) == b"0" and m.group(3) == b"0", session.tail()
    m = _line(session, rb"RX2-DONE sha=([0-9a-f]{64})")
    assert m.group(1).decode() == hashlib.sha256(session.rx2_payload).hexdigest(), session.tail()


def test_socket_console_boot_ends_with_status_0(session):
    assert session.run is not None and not session.failure, session.tail()
    assert b"CONSOLE-DONE" in session.stream, session.tail()
    assert "guest: script exit status 0" in session.run.console, session.tail()
    assert session.run.status == 0, session.tail()


# -- boot 2: --console stdio -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdio_boot(kernel_full, initrd_busybox, tmp_path_factory) -> Run:
    d = tmp_path_factory.mktemp("console-stdio")
    initrd = extend_initramfs(initrd_busybox, {"stdio-test.sh": STDIO_SCRIPT.encode()},
                              d / "initrd.cpio")
    out, err = d / "stdout", d / "stderr"
    t0 = time.monotonic()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            embervm_cmd("run", "--kernel", str(kernel_full), "--initrd", str(initrd),
                        "--mem", "128", "--serial", "null", "--console", "stdio",
                        "--append", "guest.script=/stdio-test.sh"),
            stdin=subprocess.PIPE, stdout=fo, stderr=fe)
    try:
        assert proc.stdin is not None
        # Type once the guest is up, as a user would: Linux's virtio_console frees receive
        # buffers the device fills before the port is registered (in_intr -> flush_bufs), so
        # input sent while the driver is still probing can be lost (docs/devices/console.md).
        deadline = time.monotonic() + TIMEOUT
        while b"STDIO-HELLO" not in out.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        proc.stdin.write(STDIN_LINE.encode() + b"\n")
        proc.stdin.close()  # EOF after the line: the device stops reading, the guest goes on
        return _finish(proc, out, err, t0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_stdio_console_carries_the_guest_console_on_stdout(stdio_boot):
    # The serial port is null: everything on stdout came through hvc0.
    assert "GUEST-READY" in stdio_boot.console, stdio_boot.tail()
    m = re.search(r"STDIO-HELLO consoles=\[([^\]]*)\]", stdio_boot.console)
    assert m and "hvc0" in m.group(1).split(), stdio_boot.tail()
    assert "guest: script exit status 0" in stdio_boot.console, stdio_boot.tail()
    assert stdio_boot.status == 0, stdio_boot.tail()


def test_stdio_console_delivers_stdin_to_the_guest(stdio_boot):
    assert f"STDIN-LINE [{STDIN_LINE}]" in stdio_boot.console, stdio_boot.tail()
