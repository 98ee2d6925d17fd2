"""virtio-net against a hostile driver and a hostile host network (hypothesis).

Transmit chains with arbitrary headers, lengths, descriptor splits and writable parts; receive
chains of arbitrary shapes (readable parts, zero-length and tiny buffers, tiny rings) fed with
arbitrary frames from the TAP side; arbitrary accepted feature sets; scribbled descriptors and
rings.  What must hold every time: no exception leaves the device or an event-loop callback,
every chain comes back (``used.len`` within the chain's writable bytes), the frames that pass
are exactly the ones the spec model (§5.1.6) lets through, byte for byte and in order, and a
broken ring ends in DEVICE_NEEDS_RESET rather than a host error.
"""

from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_net import (
    ALL_TUN,
    GUEST_OFFLOADS,
    LINUX,
    MRG,
    PACKED,
    Guest,
    frame,
    pattern,
    vhdr,
)

from embervm.devices.virtio import net as netmod
from embervm.devices.virtio import spec
from embervm.devices.virtio.net import (
    MAX_FRAME,
    RXQ,
    TXQ,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
)
from embervm.testing.driver import DriverError

HOST_OFFLOADS = (spec.bit(VIRTIO_NET_F_CSUM) | spec.bit(VIRTIO_NET_F_HOST_TSO4)
                 | spec.bit(VIRTIO_NET_F_HOST_TSO6) | spec.bit(VIRTIO_NET_F_HOST_ECN)
                 | spec.bit(VIRTIO_NET_F_HOST_UFO))
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEM = 8 << 20


@pytest.fixture(autouse=True)
def no_loop_callback_failures(caplog):
    """An exception escaping a loop callback is only logged by the loop: make it a failure."""
    caplog.set_level(logging.ERROR, logger="embervm.eventloop")
    yield
    failed = [r for r in caplog.records if r.name == "embervm.eventloop"]
    assert not failed, failed[0].getMessage()


def needs_reset(g: Guest) -> bool:
    return bool(g.drv.status() & spec.STATUS_DEVICE_NEEDS_RESET)


# -- the spec model --------------------------------------------------------------------------------


def tx_passes(packet: bytes, host_features: int) -> bool:
    """§5.1.6.2: does a driver's header + frame go to the network?"""
    if len(packet) < 12 + 14 or len(packet) > 12 + MAX_FRAME:
        return False
    flags, gso, _hl, gso_size, cstart, coff, _nb = struct.unpack_from("<BBHHHHH", packet)
    has = lambda bit: bool(host_features >> bit & 1)  # noqa: E731
    if flags & ~1:
        return False
    if flags & 1 and (not has(VIRTIO_NET_F_CSUM) or cstart + coff + 2 > len(packet) - 12):
        return False
    if gso == 0:
        return True
    need = {1: VIRTIO_NET_F_HOST_TSO4, 4: VIRTIO_NET_F_HOST_TSO6, 3: VIRTIO_NET_F_HOST_UFO}
    base = gso & 0x7F
    if base not in need or not has(need[base]):
        return False
    if gso & 0x80 and not has(VIRTIO_NET_F_HOST_ECN):
        return False
    return bool(flags & 1) and gso_size > 0


def rx_result(packet: bytes, guest_offloads: bool) -> bytes | None:
    """§5.1.6.3 (+ what the guest accepted): the header + frame the guest gets, or None."""
    if len(packet) < 12 + 14 or len(packet) > 12 + MAX_FRAME:
        return None
    flags, gso = packet[0], packet[1]
    if not guest_offloads:
        if flags & 1 or gso:
            return None
        flags &= ~2  # DATA_VALID only with GUEST_CSUM
    elif gso and (gso & 0x7F) not in (1, 3, 4):
        return None
    return bytes([flags]) + packet[1:]


# -- strategies ------------------------------------------------------------------------------------

# Headers a driver may send (§5.1.6.2), and anything at all; the first kind twice as often, so
# that frames pass as well as fail.
valid_headers = st.one_of(
    st.just(vhdr()),
    st.builds(lambda start, off: vhdr(1, 0, 0, 0, start, off),
              st.sampled_from([14, 34]), st.sampled_from([6, 16])),
    st.builds(lambda gso: vhdr(1, gso, 66, 1448, 34, 16), st.sampled_from([1, 3, 4, 0x81])),
)
any_headers = st.builds(
    vhdr,
    flags=st.sampled_from([0, 1, 2, 3, 4, 0x80]),
    gso=st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x7F, 0xFF]),
    hdr_len=st.integers(0, 0xFFFF),
    gso_size=st.sampled_from([0, 1, 536, 1448, 0xFFFF]),
    csum_start=st.sampled_from([0, 14, 34, 1000, 0xFFFF]),
    csum_offset=st.sampled_from([0, 6, 16, 0xFFFF]),
    num_buffers=st.integers(0, 0xFFFF),
)
headers = st.one_of(valid_headers, valid_headers, any_headers)
bodies = st.one_of(
    st.integers(14, 1600).map(pattern),
    st.integers(14, 1600).map(pattern),
    st.integers(0, 40).map(lambda n: bytes(n)),
    st.sampled_from([3000, 9000, 65000, MAX_FRAME - 1, MAX_FRAME, MAX_FRAME + 1]).map(pattern),
)
packets = st.one_of(st.builds(lambda h, b: h + b, headers, bodies), st.binary(max_size=30))
# What the host kernel sends is mostly plain frames; a TAP never reads 0 bytes (on the socket
# pair standing in for it, 0 bytes means "closed").
plain = st.builds(lambda b: vhdr() + b, st.integers(14, 1514).map(pattern))
incoming_packets = st.one_of(plain, plain, packets.filter(len))


@st.composite
def tx_chains(draw):
    """(packet, descriptor cut points, writable sizes) for one transmit chain."""
    packet = draw(packets)
    cuts = sorted(draw(st.lists(st.integers(0, len(packet)), max_size=4)))
    wrong_direction = draw(st.integers(0, 3)) == 0
    writable = draw(st.lists(st.integers(0, 64), min_size=1, max_size=2)) if wrong_direction else []
    return packet, cuts, writable


# -- transmit ------------------------------------------------------------------------------------


@SETTINGS
@given(chains=st.lists(tx_chains(), min_size=1, max_size=12),
       host=st.sampled_from([LINUX, LINUX & ~HOST_OFFLOADS]),
       packed=st.booleans(), indirect=st.booleans())
def test_transmit_sends_exactly_what_the_model_allows_and_returns_every_chain(
        chains, host, packed, indirect):
    g = Guest(accept=host | (PACKED if packed else 0), packed=packed, mem_size=MEM)
    try:
        expected = []
        for packet, cuts, writable in chains:
            bounds = [0, *cuts, len(packet)]
            readable = [packet[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
            g.drv.submit(TXQ, readable=readable, writable=writable, indirect=indirect)
            # Zero-length descriptors are legal and skipped (virtio.md §4.6): what makes a
            # transmit chain wrong is writable *bytes*.
            if not sum(writable) and tx_passes(packet, host):
                expected.append(packet)
        g.pump()
        assert g.tap.received() == expected
        used = g.drv.used(TXQ)
        assert len(used) == len(chains) and all(ln == 0 for _t, ln, _b in used)
        m = g.dev.metrics
        assert m["tx_frames"] == len(expected)
        assert m["tx_dropped"] == len(chains) - len(expected)
        assert not needs_reset(g)
    finally:
        g.close()


# -- receive --------------------------------------------------------------------------------------

rx_buffers = st.one_of(
    st.tuples(st.just([]), st.sampled_from([[1526], [4096], [1526], [12, 1514], [70000]])),
    st.tuples(st.just([]), st.lists(st.sampled_from([0, 1, 11, 12, 40, 1526, 4096, 70000]),
                                    min_size=1, max_size=3)),
    st.tuples(st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=2),
              st.lists(st.integers(0, 2000), max_size=2)),
)


def reassemble(used: list[tuple[int, int, list[bytes]]], mrg: bool) -> tuple[list[bytes], int]:
    """Frames as the driver rebuilds them from used buffers (num_buffers), and unused returns."""
    frames, empty, i = [], 0, 0
    while i < len(used):
        _tok, ln, bufs = used[i]
        data = b"".join(bufs)[:ln]
        i += 1
        if ln == 0:
            empty += 1
            continue
        assert ln >= 12, used[i - 1]
        count = struct.unpack_from("<H", data, 10)[0]
        assert count >= 1 and (mrg or count == 1), count
        for _ in range(count - 1):
            _tok, ln, bufs = used[i]
            assert ln > 0
            data += b"".join(bufs)[:ln]
            i += 1
        frames.append(data[:10] + data[12:])
    return frames, empty


@SETTINGS
@example(buffers=[([], [1526])] * 8, incoming=[vhdr() + pattern(9000)], accept=LINUX,
         small_ring=False)
@example(buffers=[([], [1526])] * 8, incoming=[vhdr() + pattern(65000)], accept=LINUX,
         small_ring=True)  # the whole ring is too small: dropped, not stuck
@example(buffers=[([b"r"], [1526]), ([], [11]), ([], [1526])] * 3,
         incoming=[vhdr() + pattern(3000)] * 2, accept=LINUX, small_ring=False)
@given(buffers=st.lists(rx_buffers, min_size=1, max_size=16),
       incoming=st.lists(incoming_packets, min_size=1, max_size=8),
       accept=st.sampled_from([LINUX, LINUX & ~MRG, LINUX & ~GUEST_OFFLOADS,
                               LINUX & ~GUEST_OFFLOADS & ~MRG]),
       small_ring=st.booleans())
def test_receive_delivers_model_frames_in_order_and_returns_unusable_buffers(
        buffers, incoming, accept, small_ring):
    size = 8 if small_ring else 64
    g = Guest(accept=accept, queue_sizes=[size, size], mem_size=MEM)
    try:
        mrg = bool(accept & MRG)
        offloads = bool(accept & GUEST_OFFLOADS)
        for packet in incoming:
            g.tap.send(packet)
        for readable, writable in buffers[:size]:
            g.drv.submit(RXQ, readable=readable, writable=writable)
        g.pump(40)
        used = g.drv.used(RXQ)
        for _tok, ln, bufs in used:
            assert 0 <= ln <= sum(len(b) for b in bufs)
        got, _empty = reassemble(used, mrg)
        wanted = [r[:10] + r[12:] for p in incoming if (r := rx_result(p, offloads)) is not None]
        # Delivered frames are model frames, whole and in order (some may be dropped because
        # no posted buffer could hold them, or still wait for buffers).
        it = iter(wanted)
        assert all(any(f == w for w in it) for f in got), (got, wanted)
        m = g.dev.metrics
        assert m["rx_frames"] == len(got)
        assert not needs_reset(g)
        # The device is still usable after a reset: with what the TAP still queues thrown
        # away, a plain frame reaches fresh buffers.
        g.drv.remove()
        g.tap.discard_queued()
        g.drv.probe(accept=accept, queue_sizes=[size, size])
        g.tap.send(vhdr() + frame(b"canary"))
        g.post_rx(2, 70000)
        g.pump()
        got, _ = reassemble(g.drv.used(RXQ), mrg)
        assert [f[10:] for f in got] == [frame(b"canary")], got
    finally:
        g.close()


# -- negotiation, config, rings -------------------------------------------------------------------


@SETTINGS
@given(bits=st.sets(st.sampled_from([0, 1, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 28, 29])))
def test_any_feature_set_is_refused_or_works_with_matching_tap_offloads(bits):
    exact = spec.bit(spec.VIRTIO_F_VERSION_1)
    for b in bits:
        exact |= spec.bit(b)
    try:
        g = Guest(exact=exact, mem_size=MEM)
    except DriverError:
        return  # refused at FEATURES_OK: a dependency of §5.1.3.1 was missing
    try:
        assert g.dev.validate_features(exact) is None
        expected = 0
        if 1 in bits:
            expected = sum(flag for bit, flag in netmod._GUEST_TO_TUN if bit in bits)
        assert g.tap.offload == expected & ALL_TUN
        g.post_rx(2, 70000)
        g.send(vhdr() + frame(b"ping"))
        g.tap.send(vhdr() + frame(b"pong"))
        g.pump()
        assert g.tap.received() == [vhdr() + frame(b"ping")]
        assert g.rx()[0][1].endswith(b"pong")
    finally:
        g.close()


@settings(max_examples=100, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, 0x40), st.sampled_from([1, 2, 4]),
                                 st.integers(0, 0xFFFF_FFFF)), max_size=20))
def test_config_writes_change_nothing(writes):
    g = Guest(mem_size=MEM)
    try:
        before = bytes(g.drv.read_config_bytes(0, 8))
        for off, size, value in writes:
            g.drv.write_config(off, size, value)
        assert bytes(g.drv.read_config_bytes(0, 8)) == before
    finally:
        g.close()


@SETTINGS
@given(queue=st.sampled_from([RXQ, TXQ]),
       scribbles=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 2**64 - 1),
                                    st.integers(0, 2**32 - 1), st.integers(0, 0xFFFF),
                                    st.integers(0, 0xFFFF)), min_size=1, max_size=8),
       avail_jump=st.sampled_from([0, 0, 1, 9, 300, 0x8000]))
def test_scribbled_descriptors_and_rings_end_in_skipped_chains_or_needs_reset(
        queue, scribbles, avail_jump):
    g = Guest(queue_sizes=[8, 8], mem_size=MEM)
    try:
        ring = g.drv.rings[queue]
        for i in range(4):
            if queue == RXQ:
                g.drv.submit(RXQ, writable=[1526], kick=False)
            else:
                g.drv.submit(TXQ, readable=[vhdr() + frame(pattern(60, i))], kick=False)
        for index, addr, length, flags, nxt in scribbles:
            ring.write_desc(index, addr, length, flags & 0x7, nxt)
        if avail_jump:
            ring.set_avail_idx((ring.avail_idx + avail_jump) & 0xFFFF)
        g.tap.send(vhdr() + frame(b"incoming"))
        g.drv.kick(queue)
        g.pump()
        if not needs_reset(g):
            # Whatever was returned stays within the ring's bounds and the status is clean.
            assert g.dev.active
        else:
            assert not g.dev.active and not g.reading
        # Either way the driver can reset and use the device again.
        g.drv.remove()
        g.drv.probe(accept=LINUX, queue_sizes=[8, 8])
        g.post_rx(2)
        g.pump()
        g.send(vhdr() + frame(b"after"))
        assert vhdr() + frame(b"after") in g.tap.received()
    finally:
        g.close()
