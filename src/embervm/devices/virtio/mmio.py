"""The virtio-mmio transport (virtio 1.2 §4.2): the 4 KiB register window of one device.

Modern (version 2) is the default; ``legacy=True`` gives the version-1 register set
(GuestPageSize, QueuePFN, QueueAlign) for old guests.  The transport owns the registers and the
status machine and hands validated queues to the device; every seed-audit defect is handled here:

* DriverFeatures is stored under DriverFeaturesSel (#1); DeviceID comes from the device (#2);
* registers below 0x100 take aligned 32-bit accesses only, config space any width (#3);
* Status := 0 resets everything, synchronously (#4), and activation is repeatable (#5);
* FEATURES_OK is refused unless acked ⊆ offered (+ VERSION_1 when modern) (#6);
* status transitions are checked step by step, FAILED stops the device, NEEDS_RESET is set by the
  device with a config interrupt (#7);
* only ready, valid queues activate (#8); queue registers freeze while ready, QueueReset (#9);
* QueueNotify works on the MMIO path and through eventfds, NOTIFICATION_DATA decoded (#10);
* config changes bump ConfigGeneration and raise InterruptStatus bit 1 (#11);
* the full 1.2 register map incl. SHM and QueueReset, plus legacy mode (#12);
* bad accesses are logged rate-limited per device and cause (#13).

Like h11, this is sans-I/O: a state machine fed ``read(offset, size)`` / ``write(offset, size,
value)`` from the bus, talking to guest memory and an interrupt callable.  No KVM here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ...errors import QueueError
from ...logutil import RateLimitedLog
from ...memory import GuestMemory
from . import spec
from .device import Interrupt, VirtioDevice
from .queue import QueueConfig, Virtqueue, legacy_ring_addresses, make_queue

log = logging.getLogger(__name__)

_ALL_ONES32 = 0xFFFF_FFFF
_INTERRUPT_STATUS = spec.INTERRUPT_STATUS
_INTERRUPT_ACK = spec.INTERRUPT_ACK
_QUEUE_LAYOUT_REGS = frozenset(
    {
        spec.QUEUE_NUM,
        spec.QUEUE_DESC_LOW,
        spec.QUEUE_DESC_HIGH,
        spec.QUEUE_DRIVER_LOW,
        spec.QUEUE_DRIVER_HIGH,
        spec.QUEUE_DEVICE_LOW,
        spec.QUEUE_DEVICE_HIGH,
        spec.QUEUE_ALIGN,
        spec.QUEUE_PFN,
    }
)
# Bits a driver may set in Status; DEVICE_NEEDS_RESET belongs to the device.
_DRIVER_STATUS_BITS = (
    spec.STATUS_ACKNOWLEDGE
    | spec.STATUS_DRIVER
    | spec.STATUS_FEATURES_OK
    | spec.STATUS_DRIVER_OK
    | spec.STATUS_FAILED
)


def decode_notification(value: int, notification_data: bool) -> tuple[int, int | None, int | None]:
    """QueueNotify value → (queue index, next avail offset, next wrap) (virtio.md §6.1).

    With VIRTIO_F_NOTIFICATION_DATA bits 16-30 carry the next offset (split: low 15 bits of the
    new avail.idx) and bit 31 the wrap counter (split: bit 15 of avail.idx).
    """
    if not notification_data:
        return value & 0xFFFF, None, None
    return value & 0xFFFF, (value >> 16) & 0x7FFF, value >> 31 & 1


class _LegacyQueueState:
    __slots__ = ("pfn", "align")

    def __init__(self) -> None:
        self.pfn = 0
        self.align = 4096


class MmioTransport:
    """One virtio device behind a virtio-mmio register window."""

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        *,
        legacy: bool = False,
        interrupt: Callable[[], None] | None = None,
        notification_data: bool = False,
        packed: bool = False,
        shm_regions: tuple[tuple[int, int], ...] = (),
    ) -> None:
        self.device = device
        self.mem = mem
        self.legacy = legacy
        self.interrupt = Interrupt(interrupt)
        self.shm_regions = shm_regions
        self.version = spec.MMIO_VERSION_LEGACY if legacy else spec.MMIO_VERSION_MODERN
        # One lock per device for registers and queue work alike: a single lock order, so the
        # vCPU thread (registers) and the event-loop thread (queues) cannot deadlock.
        self.lock = device.lock
        self.ratelog = RateLimitedLog(logging.getLogger(f"embervm.virtio.mmio.{device.name}"))
        offered = device.avail_features
        if legacy:
            # Version 1 has no feature words beyond 0 and no VERSION_1 semantics.
            offered &= 0xFFFF_FFFF
        else:
            offered |= spec.bit(spec.VIRTIO_F_VERSION_1) | spec.bit(spec.VIRTIO_F_RING_RESET)
            if notification_data:
                offered |= spec.bit(spec.VIRTIO_F_NOTIFICATION_DATA)
            if packed:
                # Opt-in, like QEMU's packed=on: Linux takes the packed layout whenever it is
                # offered, and the split ring is the layout every guest driver has exercised.
                offered |= spec.bit(spec.VIRTIO_F_RING_PACKED)
        self.offered_features = offered
        self.queue_configs = [QueueConfig(m) for m in device.queue_max_sizes]
        self.legacy_queues = [_LegacyQueueState() for _ in device.queue_max_sizes]
        # Hook for QueueNotify writes arriving on the MMIO path: by default the device processes
        # the queue inline; the VMM points it at the queue's eventfd so that all queue work
        # happens on the event-loop thread (same path as an ioeventfd kick).
        self.notify_hook: Callable[[int], None] = device.queue_notify
        device.on_config_changed = self._config_changed
        device.on_needs_reset = self._needs_reset
        self.config_generation = 0
        self._reset_registers()

    # -- state ------------------------------------------------------------------------------------

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0
        self.guest_page_size = getattr(self, "guest_page_size", 4096)
        for q in self.queue_configs:
            q.reset()
        for lq in self.legacy_queues:
            lq.pfn = 0
            lq.align = 4096
        self.interrupt.clear()

    def reset(self) -> None:
        """Device reset (Status := 0): synchronous, complete, repeatable (seed audit #4, #5)."""
        with self.lock:
            self.device.reset()
            self._reset_registers()

    @property
    def activated(self) -> bool:
        return self.device.active

    def _selected_queue(self) -> QueueConfig | None:
        if self.queue_sel < len(self.queue_configs):
            return self.queue_configs[self.queue_sel]
        return None

    def _queue_live(self, i: int) -> bool:
        if self.legacy:
            return self.legacy_queues[i].pfn != 0
        return self.queue_configs[i].ready

    # -- bus interface --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset == _INTERRUPT_STATUS and size == 4:
            # The guest's interrupt handler reads this on every virtio interrupt.  Not under
            # the device lock: a queue being processed on the event loop (a disk read, say)
            # must not stall the vCPU, and InterruptStatus has a lock of its own.
            return self.interrupt.status
        if offset >= spec.CONFIG:
            if size not in (1, 2, 4, 8):
                self._bad("cfgwidth", "config read of width %d at %#x", size, offset)
                return 0
            with self.lock:
                return self.device.read_config(offset - spec.CONFIG, size)
        if size != 4 or offset & 3:
            self._bad(("rwidth", offset), "register read of width %d at %#x", size, offset)
            return 0
        with self.lock:
            return self._read_register(offset)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == _INTERRUPT_ACK and size == 4:
            # Written by the same handler right after that read; as there, no device lock.
            self.interrupt.ack(value & _ALL_ONES32)
            return
        if offset >= spec.CONFIG:
            if size not in (1, 2, 4, 8):
                self._bad("cfgwidth", "config write of width %d at %#x", size, offset)
                return
            with self.lock:
                # Config writes are only meaningful once the driver is in charge.
                if self.status & spec.STATUS_DRIVER:
                    self.device.write_config(offset - spec.CONFIG, size, value)
                else:
                    self._bad("cfgearly", "config write before DRIVER at %#x", offset)
            return
        if size != 4 or offset & 3:
            self._bad(("wwidth", offset), "register write of width %d at %#x", size, offset)
            return
        value &= _ALL_ONES32
        if offset == spec.QUEUE_NOTIFY:
            # Not under the transport lock: the device serialises queue work itself, and a kick
            # must not wait for a config access on another vCPU.
            self._notify(value)
            return
        with self.lock:
            self._write_register(offset, value)

    # -- registers -------------------------------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        if offset == spec.MAGIC_VALUE:
            return spec.MMIO_MAGIC
        if offset == spec.VERSION:
            return self.version
        if offset == spec.DEVICE_ID:
            return self.device.device_type
        if offset == spec.VENDOR_ID:
            return spec.VENDOR_ID_EMBERVM
        if offset == spec.DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return self.offered_features >> (32 * self.device_features_sel) & _ALL_ONES32
        if offset == spec.QUEUE_NUM_MAX:
            q = self._selected_queue()
            if q is None:
                return 0
            # Legacy: a queue in use reports its size still; modern: always the max.
            return q.max_size
        if offset == spec.QUEUE_READY and not self.legacy:
            q = self._selected_queue()
            return int(q.ready) if q is not None else 0
        if offset == spec.QUEUE_PFN and self.legacy:
            if self.queue_sel < len(self.legacy_queues):
                return self.legacy_queues[self.queue_sel].pfn
            return 0
        if offset == spec.INTERRUPT_STATUS:
            return self.interrupt.status
        if offset == spec.STATUS:
            return self.status
        if not self.legacy:
            if offset in (spec.SHM_LEN_LOW, spec.SHM_LEN_HIGH, spec.SHM_BASE_LOW,
                          spec.SHM_BASE_HIGH):
                return self._read_shm(offset)
            if offset == spec.QUEUE_RESET:
                # Reset completes synchronously inside the write, so it never reads "in progress".
                return 0
            if offset == spec.CONFIG_GENERATION:
                return self.config_generation & _ALL_ONES32
        self._bad(("rreg", offset), "read of unknown or write-only register %#x", offset)
        return 0

    def _read_shm(self, offset: int) -> int:
        if self.shm_sel >= len(self.shm_regions):
            # §4.2.2: a non-existent region reads as length -1 (all ones), base likewise.
            return _ALL_ONES32
        base, length = self.shm_regions[self.shm_sel]
        value = length if offset in (spec.SHM_LEN_LOW, spec.SHM_LEN_HIGH) else base
        return value >> 32 if offset in (spec.SHM_LEN_HIGH, spec.SHM_BASE_HIGH) else (
            value & _ALL_ONES32
        )

    def _write_register(self, offset: int, value: int) -> None:
        if offset == spec.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == spec.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == spec.DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == spec.QUEUE_SEL:
            self.queue_sel = value
        elif offset == spec.STATUS:
            self._write_status(value)
        elif offset == spec.INTERRUPT_ACK:
            self.interrupt.ack(value)
        elif offset in _QUEUE_LAYOUT_REGS or offset in (spec.QUEUE_READY, spec.QUEUE_RESET):
            self._write_queue_register(offset, value)
        elif offset == spec.GUEST_PAGE_SIZE and self.legacy:
            if value and not value & (value - 1):
                self.guest_page_size = value
            else:
                self._bad("pagesize", "GuestPageSize %#x is not a power of two", value)
        elif offset == spec.SHM_SEL and not self.legacy:
            self.shm_sel = value
        else:
            self._bad(("wreg", offset), "write of unknown or read-only register %#x", offset)

    def _write_driver_features(self, value: int) -> None:
        if self.status & spec.STATUS_FEATURES_OK or self.status & spec.STATUS_DRIVER_OK:
            self._bad("featlate", "DriverFeatures written after FEATURES_OK: ignored")
            return
        sel = self.driver_features_sel
        if sel > 1:
            if value:
                self._bad("featsel", "DriverFeatures word %d is beyond the 64 feature bits", sel)
            return
        # Seed audit #1: the word is stored under the *selected* page.
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(_ALL_ONES32 << shift)) | (value << shift)

    # -- status machine ----------------------------------------------------------------------------

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self.status
        if value & ~old & spec.STATUS_FAILED:
            # The driver gave up: stop processing, keep the status until it resets us.
            self.device.reset()
            self.status = old | spec.STATUS_FAILED
            return
        if old & spec.STATUS_FAILED:
            self._bad("afterfail", "status write %#x after FAILED: reset first", value)
            return
        if value & ~_DRIVER_STATUS_BITS & ~old:
            self._bad(("statusbits", value), "driver set reserved/device status bits %#x", value)
            value &= _DRIVER_STATUS_BITS | old
        if old & ~value & ~spec.STATUS_DEVICE_NEEDS_RESET:
            # §2.1: the driver never clears bits except by writing 0.
            self._bad(("statusclear", value), "status write %#x clears bits of %#x", value, old)
            return
        new_bits = value & ~old
        new = old
        # Apply the new bits in initialisation order, validating each step (§3.1.1).
        if new_bits & spec.STATUS_ACKNOWLEDGE:
            new |= spec.STATUS_ACKNOWLEDGE
        if new_bits & spec.STATUS_DRIVER:
            if not new & spec.STATUS_ACKNOWLEDGE:
                return self._refuse(old, "DRIVER before ACKNOWLEDGE")
            new |= spec.STATUS_DRIVER
        if new_bits & spec.STATUS_FEATURES_OK:
            if self.legacy:
                return self._refuse(old, "FEATURES_OK does not exist on a legacy device")
            if not new & spec.STATUS_DRIVER:
                return self._refuse(old, "FEATURES_OK before DRIVER")
            reason = self._check_features(self.driver_features)
            if reason is not None:
                # Refusal is signalled only by not latching the bit (virtio.md §9.3).
                self.ratelog.warning(("featrefused", reason), "%s: FEATURES_OK refused: %s",
                                     self.device.name, reason)
                self.status = new
                return
            self.device.acked_features = self.driver_features
            new |= spec.STATUS_FEATURES_OK
        if new_bits & spec.STATUS_DRIVER_OK:
            ready = spec.STATUS_DRIVER if self.legacy else spec.STATUS_FEATURES_OK
            if not new & ready:
                return self._refuse(old, "DRIVER_OK before FEATURES_OK")
            if self.legacy:
                self.device.acked_features = self.driver_features & self.offered_features
            self.status = new | spec.STATUS_DRIVER_OK
            self._activate()
            return
        self.status = new

    def _refuse(self, old: int, why: str) -> None:
        self._bad(("order", why), "status transition refused: %s", why)
        self.status = old

    def _check_features(self, acked: int) -> str | None:
        extra = acked & ~self.offered_features
        if extra:
            return f"driver acked features {extra:#x} the device never offered"
        if not acked >> spec.VIRTIO_F_VERSION_1 & 1:
            return "modern virtio-mmio needs VIRTIO_F_VERSION_1"
        return self.device.validate_features(acked)

    def _activate(self) -> None:
        queues: list[Virtqueue | None] = []
        try:
            for i, cfg in enumerate(self.queue_configs):
                queues.append(self._build_queue(i, cfg) if self._queue_live(i) else None)
        except QueueError as e:
            self._needs_reset(str(e))
            return
        self.device.activate(self.mem, queues, self.interrupt)
        # Drivers may post buffers before DRIVER_OK (virtio.md §2.3): look at every queue once.
        for i, q in enumerate(queues):
            if q is not None:
                self.notify_hook(i)

    def _build_queue(self, index: int, cfg: QueueConfig) -> Virtqueue:
        if self.legacy:
            lq = self.legacy_queues[index]
            if cfg.size == 0 or cfg.size & (cfg.size - 1):
                raise QueueError(f"queue {index}: size {cfg.size} is not a power of two")
            cfg.desc_addr, cfg.driver_addr, cfg.device_addr = legacy_ring_addresses(
                lq.pfn, self.guest_page_size, lq.align, cfg.size
            )
        return make_queue(index, cfg, self.mem, self.device.acked_features)

    def _needs_reset(self, reason: str) -> None:
        """Set DEVICE_NEEDS_RESET; with DRIVER_OK set also raise a config interrupt (§2.1)."""
        with self.lock:
            self.ratelog.warning(("needsreset", reason[:60]), "%s: DEVICE_NEEDS_RESET: %s",
                                 self.device.name, reason)
            if self.device.active:
                self.device.reset()
            self.status |= spec.STATUS_DEVICE_NEEDS_RESET
            if self.status & spec.STATUS_DRIVER_OK:
                self.interrupt.signal_config()

    def _config_changed(self) -> None:
        with self.lock:
            self.config_generation = (self.config_generation + 1) & _ALL_ONES32
            if self.status & spec.STATUS_DRIVER_OK:
                self.interrupt.signal_config()

    # -- queues ----------------------------------------------------------------------------------

    def _write_queue_register(self, offset: int, value: int) -> None:
        i = self.queue_sel
        q = self._selected_queue()
        if q is None:
            self._bad(("qsel", offset), "queue register %#x for absent queue %d", offset, i)
            return
        if offset == spec.QUEUE_RESET:
            if self.legacy or not self.device.acked_features >> spec.VIRTIO_F_RING_RESET & 1:
                self._bad("qreset", "QueueReset without VIRTIO_F_RING_RESET")
            elif value == 1:
                self._reset_queue(i, q)
            return
        if offset == spec.QUEUE_READY and not self.legacy:
            self._set_queue_ready(i, q, value == 1)
            return
        if self.legacy and offset == spec.QUEUE_PFN:
            self._set_legacy_pfn(i, q, value)
            return
        if self._queue_live(i):
            # Seed audit #9: never re-point a live ring.
            self._bad(("qlive", offset), "queue %d register %#x written while ready: ignored",
                      i, offset)
            return
        if offset == spec.QUEUE_NUM:
            q.size = value
        elif self.legacy and offset == spec.QUEUE_ALIGN:
            self.legacy_queues[i].align = value
        elif self.legacy:
            self._bad(("legacyreg", offset), "register %#x does not exist on legacy", offset)
        elif offset == spec.QUEUE_DESC_LOW:
            q.desc_addr = (q.desc_addr & ~_ALL_ONES32) | value
        elif offset == spec.QUEUE_DESC_HIGH:
            q.desc_addr = (q.desc_addr & _ALL_ONES32) | value << 32
        elif offset == spec.QUEUE_DRIVER_LOW:
            q.driver_addr = (q.driver_addr & ~_ALL_ONES32) | value
        elif offset == spec.QUEUE_DRIVER_HIGH:
            q.driver_addr = (q.driver_addr & _ALL_ONES32) | value << 32
        elif offset == spec.QUEUE_DEVICE_LOW:
            q.device_addr = (q.device_addr & ~_ALL_ONES32) | value
        elif offset == spec.QUEUE_DEVICE_HIGH:
            q.device_addr = (q.device_addr & _ALL_ONES32) | value << 32
        else:
            self._bad(("modernreg", offset), "register %#x does not exist on modern", offset)

    def _set_queue_ready(self, i: int, q: QueueConfig, ready: bool) -> None:
        if ready == q.ready:
            return
        if not ready:
            q.ready = False
            if self.device.active:
                self.device.set_queue(i, None)
            return
        if not self.status & spec.STATUS_DRIVER_OK:
            # Validated at DRIVER_OK together with the others.
            q.ready = True
            return
        # Enabling a queue of a live device (after QueueReset): validate and attach now.
        try:
            runtime = make_queue(i, q, self.mem, self.device.acked_features)
        except QueueError as e:
            self._bad(("qinvalid", i), "queue %d refused: %s", i, e)
            return
        q.ready = True
        self.device.set_queue(i, runtime)
        self.notify_hook(i)

    def _set_legacy_pfn(self, i: int, q: QueueConfig, pfn: int) -> None:
        """Legacy QueuePFN: non-zero = the queue's ring is here, 0 = stop using the queue."""
        lq = self.legacy_queues[i]
        if pfn == lq.pfn:
            return
        if pfn == 0:
            lq.pfn = 0
            if self.device.active:
                self.device.set_queue(i, None)
            return
        if lq.pfn:
            self._bad(("qlive", spec.QUEUE_PFN), "queue %d PFN written while in use: ignored", i)
            return
        lq.pfn = pfn
        if self.status & spec.STATUS_DRIVER_OK and self.device.active:
            try:
                runtime = self._build_queue(i, q)
            except QueueError as e:
                lq.pfn = 0
                self._bad(("qinvalid", i), "queue %d refused: %s", i, e)
                return
            self.device.set_queue(i, runtime)
            self.notify_hook(i)

    def _reset_queue(self, i: int, q: QueueConfig) -> None:
        """QueueReset (VIRTIO_F_RING_RESET, §2.6.1): the one queue goes back to its reset state."""
        if self.device.active:
            self.device.set_queue(i, None)
        q.reset()

    # -- notifications ---------------------------------------------------------------------------

    def _notify(self, value: int) -> None:
        index, _next_off, _next_wrap = decode_notification(
            value, bool(self.device.acked_features >> spec.VIRTIO_F_NOTIFICATION_DATA & 1)
        )
        if index >= len(self.queue_configs):
            self._bad(("notifyidx", index), "notify for absent queue %d", index)
            return
        # The offset/wrap hint is not needed: the device re-reads the ring (notifications are
        # hints, §2.9).
        self.notify_hook(index)

    def queue_event(self, index: int) -> None:
        """An ioeventfd for queue ``index`` fired (called on the event-loop thread)."""
        self.device.queue_notify(index)

    # -- logging ---------------------------------------------------------------------------------

    def _bad(self, cause: object, msg: str, *args: object) -> None:
        self.ratelog.warning(cause, "%s: " + msg, self.device.name, *args)
