"""Driver-side virtqueue kit: what a Linux guest driver does to a ring, in Python.

The same idea as rust-vmm's ``MockSplitQueue``: tests (and the MMIO driver kit) place buffers in
a :class:`~embervm.memory.GuestMemory`, publish them like ``drivers/virtio/virtio_ring.c`` does,
and read back what the device returned, with no VM and no transport involved.

* :class:`GuestAllocator` - a bump allocator over a range of guest RAM;
* :class:`DriverSplitRing` / :class:`DriverPackedRing` - the driver half of a queue, with Linux's
  kick and event-suppression rules (``virtqueue_kick_prepare_{split,packed}``);
* :func:`fuzz_queue_once` - one fuzz iteration over the device-side queue code.

This is test code, but it follows the driver rules exactly, so a device that works against it
works against Linux's ring code.  Raw helpers (``write_desc``, ``publish``) let tests break the
rules on purpose.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ..devices.virtio.queue import (
    ChainError,
    DescriptorChain,
    QueueConfig,
    Virtqueue,
    legacy_ring_addresses,
    make_queue,
    split_ring_sizes,
)
from ..devices.virtio.spec import (
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
    VIRTQ_USED_F_NO_NOTIFY,
    bit,
    vring_need_event,
)
from ..errors import QueueError
from ..memory import PAGE_SIZE, GuestMemory

__all__ = [
    "DriverPackedRing",
    "DriverRingError",
    "DriverSplitRing",
    "GuestAllocator",
    "RingFullError",
    "check_traffic",
    "driver_and_queue",
    "fuzz_queue_once",
    "queue_config",
    "ring_features",
]

_DESC = struct.Struct("<QIHH")  # split: addr len flags next / packed: addr len id flags
_U16 = struct.Struct("<H")
_U16X2 = struct.Struct("<HH")
_USED_ELEM = struct.Struct("<II")
_PACKED_USED = struct.Struct("<IHH")  # len @8, id @12, flags @14


class RingFullError(RuntimeError):
    """Not enough free descriptors (or ids) for the buffers passed to ``add``."""


class DriverRingError(RuntimeError):
    """The device returned something a driver would reject (unknown id, bad index)."""


class GuestAllocator:
    """A bump allocator over ``[start, end)`` of guest RAM (one region)."""

    __slots__ = ("mem", "start", "end", "_next")

    def __init__(self, mem: GuestMemory, start: int, end: int) -> None:
        if end <= start or not mem.contains(start, end - start):
            raise ValueError(f"allocator range {start:#x}..{end:#x} is not inside one RAM region")
        self.mem = mem
        self.start = start
        self.end = end
        self._next = start

    def alloc(self, size: int, align: int = 16) -> int:
        """Guest address of ``size`` fresh bytes aligned to ``align`` (a power of two)."""
        if size < 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation size={size} align={align}")
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError(
                f"guest allocator exhausted: {size} bytes at {addr:#x} > {self.end:#x}"
            )
        self._next = addr + size
        return addr

    @property
    def used(self) -> int:
        return self._next - self.start

    def reset(self) -> None:
        """Forget every allocation (the caller stops using them)."""
        self._next = self.start


class _BufferPool:
    """Recycles buffer memory by size, so a ring can run for millions of requests."""

    __slots__ = ("_alloc", "_free")

    def __init__(self, alloc: GuestAllocator) -> None:
        self._alloc = alloc
        self._free: dict[int, list[int]] = {}

    def get(self, size: int) -> int:
        lst = self._free.get(size)
        if lst:
            return lst.pop()
        return self._alloc.alloc(max(size, 1), 16)

    def put(self, size: int, addr: int) -> None:
        self._free.setdefault(size, []).append(addr)


class _Request:
    """Driver-side bookkeeping of one outstanding buffer (Linux ``desc_state``)."""

    __slots__ = ("descs", "bufs", "table")

    def __init__(
        self, descs: list[int], bufs: list[tuple[int, int, bool]], table: tuple[int, int] | None
    ) -> None:
        self.descs = descs  # split: descriptor indices; packed: number of ring slots in descs[0]
        self.bufs = bufs  # (addr, len, writable)
        self.table = table  # indirect table (addr, bytes) or None


def _buffers(
    pool: _BufferPool, mem: GuestMemory, readable: Sequence[bytes], writable: Sequence[int]
) -> list[tuple[int, int, bool]]:
    bufs: list[tuple[int, int, bool]] = []
    for data in readable:
        addr = pool.get(len(data))
        mem.write(addr, data)
        bufs.append((addr, len(data), False))
    for n in writable:
        addr = pool.get(n)
        if n:
            mem.fill(addr, n, 0)  # so the test sees exactly what the device wrote
        bufs.append((addr, n, True))
    if not bufs:
        raise ValueError("a chain needs at least one buffer")
    return bufs


def queue_config(
    ring: DriverSplitRing | DriverPackedRing, max_size: int | None = None
) -> QueueConfig:
    """The QueueConfig a driver would program for ``ring`` (ready, with its addresses)."""
    cfg = QueueConfig(max_size if max_size is not None else ring.size)
    cfg.size = ring.size
    cfg.desc_addr = ring.desc_addr
    cfg.driver_addr = ring.driver_addr
    cfg.device_addr = ring.device_addr
    cfg.ready = True
    return cfg


class DriverSplitRing:
    """The driver half of a split virtqueue (Linux ``virtqueue_add_split`` and friends)."""

    def __init__(
        self,
        mem: GuestMemory,
        alloc: GuestAllocator,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
        legacy_align: int | None = None,
    ) -> None:
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError(f"split ring size {size} must be a power of two <= 32768")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        #: use one indirect table for every chain of more than one buffer (Linux's rule when
        #: INDIRECT_DESC is negotiated)
        self.indirect = indirect
        dsz, asz, usz = split_ring_sizes(size)
        if legacy_align is not None:
            # One contiguous vring_init layout starting on a page (legacy QueuePFN).
            base = alloc.alloc(16 * size, PAGE_SIZE)
            desc, avail, used = legacy_ring_addresses(
                base // PAGE_SIZE, PAGE_SIZE, legacy_align, size
            )
            alloc.alloc(used + usz - (base + 16 * size), 1)
            self.pfn = base // PAGE_SIZE
        else:
            desc = alloc.alloc(dsz, 16)
            avail = alloc.alloc(asz, 2)
            used = alloc.alloc(usz, 4)
            self.pfn = 0
        self.desc_addr = desc
        self.driver_addr = avail
        self.device_addr = used
        mem.fill(desc, dsz)
        mem.fill(avail, asz)
        mem.fill(used, usz)
        self._pool = _BufferPool(alloc)
        self._free = list(range(size - 1, -1, -1))  # stack of free descriptor indices
        self._out: dict[int, _Request] = {}
        self._avail_idx = 0
        self._last_used = 0
        self._num_added = 0

    # -- state --------------------------------------------------------------------------------

    @property
    def avail_idx(self) -> int:
        """The driver's free-running avail index (what it last wrote to avail.idx)."""
        return self._avail_idx

    @property
    def used_idx(self) -> int:
        """The used index up to which the driver has consumed used elements."""
        return self._last_used

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def outstanding(self) -> int:
        return len(self._out)

    # -- raw access (for tests that break the rules) --------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        """Write descriptor ``index`` of the table directly."""
        self.mem.write(self.desc_addr + 16 * index, _DESC.pack(addr, length, flags, next))

    def claim(self, *indices: int) -> None:
        """Take descriptors out of the free list, for a test that writes them raw."""
        for i in indices:
            self._free.remove(i)

    def publish(self, head: int) -> None:
        """Put ``head`` in the next avail slot and bump avail.idx (no bookkeeping)."""
        slot = self._avail_idx % self.size
        self.mem.write_u16(self.driver_addr + 4 + 2 * slot, head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.driver_addr + 2, self._avail_idx)
        self._num_added += 1

    def set_avail_idx(self, idx: int) -> None:
        """Write avail.idx directly (the driver's shadow follows)."""
        self._avail_idx = idx & 0xFFFF
        self.mem.write_u16(self.driver_addr + 2, self._avail_idx)

    # -- driver operations ----------------------------------------------------------------------

    def add(self, readable: list[bytes], writable: list[int], *, indirect: bool = False) -> int:
        """Place the buffers in guest RAM, chain them, publish the chain; return its head."""
        mem = self.mem
        total = len(readable) + len(writable)
        use_table = indirect or (self.indirect and total > 1)
        need = 1 if use_table else total
        if total == 0:
            raise ValueError("a chain needs at least one buffer")
        if len(self._free) < need:
            raise RingFullError(f"{need} descriptors needed, {len(self._free)} free")
        bufs = _buffers(self._pool, mem, readable, writable)
        table: tuple[int, int] | None = None
        if use_table:
            tbytes = 16 * total
            taddr = self._pool.get(tbytes)
            entries = b"".join(
                _DESC.pack(
                    a,
                    n,
                    (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < total else 0),
                    i + 1 if i + 1 < total else 0,
                )
                for i, (a, n, w) in enumerate(bufs)
            )
            mem.write(taddr, entries)
            table = (taddr, tbytes)
            head = self._free.pop()
            descs = [head]
            self.write_desc(head, taddr, tbytes, VIRTQ_DESC_F_INDIRECT, 0)
        else:
            descs = [self._free.pop() for _ in range(total)]
            head = descs[0]
            for i, (a, n, w) in enumerate(bufs):
                last = i + 1 == total
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(descs[i], a, n, flags, 0 if last else descs[i + 1])
        self._out[head] = _Request(descs, bufs, table)
        self.publish(head)
        return head

    def kick_needed(self) -> bool:
        """Linux ``virtqueue_kick_prepare_split`` for what was added since the last call."""
        new = self._avail_idx
        old = (new - self._num_added) & 0xFFFF
        self._num_added = 0
        if self.event_idx:
            avail_event = self.mem.read_u16(self.device_addr + 4 + 8 * self.size)
            return vring_need_event(avail_event, new, old)
        return not self.mem.read_u16(self.device_addr) & VIRTQ_USED_F_NO_NOTIFY

    def get_used(self) -> list[tuple[int, int, list[bytes]]]:
        """(token, used.len, writable buffer contents) for each new used element."""
        mem = self.mem
        used_idx = mem.read_u16(self.device_addr + 2)
        pending = (used_idx - self._last_used) & 0xFFFF
        if pending > len(self._out):
            raise DriverRingError(
                f"used.idx {used_idx} is {pending} ahead of {self._last_used}, "
                f"but only {len(self._out)} buffers are outstanding"
            )
        out: list[tuple[int, int, list[bytes]]] = []
        for _ in range(pending):
            slot = self._last_used % self.size
            ident, ln = _USED_ELEM.unpack(mem.read(self.device_addr + 4 + 8 * slot, 8))
            req = self._out.pop(ident, None)
            if req is None:
                raise DriverRingError(f"device returned id {ident}, which is not outstanding")
            out.append((ident, ln, self._release(req)))
            self._last_used = (self._last_used + 1) & 0xFFFF
        return out

    def _release(self, req: _Request) -> list[bytes]:
        contents = [self.mem.read(a, n) for a, n, w in req.bufs if w]
        for a, n, _w in req.bufs:
            self._pool.put(n, a)
        if req.table is not None:
            self._pool.put(req.table[1], req.table[0])
        self._free.extend(reversed(req.descs))
        return contents

    def set_used_event(self, idx: int) -> None:
        """Write used_event (EVENT_IDX: interrupt me when used.idx passes ``idx``)."""
        self.mem.write_u16(self.driver_addr + 4 + 2 * self.size, idx)

    def set_no_interrupt(self, on: bool) -> None:
        """Set or clear VIRTQ_AVAIL_F_NO_INTERRUPT in avail.flags."""
        self.mem.write_u16(self.driver_addr, VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0)


class DriverPackedRing:
    """The driver half of a packed virtqueue (Linux ``virtqueue_add_packed`` and friends)."""

    def __init__(
        self,
        mem: GuestMemory,
        alloc: GuestAllocator,
        size: int,
        *,
        event_idx: bool = False,
        indirect: bool = False,
    ) -> None:
        if not 0 < size <= 32768:
            raise ValueError(f"packed ring size {size} must be 1..32768")
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc_addr = alloc.alloc(16 * size, 16)
        self.driver_addr = alloc.alloc(4, 4)  # driver event suppression (written by us)
        self.device_addr = alloc.alloc(4, 4)  # device event suppression (written by the device)
        mem.fill(self.desc_addr, 16 * size)
        mem.fill(self.driver_addr, 4)
        mem.fill(self.device_addr, 4)
        self._pool = _BufferPool(alloc)
        self._ids = list(range(size - 1, -1, -1))  # free buffer ids
        self._free_slots = size
        self._out: dict[int, _Request] = {}
        self._next_avail = 0
        self._avail_wrap = 1
        self._last_used = 0
        self._used_wrap = 1
        self._num_added = 0  # ring slots filled since the last kick_needed()

    @property
    def avail_idx(self) -> int:
        """Next slot the driver fills, with its wrap counter: ``off | wrap << 15``."""
        return self._next_avail | self._avail_wrap << 15

    @property
    def used_idx(self) -> int:
        """Next slot the driver expects a used descriptor in: ``off | wrap << 15``."""
        return self._last_used | self._used_wrap << 15

    @property
    def num_free(self) -> int:
        return self._free_slots

    @property
    def outstanding(self) -> int:
        return len(self._out)

    def avail_flags(self, wrap: int | None = None) -> int:
        """AVAIL/USED bits that make a descriptor available under wrap counter ``wrap``."""
        w = self._avail_wrap if wrap is None else wrap
        return VIRTQ_DESC_F_AVAIL if w else VIRTQ_DESC_F_USED

    def write_desc(self, slot: int, addr: int, length: int, ident: int, flags: int) -> None:
        """Write ring descriptor ``slot`` directly (flags last, as a driver must)."""
        base = self.desc_addr + 16 * slot
        self.mem.write(base, struct.pack("<QIH", addr, length, ident))
        self.mem.write_u16(base + 14, flags)

    def add_raw(self, descs: list[tuple[int, int, int]], ident: int) -> None:
        """Make ``(addr, len, flags)`` descriptors available as buffer ``ident``, unchecked.

        The AVAIL/USED bits are added for each slot's wrap counter and the head is written
        last; the kit accounts the slots, so the device may return the buffer as usual.
        """
        if len(descs) > self._free_slots or ident not in self._ids:
            raise RingFullError(f"{len(descs)} slots / id {ident} not free")
        self._ids.remove(ident)
        slot, wrap = self._next_avail, self._avail_wrap
        writes = []
        for a, n, f in descs:
            writes.append((slot, a, n, f | self.avail_flags(wrap)))
            slot += 1
            if slot == self.size:
                slot = 0
                wrap ^= 1
        for w in writes[1:] + writes[:1]:
            self.write_desc(w[0], w[1], w[2], ident, w[3])
        self._next_avail, self._avail_wrap = slot, wrap
        self._free_slots -= len(descs)
        self._num_added += len(descs)
        self._out[ident] = _Request([len(descs)], [], None)

    def add(self, readable: list[bytes], writable: list[int], *, indirect: bool = False) -> int:
        """Place the buffers, write the descriptors (head flags last); return the buffer id."""
        mem = self.mem
        total = len(readable) + len(writable)
        if total == 0:
            raise ValueError("a chain needs at least one buffer")
        use_table = indirect or (self.indirect and total > 1)
        need = 1 if use_table else total
        if self._free_slots < need or not self._ids:
            raise RingFullError(f"{need} ring slots needed, {self._free_slots} free")
        bufs = _buffers(self._pool, mem, readable, writable)
        ident = self._ids.pop()
        table: tuple[int, int] | None = None
        if use_table:
            tbytes = 16 * total
            taddr = self._pool.get(tbytes)
            mem.write(
                taddr,
                b"".join(_DESC.pack(a, n, 0, VIRTQ_DESC_F_WRITE if w else 0) for a, n, w in bufs),
            )
            table = (taddr, tbytes)
            descs = [(taddr, tbytes, VIRTQ_DESC_F_INDIRECT)]
        else:
            descs = [
                (
                    a,
                    n,
                    (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < total else 0),
                )
                for i, (a, n, w) in enumerate(bufs)
            ]
        head_slot = self._next_avail
        head_flags = descs[0][2] | self.avail_flags()
        slot, wrap = head_slot, self._avail_wrap
        for i, (a, n, f) in enumerate(descs):
            if i:
                self.write_desc(slot, a, n, ident, f | self.avail_flags(wrap))
            slot += 1
            if slot == self.size:
                slot = 0
                wrap ^= 1
        # The head goes last: its flags make the whole chain visible (§2.8.6).
        self.write_desc(head_slot, descs[0][0], descs[0][1], ident, head_flags)
        self._next_avail, self._avail_wrap = slot, wrap
        self._free_slots -= len(descs)
        self._num_added += len(descs)
        self._out[ident] = _Request([len(descs)], bufs, table)
        return ident

    def kick_needed(self) -> bool:
        """Linux ``virtqueue_kick_prepare_packed`` for what was added since the last call."""
        new = self._next_avail
        old = (new - self._num_added) & 0xFFFF
        self._num_added = 0
        off_wrap, flags = _U16X2.unpack(self.mem.read(self.device_addr, 4))
        if flags != RING_EVENT_FLAGS_DESC:
            return flags != RING_EVENT_FLAGS_DISABLE
        event = off_wrap & 0x7FFF
        if off_wrap >> 15 != self._avail_wrap:
            event -= self.size
        return vring_need_event(event & 0xFFFF, new, old)

    def get_used(self) -> list[tuple[int, int, list[bytes]]]:
        """(buffer id, used len, writable buffer contents) for each new used descriptor."""
        mem = self.mem
        out: list[tuple[int, int, list[bytes]]] = []
        while self._out:
            base = self.desc_addr + 16 * self._last_used
            flags = mem.read_u16(base + 14)
            avail = bool(flags & VIRTQ_DESC_F_AVAIL)
            used = bool(flags & VIRTQ_DESC_F_USED)
            if avail != used or used != bool(self._used_wrap):
                break
            ln, ident, _ = _PACKED_USED.unpack(mem.read(base + 8, 8))
            req = self._out.pop(ident, None)
            if req is None:
                raise DriverRingError(
                    f"device returned buffer id {ident}, which is not outstanding"
                )
            if not flags & VIRTQ_DESC_F_WRITE:
                ln = 0  # §2.8.7: len is only meaningful with WRITE set
            out.append((ident, ln, self._release(req)))
            self._ids.append(ident)
            self._free_slots += req.descs[0]
            self._last_used += req.descs[0]
            if self._last_used >= self.size:
                self._last_used -= self.size
                self._used_wrap ^= 1
        return out

    def _release(self, req: _Request) -> list[bytes]:
        contents = [self.mem.read(a, n) for a, n, w in req.bufs if w]
        for a, n, _w in req.bufs:
            self._pool.put(n, a)
        if req.table is not None:
            self._pool.put(req.table[1], req.table[0])
        return contents

    def set_event(self, flags: int, off_wrap: int = 0) -> None:
        """Write the driver event suppression structure (off_wrap first, then flags)."""
        self.mem.write_u16(self.driver_addr, off_wrap)
        self.mem.write_u16(self.driver_addr + 2, flags)

    def set_used_event(self, idx: int) -> None:
        """EVENT_IDX: interrupt me at used position ``idx`` (``off | wrap << 15``)."""
        self.set_event(RING_EVENT_FLAGS_DESC, idx)

    def set_no_interrupt(self, on: bool) -> None:
        """DISABLE (on) or ENABLE (off) used-buffer notifications."""
        off_wrap = self.mem.read_u16(self.driver_addr)
        self.set_event(RING_EVENT_FLAGS_DISABLE if on else RING_EVENT_FLAGS_ENABLE, off_wrap)


def ring_features(*, packed: bool = False, event_idx: bool = False, indirect: bool = False) -> int:
    """The negotiated feature mask for a queue with these ring features."""
    features = 0
    if packed:
        features |= bit(VIRTIO_F_RING_PACKED)
    if event_idx:
        features |= bit(VIRTIO_F_EVENT_IDX)
    if indirect:
        features |= bit(VIRTIO_F_INDIRECT_DESC)
    return features


def driver_and_queue(
    mem: GuestMemory,
    alloc: GuestAllocator,
    size: int,
    *,
    packed: bool = False,
    event_idx: bool = False,
    indirect: bool = False,
    index: int = 0,
) -> tuple[DriverSplitRing | DriverPackedRing, Virtqueue]:
    """A driver ring and the device queue built on it, with the given features negotiated.

    ``indirect`` negotiates INDIRECT_DESC; the driver still only uses indirect tables when a
    test asks for them (``add(..., indirect=True)``).
    """
    ring: DriverSplitRing | DriverPackedRing
    if packed:
        ring = DriverPackedRing(mem, alloc, size, event_idx=event_idx)
    else:
        ring = DriverSplitRing(mem, alloc, size, event_idx=event_idx)
    features = ring_features(packed=packed, event_idx=event_idx, indirect=indirect)
    return ring, make_queue(index, queue_config(ring), mem, features)


# ---------------------------------------------------------------------------------------------
# A model of well-behaved traffic, for property tests
# ---------------------------------------------------------------------------------------------


def check_traffic(
    ring: DriverSplitRing | DriverPackedRing, q: Virtqueue, ops: Sequence[tuple[int, int]]
) -> int:
    """Run driver and device steps ``ops`` = [(kind, seed)] and check three properties.

    * exactly once: every buffer added comes back once, with the bytes the device wrote;
    * no lost interrupt: after each device decision, if used buffers are waiting that the
      driver has not seen, the driver was interrupted since it last re-armed (Linux
      ``virtqueue_enable_cb``: used_event = last seen, or clear NO_INTERRUPT);
    * no lost kick: the device sleeps only after ``enable_notifications()`` said the ring was
      empty, and whenever it sleeps with buffers available the driver's ``kick_needed()`` woke it.

    Kinds: 0 driver adds 1-3 chains then decides on a kick; 1 device pops; 2 device completes a
    held chain; 3 device interrupt decision; 4 driver consumes used buffers and re-arms;
    5 device goes idle (enable_notifications) or busy (disable_notifications).  Raises
    AssertionError on a violation; returns the number of buffers that made the round trip.
    """
    expected: dict[int, tuple[bytes, int]] = {}  # token -> (readable bytes, writable size)
    written: dict[int, bytes] = {}  # token -> what the device wrote
    held: list[DescriptorChain] = []
    awake = False  # the device starts idle, kicks enabled (as after DRIVER_OK)
    irq_since_arm = False  # the driver starts armed (used_event 0 / NO_INTERRUPT clear)
    counter = 0
    done = 0

    def driver_consume() -> None:
        nonlocal done, irq_since_arm
        for token, ln, contents in ring.get_used():
            assert token in written, f"buffer {token} returned but never completed"
            data = written.pop(token)
            assert ln == len(data), (token, ln, len(data))
            got = b"".join(contents)
            assert got[:ln] == data and not got[ln:].strip(b"\0"), token
            done += 1
        if ring.event_idx:
            ring.set_used_event(ring.used_idx)
        irq_since_arm = False

    def device_decide() -> None:
        nonlocal irq_since_arm
        if q.needs_interrupt():
            irq_since_arm = True
        if _used_waiting(ring):
            assert irq_since_arm, "used buffers waiting but the driver was never interrupted"

    def complete(chain: DescriptorChain, seed: int) -> None:
        w = chain.writer()
        n = seed % (chain.writable_len + 1)
        data = bytes((chain.head * 7 + k) & 0xFF for k in range(n))
        w.write(data)
        q.add_used(chain, w.written)
        written[chain.head] = data

    for kind, seed in ops:
        if kind == 0:
            for k in range(1 + seed % 3):
                s = seed >> (4 * k)
                nread, nwrite = s % 3, (s >> 2) % 3
                if nread + nwrite == 0:
                    nwrite = 1
                readable = [bytes([counter & 0xFF]) * (1 + (s >> j) % 9) for j in range(nread)]
                writable = [1 + (s >> j) % 13 for j in range(nwrite)]
                counter += 1
                try:
                    token = ring.add(readable, writable, indirect=bool(s & 16 and q.indirect))
                except RingFullError:
                    break
                assert token not in expected and token not in written, f"token {token} in use"
                expected[token] = (b"".join(readable), sum(writable))
            if ring.kick_needed():
                awake = True
        elif kind == 1 and awake:
            chain = q.pop()
            if chain is not None:
                data, wsize = expected.pop(chain.head)
                assert chain.reader().read() == data, chain.head
                assert chain.writable_len == wsize, chain.head
                held.append(chain)
        elif kind == 2 and held:
            complete(held.pop(seed % len(held)), seed)
        elif kind == 3:
            device_decide()
        elif kind == 4:
            driver_consume()
        elif kind == 5 and awake:
            if seed & 1:
                q.disable_notifications()
            elif not q.enable_notifications():
                awake = False
        if not awake:
            assert not q.has_available(), "device asleep with buffers available: kick lost"
    # Drain: the device finishes everything, the driver collects it.
    awake = True
    while (chain := q.pop()) is not None:
        data, _ = expected.pop(chain.head)
        assert chain.reader().read() == data
        held.append(chain)
    for chain in held:
        complete(chain, chain.head)
    device_decide()
    driver_consume()
    assert not expected and not written and ring.outstanding == 0
    return done


def _used_waiting(ring: DriverSplitRing | DriverPackedRing) -> bool:
    """Whether the device has published used buffers the driver has not consumed yet."""
    if isinstance(ring, DriverSplitRing):
        return ring.mem.read_u16(ring.device_addr + 2) != ring.used_idx
    flags = ring.mem.read_u16(ring.desc_addr + 16 * (ring.used_idx & 0x7FFF) + 14)
    wrap = bool(ring.used_idx >> 15)
    return bool(flags & VIRTQ_DESC_F_AVAIL) == bool(flags & VIRTQ_DESC_F_USED) == wrap and bool(
        ring.outstanding
    )


# ---------------------------------------------------------------------------------------------
# Fuzzing entry point
# ---------------------------------------------------------------------------------------------

# One guest memory reused by every fuzz iteration: 16 KiB of low RAM, a hole, and 4 KiB more, so
# that "inside RAM" has two regions and a gap.  Each call wipes it first.
_FUZZ_LAYOUT = ((0, 0x4000), (0x8000, 0x1000))
_fuzz_mem: GuestMemory | None = None
_FUZZ_ZERO = bytes(0x4000)
_FUZZ_OPS = 64


def _fuzz_memory() -> GuestMemory:
    global _fuzz_mem
    if _fuzz_mem is None:
        _fuzz_mem = GuestMemory(_FUZZ_LAYOUT)
    return _fuzz_mem


def _assert_in_ram(mem: GuestMemory, chain: DescriptorChain) -> None:
    for addr, ln in chain.readable + chain.writable:
        if ln <= 0 or not mem.contains(addr, ln):
            raise AssertionError(f"queue returned a segment outside RAM: {addr:#x}+{ln:#x}")


def fuzz_queue_once(data: bytes) -> None:
    """Build a queue from ``data`` and drive it; only :class:`QueueError` is caught.

    Any other exception, or a segment outside RAM, is a bug and propagates.  Layout of ``data``:

    * byte 0: bit 0 packed, bit 1 INDIRECT_DESC, bit 2 EVENT_IDX; bit 3 raw ring addresses
      (else aligned and folded into low RAM); bits 4-6 put the desc/driver/device area in the
      second RAM region; bit 7 "tame" the image: fold every 16-byte chunk's descriptor fields
      and the split ring's indices into plausible ranges, so random input reaches the data path;
    * byte 1: queue size (split: ``1 << (b % 9)``);
    * bytes 2-7: three le16 ring addresses;
    * byte 8: op count (at most 64), then the op bytes (see ``_drive``);
    * the rest: an image copied into low RAM at 0 (descriptors, rings, buffers).
    """
    if len(data) < 9:
        return
    mem = _fuzz_memory()
    low = mem.regions[0]
    high = mem.regions[1]
    low.view[:] = _FUZZ_ZERO
    high.view[:] = _FUZZ_ZERO[: high.size]
    sel = data[0]
    packed = bool(sel & 1)
    features = ring_features(packed=packed, indirect=bool(sel & 2), event_idx=bool(sel & 4))
    size = data[1] or 1
    if not packed:
        size = 1 << (size % 9)  # split: 1..256
    addrs = list(struct.unpack_from("<HHH", data, 2))
    nops = min(data[8], _FUZZ_OPS)
    ops = data[9 : 9 + nops]
    image = data[9 + nops : 9 + nops + low.size]
    low.view[: len(image)] = image

    # Ring addresses: raw 16-bit values (misaligned, outside RAM, straddling a region end all
    # occur), or aligned and folded into the part of RAM the image covers (or the high region),
    # so that the rings hold fuzz bytes rather than zeros.
    aligns = (16, 4, 4) if packed else (16, 2, 4)
    for i in range(3):
        moved = sel >> (4 + i) & 1
        if sel & 8:
            addrs[i] |= 0x8000 if moved else 0
        else:
            span = high.size if moved else max(len(image), 64)
            addrs[i] = (addrs[i] % span & -aligns[i]) + (high.guest_addr if moved else 0)
    cfg = QueueConfig(256)
    cfg.size = size
    cfg.desc_addr, cfg.driver_addr, cfg.device_addr = addrs
    try:
        q = make_queue(0, cfg, mem, features)
    except QueueError:
        return
    if sel & 0x80:
        _tame(mem, len(image), size, None if packed else cfg.driver_addr)
    _drive(q, mem, ops)


_FUZZ_ADDR_SPAN = 0x9000  # low RAM, the hole and the high region
_FUZZ_LEN_SPAN = 0x400


def _tame(mem: GuestMemory, nbytes: int, size: int, avail: int | None) -> None:
    """Fold the image into plausible rings (see :func:`fuzz_queue_once`, bit 7)."""
    low = mem.regions[0]
    n = nbytes & ~15
    span, lspan, nspan = _FUZZ_ADDR_SPAN, _FUZZ_LEN_SPAN, size + 1
    if avail is None:  # packed: addr, len, id, flags - bit 8 of flags makes a slot available
        avail_bits = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
        chunks = [
            _DESC.pack(
                a % span, ln % lspan, i, f & ~avail_bits | VIRTQ_DESC_F_AVAIL if f & 0x100 else f
            )
            for a, ln, i, f in _DESC.iter_unpack(low.mmap[:n])
        ]
    else:  # split: addr, len, flags, next - next mostly in range, one over sometimes
        chunks = [
            _DESC.pack(a % span, ln % lspan, f & 7, x % nspan)
            for a, ln, f, x in _DESC.iter_unpack(low.mmap[:n])
        ]
    low.view[:n] = b"".join(chunks)
    if avail is not None:
        # avail.idx at most size + 1 ahead (one over: the ring error), heads mostly in range.
        idx = mem.read_u16(avail + 2)
        mem.write_u16(avail + 2, idx % (size + 2))
        for i in range(size):
            a = avail + 4 + 2 * i
            mem.write_u16(a, mem.read_u16(a) % (size + 1))


def _drive(q: Virtqueue, mem: GuestMemory, ops: bytes) -> None:
    held: list[DescriptorChain] = []
    low = mem.regions[0]
    for i, op in enumerate(ops):
        kind = op & 7
        try:
            if kind <= 2:
                chain = q.pop()
                if chain is not None:
                    _assert_in_ram(mem, chain)
                    r = chain.reader()
                    r.read(op >> 3)
                    r.views()
                    w = chain.writer()
                    w.write(bytes([op]) * (op >> 4))
                    held.append(chain)
            elif kind == 3 and held:
                chain = held.pop(0)
                q.add_used(chain, min(op >> 3, chain.writable_len))
            elif kind == 4:
                q.needs_interrupt()
            elif kind == 5:
                q.enable_notifications()
            elif kind == 6:
                q.disable_notifications()
            else:
                # The driver scribbles on its memory while the device runs (a racing guest).
                off = (op * 131 + i * 977) % (low.size - 2)
                low.view[off] = (op * 37) & 0xFF
        except ChainError as e:
            # Half the time hand the bad chain back, as a device that avoids leaks would.
            if e.chain is not None and op & 8:
                q.add_used(e.chain, 0)
        except QueueError:
            continue
    for chain in held:
        q.add_used(chain, 0)
    q.needs_interrupt()
