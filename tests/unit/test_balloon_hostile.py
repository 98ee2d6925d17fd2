"""virtio-balloon against a hostile driver (hypothesis).

PFN buffers of any content and shape (garbage PFNs, trailing bytes, buffers split anywhere,
writable parts, indirect tables, split and packed rings) are checked against a model of §5.5.6:
exactly the valid PFNs of inflate buffers are released, deflate releases nothing, every buffer
comes back with used.len 0 and the device stays live.  Stats buffers of any content are parsed
as the model says.  Descriptors scribbled over after submission, arbitrary config writes and
arbitrary control words must never raise out of the device: the outcome is a state change, an
error reply or DEVICE_NEEDS_RESET, and the device works again after the driver resets it.
"""

from __future__ import annotations

import json
import struct
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embervm.devices.virtio import balloon as balloonmod
from embervm.devices.virtio import spec
from embervm.devices.virtio.balloon import Balloon
from embervm.devices.virtio.mmio import MmioTransport
from embervm.memory import GuestMemory
from embervm.testing.driver import LINUX_TRANSPORT_FEATURES, MmioDriver

RING_SIZE = 1 << 20
RING_PAGES = RING_SIZE >> 12
DATA_BASE = 0x40_0000
DATA_PAGES = 64
DATA_PFN = DATA_BASE >> 12
PATTERN = 0x5A
INFLATE, DEFLATE, STATS = 0, 1, 2
PACKED = spec.bit(spec.VIRTIO_F_RING_PACKED)
SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class Rig:
    def __init__(self, packed: bool = False) -> None:
        self.mem = GuestMemory([(0, RING_SIZE), (DATA_BASE, DATA_PAGES << 12)])
        self.mem.fill(DATA_BASE, DATA_PAGES << 12, PATTERN)
        self.dev = Balloon(0)
        self.transport = MmioTransport(self.dev, self.mem, packed=packed)
        self.drv = MmioDriver(self.transport, self.mem)
        accept = ((1 << 24) - 1) | LINUX_TRANSPORT_FEATURES
        if not packed:
            accept &= ~PACKED
        self.accept = accept
        self.drv.probe(accept=accept)

    def released_pages(self) -> set[int]:
        out = set()
        for i in range(DATA_PAGES):
            page = self.mem.read(DATA_BASE + (i << 12), 4096)
            if page == bytes(4096):
                out.add(DATA_PFN + i)
            else:
                assert page == bytes([PATTERN]) * 4096, f"page {i} corrupted"
        return out

    def needs_reset(self) -> bool:
        return bool(self.transport.status & spec.STATUS_DEVICE_NEEDS_RESET)


# -- strategies ----------------------------------------------------------------------------------

pfn_values = st.one_of(
    st.integers(DATA_PFN, DATA_PFN + DATA_PAGES - 1),  # valid
    st.integers(DATA_PFN - 3, DATA_PFN + DATA_PAGES + 3),  # at the edges of the data region
    st.integers(RING_PAGES, DATA_PFN - 1),  # the hole between the regions
    st.sampled_from([0xFFFF_FFFF, 0x8000_0000, 0x10_0000, DATA_PFN + DATA_PAGES]),
    # anything except the ring region: discarding the driver's own rings is the guest's
    # problem, and tested separately below (no exception escapes), not against the model
    st.integers(RING_PAGES, 2**32 - 1),
)


def cut(draw, data: bytes, max_cuts: int = 4) -> list[bytes]:
    """Split ``data`` at arbitrary points (zero-length pieces included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=max_cuts)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@st.composite
def pfn_request(draw) -> tuple[int, list[bytes], list[int], bool, list[int], bytes]:
    queue = draw(st.sampled_from([INFLATE, DEFLATE]))
    values = draw(st.lists(pfn_values, max_size=24))
    stream = struct.pack(f"<{len(values)}I", *values) + draw(st.binary(max_size=3))
    readable = cut(draw, stream)
    writable = draw(st.one_of(st.just([]), st.lists(st.integers(0, 64), max_size=2)))
    if not any(readable) and not writable and draw(st.booleans()):
        readable = []
    if not readable and not writable:
        writable = [0]
    return queue, readable, writable, draw(st.booleans()), values, stream


def model_release(stream: bytes, max_pfns: int) -> tuple[set[int], int]:
    """(valid data-region pages an inflate of ``stream`` releases, PFNs outside RAM)."""
    n = min(len(stream) // 4, max_pfns)
    pfns = set(struct.unpack_from(f"<{n}I", stream))
    valid = {p for p in pfns if DATA_PFN <= p < DATA_PFN + DATA_PAGES}
    ring = {p for p in pfns if p < RING_PAGES}
    return valid, len(pfns) - len(valid) - len(ring)


# -- properties ----------------------------------------------------------------------------------


@SETTINGS
@given(st.lists(pfn_request(), min_size=1, max_size=4), st.booleans(),
       st.sampled_from([3, 16, balloonmod.MAX_PFNS]))
def test_pfn_buffers_of_any_shape_release_exactly_the_valid_inflated_pages(reqs, packed,
                                                                           max_pfns):
    rig = Rig(packed)
    expect: set[int] = set()
    bad = 0
    with mock.patch.object(balloonmod, "MAX_PFNS", max_pfns):
        for queue, readable, writable, indirect, _values, stream in reqs:
            rig.drv.submit(queue, readable=readable, writable=writable, indirect=indirect)
            used = rig.drv.used(queue)
            assert [length for _tok, length, _ in used] == [0]
            valid, outside = model_release(stream, max_pfns)
            if queue == INFLATE:
                expect |= valid
            bad += outside
    assert not rig.needs_reset() and rig.dev.active
    assert rig.released_pages() == expect
    assert rig.dev.metrics["bad_pfns"] == bad


@SETTINGS
@given(st.lists(st.one_of(st.binary(max_size=100),
                          st.binary(min_size=10 * balloonmod.MAX_STATS - 20,
                                    max_size=10 * balloonmod.MAX_STATS + 40)),
                min_size=1, max_size=3), st.data())
def test_stats_buffers_of_any_content_are_parsed_as_whole_entries(posts, data):
    rig = Rig()
    for raw in posts:
        readable = cut(data.draw, raw) or [b""]
        writable = data.draw(st.one_of(st.just([]), st.lists(st.integers(0, 16), max_size=2)))
        if not any(readable) and not writable:
            writable = [1]
        rig.drv.submit(STATS, readable=readable, writable=writable)
    # Each post after the first hands the previous buffer back, unused.
    used = rig.drv.used(STATS)
    assert [length for _tok, length, _ in used] == [0] * (len(posts) - 1)
    last = posts[-1]
    n = min(len(last) // 10, balloonmod.MAX_STATS)
    expect = {}
    for k in range(n):
        tag, val = struct.unpack_from("<HQ", last, 10 * k)
        expect[tag] = val
    assert rig.dev.stats == expect
    status = rig.dev.status()
    json.dumps(status)  # whatever the guest sent, the status stays JSON
    assert len(status["stats"]) == len(expect)
    assert rig.dev.active and not rig.needs_reset()


@SETTINGS
@given(
    st.sampled_from([INFLATE, DEFLATE, STATS]),
    st.integers(0, 2**64 - 1),  # addr
    st.integers(0, 2**32 - 1),  # len
    st.integers(0, 0xFFFF),  # flags
    st.integers(0, 0xFFFF),  # next
    st.one_of(st.none(), st.integers(0, 0xFFFF)),  # avail.idx scribble
    st.sampled_from([0, 0x1000, 0x3000, DATA_BASE, DATA_BASE + 0xFFC, 2**32 - 4]),
)
def test_scribbled_descriptors_never_raise_and_reset_recovers(queue, addr, ln, flags, nxt, idx,
                                                              near):
    rig = Rig()
    ring = rig.drv.rings[queue]
    token = rig.drv.submit(queue, readable=[struct.pack("<2I", DATA_PFN, DATA_PFN + 1)],
                           kick=False)
    # Either a wild descriptor or one pointing near interesting places (rings, data, the end).
    ring.write_desc(token, addr if addr & 1 else near, ln & 0xFFFF if ln & 1 else ln, flags, nxt)
    if idx is not None:
        ring.set_avail_idx(idx)
    rig.drv.kick(queue)  # inline processing: an escaping exception fails the test here
    assert rig.dev.active != rig.needs_reset()
    # Whatever happened, the driver can reset and use the device again.
    rig.drv.remove()
    rig.drv.probe(accept=rig.accept)
    assert rig.dev.active
    rig.drv.submit(INFLATE, readable=[struct.pack("<I", DATA_PFN + 5)])
    assert [length for _tok, length, _ in rig.drv.used(INFLATE)] == [0]


@SETTINGS
@given(st.lists(st.integers(0, 2**32 - 1), max_size=32))
def test_pfns_anywhere_in_ram_including_the_rings_never_raise(values):
    rig = Rig()
    rig.drv.submit(INFLATE, readable=[struct.pack(f"<{len(values)}I", *values)], kick=False)
    rig.drv.kick(INFLATE)
    # Discarding its own rings is the guest's problem: the device is live or needs a reset.
    assert rig.dev.active != rig.needs_reset()


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 24), st.sampled_from([1, 2, 4, 8]),
                          st.integers(0, 2**64 - 1)), max_size=12))
def test_config_writes_never_change_num_pages_or_raise(writes):
    rig = Rig()
    rig.dev.set_target_mib(0)
    for offset, size, value in writes:
        rig.transport.write(spec.CONFIG + offset, size, value)
        rig.transport.read(spec.CONFIG + offset, size)
    assert rig.dev.target_pages == 0
    assert 0 <= rig.dev.actual_pages < 2**32


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(["set", "status", "stats", "0", "1", "64", "-1"]),
                          st.text(max_size=12)), max_size=4))
def test_control_words_give_a_json_result_or_a_value_error(words):
    rig = Rig()
    handler = rig.dev.control_commands()["balloon"]
    try:
        result = handler(words)
    except ValueError as e:
        assert str(e)
    else:
        json.dumps(result)
        assert rig.dev.target_pages in (0, 256)  # with 1.25 MiB of RAM only 0 or 1 MiB fit
