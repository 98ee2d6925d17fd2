"""virtio-balloon through the Linux-like MMIO driver (no KVM).

Guest RAM here has two regions with a hole between them, like the x86 MMIO gap: the driver's
rings live in the first, the pages the "guest" balloons in the second, filled with a pattern so
that a released page (MADV_DONTNEED on the private anonymous mapping) shows up as zeros.
"""

from __future__ import annotations

import struct
import time

import pytest

from embervm.devices.virtio import balloon as balloonmod
from embervm.devices.virtio import spec
from embervm.devices.virtio.balloon import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    Balloon,
    queue_roles,
)
from embervm.devices.virtio.mmio import MmioTransport
from embervm.errors import ConfigError
from embervm.eventloop import EventLoop
from embervm.memory import GuestMemory
from embervm.testing.driver import LINUX_TRANSPORT_FEATURES, MmioDriver

RING_RAM = (0, 1 << 20)
DATA_BASE = 0x40_0000  # 4 MiB; 1..4 MiB is a hole (not RAM)
DATA_SIZE = 1 << 20
DATA_PFN = DATA_BASE >> 12
DATA_PAGES = DATA_SIZE >> 12
PATTERN = 0xA5
INFLATE, DEFLATE, STATS = 0, 1, 2
STATS_BIT = spec.bit(VIRTIO_BALLOON_F_STATS_VQ)
OOM_BIT = spec.bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
DEVICE_BITS = (1 << 24) - 1
PACKED = spec.bit(spec.VIRTIO_F_RING_PACKED)


def pfns(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def stats(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<HQ", tag, val) for tag, val in pairs)


class Guest:
    """A Balloon behind an MMIO transport, probed by the Linux-like driver."""

    def __init__(self, target_mib: int = 0, *, accept: int | None = None, legacy: bool = False,
                 packed: bool = False, loop: EventLoop | None = None, nqueues: int | None = None,
                 **kw) -> None:
        self.mem = GuestMemory([RING_RAM, (DATA_BASE, DATA_SIZE)])
        self.mem.fill(DATA_BASE, DATA_SIZE, PATTERN)
        self.dev = Balloon(target_mib, **kw)
        self.dev.loop = loop
        self.transport = MmioTransport(self.dev, self.mem, legacy=legacy, packed=packed)
        self.drv = MmioDriver(self.transport, self.mem)
        if accept is None:
            accept = DEVICE_BITS | (LINUX_TRANSPORT_FEATURES if packed else
                                    LINUX_TRANSPORT_FEATURES & ~PACKED)
        self.accept = accept
        self.features = self.drv.probe(accept=accept, nqueues=nqueues)

    def page(self, pfn: int) -> bytes:
        return self.mem.read(pfn << 12, 4096)

    def released(self, pfn: int) -> bool:
        data = self.page(pfn)
        if data == bytes(4096):
            return True
        assert data == bytes([PATTERN]) * 4096, f"page {pfn:#x} neither intact nor released"
        return False

    def send(self, queue: int, data: bytes | list[bytes], writable=()) -> list[tuple]:
        bufs = data if isinstance(data, list) else [data]
        self.drv.submit(queue, readable=bufs, writable=list(writable))
        return self.drv.used(queue)


@pytest.fixture
def guest():
    return Guest()


# -- features, config, queues ----------------------------------------------------------------


def test_offers_stats_vq_always_and_deflate_on_oom_only_when_asked():
    plain = Guest()
    assert plain.drv.device_id == spec.VIRTIO_ID_BALLOON
    assert plain.transport.offered_features & STATS_BIT
    assert not plain.transport.offered_features & OOM_BIT
    oom = Guest(deflate_on_oom=True)
    assert oom.transport.offered_features & OOM_BIT
    assert oom.features & OOM_BIT
    assert oom.dev.status()["deflate_on_oom"] is True


def test_config_num_pages_is_the_target_in_4k_pages_and_actual_starts_at_zero():
    g = Guest(64)
    assert g.drv.read_config(0, 4) == 64 * 256
    assert g.drv.read_config(4, 4) == 0
    # num_pages is the device's: a driver write does not change it.
    g.drv.write_config(0, 4, 7)
    assert g.drv.read_config(0, 4) == 64 * 256


def test_queue_roles_follow_linux_compacted_numbering():
    assert queue_roles(0) == ("inflate", "deflate")
    assert queue_roles(STATS_BIT) == ("inflate", "deflate", "stats")
    # Without STATS_VQ, the next negotiated queue takes index 2 (vm_find_vqs skips unnamed ones).
    reporting = spec.bit(VIRTIO_BALLOON_F_REPORTING)
    assert queue_roles(reporting) == ("inflate", "deflate", "reporting")
    hint = spec.bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT)
    assert queue_roles(STATS_BIT | hint | reporting)[2:] == ("stats", "free_page", "reporting")


def test_linux_probe_sets_up_inflate_deflate_and_stats_queues(guest):
    assert guest.features & STATS_BIT
    assert len(guest.drv.rings) == 3
    assert all(q is not None for q in guest.dev.queues)
    assert guest.dev.active


# -- inflate / deflate ---------------------------------------------------------------------------


def test_inflate_releases_exactly_the_listed_pages(guest):
    listed = [DATA_PFN + 3, DATA_PFN + 4, DATA_PFN + 10, DATA_PFN + 255]
    used = guest.send(INFLATE, pfns(*listed))
    assert [length for _tok, length, _ in used] == [0]
    assert guest.drv.interrupt() & spec.VIRTIO_MMIO_INT_VRING
    for p in range(DATA_PFN, DATA_PFN + DATA_PAGES):
        assert guest.released(p) == (p in listed), hex(p)
    assert guest.dev.metrics["inflated_pages"] == 4
    assert guest.dev.metrics["bad_pfns"] == 0


def test_inflate_skips_and_counts_pfns_outside_ram_but_releases_the_rest(guest):
    hole = (RING_RAM[1] >> 12) + 5  # between the two regions
    beyond = DATA_PFN + DATA_PAGES  # first page after the end of RAM
    used = guest.send(INFLATE, pfns(hole, DATA_PFN + 1, beyond, 0xFFFF_FFFF, DATA_PFN + 2))
    assert [length for _tok, length, _ in used] == [0]
    assert guest.released(DATA_PFN + 1) and guest.released(DATA_PFN + 2)
    assert not guest.released(DATA_PFN + 3)
    assert guest.dev.metrics["bad_pfns"] == 3
    assert guest.dev.metrics["inflated_pages"] == 2
    assert not guest.transport.status & spec.STATUS_DEVICE_NEEDS_RESET


def test_a_run_of_pfns_crossing_the_end_of_ram_releases_only_the_ram_part(guest):
    last = DATA_PFN + DATA_PAGES - 1
    guest.send(INFLATE, pfns(*range(last - 2, last + 3)))  # 3 in RAM, 2 beyond
    assert all(guest.released(p) for p in range(last - 2, last + 1))
    assert not guest.released(last - 3)
    assert guest.dev.metrics["inflated_pages"] == 3
    assert guest.dev.metrics["bad_pfns"] == 2


def test_duplicate_pfns_in_one_buffer_count_once(guest):
    guest.send(INFLATE, pfns(DATA_PFN, DATA_PFN, DATA_PFN + 1, DATA_PFN))
    assert guest.dev.metrics["inflated_pages"] == 2


def test_deflate_leaves_memory_alone_and_counts_pages(guest):
    guest.send(INFLATE, pfns(DATA_PFN + 7))
    guest.mem.fill((DATA_PFN + 7) << 12, 4096, PATTERN)  # the guest reuses the page
    used = guest.send(DEFLATE, pfns(DATA_PFN + 7, DATA_PFN + 8, 0x1234_5678))
    assert [length for _tok, length, _ in used] == [0]
    assert not guest.released(DATA_PFN + 7) and not guest.released(DATA_PFN + 8)
    assert guest.dev.metrics["deflated_pages"] == 2
    assert guest.dev.metrics["bad_pfns"] == 1


def test_pfn_array_split_anywhere_across_descriptors_is_parsed_as_one_stream(guest):
    raw = pfns(DATA_PFN + 20, DATA_PFN + 21, DATA_PFN + 40)
    guest.send(INFLATE, [raw[:3], raw[3:9], b"", raw[9:]])
    assert [guest.released(DATA_PFN + i) for i in (20, 21, 22, 40)] == [True, True, False, True]


def test_indirect_pfn_buffers_work(guest):
    guest.drv.submit(INFLATE, readable=[pfns(DATA_PFN + 50), pfns(DATA_PFN + 51)],
                     indirect=True)
    assert len(guest.drv.used(INFLATE)) == 1
    assert guest.released(DATA_PFN + 50) and guest.released(DATA_PFN + 51)


def test_trailing_bytes_and_writable_parts_are_ignored_and_counted(guest):
    used = guest.send(INFLATE, pfns(DATA_PFN + 60) + b"\x01\x02", writable=[16])
    # used.len 0: the device wrote nothing into the writable part.
    assert [(length, bufs) for _tok, length, bufs in used] == [(0, [bytes(16)])]
    assert guest.released(DATA_PFN + 60)
    assert guest.dev.metrics["malformed"] == 2
    assert guest.dev.active


def test_pfns_beyond_the_per_buffer_bound_are_ignored_and_counted(guest, monkeypatch):
    monkeypatch.setattr(balloonmod, "MAX_PFNS", 4)
    guest.send(INFLATE, pfns(*range(DATA_PFN, DATA_PFN + 6)))
    assert [guest.released(DATA_PFN + i) for i in range(6)] == [True] * 4 + [False] * 2
    assert guest.dev.metrics["ignored_pfns"] == 2


def test_a_structurally_invalid_chain_sets_device_needs_reset(guest):
    ring = guest.drv.rings[INFLATE]
    token = guest.drv.submit(INFLATE, readable=[pfns(DATA_PFN)], kick=False)
    ring.write_desc(token, 0x20_0000, 4)  # the buffer now points into the hole
    guest.drv.kick(INFLATE)
    assert guest.transport.status & spec.STATUS_DEVICE_NEEDS_RESET
    assert guest.drv.interrupt() & spec.VIRTIO_MMIO_INT_CONFIG
    assert not guest.dev.active


# -- target and actual -----------------------------------------------------------------------------


def test_set_target_changes_num_pages_bumps_generation_and_raises_config_interrupt(guest):
    gen = guest.drv.config_generation()
    guest.drv.interrupt()
    guest.dev.set_target_mib(1)
    assert guest.drv.read_config(0, 4) == 256
    assert guest.drv.config_generation() != gen
    assert guest.drv.interrupt() & spec.VIRTIO_MMIO_INT_CONFIG


def test_set_target_rejects_negative_oversized_and_not_below_guest_memory(guest):
    # Guest RAM here is 2 MiB.
    for bad in (-1, 2, 3, 1 << 30):
        with pytest.raises(ValueError):
            guest.dev.set_target_mib(bad)
    assert guest.dev.target_pages == 0
    guest.dev.set_target_mib(1)
    assert guest.dev.target_pages == 256


def test_target_set_before_the_driver_probes_is_read_at_probe_without_interrupt():
    dev = Balloon(0)
    dev.set_target_mib(5000)  # memory size unknown yet: only the le32 bound applies
    mem = GuestMemory([RING_RAM])
    t = MmioTransport(dev, mem)
    assert t.interrupt.status == 0
    drv = MmioDriver(t, mem)
    drv.probe()
    assert drv.read_config(0, 4) == 5000 * 256


def test_driver_written_actual_is_reported_and_reset_clears_it_but_keeps_the_target():
    g = Guest(1)
    g.drv.write_config(4, 4, 256)
    st = g.dev.status()
    assert (st["actual_pages"], st["actual_mib"], st["target_mib"]) == (256, 1, 1)
    g.drv.remove()
    assert g.drv.read_config(4, 4) == 0
    assert g.drv.read_config(0, 4) == 256


def test_legacy_byte_wise_actual_writes_assemble_the_value():
    g = Guest(1, legacy=True, accept=DEVICE_BITS)
    for i, b in enumerate((0x34, 0x12, 0, 0)):
        g.drv.write_config(4 + i, 1, b)
    assert g.dev.actual_pages == 0x1234


def test_constructor_rejects_negative_target_and_interval():
    with pytest.raises(ConfigError):
        Balloon(-1)
    with pytest.raises(ConfigError):
        Balloon(1 << 30)
    with pytest.raises(ConfigError):
        Balloon(0, stats_seconds=-1)


# -- statistics -----------------------------------------------------------------------------------


MIB = 1 << 20


def test_stats_buffer_values_are_kept_by_tag_name(guest):
    guest.send(STATS, stats((4, 100 * MIB), (5, 200 * MIB), (6, 150 * MIB), (7, 3 * MIB)))
    assert guest.drv.used(STATS) == []  # the device keeps the buffer
    st = guest.dev.status()
    assert st["stats"] == {"free_memory": 100 * MIB, "total_memory": 200 * MIB,
                           "available_memory": 150 * MIB, "disk_caches": 3 * MIB}
    assert 0 <= st["stats_age_seconds"] < 60


def test_unknown_stat_tags_are_kept_under_a_numbered_name(guest):
    guest.send(STATS, stats((4, 1), (999, 2)))
    assert guest.dev.status()["stats"] == {"free_memory": 1, "tag_999": 2}
    assert guest.dev.metrics["stats_update_fails"] == 1  # Firecracker's count of unknown tags


# -- Firecracker's GET /balloon/statistics body and metrics -----------------------------------

FC_STAT_FIELDS = ("swap_in", "swap_out", "major_faults", "minor_faults", "free_memory",
                  "total_memory", "available_memory", "disk_caches", "hugetlb_allocations",
                  "hugetlb_failures", "oom_kill", "alloc_stall", "async_scan", "direct_scan",
                  "async_reclaim", "direct_reclaim")


def _swagger_balloon_stats() -> dict:
    """Firecracker's swagger ``BalloonStats`` (the project's copy, or the release source)."""
    import pathlib

    import yaml

    here = pathlib.Path(__file__).resolve().parent
    for path in (here.parent / "data" / "firecracker-v1.16.1.yaml",
                 pathlib.Path("/tmp/fc/src/firecracker/swagger/firecracker.yaml")):
        if path.is_file():
            return yaml.safe_load(path.read_text())["definitions"]["BalloonStats"]
    pytest.skip("Firecracker's swagger file is not available")


def test_fc_stats_has_sizes_and_only_the_statistics_the_guest_sent():
    g = Guest(2, stats_seconds=1)
    g.transport.write(spec.CONFIG + 4, 4, 256)  # the driver reports 1 MiB ballooned
    g.send(STATS, stats((5, 200 * MIB), (0, 7), (4, 100 * MIB), (999, 1)))
    assert g.dev.fc_stats() == {
        "target_pages": 512, "actual_pages": 256, "target_mib": 2, "actual_mib": 1,
        "swap_in": 7, "free_memory": 100 * MIB, "total_memory": 200 * MIB,
    }
    # Firecracker's field order, whatever order the driver sent the tags in.
    assert list(g.dev.fc_stats())[4:] == ["swap_in", "free_memory", "total_memory"]


def test_fc_stats_keeps_a_statistic_until_the_guest_sends_it_again():
    g = Guest(stats_seconds=1)
    g.send(STATS, stats((2, 1), (3, 2)))
    assert g.dev.request_stats()
    g.send(STATS, stats((3, 5), (15, 9)))
    body = g.dev.fc_stats()
    assert (body["major_faults"], body["minor_faults"], body["direct_reclaim"]) == (1, 5, 9)


def _all_tags_body() -> dict:
    g = Guest(stats_seconds=1)
    g.send(STATS, stats(*((tag, 1000 + tag) for tag in range(16))))
    return g.dev.fc_stats()


def test_fc_stats_names_every_tag_as_firecracker_does():
    body = _all_tags_body()
    assert list(body)[4:] == list(FC_STAT_FIELDS)
    assert [body[name] for name in FC_STAT_FIELDS] == [1000 + tag for tag in range(16)]


def test_fc_stats_with_every_tag_matches_the_swagger_schema_exactly():
    schema = _swagger_balloon_stats()
    body = _all_tags_body()
    assert set(body) == set(schema["properties"])
    assert set(schema["required"]) <= set(body)
    import jsonschema

    jsonschema.validate(body, schema)


def test_fc_stats_with_statistics_off_is_firecrackers_error(guest):
    with pytest.raises(ValueError, match=r"^Received stats query when stats are disabled\.$"):
        guest.dev.fc_stats()


def test_firecracker_metric_names_count_queue_events():
    g = Guest(stats_seconds=1)
    m = g.dev.metrics
    names = ("inflate_count", "deflate_count", "stats_updates_count")
    before = [m[k] for k in names]  # the DRIVER_OK scan is a pass over each queue too
    g.send(INFLATE, pfns(DATA_PFN, DATA_PFN + 1))
    g.send(INFLATE, pfns(DATA_PFN + 2))
    g.send(DEFLATE, pfns(DATA_PFN))
    g.send(STATS, stats((4, 1)))
    assert [m[k] - b for k, b in zip(names, before, strict=True)] == [2, 1, 1]
    assert m["inflated_pages"] == 3
    assert m["activate_fails"] == 0 and m["event_fails"] == 0 and m["stats_update_fails"] == 0


def test_a_broken_ring_counts_an_event_failure(guest):
    guest.drv.submit(INFLATE, readable=[pfns(DATA_PFN)], kick=False)
    # Scribble an avail index far ahead of what the ring holds: the device must give up.
    ring = guest.drv.rings[INFLATE]
    guest.mem.write_u16(ring.driver_addr + 2, 0x8000)
    guest.drv.kick(INFLATE)
    assert guest.dev.metrics["event_fails"] == 1
    assert guest.drv.status() & spec.STATUS_DEVICE_NEEDS_RESET


def test_request_stats_returns_the_buffer_and_the_refill_updates_the_values(guest):
    assert guest.dev.request_stats() is False  # nothing held yet
    guest.send(STATS, stats((4, 1)))
    guest.drv.interrupt()
    assert guest.dev.request_stats() is True
    assert [length for _tok, length, _ in guest.drv.used(STATS)] == [0]
    assert guest.drv.interrupt() & spec.VIRTIO_MMIO_INT_VRING
    assert guest.dev.request_stats() is False  # the driver has not refilled yet
    guest.send(STATS, stats((4, 2), (5, 9)))
    assert guest.dev.status()["stats"] == {"free_memory": 2, "total_memory": 9}
    assert guest.dev.metrics["stats_requests"] == 1
    assert guest.dev.metrics["stats_updates"] == 2


def test_a_second_stats_buffer_returns_the_first(guest):
    guest.send(STATS, stats((4, 1)))
    used = guest.send(STATS, stats((4, 2)))
    assert [length for _tok, length, _ in used] == [0]
    assert guest.dev.stats == {4: 2}
    assert guest.dev.request_stats() is True


def test_odd_sized_stats_buffer_keeps_the_whole_entries(guest):
    guest.send(STATS, stats((5, 77)) + b"\x04\x00\x01")
    assert guest.dev.stats == {5: 77}
    assert guest.dev.metrics["malformed"] == 1


def test_stats_timer_requests_fresh_stats_every_interval():
    loop = EventLoop()
    try:
        g = Guest(stats_seconds=1, loop=loop)
        g.send(STATS, stats((4, 1)))
        deadline = time.monotonic() + 5
        while not g.drv.used(STATS):
            assert time.monotonic() < deadline, "no stats request within 5 s"
            loop.run_once(0.1)
        g.send(STATS, stats((4, 2)))
        assert g.dev.stats == {4: 2}
        # The timer keeps running: a second request comes.
        deadline = time.monotonic() + 5
        while not g.drv.used(STATS):
            assert time.monotonic() < deadline, "no second stats request"
            loop.run_once(0.1)
    finally:
        loop.close()


def test_no_stats_request_reaches_the_guest_after_a_reset():
    loop = EventLoop()
    try:
        g = Guest(stats_seconds=1, loop=loop)
        g.send(STATS, stats((4, 1)))
        loop.run_once(0)  # the timer is armed on the loop thread
        ring = g.drv.rings[STATS]
        g.drv.remove()
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            loop.run_once(0.1)
        assert ring.get_used() == []
        assert g.dev.metrics["stats_requests"] == 0
    finally:
        loop.close()


def test_stats_interval_can_be_changed_at_run_time_and_asks_for_fresh_values_at_once():
    loop = EventLoop()
    try:
        g = Guest(loop=loop, stats_seconds=3600)
        g.send(STATS, stats((4, 1)))
        for _ in range(3):
            loop.run_once(0.05)
        assert g.drv.used(STATS) == []
        reply = g.dev.control_commands()["balloon"](["stats", "1"])
        assert reply["stats_seconds"] == 1
        # Firecracker returns the held buffer on a change (a fresh update right away) ...
        assert [length for _tok, length, _ in g.drv.used(STATS)] == [0]
        g.send(STATS, stats((4, 2)))
        # ... and the new interval drives the timer from then on.
        deadline = time.monotonic() + 5
        while not g.drv.used(STATS):
            assert time.monotonic() < deadline, "no stats request at the new interval"
            loop.run_once(0.1)
    finally:
        loop.close()


@pytest.mark.parametrize(("before", "after"), [(0, 1), (5, 0)])
def test_stats_cannot_be_switched_on_or_off_after_creation_as_on_firecracker(before, after):
    g = Guest(stats_seconds=before)
    with pytest.raises(ValueError, match=r"^Statistics cannot be enabled/disabled after "
                                         r"activation\.$"):
        g.dev.set_stats_interval(after)
    assert g.dev.stats_seconds == before
    g.dev.set_stats_interval(before)  # no change is no error


def test_stopping_the_stats_queue_drops_the_held_buffer(guest):
    guest.send(STATS, stats((4, 1)))
    guest.drv.wr(spec.QUEUE_SEL, STATS)
    guest.drv.wr(spec.QUEUE_READY, 0)
    assert guest.dev.request_stats() is False


def test_without_stats_vq_two_queues_and_a_third_is_left_alone():
    g = Guest(accept=(DEVICE_BITS & ~STATS_BIT) | (LINUX_TRANSPORT_FEATURES & ~PACKED),
              nqueues=3)
    assert not g.features & STATS_BIT
    g.drv.submit(2, readable=[stats((4, 1))])
    assert g.drv.used(2) == []
    assert g.dev.stats == {}
    assert g.dev.request_stats() is False
    g.send(INFLATE, pfns(DATA_PFN))
    assert g.released(DATA_PFN)


# -- lifecycle and transports ---------------------------------------------------------------------


def test_reset_and_reprobe_three_times_keeps_working(guest):
    for i in range(3):
        guest.send(STATS, stats((4, i)))
        guest.drv.remove()
        assert not guest.dev.active
        guest.drv.probe(accept=guest.accept)
        guest.send(INFLATE, pfns(DATA_PFN + 100 + i))
        assert guest.released(DATA_PFN + 100 + i)
    assert guest.dev.metrics["activations"] == 4


@pytest.mark.parametrize("kind", ["legacy", "packed"])
def test_inflate_works_on_legacy_and_packed_transports(kind):
    g = Guest(legacy=kind == "legacy", packed=kind == "packed",
              accept=DEVICE_BITS if kind == "legacy" else None)
    g.send(INFLATE, pfns(DATA_PFN + 9))
    assert g.released(DATA_PFN + 9)
    g.send(STATS, stats((5, 42)))
    assert g.dev.stats == {5: 42}


# -- control commands ----------------------------------------------------------------------------


def test_control_set_and_status_round_trip(guest):
    balloon = guest.dev.control_commands()["balloon"]
    guest.drv.interrupt()
    reply = balloon(["set", "1"])
    assert reply["target_mib"] == 1 and reply["target_pages"] == 256
    assert guest.drv.interrupt() & spec.VIRTIO_MMIO_INT_CONFIG
    status = balloon(["status"])
    assert status["driver_ready"] is True
    assert status["actual_pages"] == 0


@pytest.mark.parametrize("words", [[], ["set"], ["set", "x"], ["set", "-1"], ["set", "+1"],
                                   ["set", "1", "2"], ["set", "99999999999999"], ["frobnicate"],
                                   ["stats"], ["stats", "1.5"], ["status", "now"]])
def test_control_rejects_bad_words_with_a_message(guest, words):
    with pytest.raises(ValueError, match=r"\S"):
        guest.dev.control_commands()["balloon"](words)
    assert guest.dev.target_pages == 0
