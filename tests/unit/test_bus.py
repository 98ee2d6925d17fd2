"""Bus: address -> (device, offset) dispatch, overlap checks, unknown addresses, containment."""

from __future__ import annotations

import logging

import pytest

from embervm.bus import EXACT_MEMO_MAX, LOGGED_CAUSES_MAX, Bus, all_ones
from embervm.errors import ConfigError


class Recorder:
    """A device that records accesses and reads back offset-derived values."""

    def __init__(self, value: int | None = None) -> None:
        self.value = value
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return self.value if self.value is not None else 0x100 + offset

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


class Exploding:
    def read(self, offset: int, size: int) -> int:
        raise RuntimeError("device bug on read")

    def write(self, offset: int, size: int, value: int) -> None:
        raise ValueError("device bug on write")


def unknown_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "nothing mapped" in r.getMessage()]


def test_lookup_returns_device_and_offset_for_small_pio_range() -> None:
    bus = Bus("pio")
    uart = Recorder()
    bus.insert(uart, 0x3F8, 8)
    assert bus.lookup(0x3F8) == (uart, 0)
    assert bus.lookup(0x3FF) == (uart, 7)
    assert bus.lookup(0x3F7) is None
    assert bus.lookup(0x400) is None


def test_lookup_finds_page_aligned_and_unaligned_mmio_ranges() -> None:
    bus = Bus("mmio")
    page_dev, small_a, small_b = Recorder(), Recorder(), Recorder()
    bus.insert(page_dev, 0xD000_0000, 0x1000)
    # Two 512-byte windows in one page, as virtio_mmio.device=512@0xfeb00e00 lays them out.
    bus.insert(small_a, 0xFEB0_0C00, 0x200)
    bus.insert(small_b, 0xFEB0_0E00, 0x200)
    assert bus.lookup(0xD000_0FFC) == (page_dev, 0xFFC)
    assert bus.lookup(0xFEB0_0C70) == (small_a, 0x70)
    assert bus.lookup(0xFEB0_0E00) == (small_b, 0)
    assert bus.lookup(0xFEB0_0FFF) == (small_b, 0x1FF)
    assert bus.lookup(0xFEB0_0BFF) is None
    assert bus.lookup(0xFEB0_1000) is None


def test_read_and_write_dispatch_relative_offsets_and_sizes() -> None:
    bus = Bus("mmio")
    dev = Recorder(value=0xDEADBEEF)
    bus.insert(dev, 0x1000_0000, 0x200)
    assert bus.read(0x1000_0010, 4) == 0xDEADBEEF
    bus.write(0x1000_0070, 2, 0xABCD)
    assert dev.reads == [(0x10, 4)]
    assert dev.writes == [(0x70, 2, 0xABCD)]


def test_repeated_access_uses_the_remembered_lookup() -> None:
    bus = Bus("mmio")
    dev = Recorder()
    bus.insert(dev, 0xFEB0_0E00, 0x200)
    for _ in range(3):
        assert bus.read(0xFEB0_0E50, 4) == 0x150
    assert dev.reads == [(0x50, 4)] * 3


def test_insert_rejects_overlap_with_either_neighbour() -> None:
    bus = Bus("pio")
    bus.insert(Recorder(), 0x60, 5)
    bus.insert(Recorder(), 0x70, 2)
    with pytest.raises(ConfigError, match="overlaps"):
        bus.insert(Recorder(), 0x64, 1)  # inside the first
    with pytest.raises(ConfigError, match="overlaps"):
        bus.insert(Recorder(), 0x5F, 2)  # straddles the start of the first
    with pytest.raises(ConfigError, match="overlaps"):
        bus.insert(Recorder(), 0x65, 0x10)  # covers the second entirely
    bus.insert(Recorder(), 0x65, 0xB)  # exactly the gap 0x65-0x6f
    assert [(base, length) for _, base, length in bus.ranges()] == [
        (0x60, 5), (0x65, 0xB), (0x70, 2)]


@pytest.mark.parametrize(("base", "length"), [(0x10, 0), (0x10, -1), (-1, 4), ((1 << 64) - 2, 4)])
def test_insert_rejects_empty_negative_or_out_of_space_ranges(base: int, length: int) -> None:
    with pytest.raises(ConfigError):
        Bus("mmio").insert(Recorder(), base, length)


def test_insert_after_a_miss_makes_the_address_reachable() -> None:
    bus = Bus("pio")
    assert bus.read(0x80, 1) == 0xFF  # remembered as unmapped
    dev = Recorder(value=0x12)
    bus.insert(dev, 0x80, 1)
    assert bus.read(0x80, 1) == 0x12


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_unknown_read_returns_all_ones_of_the_access_size(size: int) -> None:
    bus = Bus("mmio")
    assert bus.read(0xFEE0_0000, size) == (1 << (8 * size)) - 1
    assert bus.unknown_reads == 1


def test_unknown_write_is_ignored_and_counted() -> None:
    bus = Bus("pio")
    dev = Recorder()
    bus.insert(dev, 0x3F8, 8)
    bus.write(0x2F8, 1, 0x41)
    assert dev.writes == []
    assert bus.unknown_writes == 1


def test_unknown_address_is_logged_once_per_address(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="embervm.bus")
    bus = Bus("pio")
    for _ in range(5):
        bus.read(0x87, 1)
    assert len(unknown_records(caplog)) == 1
    assert "0x87" in unknown_records(caplog)[0].getMessage()
    assert "pio" in unknown_records(caplog)[0].getMessage()
    bus.read(0x22, 1)
    bus.write(0x22, 1, 0x70)  # a write to the same address is a separate, also-once cause
    bus.write(0x22, 1, 0x70)
    assert len(unknown_records(caplog)) == 3
    assert bus.unknown_reads == 6
    assert bus.unknown_writes == 2


def test_unknown_address_logging_is_bounded_under_a_scan(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="embervm.bus")
    bus = Bus("mmio")
    for addr in range(0xC000_0000, 0xC000_0000 + 4 * (LOGGED_CAUSES_MAX + 100), 4):
        assert bus.read(addr, 4) == 0xFFFF_FFFF
    assert len(unknown_records(caplog)) == LOGGED_CAUSES_MAX
    assert sum("no longer logging" in r.getMessage() for r in caplog.records) == 1


def test_address_scan_keeps_the_lookup_memo_bounded() -> None:
    bus = Bus("mmio")
    dev = Recorder()
    bus.insert(dev, 0xFEB0_0E00, 0x200)
    for addr in range(0x1_0000_0000, 0x1_0000_0000 + 3 * EXACT_MEMO_MAX):
        bus.read(addr, 1)
    assert len(bus._exact) <= EXACT_MEMO_MAX  # private, but the bound is the behaviour
    assert bus.read(0xFEB0_0E04, 2) == 0x104


def test_access_running_past_the_device_end_is_treated_as_unmapped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="embervm.bus")
    bus = Bus("pio")
    cmos = Recorder(value=0)
    bus.insert(cmos, 0x70, 2)
    assert bus.read(0x71, 2) == 0xFFFF  # 0x71-0x72: the second byte is not the device's
    bus.write(0x71, 4, 0)
    assert cmos.reads == [] and cmos.writes == []
    assert any("runs past the end" in r.getMessage() for r in caplog.records)


def test_unsupported_access_width_never_reaches_the_device() -> None:
    bus = Bus("mmio")
    dev = Recorder()
    bus.insert(dev, 0x1000, 0x100)
    assert bus.read(0x1000, 3) == 0xFF_FFFF
    bus.write(0x1000, 16, 1)
    assert dev.reads == [] and dev.writes == []


def test_device_exception_on_read_is_contained_as_all_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = Bus("mmio")
    bus.insert(Exploding(), 0xFEB0_0000, 0x200)
    for _ in range(3):
        assert bus.read(0xFEB0_0004, 4) == 0xFFFF_FFFF
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "RuntimeError" in errors[0].getMessage()
    assert bus.device_errors == 3


def test_device_exception_on_write_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    bus = Bus("pio")
    bus.insert(Exploding(), 0x3F8, 8)
    bus.write(0x3F8, 1, 0x41)
    bus.write(0x3F8, 1, 0x42)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "ValueError" in errors[0].getMessage()
    assert bus.device_errors == 2


def test_device_returning_a_too_wide_value_is_masked_to_the_access_size() -> None:
    bus = Bus("pio")
    bus.insert(Recorder(value=0x1_2345_6789), 0x60, 5)
    assert bus.read(0x60, 1) == 0x89
    assert bus.read(0x60, 2) == 0x6789


def test_write_value_is_masked_to_the_access_size() -> None:
    bus = Bus("pio")
    dev = Recorder()
    bus.insert(dev, 0x80, 1)
    bus.write(0x80, 1, 0x1FF)
    bus.write(0x80, 1, -1)
    assert dev.writes == [(0, 1, 0xFF), (0, 1, 0xFF)]


def test_all_ones_covers_unusual_sizes() -> None:
    assert all_ones(3) == 0xFF_FFFF
    assert all_ones(16) == (1 << 128) - 1
    assert all_ones(0) == 0
