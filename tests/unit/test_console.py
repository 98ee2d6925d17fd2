"""virtio-console through the Linux-like driver kit: a real Unix socket or pipes/ptys as the host
side, an EventLoop run by hand, no KVM.

Covers the data paths both ways (ordering, used.len, back-pressure, no loss), the socket's
one-client and backlog rules, SIZE (terminal size, resize, config interrupt), EMERG_WRITE,
reset/re-probe and the back-end's set-up errors.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import termios
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from embervm.devices.virtio import console as con_mod
from embervm.devices.virtio import spec
from embervm.devices.virtio.console import (
    BACKLOG_LIMIT,
    OUTPUT_LIMIT,
    QUEUE_SIZE,
    RECEIVEQ,
    TRANSMITQ,
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
    Console,
)
from embervm.devices.virtio.mmio import MmioTransport
from embervm.errors import ConfigError
from embervm.eventloop import EventLoop
from embervm.memory import GuestMemory
from embervm.testing.driver import LINUX_TRANSPORT_FEATURES, MmioDriver

FLAVOURS = [
    pytest.param(dict(legacy=True), False, id="legacy-split"),
    pytest.param(dict(), False, id="modern-split"),
    pytest.param(dict(), True, id="modern-split-indirect"),
    pytest.param(dict(packed=True), False, id="modern-packed"),
    pytest.param(dict(packed=True), True, id="modern-packed-indirect"),
]


class Rig:
    """One console on a transport, driven by the Linux-like driver, with its event loop."""

    def __init__(self, con: Console, mem: GuestMemory, **transport_kw: object) -> None:
        self.con = con
        self.mem = mem
        self.loop = EventLoop()
        con.loop = self.loop
        self.irqs = 0
        self.transport = MmioTransport(con, mem, interrupt=self._irq, **transport_kw)
        self.drv = MmioDriver(self.transport, mem)

    def _irq(self) -> None:
        self.irqs += 1

    def probe(self, **kw: object) -> int:
        return self.drv.probe(**kw)

    def spin(self, until: Callable[[], bool] = lambda: False, timeout: float = 3.0) -> bool:
        """Run the loop until ``until()`` or ``timeout``; return the final ``until()``."""
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                return False
            self.loop.run_once(0.005)
        return True

    def close(self) -> None:
        self.con.close()
        self.loop.close()


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory([(0, 8 << 20)])


@pytest.fixture
def sock_path(tmp_path) -> Path:
    return tmp_path / "hvc.sock"


@pytest.fixture
def rig(mem, sock_path):
    r = Rig(Console("socket", sock_path), mem)
    yield r
    r.close()


def connect(path: Path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(os.fspath(path))
    c.settimeout(5)
    return c


def recv_exactly(rig: Rig, c: socket.socket, n: int) -> bytes:
    """Read ``n`` bytes from the client while the device's loop keeps running."""
    c.setblocking(False)
    buf = bytearray()

    def got() -> bool:
        try:
            while len(buf) < n:
                chunk = c.recv(n - len(buf))
                if not chunk:
                    return True
                buf.extend(chunk)
        except BlockingIOError:
            pass
        return len(buf) >= n

    rig.spin(got)
    c.setblocking(True)
    return bytes(buf)


def wait_used(rig: Rig, index: int, n: int, timeout: float = 3.0) -> list:
    """Run the loop until ``n`` used elements of queue ``index`` arrived; return them."""
    used: list = []
    rig.spin(lambda: bool(used.extend(rig.drv.used(index))) or len(used) >= n, timeout)
    return used


def accept_client(rig: Rig, path: Path) -> socket.socket:
    c = connect(path)
    assert rig.spin(lambda: rig.con.metrics["clients"] >= 1 and rig.con._client is not None)
    return c


# -- identity, features, config ----------------------------------------------------------------


def test_console_offers_size_and_emergency_write_but_not_multiport(rig):
    con = rig.con
    assert con.device_type == spec.VIRTIO_ID_CONSOLE == 3
    assert con.queue_max_sizes == (QUEUE_SIZE, QUEUE_SIZE)
    assert con.avail_features >> VIRTIO_CONSOLE_F_SIZE & 1
    assert con.avail_features >> VIRTIO_CONSOLE_F_EMERG_WRITE & 1
    assert not con.avail_features >> VIRTIO_CONSOLE_F_MULTIPORT & 1
    features = rig.probe()
    assert features >> VIRTIO_CONSOLE_F_SIZE & 1
    assert len(rig.drv.rings) == 2


def test_socket_console_config_reads_80x24_and_one_port(rig):
    rig.probe()
    assert rig.drv.read_config(0, 2) == 80
    assert rig.drv.read_config(2, 2) == 24
    assert rig.drv.read_config(4, 4) == 1
    assert rig.drv.read_config(8, 4) == 0
    # Byte-wise reads (legacy drivers) see the same little-endian image.
    assert rig.drv.read_config_bytes(0, 4) == struct.pack("<HH", 80, 24)


def _pty_with_size(cols: int, rows: int) -> tuple[int, int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    return master, slave


def test_stdio_console_size_comes_from_the_terminal(mem):
    master, slave = _pty_with_size(132, 43)
    try:
        con = Console("stdio", input_fd=slave, output_fd=slave)
        assert con.size == (132, 43)
        r = Rig(con, mem)
        r.probe()
        assert (r.drv.read_config(0, 2), r.drv.read_config(2, 2)) == (132, 43)
        r.close()
    finally:
        os.close(master)
        os.close(slave)


def test_stdio_console_without_a_terminal_uses_80x24(mem):
    rfd, wfd = os.pipe()
    try:
        assert Console("stdio", input_fd=rfd, output_fd=wfd).size == (80, 24)
    finally:
        os.close(rfd)
        os.close(wfd)


def test_driver_ok_raises_a_config_interrupt_so_linux_reads_the_size(rig):
    gen0 = rig.transport.config_generation
    rig.probe()
    # virtio_console reads cols/rows only from its config-change handler.
    assert rig.transport.config_generation != gen0
    assert rig.drv.interrupt() & spec.VIRTIO_MMIO_INT_CONFIG


def test_no_config_interrupt_at_driver_ok_without_size(rig):
    accept = spec.bit(VIRTIO_CONSOLE_F_EMERG_WRITE) | LINUX_TRANSPORT_FEATURES
    features = rig.probe(accept=accept)
    assert not features >> VIRTIO_CONSOLE_F_SIZE & 1
    assert not rig.drv.interrupt() & spec.VIRTIO_MMIO_INT_CONFIG


def test_resize_updates_config_bumps_generation_and_interrupts(rig):
    rig.probe()
    rig.drv.interrupt()
    gen = rig.transport.config_generation
    rig.con.resize(100, 30)
    assert rig.transport.config_generation != gen
    assert rig.drv.interrupt() & spec.VIRTIO_MMIO_INT_CONFIG
    assert (rig.drv.read_config(0, 2), rig.drv.read_config(2, 2)) == (100, 30)
    assert rig.con.metrics["resizes"] == 1
    # The same size again is not a change.
    gen = rig.transport.config_generation
    rig.con.resize(100, 30)
    assert rig.transport.config_generation == gen
    assert not rig.drv.interrupt()


@pytest.mark.parametrize("cols, rows", [(0, 24), (80, 0), (65536, 24), (-1, -1)])
def test_resize_rejects_sizes_outside_u16(rig, cols, rows):
    with pytest.raises(ValueError):
        rig.con.resize(cols, rows)
    assert rig.con.size == (80, 24)


def test_terminal_resized_rereads_the_terminal_size(mem):
    master, slave = _pty_with_size(80, 24)
    try:
        r = Rig(Console("stdio", input_fd=slave, output_fd=slave), mem)
        r.probe()
        r.drv.interrupt()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        r.con.terminal_resized()  # what the VMM's SIGWINCH hook calls
        assert r.con.size == (200, 50)
        assert r.drv.interrupt() & spec.VIRTIO_MMIO_INT_CONFIG
        r.close()
    finally:
        os.close(master)
        os.close(slave)


def test_control_commands_report_and_change_the_size(rig):
    rig.probe()
    handler = rig.con.control_commands()["console"]
    assert handler(["size"]) == {"cols": 80, "rows": 24}
    assert handler(["resize", "120", "40"]) == {"cols": 120, "rows": 40}
    assert rig.con.size == (120, 40)
    for bad in ([], ["resize", "x", "1"], ["resize", "1"], ["resize", "0", "5"], ["nope"]):
        with pytest.raises(ValueError):
            handler(bad)
    assert rig.con.size == (120, 40)


# -- transmit: guest → host ----------------------------------------------------------------------


@pytest.mark.parametrize("kw, indirect", FLAVOURS)
def test_guest_output_reaches_the_client_in_order_with_used_len_0(mem, sock_path, kw, indirect):
    r = Rig(Console("socket", sock_path), mem, **kw)
    try:
        r.probe()
        c = accept_client(r, sock_path)
        pieces = [[b"hello, "], [b"wor", b"ld", b"!\n"], [bytes(range(256)) * 40]]
        tokens = [r.drv.submit(TRANSMITQ, p, [], indirect=indirect) for p in pieces]
        want = b"".join(b"".join(p) for p in pieces)
        assert recv_exactly(r, c, len(want)) == want
        used = r.drv.used(TRANSMITQ)
        assert [t for t, _, _ in used] == tokens
        assert all(length == 0 for _, length, _ in used)
        assert r.con.metrics["tx_bytes"] == len(want)
        c.close()
    finally:
        r.close()


def test_transmit_chain_with_writable_buffers_is_read_and_returned_with_len_0(rig, sock_path):
    rig.probe()
    c = accept_client(rig, sock_path)
    tok = rig.drv.submit(TRANSMITQ, [b"data"], [64])
    assert recv_exactly(rig, c, 4) == b"data"
    [(t, length, [buf])] = rig.drv.used(TRANSMITQ)
    assert (t, length, buf) == (tok, 0, bytes(64))


def test_output_without_a_client_keeps_the_latest_bytes_for_the_next_one(rig, sock_path):
    rig.probe()
    data = os.urandom(BACKLOG_LIMIT + 40000)
    for i in range(0, len(data), 4096):
        rig.drv.submit(TRANSMITQ, [data[i : i + 4096]], [])
        # The guest never waits for an absent reader.
        assert len(wait_used(rig, TRANSMITQ, 1)) == 1
    assert rig.con.metrics["dropped_bytes"] == 40000
    c = accept_client(rig, sock_path)
    assert recv_exactly(rig, c, BACKLOG_LIMIT) == data[-BACKLOG_LIMIT:]
    rig.drv.submit(TRANSMITQ, [b"live"], [])
    assert recv_exactly(rig, c, 4) == b"live"


def test_output_stops_taking_chains_while_the_client_does_not_read(rig, sock_path):
    rig.probe()
    c = accept_client(rig, sock_path)
    data = os.urandom(4 << 20)
    chunk = 16 << 10
    ring = rig.drv.rings[TRANSMITQ]
    sent = 0
    # The client reads nothing: the device may hold OUTPUT_LIMIT plus what the socket buffers.
    for _ in range(len(data) // chunk):
        while ring.num_free and sent < len(data):
            rig.drv.submit(TRANSMITQ, [data[sent : sent + chunk]], [])
            sent += chunk
        rig.spin(timeout=0.05)
        rig.drv.used(TRANSMITQ)
        if ring.num_free == 0:
            break
    assert ring.num_free == 0, "the device kept taking chains nobody reads"
    taken = rig.con.metrics["tx_bytes"]
    assert taken < len(data)
    assert len(rig.con._out) <= OUTPUT_LIMIT
    # Now the client reads: everything arrives, in order, and the ring drains.
    c.setblocking(False)
    got = bytearray()
    deadline = time.monotonic() + 20
    while len(got) < len(data) and time.monotonic() < deadline:
        try:
            got += c.recv(1 << 20)
        except BlockingIOError:
            pass
        rig.loop.run_once(0.002)
        rig.drv.used(TRANSMITQ)
        while ring.num_free and sent < len(data):
            rig.drv.submit(TRANSMITQ, [data[sent : sent + chunk]], [])
            sent += chunk
    assert bytes(got) == data


# -- receive: host → guest -----------------------------------------------------------------------


def test_host_input_waits_until_the_guest_posts_receive_buffers(rig, sock_path):
    rig.probe()
    c = accept_client(rig, sock_path)
    payload = os.urandom(10000)
    c.sendall(payload)
    rig.spin(timeout=0.2)
    assert not rig.con.reading  # no buffers: the socket is not read at all
    assert rig.con.metrics["rx_bytes"] == 0
    for _ in range(4):
        rig.drv.submit(RECEIVEQ, [], [4096])
    assert rig.spin(lambda: rig.con.metrics["rx_bytes"] == len(payload))
    used = rig.drv.used(RECEIVEQ)
    got = b"".join(bufs[0][:length] for _, length, bufs in used)
    assert got == payload
    assert all(length <= 4096 for _, length, _ in used)


def test_a_short_input_completes_one_buffer_with_the_bytes_read(rig, sock_path):
    rig.probe()
    c = accept_client(rig, sock_path)
    toks = [rig.drv.submit(RECEIVEQ, [], [4096]) for _ in range(4)]
    c.sendall(b"0123456789")
    assert rig.spin(lambda: rig.con.metrics["rx_bytes"] == 10)
    [(tok, length, [buf])] = rig.drv.used(RECEIVEQ)
    assert (tok, length, buf[:10]) == (toks[0], 10, b"0123456789")
    assert rig.con.reading  # three buffers are still posted


@pytest.mark.parametrize("kw, indirect", FLAVOURS)
def test_input_resumes_on_the_receive_kick_and_nothing_is_lost(mem, sock_path, kw, indirect):
    r = Rig(Console("socket", sock_path), mem, **kw)
    try:
        r.probe()
        c = accept_client(r, sock_path)
        c.setblocking(False)
        payload = os.urandom(300 << 10)
        pos = 0
        got = bytearray()
        deadline = time.monotonic() + 20
        while len(got) < len(payload) and time.monotonic() < deadline:
            if pos < len(payload):
                try:
                    pos += c.send(payload[pos : pos + 65536])
                except BlockingIOError:
                    pass
            r.loop.run_once(0.002)
            for _, length, bufs in r.drv.used(RECEIVEQ):
                got += b"".join(bufs)[:length]
            # Like Linux: re-post a few buffers at a time, a mix of shapes.
            ring = r.drv.rings[RECEIVEQ]
            while ring.outstanding < 6 and ring.num_free >= 2:
                r.drv.submit(RECEIVEQ, [], [1000, 3000] if indirect else [4096],
                             indirect=indirect)
        assert bytes(got) == payload
    finally:
        r.close()


def test_receive_chain_without_writable_bytes_is_returned_empty(rig, sock_path):
    rig.probe()
    c = accept_client(rig, sock_path)
    bad = rig.drv.submit(RECEIVEQ, [b"wrong direction"], [])
    good = rig.drv.submit(RECEIVEQ, [], [64])
    c.sendall(b"abc")
    assert rig.spin(lambda: rig.con.metrics["rx_bytes"] == 3)
    used = rig.drv.used(RECEIVEQ)
    assert (used[0][0], used[0][1]) == (bad, 0)
    assert (used[1][0], used[1][1], used[1][2][0][:3]) == (good, 3, b"abc")
    assert rig.con.metrics["invalid_chains"] == 1


# -- socket clients -------------------------------------------------------------------------------


def test_a_second_client_is_refused_while_one_is_connected(rig, sock_path):
    rig.probe()
    first = accept_client(rig, sock_path)
    second = connect(sock_path)
    assert rig.spin(lambda: rig.con.metrics["refused_clients"] == 1)
    assert second.recv(16) == b""  # closed at once: EOF, not a hang
    rig.drv.submit(TRANSMITQ, [b"still here"], [])
    assert recv_exactly(rig, first, 10) == b"still here"


def test_after_a_client_leaves_output_is_kept_for_the_next(rig, sock_path):
    rig.probe()
    first = accept_client(rig, sock_path)
    first.close()
    rig.drv.submit(RECEIVEQ, [], [64])  # reading notices the EOF
    assert rig.spin(lambda: rig.con._client is None)
    rig.drv.submit(TRANSMITQ, [b"while nobody listens"], [])
    assert len(wait_used(rig, TRANSMITQ, 1)) == 1
    second = accept_client(rig, sock_path)
    assert recv_exactly(rig, second, 20) == b"while nobody listens"
    second.sendall(b"hi")
    assert rig.spin(lambda: rig.con.metrics["rx_bytes"] == 2)


def test_client_connected_before_driver_ok_is_served_after_it(mem, sock_path):
    r = Rig(Console("socket", sock_path), mem)
    try:
        c = connect(sock_path)  # the listen backlog holds it until the device starts
        c.sendall(b"early")
        r.probe()
        r.drv.submit(RECEIVEQ, [], [64])
        assert r.spin(lambda: r.con.metrics["rx_bytes"] == 5)
        r.drv.submit(TRANSMITQ, [b"ok"], [])
        assert recv_exactly(r, c, 2) == b"ok"
    finally:
        r.close()


# -- emergency write -----------------------------------------------------------------------------


def test_emerg_wr_writes_one_character_even_before_driver_ok(rig, sock_path):
    d = rig.drv
    # Only ACKNOWLEDGE|DRIVER: no features, no queues yet (early debugging output).
    d.wr(spec.STATUS, 0)
    d.add_status(spec.STATUS_ACKNOWLEDGE)
    d.add_status(spec.STATUS_DRIVER)
    c = connect(sock_path)
    d.write_config(8, 1, ord("!"))
    d.write_config(8, 4, 0x41424344)  # the low byte: "D"
    d.write_config(9, 1, ord("x"))  # not the start of emerg_wr: ignored
    assert d.read_config(8, 4) == 0  # nothing is stored
    d.probe()  # the listener starts serving at DRIVER_OK; the bytes wait in the backlog
    assert recv_exactly(rig, c, 2) == b"!D"
    assert rig.con.metrics["emerg_bytes"] == 2


def test_emerg_wr_flood_is_bounded_while_nobody_reads(rig, sock_path):
    rig.probe()
    c = accept_client(rig, sock_path)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(3 * con_mod.EMERG_LIMIT):
        rig.drv.write_config(8, 1, 0x41)
    assert len(rig.con._out) <= con_mod.EMERG_LIMIT
    assert rig.con.metrics["dropped_bytes"] > 0
    assert len(rig.loop._pending) <= 1  # one queued flush, not one per write


# -- lifecycle -----------------------------------------------------------------------------------


def test_reset_and_reprobe_keep_the_client_and_both_directions_work(rig, sock_path):
    c = None
    for cycle in range(3):
        rig.probe()
        if c is None:
            c = accept_client(rig, sock_path)
        rig.drv.submit(TRANSMITQ, [b"cycle%d" % cycle], [])
        assert recv_exactly(rig, c, 6) == b"cycle%d" % cycle
        rig.drv.submit(RECEIVEQ, [], [64])
        c.sendall(b"in%d" % cycle)
        assert rig.spin(lambda cycle=cycle: rig.con.metrics["rx_bytes"] == 3 * (cycle + 1))
        [(_, length, [buf])] = rig.drv.used(RECEIVEQ)
        assert buf[:length] == b"in%d" % cycle
        rig.drv.remove()
        assert not rig.con.active and not rig.con.reading
    assert rig.con.metrics["activations"] == 3


def test_reset_drops_posted_buffers_and_stops_reading_until_new_ones(rig, sock_path):
    rig.probe()
    c = accept_client(rig, sock_path)
    rig.drv.submit(RECEIVEQ, [], [64])
    c.sendall(b"a")
    assert rig.spin(lambda: rig.con.metrics["rx_bytes"] == 1)
    rig.drv.submit(RECEIVEQ, [], [64])
    rig.spin(timeout=0.05)
    assert rig.con.reading
    rig.drv.remove()
    assert not rig.con.reading
    c.sendall(b"bc")
    rig.spin(timeout=0.1)
    assert rig.con.metrics["rx_bytes"] == 1  # nothing read while the driver is gone
    rig.probe()
    rig.drv.submit(RECEIVEQ, [], [64])
    assert rig.spin(lambda: rig.con.metrics["rx_bytes"] == 3)
    [(_, length, [buf])] = rig.drv.used(RECEIVEQ)
    assert buf[:length] == b"bc"


def test_close_flushes_output_and_removes_the_socket_file(rig, sock_path):
    rig.probe()
    c = accept_client(rig, sock_path)
    rig.con._out += b"last words"  # output that has not reached the client yet
    rig.con.close()
    rig.con.close()  # idempotent
    assert not sock_path.exists()
    assert c.recv(64) == b"last words"
    assert c.recv(64) == b""


# -- stdio back-end ------------------------------------------------------------------------------


def test_stdio_output_and_input_use_the_given_fds(mem):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    r = Rig(Console("stdio", input_fd=in_r, output_fd=out_w), mem)
    try:
        r.probe()
        r.drv.submit(TRANSMITQ, [b"to stdout"], [])
        r.spin(lambda: r.con.metrics["tx_bytes"] == 9)
        assert os.read(out_r, 64) == b"to stdout"
        r.drv.submit(RECEIVEQ, [], [64])
        os.write(in_w, b"from stdin")
        assert r.spin(lambda: r.con.metrics["rx_bytes"] == 10)
        [(_, length, [buf])] = r.drv.used(RECEIVEQ)
        assert buf[:length] == b"from stdin"
        # End of input: reading stops for good, without an error and without a used buffer.
        r.drv.submit(RECEIVEQ, [], [64])
        os.close(in_w)
        in_w = -1
        assert r.spin(lambda: not r.con.reading)
        assert r.drv.used(RECEIVEQ) == []
        assert r.con.active
    finally:
        r.close()
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)


def test_stdio_unpollable_stdin_means_no_input(mem):
    null = os.open(os.devnull, os.O_RDONLY)
    out_r, out_w = os.pipe()
    r = Rig(Console("stdio", input_fd=null, output_fd=out_w), mem)
    try:
        r.probe()
        r.drv.submit(RECEIVEQ, [], [64])
        r.spin(timeout=0.05)
        assert not r.con.reading and r.con.active
        r.drv.submit(TRANSMITQ, [b"out still works"], [])
        r.spin(lambda: r.con.metrics["tx_bytes"] == 15)
        assert os.read(out_r, 64) == b"out still works"
    finally:
        r.close()
        for fd in (null, out_r, out_w):
            os.close(fd)


def test_stdio_broken_stdout_drops_output_without_stalling_the_guest(mem):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.close(out_r)  # nobody will ever read the output: EPIPE / POLLERR
    r = Rig(Console("stdio", input_fd=in_r, output_fd=out_w), mem)
    try:
        r.probe()
        for _ in range(3):
            r.drv.submit(TRANSMITQ, [b"x" * 1000], [])
        assert len(wait_used(r, TRANSMITQ, 3)) == 3
        assert r.con.metrics["dropped_bytes"] == 3000
    finally:
        r.close()
        for fd in (in_r, in_w, out_w):
            os.close(fd)


def test_stdio_output_to_a_pipe_nobody_reads_back_pressures_the_guest(mem):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    r = Rig(Console("stdio", input_fd=in_r, output_fd=out_w), mem)
    try:
        r.probe()
        ring = r.drv.rings[TRANSMITQ]
        data = os.urandom(64 << 10)
        total = bytearray()
        for _ in range(40):  # 2.5 MiB offered; a pipe holds 64 KiB
            while ring.num_free:
                r.drv.submit(TRANSMITQ, [data], [])
                total += data
            r.spin(timeout=0.01)
            r.drv.used(TRANSMITQ)
        assert ring.num_free == 0  # the guest is held back, nothing was dropped
        assert r.con.metrics["dropped_bytes"] == 0
        got = bytearray()
        deadline = time.monotonic() + 20
        while len(got) < r.con.metrics["tx_bytes"] or ring.outstanding:
            assert time.monotonic() < deadline
            if select.select([out_r], [], [], 0)[0]:
                got += os.read(out_r, 1 << 16)
            r.loop.run_once(0.002)
            r.drv.used(TRANSMITQ)
        assert bytes(got) == bytes(total)
    finally:
        r.close()
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)


# -- back-end set-up -----------------------------------------------------------------------------


def test_unknown_kind_or_missing_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="stdio or socket"):
        Console("serial", None)
    with pytest.raises(ConfigError, match="needs a path"):
        Console("socket", None)


def test_socket_path_that_is_a_file_is_a_config_error(tmp_path):
    p = tmp_path / "file"
    p.write_text("keep me")
    with pytest.raises(ConfigError, match="not a socket"):
        Console("socket", p)
    assert p.read_text() == "keep me"


def test_stale_socket_is_replaced_and_a_live_one_is_refused(tmp_path):
    p = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(p))
    stale.close()  # the file stays, nobody listens
    con = Console("socket", p)
    try:
        with pytest.raises(ConfigError, match="another process"):
            Console("socket", p)
    finally:
        con.close()
    assert not p.exists()


def test_socket_path_too_long_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="longer than"):
        Console("socket", tmp_path / ("x" * 120))


def test_socket_in_a_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot listen"):
        Console("socket", tmp_path / "no" / "such" / "dir.sock")
