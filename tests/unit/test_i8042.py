"""i8042: Linux's reboot=k path (kb_wait + 0xFE), the controller commands, and the keyboard:
Linux's i8042 + atkbd probe access by access, Ctrl-Alt-Del, IRQ 1, the scan buffer."""

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
    assert m.bus.read(STATUS, 1) & 0x03 == 0  # ignored: no answer waits
    for value in range(256):  # every byte to the keyboard, 0xFF (reset) last
        m.bus.write(DATA, 1, value)
    assert m.resets == 0
    assert m.bus.read(STATUS, 1) & 0x03 == 0x01  # the keyboard answers its reset...
    assert m.bus.read(DATA, 1) == 0xFA
    assert m.bus.read(DATA, 1) == 0xAA
    assert m.bus.read(STATUS, 1) & 0x03 == 0  # ...and nothing else is left behind


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


# -- the keyboard -------------------------------------------------------------------------------

OBF, AUXDATA = 0x01, 0x20
CTR_KBDINT, CTR_KBDDIS, CTR_XLATE = 0x01, 0x10, 0x40
CTRL_ALT_DEL_SET2 = [0x14, 0x11, 0xE0, 0x71]


class LinuxGuest:
    """The accesses Linux's drivers/input/serio/i8042.c and libps2 make, on a bus.

    ``irqs`` counts edges on IRQ 1 that the guest has not serviced yet; :meth:`service` runs
    i8042_interrupt() once per edge (read status, then one data byte if OBF is set).
    """

    def __init__(self) -> None:
        self.resets = 0
        self.irqs = 0
        self.kbc = I8042(self._reset, irq=self._irq)
        self.bus = Bus("pio")
        self.bus.insert(self.kbc, 0x60, 5)

    def _reset(self) -> None:
        self.resets += 1

    def _irq(self) -> None:
        self.irqs += 1

    def status(self) -> int:
        return self.bus.read(STATUS, 1)

    def command(self, command: int, params: tuple[int, ...] = ()) -> list[int] | None:
        """__i8042_command(): polled, with the interrupt handler locked out; None on error.

        ``command`` is Linux's encoding: bits 12-15 parameters, 8-11 answers, 0-7 the byte.
        """
        assert not self.status() & 0x02  # i8042_wait_write
        self.bus.write(STATUS, 1, command & 0xFF)
        nparams, nanswers = (command >> 12) & 0xF, (command >> 8) & 0xF
        assert len(params) == nparams
        for p in params:
            assert not self.status() & 0x02
            self.bus.write(DATA, 1, p)
        answers = []
        for _ in range(nanswers):
            if not self.status() & OBF:  # i8042_wait_read: the device answers at once or never
                return None
            if command == 0x11D3 and not self.status() & AUXDATA:
                return None  # "auxerr"
            answers.append(self.bus.read(DATA, 1))
        return answers

    def flush(self) -> int:
        """i8042_flush(): drain the output buffer (at most 16 bytes)."""
        n = 0
        while self.status() & OBF and n < 16:
            self.bus.read(DATA, 1)
            n += 1
        return n

    def service(self) -> list[int]:
        """Run the interrupt handler for every pending edge; the bytes it passed to serio."""
        got = []
        while self.irqs:
            self.irqs -= 1
            status = self.status()
            assert status & OBF, "IRQ 1 without data"
            assert not status & AUXDATA
            got.append(self.bus.read(DATA, 1))
        return got

    def ps2_command(self, byte: int, nreply: int) -> list[int]:
        """i8042_kbd_write() of one byte, then the interrupt-driven replies libps2 waits for."""
        assert not self.status() & 0x02
        self.bus.write(DATA, 1, byte)
        replies = self.service()
        assert len(replies) == nreply, (hex(byte), replies)
        return replies

    def probe(self) -> None:
        """i8042_controller_check/selftest/init, i8042_check_aux, i8042_setup_kbd, then
        atkbd_connect (probe, select set, reset state, activate), as Linux 6.1 on x86 does."""
        assert self.flush() < 16  # i8042_controller_check: a controller answers
        assert self.command(0x01AA) == [0x55]  # i8042_controller_selftest
        ctr = [self.command(0x0120), self.command(0x0120)]  # a stable CTR read
        assert ctr[0] == ctr[1]
        initial = ctr[0][0]
        assert not initial & CTR_XLATE  # -> i8042_direct: the port is not translated
        new = (initial | CTR_KBDDIS) & ~CTR_KBDINT
        assert self.status() & 0x10  # keylock off
        assert self.command(0x1060, (new,)) == []
        self.flush()
        # i8042_check_aux: the loopback fails (no AUXDATA), the AUX test says clock stuck low.
        self.flush()
        assert self.command(0x11D3, (0x5A,)) is None
        assert self.command(0x01A9) == [0x01]  # nonzero, not 0xfa/0xff: no AUX port
        # i8042_setup_kbd -> i8042_enable_kbd_port: interface and interrupt on.
        ctr_on = (new & ~CTR_KBDDIS) | CTR_KBDINT
        assert self.command(0x1060, (ctr_on,)) == []
        assert self.irqs == 0  # nothing from the keyboard yet
        # atkbd_probe: get ID, then deactivate.
        assert self.ps2_command(0xF2, 3) == [0xFA, 0xAB, 0x83]
        assert self.ps2_command(0xF5, 1) == [0xFA]
        # atkbd_select_set(2) sends nothing; atkbd_reset_state: LEDs off, fastest repeat.
        assert self.ps2_command(0xED, 1) == [0xFA]
        assert self.ps2_command(0x00, 1) == [0xFA]
        assert self.ps2_command(0xF3, 1) == [0xFA]
        assert self.ps2_command(0x00, 1) == [0xFA]
        # atkbd_activate
        assert self.ps2_command(0xF4, 1) == [0xFA]


@pytest.fixture
def g() -> LinuxGuest:
    guest = LinuxGuest()
    guest.probe()
    return guest


def test_linux_probe_finds_a_keyboard_and_no_mouse(g: LinuxGuest) -> None:
    assert g.kbc.config & (CTR_KBDINT | CTR_KBDDIS) == CTR_KBDINT
    assert g.kbc.leds == 0
    assert g.kbc.scancode_set == 2
    assert not g.status() & OBF
    assert g.resets == 0


def test_ctrl_alt_del_arrives_as_set2_make_codes_one_irq_per_byte(g: LinuxGuest) -> None:
    assert g.kbc.trigger_ctrl_alt_del()
    assert g.irqs == 1  # one edge for the first byte; the rest follow reads
    assert g.service() == CTRL_ALT_DEL_SET2
    assert g.irqs == 0
    assert not g.status() & OBF


def test_ctrl_alt_del_without_irq_callback_is_polled() -> None:
    kbc = I8042(lambda: None)
    assert kbc.trigger_ctrl_alt_del()
    got = []
    while kbc.read(4, 1) & OBF:
        got.append(kbc.read(0, 1))
    assert got == CTRL_ALT_DEL_SET2


def test_ctrl_alt_del_twice_queues_both_sequences(g: LinuxGuest) -> None:
    assert g.kbc.trigger_ctrl_alt_del()
    assert g.kbc.trigger_ctrl_alt_del()
    assert g.irqs == 1
    assert g.service() == CTRL_ALT_DEL_SET2 * 2


def test_scan_buffer_full_refuses_the_whole_sequence(g: LinuxGuest) -> None:
    for _ in range(4):  # 4 x 4 bytes fill Firecracker's 16-byte buffer
        assert g.kbc.trigger_ctrl_alt_del()
    assert not g.kbc.trigger_ctrl_alt_del()
    assert g.kbc.metrics()["error_count"] == 1
    assert g.service() == CTRL_ALT_DEL_SET2 * 4  # nothing of the refused one was queued
    assert g.kbc.trigger_ctrl_alt_del()  # room again once the guest has read
    assert g.service() == CTRL_ALT_DEL_SET2


def test_buffer_with_three_free_bytes_is_full_for_ctrl_alt_del(g: LinuxGuest) -> None:
    for _ in range(4):
        g.kbc.trigger_ctrl_alt_del()
    g.irqs = 0
    g.bus.read(DATA, 1)  # one byte read: 1 free, still no room for 4
    assert not g.kbc.trigger_ctrl_alt_del()


def test_keys_wait_while_the_interrupt_is_disabled_and_interrupt_when_enabled(
    g: LinuxGuest,
) -> None:
    ctr = g.kbc.config
    assert g.command(0x1060, (ctr & ~CTR_KBDINT,)) == []
    assert g.kbc.trigger_ctrl_alt_del()
    assert g.irqs == 0
    assert g.status() & OBF  # pollable
    assert g.command(0x1060, (ctr,)) == []
    assert g.irqs == 1
    assert g.service() == CTRL_ALT_DEL_SET2


def test_keys_are_held_while_the_keyboard_interface_is_disabled(g: LinuxGuest) -> None:
    assert g.command(0x00AD) == []
    assert g.kbc.trigger_ctrl_alt_del()
    assert g.irqs == 0
    assert not g.status() & OBF
    assert g.command(0x00AE) == []
    assert g.irqs == 1
    assert g.service() == CTRL_ALT_DEL_SET2


def test_controller_answer_comes_before_keys_and_does_not_interrupt(g: LinuxGuest) -> None:
    assert g.kbc.trigger_ctrl_alt_del()
    assert g.irqs == 1
    g.irqs = 0  # the handler is locked out while Linux runs a controller command
    assert g.command(0x0120) == [g.kbc.config]
    assert g.irqs == 1  # reading the answer uncovers the keys: a new edge
    assert g.service() == CTRL_ALT_DEL_SET2


def test_keys_pressed_while_scanning_is_disabled_come_after_enable(g: LinuxGuest) -> None:
    assert g.ps2_command(0xF5, 1) == [0xFA]
    assert g.kbc.trigger_ctrl_alt_del()
    assert g.irqs == 0
    assert g.ps2_command(0xF4, 5) == [0xFA, *CTRL_ALT_DEL_SET2]


def test_keys_do_not_interleave_with_a_command_and_its_parameter(g: LinuxGuest) -> None:
    assert g.ps2_command(0xED, 1) == [0xFA]  # now waiting for the LED byte
    assert g.kbc.trigger_ctrl_alt_del()
    assert g.irqs == 0
    assert g.ps2_command(0x04, 5) == [0xFA, *CTRL_ALT_DEL_SET2]
    assert g.kbc.leds == 0x04


def test_replies_come_before_queued_keys(g: LinuxGuest) -> None:
    assert g.command(0x1060, (g.kbc.config & ~CTR_KBDINT,)) == []
    assert g.kbc.trigger_ctrl_alt_del()
    g.bus.write(DATA, 1, 0xF2)
    got = [g.bus.read(DATA, 1) for _ in range(7)]
    assert got == [0xFA, 0xAB, 0x83, *CTRL_ALT_DEL_SET2]


@pytest.mark.parametrize(("scan_set", "codes"), [(1, [0x1D, 0x38, 0xE0, 0x53]),
                                                 (3, [0x11, 0x19, 0x64])])
def test_ctrl_alt_del_in_the_selected_scancode_set(
    g: LinuxGuest, scan_set: int, codes: list[int]
) -> None:
    assert g.ps2_command(0xF0, 1) == [0xFA]
    assert g.ps2_command(scan_set, 1) == [0xFA]
    assert g.ps2_command(0xF0, 1) == [0xFA]
    assert g.ps2_command(0x00, 2) == [0xFA, scan_set]  # query
    assert g.kbc.trigger_ctrl_alt_del()
    assert g.service() == codes
    assert g.ps2_command(0xF6, 1) == [0xFA]  # defaults: back to set 2
    assert g.kbc.scancode_set == 2


def test_invalid_scancode_set_is_refused(g: LinuxGuest) -> None:
    assert g.ps2_command(0xF0, 1) == [0xFA]
    assert g.ps2_command(0x04, 1) == [0xFE]
    assert g.kbc.scancode_set == 2


def test_keyboard_reset_answers_bat_and_drops_queued_keys(g: LinuxGuest) -> None:
    assert g.ps2_command(0xF5, 1) == [0xFA]
    assert g.kbc.trigger_ctrl_alt_del()  # held: scanning is off
    assert g.ps2_command(0xFF, 2) == [0xFA, 0xAA]
    assert g.ps2_command(0xF4, 1) == [0xFA]  # nothing left to deliver


def test_echo_resend_and_unknown_keyboard_commands(g: LinuxGuest) -> None:
    assert g.ps2_command(0xEE, 1) == [0xEE]
    assert g.ps2_command(0xF2, 3) == [0xFA, 0xAB, 0x83]
    assert g.ps2_command(0xFE, 1) == [0x83]  # resend: the last byte sent
    assert g.ps2_command(0xEF, 1) == [0xFE]
    assert g.ps2_command(0x42, 1) == [0xFE]  # not a command


def test_a_new_keyboard_command_discards_unread_replies(g: LinuxGuest) -> None:
    assert g.command(0x1060, (g.kbc.config & ~CTR_KBDINT,)) == []
    g.bus.write(DATA, 1, 0xF2)
    assert g.bus.read(DATA, 1) == 0xFA
    g.bus.write(DATA, 1, 0xEE)  # the host gave up on the ID bytes
    assert g.bus.read(DATA, 1) == 0xEE
    assert not g.status() & OBF


def test_set3_key_list_bytes_are_acknowledged(g: LinuxGuest) -> None:
    assert g.ps2_command(0xFB, 1) == [0xFA]
    assert g.ps2_command(0x11, 1) == [0xFA]
    assert g.ps2_command(0x64, 1) == [0xFA]
    assert g.ps2_command(0xF4, 1) == [0xFA]  # a command ends the list
    assert g.ps2_command(0x11, 1) == [0xFE]


def test_translation_bit_cannot_be_set(g: LinuxGuest) -> None:
    assert g.command(0x1060, (g.kbc.config | CTR_XLATE,)) == []
    assert not g.command(0x0120)[0] & CTR_XLATE  # so set 2 codes are never mistaken


def test_write_keyboard_output_buffer_interrupts_as_keyboard_data(g: LinuxGuest) -> None:
    assert g.command(0x10D2, (0x5A,)) == []
    assert g.irqs == 1
    assert g.service() == [0x5A]


def test_reset_pulse_still_works_after_the_probe(g: LinuxGuest) -> None:
    g.bus.write(STATUS, 1, 0xFE)
    assert g.resets == 1


def test_irq_failure_reaches_the_caller_and_the_edge_is_retried() -> None:
    edges = []
    failures = [OSError("eventfd")]

    def flaky_irq() -> None:
        if failures:
            raise failures.pop()
        edges.append(1)

    kbc = I8042(lambda: None, irq=flaky_irq)
    with pytest.raises(OSError):
        kbc.trigger_ctrl_alt_del()  # the caller (Firecracker's API) sees the error
    assert kbc.metrics()["error_count"] == 1
    assert edges == []
    kbc.write(4, 1, 0xAE)  # any later access finds the line down with a key waiting: retry
    assert edges == [1]
    assert kbc.read(0, 1) == 0x14  # the keys stayed queued


def test_irq_failure_on_a_read_still_returns_the_byte() -> None:
    calls = []

    def irq() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("eventfd")

    kbc = I8042(lambda: None, irq=irq)
    assert kbc.trigger_ctrl_alt_del()
    assert kbc.read(0, 1) == 0x14  # the edge for the next byte fails; this byte is not lost
    assert kbc.metrics()["error_count"] == 1
    assert [kbc.read(0, 1) for _ in range(3)] == [0x11, 0xE0, 0x71]


def test_metrics_count_accesses_by_kind(g: LinuxGuest) -> None:
    before = g.kbc.metrics()
    g.bus.read(STATUS, 1)
    g.bus.write(DATA, 1, 0xEE)
    g.bus.read(0x61, 1)
    g.bus.write(0x62, 1, 0)
    g.bus.write(STATUS, 1, 0xFE)
    after = g.kbc.metrics()
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {"error_count": 0, "missed_read_count": 1, "missed_write_count": 1,
                     "read_count": 1, "reset_count": 1, "write_count": 2}
