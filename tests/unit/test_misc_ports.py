"""CMOS-absent and port-sink stubs, and the legacy port map of embervm.devices.legacy."""

from __future__ import annotations

import logging

import pytest

from embervm.bus import Bus
from embervm.devices import legacy
from embervm.devices.legacy import CmosAbsent, PortSink

RTC_FREQ_SELECT = 0x0A  # register A


def cmos_read(bus: Bus, reg: int) -> int:
    """CMOS_READ: index to 0x70, data from 0x71."""
    bus.write(0x70, 1, reg)
    return bus.read(0x71, 1)


def test_cmos_register_a_reads_all_ones_so_the_patched_guest_sees_no_rtc() -> None:
    bus = Bus("pio")
    bus.insert(CmosAbsent(), 0x70, 2)
    assert cmos_read(bus, RTC_FREQ_SELECT) == 0xFF


@pytest.mark.parametrize("reg", [0x00, 0x0A, 0x0B, 0x0D, 0x32, 0x7F, 0x80 | 0x0A])
def test_every_cmos_register_reads_0xff_whatever_was_written(reg: int) -> None:
    bus = Bus("pio")
    bus.insert(CmosAbsent(), 0x70, 2)
    bus.write(0x71, 1, 0x00)  # writes to the data port change nothing
    assert cmos_read(bus, reg) == 0xFF
    assert bus.read(0x70, 1) == 0xFF


def test_cmos_wide_read_is_all_ones_of_the_access_size() -> None:
    cmos = CmosAbsent()
    assert cmos.read(0, 2) == 0xFFFF
    assert cmos.read(0, 4) == 0xFFFF_FFFF


def test_port_sink_swallows_post_codes_and_counts_them() -> None:
    bus = Bus("pio")
    sink = PortSink()
    bus.insert(sink, 0x80, 1)
    for code in range(100):
        bus.write(0x80, 1, code)  # outb_p's delay write
    assert bus.read(0x80, 1) == 0xFF
    assert (sink.writes, sink.reads) == (100, 1)
    assert bus.unknown_writes == 0


def test_stubbed_ports_produce_no_unknown_port_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="embervm.bus")
    bus = Bus("pio")
    bus.insert(CmosAbsent(), legacy.CMOS_PORT, legacy.CMOS_PORT_LENGTH)
    bus.insert(PortSink(), legacy.POST_PORT, 1)
    bus.insert(PortSink(), legacy.ALT_DELAY_PORT, 1)
    for _ in range(10):
        cmos_read(bus, RTC_FREQ_SELECT)
        bus.write(0x80, 1, 0)
        bus.write(0xED, 1, 0)
    assert caplog.records == []


def test_standard_legacy_port_map_has_no_overlaps() -> None:
    bus = Bus("pio")
    bus.insert(legacy.Serial(lambda: None, lambda data: None), legacy.COM1_PORT,
               legacy.SERIAL_PORT_LENGTH)
    bus.insert(legacy.I8042(lambda: None), legacy.I8042_PORT, legacy.I8042_PORT_LENGTH)
    bus.insert(CmosAbsent(), legacy.CMOS_PORT, legacy.CMOS_PORT_LENGTH)
    bus.insert(PortSink(), legacy.POST_PORT, 1)
    bus.insert(PortSink(), legacy.ALT_DELAY_PORT, 1)
    assert [base for _, base, _ in bus.ranges()] == [0x60, 0x70, 0x80, 0xED, 0x3F8]
    assert legacy.COM1_IRQ == 4
