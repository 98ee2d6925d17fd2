"""virtio-vsock against a hostile driver and hostile host clients (hypothesis).

* Arbitrary packet sequences: any header field (CIDs, ports, op, type, flags, len vs the real
  payload, credit values), header split anywhere across descriptors, chains without a readable
  part (tx) or without a writable part (rx), tiny rx and event buffers, interleaved with host
  clients that connect, send garbage or valid CONNECT lines, write and close, plus device and
  transport resets.  Nothing may escape process_queue or an event-loop callback; every packet
  the device writes is well-formed; afterwards the device still works (or says
  DEVICE_NEEDS_RESET), and close() leaves no fd and no socket file behind.
* Flow control against models: whatever the guest's buf_alloc / fwd_cnt and rx buffer sizes,
  the device never has more bytes in flight to the guest than the guest allowed, and every byte
  arrives in order; a guest that respects our credit never gets reset and all its bytes reach
  the host; a guest that ignores it is reset before the device buffers beyond its window.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_vsock import GUEST_CID, HOST_CID, Packet, VsockGuest

from embervm.devices.virtio import spec
from embervm.devices.virtio.vsock_muxer import (
    CONN_BUF_ALLOC,
    HDR,
    HDR_SIZE,
    LOCAL_PORT_FIRST,
    MAX_RX_PAYLOAD,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_TYPE_STREAM,
)
from embervm.eventloop import EventLoop

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEM = 8 << 20
HOST_PORT = 7000  # a host listener exists on <uds>_7000
GUEST_PORT = 5000  # host clients ask for this guest port


class RaisingLoop(EventLoop):
    """An event loop that lets a callback's exception reach the test instead of logging it."""

    def _dispatch(self, cb):  # type: ignore[no-untyped-def]
        cb()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def check_packet(p: Packet, cid: int) -> None:
    """What every packet from the device must look like (§5.10.6)."""
    if p.used_len == 0:
        return  # a buffer the device could not use
    assert p.used_len >= HDR_SIZE
    assert (p.src_cid, p.dst_cid, p.type) == (HOST_CID, cid, VIRTIO_VSOCK_TYPE_STREAM)
    assert p.used_len == HDR_SIZE + p.len
    assert p.op in (VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST,
                    VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_CREDIT_UPDATE,
                    VIRTIO_VSOCK_OP_CREDIT_REQUEST)
    if p.op == VIRTIO_VSOCK_OP_RW:
        assert 0 < p.len <= MAX_RX_PAYLOAD
    else:
        assert p.len == 0
    if p.op == VIRTIO_VSOCK_OP_SHUTDOWN:
        assert p.flags in (2, 3)


# -- arbitrary traffic ---------------------------------------------------------------------------

u32 = st.integers(0, 0xFFFF_FFFF)
ports = st.one_of(st.sampled_from([HOST_PORT, GUEST_PORT, 40000, 40001, LOCAL_PORT_FIRST,
                                   LOCAL_PORT_FIRST + 1]), u32)
packet = st.fixed_dictionaries({
    "src_cid": st.one_of(st.just(GUEST_CID), st.just(GUEST_CID), st.integers(0, 2**64 - 1)),
    "dst_cid": st.one_of(st.just(HOST_CID), st.just(HOST_CID), st.integers(0, 2**64 - 1)),
    "src_port": ports,
    "dst_port": ports,
    "op": st.one_of(st.integers(0, 8), u32.map(lambda v: v & 0xFFFF)),
    "type": st.sampled_from([1, 1, 1, 0, 2, 0xFFFF]),
    "flags": st.one_of(st.integers(0, 3), u32),
    "buf_alloc": st.one_of(st.just(256 * 1024), st.integers(0, 8192), u32),
    "fwd_cnt": st.one_of(st.just(0), u32),
    "payload": st.binary(max_size=5000),
    "len": st.one_of(st.none(), u32, st.integers(0, 6000)),
    "cuts": st.lists(st.integers(0, 6000), max_size=4),
    "wrong_direction": st.sampled_from([False, False, False, True]),
})
action = st.one_of(
    st.tuples(st.just("pkt"), packet),
    st.tuples(st.just("rx"), st.lists(st.integers(0, 5000), min_size=1, max_size=3),
              st.booleans()),
    st.tuples(st.just("event"), st.integers(0, 8)),
    st.tuples(st.just("host_connect"), st.sampled_from([
        b"CONNECT 5000\n", b"connect 5000 x\n", b"CONNECT 5001\n", b"CONNECT", b"\n", b"x" * 64,
        b"CONNECT 99999999999\n", b"CONNECT 5000\nearly data"])),
    st.tuples(st.just("host_send"), st.integers(0, 7), st.integers(1, 70000)),
    st.tuples(st.just("host_close"), st.integers(0, 7), st.sampled_from(["close", "shut_wr"])),
    st.tuples(st.just("accept"),),
    # Well-formed moves, so that the random ones hit live connections too.
    st.tuples(st.just("respond"), st.integers(0, 7), st.sampled_from([
        VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST])),
    st.tuples(st.just("guest_connect"), st.integers(40000, 40003)),
    st.tuples(st.just("guest_rw"), st.integers(0, 7), st.binary(min_size=1, max_size=5000),
              st.sampled_from([0, 1, 2, 3]), st.sampled_from([VIRTIO_VSOCK_OP_RW,
                                                               VIRTIO_VSOCK_OP_SHUTDOWN,
                                                               VIRTIO_VSOCK_OP_CREDIT_REQUEST,
                                                               VIRTIO_VSOCK_OP_CREDIT_UPDATE])),
    st.tuples(st.just("run"),),
    st.tuples(st.just("reset"),),
    st.tuples(st.just("transport_reset"),),
)


def _send_raw(g: VsockGuest, f: dict) -> None:
    payload = f["payload"]
    length = len(payload) if f["len"] is None else f["len"]
    hdr = HDR.pack(f["src_cid"], f["dst_cid"], f["src_port"], f["dst_port"], length, f["type"],
                   f["op"], f["flags"], f["buf_alloc"], f["fwd_cnt"])
    stream = hdr + payload
    cuts = sorted({c for c in f["cuts"] if 0 < c < len(stream)})
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    if f["wrong_direction"]:
        # Device-writable buffers only: there is no readable header at all.
        g.drv.submit(1, writable=[len(p) for p in pieces])
    else:
        g.drv.submit(1, readable=pieces)
    g.drv.used(1)


@SETTINGS
@given(st.lists(action, max_size=30))
def test_arbitrary_guest_packets_and_host_clients_never_break_the_device(actions):
    fds_before = fd_count()
    tmp = Path(tempfile.mkdtemp(prefix="vsh", dir="/tmp"))
    g = VsockGuest(tmp, queue_size=16, mem_size=MEM, loop=RaisingLoop(), fill=False)
    listener = g.listen(HOST_PORT)
    listener.setblocking(False)
    clients: list[socket.socket] = []
    accepted: list[socket.socket] = []
    requests: list[Packet] = []  # REQUESTs the device sent (host-initiated connections)
    keys: list[tuple[int, int]] = []  # (guest port, host port) pairs the guest may talk on
    try:
        g.fill_rx(4)
        g.post_events(2)
        for act in actions:
            kind = act[0]
            if not g.dev.active:
                if kind == "reset":
                    g.drv.remove()
                    g.probe(fill=False)
                    g.fill_rx(4)
                continue
            if kind == "pkt":
                _send_raw(g, act[1])
            elif kind == "rx":
                sizes, readable = act[1], act[2]
                if g.drv.rings[0].num_free:
                    if readable:  # wrong direction: nothing the device may write
                        g.drv.submit(0, readable=[bytes(max(1, n)) for n in sizes])
                    else:
                        g.drv.submit(0, writable=sizes)
            elif kind == "event":
                if g.drv.rings[2].num_free:
                    g.drv.submit(2, writable=[act[1]])
            elif kind == "host_connect":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(g.uds)
                s.setblocking(False)
                try:
                    s.send(act[1])
                except OSError:
                    pass
                clients.append(s)
            elif kind == "host_send" and clients:
                try:
                    clients[act[1] % len(clients)].send(os.urandom(act[2]))
                except OSError:
                    pass
            elif kind == "host_close" and clients:
                s = clients[act[1] % len(clients)]
                try:
                    if act[2] == "close":
                        s.close()
                    else:
                        s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            elif kind == "accept":
                try:
                    a, _ = listener.accept()
                    a.setblocking(False)
                    accepted.append(a)
                except BlockingIOError:
                    pass
            elif kind == "respond" and requests:
                req = requests[act[1] % len(requests)]
                g.send(act[2], req.dst_port, req.src_port)
                keys.append((req.dst_port, req.src_port))
            elif kind == "guest_connect":
                g.send(VIRTIO_VSOCK_OP_REQUEST, act[1], HOST_PORT)
                keys.append((act[1], HOST_PORT))
            elif kind == "guest_rw" and keys:
                gp, hp = keys[act[1] % len(keys)]
                op = act[4]
                g.send(op, gp, hp, act[2] if op == VIRTIO_VSOCK_OP_RW else b"", flags=act[3])
            elif kind == "reset":
                g.drv.remove()
                g.probe(fill=False)
                g.fill_rx(4)
            elif kind == "transport_reset":
                g.dev.transport_reset()
            g.loop.run_once(0)
            for p in _used_packets(g):
                check_packet(p, g.dev.guest_cid)
                if p.op == VIRTIO_VSOCK_OP_REQUEST:
                    requests.append(p)
        for _ in range(3):
            g.loop.run_once(0)
        for p in _used_packets(g):
            check_packet(p, g.dev.guest_cid)
        assert len(g.dev.muxer.connections) <= 1023
        # Still usable, unless the device declared itself broken (DEVICE_NEEDS_RESET).
        status = g.drv.status()
        event(f"guest packets delivered: {min(g.dev.metrics['rx_packets'], 5)}+")
        event(f"connections made: {min(g.dev.metrics['conns_added'], 3)}+")
        if g.dev.active and not status & spec.STATUS_DEVICE_NEEDS_RESET:
            _round_trip(g)
            event("still works afterwards")
        else:
            event("ended in DEVICE_NEEDS_RESET")
    finally:
        for s in clients + accepted + [listener]:
            s.close()
        g.close()
        uds_left = Path(g.uds).exists()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not uds_left
    assert fd_count() == fds_before


def _used_packets(g: VsockGuest) -> list[Packet]:
    """Used rx buffers, parsed; buffers the test posted itself may be of any shape."""
    out = []
    if not g.drv.rings:
        return out
    for _tok, ln, bufs in g.drv.used(0):
        data = b"".join(bufs)[:ln]
        if ln >= HDR_SIZE:
            out.append(Packet(*HDR.unpack_from(data), payload=data[HDR_SIZE:], used_len=ln))
        else:
            assert ln == 0
            out.append(Packet(0, 0, 0, 0, 0, 0, -1, 0, 0, 0, b"", ln))
    g.drv.used(2)
    return out


def _round_trip(g: VsockGuest) -> None:
    """A fresh host connection to a fresh guest port still works end to end."""
    g.inbox.clear()
    g.fill_rx()
    s = g.host_connect(9999)
    try:
        deadline = time.monotonic() + 5
        req = None
        while req is None:
            assert time.monotonic() < deadline, "no REQUEST for a fresh host connection"
            g.loop.run_once(0.002)
            for p in _used_packets(g):
                check_packet(p, g.dev.guest_cid)
                if p.op == VIRTIO_VSOCK_OP_REQUEST and p.dst_port == 9999:
                    req = p
            g.fill_rx()
        g.send(VIRTIO_VSOCK_OP_RESPONSE, 9999, req.src_port)
        ok = b"OK %d\n" % req.src_port
        assert g.host_read(s, len(ok)) == ok
    finally:
        s.close()


# -- flow control against models -----------------------------------------------------------------


@SETTINGS
@given(
    # Bounded so that an example needs at most a few hundred packets.
    window=st.integers(1, 200_000).flatmap(
        lambda b: st.tuples(st.just(b), st.integers(1, min(300_000, 40 * b)))),
    rx_sizes=st.lists(st.integers(HDR_SIZE + 512, HDR_SIZE + 9000), min_size=1, max_size=8),
    consume=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=8),
    ask=st.booleans(),
)
def test_host_to_guest_data_never_exceeds_the_guest_credit_and_arrives_in_order(
        window, rx_sizes, consume, ask):
    buf_alloc, total = window
    tmp = Path(tempfile.mkdtemp(prefix="vsc", dir="/tmp"))
    g = VsockGuest(tmp, queue_size=16, mem_size=MEM, loop=RaisingLoop(), fill=False)
    data = os.urandom(total)
    try:
        g.fill_rx(4)
        s, hp = _open(g, buf_alloc)
        received = bytearray()
        fwd = 0  # what the guest application consumed and advertised
        sent = 0
        step = 0
        deadline = time.monotonic() + 10
        while len(received) < total:
            assert time.monotonic() < deadline, f"stalled at {len(received)}/{total}"
            if sent < total:
                try:
                    sent += s.send(data[sent : sent + 65536])
                except BlockingIOError:
                    pass
            g.loop.run_once(0)
            for _tok, ln, bufs in g.drv.used(0):
                raw = b"".join(bufs)[:ln]
                p = Packet(*HDR.unpack_from(raw), payload=raw[HDR_SIZE:], used_len=ln)
                check_packet(p, GUEST_CID)
                if p.op == VIRTIO_VSOCK_OP_RW:
                    received += p.payload
                    # The device's bytes in flight never exceed what the guest allowed.
                    assert len(received) - fwd <= buf_alloc
                elif p.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST and ask:
                    g.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE, GUEST_PORT, hp, buf_alloc=buf_alloc,
                           fwd_cnt=fwd)
            # The application reads a random part of what arrived, then the guest tells the
            # device (Linux does it when its free space runs low; here: at random).
            share = consume[step % len(consume)]
            step += 1
            new_fwd = fwd + int((len(received) - fwd) * share)
            if new_fwd != fwd or len(received) - fwd == buf_alloc:
                fwd = max(new_fwd, fwd)
                if len(received) - fwd == buf_alloc:
                    fwd = len(received)  # never leave the window full for ever
                g.send(VIRTIO_VSOCK_OP_CREDIT_UPDATE, GUEST_PORT, hp, buf_alloc=buf_alloc,
                       fwd_cnt=fwd & 0xFFFF_FFFF)
            ring = g.drv.rings[0]
            for i in range(ring.num_free):  # refill, with buffers of assorted sizes
                g.drv.submit(0, writable=[rx_sizes[(step + i) % len(rx_sizes)]])
        assert bytes(received) == data
        s.close()
    finally:
        g.close()
        shutil.rmtree(tmp, ignore_errors=True)


@SETTINGS
@given(
    total=st.integers(1, 600_000),
    chunks=st.lists(st.integers(512, 65536), min_size=1, max_size=6),
    host_reads=st.lists(st.integers(4096, 100_000), min_size=1, max_size=6),
    honest=st.booleans(),
)
def test_guest_to_host_credit_is_honoured_and_a_guest_ignoring_it_is_reset(
        total, chunks, host_reads, honest):
    tmp = Path(tempfile.mkdtemp(prefix="vsg", dir="/tmp"))
    g = VsockGuest(tmp, queue_size=16, mem_size=MEM, loop=RaisingLoop(), fill=False)
    data = os.urandom(total)
    try:
        g.fill_rx()
        ls = g.listen(HOST_PORT)
        h = g.open_from_guest(ls, HOST_PORT, 40000)
        h.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer_buf, peer_fwd = CONN_BUF_ALLOC, 0  # the device's credit, as the guest knows it
        sent = 0
        got = bytearray()
        reset = False
        step = 0
        deadline = time.monotonic() + 10
        while len(got) < total and not reset:
            assert time.monotonic() < deadline, f"stalled: sent {sent}, host got {len(got)}"
            n = min(chunks[step % len(chunks)], total - sent)
            credit = peer_buf - (sent - peer_fwd)
            if honest:
                n = min(n, credit)
            if n > 0:
                g.send(VIRTIO_VSOCK_OP_RW, 40000, HOST_PORT, data[sent : sent + n])
                sent += n
            conn = g.dev.muxer.connections.get((HOST_PORT, 40000))
            if conn is not None:
                # Whatever the guest does, the device never buffers beyond its window.
                assert len(conn.tx_buf) <= CONN_BUF_ALLOC
            want = host_reads[step % len(host_reads)]
            step += 1
            if want:
                try:
                    got += h.recv(want)
                except BlockingIOError:
                    pass
            g.loop.run_once(0)
            for p in g.poll():
                check_packet(p, GUEST_CID)
                if p.op == VIRTIO_VSOCK_OP_RST:
                    reset = True
                peer_buf, peer_fwd = p.buf_alloc, p.fwd_cnt
        if honest:
            assert not reset, "a guest within its credit was reset"
            while len(got) < total:
                assert time.monotonic() < deadline, f"host got {len(got)} of {total}"
                g.loop.run_once(0.001)
                try:
                    got += h.recv(65536)
                except BlockingIOError:
                    pass
            assert bytes(got) == data
        else:
            # Either everything fitted (the host kept up) or the device reset the connection.
            assert reset or bytes(got) == data[: len(got)]
        h.close()
        ls.close()
    finally:
        g.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _open(g: VsockGuest, buf_alloc: int) -> tuple[socket.socket, int]:
    s = g.host_connect(GUEST_PORT)
    deadline = time.monotonic() + 5
    while True:
        assert time.monotonic() < deadline
        g.loop.run_once(0.001)
        reqs = [p for p in _used_packets(g) if p.op == VIRTIO_VSOCK_OP_REQUEST]
        if reqs:
            break
    hp = reqs[0].src_port
    g.send(VIRTIO_VSOCK_OP_RESPONSE, GUEST_PORT, hp, buf_alloc=buf_alloc)
    ok = b"OK %d\n" % hp
    got = b""
    while len(got) < len(ok):
        assert time.monotonic() < deadline
        try:
            got += s.recv(len(ok) - len(got))
        except BlockingIOError:
            g.loop.run_once(0.001)
    assert got == ok
    return s, hp
