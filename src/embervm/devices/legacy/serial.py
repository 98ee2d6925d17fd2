"""A 16550A-compatible UART: the guest's ``ttyS0`` and kernel console.

A plain state machine fed register accesses (the rust-vmm ``vm-superio`` model): no threads and
no I/O inside.  Bytes the guest transmits go to ``out``; bytes for the guest come in through
:meth:`Serial.enqueue_input`; interrupts leave through ``interrupt``.

What Linux's 8250 driver (``drivers/tty/serial/8250/8250_port.c``) relies on, and how it is met:

* ``autoconfig()``: IER keeps exactly the four interrupt-enable bits (it writes 0 and 0x0F and
  reads them back; bits 7:4 read as zero, so the XScale UUE probe fails as it must); with
  ``MCR = LOOP | OUT2 | RTS`` the MSR high nibble reads 0x90 (loopback reflects RTS->CTS,
  DTR->DSR, OUT1->RI, OUT2->DCD); after ``FCR = ENABLE_FIFO`` the IIR top bits read 0b11.  The
  port is then reported as a 16550A.  With ``SERIAL_8250_16550A_VARIANTS`` the further probes also
  land on 16550A: reading offset 2 returns the IIR (never 0: no EFR), IIR bits 5:4 stay clear
  (no 64-byte FIFO, no NatSemi bank switch), and loopback holds 16 bytes like a real FIFO.
* ``serial8250_do_startup()``: enabling IER.THRI while the transmitter is empty makes a THRE
  interrupt pending at once, reading the IIR clears it, and re-enabling THRI re-asserts it
  (otherwise Linux flags ``UART_BUG_THRE``/``UART_BUG_TXEN`` and falls back to timers).
* ``serial8250_console_write()``: polls LSR for THRE and writes THR, one byte per exit.
  The transmitter is infinitely fast here: LSR always shows THRE|TEMT, so every poll succeeds at
  the first read and a console byte costs exactly two exits (LSR read, THR write).

Interrupts: the UART's IRQ is edge-triggered ISA IRQ 4 (the VMM wires ``interrupt`` to an irqfd).
``interrupt()`` is called whenever an *enabled* interrupt cause becomes pending that was not
pending before (received data, THR empty, line status, modem status), which gives the guest an
edge for each new cause without an edge storm: Linux's handler (``serial8250_interrupt``) loops
until the IIR reads "no interrupt", so causes that arrive while it runs are served in the same
pass.  Reads never raise an interrupt; they only clear causes.

Receive path: host input waits in one bounded buffer (:data:`RX_BUFFER_SIZE`, 64 KiB).  The
first :data:`FIFO_SIZE` bytes of it play the 16550A's receive FIFO (what an FCR "clear receiver"
discards); the rest is still "on the wire".  The guest sees LSR.DR while any byte waits.  Input
that does not fit is dropped, counted in ``metrics.rx_dropped``, and reported to the guest as an
overrun (LSR.OE, a line-status interrupt if enabled), exactly what a UART does when its FIFO
overflows.  A producer that wants back-pressure instead reads its source only while
:meth:`Serial.wants_input` and at most :meth:`Serial.input_room` bytes at a time (the guest
only empties the buffer, so with a single producer the room can only grow behind its back).

Threading: register accesses come from vCPU threads, :meth:`enqueue_input` from the VMM's I/O
thread; one lock guards the state.  The callbacks are called after the lock is released, so they
may block (``out`` writing to a terminal) or call back into the device.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Register offsets (include/uapi/linux/serial_reg.h names).
UART_RX = 0  # in: receive buffer (DLAB = 0)
UART_TX = 0  # out: transmit holding register (DLAB = 0)
UART_DLL = 0  # divisor latch low (DLAB = 1)
UART_IER = 1  # interrupt enable (DLAB = 0)
UART_DLM = 1  # divisor latch high (DLAB = 1)
UART_IIR = 2  # in: interrupt identification
UART_FCR = 2  # out: FIFO control
UART_LCR = 3  # line control
UART_MCR = 4  # modem control
UART_LSR = 5  # line status
UART_MSR = 6  # modem status
UART_SCR = 7  # scratch
REGISTER_COUNT = 8

UART_IER_RDI = 0x01  # received data available
UART_IER_THRI = 0x02  # transmit holding register empty
UART_IER_RLSI = 0x04  # receiver line status
UART_IER_MSI = 0x08  # modem status
UART_IER_MASK = 0x0F  # a 16550A implements only these; bits 7:4 read as zero

UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_FIFO_ENABLED = 0xC0  # both bits set: a 16550A with working FIFOs

UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04
UART_FCR_DMA_SELECT = 0x08
UART_FCR_TRIGGER_MASK = 0xC0

UART_LCR_DLAB = 0x80

UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT1 = 0x04
UART_MCR_OUT2 = 0x08
UART_MCR_LOOP = 0x10
UART_MCR_MASK = 0x1F  # bits 7:5 do not exist on a 16550A

UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40

UART_MSR_DCTS = 0x01
UART_MSR_DDSR = 0x02
UART_MSR_TERI = 0x04
UART_MSR_DDCD = 0x08
UART_MSR_CTS = 0x10
UART_MSR_DSR = 0x20
UART_MSR_RI = 0x40
UART_MSR_DCD = 0x80

# The modem lines of a null-modem cable to a host that is always there: CTS, DSR and carrier up,
# no ring (what QEMU and vm-superio present too).
MODEM_INPUTS = UART_MSR_CTS | UART_MSR_DSR | UART_MSR_DCD
FIFO_SIZE = 16  # the 16550A's receive FIFO
RX_BUFFER_SIZE = 64 * 1024
# Divisor latch at reset: 12 = 9600 baud with the PC's 1.8432 MHz clock (Linux reprograms it).
DEFAULT_DIVISOR = 12

_BYTE = tuple(bytes((i,)) for i in range(256))  # no allocation per transmitted byte


@dataclass(slots=True)
class SerialMetrics:
    """Counters; plain ints updated under the device lock."""

    tx_bytes: int = 0  # bytes handed to ``out``
    rx_bytes: int = 0  # host bytes accepted by enqueue_input
    rx_dropped: int = 0  # host bytes dropped because the buffer was full
    loopback_overruns: int = 0  # loopback bytes lost to a full FIFO
    interrupts: int = 0  # calls to ``interrupt``
    callback_errors: int = 0  # exceptions raised by ``out``/``interrupt`` (contained)


class Serial:
    """16550A UART (8 registers; map it at 0x3f8 on the PIO bus, IRQ 4)."""

    __slots__ = (
        "_interrupt",
        "_out",
        "_lock",
        "_rx",
        "_ier",
        "_lcr",
        "_mcr",
        "_fcr",
        "_scr",
        "_dll",
        "_dlm",
        "_lsr_errors",
        "_msr_deltas",
        "_thre_pending",
        "_active",
        "_readers",
        "_writers",
        "_warned",
        "metrics",
    )

    def __init__(self, interrupt: Callable[[], None], out: Callable[[bytes], None]) -> None:
        self._interrupt = interrupt
        self._out = out
        self._lock = threading.Lock()
        self._rx = bytearray()  # del rx[0] is O(1) in CPython: the start just moves
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0
        self._scr = 0
        self._dll = DEFAULT_DIVISOR & 0xFF
        self._dlm = DEFAULT_DIVISOR >> 8
        self._lsr_errors = 0  # sticky LSR error bits (OE), cleared by reading LSR
        self._msr_deltas = 0  # MSR bits 3:0, cleared by reading MSR
        self._thre_pending = False  # the THRE interrupt cause (not the LSR bit, always set)
        self._active = 0  # pending causes that are enabled, as IER bits
        self._warned: set[str] = set()
        self.metrics = SerialMetrics()
        self._readers = (
            self._read_rx,
            self._read_ier,
            self._read_iir,
            self._read_lcr,
            self._read_mcr,
            self._read_lsr,
            self._read_msr,
            self._read_scr,
        )
        self._writers = (
            self._write_tx,
            self._write_ier,
            self._write_fcr,
            self._write_lcr,
            self._write_mcr,
            self._write_lsr,
            self._write_msr,
            self._write_scr,
        )

    # -- BusDevice --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """Read a register; wider accesses read consecutive registers (little-endian)."""
        if size == 1 and 0 <= offset < REGISTER_COUNT:
            with self._lock:
                return self._readers[offset]()
        # An ISA bus splits a wide access into byte cycles; bytes past the UART read as ones.
        value = 0
        for i in range(min(max(size, 0), 8)):
            reg = offset + i
            if 0 <= reg < REGISTER_COUNT:
                with self._lock:
                    byte = self._readers[reg]()
            else:
                byte = 0xFF
            value |= byte << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        """Write a register; wider accesses write consecutive registers (little-endian)."""
        if size == 1 and 0 <= offset < REGISTER_COUNT:
            self._write_byte(offset, value & 0xFF)
            return
        for i in range(min(max(size, 0), 8)):
            reg = offset + i
            if 0 <= reg < REGISTER_COUNT:
                self._write_byte(reg, (value >> (8 * i)) & 0xFF)

    # -- host side ----------------------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> None:
        """Queue host bytes for the guest (thread-safe); excess beyond the buffer is dropped.

        Dropped bytes set LSR.OE (overrun), as a UART with a full FIFO does, and are counted in
        ``metrics.rx_dropped``.  Raises the receive interrupt if the guest enabled it.
        """
        n = len(data)
        if n == 0:
            return
        with self._lock:
            rx = self._rx
            room = RX_BUFFER_SIZE - len(rx)
            dropped = n - room if n > room else 0
            if dropped:
                data = data[:room]
                self._lsr_errors |= UART_LSR_OE
                self.metrics.rx_dropped += dropped
            rx += data
            self.metrics.rx_bytes += n - dropped
            fire = self._update_irq()
            if fire:
                self.metrics.interrupts += 1
        if dropped:
            self._warn_once("rx_dropped", "serial: input buffer full (%d bytes); dropped %d "
                            "byte(s) and signalled an overrun to the guest; check wants_input() "
                            "before reading more host input", RX_BUFFER_SIZE, dropped)
        if fire:
            self._raise_interrupt()

    def wants_input(self) -> bool:
        """True while the receive buffer has room (a hint: another thread may fill it)."""
        return len(self._rx) < RX_BUFFER_SIZE

    def input_room(self) -> int:
        """Bytes :meth:`enqueue_input` accepts now without dropping; read at most this much."""
        return RX_BUFFER_SIZE - len(self._rx)

    # -- internals ----------------------------------------------------------------------------

    def _write_byte(self, offset: int, value: int) -> None:
        with self._lock:
            if offset == UART_TX and not (self._lcr & UART_LCR_DLAB or self._mcr & UART_MCR_LOOP):
                # Hot path: a byte of console output.  The wire is infinitely fast, so the THR
                # is empty again at once and the THRE cause is (re)armed.
                self._thre_pending = True
                self.metrics.tx_bytes += 1
                fire = self._update_irq()
                transmit = True
            else:
                fire = self._writers[offset](value)
                transmit = False
            if fire:
                self.metrics.interrupts += 1
        if transmit:
            try:
                self._out(_BYTE[value])
            except Exception:
                self._callback_failed("out")
        if fire:
            self._raise_interrupt()

    def _update_irq(self) -> bool:
        """Recompute the enabled pending causes; True if one of them is new (send an edge)."""
        causes = self._ier & (
            (UART_IER_RDI if self._rx else 0)
            | (UART_IER_THRI if self._thre_pending else 0)
            | (UART_IER_RLSI if self._lsr_errors else 0)
            | (UART_IER_MSI if self._msr_deltas else 0)
        )
        new = causes & ~self._active
        self._active = causes
        return new != 0

    def _raise_interrupt(self) -> None:
        try:
            self._interrupt()
        except Exception:
            self._callback_failed("interrupt")

    def _callback_failed(self, which: str) -> None:
        # The guest must not stall because the host side failed (e.g. a closed terminal).
        with self._lock:
            self.metrics.callback_errors += 1
        if which not in self._warned:
            self._warned.add(which)
            logger.exception("serial: the %s callback raised; the error is contained "
                             "(logged once)", which)

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(msg, *args)

    def _modem_status(self) -> int:
        """MSR bits 7:4 as the guest sees them now."""
        mcr = self._mcr
        if mcr & UART_MCR_LOOP:
            # 16550 loopback: the outputs are wired back to the inputs inside the chip.
            return (
                (UART_MSR_CTS if mcr & UART_MCR_RTS else 0)
                | (UART_MSR_DSR if mcr & UART_MCR_DTR else 0)
                | (UART_MSR_RI if mcr & UART_MCR_OUT1 else 0)
                | (UART_MSR_DCD if mcr & UART_MCR_OUT2 else 0)
            )
        return MODEM_INPUTS

    def _clear_rx_fifo(self) -> None:
        # Only the FIFO's worth of bytes: what is queued behind it has not "arrived" yet.
        del self._rx[:FIFO_SIZE]

    # Register readers (called with the lock held).

    def _read_rx(self) -> int:
        if self._lcr & UART_LCR_DLAB:
            return self._dll
        rx = self._rx
        if not rx:
            return 0
        value = rx[0]
        del rx[0]
        if not rx:
            self._update_irq()
        return value

    def _read_ier(self) -> int:
        if self._lcr & UART_LCR_DLAB:
            return self._dlm
        return self._ier

    def _read_iir(self) -> int:
        # Priority order of the 16550 datasheet: line status, received data, THR empty, modem.
        active = self._active
        if active & UART_IER_RLSI:
            iid = UART_IIR_RLSI
        elif active & UART_IER_RDI:
            iid = UART_IIR_RDI
        elif active & UART_IER_THRI:
            iid = UART_IIR_THRI
            # Reading IIR while it reports THRE is what acknowledges that cause.
            self._thre_pending = False
            self._update_irq()
        elif active & UART_IER_MSI:
            iid = UART_IIR_MSI
        else:
            iid = UART_IIR_NO_INT
        if self._fcr & UART_FCR_ENABLE_FIFO:
            iid |= UART_IIR_FIFO_ENABLED
        return iid

    def _read_lcr(self) -> int:
        return self._lcr

    def _read_mcr(self) -> int:
        return self._mcr

    def _read_lsr(self) -> int:
        value = UART_LSR_THRE | UART_LSR_TEMT | self._lsr_errors
        if self._rx:
            value |= UART_LSR_DR
        if self._lsr_errors:
            self._lsr_errors = 0
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        value = self._modem_status() | self._msr_deltas
        if self._msr_deltas:
            self._msr_deltas = 0
            self._update_irq()
        return value

    def _read_scr(self) -> int:
        return self._scr

    # Register writers (called with the lock held); each returns "raise an interrupt".

    def _write_tx(self, value: int) -> bool:
        if self._lcr & UART_LCR_DLAB:
            self._dll = value
            return False
        # Only reached in loopback mode (the normal case is _write_byte's hot path): the byte
        # goes to the receiver, not to the wire.  The FIFO holds 16 bytes (1 without FIFO).
        capacity = FIFO_SIZE if self._fcr & UART_FCR_ENABLE_FIFO else 1
        if len(self._rx) < capacity:
            self._rx.append(value)
        else:
            self._lsr_errors |= UART_LSR_OE
            self.metrics.loopback_overruns += 1
        self._thre_pending = True
        return self._update_irq()

    def _write_ier(self, value: int) -> bool:
        if self._lcr & UART_LCR_DLAB:
            self._dlm = value
            return False
        old = self._ier
        self._ier = value & UART_IER_MASK
        if self._ier & UART_IER_THRI and not old & UART_IER_THRI:
            # Enabling THRI with an empty transmitter makes the THRE cause pending at once;
            # Linux's startup tests that it is asserted again after each re-enable.
            self._thre_pending = True
        return self._update_irq()

    def _write_fcr(self, value: int) -> bool:
        # Offset 2 is FCR whatever DLAB says: a 16550A has no EFR (Linux's autoconfig writes
        # "EFR" = 0 under LCR 0xBF, which simply disables the FIFO here, as on real parts).
        if (value ^ self._fcr) & UART_FCR_ENABLE_FIFO:
            self._clear_rx_fifo()  # switching FIFO mode resets the FIFOs
        elif value & UART_FCR_ENABLE_FIFO and value & UART_FCR_CLEAR_RCVR:
            self._clear_rx_fifo()
        # UART_FCR_CLEAR_XMIT: the transmit FIFO is always empty, nothing to discard.
        self._fcr = value & (UART_FCR_ENABLE_FIFO | UART_FCR_DMA_SELECT | UART_FCR_TRIGGER_MASK)
        return self._update_irq()

    def _write_lcr(self, value: int) -> bool:
        self._lcr = value
        return False

    def _write_mcr(self, value: int) -> bool:
        before = self._modem_status()
        self._mcr = value & UART_MCR_MASK
        after = self._modem_status()
        changed = before ^ after
        if changed:
            deltas = (changed >> 4) & (UART_MSR_DCTS | UART_MSR_DDSR | UART_MSR_DDCD)
            if before & UART_MSR_RI and not after & UART_MSR_RI:
                deltas |= UART_MSR_TERI  # trailing edge of ring only
            self._msr_deltas |= deltas
        return self._update_irq()

    def _write_lsr(self, value: int) -> bool:
        return False  # factory test register on real parts; Linux never writes it

    def _write_msr(self, value: int) -> bool:
        return False  # read-only

    def _write_scr(self, value: int) -> bool:
        self._scr = value
        return False
