"""The virtio device base class: what a device type implements on top of a transport.

A device (block, net, rng, ...) declares its type, its queues' maximum sizes, the features it
offers and its configuration-space layout.  The transport (``mmio.py``) owns the registers and
the status machine; it calls :meth:`VirtioDevice.activate` once the driver has set DRIVER_OK with
valid queues, and :meth:`VirtioDevice.reset` on a status write of 0.  Both may happen any number
of times (seed audit #5): nothing is *taken* on activation that reset does not give back.

Threading: register accesses arrive on vCPU threads, queue notifications on the event-loop thread
(through ioeventfds) or inline.  ``self.lock`` serialises lifecycle changes against queue
processing, so after :meth:`reset` returns no request is processed and no interrupt is raised.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import GuestError
from ...logutil import RateLimitedLog
from ...memory import GuestMemory
from . import spec
from .queue import DescriptorChain, Virtqueue

if TYPE_CHECKING:
    from ...eventloop import EventLoop

log = logging.getLogger(__name__)

_INT_VRING = spec.VIRTIO_MMIO_INT_VRING
_INT_CONFIG = spec.VIRTIO_MMIO_INT_CONFIG


class Interrupt:
    """InterruptStatus of one transport plus the line it drives.

    ``trigger`` raises the guest interrupt (an irqfd write, i.e. an edge, as Firecracker does;
    see virtio.md §6.2): it is called for every new notification, even if status bits were
    already pending, so a missed edge cannot stall the driver.

    The two status bits are kept apart, each set or cleared with one attribute store (atomic
    under the GIL), so :meth:`ack` and the ``status`` read, which the guest's interrupt handler
    does on a vCPU thread for every interrupt, take no lock: a set and an ack of *different*
    bits cannot lose each other, and for the same bit the outcome is the one real hardware
    gives (Linux re-checks the rings after its ACK, so an ACK racing a new used buffer loses
    nothing).  Only the ``count`` metric is updated under a lock.
    """

    __slots__ = ("_vring", "_config", "_trigger", "_lock", "count")

    def __init__(self, trigger: Callable[[], None] | None = None) -> None:
        self._vring = 0
        self._config = 0
        self._trigger = trigger or (lambda: None)
        self._lock = threading.Lock()
        self.count = 0

    @property
    def status(self) -> int:
        """InterruptStatus: VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG bits."""
        return self._vring | self._config

    def set_trigger(self, trigger: Callable[[], None]) -> None:
        self._trigger = trigger

    def signal_used(self) -> None:
        self._vring = _INT_VRING
        with self._lock:
            self.count += 1
        self._trigger()

    def signal_config(self) -> None:
        self._config = _INT_CONFIG
        with self._lock:
            self.count += 1
        self._trigger()

    def ack(self, bits: int) -> None:
        if bits & _INT_VRING:
            self._vring = 0
        if bits & _INT_CONFIG:
            self._config = 0

    def clear(self) -> None:
        self._vring = 0
        self._config = 0


@dataclass(frozen=True)
class ConfigField:
    """One typed field of a device's configuration space (offset from 0x100)."""

    name: str
    offset: int
    fmt: str  # struct format without byte order: "B", "H", "I", "Q" or "6s"
    writable: bool = False

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.fmt)


class VirtioDevice:
    """Base of every virtio device.  Subclasses set the class attributes and override hooks."""

    #: virtio device ID (§5); the transport reports it at DeviceID (seed audit #2)
    device_type: int = 0
    #: human-readable name for logs and metrics
    name: str = "virtio"
    #: maximum size of each queue; QueueNumMax reads these (0 = no such queue)
    queue_max_sizes: tuple[int, ...] = ()
    #: the device's configuration space layout
    config_layout: tuple[ConfigField, ...] = ()
    #: device-specific feature bits offered (as a mask); transport bits are added by the base
    device_features: int = 0

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.avail_features = self.device_features | (
            spec.bit(spec.VIRTIO_F_VERSION_1)
            | spec.bit(spec.VIRTIO_F_EVENT_IDX)
            | spec.bit(spec.VIRTIO_F_INDIRECT_DESC)
        )
        self.acked_features = 0
        self.active = False
        self.mem: GuestMemory | None = None
        self.queues: list[Virtqueue | None] = []
        self.interrupt: Interrupt | None = None
        # The VMM's event loop (embervm.eventloop.EventLoop), set before activation by whoever
        # hosts the device; back-ends register their fds and timers on it in on_activate().
        self.loop: EventLoop | None = None
        self._fields = {f.name: f for f in self.config_layout}
        size = max((f.offset + f.size for f in self.config_layout), default=0)
        self.config = bytearray(size)
        # Set by the transport: called when the device changed its config (generation bump +
        # config interrupt) and when it hit a fatal error (DEVICE_NEEDS_RESET).
        self.on_config_changed: Callable[[], None] = lambda: None
        self.on_needs_reset: Callable[[str], None] = lambda reason: self.reset()
        self.ratelog = RateLimitedLog(logging.getLogger(f"embervm.virtio.{self.name}"))
        self.metrics: dict[str, int] = {
            "notifications": 0,
            "chains": 0,
            "interrupts": 0,
            "errors": 0,
            "activations": 0,
            "resets": 0,
        }

    # -- features -----------------------------------------------------------------------------

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def validate_features(self, acked: int) -> str | None:
        """Device-specific dependency check on FEATURES_OK; return a reason to refuse."""
        return None

    # -- configuration space --------------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset``; bytes beyond the config image read as zero."""
        chunk = bytes(self.config[offset : offset + size]) if offset >= 0 else b""
        return int.from_bytes(chunk.ljust(size, b"\0"), "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Apply a driver write if it falls inside one writable field; ignore anything else."""
        for f in self.config_layout:
            if f.writable and f.offset <= offset and offset + size <= f.offset + f.size:
                data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                self.config[offset : offset + size] = data
                self.config_written(f.name, self.get_config(f.name))
                return
        self.ratelog.debug(("cfgwrite", offset), "%s: ignored config write at %#x",
                           self.name, offset)

    def get_config(self, name: str) -> int | bytes:
        f = self._fields[name]
        return struct.unpack_from("<" + f.fmt, self.config, f.offset)[0]

    def set_config(self, name: str, value: int | bytes, *, notify: bool = True) -> None:
        """Set a field; if ``notify``, bump ConfigGeneration and raise a config interrupt."""
        f = self._fields[name]
        struct.pack_into("<" + f.fmt, self.config, f.offset, value)
        if notify:
            self.on_config_changed()

    def config_written(self, name: str, value: int | bytes) -> None:
        """Hook: the driver wrote a writable config field."""

    # -- lifecycle --------------------------------------------------------------------------------

    def activate(
        self, mem: GuestMemory, queues: list[Virtqueue | None], interrupt: Interrupt
    ) -> None:
        """Called by the transport at DRIVER_OK with validated queues (None = not enabled)."""
        with self.lock:
            self.mem = mem
            self.queues = list(queues)
            self.interrupt = interrupt
            self.active = True
            self.metrics["activations"] += 1
            self.on_activate()

    def reset(self) -> None:
        """Return to the power-on state; afterwards nothing touches guest memory."""
        with self.lock:
            was_active = self.active
            self.active = False
            if was_active:
                self.on_reset()
            self.queues = []
            self.mem = None
            self.interrupt = None
            self.acked_features = 0
            self.metrics["resets"] += 1

    def on_activate(self) -> None:
        """Hook: start using the queues (register back-end fds, ...)."""

    # -- what the device manager asks of every device (defaults: nothing to do) -----------------

    def control_commands(self) -> dict[str, Callable[[list[str]], dict]]:
        """Commands this device offers on the control socket, by name."""
        return {}

    def quiesce(self, timeout: float) -> bool:
        """Wait until no request is in flight outside the event loop (worker threads); return
        False if some still are after ``timeout`` seconds.  Devices that do all their work on
        the event loop have nothing to wait for."""
        return True

    def terminal_resized(self) -> None:
        """Hook: the host terminal changed size (SIGWINCH); a stdio console tells the guest."""

    def close(self) -> None:
        """Release the back-end (files, sockets, TAPs) when the VM is gone."""

    def on_reset(self) -> None:
        """Hook: stop all work and drop per-activation state."""

    def set_queue(self, index: int, queue: Virtqueue | None) -> None:
        """Attach or detach one queue of an active device (QueueReady / QueueReset)."""
        with self.lock:
            if index < len(self.queues):
                self.queues[index] = queue

    # -- notifications ----------------------------------------------------------------------------

    def queue_notify(self, index: int) -> None:
        """The driver kicked queue ``index``.  Safe to call from any thread, any number of times."""
        with self.lock:
            if not self.active or index >= len(self.queues):
                return
            queue = self.queues[index]
            if queue is None:
                return
            self.metrics["notifications"] += 1
            try:
                self.process_queue(index, queue)
            except GuestError as e:
                self.fail(f"queue {index}: {e}")

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        """Hook: consume available buffers of ``queue``.  Runs with ``self.lock`` held."""

    def signal_used(self, queue: Virtqueue) -> None:
        """Interrupt the driver if the queue's suppression state asks for it."""
        if queue.needs_interrupt() and self.interrupt is not None:
            self.metrics["interrupts"] += 1
            self.interrupt.signal_used()

    def drain(self, queue: Virtqueue, handle: Callable[[DescriptorChain], int]) -> None:
        """Pop every available chain, complete each with ``handle(chain)`` bytes written.

        Follows the lost-wakeup rule (virtio.md §4.4): notifications are disabled while
        draining, re-enabled afterwards and the ring re-checked.
        """
        while True:
            queue.disable_notifications()
            while (chain := queue.pop()) is not None:
                self.metrics["chains"] += 1
                queue.add_used(chain, handle(chain))
            if not queue.enable_notifications():
                break
        self.signal_used(queue)

    def fail(self, reason: str) -> None:
        """A fatal guest error: stop the device and let the transport set DEVICE_NEEDS_RESET."""
        self.metrics["errors"] += 1
        self.ratelog.warning(("fail", reason[:60]), "%s: device needs reset: %s", self.name, reason)
        self.on_needs_reset(reason)

    def active_queues(self) -> Iterable[tuple[int, Virtqueue]]:
        return ((i, q) for i, q in enumerate(self.queues) if q is not None)
