"""virtio-vsock end to end: the real guest's vsock driver against embervm's device and its
Firecracker-style host sockets.

One boot serves every assertion.  The host side runs as the guest works:

1. before boot, host listeners wait on ``<uds>_6001`` (sink: CRC-32 of a stream, replied),
   ``<uds>_6002`` (echo) and ``<uds>_6003`` (reads 64 KiB, then closes mid-stream);
2. the guest starts its servers (echo 5000, sink 5001, close-after-64-KiB 5002) and waits on
   port 5999; the host then connects through ``CONNECT <port>``: a 64 MiB stream with
   checksum, 50 concurrent echo connections, peers closing mid-stream both ways, and 1,000
   short connections while counting the VMM's file descriptors; then it says "go";
3. the guest streams 64 MiB to the host, runs 50 concurrent echo connections to it, writes to a
   host peer that closes mid-stream, connects where nobody listens, unbinds and re-binds its
   vsock driver through sysfs and checks both directions again; a TRANSPORT_RESET from the
   control socket drops a live connection, and a new one works after it.

The guest helper is ``guest/helpers/vsock.c``, compiled static at test time.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from e2e_helpers import build_guest_helper, embervm_cmd

from embervm.testing.initramfs import extend_initramfs

STREAM = 64 << 20
ECHO_CONNS = 50
ECHO_BYTES = 64 << 10
SHORT_CONNS = 1000
MIDCLOSE_AFTER = 64 << 10
PHASE_TIMEOUT = 300.0

GUEST_SCRIPT = f"""
V=/bin/vsock
$V cid
$V echo-server 5000 & E=$!
$V sink-server 5001 & S=$!
$V close-server 5002 {MIDCLOSE_AFTER} & C=$!
echo VSOCK-PHASE-HOST
$V wait 5999
$V source 2 6001 {STREAM}
$V echo-clients 2 6002 {ECHO_CONNS} {ECHO_BYTES}
$V midclose 2 6003
$V refused 2 6999
drv=/sys/bus/virtio/drivers/vmw_vsock_virtio_transport
dev=$(ls $drv | grep '^virtio')
echo $dev > $drv/unbind
ls $drv | grep -q '^virtio' && echo "rebind FAIL: $dev still bound"
echo $dev > $drv/bind
ls $drv | grep -q "^$dev\\$" && echo "rebind ok $dev"
$V cid
$V source 2 6001 1048576
echo VSOCK-PHASE-REBOUND
$V wait 5998
kill $E $S $C
"""


class Console:
    """The guest console, read line by line from embervm's stdout on a thread."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\r\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = PHASE_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or (self._proc.poll() is not None and not self._thread.is_alive()):
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def find(self, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.text(), re.M)


# -- host-side peers -----------------------------------------------------------------------------


def _serve(path: str, handler: Callable[[socket.socket], None], stop: threading.Event) -> None:
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(128)
    ls.settimeout(0.5)

    def run() -> None:
        while not stop.is_set():
            try:
                c, _ = ls.accept()
            except TimeoutError:
                continue
            c.settimeout(PHASE_TIMEOUT)
            threading.Thread(target=handler, args=(c,), daemon=True).start()
        ls.close()

    threading.Thread(target=run, daemon=True).start()


def _recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while chunk := s.recv(1 << 20):
        out += chunk
    return bytes(out)


class HostPeers:
    """The host services guest connections reach on <uds>_<port>, with what they saw."""

    def __init__(self, uds: str) -> None:
        self.stop = threading.Event()
        self.sink_results: list[tuple[int, int, float]] = []  # (bytes, crc, seconds)
        self.midclose_reads: list[int] = []
        _serve(f"{uds}_6001", self._sink, self.stop)
        _serve(f"{uds}_6002", self._echo, self.stop)
        _serve(f"{uds}_6003", self._midclose, self.stop)

    def _sink(self, c: socket.socket) -> None:
        with c:
            t0 = time.monotonic()
            n = crc = 0
            while chunk := c.recv(1 << 20):
                n += len(chunk)
                crc = zlib.crc32(chunk, crc)
            dt = time.monotonic() - t0
            c.sendall(b"bytes=%d crc=%08x\n" % (n, crc))
            self.sink_results.append((n, crc, dt))

    def _echo(self, c: socket.socket) -> None:
        with c:
            while chunk := c.recv(65536):
                c.sendall(chunk)

    def _midclose(self, c: socket.socket) -> None:
        with c:
            got = 0
            while got < MIDCLOSE_AFTER and (chunk := c.recv(MIDCLOSE_AFTER - got)):
                got += len(chunk)
            self.midclose_reads.append(got)


def host_open(uds: str, port: int, deadline: float) -> tuple[socket.socket, bytes]:
    """``CONNECT <port>`` until the guest accepts (its server may not be listening yet)."""
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(PHASE_TIMEOUT)
        s.connect(uds)
        s.sendall(b"CONNECT %d\n" % port)
        line = b""
        while not line.endswith(b"\n") and (ch := s.recv(1)):
            line += ch
        if line.startswith(b"OK "):
            return s, line
        s.close()  # RST: no listener yet
        if time.monotonic() > deadline:
            raise AssertionError(f"guest port {port} never accepted a connection")
        time.sleep(0.2)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def stable_fd_count(pid: int, timeout: float = 30.0) -> int:
    """The fd count once it stopped moving for a second (earlier connections wind down)."""
    deadline = time.monotonic() + timeout
    n = fd_count(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        m = fd_count(pid)
        if m == n:
            break
        n = m
    return n


def settle_fd_count(pid: int, target: int, timeout: float = 60.0) -> int:
    """Wait for the fd count to come back to ``target`` (closes are asynchronous)."""
    deadline = time.monotonic() + timeout
    n = fd_count(pid)
    while n != target and time.monotonic() < deadline:
        time.sleep(0.2)
        n = fd_count(pid)
    return n


# -- host-side scenario --------------------------------------------------------------------------


def _stream_to_guest(uds: str, res: dict) -> None:
    s, _ = host_open(uds, 5001, time.monotonic() + 60)
    data = os.urandom(STREAM)
    t0 = time.monotonic()
    with s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = _recv_all(s)
    dt = time.monotonic() - t0
    res["h2g_reply"] = reply.decode(errors="replace").strip()
    res["h2g_expect"] = f"bytes={len(data)} crc={zlib.crc32(data):08x}"
    res["h2g_mbps"] = len(data) / dt / 1e6


def _echo_many(uds: str, res: dict) -> None:
    results: dict[int, bool | str] = {}
    socks = [host_open(uds, 5000, time.monotonic() + 60)[0] for _ in range(ECHO_CONNS)]

    def one(i: int, s: socket.socket) -> None:
        data = os.urandom(ECHO_BYTES)
        try:
            with s:
                sender = threading.Thread(target=lambda: (s.sendall(data),
                                                          s.shutdown(socket.SHUT_WR)))
                sender.start()
                back = _recv_all(s)
                sender.join()
            results[i] = back == data
        except OSError as e:
            results[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res["echo_results"] = results


def _midstream_closes(uds: str, res: dict) -> None:
    # The guest closes after 64 KiB while the host keeps writing: the write must fail.
    s, _ = host_open(uds, 5002, time.monotonic() + 60)
    sent = 0
    chunk = b"\xa5" * 65536
    try:
        with s:
            while sent < (256 << 20):
                sent += s.send(chunk)
        res["guest_close_host_write"] = f"no error after {sent} bytes"
    except (BrokenPipeError, ConnectionResetError) as e:
        res["guest_close_host_write"] = type(e).__name__
    except TimeoutError:
        res["guest_close_host_write"] = "hang"
    res["guest_close_host_sent"] = sent
    # The host closes after 1 MiB: the guest's read ends (EOF), it does not hang.
    s, _ = host_open(uds, 5001, time.monotonic() + 60)
    s.sendall(os.urandom(1 << 20))
    s.close()


def _short_connections(uds: str, pid: int, res: dict) -> None:
    before = stable_fd_count(pid)
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(SHORT_CONNS))

    def worker() -> None:
        for i in counter:
            payload = b"%08d" % i * 8
            try:
                s, _ = host_open(uds, 5000, time.monotonic() + 60)
                with s:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    back = _recv_all(s)
                if back != payload:
                    raise AssertionError(f"connection {i}: echo mismatch")
            except (OSError, AssertionError) as e:
                with lock:
                    errors.append(f"{i}: {e}")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res["short_errors"] = errors
    res["fds_before"] = before
    res["fds_after"] = settle_fd_count(pid, before)


def _say_go(uds: str, port: int) -> None:
    s, _ = host_open(uds, port, time.monotonic() + 60)
    with s:
        s.sendall(b"go\n")


def _after_rebind(uds: str, control: str, res: dict) -> None:
    s, _ = host_open(uds, 5000, time.monotonic() + 60)
    with s:
        s.sendall(b"after rebind")
        s.shutdown(socket.SHUT_WR)
        res["rebind_echo"] = _recv_all(s)
    # TRANSPORT_RESET from the control socket: a live connection is dropped, the guest
    # resets its side and re-reads its CID, and new connections work.
    held, _ = host_open(uds, 5000, time.monotonic() + 60)
    reply = subprocess.run([sys.executable, "-m", "embervm.control", control, "vsock", "reset"],
                           capture_output=True, text=True, timeout=60)
    res["reset_reply"] = reply.stdout.strip()
    with held:
        try:
            res["reset_held_read"] = _recv_all(held)
        except ConnectionResetError:
            res["reset_held_read"] = b""
    s, _ = host_open(uds, 5000, time.monotonic() + 60)
    with s:
        s.sendall(b"after reset")
        s.shutdown(socket.SHUT_WR)
        res["reset_echo"] = _recv_all(s)
    status = subprocess.run([sys.executable, "-m", "embervm.control", control, "vsock",
                             "status"], capture_output=True, text=True, timeout=60)
    res["status_after"] = status.stdout.strip()


@pytest.fixture(scope="module")
def helper(tmp_path_factory) -> Path:
    return build_guest_helper("vsock", tmp_path_factory.mktemp("helper"))


@pytest.fixture(scope="module")
def vsock_run(tmp_path_factory, helper, kernel_full, initrd_busybox) -> dict:
    d = tmp_path_factory.mktemp("vsock")
    # sun_path is 108 bytes: keep the sockets in a short directory of their own.
    sockdir = Path(tempfile.mkdtemp(prefix="evs", dir="/tmp"))
    uds = str(sockdir / "v.sock")
    control = str(sockdir / "ctl.sock")
    initrd = extend_initramfs(initrd_busybox, {
        "bin/vsock": (helper.read_bytes(), 0o755),
        "vsock-test.sh": (GUEST_SCRIPT.encode(), 0o755),
    }, d / "initrd.cpio")
    peers = HostPeers(uds)
    res: dict = {"uds": uds}
    proc = subprocess.Popen(
        embervm_cmd("run", "--kernel", str(kernel_full), "--initrd", str(initrd), "--mem", "256",
                    "--vsock", f"cid=3,uds={uds}", "--control", control,
                    "--append", "guest.script=/vsock-test.sh"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    stderr: list[bytes] = []
    threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True).start()
    console = Console(proc)
    res["console"] = console
    try:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("stream to the guest", lambda: _stream_to_guest(uds, res)),
            ("50 echo connections", lambda: _echo_many(uds, res)),
            ("mid-stream closes", lambda: _midstream_closes(uds, res)),
            ("1000 connections", lambda: _short_connections(uds, proc.pid, res)),
        ]
        t_start = time.monotonic()
        timings: dict[str, float] = {}
        res["timings"] = timings
        if console.wait_for("VSOCK-PHASE-HOST"):
            timings["boot to guest servers"] = time.monotonic() - t_start
            for name, step in steps:
                t0 = time.monotonic()
                try:
                    step()
                except Exception as e:  # keep going: the other assertions still get a verdict
                    res[f"error: {name}"] = f"{type(e).__name__}: {e}"
                timings[name] = time.monotonic() - t0
            t0 = time.monotonic()
            _say_go(uds, 5999)
            if console.wait_for("VSOCK-PHASE-REBOUND"):
                timings["guest-side tests and rebind"] = time.monotonic() - t0
                try:
                    _after_rebind(uds, control, res)
                except Exception as e:
                    res["error: after rebind"] = f"{type(e).__name__}: {e}"
                _say_go(uds, 5998)
        res["status"] = proc.wait(timeout=PHASE_TIMEOUT)
    except Exception as e:
        res["error: scenario"] = f"{type(e).__name__}: {e}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        peers.stop.set()
        time.sleep(0.2)
        res["stderr"] = b"".join(stderr).decode(errors="replace")
        res["sink_results"] = peers.sink_results
        res["midclose_reads"] = peers.midclose_reads
        res["socket_left_behind"] = os.path.exists(uds)
        shutil.rmtree(sockdir, ignore_errors=True)
    return res


def tail(res: dict, n: int = 40) -> str:
    lines = res["console"].text().splitlines()[-n:]
    errors = {k: v for k, v in res.items() if k.startswith("error")}
    return ("\n--- guest console (tail) ---\n" + "\n".join(lines)
            + f"\n--- scenario errors ---\n{errors}\n--- embervm stderr ---\n"
            + res.get("stderr", "")[-3000:])


def test_guest_sees_its_cid_and_the_run_ends_cleanly(vsock_run):
    print("\nvsock e2e phases: " + ", ".join(f"{k} {v:.1f}s"
                                             for k, v in vsock_run["timings"].items()))
    assert vsock_run["console"].find(r"^cid ok 3$"), tail(vsock_run)
    assert vsock_run["console"].find(r"guest: script exit status 0"), tail(vsock_run)
    assert vsock_run.get("status") == 0, tail(vsock_run)
    assert not vsock_run["socket_left_behind"], "embervm left its socket file behind"


def test_host_to_guest_64mib_stream_arrives_with_the_right_checksum(vsock_run):
    assert vsock_run.get("h2g_reply") == vsock_run.get("h2g_expect"), tail(vsock_run)
    print(f"\nhost -> guest: {STREAM >> 20} MiB at {vsock_run['h2g_mbps']:.2f} MB/s")


def test_guest_to_host_64mib_stream_arrives_with_the_right_checksum(vsock_run):
    m = vsock_run["console"].find(rf"^source ok bytes={STREAM} crc=([0-9a-f]{{8}}) .*"
                                  r"MBps=([0-9.]+)")
    assert m, tail(vsock_run)
    big = [r for r in vsock_run["sink_results"] if r[0] == STREAM]
    assert big and f"{big[0][1]:08x}" == m.group(1), tail(vsock_run)
    print(f"\nguest -> host: {STREAM >> 20} MiB at {STREAM / big[0][2] / 1e6:.2f} MB/s "
          f"(host clock), {m.group(2)} MB/s (guest clock)")


def test_fifty_concurrent_host_initiated_connections_echo_their_data(vsock_run):
    results = vsock_run.get("echo_results", {})
    assert len(results) == ECHO_CONNS, tail(vsock_run)
    bad = {i: r for i, r in results.items() if r is not True}
    assert not bad, f"{bad}" + tail(vsock_run)


def test_fifty_concurrent_guest_initiated_connections_echo_their_data(vsock_run):
    assert vsock_run["console"].find(
        rf"^echo-clients ok connections={ECHO_CONNS} bytes_each={ECHO_BYTES} failed=0"
    ), tail(vsock_run)


def test_guest_closing_mid_stream_makes_the_host_write_fail(vsock_run):
    assert vsock_run.get("guest_close_host_write") in ("BrokenPipeError",
                                                       "ConnectionResetError"), tail(vsock_run)
    assert vsock_run["console"].find(rf"^close-server ok closed after {MIDCLOSE_AFTER} bytes")


def test_host_closing_mid_stream_ends_the_guest_read(vsock_run):
    # The guest's sink saw EOF after the 1 MiB the host sent before closing.
    assert vsock_run["console"].find(r"^sink-server ok bytes=1048576 .*end=eof"), tail(vsock_run)


def test_host_peer_closing_mid_stream_makes_the_guest_write_fail(vsock_run):
    assert vsock_run["console"].find(r"^midclose ok write failed"), tail(vsock_run)
    assert vsock_run["midclose_reads"] == [MIDCLOSE_AFTER]


def test_guest_connect_without_host_listener_is_refused(vsock_run):
    assert vsock_run["console"].find(r"^refused ok connect: Connection reset"), tail(vsock_run)


def test_no_fd_leak_in_the_vmm_after_1000_connections(vsock_run):
    assert vsock_run.get("short_errors") == [], tail(vsock_run)
    assert vsock_run["fds_after"] == vsock_run["fds_before"], tail(vsock_run)
    print(f"\nVMM fds before/after {SHORT_CONNS} connections: {vsock_run['fds_before']}/"
          f"{vsock_run['fds_after']}")


def test_driver_unbind_and_rebind_leaves_a_working_device(vsock_run):
    con = vsock_run["console"]
    assert con.find(r"^rebind ok virtio\d+$"), tail(vsock_run)
    assert not con.find(r"rebind FAIL"), tail(vsock_run)
    assert con.find(r"^source ok bytes=1048576 "), tail(vsock_run)  # guest -> host after
    assert vsock_run.get("rebind_echo") == b"after rebind", tail(vsock_run)  # host -> guest


def test_transport_reset_drops_live_connections_and_new_ones_work(vsock_run):
    assert '"ok": true' in vsock_run.get("reset_reply", ""), tail(vsock_run)
    assert vsock_run.get("reset_held_read") == b"", tail(vsock_run)
    assert vsock_run.get("reset_echo") == b"after reset", tail(vsock_run)
    assert '"events": 1' in vsock_run.get("status_after", ""), tail(vsock_run)


def test_a_linux_guest_triggers_no_vsock_warnings(vsock_run):
    # Everything above is normal traffic for Linux: nothing in it may look like a bad packet.
    warnings = [line for line in vsock_run.get("stderr", "").splitlines() if "vsock" in line]
    assert not warnings, "\n".join(warnings[:20])
