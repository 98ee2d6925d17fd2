"""i8042: Linux's reboot=k path (kb_wait + 0xFE) and the minimal controller commands."""

from __future__ import annotations

import logging

import pytest

from embervm.bus import Bus
from embervm.devices.legacy.i8042 import I8042

STATUS = 0x64
DATA = 0x60


class Machine:
    def __init__(self) -> None:
        self.resets = 0
        self.kbc = I8042(self._reset)
        self.bus = Bus("pio")
        self.bus.insert(self.kbc, 0x60, 5)

    def _reset(self) -> None:
        self.resets += 1


@pytest.fixture
def m() -> Machine:
    return Machine()


def kb_wait(m: Machine) -> int:
    """arch/x86/kernel/reboot.c: poll status until the input buffer is empty (bit 1 clear)."""
    for i in range(0x10000):
        if not m.bus.read(STATUS, 1) & 0x02:
            return i + 1
    return 0x10000


def test_status_reports_empty_input_and_output_buffers(m: Machine) -> None:
    status = m.bus.read(STATUS, 1)
    assert status & 0x03 == 0  # neither OBF nor IBF
    assert status & 0x04  # system flag: POST passed


def test_kb_wait_ends_at_the_first_status_read(m: Machine) -> None:
    assert kb_wait(m) == 1


def test_pulse_reset_command_calls_reset_exactly_once(m: Machine) -> None:
    kb_wait(m)
    m.bus.write(STATUS, 1, 0xFE)
    assert m.resets == 1
    assert m.kbc.reset_requests == 1


def test_linux_reboot_loop_calls_reset_for_every_pulse(m: Machine) -> None:
    """If the VMM does not stop the vCPU at once, Linux pulses up to ten times."""
    for _ in range(10):
        assert kb_wait(m) == 1
        m.bus.write(STATUS, 1, 0xFE)
    assert m.resets == 10


@pytest.mark.parametrize("cmd", [0xF0, 0xF2, 0xFC])
def test_any_pulse_command_with_line_zero_in_the_mask_resets(m: Machine, cmd: int) -> None:
    m.bus.write(STATUS, 1, cmd)
    assert m.resets == 1


@pytest.mark.parametrize("cmd", [0xFF, 0xF1, 0xFD])
def test_pulse_commands_that_spare_line_zero_do_not_reset(m: Machine, cmd: int) -> None:
    m.bus.write(STATUS, 1, cmd)
    assert m.resets == 0


def test_reset_byte_on_the_data_port_is_not_a_reset(m: Machine) -> None:
    m.bus.write(DATA, 1, 0xFE)  # a keyboard command ("resend") to a keyboard that is absent
    assert m.resets == 0


def test_config_byte_reads_back_through_0x20_after_0x60_writes_it(m: Machine) -> None:
    m.bus.write(STATUS, 1, 0x20)
    assert m.bus.read(STATUS, 1) & 0x01  # the answer waits in the output buffer
    original = m.bus.read(DATA, 1)
    assert not m.bus.read(STATUS, 1) & 0x01  # reading it empties the buffer
    m.bus.write(STATUS, 1, 0x60)
    m.bus.write(DATA, 1, original | 0x14)  # the old "set system flag, disable keyboard" fixup
    m.bus.write(STATUS, 1, 0x20)
    assert m.bus.read(DATA, 1) == original | 0x14
    assert m.kbc.config == original | 0x14


def test_system_flag_in_status_follows_the_config_byte(m: Machine) -> None:
    m.bus.write(STATUS, 1, 0x60)
    m.bus.write(DATA, 1, 0x00)
    assert not m.bus.read(STATUS, 1) & 0x04
    m.bus.write(STATUS, 1, 0xAA)  # controller self-test sets it again
    assert m.bus.read(DATA, 1) == 0x55
    assert m.bus.read(STATUS, 1) & 0x04


def test_output_port_write_with_reset_bit_low_resets(m: Machine) -> None:
    m.bus.write(STATUS, 1, 0xD0)
    port = m.bus.read(DATA, 1)
    assert port & 0x01  # reset line not asserted
    m.bus.write(STATUS, 1, 0xD1)
    m.bus.write(DATA, 1, port | 0x01)
    assert m.resets == 0
    m.bus.write(STATUS, 1, 0xD1)
    m.bus.write(DATA, 1, port & ~0x01)
    assert m.resets == 1


def test_enable_disable_commands_update_the_config_byte(m: Machine) -> None:
    m.bus.write(STATUS, 1, 0xAD)
    m.bus.write(STATUS, 1, 0xA7)
    assert m.kbc.config & 0x30 == 0x30
    m.bus.write(STATUS, 1, 0xAE)
    m.bus.write(STATUS, 1, 0xA8)
    assert m.kbc.config & 0x30 == 0


def test_unknown_commands_are_harmless(m: Machine) -> None:
    for cmd in (0x00, 0x10, 0xC0, 0xE0, 0xA1):
        m.bus.write(STATUS, 1, cmd)
    for value in range(256):
        m.bus.write(DATA, 1, value)
    assert m.resets == 0
    assert m.bus.read(STATUS, 1) & 0x03 == 0


def test_ports_0x61_to_0x63_read_all_ones_and_log_once(
    m: Machine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="embervm.devices.legacy.i8042")
    for _ in range(3):
        assert m.bus.read(0x61, 1) == 0xFF
    m.bus.write(0x61, 1, 0x03)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("guest read of port 0x61" in msg for msg in messages) == 1
    assert sum("guest write of port 0x61" in msg for msg in messages) == 1
    assert m.resets == 0
