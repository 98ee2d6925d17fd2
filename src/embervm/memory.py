"""Guest memory: anonymous mmap-backed RAM regions at guest-physical addresses.

Every access is bounds-checked: a read, write or view never crosses the end of a region (the
x86 MMIO gap below 4 GiB is not RAM), and an access outside RAM raises
:class:`~embervm.errors.GuestMemoryError`.  Views are ``memoryview`` slices of the mmap, so
device back-ends can ``os.preadv``/``os.pwritev`` straight into guest RAM without copies.

The same object is registered with KVM as memory slots (see ``embervm.kvm``): each region
exposes its host virtual address.  Nothing here needs /dev/kvm.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import ConfigError, GuestMemoryError

# x86-64 layout (as Firecracker): RAM from 0 up to the 32-bit MMIO gap, the rest above 4 GiB.
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000
PAGE_SIZE = 4096

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(eq=False)
class MemoryRegion:
    """One contiguous stretch of guest RAM backed by an anonymous mapping."""

    guest_addr: int
    size: int
    mmap: mmap.mmap = field(repr=False)
    view: memoryview = field(repr=False)
    host_addr: int

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


def _map_anonymous(size: int) -> mmap.mmap:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    return mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)


class GuestMemory:
    """Guest-physical RAM made of non-overlapping, page-aligned regions."""

    def __init__(self, layout: Iterable[tuple[int, int]]) -> None:
        regions: list[MemoryRegion] = []
        for gpa, size in sorted(layout):
            if size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
                raise ConfigError(
                    f"guest memory region {gpa:#x}+{size:#x} must be non-empty and page-aligned"
                )
            if regions and gpa < regions[-1].end:
                raise ConfigError(f"guest memory region at {gpa:#x} overlaps the previous one")
            mm = _map_anonymous(size)
            host_addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
            regions.append(MemoryRegion(gpa, size, mm, memoryview(mm), host_addr))
        if not regions:
            raise ConfigError("guest memory needs at least one region")
        self.regions: tuple[MemoryRegion, ...] = tuple(regions)
        self.size = sum(r.size for r in regions)
        # The first region (low RAM) serves nearly every access: keep its bounds at hand.
        self._r0 = regions[0]
        self._r0_start = regions[0].guest_addr
        self._r0_end = regions[0].end

    @classmethod
    def x86(cls, mem_bytes: int) -> GuestMemory:
        """RAM of ``mem_bytes`` laid out around the 32-bit MMIO gap (3 GiB .. 4 GiB)."""
        if mem_bytes <= 0 or mem_bytes % PAGE_SIZE:
            raise ConfigError(f"memory size {mem_bytes} must be a positive multiple of 4 KiB")
        low = min(mem_bytes, MMIO_GAP_START)
        layout = [(0, low)]
        if mem_bytes > low:
            layout.append((MMIO_GAP_END, mem_bytes - low))
        return cls(layout)

    # -- lookup -----------------------------------------------------------------------------

    def locate(self, addr: int, length: int) -> tuple[MemoryRegion, int]:
        """Return (region, offset) holding ``[addr, addr+length)``, or raise GuestMemoryError."""
        if self._r0_start <= addr and addr + length <= self._r0_end and length >= 0:
            return self._r0, addr - self._r0_start
        if length >= 0 and addr >= 0:
            for r in self.regions:
                if r.guest_addr <= addr and addr + length <= r.end:
                    return r, addr - r.guest_addr
        raise GuestMemoryError(f"guest access {addr:#x}+{length:#x} is outside guest RAM")

    def contains(self, addr: int, length: int) -> bool:
        """True if ``[addr, addr+length)`` lies inside one RAM region."""
        if length < 0 or addr < 0:
            return False
        return any(r.guest_addr <= addr and addr + length <= r.end for r in self.regions)

    def host_offset(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        """The backing mmap and offset for a checked range (for ``struct.unpack_from``)."""
        r, off = self.locate(addr, length)
        return r.mmap, off

    # -- byte access ------------------------------------------------------------------------

    def view(self, addr: int, length: int) -> memoryview:
        """A writable memoryview of guest RAM (no copy). Never crosses a region."""
        r, off = self.locate(addr, length)
        return r.view[off : off + length]

    def read(self, addr: int, length: int) -> bytes:
        r, off = self.locate(addr, length)
        return r.mmap[off : off + length]

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        r, off = self.locate(addr, len(data))
        r.mmap[off : off + len(data)] = data

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        r, off = self.locate(addr, length)
        r.view[off : off + length] = bytes([byte]) * length

    # -- integer access (little-endian, the virtio and x86 byte order) -----------------------

    def read_u8(self, addr: int) -> int:
        r, off = self.locate(addr, 1)
        return r.mmap[off]

    def read_u16(self, addr: int) -> int:
        r, off = self.locate(addr, 2)
        return _U16.unpack_from(r.mmap, off)[0]

    def read_u32(self, addr: int) -> int:
        r, off = self.locate(addr, 4)
        return _U32.unpack_from(r.mmap, off)[0]

    def read_u64(self, addr: int) -> int:
        r, off = self.locate(addr, 8)
        return _U64.unpack_from(r.mmap, off)[0]

    def write_u8(self, addr: int, value: int) -> None:
        r, off = self.locate(addr, 1)
        r.mmap[off] = value & 0xFF

    def write_u16(self, addr: int, value: int) -> None:
        r, off = self.locate(addr, 2)
        _U16.pack_into(r.mmap, off, value & 0xFFFF)

    def write_u32(self, addr: int, value: int) -> None:
        r, off = self.locate(addr, 4)
        _U32.pack_into(r.mmap, off, value & 0xFFFF_FFFF)

    def write_u64(self, addr: int, value: int) -> None:
        r, off = self.locate(addr, 8)
        _U64.pack_into(r.mmap, off, value & 0xFFFF_FFFF_FFFF_FFFF)

    # -- host memory management ---------------------------------------------------------------

    def discard(self, addr: int, length: int) -> None:
        """Give the host pages back (MADV_DONTNEED); they read as zero when touched again."""
        r, off = self.locate(addr, length)
        start = off - off % PAGE_SIZE
        end = -(-(off + length) // PAGE_SIZE) * PAGE_SIZE
        r.mmap.madvise(mmap.MADV_DONTNEED, start, min(end, r.size) - start)

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
        # The ctypes export taken for host_addr keeps the mmap open until the object dies;
        # the mapping goes away with the process or with garbage collection.

    def __repr__(self) -> str:
        parts = ", ".join(f"{r.guest_addr:#x}+{r.size:#x}" for r in self.regions)
        return f"GuestMemory({parts})"
