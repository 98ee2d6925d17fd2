"""16550A UART: Linux's 8250 probe, console and interrupt paths, receive buffer, threading.

The sequences below follow drivers/tty/serial/8250/8250_port.c (autoconfig, autoconfig_16550a,
size_fifo, serial8250_do_startup, serial8250_console_write, serial8250_handle_irq) step by step,
so a register that behaved differently from what Linux expects would show up here.
"""

from __future__ import annotations

import threading

import pytest

from embervm.bus import Bus
from embervm.devices.legacy.serial import (
    FIFO_SIZE,
    RX_BUFFER_SIZE,
    UART_DLL,
    UART_DLM,
    UART_FCR,
    UART_IER,
    UART_IIR,
    UART_LCR,
    UART_LSR,
    UART_MCR,
    UART_MSR,
    UART_RX,
    UART_SCR,
    UART_TX,
    Serial,
)

UART_LCR_CONF_MODE_A = 0x80
UART_LCR_CONF_MODE_B = 0xBF
UART_LCR_WLEN8 = 0x03
UART_EFR = 2
UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04
UART_FCR7_64BYTE = 0x20
UART_FCR_R_TRIG_10 = 0x80
UART_IIR_NO_INT = 0x01
UART_IIR_64BYTE_FIFO = 0x20
UART_IIR_FIFO_ENABLED_16550A = 0xC0
UART_IER_RDI = 0x01
UART_IER_THRI = 0x02
UART_IER_RLSI = 0x04
UART_IER_MSI = 0x08
UART_IER_UUE = 0x40
UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10
UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
BOTH_EMPTY = UART_LSR_THRE | UART_LSR_TEMT


class Harness:
    """A Serial with recording callbacks and Linux-style serial_in/serial_out helpers."""

    def __init__(self) -> None:
        self.irqs = 0
        self.output = bytearray()
        self.uart = Serial(self._irq, self.output.extend)

    def _irq(self) -> None:
        self.irqs += 1

    def inb(self, reg: int) -> int:
        return self.uart.read(reg, 1)

    def outb(self, reg: int, value: int) -> None:
        self.uart.write(reg, 1, value)


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- Linux's probe ---------------------------------------------------------------------------


def linux_autoconfig(h: Harness) -> str:
    """autoconfig() from 8250_port.c (no UPF_SKIP_TEST/BUGGY_UART), returning the port type."""
    scratch = h.inb(UART_IER)
    h.outb(UART_IER, 0)
    scratch2 = h.inb(UART_IER) & 0x0F
    h.outb(UART_IER, 0x0F)
    scratch3 = h.inb(UART_IER) & 0x0F
    h.outb(UART_IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "IER test failed"

    save_mcr = h.inb(UART_MCR)
    save_lcr = h.inb(UART_LCR)
    h.outb(UART_MCR, UART_MCR_LOOP | 0x0A)
    status1 = h.inb(UART_MSR) & 0xF0
    h.outb(UART_MCR, save_mcr)
    if status1 != 0x90:
        return "LOOP test failed"

    h.outb(UART_LCR, UART_LCR_CONF_MODE_B)
    h.outb(UART_EFR, 0)
    h.outb(UART_LCR, 0)
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    kind = {0: "8250/16450", 1: "unknown", 2: "16550", 3: "16550A"}[h.inb(UART_IIR) >> 6]
    h.outb(UART_LCR, save_lcr)
    if kind == "16550A":
        # "Reset the UART"
        h.outb(UART_MCR, save_mcr)
        serial8250_clear_fifos(h)
        h.inb(UART_RX)
        h.outb(UART_IER, 0)
    return kind


def serial8250_clear_fifos(h: Harness) -> None:
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT)
    h.outb(UART_FCR, 0)


def size_fifo(h: Harness) -> int:
    old_lcr = h.inb(UART_LCR)
    h.outb(UART_LCR, 0)
    old_fcr = h.inb(UART_FCR)
    old_mcr = h.inb(UART_MCR)
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT)
    h.outb(UART_MCR, UART_MCR_LOOP)
    h.outb(UART_LCR, UART_LCR_CONF_MODE_A)
    old_dl = h.inb(UART_DLL) | h.inb(UART_DLM) << 8
    h.outb(UART_DLL, 1)
    h.outb(UART_DLM, 0)
    h.outb(UART_LCR, UART_LCR_WLEN8)
    for count in range(256):
        h.outb(UART_TX, count)
    count = 0
    while h.inb(UART_LSR) & UART_LSR_DR and count < 256:
        h.inb(UART_RX)
        count += 1
    h.outb(UART_FCR, old_fcr)
    h.outb(UART_MCR, old_mcr)
    h.outb(UART_LCR, old_lcr)
    h.outb(UART_LCR, old_lcr | UART_LCR_CONF_MODE_A)
    h.outb(UART_DLL, old_dl & 0xFF)
    h.outb(UART_DLM, old_dl >> 8)
    h.outb(UART_LCR, old_lcr)
    return count


def autoconfig_16550a_variants(h: Harness) -> str:
    """autoconfig_16550a() with CONFIG_SERIAL_8250_16550A_VARIANTS (not in the kit's kernels)."""
    h.outb(UART_LCR, UART_LCR_CONF_MODE_A)
    if h.inb(UART_EFR) == 0:
        return "EFR at DLAB (ST16C650V1/FSL64)"
    h.outb(UART_LCR, UART_LCR_CONF_MODE_B)
    if h.inb(UART_EFR) == 0:
        return "EFRv2"
    h.outb(UART_LCR, 0)
    status1 = h.inb(UART_MCR)
    h.outb(UART_LCR, 0xE0)
    status2 = h.inb(0x02)
    if not (status2 ^ status1) & UART_MCR_LOOP:
        h.outb(UART_LCR, 0)
        h.outb(UART_MCR, status1 ^ UART_MCR_LOOP)
        h.outb(UART_LCR, 0xE0)
        status2 = h.inb(0x02)
        h.outb(UART_LCR, 0)
        h.outb(UART_MCR, status1)
        if (status2 ^ status1) & UART_MCR_LOOP:
            return "NS16550A"
    h.outb(UART_LCR, 0)
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE)
    status1 = h.inb(UART_IIR) & (UART_IIR_64BYTE_FIFO | UART_IIR_FIFO_ENABLED_16550A)
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    h.outb(UART_LCR, UART_LCR_CONF_MODE_A)
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR7_64BYTE)
    status2 = h.inb(UART_IIR) & (UART_IIR_64BYTE_FIFO | UART_IIR_FIFO_ENABLED_16550A)
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    h.outb(UART_LCR, 0)
    if status1 == UART_IIR_FIFO_ENABLED_16550A and status2 == (
        UART_IIR_64BYTE_FIFO | UART_IIR_FIFO_ENABLED_16550A
    ):
        return "16750"
    iersave = h.inb(UART_IER)
    h.outb(UART_IER, iersave & ~UART_IER_UUE)
    if not h.inb(UART_IER) & UART_IER_UUE:
        h.outb(UART_IER, iersave | UART_IER_UUE)
        if h.inb(UART_IER) & UART_IER_UUE:
            return "XScale"
    h.outb(UART_IER, iersave)
    if size_fifo(h) == 64:
        return "U6_16550A"
    return "16550A"


def test_linux_autoconfig_detects_a_16550a(h: Harness) -> None:
    assert linux_autoconfig(h) == "16550A"


def test_linux_autoconfig_restores_lcr_mcr_and_leaves_interrupts_off(h: Harness) -> None:
    h.outb(UART_LCR, UART_LCR_WLEN8)
    h.outb(UART_MCR, UART_MCR_DTR | UART_MCR_RTS)
    assert linux_autoconfig(h) == "16550A"
    assert h.inb(UART_LCR) == UART_LCR_WLEN8
    assert h.inb(UART_MCR) == UART_MCR_DTR | UART_MCR_RTS
    assert h.inb(UART_IER) == 0
    assert h.inb(UART_IIR) & 0x0F == UART_IIR_NO_INT


def test_16550a_variant_probes_also_conclude_16550a(h: Harness) -> None:
    assert linux_autoconfig(h) == "16550A"
    assert autoconfig_16550a_variants(h) == "16550A"


def test_loopback_fifo_holds_sixteen_bytes_like_a_16550a(h: Harness) -> None:
    assert size_fifo(h) == FIFO_SIZE
    assert h.output == b""  # loopback bytes never reach the wire


def test_ier_keeps_only_the_four_interrupt_enable_bits(h: Harness) -> None:
    h.outb(UART_IER, 0xFF)
    assert h.inb(UART_IER) == 0x0F


def test_scratch_register_holds_any_byte(h: Harness) -> None:
    for value in (0x00, 0x55, 0xAA, 0xFF):
        h.outb(UART_SCR, value)
        assert h.inb(UART_SCR) == value


@pytest.mark.parametrize("outputs", range(16))
def test_loopback_reflects_mcr_outputs_into_msr(h: Harness, outputs: int) -> None:
    h.outb(UART_MCR, UART_MCR_LOOP | outputs)
    msr = h.inb(UART_MSR) & 0xF0
    expected = (
        (0x10 if outputs & UART_MCR_RTS else 0)  # CTS
        | (0x20 if outputs & UART_MCR_DTR else 0)  # DSR
        | (0x40 if outputs & UART_MCR_OUT1 else 0)  # RI
        | (0x80 if outputs & UART_MCR_OUT2 else 0)  # DCD
    )
    assert msr == expected


def test_modem_inputs_outside_loopback_show_a_connected_peer(h: Harness) -> None:
    assert h.inb(UART_MSR) == 0xB0  # CTS, DSR, DCD; no deltas at reset


def test_loopback_changes_set_msr_deltas_and_reading_msr_clears_them(h: Harness) -> None:
    h.outb(UART_MCR, UART_MCR_LOOP | UART_MCR_OUT1)  # CTS 1->0, DSR 1->0, RI 0->1, DCD 1->0
    assert h.inb(UART_MSR) == 0x40 | 0x01 | 0x02 | 0x08
    assert h.inb(UART_MSR) == 0x40
    h.outb(UART_MCR, UART_MCR_LOOP)  # RI 1->0: trailing edge
    assert h.inb(UART_MSR) == 0x04


def test_iir_shows_fifo_bits_only_while_fifos_are_enabled(h: Harness) -> None:
    assert h.inb(UART_IIR) == UART_IIR_NO_INT
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_R_TRIG_10)
    assert h.inb(UART_IIR) == 0xC0 | UART_IIR_NO_INT
    h.outb(UART_FCR, 0)
    assert h.inb(UART_IIR) == UART_IIR_NO_INT


def test_fcr_write_under_dlab_still_reaches_fcr(h: Harness) -> None:
    # autoconfig writes "EFR" = 0 with LCR = 0xBF: on a 16550A that is the FCR.
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    h.outb(UART_LCR, UART_LCR_CONF_MODE_B)
    h.outb(UART_EFR, 0)
    h.outb(UART_LCR, 0)
    assert h.inb(UART_IIR) == UART_IIR_NO_INT


def test_divisor_latch_is_banked_behind_dlab(h: Harness) -> None:
    h.outb(UART_IER, UART_IER_RDI)
    h.outb(UART_LCR, UART_LCR_WLEN8 | 0x80)
    assert (h.inb(UART_DLL), h.inb(UART_DLM)) == (12, 0)  # 9600 baud at reset
    h.outb(UART_DLL, 0x01)
    h.outb(UART_DLM, 0x02)
    assert (h.inb(UART_DLL), h.inb(UART_DLM)) == (0x01, 0x02)
    h.outb(UART_LCR, UART_LCR_WLEN8)
    assert h.inb(UART_IER) == UART_IER_RDI
    assert h.output == b""  # the DLL write was not a transmitted byte
    h.outb(UART_LCR, UART_LCR_WLEN8 | 0x80)
    assert (h.inb(UART_DLL), h.inb(UART_DLM)) == (0x01, 0x02)


def test_wide_access_covers_consecutive_registers(h: Harness) -> None:
    h.outb(UART_SCR, 0x5A)
    # LSR, MSR, SCR as one 4-byte read at offset 5 would run past the UART: the bus refuses it,
    # but a direct 2-byte read at offset 6 reads MSR then SCR.
    assert h.uart.read(UART_MSR, 2) == 0xB0 | 0x5A << 8
    h.uart.write(UART_LCR, 2, 0x03 | UART_MCR_DTR << 8)
    assert (h.inb(UART_LCR), h.inb(UART_MCR)) == (0x03, UART_MCR_DTR)


# -- transmit ----------------------------------------------------------------------------------


def test_thr_write_hands_the_byte_to_out(h: Harness) -> None:
    for ch in b"ok\n":
        h.outb(UART_TX, ch)
    assert bytes(h.output) == b"ok\n"
    assert h.uart.metrics.tx_bytes == 3


def test_console_write_sees_thre_at_the_first_lsr_poll(h: Harness) -> None:
    """serial8250_console_write: save IER, clear it, poll LSR + write THR per byte, restore."""
    h.outb(UART_IER, UART_IER_RDI | UART_IER_RLSI)
    ier = h.inb(UART_IER)
    h.outb(UART_IER, 0)
    polls = 0
    for ch in b"Linux version 6.1\r\n":
        while True:
            polls += 1
            if h.inb(UART_LSR) & UART_LSR_THRE:
                break
            assert polls < 10_000
        h.outb(UART_TX, ch)
    assert h.inb(UART_LSR) & BOTH_EMPTY == BOTH_EMPTY
    h.outb(UART_IER, ier)
    assert bytes(h.output) == b"Linux version 6.1\r\n"
    assert polls == len(b"Linux version 6.1\r\n")
    assert h.irqs == 0  # nothing enabled was pending


def test_thre_interrupt_raised_when_thri_enabled(h: Harness) -> None:
    h.outb(UART_IER, UART_IER_THRI)
    assert h.irqs == 1
    assert h.inb(UART_IIR) & 0x0F == 0x02
    h.outb(UART_TX, ord("a"))
    assert h.irqs == 2


def test_thre_interrupt_not_raised_when_thri_clear(h: Harness) -> None:
    h.outb(UART_IER, UART_IER_RDI)
    for ch in b"abc":
        h.outb(UART_TX, ch)
    assert h.irqs == 0
    assert h.inb(UART_IIR) & 0x0F == UART_IIR_NO_INT


def test_reading_iir_acknowledges_thre_until_the_next_thr_write(h: Harness) -> None:
    h.outb(UART_IER, UART_IER_THRI)
    assert h.inb(UART_IIR) & 0x0F == 0x02
    assert h.inb(UART_IIR) & 0x0F == UART_IIR_NO_INT
    h.outb(UART_TX, ord("x"))
    assert h.inb(UART_IIR) & 0x0F == 0x02


def test_startup_thre_reassert_and_txen_tests_pass(h: Harness) -> None:
    """serial8250_do_startup: both must see THRE, or Linux sets UART_BUG_THRE / _TXEN."""
    assert h.inb(UART_LSR) & UART_LSR_THRE
    h.outb(UART_IER, UART_IER_THRI)
    iir1 = h.inb(UART_IIR)
    h.outb(UART_IER, 0)
    h.outb(UART_IER, UART_IER_THRI)
    iir = h.inb(UART_IIR)
    h.outb(UART_IER, 0)
    assert not iir1 & UART_IIR_NO_INT and not iir & UART_IIR_NO_INT  # no UART_BUG_THRE

    h.outb(UART_LCR, UART_LCR_WLEN8)
    h.outb(UART_MCR, UART_MCR_DTR | UART_MCR_RTS | UART_MCR_OUT2)
    h.outb(UART_IER, UART_IER_THRI)
    lsr = h.inb(UART_LSR)
    iir = h.inb(UART_IIR)
    h.outb(UART_IER, 0)
    assert not (lsr & UART_LSR_TEMT and iir & UART_IIR_NO_INT)  # no UART_BUG_TXEN


def test_interrupt_driven_transmit_drains_like_serial8250_tx_chars(h: Harness) -> None:
    """start_tx sets THRI; each interrupt: IIR, LSR, up to 16 bytes; stop_tx clears THRI."""
    pending = bytearray(b"x" * 40)
    h.outb(UART_IER, UART_IER_RDI | UART_IER_RLSI | UART_IER_THRI)
    handled = 0
    while h.irqs > handled:  # the "CPU" takes each edge
        handled += 1
        while not (iir := h.inb(UART_IIR)) & UART_IIR_NO_INT:  # serial8250_interrupt loop
            assert iir & 0x0F == 0x02
            assert h.inb(UART_LSR) & UART_LSR_THRE
            if not pending:
                h.outb(UART_IER, UART_IER_RDI | UART_IER_RLSI)  # __stop_tx
                continue
            for _ in range(min(16, len(pending))):
                h.outb(UART_TX, pending.pop())
        assert handled < 100
    assert bytes(h.output) == b"x" * 40
    assert h.inb(UART_IER) == UART_IER_RDI | UART_IER_RLSI


def test_out_callback_failure_is_contained_and_interrupts_continue() -> None:
    irqs: list[int] = []

    def broken_out(data: bytes) -> None:
        raise BrokenPipeError("terminal went away")

    uart = Serial(lambda: irqs.append(1), broken_out)
    uart.write(UART_IER, 1, UART_IER_THRI)
    uart.read(UART_IIR, 1)
    uart.write(UART_TX, 1, 0x41)  # must not raise
    assert len(irqs) == 2
    assert uart.metrics.callback_errors == 1


# -- receive -----------------------------------------------------------------------------------


def test_enqueued_input_sets_lsr_dr_and_rbr_reads_in_order(h: Harness) -> None:
    assert not h.inb(UART_LSR) & UART_LSR_DR
    h.uart.enqueue_input(b"hi")
    h.uart.enqueue_input(b"!")
    got = bytearray()
    while h.inb(UART_LSR) & UART_LSR_DR:
        got.append(h.inb(UART_RX))
        assert len(got) <= 3
    assert bytes(got) == b"hi!"
    assert h.uart.metrics.rx_bytes == 3


def test_rx_interrupt_raised_when_rdi_enabled(h: Harness) -> None:
    h.outb(UART_IER, UART_IER_RDI)
    h.uart.enqueue_input(b"a")
    assert h.irqs == 1
    assert h.inb(UART_IIR) & 0x0F == 0x04


def test_rx_interrupt_not_raised_when_rdi_clear(h: Harness) -> None:
    h.outb(UART_IER, UART_IER_RLSI)
    h.uart.enqueue_input(b"a")
    assert h.irqs == 0
    assert h.inb(UART_IIR) & 0x0F == UART_IIR_NO_INT


def test_rx_interrupt_fires_once_per_arrival_while_data_waits(h: Harness) -> None:
    h.outb(UART_IER, UART_IER_RDI)
    h.uart.enqueue_input(b"a")
    h.uart.enqueue_input(b"b")  # still undrained: no new cause, no new edge
    assert h.irqs == 1
    h.inb(UART_RX)
    h.inb(UART_RX)
    h.uart.enqueue_input(b"c")  # buffer was empty: a new cause
    assert h.irqs == 2


def test_enabling_rdi_with_data_waiting_raises_the_interrupt(h: Harness) -> None:
    h.uart.enqueue_input(b"typed before the tty was opened")
    assert h.irqs == 0
    h.outb(UART_IER, UART_IER_RDI | UART_IER_RLSI)
    assert h.irqs == 1


def test_iir_priorities_line_status_then_data_then_thre_then_modem(h: Harness) -> None:
    h.outb(UART_MCR, UART_MCR_LOOP)  # modem status changes -> MSR deltas
    h.outb(UART_MCR, 0)
    h.uart.enqueue_input(b"z" * (RX_BUFFER_SIZE + 1))  # one byte too many -> overrun
    h.outb(UART_IER, 0x0F)  # THRI 0->1 arms THRE as well
    assert h.inb(UART_IIR) & 0x0F == 0x06  # receiver line status
    assert h.inb(UART_LSR) & UART_LSR_OE  # reading LSR clears it
    assert h.inb(UART_IIR) & 0x0F == 0x04  # received data
    for _ in range(RX_BUFFER_SIZE):
        h.inb(UART_RX)
    assert h.inb(UART_IIR) & 0x0F == 0x02  # THR empty (this read acknowledges it)
    assert h.inb(UART_IIR) & 0x0F == 0x00  # modem status
    assert h.inb(UART_MSR) & 0x0F
    assert h.inb(UART_IIR) & 0x0F == UART_IIR_NO_INT


def test_overflow_drops_the_excess_and_reports_one_overrun(h: Harness) -> None:
    h.outb(UART_IER, UART_IER_RLSI)
    h.uart.enqueue_input(bytes(range(256)) * (RX_BUFFER_SIZE // 256))
    assert not h.uart.wants_input()
    assert h.irqs == 0
    h.uart.enqueue_input(b"lost!")
    assert h.uart.metrics.rx_dropped == 5
    assert h.irqs == 1  # line-status interrupt
    assert h.inb(UART_LSR) & UART_LSR_OE
    assert not h.inb(UART_LSR) & UART_LSR_OE  # OE is cleared by the read
    first = [h.inb(UART_RX) for _ in range(512)]
    assert first == list(range(256)) * 2  # what was accepted is intact and in order
    assert h.uart.wants_input()


def test_input_room_tracks_the_free_buffer_space(h: Harness) -> None:
    assert h.uart.input_room() == RX_BUFFER_SIZE
    h.uart.enqueue_input(b"abc")
    assert h.uart.input_room() == RX_BUFFER_SIZE - 3
    h.inb(UART_RX)
    assert h.uart.input_room() == RX_BUFFER_SIZE - 2


def test_partial_fit_keeps_the_head_of_the_chunk(h: Harness) -> None:
    h.uart.enqueue_input(b"\0" * (RX_BUFFER_SIZE - 2))
    h.uart.enqueue_input(memoryview(b"abcd"))
    for _ in range(RX_BUFFER_SIZE - 2):
        h.inb(UART_RX)
    assert (h.inb(UART_RX), h.inb(UART_RX)) == (ord("a"), ord("b"))
    assert not h.inb(UART_LSR) & UART_LSR_DR


def test_fifo_clear_discards_only_the_fifo_not_the_queued_input(h: Harness) -> None:
    h.uart.enqueue_input(bytes(range(40)))
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO)  # FIFO mode change resets the FIFO: 16 bytes
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO | UART_FCR_CLEAR_RCVR)  # another 16
    assert h.inb(UART_RX) == 32


def test_loopback_sends_thr_to_the_receiver_not_to_out(h: Harness) -> None:
    h.outb(UART_FCR, UART_FCR_ENABLE_FIFO)
    h.outb(UART_MCR, UART_MCR_LOOP)
    h.outb(UART_TX, 0x42)
    assert h.output == b""
    assert h.inb(UART_LSR) & UART_LSR_DR
    assert h.inb(UART_RX) == 0x42


def test_loopback_overflow_sets_overrun(h: Harness) -> None:
    h.outb(UART_MCR, UART_MCR_LOOP)  # FIFO disabled: a single holding register
    h.outb(UART_TX, 1)
    h.outb(UART_TX, 2)
    assert h.inb(UART_LSR) & (UART_LSR_DR | UART_LSR_OE) == UART_LSR_DR | UART_LSR_OE
    assert h.inb(UART_RX) == 1
    assert h.uart.metrics.loopback_overruns == 1


def test_serial_on_the_pio_bus_at_com1(h: Harness) -> None:
    bus = Bus("pio")
    bus.insert(h.uart, 0x3F8, 8)
    bus.write(0x3FF, 1, 0xA5)
    assert bus.read(0x3FF, 1) == 0xA5
    bus.write(0x3F8, 1, ord("$"))
    assert bus.read(0x3FD, 1) & BOTH_EMPTY == BOTH_EMPTY
    assert bytes(h.output) == b"$"


# -- threads -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_concurrent_input_and_guest_reads_lose_and_reorder_nothing() -> None:
    irq_count = [0]
    out = bytearray()
    uart = Serial(lambda: irq_count.__setitem__(0, irq_count[0] + 1), out.extend)
    uart.write(UART_IER, 1, UART_IER_RDI | UART_IER_THRI)
    payload = bytes(i * 7 % 251 for i in range(200_000))
    done = threading.Event()

    def producer() -> None:
        pos = 0
        while pos < len(payload):
            if uart.wants_input():
                chunk = payload[pos : pos + min(997, uart.input_room())]
                uart.enqueue_input(chunk)
                pos += len(chunk)
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    got = bytearray()
    while len(got) < len(payload):
        if uart.read(UART_LSR, 1) & UART_LSR_DR:
            got.append(uart.read(UART_RX, 1))
        uart.read(UART_IIR, 1)
        uart.write(UART_TX, 1, 0x2E)  # vCPU traffic interleaved with the producer
    thread.join()
    assert done.is_set()
    assert bytes(got) == payload
    assert uart.metrics.rx_dropped == 0
    assert uart.metrics.rx_bytes == len(payload)
    assert len(out) == uart.metrics.tx_bytes
