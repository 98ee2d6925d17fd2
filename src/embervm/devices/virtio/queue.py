"""Device-side virtqueues (split and packed rings), descriptor chains and the chain reader/writer.

This is the per-request hot path of every virtio device, and everything in the rings is written
by a guest that may be hostile.  The rules followed throughout (virtio.md §4.6, §4.7, §5):

* ring indices are free-running u16 counters (``(a - b) & 0xffff``); only the ring slot is
  ``% size`` (seed audit: crosvm once reduced the index modulo the size before comparing it);
* every descriptor field is read exactly once into a local (no TOCTOU), with one
  ``struct.unpack_from`` straight on the guest-RAM mmap;
* every walk is bounded (a chain has at most ``size`` ring descriptors; an indirect table at most
  ``len / 16`` entries, and at most :data:`MAX_INDIRECT_ENTRIES`), every buffer is checked to lie
  inside one guest-RAM region, computed with Python ints so nothing overflows;
* only :class:`~embervm.errors.QueueError` (and its subclass :class:`ChainError`) leaves
  :meth:`Virtqueue.pop`; after either the queue is still consistent and the caller may go on.

Sans-I/O in the h11 sense: nothing here knows about KVM, eventfds or threads; a queue sees a
:class:`~embervm.memory.GuestMemory` and nothing else, so it is tested without a VM.  A queue is
owned by one thread at a time (the device serialises its queue work).
"""

from __future__ import annotations

import mmap
import struct
import threading
from abc import ABC, abstractmethod
from typing import Any

from ...errors import QueueError
from ...memory import GuestMemory
from .spec import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_F_NO_NOTIFY,
)

__all__ = [
    "MAX_CHAIN_BYTES",
    "MAX_INDIRECT_ENTRIES",
    "ChainError",
    "ChainReader",
    "ChainWriter",
    "DescriptorChain",
    "PackedQueue",
    "QueueConfig",
    "SplitQueue",
    "Virtqueue",
    "full_barrier",
    "legacy_ring_addresses",
    "make_queue",
    "split_ring_sizes",
]

#: Largest total byte count of one chain.  virtio.md §4.6 bounds a chain at 2**32 bytes; one byte
#: less, because ``used.len`` is a le32 and must be able to report every byte of the chain.
MAX_CHAIN_BYTES = 0xFFFF_FFFF

#: Largest indirect table, in descriptors.  The spec bounds it only by the 32-bit ``len``
#: (2**28 entries, minutes of Python); rust-vmm's virtio-queue refuses tables above 2**16
#: entries, and Linux never builds one larger than its scatter-gather limit (a few hundred).
MAX_INDIRECT_ENTRIES = 1 << 16

# §2.7.5 split descriptor: le64 addr, le32 len, le16 flags, le16 next.
_SPLIT_DESC = struct.Struct("<QIHH")
# §2.8.13 packed descriptor: le64 addr, le32 len, le16 id, le16 flags.  The head's flags are read
# first on their own (availability), then the other fields with _PACKED_HEAD, so every field is
# still read exactly once.
_PACKED_DESC = struct.Struct("<QIHH")
_PACKED_HEAD = struct.Struct("<QIH")
_U16 = struct.Struct("<H")
_U16X2 = struct.Struct("<HH")
_USED_ELEM = struct.Struct("<II")  # §2.7.8 used element: le32 id, le32 len
_PACKED_USED = struct.Struct("<IH")  # le32 len @8, le16 id @12 of a used packed descriptor

_F_NEXT = VIRTQ_DESC_F_NEXT
_F_WRITE = VIRTQ_DESC_F_WRITE
_F_INDIRECT = VIRTQ_DESC_F_INDIRECT
_F_AVAIL = VIRTQ_DESC_F_AVAIL
_F_USED = VIRTQ_DESC_F_USED

# A full memory barrier.  CPython has no fence primitive and glibc does not export
# __sync_synchronize (it is a compiler builtin), so we use a lock: an uncontended
# threading.Lock acquire/release is a sem_trywait/sem_post pair, i.e. lock-prefixed
# compare-and-swap instructions, and on x86 every locked instruction is a full fence
# (store→load ordering included, which TSO does not otherwise give).  Cost ~0.1 µs.  On aarch64
# the acquire/release pair is not a full fence in theory; embervm targets x86-64 hosts.
_FENCE = threading.Lock()


def full_barrier() -> None:
    """Order every earlier guest-RAM store before every later load (virtio.md §4.7)."""
    _FENCE.acquire()
    _FENCE.release()


# ---------------------------------------------------------------------------------------------
# Register-level configuration and ring layout
# ---------------------------------------------------------------------------------------------


class QueueConfig:
    """The registers of one queue as the transport writes them (§4.2.2 QueueNum..QueueDevice)."""

    __slots__ = ("max_size", "size", "ready", "desc_addr", "driver_addr", "device_addr")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = max_size
        self.ready = False
        self.desc_addr = 0
        self.driver_addr = 0
        self.device_addr = 0

    def reset(self) -> None:
        """Back to the power-on values (device reset, QueueReset)."""
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.driver_addr = 0
        self.device_addr = 0

    def __repr__(self) -> str:
        return (
            f"QueueConfig(max_size={self.max_size}, size={self.size}, ready={self.ready}, "
            f"desc={self.desc_addr:#x}, driver={self.driver_addr:#x}, "
            f"device={self.device_addr:#x})"
        )


def split_ring_sizes(size: int) -> tuple[int, int, int]:
    """Byte sizes of (descriptor table, available ring, used ring) of a split queue (§2.7)."""
    # Both rings include their trailing event field (used_event / avail_event): Linux always
    # allocates it (vring_size), and with EVENT_IDX the device reads/writes it.
    return 16 * size, 6 + 2 * size, 6 + 8 * size


def legacy_ring_addresses(pfn: int, page_size: int, align: int, size: int) -> tuple[int, int, int]:
    """(desc, avail, used) of a legacy MMIO queue: Linux ``vring_init`` layout (spec §2.7.2).

    ``page_size`` (GuestPageSize) and ``align`` (QueueAlign) are written by the guest; they must
    be powers of two, else :class:`QueueError`.
    """
    if page_size <= 0 or page_size & (page_size - 1):
        raise QueueError(f"legacy GuestPageSize {page_size:#x} is not a power of two")
    if align <= 0 or align & (align - 1):
        raise QueueError(f"legacy QueueAlign {align:#x} is not a power of two")
    desc = pfn * page_size
    avail = desc + 16 * size
    # The +2 is used_event, reserved whether or not EVENT_IDX is negotiated (vring_size()).
    used = (avail + 4 + 2 * size + 2 + align - 1) & ~(align - 1)
    return desc, avail, used


# ---------------------------------------------------------------------------------------------
# Descriptor chains and the one chain reader/writer
# ---------------------------------------------------------------------------------------------


class DescriptorChain:
    """One validated descriptor chain, flattened into readable and writable segments.

    ``readable``/``writable`` hold ``(guest address, length)`` pairs in chain order; zero-length
    descriptors are left out, and every segment is known to lie inside one guest-RAM region.
    """

    __slots__ = (
        "head",
        "ndesc",
        "readable",
        "writable",
        "readable_len",
        "writable_len",
        "mem",
        "pos",
    )

    def __init__(
        self,
        mem: GuestMemory,
        head: int,
        ndesc: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
        readable_len: int,
        writable_len: int,
        pos: int = -1,
    ) -> None:
        self.mem = mem
        #: split: head descriptor index; packed: buffer id (the id of the chain's last descriptor)
        self.head = head
        #: ring descriptors the chain occupies (an indirect table counts as its one descriptor)
        self.ndesc = ndesc
        #: where :meth:`Virtqueue.pop` found the chain, so :meth:`Virtqueue.undo_pop` can put it
        #: back: split, the avail index (u16) it was taken from; packed, its first slot and the
        #: wrap counter there as ``slot | wrap << 15``.  -1: not poppable back (error stubs,
        #: chains built by hand).
        self.pos = pos
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def reader(self) -> ChainReader:
        """A byte stream over the device-readable buffers."""
        return ChainReader(self.mem, self.readable, self.readable_len)

    def writer(self) -> ChainWriter:
        """A byte stream over the device-writable buffers."""
        return ChainWriter(self.mem, self.writable, self.writable_len)

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, ndesc={self.ndesc}, "
            f"readable={self.readable_len}B/{len(self.readable)}, "
            f"writable={self.writable_len}B/{len(self.writable)})"
        )


class ChainError(QueueError):
    """A chain was taken off the ring but is invalid (bad address, loop, bad indirect table...).

    The ring itself is still consistent: the next :meth:`Virtqueue.pop` returns the next chain.
    ``chain`` is the consumed chain without buffers (``None`` if even its head index is invalid);
    a device may return it with ``add_used(err.chain, 0)`` so that the driver does not leak it.
    """

    def __init__(self, message: str, chain: DescriptorChain | None) -> None:
        super().__init__(message)
        self.chain = chain


class _SegmentCursor:
    """Shared position logic of ChainReader/ChainWriter: a cursor over (addr, len) segments."""

    __slots__ = ("_mem", "_segs", "_i", "_off", "_left", "_total")

    def __init__(self, mem: GuestMemory, segs: list[tuple[int, int]], total: int) -> None:
        self._mem = mem
        self._segs = segs
        self._i = 0  # current segment
        self._off = 0  # offset inside it
        self._left = total
        self._total = total

    @property
    def remaining(self) -> int:
        return self._left

    def _clamp(self, n: int) -> int:
        left = self._left
        return left if n < 0 or n > left else n

    def _take(self, n: int) -> list[memoryview]:
        """Consume exactly ``n`` (≤ remaining) bytes; return guest-RAM views covering them."""
        out: list[memoryview] = []
        if n <= 0:
            return out
        segs = self._segs
        locate = self._mem.locate
        i = self._i
        off = self._off
        self._left -= n
        # Bounded by the number of segments: every pass consumes one segment or ends.
        while n:
            addr, ln = segs[i]
            k = ln - off
            if k > n:
                k = n
            region, roff = locate(addr + off, k)
            out.append(region.view[roff : roff + k])
            n -= k
            off += k
            if off == ln:
                i += 1
                off = 0
        self._i = i
        self._off = off
        return out

    def skip(self, n: int) -> int:
        """Advance up to ``n`` bytes without touching them; return how many were skipped."""
        n = self._clamp(n)
        if n <= 0:
            return 0
        segs = self._segs
        i = self._i
        off = self._off + n
        self._left -= n
        while i < len(segs) and off >= segs[i][1]:
            off -= segs[i][1]
            i += 1
        self._i = i
        self._off = off
        return n


class ChainReader(_SegmentCursor):
    """The device-readable buffers of a chain as one byte stream (crosvm ``descriptor_utils``).

    Device code parses headers over this stream and never depends on how the driver split them
    across descriptors (virtio.md §9 pitfall 11).
    """

    __slots__ = ()

    def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all remaining bytes if ``n`` is -1)."""
        n = self._clamp(n)
        if n <= 0:
            return b""
        addr, ln = self._segs[self._i]
        off = self._off
        if ln - off >= n:  # fast path: one segment
            region, roff = self._mem.locate(addr + off, n)
            off += n
            if off == ln:
                self._i += 1
                off = 0
            self._off = off
            self._left -= n
            return region.mmap[roff : roff + n]
        return b"".join(self._take(n))

    def read_exact(self, n: int) -> bytes:
        """Read exactly ``n`` bytes; :class:`QueueError` (nothing consumed) if fewer remain."""
        if n < 0:
            raise ValueError(f"read_exact needs a byte count >= 0, got {n}")
        if n > self._left:
            raise QueueError(f"descriptor chain too short: {n} bytes needed, {self._left} left")
        return self.read(n)

    def read_struct(self, st: struct.Struct) -> tuple[Any, ...]:
        """Read and unpack one ``st`` (e.g. a device header); QueueError if too few bytes."""
        n = st.size
        if n > self._left:
            raise QueueError(f"descriptor chain too short: {n} bytes needed, {self._left} left")
        addr, ln = self._segs[self._i]
        off = self._off
        if ln - off >= n:
            region, roff = self._mem.locate(addr + off, n)
            off += n
            if off == ln:
                self._i += 1
                off = 0
            self._off = off
            self._left -= n
            return st.unpack_from(region.mmap, roff)
        return st.unpack(b"".join(self._take(n)))

    def readinto(self, buf: Any) -> int:
        """Fill ``buf`` (any writable buffer) from the stream; return the number of bytes copied."""
        dst = memoryview(buf)
        if dst.format != "B" or dst.ndim != 1:
            dst = dst.cast("B")
        pos = 0
        for v in self._take(self._clamp(dst.nbytes)):
            k = len(v)
            dst[pos : pos + k] = v
            pos += k
        return pos

    def views(self, n: int = -1) -> list[memoryview]:
        """Consume up to ``n`` bytes as read-only views of guest RAM (for ``os.pwritev``)."""
        return [v.toreadonly() for v in self._take(self._clamp(n))]


class ChainWriter(_SegmentCursor):
    """The device-writable buffers of a chain as one byte stream; ``written`` is ``used.len``."""

    __slots__ = ()

    @property
    def written(self) -> int:
        """Bytes written (or reserved/skipped) so far: the value to report in ``used.len``."""
        return self._total - self._left

    def write(self, data: Any) -> int:
        """Write ``min(len(data), remaining)`` bytes; return how many were written."""
        tp = type(data)
        if tp is bytes or tp is bytearray:  # the common case: skip the memoryview set-up
            src = data
            n = len(data)
        else:
            src = memoryview(data)
            if src.format != "B" or src.ndim != 1:
                src = src.cast("B")
            n = src.nbytes
        if n > self._left:
            n = self._left
            src = memoryview(src)[:n]
        if n <= 0:
            return 0
        addr, ln = self._segs[self._i]
        off = self._off
        if ln - off >= n:  # fast path: one segment
            region, roff = self._mem.locate(addr + off, n)
            region.mmap[roff : roff + n] = src
            off += n
            if off == ln:
                self._i += 1
                off = 0
            self._off = off
            self._left -= n
            return n
        mv = memoryview(src)  # slices of it are views, not copies
        pos = 0
        for v in self._take(n):
            k = len(v)
            v[:] = mv[pos : pos + k]
            pos += k
        return n

    def write_struct(self, st: struct.Struct, *values: Any) -> int:
        """Pack ``values`` with ``st`` and write them (truncated if the chain is too short)."""
        return self.write(st.pack(*values))

    def views(self, n: int = -1) -> list[memoryview]:
        """Reserve up to ``n`` bytes as writable guest-RAM views (for ``os.preadv``).

        The reserved bytes count as written: report a smaller ``used.len`` yourself if the
        back-end filled fewer of them.
        """
        return self._take(self._clamp(n))


# ---------------------------------------------------------------------------------------------
# Queues
# ---------------------------------------------------------------------------------------------


class Virtqueue(ABC):
    """A ready virtqueue as the device sees it.  Built by :func:`make_queue`."""

    __slots__ = ("index", "size", "event_idx", "indirect", "mem", "_pending", "_r0s", "_r0e")

    def __init__(self, index: int, size: int, mem: GuestMemory, features: int) -> None:
        self.index = index
        self.size = size
        self.mem = mem
        self.event_idx = bool(features >> VIRTIO_F_EVENT_IDX & 1)
        self.indirect = bool(features >> VIRTIO_F_INDIRECT_DESC & 1)
        self._pending = False  # something was published since the last needs_interrupt()
        # Buffers nearly always live in the first RAM region: check that inline, fall back to
        # GuestMemory.contains for the others.
        r0 = mem.regions[0]
        self._r0s = r0.guest_addr
        self._r0e = r0.guest_addr + r0.size

    @abstractmethod
    def pop(self) -> DescriptorChain | None:
        """The next available chain, or ``None`` when the ring is empty.

        Raises :class:`QueueError` for an invalid ring (nothing consumed; calling again raises
        again until the driver fixes it) or :class:`ChainError` for an invalid chain (consumed;
        the next call continues with the next chain).
        """

    @abstractmethod
    def undo_pop(self, chain: DescriptorChain) -> None:
        """Put back ``chain``, the chain the last :meth:`pop` returned, as if it was never
        taken: the next :meth:`pop` reads it again from the ring.

        For a device that took a request it cannot serve yet (a rate limiter said no): the
        driver still owns the buffers, nothing was written to the used ring.  Only the most
        recent pop can be undone, and only once; anything else (an older chain, a chain from
        another queue, a :class:`ChainError` stub, which was consumed) is a device bug and
        raises ValueError without changing the queue.
        """

    @abstractmethod
    def add_used(self, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` to the driver with ``used.len = written``.

        ``written`` must be within ``0..chain.writable_len`` (normally ``writer.written``);
        anything else is a device bug and raises ValueError without touching the ring.
        """

    @abstractmethod
    def needs_interrupt(self) -> bool:
        """Whether the driver wants a used-buffer notification for what was published since
        the last call (False if nothing was)."""

    @abstractmethod
    def disable_notifications(self) -> None:
        """Ask the driver not to kick this queue (the device is polling it)."""

    @abstractmethod
    def enable_notifications(self) -> bool:
        """Ask for kicks again; True if buffers are already available (keep processing, or
        a kick sent before the re-enable became visible is lost)."""

    @abstractmethod
    def has_available(self) -> bool:
        """Whether the driver has made a buffer available that :meth:`pop` has not taken."""

    def _check_written(self, chain: DescriptorChain, written: int) -> None:
        # A device bug, not a guest error: used.len can never exceed the writable bytes.
        if written < 0 or written > chain.writable_len:
            raise ValueError(
                f"queue {self.index}: written={written} outside 0..{chain.writable_len} "
                f"for chain {chain.head}"
            )

    def _buffer_ok(self, addr: int, ln: int) -> bool:
        return (self._r0s <= addr and addr + ln <= self._r0e) or self.mem.contains(addr, ln)


class SplitQueue(Virtqueue):
    """Split virtqueue (§2.7): descriptor table, available ring, used ring."""

    __slots__ = (
        "_mask",
        "_desc_mm",
        "_desc_off",
        "_avail_mm",
        "_avail_off",
        "_used_mm",
        "_used_off",
        "_ring_off",
        "_used_event_off",
        "_used_ring_off",
        "_avail_event_off",
        "_last_avail",
        "_next_used",
        "_signalled_used",
    )

    def __init__(
        self,
        index: int,
        size: int,
        mem: GuestMemory,
        features: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
    ) -> None:
        super().__init__(index, size, mem, features)
        dsz, asz, usz = split_ring_sizes(size)
        self._mask = size - 1  # size is a power of two: slot = idx & mask
        self._desc_mm, self._desc_off = mem.host_offset(desc_addr, dsz)
        self._avail_mm, self._avail_off = mem.host_offset(driver_addr, asz)
        self._used_mm, self._used_off = mem.host_offset(device_addr, usz)
        self._ring_off = self._avail_off + 4
        self._used_event_off = self._avail_off + 4 + 2 * size
        self._used_ring_off = self._used_off + 4
        self._avail_event_off = self._used_off + 4 + 8 * size
        self._last_avail = 0
        self._next_used = 0
        self._signalled_used = 0

    @property
    def last_avail_idx(self) -> int:
        """The driver's avail index up to which chains have been popped (free-running u16)."""
        return self._last_avail

    @property
    def used_idx(self) -> int:
        """The used index published so far (free-running u16)."""
        return self._next_used

    def has_available(self) -> bool:
        return _U16.unpack_from(self._avail_mm, self._avail_off + 2)[0] != self._last_avail

    def pop(self) -> DescriptorChain | None:
        last = self._last_avail
        # avail.idx is read once, before the ring entry it covers (x86 keeps loads in order).
        avail_idx = _U16.unpack_from(self._avail_mm, self._avail_off + 2)[0]
        if avail_idx == last:
            return None
        if (avail_idx - last) & 0xFFFF > self.size:
            raise QueueError(
                f"queue {self.index}: avail.idx {avail_idx} is more than {self.size} "
                f"entries ahead of {last}"
            )
        head = _U16.unpack_from(self._avail_mm, self._ring_off + 2 * (last & self._mask))[0]
        # Consume the entry before walking: an invalid chain is skipped, not retried forever.
        self._last_avail = (last + 1) & 0xFFFF
        chain = self._walk(head)
        chain.pos = last
        return chain

    def undo_pop(self, chain: DescriptorChain) -> None:
        pos = chain.pos
        if pos < 0 or chain.mem is not self.mem or (pos + 1) & 0xFFFF != self._last_avail:
            raise ValueError(
                f"queue {self.index}: undo_pop of chain {chain.head} (avail index {pos}), "
                f"but the last pop ended at {self._last_avail}"
            )
        self._last_avail = pos

    def _walk(self, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise ChainError(f"queue {self.index}: head descriptor {head} >= size {size}", None)
        unpack = _SPLIT_DESC.unpack_from
        table = self._desc_mm
        base = self._desc_off
        limit = size  # entries of the current table: also the walk's TTL (catches loops)
        r0s = self._r0s
        r0e = self._r0e
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        rlen = wlen = 0
        ndesc = 0  # descriptors visited in the queue's own table
        in_table = False  # walking an indirect table
        visited = 0
        idx = head
        while True:
            addr, ln, flags, nxt = unpack(table, base + 16 * idx)
            visited += 1
            if not in_table:
                ndesc += 1
            if flags & _F_INDIRECT:
                table, base, limit = self._indirect_table(head, ndesc, in_table, flags, addr, ln)
                in_table = True
                visited = 0
                idx = 0
                continue
            if ln:
                if not ((r0s <= addr and addr + ln <= r0e) or self.mem.contains(addr, ln)):
                    raise self._chain_error(head, ndesc, f"buffer {addr:#x}+{ln:#x} not in RAM")
                if flags & _F_WRITE:
                    writable.append((addr, ln))
                    wlen += ln
                elif writable:
                    raise self._chain_error(head, ndesc, "readable buffer after a writable one")
                else:
                    readable.append((addr, ln))
                    rlen += ln
            if not flags & _F_NEXT:
                break
            if visited >= limit:
                raise self._chain_error(head, ndesc, f"chain longer than {limit} (loop?)")
            if nxt >= limit:
                raise self._chain_error(head, ndesc, f"next {nxt} >= table size {limit}")
            idx = nxt
        if rlen + wlen > MAX_CHAIN_BYTES:
            raise self._chain_error(head, ndesc, f"chain length {rlen + wlen} exceeds 2**32 - 1")
        return DescriptorChain(self.mem, head, ndesc, readable, writable, rlen, wlen)

    def _indirect_table(
        self, head: int, ndesc: int, in_table: bool, flags: int, addr: int, ln: int
    ) -> tuple[mmap.mmap, int, int]:
        """Validate an INDIRECT descriptor (§2.7.5.3); return (mmap, offset, entries)."""
        if not self.indirect:
            raise self._chain_error(
                head, ndesc, "INDIRECT descriptor but INDIRECT_DESC not negotiated"
            )
        if in_table:
            raise self._chain_error(head, ndesc, "nested INDIRECT descriptor")
        if flags & _F_NEXT:
            raise self._chain_error(head, ndesc, "descriptor has both INDIRECT and NEXT")
        if ln == 0 or ln & 15:
            raise self._chain_error(head, ndesc, f"indirect table length {ln} not a multiple of 16")
        if ln > 16 * MAX_INDIRECT_ENTRIES:
            raise self._chain_error(head, ndesc, f"indirect table of {ln // 16} entries too large")
        if not self._buffer_ok(addr, ln):
            raise self._chain_error(head, ndesc, f"indirect table {addr:#x}+{ln:#x} not in RAM")
        mm, off = self.mem.host_offset(addr, ln)
        return mm, off, ln >> 4

    def _chain_error(self, head: int, ndesc: int, why: str) -> ChainError:
        stub = DescriptorChain(self.mem, head, ndesc, [], [], 0, 0)
        return ChainError(f"queue {self.index}: chain {head}: {why}", stub)

    def add_used(self, chain: DescriptorChain, written: int) -> None:
        if written < 0 or written > chain.writable_len:
            self._check_written(chain, written)
        used = self._next_used
        _USED_ELEM.pack_into(
            self._used_mm, self._used_ring_off + 8 * (used & self._mask), chain.head, written
        )
        # The element is stored before used.idx (program order; x86 keeps stores in order).
        used = (used + 1) & 0xFFFF
        self._next_used = used
        _U16.pack_into(self._used_mm, self._used_off + 2, used)
        self._pending = True

    def needs_interrupt(self) -> bool:
        if not self._pending:
            return False
        self._pending = False
        # used.idx must be visible before we read the driver's suppression state, or the driver
        # may see the old used.idx, go to sleep, and we skip the interrupt (QEMU: smp_mb()).
        full_barrier()
        if self.event_idx:
            old = self._signalled_used
            new = self._next_used
            self._signalled_used = new
            used_event = _U16.unpack_from(self._avail_mm, self._used_event_off)[0]
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        self._signalled_used = self._next_used
        flags = _U16.unpack_from(self._avail_mm, self._avail_off)[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def disable_notifications(self) -> None:
        # With EVENT_IDX used.flags is ignored by the driver; leaving avail_event behind
        # last_avail already means "no kicks" (the driver only kicks when it crosses it).
        if not self.event_idx:
            _U16.pack_into(self._used_mm, self._used_off, VIRTQ_USED_F_NO_NOTIFY)

    def enable_notifications(self) -> bool:
        if self.event_idx:
            _U16.pack_into(self._used_mm, self._avail_event_off, self._last_avail)
        else:
            _U16.pack_into(self._used_mm, self._used_off, 0)
        # Store (re-enable) → load (avail.idx) must not be reordered: lost-wakeup rule, §4.4.
        full_barrier()
        return _U16.unpack_from(self._avail_mm, self._avail_off + 2)[0] != self._last_avail

    def __repr__(self) -> str:
        return (
            f"SplitQueue(index={self.index}, size={self.size}, last_avail={self._last_avail}, "
            f"used={self._next_used})"
        )


class PackedQueue(Virtqueue):
    """Packed virtqueue (§2.8): one descriptor ring plus two event suppression structures."""

    __slots__ = (
        "_desc_mm",
        "_desc_off",
        "_drv_mm",
        "_drv_off",
        "_dev_mm",
        "_dev_off",
        "_next_avail",
        "_avail_wrap",
        "_next_used",
        "_used_wrap",
        "_used_since",
    )

    def __init__(
        self,
        index: int,
        size: int,
        mem: GuestMemory,
        features: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
    ) -> None:
        super().__init__(index, size, mem, features)
        self._desc_mm, self._desc_off = mem.host_offset(desc_addr, 16 * size)
        self._drv_mm, self._drv_off = mem.host_offset(driver_addr, 4)
        self._dev_mm, self._dev_off = mem.host_offset(device_addr, 4)
        # §2.8.1: both wrap counters start at 1.
        self._next_avail = 0
        self._avail_wrap = 1
        self._next_used = 0
        self._used_wrap = 1
        self._used_since = 0  # ring slots returned since the last needs_interrupt()

    @property
    def next_avail(self) -> int:
        """(slot, wrap counter) of the next descriptor the device will look at."""
        return self._next_avail | self._avail_wrap << 15

    @property
    def next_used(self) -> int:
        """(slot, wrap counter) of the next used descriptor, as ``off | wrap << 15``."""
        return self._next_used | self._used_wrap << 15

    def _is_avail(self, flags: int, wrap: int) -> bool:
        return bool(flags & _F_AVAIL) == bool(wrap) and bool(flags & _F_USED) != bool(wrap)

    def has_available(self) -> bool:
        flags = _U16.unpack_from(self._desc_mm, self._desc_off + 16 * self._next_avail + 14)[0]
        return self._is_avail(flags, self._avail_wrap)

    def pop(self) -> DescriptorChain | None:
        size = self.size
        desc_mm = self._desc_mm
        desc_off = self._desc_off
        slot = self._next_avail
        wrap = self._avail_wrap
        # Flags first: they say whether the rest of the descriptor is valid (§2.8.4).
        flags = _U16.unpack_from(desc_mm, desc_off + 16 * slot + 14)[0]
        if bool(flags & _F_AVAIL) != bool(wrap) or bool(flags & _F_USED) == bool(wrap):
            return None
        addr, ln, bid = _PACKED_HEAD.unpack_from(desc_mm, desc_off + 16 * slot)
        unpack = _PACKED_DESC.unpack_from
        r0s = self._r0s
        r0e = self._r0e
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        rlen = wlen = 0
        ndesc = 0
        error: str | None = None  # first problem; the walk goes on to find the chain's end
        # A chain is consecutive slots while NEXT is set (§2.8.6): each step wraps at size and
        # flips the wrap counter.  Bounded: a chain may not be longer than the ring.  Only the
        # head's flags decide availability: the driver writes the head last (Linux
        # virtqueue_add_packed), so the rest is in place once the head is (QEMU, crosvm alike).
        while True:
            ndesc += 1
            slot += 1
            if slot == size:
                slot = 0
                wrap ^= 1
            if error is None:
                if flags & _F_INDIRECT:
                    # Only a chain's last descriptor may be INDIRECT: it cannot carry NEXT.
                    if flags & _F_NEXT:
                        error = "descriptor has both INDIRECT and NEXT"
                    else:
                        error, rlen, wlen = self._indirect(addr, ln, readable, writable, rlen, wlen)
                elif ln:
                    if not ((r0s <= addr and addr + ln <= r0e) or self.mem.contains(addr, ln)):
                        error = f"buffer {addr:#x}+{ln:#x} not in RAM"
                    elif flags & _F_WRITE:
                        writable.append((addr, ln))
                        wlen += ln
                    elif writable:
                        error = "readable buffer after a writable one"
                    else:
                        readable.append((addr, ln))
                        rlen += ln
            if not flags & _F_NEXT:
                break
            if ndesc >= size:
                # No end in sight: the ring itself is broken.  Consume nothing.
                raise QueueError(
                    f"queue {self.index}: chain at slot {self._next_avail} longer than "
                    f"the ring ({size})"
                )
            addr, ln, bid, flags = unpack(desc_mm, desc_off + 16 * slot)
        # The buffer id is the one of the chain's last descriptor (§2.8.6).
        start = self._next_avail | self._avail_wrap << 15
        self._next_avail = slot
        self._avail_wrap = wrap
        if error is None and rlen + wlen > MAX_CHAIN_BYTES:
            error = f"chain length {rlen + wlen} exceeds 2**32 - 1"
        if error is not None:
            stub = DescriptorChain(self.mem, bid, ndesc, [], [], 0, 0)
            raise ChainError(f"queue {self.index}: buffer {bid}: {error}", stub)
        return DescriptorChain(self.mem, bid, ndesc, readable, writable, rlen, wlen, start)

    def undo_pop(self, chain: DescriptorChain) -> None:
        pos = chain.pos
        if pos >= 0 and chain.mem is self.mem:
            # The chain's end must be where the queue is now: it was the last one popped.
            slot = (pos & 0x7FFF) + chain.ndesc
            wrap = pos >> 15
            if slot >= self.size:
                slot -= self.size
                wrap ^= 1
            if slot == self._next_avail and wrap == self._avail_wrap and chain.ndesc <= self.size:
                self._next_avail = pos & 0x7FFF
                self._avail_wrap = pos >> 15
                return
        raise ValueError(
            f"queue {self.index}: undo_pop of buffer {chain.head} (slot/wrap {pos:#x}, "
            f"{chain.ndesc} descriptors), but the last pop ended at {self.next_avail:#x}"
        )

    def _indirect(
        self,
        addr: int,
        ln: int,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
        rlen: int,
        wlen: int,
    ) -> tuple[str | None, int, int]:
        """Append the buffers of a packed indirect table (§2.8.19): sequential entries."""
        if not self.indirect:
            return "INDIRECT descriptor but INDIRECT_DESC not negotiated", rlen, wlen
        if ln == 0 or ln & 15:
            return f"indirect table length {ln} not a multiple of 16", rlen, wlen
        if ln > 16 * MAX_INDIRECT_ENTRIES:
            return f"indirect table of {ln // 16} entries too large", rlen, wlen
        if not self._buffer_ok(addr, ln):
            return f"indirect table {addr:#x}+{ln:#x} not in RAM", rlen, wlen
        mm, off = self.mem.host_offset(addr, ln)
        r0s = self._r0s
        r0e = self._r0e
        contains = self.mem.contains
        # Entries are used in order; NEXT (and id) inside the table mean nothing for packed.
        for a, n, _id, f in _PACKED_DESC.iter_unpack(mm[off : off + ln]):
            if f & _F_INDIRECT:
                return "nested INDIRECT descriptor", rlen, wlen
            if not n:
                continue
            if not ((r0s <= a and a + n <= r0e) or contains(a, n)):
                return f"buffer {a:#x}+{n:#x} not in RAM", rlen, wlen
            if f & _F_WRITE:
                writable.append((a, n))
                wlen += n
            elif writable:
                return "readable buffer after a writable one", rlen, wlen
            else:
                readable.append((a, n))
                rlen += n
        return None, rlen, wlen

    def add_used(self, chain: DescriptorChain, written: int) -> None:
        if written < 0 or written > chain.writable_len:
            self._check_written(chain, written)
        slot = self._next_used
        wrap = self._used_wrap
        off = self._desc_off + 16 * slot
        # id and len first, flags last: the flags make the used descriptor visible (§2.8.7).
        _PACKED_USED.pack_into(self._desc_mm, off + 8, written, chain.head)
        flags = (_F_AVAIL | _F_USED) if wrap else 0
        if written:
            flags |= _F_WRITE
        _U16.pack_into(self._desc_mm, off + 14, flags)
        # Skip every slot the chain occupied (1 for an indirect chain).
        slot += chain.ndesc
        if slot >= self.size:
            slot -= self.size
            self._used_wrap = wrap ^ 1
        self._next_used = slot
        self._used_since += chain.ndesc
        self._pending = True

    def needs_interrupt(self) -> bool:
        if not self._pending:
            return False
        self._pending = False
        count = self._used_since
        self._used_since = 0
        full_barrier()  # as SplitQueue.needs_interrupt: flags visible before reading events
        off_wrap, flags = _U16X2.unpack_from(self._drv_mm, self._drv_off)
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            # ENABLE, DESC without EVENT_IDX (invalid) or a reserved value: a spurious
            # interrupt is always allowed, a missing one stalls the driver.
            return True
        # Linux virtqueue_kick_prepare_packed, mirrored: linear positions where the previous
        # lap is negative; the batch covers [new - count, new).
        new = self._next_used
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self._used_wrap:
            event -= self.size
        window = count if count < 0x10000 else 0xFFFF
        return ((new - event - 1) & 0xFFFF) < window

    def disable_notifications(self) -> None:
        _U16.pack_into(self._dev_mm, self._dev_off + 2, RING_EVENT_FLAGS_DISABLE)

    def enable_notifications(self) -> bool:
        if self.event_idx:
            # off_wrap before flags: the driver reads flags, then off_wrap (Linux).
            off_wrap = self._next_avail | self._avail_wrap << 15
            _U16X2.pack_into(self._dev_mm, self._dev_off, off_wrap, RING_EVENT_FLAGS_DESC)
        else:
            _U16.pack_into(self._dev_mm, self._dev_off + 2, RING_EVENT_FLAGS_ENABLE)
        full_barrier()  # lost-wakeup rule: re-enable (store) → re-check (load)
        return self.has_available()

    def __repr__(self) -> str:
        return (
            f"PackedQueue(index={self.index}, size={self.size}, "
            f"avail={self._next_avail}/{self._avail_wrap}, used={self._next_used}/"
            f"{self._used_wrap})"
        )


# ---------------------------------------------------------------------------------------------
# Activation
# ---------------------------------------------------------------------------------------------


def _check_part(index: int, mem: GuestMemory, what: str, addr: int, length: int) -> None:
    if not mem.contains(addr, length):
        raise QueueError(
            f"queue {index}: {what} at {addr:#x} ({length} bytes) is not inside guest RAM"
        )


def make_queue(index: int, config: QueueConfig, mem: GuestMemory, features: int) -> Virtqueue:
    """Validate the registers of queue ``index`` and build its runtime queue.

    ``features`` is the negotiated 64-bit feature mask: VIRTIO_F_RING_PACKED selects the packed
    layout; VIRTIO_F_INDIRECT_DESC and VIRTIO_F_EVENT_IDX are honoured.  Raises
    :class:`QueueError` naming the offending register value.  ``config.ready`` is not looked
    at: which queues to build is the transport's decision.  The queue starts at index 0 /
    wrap counters 1, as after a reset.
    """
    size = config.size
    packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
    desc, driver, device = config.desc_addr, config.driver_addr, config.device_addr
    if size == 0:
        raise QueueError(f"queue {index}: size is 0")
    if size > config.max_size:
        raise QueueError(f"queue {index}: size {size} exceeds QueueNumMax {config.max_size}")
    if size > VIRTQ_MAX_SIZE:
        raise QueueError(f"queue {index}: size {size} exceeds {VIRTQ_MAX_SIZE}")
    if not packed and size & (size - 1):
        raise QueueError(f"queue {index}: split ring size {size} is not a power of two")
    if desc & 15:
        raise QueueError(f"queue {index}: descriptor area {desc:#x} is not 16-byte aligned")
    if packed:
        if driver & 3:
            raise QueueError(f"queue {index}: driver event area {driver:#x} not 4-byte aligned")
        if device & 3:
            raise QueueError(f"queue {index}: device event area {device:#x} not 4-byte aligned")
        _check_part(index, mem, "descriptor ring", desc, 16 * size)
        _check_part(index, mem, "driver event suppression area", driver, 4)
        _check_part(index, mem, "device event suppression area", device, 4)
        return PackedQueue(index, size, mem, features, desc, driver, device)
    if driver & 1:
        raise QueueError(f"queue {index}: available ring {driver:#x} is not 2-byte aligned")
    if device & 3:
        raise QueueError(f"queue {index}: used ring {device:#x} is not 4-byte aligned")
    dsz, asz, usz = split_ring_sizes(size)
    _check_part(index, mem, "descriptor table", desc, dsz)
    _check_part(index, mem, "available ring", driver, asz)
    _check_part(index, mem, "used ring", device, usz)
    return SplitQueue(index, size, mem, features, desc, driver, device)
