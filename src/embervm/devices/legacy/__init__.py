"""Legacy PC devices on the port-I/O bus: 16550A UART, i8042 (reset line and a PS/2 keyboard
for Ctrl-Alt-Del on IRQ 1), CMOS/POST stubs.

The standard PC addresses, for the VMM that maps them (the interrupt controllers and the PIT
are KVM's in-kernel ones and never reach these devices)::

    bus.insert(Serial(irq4, out), COM1_PORT, SERIAL_PORT_LENGTH)
    bus.insert(I8042(reset, irq1), I8042_PORT, I8042_PORT_LENGTH)
    bus.insert(CmosAbsent(), CMOS_PORT, CMOS_PORT_LENGTH)
    bus.insert(PortSink(), POST_PORT, 1)
"""

from .i8042 import I8042
from .misc import CmosAbsent, PortSink
from .serial import Serial

COM1_PORT = 0x3F8
COM1_IRQ = 4  # ISA IRQ of ttyS0 in Linux's legacy table (SERIAL_PORT_DFNS)
SERIAL_PORT_LENGTH = 8
I8042_PORT = 0x60
I8042_PORT_LENGTH = 5  # 0x60-0x64; see i8042.py for 0x61-0x63
CMOS_PORT = 0x70
CMOS_PORT_LENGTH = 2
POST_PORT = 0x80  # POST codes and Linux's default I/O delay port
ALT_DELAY_PORT = 0xED  # io_delay=0xed

__all__ = [
    "ALT_DELAY_PORT",
    "CMOS_PORT",
    "CMOS_PORT_LENGTH",
    "COM1_IRQ",
    "COM1_PORT",
    "I8042_PORT",
    "I8042_PORT_LENGTH",
    "POST_PORT",
    "SERIAL_PORT_LENGTH",
    "CmosAbsent",
    "I8042",
    "PortSink",
    "Serial",
]
