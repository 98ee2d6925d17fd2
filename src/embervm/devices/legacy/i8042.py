"""The i8042 keyboard controller with a PS/2 keyboard behind it: reset line and Ctrl-Alt-Del.

Two jobs, both Firecracker's (``src/vmm/src/devices/legacy/i8042.rs``):

* **Reset line.**  With ``reboot=k`` Linux restarts the machine through the controller
  (``arch/x86/kernel/reboot.c``, ``native_machine_emergency_restart``, case ``BOOT_KBD``): it
  waits in ``kb_wait()`` until status bit 1 (input buffer full) is clear, then writes 0xFE to
  port 0x64, "pulse reset low".  The VMM turns that pulse (``reset()``) into a clean exit.  The
  controller executes commands instantly, so the input buffer is never full and ``kb_wait()``
  ends at its first status read.  ``reset()`` is called for every pulse: Linux may pulse again
  before the VMM has stopped the vCPU, so the VMM's handler must be idempotent.

* **Ctrl-Alt-Del.**  :meth:`I8042.trigger_ctrl_alt_del` presses Left Ctrl, Left Alt and Delete
  on the keyboard (Firecracker's ``SendCtrlAltDel``); the guest's atkbd driver reports the keys
  and the kernel reboots (or signals init).  For that Linux must find a keyboard:
  ``drivers/input/serio/i8042.c`` reads and writes the controller configuration byte (CTR),
  may run the controller self-test, probes for a mouse port and enables the keyboard port;
  ``drivers/input/keyboard/atkbd.c`` then talks to the keyboard through ``libps2``: get ID
  (0xF2 -> 0xFA 0xAB 0x83), disable (0xF5), set LEDs (0xED n), set typematic rate (0xF3 n),
  enable (0xF4), possibly reset (0xFF -> 0xFA 0xAA) and scan-code-set commands (0xF0 n).  Those
  keyboard replies are interrupt-driven: each byte waiting at port 0x60 raises IRQ 1 when the
  CTR enables the keyboard interrupt.

Output buffer.  Port 0x60 presents one byte at a time, taken in this order: a controller
command's answer (at most one, replaced by the next command's), the keyboard's replies to the
last keyboard command (a new command discards unread replies, as the host has given up on
them), then key scan codes (a FIFO of :data:`SCAN_BUFFER_SIZE` bytes, Firecracker's 16).
Keyboard bytes are held back while the CTR disables the keyboard interface (bit 4), while the
keyboard waits for a command's parameter, and scan codes while scanning is disabled (0xF5);
they are delivered when that ends, so a Ctrl-Alt-Del pressed while Linux probes the keyboard is
reported once atkbd enables it instead of disturbing the probe's command/ACK exchange.

IRQ 1.  The ``irq()`` callback (an irqfd on GSI 1: an edge) is called whenever a keyboard byte
becomes the byte at port 0x60 while CTR bit 0 enables the keyboard interrupt: when it arrives
in an empty buffer, when reading port 0x60 leaves another keyboard byte behind (Linux's handler
reads one byte per interrupt), and when the CTR enables the interrupt or the keyboard interface
with a byte waiting.  Controller answers do not interrupt: Linux polls for them with its
interrupt handler locked out (``i8042_command()``), as Firecracker does.

Scan codes.  The keyboard sends set 2 codes by default, Firecracker's bytes for Ctrl-Alt-Del
(0x14, 0x11, 0xE0 0x71: presses only, as Firecracker).  The controller does not translate to
set 1: CTR bit 6 reads as zero (Firecracker's CTR starts without it too), so Linux runs the port
untranslated (``i8042_direct``) and atkbd decodes set 2.  If the guest selects set 1 or 3 with
0xF0, the same keys are sent in that set.

No mouse.  The AUX port is absent as on an AT-style controller: the AUX loopback command 0xD3
answers without the AUX-data status bit and the AUX interface test 0xA9 answers 0x01 (clock
stuck low), so Linux's ``i8042_check_aux()`` gives up at once instead of probing for a mouse.

Map the device at port 0x60 with length 5 (as Firecracker does): offset 0 is the data port,
offset 4 the status/command port.  Offsets 1-3 are ports 0x61-0x63, which are not the
controller's: 0x61 is "system control port B" (PIT channel 2 gate and output, NMI status).  KVM
serves 0x61 itself when the PIT is created with ``KVM_PIT_SPEAKER_DUMMY``; if an access reaches
this device anyway it reads as all ones (like an absent port: bit 5, PIT output, high ends
Linux's calibration loops instead of hanging them) and is logged once.

Threads: port accesses come from vCPU threads and :meth:`~I8042.trigger_ctrl_alt_del` from the
event loop; one lock serialises them.  ``reset()`` and ``irq()`` are called after the lock is
released, so a callback may call back into the device.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
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
STATUS_AUX_DATA = 0x20  # the byte at port 0x60 is from the mouse: never, there is none

# Configuration ("command") byte bits.
CONFIG_KBD_INT = 0x01
CONFIG_SYS = 0x04
CONFIG_KBD_DISABLED = 0x10
CONFIG_AUX_DISABLED = 0x20
CONFIG_TRANSLATE = 0x40  # not supported: reads as zero
# What the controller starts with, Firecracker's CTR: keyboard interrupt on, POST passed.
CONFIG_DEFAULT = CONFIG_KBD_INT | CONFIG_SYS

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
CMD_WRITE_AUX_OUTBUF = 0xD3  # Linux's AUX loopback test
CMD_WRITE_AUX = 0xD4
CMD_PULSE_BASE = 0xF0  # 0xf0-0xff: pulse output lines whose mask bit is 0; bit 0 = reset
CMD_PULSE_RESET = 0xFE

SELF_TEST_PASSED = 0x55
PORT_TEST_PASSED = 0x00
PORT_TEST_CLOCK_STUCK_LOW = 0x01  # the answer for the absent aux (mouse) port
OUTPUT_PORT_RESET = 0x01  # output port bit 0: the CPU reset line, active low
OUTPUT_PORT_A20 = 0x02
RAM_SIZE = 32

# Keyboard commands (bytes written to port 0x60 with no controller command pending).
KBD_SET_LEDS = 0xED  # + LED bits
KBD_ECHO = 0xEE
KBD_SCANCODE_SET = 0xF0  # + 0 (query) or 1-3
KBD_GET_ID = 0xF2
KBD_SET_TYPEMATIC = 0xF3  # + rate/delay
KBD_ENABLE = 0xF4
KBD_DISABLE = 0xF5  # stop scanning, load defaults
KBD_SET_DEFAULTS = 0xF6
KBD_SET3_ALL_FIRST = 0xF7  # 0xf7-0xfa: set-3 key types for all keys
KBD_SET3_ALL_LAST = 0xFA
KBD_SET3_KEYS_FIRST = 0xFB  # 0xfb-0xfd: set-3 key types, a list of key codes follows
KBD_SET3_KEYS_LAST = 0xFD
KBD_RESEND = 0xFE
KBD_RESET = 0xFF
KBD_COMMAND_MIN = 0xED  # bytes below are parameters (or set-3 key codes), never commands

# Keyboard replies.
KBD_ACK = 0xFA
KBD_NAK = 0xFE  # "resend": the keyboard's answer to a byte it does not understand
KBD_BAT_PASSED = 0xAA  # basic assurance test passed, after a reset
KBD_ID = (0xAB, 0x83)  # an MF2 keyboard
TYPEMATIC_DEFAULT = 0x2B  # 10.9 characters/s after 500 ms

# Make codes of the keys Ctrl-Alt-Del presses (Left Ctrl, Left Alt, Delete), per scan code set.
# Set 2 is Firecracker's KEY_CTRL, KEY_ALT, KEY_DEL.
CTRL_ALT_DEL = {
    1: b"\x1d\x38\xe0\x53",
    2: b"\x14\x11\xe0\x71",
    3: b"\x11\x19\x64",
}
SCAN_BUFFER_SIZE = 16  # Firecracker's internal buffer


class I8042:
    """i8042 controller with a PS/2 keyboard and no mouse.

    ``reset()`` is called on a reset pulse; ``irq()`` raises IRQ 1 (see the module docstring).
    """

    __slots__ = ("_reset", "_irq", "_lock", "_ram", "_ctrl_out", "_replies", "_scans",
                 "_last_out", "_pending", "_last_was_cmd", "_output_port", "_irq_line",
                 "_kbd_param", "_key_list", "_scanning", "_scancode_set", "_leds", "_typematic",
                 "_last_sent", "_logged", "reset_requests", "read_count", "write_count",
                 "missed_read_count", "missed_write_count", "error_count")

    def __init__(self, reset: Callable[[], None], irq: Callable[[], None] | None = None) -> None:
        self._reset = reset
        self._irq = irq
        self._lock = threading.Lock()
        self._ram = bytearray(RAM_SIZE)
        self._ram[0] = CONFIG_DEFAULT
        self._ctrl_out: int | None = None  # a controller command's answer
        self._replies: deque[int] = deque()  # the keyboard's answer to its last command
        self._scans: deque[int] = deque()  # key scan codes, oldest first
        self._last_out = 0  # what port 0x60 reads when the buffer is empty
        self._pending = 0  # controller command waiting for its data byte on port 0x60, or 0
        self._last_was_cmd = False
        self._output_port = OUTPUT_PORT_RESET | OUTPUT_PORT_A20
        self._irq_line = False  # a keyboard byte is presented and the interrupt is enabled
        # Keyboard state.
        self._kbd_param = 0  # keyboard command waiting for its parameter byte, or 0
        self._key_list = False  # after 0xfb-0xfd: set-3 key codes follow
        self._scanning = True
        self._scancode_set = 2
        self._leds = 0
        self._typematic = TYPEMATIC_DEFAULT
        self._last_sent = KBD_ACK  # for "resend"
        self._logged: set[object] = set()
        # Counters; the names are Firecracker's i8042 metrics (reset_count is reset_requests).
        self.reset_requests = 0
        self.read_count = 0
        self.write_count = 0
        self.missed_read_count = 0
        self.missed_write_count = 0
        self.error_count = 0

    @property
    def config(self) -> int:
        """The controller configuration byte (CTR)."""
        return self._ram[0]

    @property
    def leds(self) -> int:
        """The keyboard LEDs the guest set (bit 0 Scroll, 1 Num, 2 Caps Lock)."""
        return self._leds

    @property
    def scancode_set(self) -> int:
        """The keyboard's scan code set (1, 2 or 3; 2 after reset)."""
        return self._scancode_set

    def metrics(self) -> dict[str, int]:
        """Firecracker's ``i8042`` metrics group: counters since the device was made."""
        return {"error_count": self.error_count, "missed_read_count": self.missed_read_count,
                "missed_write_count": self.missed_write_count, "read_count": self.read_count,
                "reset_count": self.reset_requests, "write_count": self.write_count}

    # -- the VMM's side -----------------------------------------------------------------------

    def trigger_ctrl_alt_del(self) -> bool:
        """Press Ctrl, Alt and Delete (thread-safe; the event loop calls it while vCPUs run).

        Queues the make codes in the keyboard's current scan code set and raises IRQ 1 if the
        guest can read them now.  Returns False, and queues nothing, if the scan buffer has no
        room for the whole sequence (the guest is not reading its keyboard), as Firecracker
        fails with ``InternalBufferFull``.  An exception from ``irq()`` propagates (the bytes
        stay queued and the interrupt is retried at the next port access or key press).
        """
        with self._lock:
            codes = CTRL_ALT_DEL[self._scancode_set]
            if SCAN_BUFFER_SIZE - len(self._scans) < len(codes):
                self.error_count += 1
                return False
            self._scans.extend(codes)
            fire = self._sync_irq()
        if fire and (err := self._raise_irq()) is not None:
            raise err
        return True

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
        if offset == COMMAND_OFFSET:
            with self._lock:
                self.read_count += 1
                return self._status()
        if offset == DATA_OFFSET:
            with self._lock:
                self.read_count += 1
                value, fire = self._pop()
            if fire:
                self._raise_irq()
            return value
        with self._lock:
            self.missed_read_count += 1
        self._not_ours("read", offset)
        return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        pulse = fire = False
        with self._lock:
            if offset == COMMAND_OFFSET:
                self.write_count += 1
                self._last_was_cmd = True
                pulse = self._command(value)
            elif offset == DATA_OFFSET:
                self.write_count += 1
                self._last_was_cmd = False
                pulse = self._data(value)
            else:
                self.missed_write_count += 1
            if pulse:
                self.reset_requests += 1
            fire = self._sync_irq()
        if offset not in (COMMAND_OFFSET, DATA_OFFSET):
            self._not_ours("write", offset)
        if fire:
            self._raise_irq()
        if pulse:
            logger.info("i8042: guest pulsed the CPU reset line")
            self._reset()

    def _raise_irq(self) -> BaseException | None:
        """Send an edge on IRQ 1; the exception if ``irq()`` failed.

        On failure the line is marked down, so the next port access or key press that finds a
        keyboard byte waiting sends the edge again (a retry).  The vCPU paths return the byte
        the guest read regardless (the bus would turn an exception into 0xff and lose it);
        :meth:`trigger_ctrl_alt_del` raises the error to its caller.
        """
        if self._irq is None:
            return None
        try:
            self._irq()
        except Exception as e:
            with self._lock:
                self.error_count += 1
                self._irq_line = False
            logger.warning("i8042: raising IRQ 1 failed (%s); retried at the next access", e)
            return e
        return None

    def _status(self) -> int:
        status = STATUS_UNLOCKED
        if self._ctrl_out is not None or self._kbd_head() is not None:
            status |= STATUS_OBF
        if self._ram[0] & CONFIG_SYS:
            status |= STATUS_SYS
        if self._last_was_cmd:
            status |= STATUS_CMD
        return status

    def _kbd_head(self) -> deque[int] | None:
        """The keyboard queue whose first byte port 0x60 presents after the controller's."""
        if self._ram[0] & CONFIG_KBD_DISABLED:
            return None
        if self._replies:
            return self._replies
        if self._scans and self._scanning and not self._kbd_param:
            return self._scans
        return None

    def _pop(self) -> tuple[int, bool]:
        """Take the byte at port 0x60; also whether IRQ 1 must be raised for the next one."""
        if self._ctrl_out is not None:
            self._last_out, self._ctrl_out = self._ctrl_out, None
            return self._last_out, self._sync_irq()
        queue = self._kbd_head()
        if queue is None:
            return self._last_out, False  # empty: the output register keeps its last byte
        self._last_out = self._last_sent = queue.popleft()
        return self._last_out, self._sync_irq(new_byte=True)

    def _sync_irq(self, new_byte: bool = False) -> bool:
        """Recompute the keyboard interrupt line; True if an edge must be sent now.

        The line is up while a keyboard byte is presented at port 0x60 and the CTR enables the
        interrupt.  An edge is due when it comes up, and after a keyboard byte was read
        (``new_byte``) if it stays up: the next byte needs its own interrupt.
        """
        line = (self._ctrl_out is None and bool(self._ram[0] & CONFIG_KBD_INT)
                and self._kbd_head() is not None)
        fire = line and (new_byte or not self._irq_line)
        self._irq_line = line
        return fire

    def _command(self, cmd: int) -> bool:
        """Run a controller command; True if it pulses the reset line."""
        self._pending = 0
        self._ctrl_out = None  # a new command supersedes an unread answer
        if CMD_READ_RAM <= cmd < CMD_READ_RAM + RAM_SIZE:
            self._ctrl_out = self._ram[cmd - CMD_READ_RAM]
        elif CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + RAM_SIZE:
            self._pending = cmd
        elif cmd == CMD_AUX_DISABLE:
            self._ram[0] |= CONFIG_AUX_DISABLED
        elif cmd == CMD_AUX_ENABLE:
            self._ram[0] &= ~CONFIG_AUX_DISABLED & 0xFF
        elif cmd == CMD_AUX_TEST:
            self._ctrl_out = PORT_TEST_CLOCK_STUCK_LOW  # no mouse port behind this controller
        elif cmd == CMD_SELF_TEST:
            self._ram[0] |= CONFIG_SYS
            self._ctrl_out = SELF_TEST_PASSED
        elif cmd == CMD_KBD_TEST:
            self._ctrl_out = PORT_TEST_PASSED
        elif cmd == CMD_KBD_DISABLE:
            self._ram[0] |= CONFIG_KBD_DISABLED
        elif cmd == CMD_KBD_ENABLE:
            self._ram[0] &= ~CONFIG_KBD_DISABLED & 0xFF
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._ctrl_out = self._output_port
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
        """A byte on port 0x60: a controller command's parameter, else for the keyboard."""
        cmd, self._pending = self._pending, 0
        if CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + RAM_SIZE:
            if cmd == CMD_WRITE_RAM:
                value &= ~CONFIG_TRANSLATE & 0xFF  # no set 2 -> set 1 translation here
            self._ram[cmd - CMD_WRITE_RAM] = value
        elif cmd == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            # Driving output port bit 0 low holds the CPU in reset: some firmware reboots so.
            return not value & OUTPUT_PORT_RESET
        elif cmd == CMD_WRITE_KBD_OUTBUF:
            self._replies.append(value)  # as if the keyboard had sent it (and interrupts)
        elif cmd == CMD_WRITE_AUX_OUTBUF:
            # An AT-style controller's answer: the byte comes back without the AUX-data status
            # bit, so Linux's loopback check fails and it decides there is no mouse port.
            self._ctrl_out = value
        elif cmd == CMD_WRITE_AUX:
            pass  # to the mouse, which is not there
        else:
            self._keyboard(value)
        return False

    def _keyboard(self, byte: int) -> None:
        """The keyboard receives ``byte`` from the host and queues its replies."""
        self._replies.clear()  # a new command: the host no longer waits for older replies
        param, self._kbd_param = self._kbd_param, 0
        if param and byte < KBD_COMMAND_MIN:
            self._keyboard_param(param, byte)
            return
        if byte < KBD_COMMAND_MIN:
            # Set-3 key codes after 0xfb-0xfd are acknowledged; anything else is not a command.
            self._replies.append(KBD_ACK if self._key_list else KBD_NAK)
            return
        self._key_list = False
        if byte == KBD_ECHO:
            self._replies.append(KBD_ECHO)
            return
        if byte == KBD_RESEND:
            self._replies.append(self._last_sent)
            return
        if byte in (KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_SET_TYPEMATIC):
            self._kbd_param = byte
        elif byte == KBD_GET_ID:
            self._replies.extend((KBD_ACK, *KBD_ID))
            return
        elif byte == KBD_ENABLE:
            self._scanning = True
        elif byte == KBD_DISABLE:
            self._scanning = False
            self._defaults()
        elif byte == KBD_SET_DEFAULTS:
            self._defaults()
        elif KBD_SET3_ALL_FIRST <= byte <= KBD_SET3_ALL_LAST:
            pass  # key types (make/break, typematic) for set 3; make codes are unchanged
        elif KBD_SET3_KEYS_FIRST <= byte <= KBD_SET3_KEYS_LAST:
            self._key_list = True
        elif byte == KBD_RESET:
            self._defaults()
            self._scanning = True
            self._leds = 0
            self._scans.clear()
            self._replies.extend((KBD_ACK, KBD_BAT_PASSED))
            return
        else:  # 0xef, 0xf1: not commands of an MF2 keyboard
            self._log_once(("kbd", byte), "i8042: keyboard does not know command %#04x", byte)
            self._replies.append(KBD_NAK)
            return
        self._replies.append(KBD_ACK)

    def _keyboard_param(self, cmd: int, value: int) -> None:
        """The parameter byte of keyboard command ``cmd`` (0xED, 0xF0 or 0xF3)."""
        if cmd == KBD_SET_LEDS:
            self._leds = value & 0x07
        elif cmd == KBD_SET_TYPEMATIC:
            self._typematic = value
        elif value == 0:  # KBD_SCANCODE_SET, query
            self._replies.extend((KBD_ACK, self._scancode_set))
            return
        elif value in CTRL_ALT_DEL:
            self._scancode_set = value
        else:
            self._replies.append(KBD_NAK)
            return
        self._replies.append(KBD_ACK)

    def _defaults(self) -> None:
        self._scancode_set = 2
        self._typematic = TYPEMATIC_DEFAULT

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
