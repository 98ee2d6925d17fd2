"""Stubs for PC ports that Linux touches on every boot but that need no behaviour.

Without them each access would be an "unknown port" on the bus: the result would be the same
(all ones, writes dropped), but these ports are hit thousands of times in a normal boot and are
expected, so they get a device of their own: no "unknown port" log line, and the metrics
say what the guest was doing.

* :class:`CmosAbsent` at 0x70-0x71: the MC146818 CMOS RTC is not emulated.  Every register
  reads 0xff.  The guest kit's patch 0005 (``arch/x86/kernel/rtc.c``) takes an all-ones
  register A (``RTC_FREQ_SELECT``: divider bits 111 mean "oscillator held in reset", impossible
  on a running RTC) as "no RTC" and starts the wall clock at 0 at once; unpatched, the kernel
  polls the update-in-progress bit for a full second (~40000 port exits, ~2.8 s under PVM)
  before concluding the same.  Writes (index selection, the NMI-mask bit 7 of port 0x70,
  ``update_persistent_clock64``) are ignored.
* :class:`PortSink` for ports whose writes are only a side effect: 0x80 (POST codes; Linux's
  ``outb_p``/``inb_p`` delay through it with ``CONFIG_IO_DELAY_0X80``, so the PIT and CMOS
  accesses of the kernel bring extra exits here; ``io_delay=none`` on the command line avoids
  them) and 0xed (the ``io_delay=0xed`` alternative).  Reads return all ones like an absent port.
"""

from __future__ import annotations


def _ones(size: int) -> int:
    return (1 << (8 * min(max(size, 0), 8))) - 1


class PortSink:
    """Swallows writes; reads return all ones.  Counts accesses (metrics)."""

    __slots__ = ("reads", "writes")

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> int:
        self.reads += 1
        return _ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1


class CmosAbsent(PortSink):
    """CMOS/RTC index and data ports (0x70-0x71) with no RTC behind them: every read is 0xff.

    Same behaviour as :class:`PortSink`; a class of its own so the bus, logs and metrics name the
    reason.  See the module docstring for why all ones (not zeros) matters to the guest kernel.
    """

    __slots__ = ()
