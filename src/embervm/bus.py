"""Address -> device dispatch for port-I/O and MMIO exits.

Every KVM_EXIT_IO and KVM_EXIT_MMIO goes through :meth:`Bus.read` or :meth:`Bus.write`, so the
lookup is on the hottest path of the VMM (a guest console prints one byte per exit).  The design
follows rust-vmm's ``vm-device`` bus and Firecracker's ``Bus``: devices own a half-open range
``[base, base + length)`` and see offsets relative to ``base``.

Lookup order, cheapest first:

1. ``_exact``: a dict from address to range.  Small ranges (legacy port devices, at most
   :data:`EXACT_RANGE_MAX` addresses) are entered address by address at insert time; any other
   address that was resolved once is remembered there too (bounded: the memo is dropped when it
   reaches :data:`EXACT_MEMO_MAX` entries, so a guest scanning the address space cannot grow
   host memory).  Unmapped addresses are remembered as ``None``, so a guest polling an absent
   port stays O(1) as well.
2. ``_pages``: a dict from 4 KiB page number to the range that covers the whole page (MMIO
   windows such as a 4 KiB virtio-mmio register block).
3. a bisect over the sorted range starts (ranges that are not page-aligned, e.g. the 512-byte
   virtio-mmio windows of the guest command line).

Everything on the access path is guest-triggered, hence hostile: an access to nothing, or one
that runs past the end of its device, reads as all ones (what an ISA/PCI bus returns for a
master abort) and is logged once per address; an exception raised by a device is contained,
logged once per device and exception type, and the access completes as all ones.  A guest never
crashes the VMM through the bus.

Threading: :meth:`insert` is meant for VM construction, before vCPU threads run.  Lookups from
several vCPU threads at once are safe: they only read the maps or replace/extend the memo dict,
single operations that are atomic under the GIL (a lost memo entry only costs a slow lookup).
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import Callable
from typing import Protocol

from .errors import ConfigError

logger = logging.getLogger(__name__)

PAGE_SHIFT = 12
# Ranges up to this many addresses are entered into the exact map address by address
# (a 16550 has 8 ports, the i8042 window 5, CMOS 2).
EXACT_RANGE_MAX = 64
# Upper bound of remembered lookups of other addresses (hits and misses) before the memo is reset.
EXACT_MEMO_MAX = 4096
# Pages entered into the page map per range; bigger ranges are found by bisect instead.
PAGE_MAP_MAX = 1024
# Distinct addresses / (device, exception) pairs that get a log line; beyond that one notice.
LOGGED_CAUSES_MAX = 1024
ADDRESS_LIMIT = 1 << 64

_ONES = (0, 0xFF, 0xFFFF, 0xFF_FFFF, 0xFFFF_FFFF, (1 << 40) - 1, (1 << 48) - 1, (1 << 56) - 1,
         (1 << 64) - 1)


def all_ones(size: int) -> int:
    """The value a read of ``size`` bytes from nothing returns: every bit set."""
    if 0 < size <= 8:
        return _ONES[size]
    return (1 << (8 * max(size, 0))) - 1


class BusDevice(Protocol):
    """What the bus needs from a device: register reads and writes at an offset.

    ``size`` is 1, 2, 4 or 8 bytes; values are little-endian integers of that width.  A read
    returns an int in ``[0, 2**(8*size))`` (the bus masks anything wider).
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


# One mapped range: (device, base, end, device.read, device.write).  A plain tuple: unpacking it
# is the cheapest access, and the bound methods are made once, not on every access.
_Range = tuple[BusDevice, int, int, Callable[[int, int], int], Callable[[int, int, int], None]]
# Access widths a KVM exit can carry (PIO: 1/2/4, MMIO: 1/2/4/8).
_SIZES = frozenset((1, 2, 4, 8))


class Bus:
    """Dispatches accesses in one address space (``"pio"`` or ``"mmio"``) to devices."""

    __slots__ = (
        "name",
        "_starts",
        "_ranges",
        "_fixed",
        "_exact",
        "_pages",
        "_logged",
        "unknown_reads",
        "unknown_writes",
        "device_errors",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []  # sorted bases, parallel to _ranges
        self._ranges: list[_Range] = []
        self._fixed: dict[int, _Range] = {}  # small ranges, address by address
        self._exact: dict[int, _Range | None] = {}  # _fixed plus the bounded memo
        self._pages: dict[int, _Range] = {}
        self._logged: set[object] = set()
        # Metrics: accesses that hit nothing, and device exceptions contained by the bus.
        self.unknown_reads = 0
        self.unknown_writes = 0
        self.device_errors = 0

    # -- construction -------------------------------------------------------------------------

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        """Map ``device`` at ``[base, base + length)``; ConfigError if it overlaps another."""
        if length <= 0 or base < 0 or base + length > ADDRESS_LIMIT:
            raise ConfigError(
                f"{self.name} bus: cannot map {_name(device)} at {base:#x} with length "
                f"{length:#x}: the range must be non-empty and inside the 64-bit address space"
            )
        end = base + length
        i = bisect_right(self._starts, base)
        # Only the neighbours can overlap: ranges are kept sorted and disjoint.
        for j in (i - 1, i):
            if 0 <= j < len(self._ranges):
                other, obase, oend = self._ranges[j][:3]
                if base < oend and obase < end:
                    raise ConfigError(
                        f"{self.name} bus: {_name(device)} at {base:#x}-{end - 1:#x} overlaps "
                        f"{_name(other)} at {obase:#x}-{oend - 1:#x}; give one of them another "
                        f"address"
                    )
        entry: _Range = (device, base, end, device.read, device.write)
        self._starts.insert(i, base)
        self._ranges.insert(i, entry)
        if length <= EXACT_RANGE_MAX:
            for addr in range(base, end):
                self._fixed[addr] = entry
        first_page = (base + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
        end_page = end >> PAGE_SHIFT  # exclusive: pages wholly inside the range
        if 0 < end_page - first_page <= PAGE_MAP_MAX:
            for page in range(first_page, end_page):
                self._pages[page] = entry
        # A new range can turn a remembered miss into a hit: start the memo afresh.
        self._exact = dict(self._fixed)

    def ranges(self) -> list[tuple[BusDevice, int, int]]:
        """The mapped ranges as ``(device, base, length)``, sorted by base."""
        return [(dev, base, end - base) for dev, base, end, _r, _w in self._ranges]

    # -- lookup -------------------------------------------------------------------------------

    def _resolve(self, addr: int) -> _Range | None:
        entry = self._pages.get(addr >> PAGE_SHIFT)
        if entry is None:
            i = bisect_right(self._starts, addr) - 1
            if i >= 0:
                candidate = self._ranges[i]
                if addr < candidate[2]:
                    entry = candidate
        exact = self._exact
        if len(exact) >= len(self._fixed) + EXACT_MEMO_MAX:
            exact = self._exact = dict(self._fixed)
        exact[addr] = entry
        return entry

    def lookup(self, addr: int) -> tuple[BusDevice, int] | None:
        """The device mapped at ``addr`` and the offset of ``addr`` in it, or None."""
        try:
            entry = self._exact[addr]
        except KeyError:
            entry = self._resolve(addr)
        if entry is None:
            return None
        return entry[0], addr - entry[1]

    # -- access -------------------------------------------------------------------------------

    def read(self, addr: int, size: int) -> int:
        """Read ``size`` bytes at ``addr``; all ones if nothing (whole) is mapped there."""
        # try/except instead of dict.get: free when the address is known (the common case).
        try:
            entry = self._exact[addr]
        except KeyError:
            entry = self._resolve(addr)
        if entry is not None and size in _SIZES:
            device, base, end, read, _ = entry
            if addr + size <= end:
                try:
                    # Masked: a device bug must not hand KVM a value wider than the access.
                    return read(addr - base, size) & _ONES[size]
                except Exception as exc:  # a device bug must not take the VMM down
                    self._device_error(device, "read", addr, exc)
                    return all_ones(size)
        self.unknown_reads += 1
        self._log_unknown("read", addr, size, entry)
        return all_ones(size)

    def write(self, addr: int, size: int, value: int) -> None:
        """Write ``size`` bytes at ``addr``; ignored if nothing (whole) is mapped there."""
        try:
            entry = self._exact[addr]
        except KeyError:
            entry = self._resolve(addr)
        if entry is not None and size in _SIZES:
            device, base, end, _, write = entry
            if addr + size <= end:
                try:
                    write(addr - base, size, value & _ONES[size])
                except Exception as exc:  # a device bug must not take the VMM down
                    self._device_error(device, "write", addr, exc)
                return
        self.unknown_writes += 1
        self._log_unknown("write", addr, size, entry)

    # -- logging (guest-triggered: once per cause, bounded) -----------------------------------

    def _first_time(self, cause: object) -> bool:
        logged = self._logged
        if cause in logged:
            return False
        if len(logged) >= LOGGED_CAUSES_MAX:
            if "<overflow>" not in logged:
                logged.add("<overflow>")
                logger.info("%s bus: more than %d distinct unknown accesses or device errors; "
                            "no longer logging new ones", self.name, LOGGED_CAUSES_MAX)
            return False
        logged.add(cause)
        return True

    def _log_unknown(self, op: str, addr: int, size: int, entry: _Range | None) -> None:
        if not self._first_time((op, addr)):
            return
        if entry is None:
            logger.info("%s bus: guest %s of %d byte(s) at %#x: nothing mapped there "
                        "(reads return all ones, writes are ignored; logged once per address)",
                        self.name, op, size, addr)
            return
        device, base, end = entry[:3]
        why = "runs past the end of" if size in _SIZES else "has an unsupported width for"
        logger.info("%s bus: guest %s of %d byte(s) at %#x %s %s at %#x-%#x; treated as "
                    "unmapped (logged once per address)", self.name, op, size, addr, why,
                    _name(device), base, end - 1)

    def _device_error(self, device: BusDevice, op: str, addr: int, exc: Exception) -> None:
        self.device_errors += 1
        if self._first_time(("error", id(device), op, type(exc))):
            outcome = "reads as all ones" if op == "read" else "is dropped"
            logger.error("%s bus: %s %s at %#x raised %s: %s; the guest's access %s "
                         "(logged once per device and error type)", self.name, _name(device), op,
                         addr, type(exc).__name__, exc, outcome, exc_info=exc)


def _name(device: object) -> str:
    return type(device).__name__
