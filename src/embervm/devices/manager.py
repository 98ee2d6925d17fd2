"""The device manager: owns the virtio-mmio slots of one VM, their IRQs, queue eventfds,
lifecycles and per-device control commands.

Each device gets one slot: a 4 KiB MMIO window at ``VIRTIO_MMIO_BASE + i * 0x1000``, an IRQ from
:data:`VIRTIO_IRQS` driven through an irqfd, and one ioeventfd per queue (kicks never run on a
vCPU thread: the event loop drains them).  A slot has an ``id`` (Firecracker's ``drive_id`` /
``iface_id``, or ``vsock``, ``balloon``, ``rng``, ``console``, or the name a user gave
:meth:`add`), by which the VMM finds the device to update at run time.

The manager hands every device a :class:`~embervm.eventloop.GatedLoop`, so :meth:`pause` stops
all device work between two event-loop callbacks and :meth:`resume` continues it.  Devices that
do I/O on other threads (virtio-blk's Async engine) are waited for with
:meth:`~embervm.devices.virtio.device.VirtioDevice.quiesce`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..bus import Bus
from ..errors import ConfigError
from ..eventloop import EventLoop, GatedLoop
from ..memory import GuestMemory
from .virtio import spec
from .virtio.device import VirtioDevice
from .virtio.mmio import MmioTransport

log = logging.getLogger(__name__)

# Guest-physical layout of the virtio-mmio windows (docs/ARCHITECTURE.md): 4 KiB slots from the
# start of the 32-bit MMIO gap, as Firecracker.  IRQs avoid the legacy ones (1 i8042, 3/4 COM,
# 8 RTC, 12 PS/2 mouse, 13 FPU); 16..23 are IOAPIC pins described in the MP table.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23)

Command = Callable[[list[str]], dict]


@dataclass
class VirtioSlot:
    id: str
    device: VirtioDevice
    transport: MmioTransport
    base: int
    irq: int
    irq_fd: int
    queue_fds: list[int]

    @property
    def kernel_arg(self) -> str:
        """How Linux learns of the device without ACPI: ``virtio_mmio.device=`` word."""
        return f"virtio_mmio.device=4K@{self.base:#x}:{self.irq}"


class DeviceManager:
    """The virtio devices of one VM (see the module docstring)."""

    def __init__(self, vm, mem: GuestMemory, mmio: Bus, loop: EventLoop,
                 new_eventfd: Callable[[], int]) -> None:
        self._vm = vm
        self._mem = mem
        self._mmio = mmio
        self.loop = loop
        #: what devices see as their event loop: paused and resumed with the VM
        self.device_loop = GatedLoop(loop)
        self._new_eventfd = new_eventfd
        self.slots: list[VirtioSlot] = []
        self._by_id: dict[str, VirtioSlot] = {}
        self._registered = False

    def __iter__(self) -> Iterator[VirtioSlot]:
        return iter(self.slots)

    def __len__(self) -> int:
        return len(self.slots)

    def get(self, slot_id: str) -> VirtioSlot:
        try:
            return self._by_id[slot_id]
        except KeyError:
            raise ConfigError(f"no device with id {slot_id!r}") from None

    def find(self, device_type: type[VirtioDevice]) -> list[VirtioDevice]:
        return [s.device for s in self.slots if isinstance(s.device, device_type)]

    def add(self, device: VirtioDevice, slot_id: str | None = None) -> VirtioSlot:
        """Give ``device`` the next slot (window, IRQ, eventfds).  ``slot_id`` defaults to the
        device's name, numbered if taken (``rng``, ``rng1``, ...)."""
        index = len(self.slots)
        if index >= len(VIRTIO_IRQS):
            raise ConfigError(f"too many virtio devices (at most {len(VIRTIO_IRQS)})")
        if slot_id is None:
            slot_id = device.name
            n = 1
            while slot_id in self._by_id:
                slot_id = f"{device.name}{n}"
                n += 1
        elif slot_id in self._by_id:
            raise ConfigError(f"two devices with id {slot_id!r}")
        base = VIRTIO_MMIO_BASE + index * spec.MMIO_SIZE
        irq = VIRTIO_IRQS[index]
        irq_fd = self._new_eventfd()
        self._vm.irqfd(irq_fd, irq)
        transport = MmioTransport(device, self._mem,
                                  interrupt=lambda: os.eventfd_write(irq_fd, 1))
        queue_fds = []
        for q in range(len(device.queue_max_sizes)):
            fd = self._new_eventfd()
            self._vm.ioeventfd(fd, base + spec.QUEUE_NOTIFY, 4, datamatch=q)
            queue_fds.append(fd)
        # Kicks that reach the MMIO path (no datamatch, DRIVER_OK scan) go through the same
        # eventfd, so queue work always runs on the event-loop thread.
        transport.notify_hook = lambda q, fds=queue_fds: os.eventfd_write(fds[q], 1)
        self._mmio.insert(transport, base, spec.MMIO_SIZE)
        device.loop = self.device_loop
        slot = VirtioSlot(slot_id, device, transport, base, irq, irq_fd, queue_fds)
        self.slots.append(slot)
        self._by_id[slot_id] = slot
        if self._registered:
            self._register(slot)
        return slot

    def register(self) -> None:
        """Start serving queue kicks on the event loop (once, before the vCPUs run)."""
        self._registered = True
        for slot in self.slots:
            self._register(slot)

    def _register(self, slot: VirtioSlot) -> None:
        for q, fd in enumerate(slot.queue_fds):
            self.device_loop.add_eventfd(fd, lambda t=slot.transport, q=q: t.queue_event(q))

    def commands(self) -> dict[str, Command]:
        """Control-socket commands offered by the devices."""
        out: dict[str, Command] = {}
        for slot in self.slots:
            out.update(slot.device.control_commands())
        return out

    def status(self) -> list[dict]:
        return [{"id": s.id, "name": s.device.name, "base": s.base, "irq": s.irq,
                 "active": s.device.active, "metrics": dict(s.device.metrics)}
                for s in self.slots]

    def pause(self, timeout: float = 5.0) -> None:
        """Stop device work at a request boundary: no callback of any device runs until
        :meth:`resume`, and I/O in flight on other threads has completed."""
        self.device_loop.pause()
        for slot in self.slots:
            if not slot.device.quiesce(timeout):
                log.warning("%s: requests still in flight after %.1f s", slot.id, timeout)

    def resume(self) -> None:
        self.device_loop.resume()

    def close(self) -> None:
        """Close every device's back-end (files, sockets, TAPs); errors are logged, and the
        others are still closed."""
        for slot in reversed(self.slots):
            try:
                slot.device.close()
            except Exception:
                log.exception("closing %s failed", slot.id)
