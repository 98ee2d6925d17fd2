"""Packed virtqueue (virtio 1.2 §2.8): wrap counters, used descriptors, event suppression."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embervm.devices.virtio.queue import PackedQueue, QueueConfig, make_queue
from embervm.devices.virtio.spec import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
)
from embervm.errors import QueueError
from embervm.memory import GuestMemory
from embervm.testing.rings import (
    DriverPackedRing,
    GuestAllocator,
    check_traffic,
    driver_and_queue,
    ring_features,
)

MEM_SIZE = 1 << 20
TRAFFIC_MEM = GuestMemory([(0, 0x40000)])  # shared by hypothesis examples (no fixtures)
USED = struct.Struct("<IHH")  # len @8, id @12, flags @14 of a packed descriptor
PACKED = ring_features(packed=True)


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory([(0, MEM_SIZE)])


@pytest.fixture
def alloc(mem: GuestMemory) -> GuestAllocator:
    return GuestAllocator(mem, 0x1000, MEM_SIZE)


def packed(mem, alloc, size=8, **kw) -> tuple[DriverPackedRing, PackedQueue]:
    ring, q = driver_and_queue(mem, alloc, size, packed=True, **kw)
    assert isinstance(ring, DriverPackedRing) and isinstance(q, PackedQueue)
    return ring, q


def complete(q, n: int, written: int = 0) -> list:
    chains = []
    for _ in range(n):
        chain = q.pop()
        assert chain is not None
        q.add_used(chain, min(written, chain.writable_len))
        chains.append(chain)
    return chains


def used_desc(mem, ring, slot) -> tuple[int, int, int]:
    """(len, id, flags) of ring slot ``slot``."""
    return USED.unpack(mem.read(ring.desc_addr + 16 * slot + 8, 8))


def test_pop_returns_none_when_ring_is_empty(mem, alloc):
    _, q = packed(mem, alloc)
    assert q.pop() is None
    assert not q.has_available()
    assert q.next_avail == 0 | 1 << 15  # slot 0, wrap counter 1 (§2.8.1)


@pytest.mark.parametrize(
    ("flags", "available"),
    [
        (VIRTQ_DESC_F_AVAIL, True),  # AVAIL == wrap (1), USED != wrap
        (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED, False),  # a used descriptor of this lap
        (0, False),  # a used descriptor of the previous lap
        (VIRTQ_DESC_F_USED, False),  # available for the *next* lap
    ],
)
def test_descriptor_is_available_iff_avail_matches_and_used_differs(mem, alloc, flags, available):
    ring, q = packed(mem, alloc)
    mem.write(0x8000, b"data")
    ring.write_desc(0, 0x8000, 4, 7, flags)
    assert q.has_available() is available
    chain = q.pop()
    assert (chain is not None) is available


def test_buffer_id_is_the_id_of_the_last_descriptor(mem, alloc):
    ring, q = packed(mem, alloc)
    mem.write(0x8000, b"abc")
    mem.write(0x9000, b"def")
    avail = ring.avail_flags()
    ring.write_desc(1, 0x9000, 3, 42, avail | VIRTQ_DESC_F_WRITE)
    ring.write_desc(0, 0x8000, 3, 11, avail | VIRTQ_DESC_F_NEXT)
    chain = q.pop()
    assert chain.head == 42
    assert chain.ndesc == 2
    assert chain.readable == [(0x8000, 3)] and chain.writable == [(0x9000, 3)]


def test_used_descriptor_carries_id_len_and_wrap_flags(mem, alloc):
    ring, q = packed(mem, alloc, size=4)
    ring.add([b"r"], [8])
    chain = q.pop()
    q.add_used(chain, chain.writer().write(b"12345"))
    length, ident, flags = used_desc(mem, ring, 0)
    assert (length, ident) == (5, chain.head)
    assert flags == VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED | VIRTQ_DESC_F_WRITE
    ring.add([b"r"], [])
    chain = q.pop()
    q.add_used(chain, 0)
    assert used_desc(mem, ring, 2)[2] == VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED  # no WRITE
    assert [(t, n) for t, n, _ in ring.get_used()] == [(0, 5), (1, 0)]


def test_add_used_rejects_more_than_the_writable_length_packed(mem, alloc):
    ring, q = packed(mem, alloc)
    ring.add([b"x"], [2])
    chain = q.pop()
    with pytest.raises(ValueError):
        q.add_used(chain, 3)
    assert q.next_used == 0 | 1 << 15
    assert ring.get_used() == []


def test_used_descriptors_of_the_second_lap_clear_avail_and_used(mem, alloc):
    ring, q = packed(mem, alloc, size=2)
    for _ in range(2):
        ring.add([b"x"], [])
        complete(q, 1)
        ring.get_used()
    assert q.next_used == 0  # slot 0, wrap counter 0
    ring.add([b"y"], [1])
    complete(q, 1, written=1)
    assert used_desc(mem, ring, 0)[2] == VIRTQ_DESC_F_WRITE
    assert ring.get_used()[0][1] == 1


def test_used_index_advances_by_the_slots_the_chain_occupied(mem, alloc):
    ring, q = packed(mem, alloc, size=8)
    t1 = ring.add([b"a", b"b"], [1])  # three slots
    t2 = ring.add([b"c"], [])
    c1, c2 = q.pop(), q.pop()
    assert (c1.ndesc, c2.ndesc) == (3, 1)
    q.add_used(c2, 0)  # out of order: written at slot 0, advance by 1
    q.add_used(c1, 1)  # written at slot 1, advance by 3
    assert q.next_used == 4 | 1 << 15
    assert [t for t, _, _ in ring.get_used()] == [t2, t1]


def test_chain_wrapping_past_the_ring_end_flips_the_wrap_counter(mem, alloc):
    ring, q = packed(mem, alloc, size=5)
    for _ in range(3):
        ring.add([b"."], [])
    complete(q, 3)
    ring.get_used()
    token = ring.add([b"one", b"two"], [3])  # slots 3, 4, 0
    chain = q.pop()
    assert chain.head == token and chain.ndesc == 3
    assert chain.reader().read() == b"onetwo"
    assert q.next_avail == 1  # slot 1, wrap counter 0
    q.add_used(chain, chain.writer().write(b"xyz"))
    assert q.next_used == 1
    assert ring.get_used() == [(token, 3, [b"xyz"])]


def test_many_laps_of_a_small_odd_sized_ring_packed(mem, alloc):
    # ≥ 70000 requests through a 5-slot ring; chains of 1..3 slots wrap at every position.
    ring, q = packed(mem, alloc, size=5)
    for i in range(70_000):
        nread = i % 3
        payload = [i.to_bytes(3, "little")] * nread
        token = ring.add(payload, [2])
        chain = q.pop()
        assert chain is not None and chain.head == token, f"request {i}"
        assert chain.ndesc == nread + 1
        assert chain.reader().read() == b"".join(payload)
        q.add_used(chain, chain.writer().write(b"ok"))
        assert ring.get_used() == [(token, 2, [b"ok"])]
        assert q.pop() is None
    assert q.next_avail == ring.avail_idx
    assert q.next_used == ring.used_idx


def test_indirect_chain_occupies_one_slot_with_sequential_entries(mem, alloc):
    ring, q = packed(mem, alloc, size=4, indirect=True)
    token = ring.add([b"in", b"direct"], [3, 1], indirect=True)
    assert ring.num_free == 3
    chain = q.pop()
    assert (chain.head, chain.ndesc) == (token, 1)
    assert chain.reader().read() == b"indirect"
    q.add_used(chain, chain.writer().write(b"abcd"))
    assert q.next_used == 1 | 1 << 15
    assert ring.get_used() == [(token, 4, [b"abc", b"d"])]


def test_direct_descriptors_followed_by_an_indirect_one_are_accepted_packed(mem, alloc):
    ring, q = packed(mem, alloc, indirect=True)
    mem.write(0x8000, b"direct")
    mem.write(0x9000, b"table")
    table = 0xA000
    # Entries are sequential: NEXT inside the table means nothing for packed rings.
    mem.write(table, struct.pack("<QIHH", 0x9000, 5, 0, VIRTQ_DESC_F_NEXT))
    mem.write(table + 16, struct.pack("<QIHH", 0xB000, 2, 0, VIRTQ_DESC_F_WRITE))
    avail = ring.avail_flags()
    ring.write_desc(1, table, 32, 9, avail | 4)  # INDIRECT
    ring.write_desc(0, 0x8000, 6, 9, avail | VIRTQ_DESC_F_NEXT)
    chain = q.pop()
    assert (chain.head, chain.ndesc) == (9, 2)
    assert chain.reader().read() == b"directtable"
    assert chain.writable == [(0xB000, 2)]


# -- used-buffer notifications (device → driver) ------------------------------------------------


def test_driver_event_flags_disable_and_enable_interrupts(mem, alloc):
    ring, q = packed(mem, alloc)
    ring.add([b"a"], [])
    complete(q, 1)
    assert q.needs_interrupt() is True  # ENABLE (0) at reset
    ring.set_no_interrupt(True)
    ring.add([b"b"], [])
    complete(q, 1)
    assert q.needs_interrupt() is False
    ring.set_no_interrupt(False)
    ring.add([b"c"], [])
    complete(q, 1)
    assert q.needs_interrupt() is True
    assert q.needs_interrupt() is False  # nothing new since


def test_desc_mode_without_event_idx_interrupts_every_time(mem, alloc):
    ring, q = packed(mem, alloc)
    ring.set_event(RING_EVENT_FLAGS_DESC, 100 | 1 << 15)
    ring.add([b"a"], [])
    complete(q, 1)
    assert q.needs_interrupt() is True


@pytest.mark.parametrize(
    ("off_wrap", "expected"),
    [(5 | 1 << 15, True), (10 | 1 << 15, False), (4 | 1 << 15, True), (7 | 1 << 15, False)],
)
def test_event_idx_desc_mode_worked_example(mem, alloc, off_wrap, expected):
    # virtio.md §4.4 numbers on the packed ring: used position 4 → 7 (same lap).
    ring, q = packed(mem, alloc, size=16, event_idx=True)
    ring.set_used_event(0 | 1 << 15)
    for _ in range(4):
        ring.add([b"x"], [])
    complete(q, 4)
    q.needs_interrupt()  # decision point: old = 4
    ring.get_used()
    for _ in range(3):
        ring.add([b"x"], [])
    complete(q, 3)
    ring.set_used_event(off_wrap)
    assert q.needs_interrupt() is expected


@pytest.mark.parametrize(
    ("off_wrap", "expected"),
    [
        (7 | 1 << 15, True),  # last slot of the previous lap
        (6 | 1 << 15, True),  # first entry of the batch
        (1 | 0 << 15, True),  # last entry of the batch, new lap
        (2 | 0 << 15, False),  # the next position: not reached yet
        (5 | 1 << 15, False),  # before the batch
        (6 | 0 << 15, False),  # a whole lap ahead
    ],
)
def test_event_idx_desc_mode_across_a_lap(mem, alloc, off_wrap, expected):
    # Used position 6 (wrap 1) → 2 (wrap 0): the wrap version of the §4.4 example.
    ring, q = packed(mem, alloc, size=8, event_idx=True)
    for _ in range(6):
        ring.add([b"x"], [])
    complete(q, 6)
    q.needs_interrupt()
    ring.get_used()
    for _ in range(4):
        ring.add([b"x"], [])
    complete(q, 4)
    assert q.next_used == 2
    ring.set_used_event(off_wrap)
    assert q.needs_interrupt() is expected


def advance(off_wrap: int, n: int, size: int) -> int:
    """The ring position ``n`` slots after ``off_wrap`` (``off | wrap << 15``)."""
    off, wrap = (off_wrap & 0x7FFF) + n, off_wrap >> 15
    while off >= size:
        off -= size
        wrap ^= 1
    return off | wrap << 15


def test_event_idx_linux_style_reenable_interrupts_every_batch_packed(mem, alloc):
    # Linux virtqueue_enable_cb_prepare_packed: off_wrap = last_used | wrap << 15, flags = DESC:
    # every batch interrupts.  Every fourth batch the driver asks for the position one past
    # the batch instead (virtqueue_enable_cb_delayed style): that batch must stay quiet.
    ring, q = packed(mem, alloc, size=7, event_idx=True)
    for i in range(20_000 // 3):
        quiet = i % 4 == 0
        ring.set_used_event(advance(ring.used_idx, 4, 7) if quiet else ring.used_idx)
        for _ in range(3):
            ring.add([], [1])  # one slot each
        complete(q, 3, written=1)
        assert q.needs_interrupt() is not quiet, f"batch {i} at {q.next_used:#x}"
        assert len(ring.get_used()) == 3


# -- available-buffer notifications (driver → device) -------------------------------------------


def test_device_event_disable_suppresses_kicks(mem, alloc):
    ring, q = packed(mem, alloc)
    ring.add([b"a"], [])
    assert ring.kick_needed() is True
    q.disable_notifications()
    assert mem.read_u16(ring.device_addr + 2) == RING_EVENT_FLAGS_DISABLE
    ring.add([b"b"], [])
    assert ring.kick_needed() is False
    assert q.enable_notifications() is True  # buffers are waiting
    assert mem.read_u16(ring.device_addr + 2) == RING_EVENT_FLAGS_ENABLE
    ring.add([b"c"], [])
    assert ring.kick_needed() is True


def test_event_idx_device_event_asks_for_exactly_one_kick(mem, alloc):
    ring, q = packed(mem, alloc, size=4, event_idx=True)
    for _ in range(3):
        ring.add([b"x"], [])
    complete(q, 3)
    ring.get_used()
    assert q.enable_notifications() is False
    assert (mem.read_u16(ring.device_addr), mem.read_u16(ring.device_addr + 2)) == (
        3 | 1 << 15,
        RING_EVENT_FLAGS_DESC,
    )
    ring.kick_needed()
    ring.add([b"a", b"b"], [])  # slots 3, 0: crosses the wrap
    assert ring.kick_needed() is True
    ring.add([b"c"], [])
    assert ring.kick_needed() is False  # the device has not asked again


def test_enable_notifications_reports_buffers_added_while_disabled_packed(mem, alloc):
    for event_idx in (False, True):
        ring, q = packed(mem, alloc, event_idx=event_idx)
        q.disable_notifications()
        ring.add([b"late"], [])
        assert q.enable_notifications() is True
        assert q.pop() is not None
        assert q.enable_notifications() is False


# -- activation ----------------------------------------------------------------------------------


def _cfg(size=5, desc=0x1000, driver=0x2000, device=0x3000) -> QueueConfig:
    cfg = QueueConfig(256)
    cfg.size, cfg.desc_addr, cfg.driver_addr, cfg.device_addr = size, desc, driver, device
    return cfg


def test_make_queue_builds_packed_rings_of_any_size(mem):
    q = make_queue(1, _cfg(size=5), mem, PACKED)
    assert isinstance(q, PackedQueue) and q.size == 5
    assert "PackedQueue(index=1" in repr(q)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (_cfg(size=0), "size is 0"),
        (_cfg(size=300), "exceeds QueueNumMax"),
        (_cfg(desc=0x1004), "16-byte aligned"),
        (_cfg(driver=0x2002), "driver event area"),
        (_cfg(device=0x3001), "device event area"),
        (_cfg(desc=MEM_SIZE - 64), "descriptor ring"),
        (_cfg(driver=MEM_SIZE), "driver event suppression"),
        (_cfg(device=0xC000_0000), "device event suppression"),
    ],
)
def test_make_queue_rejects_invalid_packed_registers(mem, cfg, message):
    with pytest.raises(QueueError, match=message):
        make_queue(0, cfg, mem, PACKED)


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 0xFFFF)), max_size=120),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    size=st.sampled_from([1, 2, 4, 16]),
)
def test_random_valid_traffic_is_delivered_once_without_lost_notifications_packed(
    ops, event_idx, indirect, size
):
    mem = TRAFFIC_MEM
    ring, q = driver_and_queue(
        mem,
        GuestAllocator(mem, 0, 0x40000),
        size,
        packed=True,
        event_idx=event_idx,
        indirect=indirect,
    )
    check_traffic(ring, q, ops)


def test_traffic_model_catches_a_lost_interrupt_packed(mem, alloc, monkeypatch):
    # The property checker itself must fail on a device that never interrupts.
    ring, q = driver_and_queue(mem, alloc, 4, packed=True, event_idx=True)
    monkeypatch.setattr(type(q), "needs_interrupt", lambda self: False)
    with pytest.raises(AssertionError, match="never interrupted"):
        check_traffic(ring, q, [(0, 0), (1, 0), (2, 0), (3, 0)])


def test_traffic_model_catches_a_lost_kick_packed(mem, alloc, monkeypatch):
    ring, q = driver_and_queue(mem, alloc, 4, packed=True)
    monkeypatch.setattr(type(ring), "kick_needed", lambda self: False)
    with pytest.raises(AssertionError, match="kick lost"):
        check_traffic(ring, q, [(0, 0)])
