"""virtio-vsock through the Linux-like driver kit, with real host Unix sockets.

The test plays the guest (a :class:`VsockGuest` posting rx/event buffers and sending packets
like Linux's virtio_transport) and the host (plain AF_UNIX sockets speaking Firecracker's
``CONNECT <port>`` protocol, and listeners on ``<uds>_<port>``).  The event loop is run by hand.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from embervm.devices.virtio import spec
from embervm.devices.virtio import vsock_muxer as mux
from embervm.devices.virtio.mmio import MmioTransport
from embervm.devices.virtio.vsock import VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, Vsock
from embervm.devices.virtio.vsock_muxer import (
    CONN_BUF_ALLOC,
    HDR,
    HDR_SIZE,
    LOCAL_PORT_FIRST,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_SEQPACKET,
    VIRTIO_VSOCK_TYPE_STREAM,
    parse_connect_line,
)
from embervm.errors import ConfigError
from embervm.eventloop import EventLoop
from embervm.memory import GuestMemory
from embervm.testing.driver import MmioDriver

GUEST_CID = 3
HOST_CID = 2
GUEST_BUF = 256 * 1024  # Linux's default per-socket buf_alloc
BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND


@dataclass
class Packet:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    payload: bytes
    used_len: int


class VsockGuest:
    """The guest half: a Linux-like virtio-vsock driver, and the host sockets' event loop.

    ``rx_layout``: "split" posts rx buffers as a 44-byte header descriptor plus a payload
    descriptor (Linux ≤ 6.1), "single" as one descriptor (skb-based Linux ≥ 6.2).
    """

    def __init__(
        self,
        tmp_path: Path,
        *,
        cid: int = GUEST_CID,
        queue_size: int = 64,
        packed: bool = False,
        rx_layout: str = "split",
        rx_payload: int = 4096,
        fill: bool = True,
        loop: EventLoop | None = None,
        mem_size: int = 64 << 20,
    ) -> None:
        self.mem = GuestMemory([(0, mem_size)])
        self.loop = loop or EventLoop()
        self.uds = str(tmp_path / "v.sock")
        self.dev = Vsock(cid, self.uds)
        self.dev.loop = self.loop
        self.transport = MmioTransport(self.dev, self.mem, packed=packed)
        self.drv = MmioDriver(self.transport, self.mem)
        self.cid = cid
        self.queue_size = queue_size
        self.rx_layout = rx_layout
        self.rx_payload = rx_payload
        self.inbox: list[Packet] = []
        self.events: list[tuple[int, bytes]] = []
        self.probe(fill=fill)

    def close(self) -> None:
        self.dev.close()
        self.loop.close()

    # -- driver side ---------------------------------------------------------------------------

    def probe(self, *, fill: bool = True) -> None:
        self.drv.probe(queue_sizes=[self.queue_size] * 3)
        if fill:
            self.fill_rx()
            self.post_events(4)

    def rx_shape(self) -> list[int]:
        if self.rx_layout == "split":
            return [HDR_SIZE, self.rx_payload]
        return [HDR_SIZE + self.rx_payload]

    def fill_rx(self, n: int | None = None) -> int:
        """Post rx buffers (all that fit, or ``n``) and kick once, like virtio_vsock_rx_fill."""
        ring = self.drv.rings[0]
        added = 0
        while (n is None or added < n) and ring.num_free >= 2:
            self.drv.submit(0, writable=self.rx_shape(), kick=False)
            added += 1
        if added and ring.kick_needed():
            self.drv.kick(0)
        return added

    def post_events(self, n: int) -> None:
        for _ in range(n):
            self.drv.submit(2, writable=[4])

    def send(
        self,
        op: int,
        src_port: int,
        dst_port: int,
        payload: bytes = b"",
        *,
        flags: int = 0,
        buf_alloc: int = GUEST_BUF,
        fwd_cnt: int = 0,
        type_: int = VIRTIO_VSOCK_TYPE_STREAM,
        src_cid: int | None = None,
        dst_cid: int = HOST_CID,
        length: int | None = None,
        pieces: list[bytes] | None = None,
    ) -> None:
        """Send one packet on the tx queue (header and payload as two descriptors, by default)."""
        hdr = HDR.pack(self.cid if src_cid is None else src_cid, dst_cid, src_port, dst_port,
                       len(payload) if length is None else length, type_, op, flags, buf_alloc,
                       fwd_cnt)
        if pieces is None:
            pieces = [hdr, payload] if payload else [hdr]
        self.drv.submit(1, readable=pieces)
        self.drv.used(1)  # tx buffers come back at once: reclaim them

    def poll(self) -> list[Packet]:
        """Packets the device put in rx buffers since the last poll (and refill the ring)."""
        new: list[Packet] = []
        if not self.drv.rings:
            return new  # the driver is not bound
        for _tok, ln, bufs in self.drv.used(0):
            data = b"".join(bufs)[:ln]
            if ln >= HDR_SIZE:
                f = HDR.unpack_from(data)
                new.append(Packet(*f, payload=data[HDR_SIZE:], used_len=ln))
            else:
                new.append(Packet(0, 0, 0, 0, 0, 0, -1, 0, 0, 0, b"", ln))
        for _tok, ln, bufs in self.drv.used(2):
            self.events.append((ln, b"".join(bufs)[:ln]))
        self.inbox.extend(new)
        self.fill_rx()
        return new

    def run(self, timeout: float = 0.0) -> list[Packet]:
        self.loop.run_once(timeout)
        return self.poll()

    def wait_for(self, pred: Callable[[], object], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out; inbox: {self.inbox[-5:]}"
            self.run(0.005)

    def take(self, op: int | None = None, timeout: float = 5.0) -> Packet:
        """Wait for the first packet (of ``op``) in the inbox and remove it from there."""
        def found() -> bool:
            return any(op is None or p.op == op for p in self.inbox)
        self.wait_for(found, timeout)
        for i, p in enumerate(self.inbox):
            if op is None or p.op == op:
                return self.inbox.pop(i)
        raise AssertionError("unreachable")

    def settle(self, rounds: int = 5) -> None:
        for _ in range(rounds):
            self.run(0.002)

    # -- host side ------------------------------------------------------------------------------

    def host_connect(self, port: int, line: bytes | None = None) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.uds)
        s.sendall(b"CONNECT %d\n" % port if line is None else line)
        s.setblocking(False)
        return s

    def host_read(self, s: socket.socket, n: int, timeout: float = 5.0) -> bytes:
        """Read exactly ``n`` bytes (or up to EOF) from a host socket, running the loop."""
        out = bytearray()
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                chunk = s.recv(n - len(out))
            except BlockingIOError:
                assert time.monotonic() < deadline, f"host read timed out after {len(out)} bytes"
                self.run(0.002)
                continue
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def host_eof(self, s: socket.socket, timeout: float = 5.0) -> bytes:
        """Everything the host socket still delivers, up to EOF (or a reset)."""
        out = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                assert time.monotonic() < deadline, "no EOF on the host socket"
                self.run(0.002)
                continue
            except ConnectionResetError:
                return bytes(out)
            if not chunk:
                return bytes(out)
            out += chunk

    def open_from_host(self, guest_port: int = 5000) -> tuple[socket.socket, int]:
        """Host-initiated connection accepted by the "guest": (host socket, host port)."""
        s = self.host_connect(guest_port)
        req = self.take(VIRTIO_VSOCK_OP_REQUEST)
        assert req.dst_port == guest_port
        self.send(VIRTIO_VSOCK_OP_RESPONSE, guest_port, req.src_port)
        assert self.host_read(s, len(b"OK %d\n" % req.src_port)) == b"OK %d\n" % req.src_port
        return s, req.src_port

    def listen(self, port: int) -> socket.socket:
        path = f"{self.uds}_{port}"
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ls.bind(path)
        ls.listen(64)
        return ls

    def open_from_guest(self, ls: socket.socket, host_port: int,
                        guest_port: int = 40000) -> socket.socket:
        """Guest-initiated connection: (accepted host socket)."""
        self.send(VIRTIO_VSOCK_OP_REQUEST, guest_port, host_port)
        resp = self.take()
        assert resp.op == VIRTIO_VSOCK_OP_RESPONSE, resp
        s, _ = ls.accept()
        s.setblocking(False)
        return s

    def rw_payload(self, guest_port: int, host_port: int | None = None) -> bytes:
        return b"".join(p.payload for p in self.inbox
                        if p.op == VIRTIO_VSOCK_OP_RW and p.dst_port == guest_port
                        and (host_port is None or p.src_port == host_port))


@pytest.fixture
def guest(tmp_path):
    g = VsockGuest(tmp_path)
    yield g
    g.close()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- device basics ---------------------------------------------------------------------------------


def test_device_has_id_19_three_queues_and_offers_no_device_features(guest):
    drv = guest.drv
    assert drv.device_id == spec.VIRTIO_ID_VSOCK
    assert len(drv.rings) == 3
    # Bits 0-23 are device features: none (stream only); VERSION_1 is there.
    assert drv.features & 0xFF_FFFF == 0
    assert drv.features >> spec.VIRTIO_F_VERSION_1 & 1


def test_guest_cid_reads_as_le64_in_two_32_bit_halves(tmp_path):
    g = VsockGuest(tmp_path, cid=0xFFFF_FFFE)
    try:
        assert g.drv.read_config(0, 8) == 0xFFFF_FFFE
        assert g.drv.read_config(4, 4) == 0  # upper half is zero (§5.10.4)
    finally:
        g.close()


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFF_FFFF, 1 << 32, -1])
def test_reserved_and_out_of_range_cids_are_refused(tmp_path, cid):
    with pytest.raises(ConfigError, match="reserved"):
        Vsock(cid, tmp_path / "v.sock")
    assert not (tmp_path / "v.sock").exists()


def test_uds_path_that_is_a_regular_file_is_refused(tmp_path):
    p = tmp_path / "v.sock"
    p.write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        Vsock(3, p)
    assert p.read_text() == "not a socket"


def test_stale_socket_file_is_replaced(tmp_path):
    p = tmp_path / "v.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(p))
    old.close()  # the file stays, nobody listens: what a crashed VMM leaves behind
    v = Vsock(3, p)
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(p))  # our listener took the path
        c.close()
    finally:
        v.close()


def test_socket_path_with_a_live_listener_is_refused(tmp_path):
    p = tmp_path / "v.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(p))
    live.listen(1)
    try:
        with pytest.raises(ConfigError, match="another process is listening"):
            Vsock(3, p)
        assert p.exists()
    finally:
        live.close()


def test_too_long_uds_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        Vsock(3, tmp_path / ("x" * 120))


def test_close_removes_socket_file_and_closes_host_streams(tmp_path):
    before = fd_count()
    g = VsockGuest(tmp_path)
    s, _ = g.open_from_host(5000)
    pending = g.host_connect(6000, line=b"CONN")  # still in its handshake
    g.settle()
    g.close()
    assert not Path(g.uds).exists()
    assert g.host_eof(s) == b""
    assert g.host_eof(pending) == b""
    s.close()
    pending.close()
    assert fd_count() == before


# -- host-initiated connections --------------------------------------------------------------------


def test_connect_line_gives_request_then_ok_after_response(guest):
    s = guest.host_connect(5000)
    req = guest.take()
    assert req.op == VIRTIO_VSOCK_OP_REQUEST
    assert (req.src_cid, req.dst_cid, req.dst_port) == (HOST_CID, GUEST_CID, 5000)
    assert req.type == VIRTIO_VSOCK_TYPE_STREAM
    assert req.src_port >= LOCAL_PORT_FIRST
    assert req.buf_alloc == CONN_BUF_ALLOC and req.fwd_cnt == 0 and req.len == 0
    with pytest.raises(BlockingIOError):
        s.recv(16)  # no OK before the guest accepted
    guest.send(VIRTIO_VSOCK_OP_RESPONSE, 5000, req.src_port)
    assert guest.host_read(s, 64 and len(b"OK %d\n" % req.src_port)) == (
        b"OK %d\n" % req.src_port)
    s.close()


def test_connect_line_in_pieces_and_pipelined_data_reach_the_guest(guest):
    s = guest.host_connect(77, line=b"conn")
    guest.settle()
    s.sendall(b"ect 77\nhello, guest")  # data right behind the line, before OK
    req = guest.take(VIRTIO_VSOCK_OP_REQUEST)
    assert req.dst_port == 77
    guest.send(VIRTIO_VSOCK_OP_RESPONSE, 77, req.src_port)
    assert guest.host_read(s, len(b"OK %d\n" % req.src_port)).startswith(b"OK ")
    guest.wait_for(lambda: guest.rw_payload(77) == b"hello, guest")
    s.close()


@pytest.mark.parametrize("line", [
    b"HELLO 5\n", b"CONNECT\n", b"CONNECT x\n", b"CONNECT 4294967296\n", b"CONNECT +5\n",
    b"CONNECT 5" + b" " * 40 + b"\n", b"A" * 40,
])
def test_bad_connect_lines_close_the_host_stream(guest, line):
    s = guest.host_connect(0, line=line)
    assert guest.host_eof(s) == b""
    guest.settle()
    assert not any(p.op == VIRTIO_VSOCK_OP_REQUEST for p in guest.inbox)
    assert guest.dev.muxer.handshakes == 0
    assert guest.dev.metrics["host_rejected"] == 1
    s.close()


def test_connect_line_parser_takes_firecracker_forms():
    assert parse_connect_line(b"CONNECT 52\n") == 52
    assert parse_connect_line(b"connect 52\n") == 52  # case-insensitive, like Firecracker
    assert parse_connect_line(b"Connect 4294967295 extra words\n") == 0xFFFF_FFFF
    assert parse_connect_line(b"CONNECT 5_0\n") is None
    assert parse_connect_line(b"CONNECT 52") is None  # no newline


def test_guest_rst_refuses_the_host_connection(guest):
    s = guest.host_connect(5001)
    req = guest.take(VIRTIO_VSOCK_OP_REQUEST)
    guest.send(VIRTIO_VSOCK_OP_RST, 5001, req.src_port)
    assert guest.host_eof(s) == b""  # closed without OK
    assert guest.dev.muxer.connections == {}
    s.close()


def test_unanswered_request_times_out_with_rst_and_a_closed_stream(guest, monkeypatch):
    monkeypatch.setattr(mux, "CONN_REQUEST_TIMEOUT", 0.05)
    s = guest.host_connect(5002)
    req = guest.take(VIRTIO_VSOCK_OP_REQUEST)
    rst = guest.take(VIRTIO_VSOCK_OP_RST)  # the device gives up and tells the guest
    assert (rst.src_port, rst.dst_port) == (req.src_port, 5002)
    assert guest.host_eof(s) == b""
    assert guest.dev.muxer.connections == {}
    s.close()


def test_host_connection_is_closed_when_the_guest_posts_no_buffer_for_the_request(
        tmp_path, monkeypatch):
    monkeypatch.setattr(mux, "CONN_REQUEST_TIMEOUT", 0.05)
    g = VsockGuest(tmp_path, fill=False)
    try:
        g.fill_rx = lambda n=None: 0  # type: ignore[method-assign]  # no rx buffers at all
        s = g.host_connect(5004)
        assert g.host_eof(s) == b""  # closed although the REQUEST could not be delivered
        assert g.inbox == []
        del g.fill_rx
        g.fill_rx()
        assert g.take(VIRTIO_VSOCK_OP_RST).dst_port == 5004  # the guest hears it is over
        assert g.dev.muxer.connections == {}
        s.close()
    finally:
        g.close()


def test_host_ports_are_allocated_from_2_30_and_never_shared(guest):
    socks = [guest.host_connect(5000) for _ in range(5)]
    ports = [guest.take(VIRTIO_VSOCK_OP_REQUEST).src_port for _ in socks]
    assert ports == list(range(LOCAL_PORT_FIRST, LOCAL_PORT_FIRST + 5))
    for s in socks:
        s.close()


def test_host_connection_waits_in_the_backlog_until_the_driver_is_ready(tmp_path):
    g = VsockGuest(tmp_path, fill=False)
    try:
        g.drv.remove()  # driver gone: the listener is not served
        s = g.host_connect(5003)
        g.settle()
        g.probe()
        req = g.take(VIRTIO_VSOCK_OP_REQUEST)
        assert req.dst_port == 5003
        s.close()
    finally:
        g.close()


# -- guest-initiated connections -------------------------------------------------------------------


def test_guest_connect_reaches_the_host_listener_and_gets_response(guest):
    ls = guest.listen(7000)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 40000, 7000)
    resp = guest.take()
    assert resp.op == VIRTIO_VSOCK_OP_RESPONSE
    assert (resp.src_port, resp.dst_port, resp.dst_cid) == (7000, 40000, GUEST_CID)
    assert resp.buf_alloc == CONN_BUF_ALLOC
    h, _ = ls.accept()
    h.close()
    ls.close()


def test_guest_connect_without_a_host_listener_gets_rst(guest):
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 40001, 7001)
    rst = guest.take()
    assert rst.op == VIRTIO_VSOCK_OP_RST and (rst.src_port, rst.dst_port) == (7001, 40001)
    assert guest.dev.metrics["connect_refused"] == 1


def test_guest_packet_to_another_cid_or_from_a_wrong_cid_is_dropped(guest):
    ls = guest.listen(7002)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 40002, 7002, dst_cid=5)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 40002, 7002, src_cid=9)
    guest.settle()
    assert guest.inbox == []  # as Firecracker: no answer for what is not ours
    assert guest.dev.metrics["tx_dropped"] == 2
    ls.close()


# -- data and credit -------------------------------------------------------------------------------


def test_host_data_respects_the_guest_credit_and_resumes_on_credit_update(guest):
    s, hp = guest.open_from_host(5000)
    # The RESPONSE said buf_alloc = GUEST_BUF; shrink it to 10000 with a credit update.
    guest.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 5000, hp, buf_alloc=10000)
    data = os.urandom(50000)
    s.sendall(data)
    req = guest.take(VIRTIO_VSOCK_OP_CREDIT_REQUEST)  # asked once, when the window is full
    assert req.src_port == hp
    guest.settle()
    got = guest.rw_payload(5000)
    assert got == data[:10000]
    assert sum(p.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST for p in guest.inbox) == 0
    # The guest application consumed everything: the device may send 10000 more.
    guest.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 5000, hp, buf_alloc=10000, fwd_cnt=10000)
    guest.wait_for(lambda: len(guest.rw_payload(5000)) >= 20000)
    guest.settle()
    assert guest.rw_payload(5000) == data[:20000]
    guest.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE, 5000, hp, buf_alloc=GUEST_BUF, fwd_cnt=20000)
    guest.wait_for(lambda: len(guest.rw_payload(5000)) == len(data))
    assert guest.rw_payload(5000) == data
    assert all(p.len <= 4096 for p in guest.inbox if p.op == VIRTIO_VSOCK_OP_RW)
    s.close()


def test_host_data_waits_in_the_socket_without_rx_buffers_and_without_busy_looping(tmp_path):
    g = VsockGuest(tmp_path, queue_size=16)
    try:
        s, _hp = g.open_from_host(5000)
        g.fill_rx = lambda n=None: 0  # type: ignore[method-assign]  # the guest stops refilling
        posted = g.drv.rings[0].outstanding
        data = os.urandom(4096 * posted + 50000)  # more than the posted buffers hold
        s.setblocking(True)
        s.sendall(data)
        g.wait_for(lambda: g.drv.rings[0].outstanding == 0)
        assert g.rw_payload(5000) == data[: 4096 * posted]
        calls = 0
        real = g.dev.muxer.handle_events

        def counting() -> None:
            nonlocal calls
            calls += 1
            real()

        g.dev.muxer.handle_events = counting  # type: ignore[method-assign]
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.3:
            g.loop.run_once(0.05)
        # Readable data but no buffers: the socket is not polled, so the loop sleeps.
        assert calls <= 1
        del g.fill_rx  # the guest refills: the rest arrives, nothing was lost or read ahead
        g.fill_rx()
        g.wait_for(lambda: len(g.rw_payload(5000)) == len(data))
        assert g.rw_payload(5000) == data
        s.close()
    finally:
        g.close()


def test_guest_data_reaches_the_host_and_credit_updates_follow_forwarding(guest):
    ls = guest.listen(7100)
    h = guest.open_from_guest(ls, 7100, 41000)
    chunks = [os.urandom(4096) for _ in range(40)]
    for c in chunks:
        guest.send(VIRTIO_VSOCK_OP_RW, 41000, 7100, c)
    assert guest.host_read(h, 4096 * 40) == b"".join(chunks)
    guest.settle()
    ups = [p for p in guest.inbox if p.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE]
    # 160 KiB forwarded with a 64 KiB step: two updates, each with the fwd_cnt of its time.
    assert [p.fwd_cnt for p in ups] == [mux.CREDIT_UPDATE_STEP, 2 * mux.CREDIT_UPDATE_STEP]
    assert guest.dev.metrics["tx_bytes"] == 4096 * 40
    h.close()
    ls.close()


def test_slow_host_reader_gets_every_byte_in_order(guest):
    ls = guest.listen(7101)
    h = guest.open_from_guest(ls, 7101, 41001)
    h.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = os.urandom(CONN_BUF_ALLOC)  # a full window: more than the socket buffers hold
    for i in range(0, len(data), 4096):
        guest.send(VIRTIO_VSOCK_OP_RW, 41001, 7101, data[i : i + 4096])
    conn = guest.dev.muxer.connections[(7101, 41001)]
    assert conn.tx_buf  # the host did not keep up: the rest is buffered
    assert guest.host_read(h, len(data)) == data
    guest.settle()
    assert not conn.tx_buf and conn.fwd_cnt == len(data)
    h.close()
    ls.close()


def test_guest_sending_beyond_its_credit_is_reset(guest):
    ls = guest.listen(7102)
    h = guest.open_from_guest(ls, 7102, 41002)
    h.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(2 * CONN_BUF_ALLOC // 4096):  # twice the window, host never reads
        guest.send(VIRTIO_VSOCK_OP_RW, 41002, 7102, bytes(4096))
    rst = guest.take(VIRTIO_VSOCK_OP_RST)
    assert (rst.src_port, rst.dst_port) == (7102, 41002)
    assert guest.host_eof(h, timeout=5) is not None
    assert guest.dev.metrics["conns_killed"] == 1
    h.close()
    ls.close()


def test_credit_request_is_answered_with_the_current_fwd_cnt(guest):
    ls = guest.listen(7103)
    h = guest.open_from_guest(ls, 7103, 41003)
    guest.send(VIRTIO_VSOCK_OP_RW, 41003, 7103, b"x" * 1000)
    guest.send(VIRTIO_VSOCK_OP_CREDIT_REQUEST, 41003, 7103)
    up = guest.take(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
    assert up.fwd_cnt == 1000 and up.buf_alloc == CONN_BUF_ALLOC
    h.close()
    ls.close()


def test_rx_into_single_descriptor_buffers(tmp_path):
    g = VsockGuest(tmp_path, rx_layout="single", rx_payload=4096)
    try:
        s, _ = g.open_from_host(5000)
        data = os.urandom(3 * 4096 + 17)
        s.sendall(data)
        g.wait_for(lambda: g.rw_payload(5000) == data)
        assert all(p.used_len == HDR_SIZE + p.len for p in g.inbox)
        s.close()
    finally:
        g.close()


def test_tx_header_split_across_descriptors_and_sharing_one_with_payload(guest):
    ls = guest.listen(7104)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 41004, 7104)
    guest.take(VIRTIO_VSOCK_OP_RESPONSE)
    h, _ = ls.accept()
    h.setblocking(False)
    hdr = HDR.pack(GUEST_CID, HOST_CID, 41004, 7104, 11, 1, VIRTIO_VSOCK_OP_RW, 0, GUEST_BUF, 0)
    guest.send(0, 0, 0, pieces=[hdr[:7], hdr[7:30], hdr[30:] + b"hello", b" world"])
    assert guest.host_read(h, 11) == b"hello world"
    h.close()
    ls.close()


def test_fifty_host_connections_interleave_and_each_stream_arrives_intact(tmp_path):
    g = VsockGuest(tmp_path, queue_size=256)
    try:
        conns = []
        for i in range(50):
            s = g.host_connect(6000 + i)
            req = g.take(VIRTIO_VSOCK_OP_REQUEST)
            g.send(VIRTIO_VSOCK_OP_RESPONSE, req.dst_port, req.src_port)
            g.host_read(s, len(b"OK %d\n" % req.src_port))
            conns.append((s, req.dst_port, req.src_port, os.urandom(20000 + 1000 * i)))
        for s, _gp, _hp, data in conns:
            s.sendall(data)
        g.wait_for(lambda: all(len(g.rw_payload(gp, hp)) == len(d) for _s, gp, hp, d in conns),
                   timeout=20)
        for s, gp, hp, data in conns:
            assert g.rw_payload(gp, hp) == data
            s.close()
        # Round-robin: the first 50 data packets come from 50 different connections.
        first = [p.src_port for p in g.inbox if p.op == VIRTIO_VSOCK_OP_RW][:50]
        assert len(set(first)) == 50
    finally:
        g.close()


def test_packed_ring_carries_data_both_ways(tmp_path):
    g = VsockGuest(tmp_path, packed=True)
    try:
        assert g.drv.has(spec.VIRTIO_F_RING_PACKED)
        s, hp = g.open_from_host(5000)
        s.sendall(b"to the guest")
        g.wait_for(lambda: g.rw_payload(5000) == b"to the guest")
        g.send(VIRTIO_VSOCK_OP_RW, 5000, hp, b"to the host")
        assert g.host_read(s, 11) == b"to the host"
        s.close()
    finally:
        g.close()


# -- shutdown and close ----------------------------------------------------------------------------


def test_host_half_close_sends_shutdown_send_and_the_guest_can_still_answer(guest):
    s, hp = guest.open_from_host(5000)
    s.sendall(b"question")
    s.shutdown(socket.SHUT_WR)
    sd = guest.take(VIRTIO_VSOCK_OP_SHUTDOWN)
    assert sd.flags == VIRTIO_VSOCK_SHUTDOWN_SEND  # only "no more data from the host"
    assert guest.rw_payload(5000) == b"question"  # data first, then the shutdown
    guest.send(VIRTIO_VSOCK_OP_RW, 5000, hp, b"answer")
    assert guest.host_read(s, 6) == b"answer"
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 5000, hp, flags=BOTH)  # the guest closes
    rst = guest.take(VIRTIO_VSOCK_OP_RST)
    assert rst.src_port == hp
    assert guest.host_eof(s) == b""
    assert guest.dev.muxer.connections == {}
    s.close()


def test_host_close_sends_shutdown_both_and_rst_if_the_guest_never_answers(guest, monkeypatch):
    monkeypatch.setattr(mux, "CONN_SHUTDOWN_TIMEOUT", 0.05)
    s, hp = guest.open_from_host(5000)
    s.sendall(b"last words")
    s.close()
    sd = guest.take(VIRTIO_VSOCK_OP_SHUTDOWN)
    assert sd.flags == BOTH
    assert guest.rw_payload(5000) == b"last words"
    rst = guest.take(VIRTIO_VSOCK_OP_RST)
    assert rst.src_port == hp
    assert guest.dev.muxer.connections == {}


def test_guest_rst_after_host_close_removes_the_connection(guest):
    s, hp = guest.open_from_host(5000)
    s.close()
    guest.take(VIRTIO_VSOCK_OP_SHUTDOWN)
    guest.send(VIRTIO_VSOCK_OP_RST, 5000, hp)  # what Linux answers to SHUTDOWN(both)
    assert guest.dev.muxer.connections == {}
    guest.settle()
    assert not any(p.op == VIRTIO_VSOCK_OP_RST for p in guest.inbox)


def test_guest_shutdown_send_half_closes_the_host_stream(guest):
    ls = guest.listen(7200)
    h = guest.open_from_guest(ls, 7200, 42000)
    guest.send(VIRTIO_VSOCK_OP_RW, 42000, 7200, b"request")
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 42000, 7200, flags=VIRTIO_VSOCK_SHUTDOWN_SEND)
    assert guest.host_eof(h) == b"request"  # EOF after the data...
    h.sendall(b"reply")  # ...but the host can still answer
    guest.wait_for(lambda: guest.rw_payload(42000) == b"reply")
    h.close()
    ls.close()


def test_guest_close_with_buffered_data_flushes_then_closes_and_resets(guest):
    ls = guest.listen(7201)
    h = guest.open_from_guest(ls, 7201, 42001)
    h.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = os.urandom(CONN_BUF_ALLOC)  # more than the socket holds: some stays buffered
    for i in range(0, len(data), 4096):
        guest.send(VIRTIO_VSOCK_OP_RW, 42001, 7201, data[i : i + 4096])
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 42001, 7201, flags=BOTH)
    guest.settle()
    assert not any(p.op == VIRTIO_VSOCK_OP_RST for p in guest.inbox)  # still flushing
    assert guest.host_eof(h) == data
    rst = guest.take(VIRTIO_VSOCK_OP_RST)
    assert (rst.src_port, rst.dst_port) == (7201, 42001)
    h.close()
    ls.close()


def test_guest_close_resets_after_a_timeout_if_the_host_never_reads(guest, monkeypatch):
    monkeypatch.setattr(mux, "CONN_SHUTDOWN_TIMEOUT", 0.05)
    ls = guest.listen(7202)
    h = guest.open_from_guest(ls, 7202, 42002)
    h.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for _ in range(64):
        guest.send(VIRTIO_VSOCK_OP_RW, 42002, 7202, bytes(4096))
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 42002, 7202, flags=BOTH)
    guest.take(VIRTIO_VSOCK_OP_RST)
    assert guest.dev.muxer.connections == {}
    h.close()
    ls.close()


def test_guest_rst_closes_the_host_stream_at_once(guest):
    s, hp = guest.open_from_host(5000)
    guest.send(VIRTIO_VSOCK_OP_RST, 5000, hp)
    assert guest.host_eof(s) == b""
    assert guest.dev.muxer.connections == {}
    guest.settle()
    assert not any(p.op == VIRTIO_VSOCK_OP_RST for p in guest.inbox)  # no RST for an RST
    s.close()


def test_host_write_failure_resets_the_guest_side(guest):
    ls = guest.listen(7203)
    h = guest.open_from_guest(ls, 7203, 42003)
    h.close()
    guest.settle()
    guest.inbox.clear()
    guest.send(VIRTIO_VSOCK_OP_RW, 42003, 7203, b"anyone?")
    guest.wait_for(lambda: any(p.op in (VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_SHUTDOWN)
                               for p in guest.inbox))
    # Either the EOF was seen first (SHUTDOWN both, host gone) or the write failed (RST):
    # the guest learns the host is gone in both cases, and an RST ends it.
    guest.send(VIRTIO_VSOCK_OP_RW, 42003, 7203, b"anyone?")
    guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 42003, 7203, flags=BOTH)
    guest.take(VIRTIO_VSOCK_OP_RST)
    assert guest.dev.muxer.connections == {}
    ls.close()


# -- unknown and malformed packets -----------------------------------------------------------------


@pytest.mark.parametrize("op", [VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_SHUTDOWN,
                                VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_CREDIT_UPDATE,
                                VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0, 99])
def test_packets_for_unknown_connections_get_rst(guest, op):
    guest.send(op, 43000, 7300, b"data" if op == VIRTIO_VSOCK_OP_RW else b"")
    rst = guest.take()
    assert rst.op == VIRTIO_VSOCK_OP_RST
    assert (rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port) == (HOST_CID, GUEST_CID,
                                                                      7300, 43000)


def test_rst_for_an_unknown_connection_is_not_answered(guest):
    guest.send(VIRTIO_VSOCK_OP_RST, 43001, 7301)
    guest.settle()
    assert guest.inbox == []


def test_seqpacket_packets_are_refused_with_rst(guest):
    ls = guest.listen(7302)
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 43002, 7302, type_=VIRTIO_VSOCK_TYPE_SEQPACKET)
    assert guest.take().op == VIRTIO_VSOCK_OP_RST
    assert guest.dev.muxer.connections == {}
    ls.close()


def test_tx_chain_shorter_than_a_header_is_dropped(guest):
    guest.drv.submit(1, readable=[b"\x01" * 43])
    assert guest.drv.used(1)[0][1] == 0
    guest.settle()
    assert guest.inbox == [] and guest.dev.metrics["tx_dropped"] == 1
    assert guest.dev.active


def test_rx_buffer_too_small_for_a_header_comes_back_empty_and_the_packet_waits(tmp_path):
    g = VsockGuest(tmp_path, fill=False)
    try:
        g.post_events(1)
        g.drv.submit(0, writable=[20])  # too small
        g.send(VIRTIO_VSOCK_OP_REQUEST, 43003, 7303)  # no listener: an RST is owed
        [(_tok, ln, _bufs)] = g.drv.used(0)
        assert ln == 0 and g.dev.metrics["rx_buffer_errors"] == 1
        g.drv.submit(0, writable=[HDR_SIZE])  # a header-only buffer is enough for RST
        g.poll()
        assert [p.op for p in g.inbox] == [VIRTIO_VSOCK_OP_RST]
    finally:
        g.close()


def test_rw_longer_than_its_buffer_resets_the_connection(guest):
    ls = guest.listen(7304)
    h = guest.open_from_guest(ls, 7304, 43004)
    guest.send(VIRTIO_VSOCK_OP_RW, 43004, 7304, b"short", length=5000)
    rst = guest.take(VIRTIO_VSOCK_OP_RST)
    assert rst.src_port == 7304
    assert guest.host_eof(h) == b""  # nothing of the malformed packet reached the host
    h.close()
    ls.close()


# -- lifecycle -------------------------------------------------------------------------------------


def test_device_reset_closes_host_streams_and_the_device_works_after_reprobe(guest):
    for _cycle in range(3):
        s, hp = guest.open_from_host(5000)
        s.sendall(b"ping")
        guest.wait_for(lambda hp=hp: guest.rw_payload(5000, hp) == b"ping")
        guest.drv.remove()  # the guest unbinds the driver: Status := 0
        assert not guest.dev.active
        assert guest.host_eof(s) == b""
        assert guest.dev.muxer.connections == {}
        s.close()
        guest.inbox.clear()
        guest.probe()
    assert Path(guest.uds).exists()
    assert guest.dev.metrics["activations"] == 4


def test_transport_reset_drops_connections_sends_the_event_and_updates_the_cid(guest):
    s, _ = guest.open_from_host(5000)
    gen = guest.drv.config_generation()
    guest.dev.transport_reset(guest_cid=42)
    guest.poll()
    assert guest.events == [(4, struct.pack("<I", VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))]
    assert guest.drv.read_config(0, 8) == 42
    assert guest.drv.config_generation() != gen
    assert guest.host_eof(s) == b""
    assert guest.dev.muxer.connections == {}
    # The guest now speaks as CID 42; packets from CID 3 are not its own any more.
    guest.cid = 42
    s2, _ = guest.open_from_host(5001)
    req_cids = {p.dst_cid for p in guest.inbox}
    assert req_cids <= {42}
    s.close()
    s2.close()


def test_transport_reset_event_waits_for_an_event_buffer(tmp_path):
    g = VsockGuest(tmp_path, fill=False)
    try:
        g.dev.transport_reset()
        g.poll()
        assert g.events == []
        g.post_events(2)  # the kick delivers the pending event, once
        g.poll()
        assert [ln for ln, _ in g.events] == [4]
    finally:
        g.close()


def test_control_command_reports_status_and_resets(guest):
    s, _ = guest.open_from_host(5000)
    st = guest.dev.control_commands()["vsock"](["status"])
    assert st["guest_cid"] == GUEST_CID and st["connections"] == 1 and st["uds"] == guest.uds
    st = guest.dev.control_commands()["vsock"](["reset", "7"])
    assert st["guest_cid"] == 7 and st["connections"] == 0
    for bad in (["reset", "2"], ["reset", "x"], ["bogus"], []):
        with pytest.raises(ValueError):
            guest.dev.control_commands()["vsock"](bad)
    s.close()


def test_connection_limit_refuses_extra_host_and_guest_connections(guest, monkeypatch):
    monkeypatch.setattr(mux, "MAX_CONNECTIONS", 3)
    ls = guest.listen(7400)
    socks = [guest.open_from_host(5000)[0] for _ in range(3)]
    extra = guest.host_connect(5000)
    assert guest.host_eof(extra) == b""  # accepted and closed at once
    guest.send(VIRTIO_VSOCK_OP_REQUEST, 44000, 7400)
    assert guest.take().op == VIRTIO_VSOCK_OP_RST
    assert len(guest.dev.muxer.connections) == 3
    for s in socks + [extra]:
        s.close()
    ls.close()


def test_no_fd_leak_after_hundreds_of_connections(guest):
    ls = guest.listen(7500)
    before = fd_count()
    for i in range(150):
        s, hp = guest.open_from_host(5000)
        guest.send(VIRTIO_VSOCK_OP_RW, 5000, hp, b"x")
        guest.host_read(s, 1)
        s.close()
        guest.take(VIRTIO_VSOCK_OP_SHUTDOWN)
        guest.send(VIRTIO_VSOCK_OP_RST, 5000, hp)
        h = guest.open_from_guest(ls, 7500, 45000 + i)
        guest.send(VIRTIO_VSOCK_OP_SHUTDOWN, 45000 + i, 7500, flags=BOTH)
        guest.take(VIRTIO_VSOCK_OP_RST)
        h.close()
        guest.inbox.clear()
    guest.settle()
    assert guest.dev.muxer.connections == {}
    assert fd_count() == before
    ls.close()
