"""A Python virtio-mmio *driver* that probes a device exactly as Linux's ``virtio_mmio`` does.

Device authors and tests use it to drive a transport without a guest: it performs the probe
sequence of ``drivers/virtio/virtio_mmio.c`` + ``drivers/virtio/virtio.c`` access for access
(virtio.md §2.3), lays out split or packed rings in guest memory (``testing.rings``), submits
chains, kicks, acknowledges interrupts and tears the device down (§2.4).  Legacy (version 1) and
modern (version 2) are both supported.

Example::

    mem = GuestMemory([(0, 1 << 20)])
    transport = MmioTransport(Rng(), mem)
    drv = MmioDriver(transport, mem)
    drv.probe()
    token = drv.submit(0, readable=[], writable=[64])
    [(tok, length, [data])] = drv.used(0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..devices.virtio import spec
from ..memory import GuestMemory
from .rings import DriverPackedRing, DriverSplitRing, GuestAllocator


class RegisterWindow(Protocol):
    def read(self, offset: int, size: int) -> int: ...
    def write(self, offset: int, size: int, value: int) -> None: ...


class DriverError(Exception):
    """The probe failed the way Linux's would (the message is Linux's complaint)."""


# Transport feature bits Linux keeps (vring_transport_features): everything else in 24..41 is
# cleared by the ring core before FEATURES_OK.
LINUX_TRANSPORT_FEATURES = (
    spec.bit(spec.VIRTIO_F_INDIRECT_DESC)
    | spec.bit(spec.VIRTIO_F_EVENT_IDX)
    | spec.bit(spec.VIRTIO_F_VERSION_1)
    | spec.bit(spec.VIRTIO_F_ACCESS_PLATFORM)
    | spec.bit(spec.VIRTIO_F_RING_PACKED)
    | spec.bit(spec.VIRTIO_F_ORDER_PLATFORM)
    | spec.bit(spec.VIRTIO_F_NOTIFICATION_DATA)
)
_TRANSPORT_MASK = ((1 << 42) - 1) & ~((1 << 24) - 1)


class MmioDriver:
    """Drives one virtio-mmio register window like the Linux guest driver."""

    def __init__(
        self,
        regs: RegisterWindow,
        mem: GuestMemory,
        alloc: GuestAllocator | None = None,
        *,
        page_size: int = 4096,
    ) -> None:
        self.regs = regs
        self.mem = mem
        if alloc is None:
            top = mem.regions[0].end
            alloc = GuestAllocator(mem, mem.regions[0].guest_addr + 0x1000, top)
        self.alloc = alloc
        self.page_size = page_size
        self.version = 0
        self.device_id = 0
        self.features = 0
        self.rings: list[DriverSplitRing | DriverPackedRing] = []
        self.log: list[tuple[str, int, int]] = []  # ("r"/"w", offset, value) access trace

    # -- raw register access (32-bit, as Linux's readl/writel) ------------------------------------

    def rd(self, offset: int) -> int:
        v = self.regs.read(offset, 4)
        self.log.append(("r", offset, v))
        return v

    def wr(self, offset: int, value: int) -> None:
        self.log.append(("w", offset, value))
        self.regs.write(offset, 4, value)

    def status(self) -> int:
        return self.rd(spec.STATUS) & 0xFF

    def add_status(self, bit: int) -> None:
        """Linux ``virtio_add_status``: read-modify-write."""
        self.wr(spec.STATUS, self.status() | bit)

    @property
    def legacy(self) -> bool:
        return self.version == spec.MMIO_VERSION_LEGACY

    # -- probe ----------------------------------------------------------------------------------

    def probe(
        self,
        *,
        accept: int | None = None,
        queue_sizes: Sequence[int] | None = None,
        nqueues: int | None = None,
        exact: int | None = None,
    ) -> int:
        """Run the Linux probe; return the negotiated features.

        ``accept``: the feature bits the "driver" supports (default: every device-specific bit
        offered plus the transport bits Linux keeps).  ``queue_sizes``: the size to program per
        queue (default: QueueNumMax).  ``nqueues``: how many queues to set up (default: every
        queue whose QueueNumMax is non-zero, stopping at the first 0).  ``exact``: write these
        feature bits whatever was offered (a buggy or hostile driver).
        """
        # virtio_mmio_probe
        if self.rd(spec.MAGIC_VALUE) != spec.MMIO_MAGIC:
            raise DriverError("Wrong magic value")
        self.version = self.rd(spec.VERSION)
        if self.version not in (1, 2):
            raise DriverError(f"Version {self.version} not supported!")
        self.device_id = self.rd(spec.DEVICE_ID)
        if self.device_id == 0:
            raise DriverError("placeholder device (ID 0)")
        self.rd(spec.VENDOR_ID)
        if self.legacy:
            self.wr(spec.GUEST_PAGE_SIZE, self.page_size)
        # register_virtio_device: reset, then ACKNOWLEDGE
        self.wr(spec.STATUS, 0)
        self.add_status(spec.STATUS_ACKNOWLEDGE)
        # virtio_dev_probe
        self.add_status(spec.STATUS_DRIVER)
        self.wr(spec.DEVICE_FEATURES_SEL, 1)
        offered = self.rd(spec.DEVICE_FEATURES) << 32
        self.wr(spec.DEVICE_FEATURES_SEL, 0)
        offered |= self.rd(spec.DEVICE_FEATURES)
        if accept is None:
            accept = (offered & ~_TRANSPORT_MASK) | LINUX_TRANSPORT_FEATURES
        features = offered & accept if exact is None else exact
        if not self.legacy and not features >> spec.VIRTIO_F_VERSION_1 & 1:
            self.add_status(spec.STATUS_FAILED)
            raise DriverError("device must provide VIRTIO_F_VERSION_1")
        self.write_features(features)
        if not self.legacy:
            self.add_status(spec.STATUS_FEATURES_OK)
            if not self.status() & spec.STATUS_FEATURES_OK:
                self.add_status(spec.STATUS_FAILED)
                raise DriverError("virtio: device refuses features")
        self.features = features
        self.setup_queues(queue_sizes=queue_sizes, nqueues=nqueues)
        self.add_status(spec.STATUS_DRIVER_OK)
        return features

    def write_features(self, features: int) -> None:
        """vm_finalize_features: high word first."""
        self.wr(spec.DRIVER_FEATURES_SEL, 1)
        self.wr(spec.DRIVER_FEATURES, features >> 32 & 0xFFFF_FFFF)
        self.wr(spec.DRIVER_FEATURES_SEL, 0)
        self.wr(spec.DRIVER_FEATURES, features & 0xFFFF_FFFF)

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def setup_queues(
        self, *, queue_sizes: Sequence[int] | None = None, nqueues: int | None = None
    ) -> None:
        """vm_find_vqs → vm_setup_vq for each queue, in index order."""
        self.rings = []
        i = 0
        while nqueues is None or i < nqueues:
            self.wr(spec.QUEUE_SEL, i)
            in_use = self.rd(spec.QUEUE_PFN if self.legacy else spec.QUEUE_READY)
            if in_use:
                raise DriverError(f"queue {i} already set up")
            num_max = self.rd(spec.QUEUE_NUM_MAX)
            if num_max == 0:
                if nqueues is None:
                    break
                raise DriverError(f"queue {i} not available")
            size = queue_sizes[i] if queue_sizes is not None else num_max
            self.rings.append(self.setup_queue(i, size))
            i += 1

    def setup_queue(self, index: int, size: int) -> DriverSplitRing | DriverPackedRing:
        event_idx = self.has(spec.VIRTIO_F_EVENT_IDX)
        indirect = self.has(spec.VIRTIO_F_INDIRECT_DESC)
        ring: DriverSplitRing | DriverPackedRing
        self.wr(spec.QUEUE_SEL, index)
        self.wr(spec.QUEUE_NUM, size)
        if self.legacy:
            ring = DriverSplitRing(self.mem, self.alloc, size, event_idx=event_idx,
                                   indirect=indirect, legacy_align=self.page_size)
            self.wr(spec.QUEUE_ALIGN, self.page_size)
            self.wr(spec.QUEUE_PFN, ring.desc_addr // self.page_size)
            return ring
        if self.has(spec.VIRTIO_F_RING_PACKED):
            ring = DriverPackedRing(self.mem, self.alloc, size, event_idx=event_idx,
                                    indirect=indirect)
        else:
            ring = DriverSplitRing(self.mem, self.alloc, size, event_idx=event_idx,
                                   indirect=indirect)
        for low, addr in (
            (spec.QUEUE_DESC_LOW, ring.desc_addr),
            (spec.QUEUE_DRIVER_LOW, ring.driver_addr),
            (spec.QUEUE_DEVICE_LOW, ring.device_addr),
        ):
            self.wr(low, addr & 0xFFFF_FFFF)
            self.wr(low + 4, addr >> 32)
        self.wr(spec.QUEUE_READY, 1)
        return ring

    # -- data path --------------------------------------------------------------------------------

    def submit(
        self,
        index: int,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        kick: bool = True,
    ) -> int:
        """Add one chain to queue ``index`` and kick if the device wants it; return its token."""
        ring = self.rings[index]
        token = ring.add(list(readable), list(writable), indirect=indirect)
        if kick and ring.kick_needed():
            self.kick(index)
        return token

    def kick(self, index: int) -> None:
        """vm_notify / vm_notify_with_data."""
        value = index
        if self.has(spec.VIRTIO_F_NOTIFICATION_DATA):
            ring = self.rings[index]
            if isinstance(ring, DriverPackedRing):
                value |= (ring.next_avail & 0x7FFF) << 16 | ring.avail_wrap << 31
            else:
                value |= (ring.avail_idx & 0x7FFF) << 16 | (ring.avail_idx >> 15 & 1) << 31
        self.wr(spec.QUEUE_NOTIFY, value)

    def used(self, index: int) -> list[tuple[int, int, list[bytes]]]:
        """New used elements of queue ``index``: (token, len, writable buffer contents)."""
        return self.rings[index].get_used()

    def interrupt(self) -> int:
        """vm_interrupt: read InterruptStatus and acknowledge exactly what was read."""
        status = self.rd(spec.INTERRUPT_STATUS)
        if status:
            self.wr(spec.INTERRUPT_ACK, status)
        return status

    # -- config -----------------------------------------------------------------------------------

    def config_generation(self) -> int:
        return 0 if self.legacy else self.rd(spec.CONFIG_GENERATION)

    def read_config(self, offset: int, size: int) -> int:
        """virtio_cread: one access of the field's width; le64 as two 32-bit reads."""
        while True:
            gen = self.config_generation()
            if size == 8:
                lo = self.regs.read(spec.CONFIG + offset, 4)
                hi = self.regs.read(spec.CONFIG + offset + 4, 4)
                value = lo | hi << 32
            else:
                value = self.regs.read(spec.CONFIG + offset, size)
            if self.config_generation() == gen:
                return value

    def read_config_bytes(self, offset: int, length: int) -> bytes:
        """virtio_cread_bytes: byte by byte inside a generation loop."""
        while True:
            gen = self.config_generation()
            data = bytes(self.regs.read(spec.CONFIG + offset + i, 1) for i in range(length))
            if self.config_generation() == gen:
                return data

    def write_config(self, offset: int, size: int, value: int) -> None:
        self.regs.write(spec.CONFIG + offset, size, value)

    # -- teardown ---------------------------------------------------------------------------------

    def remove(self) -> None:
        """virtio_dev_remove: reset, stop each queue and check it, then ACKNOWLEDGE again."""
        self.wr(spec.STATUS, 0)
        for i in range(len(self.rings)):
            self.wr(spec.QUEUE_SEL, i)
            if self.legacy:
                self.wr(spec.QUEUE_PFN, 0)
            else:
                self.wr(spec.QUEUE_READY, 0)
                if self.rd(spec.QUEUE_READY):
                    raise DriverError(f"queue {i} still ready after reset")
        if self.status() != 0:
            raise DriverError("status not 0 after reset")
        self.add_status(spec.STATUS_ACKNOWLEDGE)
        self.rings = []
        self.features = 0
