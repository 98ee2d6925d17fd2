"""Split virtqueue (virtio 1.2 §2.7): the device half against the Linux-like driver kit."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embervm.devices.virtio.queue import (
    ChainError,
    QueueConfig,
    SplitQueue,
    legacy_ring_addresses,
    make_queue,
)
from embervm.devices.virtio.spec import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)
from embervm.errors import QueueError
from embervm.memory import GuestMemory
from embervm.testing.rings import (
    DriverSplitRing,
    GuestAllocator,
    check_traffic,
    driver_and_queue,
    queue_config,
    ring_features,
)

MEM_SIZE = 1 << 20
TRAFFIC_MEM = GuestMemory([(0, 0x40000)])  # shared by hypothesis examples (no fixtures)
DESC = struct.Struct("<QIHH")  # split descriptor: addr, len, flags, next


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory([(0, MEM_SIZE)])


@pytest.fixture
def alloc(mem: GuestMemory) -> GuestAllocator:
    return GuestAllocator(mem, 0x1000, MEM_SIZE)


def split(mem, alloc, size=8, **kw) -> tuple[DriverSplitRing, SplitQueue]:
    ring, q = driver_and_queue(mem, alloc, size, **kw)
    assert isinstance(ring, DriverSplitRing) and isinstance(q, SplitQueue)
    return ring, q


def complete(q, n: int, written: int = 0) -> list:
    """Pop ``n`` chains and return each with ``written`` bytes (device side of one batch)."""
    chains = []
    for _ in range(n):
        chain = q.pop()
        assert chain is not None
        q.add_used(chain, min(written, chain.writable_len))
        chains.append(chain)
    return chains


def test_pop_returns_none_when_ring_is_empty(mem, alloc):
    _, q = split(mem, alloc)
    assert q.pop() is None
    assert not q.has_available()


def test_pop_returns_buffers_in_chain_order_with_lengths(mem, alloc):
    ring, q = split(mem, alloc)
    token = ring.add([b"head", b"payload!"], [3, 5])
    assert q.has_available()
    chain = q.pop()
    assert chain.head == token
    assert chain.ndesc == 4
    assert [ln for _, ln in chain.readable] == [4, 8]
    assert [ln for _, ln in chain.writable] == [3, 5]
    assert (chain.readable_len, chain.writable_len) == (12, 8)
    assert chain.reader().read() == b"headpayload!"
    assert q.pop() is None
    assert f"head={token}" in repr(chain)


def test_used_element_reports_head_and_bytes_written(mem, alloc):
    ring, q = split(mem, alloc)
    token = ring.add([b"req"], [4, 4])
    chain = q.pop()
    w = chain.writer()
    assert w.write(b"ABCDEF") == 6
    q.add_used(chain, w.written)
    assert q.used_idx == 1
    assert ring.get_used() == [(token, 6, [b"ABCD", b"EF\0\0"])]


def test_add_used_rejects_more_than_the_writable_length(mem, alloc):
    ring, q = split(mem, alloc)
    ring.add([b"x"], [2])
    chain = q.pop()
    with pytest.raises(ValueError):
        q.add_used(chain, 3)
    with pytest.raises(ValueError):
        q.add_used(chain, -1)
    assert q.used_idx == 0


def test_used_elements_may_complete_out_of_order(mem, alloc):
    ring, q = split(mem, alloc)
    t1 = ring.add([b"1"], [])
    t2 = ring.add([b"2"], [])
    c1, c2 = q.pop(), q.pop()
    q.add_used(c2, 0)
    q.add_used(c1, 0)
    assert [t for t, _, _ in ring.get_used()] == [t2, t1]


def test_indices_wrap_past_65535_split(mem, alloc):
    # Seed bug: crosvm compared the next index taken modulo the size with the driver's
    # free-running index; this broke after 65536 requests.  Run 70000 through a 4-entry ring.
    ring, q = split(mem, alloc, size=4)
    for i in range(70_000):
        payload = i.to_bytes(4, "little")
        token = ring.add([payload], [4])
        chain = q.pop()
        assert chain is not None, f"request {i} lost"
        assert chain.reader().read() == payload
        w = chain.writer()
        w.write(payload[::-1])
        q.add_used(chain, w.written)
        assert q.pop() is None
        assert ring.get_used() == [(token, 4, [payload[::-1]])]
    assert q.last_avail_idx == 70_000 & 0xFFFF == ring.avail_idx
    assert q.used_idx == 70_000 & 0xFFFF == ring.used_idx


def test_batches_straddling_the_index_wrap_are_all_delivered(mem, alloc):
    ring, q = split(mem, alloc, size=16)  # 7 two-descriptor chains per batch
    done = 0
    while done < 65_536 + 16:
        tokens = [ring.add([b"x"], [1]) for _ in range(7)]
        chains = complete(q, 7, written=1)
        assert [c.head for c in chains] == tokens
        assert q.pop() is None
        assert [t for t, _, _ in ring.get_used()] == tokens
        done += 7
    assert q.last_avail_idx == done & 0xFFFF


# -- used-buffer notifications (device → driver) ------------------------------------------------


def test_no_interrupt_flag_suppresses_used_notifications(mem, alloc):
    ring, q = split(mem, alloc)
    ring.add([b"a"], [])
    complete(q, 1)
    assert q.needs_interrupt() is True
    ring.set_no_interrupt(True)
    ring.add([b"b"], [])
    complete(q, 1)
    assert q.needs_interrupt() is False
    ring.set_no_interrupt(False)
    ring.add([b"c"], [])
    complete(q, 1)
    assert q.needs_interrupt() is True


def test_needs_interrupt_is_false_when_nothing_was_published(mem, alloc):
    ring, q = split(mem, alloc)
    assert q.needs_interrupt() is False
    ring.add([b"a"], [])
    q.pop()
    assert q.needs_interrupt() is False  # popped but not yet returned


@pytest.mark.parametrize(
    ("used_event", "expected"),
    [(5, True), (10, False), (4, True), (6, True), (7, False)],
)
def test_event_idx_interrupts_only_when_used_event_is_crossed(mem, alloc, used_event, expected):
    # virtio.md §4.4 worked example: used.idx was 4, the device publishes 3 entries (new = 7).
    ring, q = split(mem, alloc, event_idx=True)
    for _ in range(4):
        ring.add([b"x"], [])
    complete(q, 4)
    q.needs_interrupt()  # the decision point: old = 4
    ring.get_used()
    for _ in range(3):
        ring.add([b"x"], [])
    complete(q, 3)
    ring.set_used_event(used_event)
    assert q.needs_interrupt() is expected


def test_event_idx_ignores_the_no_interrupt_flag(mem, alloc):
    ring, q = split(mem, alloc, event_idx=True)
    ring.set_no_interrupt(True)  # a hint only; §2.7.7: ignored with EVENT_IDX
    ring.set_used_event(0)
    ring.add([b"x"], [])
    complete(q, 1)
    assert q.needs_interrupt() is True


def test_event_idx_worked_example_across_the_index_wrap(mem, alloc):
    # virtio.md §4.4: old = 65534, new = 2 (4 entries), used_event = 65535 → interrupt.
    ring, q = split(mem, alloc, size=4, event_idx=True)
    ring.set_used_event(0xFFFF)  # never crossed until the very end
    while q.used_idx != 65534:
        ring.add([b"x"], [])
        ring.add([b"y"], [])
        complete(q, 2)
        assert q.needs_interrupt() is False
        ring.get_used()
    for _ in range(4):
        ring.add([b"z"], [])
    complete(q, 4)
    assert q.used_idx == 2
    assert q.needs_interrupt() is True
    # The next batch (2 → 6) with used_event = 7, just beyond it, stays quiet.
    ring.get_used()
    ring.set_used_event(7)
    for _ in range(4):
        ring.add([b"z"], [])
    complete(q, 4)
    assert q.needs_interrupt() is False


def test_event_idx_linux_style_reenable_interrupts_every_batch_across_wrap(mem, alloc):
    # Linux virtqueue_enable_cb: used_event = last seen used idx.  Every batch must interrupt,
    # and a driver that pushed used_event far ahead must not be interrupted.
    ring, q = split(mem, alloc, size=16, event_idx=True)
    for i in range(70_000 // 5):
        ring.set_used_event(ring.used_idx if i % 3 else (ring.used_idx + 100) & 0xFFFF)
        for _ in range(5):
            ring.add([b"r"], [1])
        complete(q, 5, written=1)
        assert q.needs_interrupt() is bool(i % 3), f"batch {i} at used_idx {q.used_idx}"
        assert len(ring.get_used()) == 5


# -- available-buffer notifications (driver → device) -------------------------------------------


def test_no_notify_flag_suppresses_kicks(mem, alloc):
    ring, q = split(mem, alloc)
    ring.add([b"a"], [])
    assert ring.kick_needed() is True
    q.disable_notifications()
    assert mem.read_u16(ring.device_addr) == VIRTQ_USED_F_NO_NOTIFY
    ring.add([b"b"], [])
    assert ring.kick_needed() is False
    assert q.enable_notifications() is True  # two buffers are waiting
    assert mem.read_u16(ring.device_addr) == 0
    ring.add([b"c"], [])
    assert ring.kick_needed() is True


def test_event_idx_avail_event_asks_for_exactly_one_kick(mem, alloc):
    ring, q = split(mem, alloc, event_idx=True)
    complete_and_idle = q.enable_notifications()
    assert complete_and_idle is False
    ring.add([b"a"], [])
    assert ring.kick_needed() is True  # crosses avail_event = 0
    ring.add([b"b"], [])
    assert ring.kick_needed() is False  # device has not asked again
    complete(q, 2)
    q.disable_notifications()
    assert mem.read_u16(ring.device_addr) == 0  # EVENT_IDX: used.flags is left alone
    assert q.enable_notifications() is False
    assert mem.read_u16(ring.device_addr + 4 + 8 * ring.size) == 2  # avail_event = last_avail
    for _ in range(3):
        ring.add([b"c"], [])
    assert ring.kick_needed() is True  # old 2 → new 5 crosses avail_event 2


def test_enable_notifications_reports_buffers_added_while_disabled(mem, alloc):
    # The lost-wakeup rule (virtio.md §4.4): a buffer added while kicks were off must be
    # noticed when they are turned back on.
    for event_idx in (False, True):
        ring, q = split(mem, alloc, event_idx=event_idx)
        q.disable_notifications()
        ring.add([b"late"], [])
        assert q.enable_notifications() is True
        assert q.pop() is not None
        assert q.enable_notifications() is False


# -- indirect descriptors ------------------------------------------------------------------------


def test_indirect_table_chain_is_flattened(mem, alloc):
    ring, q = split(mem, alloc, indirect=True)
    token = ring.add([b"hdr:", b"data"], [2, 6], indirect=True)
    assert ring.num_free == ring.size - 1  # one ring descriptor for the whole chain
    chain = q.pop()
    assert chain.head == token and chain.ndesc == 1
    assert chain.reader().read() == b"hdr:data"
    assert chain.writable_len == 8
    q.add_used(chain, chain.writer().write(b"12345678"))
    assert ring.get_used() == [(token, 8, [b"12", b"345678"])]


def test_direct_descriptors_followed_by_an_indirect_one_are_accepted(mem, alloc):
    ring, q = split(mem, alloc, indirect=True)
    mem.write(0x8000, b"direct")
    mem.write(0x9000, b"indirect")
    table = 0xA000
    ring.write_desc(0, 0x8000, 6, VIRTQ_DESC_F_NEXT, 1)
    ring.write_desc(1, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    # table: entry 0 (readable) → entry 1 (writable)
    mem.write(table, DESC.pack(0x9000, 8, VIRTQ_DESC_F_NEXT, 1))
    mem.write(table + 16, DESC.pack(0xB000, 4, VIRTQ_DESC_F_WRITE, 0))
    ring.publish(0)
    chain = q.pop()
    assert chain.ndesc == 2
    assert chain.reader().read() == b"directindirect"
    assert chain.writable == [(0xB000, 4)]


def test_indirect_table_entries_follow_next_not_table_order(mem, alloc):
    ring, q = split(mem, alloc, indirect=True)
    table = 0xA000
    mem.write(0x8000, b"first")
    mem.write(0x9000, b"second")
    # The walk starts at entry 0 and follows next: 0 → 2 (zero-length) → 1.
    mem.write(table, DESC.pack(0x8000, 5, VIRTQ_DESC_F_NEXT, 2))
    mem.write(table + 16, DESC.pack(0x9000, 6, 0, 0))
    mem.write(table + 32, DESC.pack(0xC000, 0, VIRTQ_DESC_F_NEXT, 1))
    ring.write_desc(3, table, 48, VIRTQ_DESC_F_INDIRECT)
    ring.publish(3)
    assert q.pop().reader().read() == b"firstsecond"


def test_zero_length_descriptors_are_skipped(mem, alloc):
    ring, q = split(mem, alloc)
    # Address 0xdead_0000 is not RAM, but a zero-length buffer has no bytes to check.
    ring.write_desc(0, 0xDEAD_0000, 0, VIRTQ_DESC_F_NEXT, 1)
    mem.write(0x8000, b"ok")
    ring.write_desc(1, 0x8000, 2, VIRTQ_DESC_F_NEXT, 2)
    ring.write_desc(2, 0x9000, 0, VIRTQ_DESC_F_WRITE, 0)
    ring.publish(0)
    chain = q.pop()
    assert chain.readable == [(0x8000, 2)] and chain.writable == []
    assert chain.ndesc == 3


# -- layout and activation -----------------------------------------------------------------------


def test_legacy_ring_addresses_follow_vring_init():
    # desc = pfn * page; avail = desc + 16N; used = align_up(avail + 4 + 2N + 2, align)
    assert legacy_ring_addresses(5, 4096, 4096, 256) == (0x5000, 0x6000, 0x7000)
    assert legacy_ring_addresses(1, 4096, 4096, 8) == (0x1000, 0x1080, 0x2000)
    assert legacy_ring_addresses(1, 4096, 4, 8) == (0x1000, 0x1080, 0x1080 + 24)
    assert legacy_ring_addresses(2, 4096, 64, 3) == (0x2000, 0x2030, 0x2040)


def test_legacy_ring_addresses_reject_non_power_of_two_page_or_align():
    with pytest.raises(QueueError, match="QueueAlign"):
        legacy_ring_addresses(1, 4096, 3000, 8)
    with pytest.raises(QueueError, match="QueueAlign"):
        legacy_ring_addresses(1, 4096, 0, 8)
    with pytest.raises(QueueError, match="GuestPageSize"):
        legacy_ring_addresses(1, 0, 4096, 8)


def test_legacy_layout_ring_works_end_to_end(mem, alloc):
    ring = DriverSplitRing(mem, alloc, 16, legacy_align=4096)
    assert (ring.desc_addr, ring.driver_addr, ring.device_addr) == legacy_ring_addresses(
        ring.pfn, 4096, 4096, 16
    )
    assert ring.device_addr % 4096 == 0
    q = make_queue(0, queue_config(ring), mem, 0)
    token = ring.add([b"legacy"], [3])
    chain = q.pop()
    q.add_used(chain, chain.writer().write(b"abc"))
    assert ring.get_used() == [(token, 3, [b"abc"])]


def test_queue_config_starts_at_max_size_and_resets():
    cfg = QueueConfig(256)
    assert (cfg.max_size, cfg.size, cfg.ready) == (256, 256, False)
    assert (cfg.desc_addr, cfg.driver_addr, cfg.device_addr) == (0, 0, 0)
    cfg.size, cfg.ready, cfg.desc_addr, cfg.driver_addr, cfg.device_addr = 64, True, 1, 2, 3
    cfg.reset()
    assert (cfg.size, cfg.ready, cfg.desc_addr, cfg.driver_addr, cfg.device_addr) == (
        256,
        False,
        0,
        0,
        0,
    )
    assert "max_size=256" in repr(cfg)


def _cfg(size=8, desc=0x1000, driver=0x2000, device=0x3000, max_size=256) -> QueueConfig:
    cfg = QueueConfig(max_size)
    cfg.size, cfg.desc_addr, cfg.driver_addr, cfg.device_addr = size, desc, driver, device
    return cfg


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (_cfg(size=0), "size is 0"),
        (_cfg(size=512), "exceeds QueueNumMax"),
        (_cfg(size=65536, max_size=65536), "exceeds 32768"),
        (_cfg(size=12), "not a power of two"),
        (_cfg(desc=0x1008), "16-byte aligned"),
        (_cfg(driver=0x2001), "2-byte aligned"),
        (_cfg(device=0x3002), "4-byte aligned"),
        (_cfg(desc=MEM_SIZE - 0x40), "descriptor table"),
        (_cfg(driver=MEM_SIZE - 20), "available ring"),
        (_cfg(device=MEM_SIZE - 60), "used ring"),
        (_cfg(device=0xC000_0000), "used ring"),
    ],
)
def test_make_queue_rejects_invalid_split_registers(mem, cfg, message):
    with pytest.raises(QueueError, match=message):
        make_queue(0, cfg, mem, 0)


def test_make_queue_accepts_rings_ending_exactly_at_the_end_of_ram(mem):
    # desc 16*8 = 128 bytes, avail 6+16 = 22, used 6+64 = 70: each flush with the end of RAM.
    cfg = _cfg(desc=MEM_SIZE - 128, driver=MEM_SIZE - 22, device=MEM_SIZE - 72)
    q = make_queue(3, cfg, mem, ring_features(event_idx=True, indirect=True))
    assert isinstance(q, SplitQueue)
    assert (q.index, q.size, q.event_idx, q.indirect) == (3, 8, True, True)
    assert "SplitQueue(index=3" in repr(q)


def test_make_queue_checks_the_second_ram_region():
    mem = GuestMemory.x86(0xC000_0000 + 0x10000)  # 3 GiB low, 64 KiB above 4 GiB
    hi = 0x1_0000_0000
    q = make_queue(0, _cfg(desc=hi, driver=hi + 0x1000, device=hi + 0x2000), mem, 0)
    assert isinstance(q, SplitQueue)
    with pytest.raises(QueueError, match="descriptor table"):
        make_queue(0, _cfg(desc=hi + 0x10000 - 64), mem, 0)


def test_chain_error_after_a_bad_chain_leaves_the_queue_usable(mem, alloc):
    ring, q = split(mem, alloc)
    ring.write_desc(5, 0xC000_0000, 16)  # outside RAM
    ring.publish(5)
    good = ring.add([b"fine"], [])
    with pytest.raises(ChainError) as info:
        q.pop()
    assert info.value.chain.head == 5 and info.value.chain.writable_len == 0
    q.add_used(info.value.chain, 0)  # hand it back so the driver does not leak it
    chain = q.pop()
    assert chain.head == good
    assert q.used_idx == 1


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 0xFFFF)), max_size=120),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    size=st.sampled_from([1, 2, 4, 16]),
)
def test_random_valid_traffic_is_delivered_once_without_lost_notifications_split(
    ops, event_idx, indirect, size
):
    mem = TRAFFIC_MEM
    ring, q = driver_and_queue(
        mem, GuestAllocator(mem, 0, 0x40000), size, event_idx=event_idx, indirect=indirect
    )
    check_traffic(ring, q, ops)


def test_traffic_model_catches_a_lost_interrupt_split(mem, alloc, monkeypatch):
    # The property checker itself must fail on a device that never interrupts.
    ring, q = driver_and_queue(mem, alloc, 4, event_idx=True)
    monkeypatch.setattr(type(q), "needs_interrupt", lambda self: False)
    with pytest.raises(AssertionError, match="never interrupted"):
        check_traffic(ring, q, [(0, 0), (1, 0), (2, 0), (3, 0)])


def test_traffic_model_catches_a_lost_kick_split(mem, alloc, monkeypatch):
    ring, q = driver_and_queue(mem, alloc, 4)
    monkeypatch.setattr(type(ring), "kick_needed", lambda self: False)
    with pytest.raises(AssertionError, match="kick lost"):
        check_traffic(ring, q, [(0, 0)])
