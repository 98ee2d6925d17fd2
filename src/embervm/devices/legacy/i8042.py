"""The i8042 keyboard controller, as far as a guest without a keyboard needs it: the reset line.

With ``reboot=k`` Linux restarts the machine through the controller
(``arch/x86/kernel/reboot.c``, ``native_machine_emergency_restart``, case ``BOOT_KBD``): up to
ten times it waits in ``kb_wait()`` until status bit 1 (input buffer full) is clear, then writes
0xFE to port 0x64, "pulse reset low".  The VMM turns that pulse (``reset()``) into a clean exit.
The controller executes commands instantly, so the input buffer is never full and ``kb_wait()``
ends at its first status read.  ``reset()`` is called for every pulse: Linux may pulse again
before the VMM has stopped the vCPU, so the VMM's handler must be idempotent.

There is no keyboard or mouse behind the controller (the guest kernels are built without
SERIO/INPUT).  The few controller commands a driver or firmware uses to look at the controller
are answered (configuration byte 0x20/0x60, self-tests, enable/disable, output port); anything
else is ignored.  Output-buffer data is polled by drivers, so no IRQ 1 is modelled.

Map the device at port 0x60 with length 5 (as Firecracker does): offset 0 is the data port,
offset 4 the status/command port.  Offsets 1-3 are ports 0x61-0x63, which are not the
controller's: 0x61 is "system control port B" (PIT channel 2 gate and output, NMI status).  KVM
serves 0x61 itself when the PIT is created with ``KVM_PIT_SPEAKER_DUMMY``; if an access reaches
this device anyway it reads as all ones (like an absent port: bit 5, PIT output, high ends
Linux's calibration loops instead of hanging them) and is logged once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

DATA_OFFSET = 0  # port 0x60
COMMAND_OFFSET = 4  # port 0x64 (reads: status)
PORT_LENGTH = 5

# Status register bits.
STATUS_OBF = 0x01  # output buffer full: a byte waits at port 0x60
STATUS_IBF = 0x02  # input buffer full: never, commands complete at once
STATUS_SYS = 0x04  # system flag: mirrors configuration bit 2 (self-test passed)
STATUS_CMD = 0x08  # the last write went to port 0x64 (command), not 0x60 (data)
STATUS_UNLOCKED = 0x10  # keyboard not inhibited by the key lock

# Configuration ("command") byte bits.
CONFIG_KBD_INT = 0x01
CONFIG_SYS = 0x04
CONFIG_KBD_DISABLED = 0x10
CONFIG_AUX_DISABLED = 0x20
CONFIG_TRANSLATE = 0x40
# What a PC BIOS leaves behind: keyboard interrupt on, POST passed, scan-code translation.
CONFIG_DEFAULT = CONFIG_KBD_INT | CONFIG_SYS | CONFIG_TRANSLATE

# Controller commands (port 0x64).
CMD_READ_RAM = 0x20  # 0x20-0x3f: read controller RAM byte n (0 = configuration byte)
CMD_WRITE_RAM = 0x60  # 0x60-0x7f: write controller RAM byte n, value follows on port 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_OUTBUF = 0xD2
CMD_WRITE_AUX_OUTBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_PULSE_BASE = 0xF0  # 0xf0-0xff: pulse output lines whose mask bit is 0; bit 0 = reset
CMD_PULSE_RESET = 0xFE

SELF_TEST_PASSED = 0x55
PORT_TEST_PASSED = 0x00
PORT_TEST_CLOCK_STUCK_LOW = 0x01  # the answer for the absent aux (mouse) port
OUTPUT_PORT_RESET = 0x01  # output port bit 0: the CPU reset line, active low
OUTPUT_PORT_A20 = 0x02
RAM_SIZE = 32


class I8042:
    """i8042 controller with no devices attached; ``reset()`` on a reset pulse."""

    __slots__ = ("_reset", "_lock", "_ram", "_out", "_last_out", "_pending", "_last_was_cmd",
                 "_output_port", "_logged", "reset_requests")

    def __init__(self, reset: Callable[[], None]) -> None:
        self._reset = reset
        self._lock = threading.Lock()
        self._ram = bytearray(RAM_SIZE)
        self._ram[0] = CONFIG_DEFAULT
        self._out: int | None = None  # byte in the output buffer
        self._last_out = 0  # what port 0x60 reads when the buffer is empty
        self._pending = 0  # command waiting for its data byte on port 0x60, or 0
        self._last_was_cmd = False
        self._output_port = OUTPUT_PORT_RESET | OUTPUT_PORT_A20
        self._logged: set[object] = set()
        self.reset_requests = 0  # metric: reset pulses seen

    @property
    def config(self) -> int:
        """The controller configuration byte."""
        return self._ram[0]

    # -- BusDevice --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(min(max(size, 0), 8)):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(min(max(size, 0), 8)):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    # -- internals ----------------------------------------------------------------------------

    def _read_byte(self, offset: int) -> int:
        with self._lock:
            if offset == COMMAND_OFFSET:
                status = STATUS_UNLOCKED
                if self._out is not None:
                    status |= STATUS_OBF
                if self._ram[0] & CONFIG_SYS:
                    status |= STATUS_SYS
                if self._last_was_cmd:
                    status |= STATUS_CMD
                return status
            if offset == DATA_OFFSET:
                if self._out is not None:
                    self._last_out = self._out
                    self._out = None
                return self._last_out
        self._not_ours("read", offset)
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        pulse = False
        with self._lock:
            if offset == COMMAND_OFFSET:
                self._last_was_cmd = True
                pulse = self._command(value)
            elif offset == DATA_OFFSET:
                self._last_was_cmd = False
                pulse = self._data(value)
            if pulse:
                self.reset_requests += 1
        if offset not in (COMMAND_OFFSET, DATA_OFFSET):
            self._not_ours("write", offset)
        if pulse:
            logger.info("i8042: guest pulsed the CPU reset line")
            self._reset()

    def _respond(self, byte: int) -> None:
        self._out = byte

    def _command(self, cmd: int) -> bool:
        """Run a controller command; True if it pulses the reset line."""
        self._pending = 0
        if CMD_READ_RAM <= cmd < CMD_READ_RAM + RAM_SIZE:
            self._respond(self._ram[cmd - CMD_READ_RAM])
        elif CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + RAM_SIZE:
            self._pending = cmd
        elif cmd == CMD_AUX_DISABLE:
            self._ram[0] |= CONFIG_AUX_DISABLED
        elif cmd == CMD_AUX_ENABLE:
            self._ram[0] &= ~CONFIG_AUX_DISABLED & 0xFF
        elif cmd == CMD_AUX_TEST:
            self._respond(PORT_TEST_CLOCK_STUCK_LOW)  # no mouse port behind this controller
        elif cmd == CMD_SELF_TEST:
            self._ram[0] |= CONFIG_SYS
            self._respond(SELF_TEST_PASSED)
        elif cmd == CMD_KBD_TEST:
            self._respond(PORT_TEST_PASSED)
        elif cmd == CMD_KBD_DISABLE:
            self._ram[0] |= CONFIG_KBD_DISABLED
        elif cmd == CMD_KBD_ENABLE:
            self._ram[0] &= ~CONFIG_KBD_DISABLED & 0xFF
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._respond(self._output_port)
        elif cmd in (CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KBD_OUTBUF, CMD_WRITE_AUX_OUTBUF,
                     CMD_WRITE_AUX):
            self._pending = cmd
        elif cmd >= CMD_PULSE_BASE:
            # Bits 3:0 are a mask of output lines to pulse low (0 = pulse); line 0 is reset.
            return not cmd & OUTPUT_PORT_RESET
        else:
            self._log_once(("command", cmd), "i8042: ignoring controller command %#04x", cmd)
        return False

    def _data(self, value: int) -> bool:
        """A byte on port 0x60: a command's parameter, else a keyboard command (no keyboard)."""
        cmd, self._pending = self._pending, 0
        if CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + RAM_SIZE:
            self._ram[cmd - CMD_WRITE_RAM] = value
        elif cmd == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            # Driving output port bit 0 low holds the CPU in reset: some firmware reboots so.
            return not value & OUTPUT_PORT_RESET
        elif cmd in (CMD_WRITE_KBD_OUTBUF, CMD_WRITE_AUX_OUTBUF):
            self._respond(value)  # loop the byte back as if the device had sent it
        elif cmd == CMD_WRITE_AUX:
            pass  # to the mouse, which is not there
        else:
            self._log_once("kbd-data", "i8042: guest wrote %#04x for the keyboard; there is no "
                           "keyboard, ignored (logged once)", value)
        return False

    def _log_once(self, cause: object, msg: str, *args: object) -> None:
        if cause not in self._logged and len(self._logged) < 64:
            self._logged.add(cause)
            logger.debug(msg, *args)

    def _not_ours(self, op: str, offset: int) -> None:
        if ("port", op, offset) not in self._logged and len(self._logged) < 64:
            self._logged.add(("port", op, offset))
            logger.info("i8042: guest %s of port %#x reached the keyboard controller; that port "
                        "is not the controller's (0x61 belongs to the PIT: create it with "
                        "KVM_PIT_SPEAKER_DUMMY); reads return all ones, writes are ignored "
                        "(logged once)", op, 0x60 + offset)
