"""One regression test per defect of the seed's virtio-mmio transport (seed-audit.md).

Each test names the behaviour it proves; the audit item number is in the docstring.
"""

from __future__ import annotations

import logging
import os

import pytest

from embervm.devices.virtio import spec
from embervm.devices.virtio.device import ConfigField, VirtioDevice
from embervm.devices.virtio.mmio import MmioTransport, decode_notification
from embervm.devices.virtio.queue import DescriptorChain, Virtqueue
from embervm.devices.virtio.rng import Rng
from embervm.memory import GuestMemory
from embervm.testing.driver import DriverError, MmioDriver

VERSION_1 = spec.bit(spec.VIRTIO_F_VERSION_1)


class EchoDevice(VirtioDevice):
    """A test device: two queues; copies each chain's readable bytes into its writable part."""

    device_type = 42
    name = "echo"
    queue_max_sizes = (16, 8)
    device_features = spec.bit(0) | spec.bit(5)
    config_layout = (
        ConfigField("capacity", 0, "Q"),
        ConfigField("mac", 8, "6s"),
        ConfigField("status", 14, "H"),
        ConfigField("small", 16, "B"),
        ConfigField("wr", 20, "I", writable=True),
    )

    def __init__(self) -> None:
        super().__init__()
        self.activations: list[list[int | None]] = []
        self.resets = 0
        self.written: list[tuple[str, int | bytes]] = []

    def on_activate(self) -> None:
        self.activations.append([None if q is None else q.size for q in self.queues])

    def on_reset(self) -> None:
        self.resets += 1

    def config_written(self, name: str, value: int | bytes) -> None:
        self.written.append((name, value))

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        self.drain(queue, self._echo)

    def _echo(self, chain: DescriptorChain) -> int:
        return chain.writer().write(chain.reader().read())


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory([(0, 1 << 20)])


def make(mem: GuestMemory, device: VirtioDevice | None = None, **kw) -> tuple:
    dev = device or EchoDevice()
    irqs: list[int] = []
    t = MmioTransport(dev, mem, interrupt=lambda: irqs.append(1), **kw)
    return dev, t, irqs


def test_driver_features_stored_under_selected_page(mem):
    """#1: DriverFeatures is stored under DriverFeaturesSel (seed swapped page and value)."""
    dev, t, _ = make(mem)
    drv = MmioDriver(t, mem)
    drv.wr(spec.STATUS, spec.STATUS_ACKNOWLEDGE)
    drv.wr(spec.STATUS, spec.STATUS_ACKNOWLEDGE | spec.STATUS_DRIVER)
    drv.wr(spec.DRIVER_FEATURES_SEL, 1)
    drv.wr(spec.DRIVER_FEATURES, 1)  # VERSION_1 is bit 32
    drv.wr(spec.DRIVER_FEATURES_SEL, 0)
    drv.wr(spec.DRIVER_FEATURES, 1)  # device bit 0
    drv.add_status(spec.STATUS_FEATURES_OK)
    assert drv.status() & spec.STATUS_FEATURES_OK
    assert dev.acked_features == VERSION_1 | 1
    assert dev.has_feature(spec.VIRTIO_F_VERSION_1)


def test_device_id_comes_from_device(mem):
    """#2: DeviceID reports the device's own type, not always block."""
    _, t, _ = make(mem, Rng())
    assert t.read(spec.DEVICE_ID, 4) == spec.VIRTIO_ID_RNG
    _, t2, _ = make(mem)
    assert t2.read(spec.DEVICE_ID, 4) == 42


def test_config_space_serves_1_2_4_and_8_byte_accesses(mem):
    """#3: config space accepts every width at any in-range offset; registers only 32-bit."""
    dev, t, _ = make(mem)
    dev.set_config("capacity", 0x1122334455667788, notify=False)
    dev.set_config("mac", bytes([0xA, 0xB, 0xC, 0xD, 0xE, 0xF]), notify=False)
    dev.set_config("status", 0xBEEF, notify=False)
    dev.set_config("small", 0x7E, notify=False)
    drv = MmioDriver(t, mem)
    assert drv.read_config(0, 8) == 0x1122334455667788
    assert t.read(spec.CONFIG + 0, 4) == 0x55667788
    assert t.read(spec.CONFIG + 4, 4) == 0x11223344
    assert t.read(spec.CONFIG + 0, 8) == 0x1122334455667788
    assert drv.read_config_bytes(8, 6) == bytes([0xA, 0xB, 0xC, 0xD, 0xE, 0xF])
    assert t.read(spec.CONFIG + 14, 2) == 0xBEEF
    assert t.read(spec.CONFIG + 15, 1) == 0xBE  # unaligned byte inside a field
    assert t.read(spec.CONFIG + 16, 1) == 0x7E
    assert t.read(spec.CONFIG + 0x800, 4) == 0  # beyond the config image reads 0
    # registers: 32-bit only; other widths read 0 and writes are ignored
    assert t.read(spec.MAGIC_VALUE, 4) == spec.MMIO_MAGIC
    assert t.read(spec.MAGIC_VALUE, 2) == 0
    assert t.read(spec.MAGIC_VALUE + 1, 4) == 0
    t.write(spec.STATUS, 1, spec.STATUS_ACKNOWLEDGE)
    assert t.read(spec.STATUS, 4) == 0


def test_config_writes_only_reach_writable_fields(mem):
    """#3: a driver write lands only inside a writable field, any width."""
    dev, t, _ = make(mem)
    drv = MmioDriver(t, mem)
    drv.probe()
    drv.write_config(20, 2, 0xABCD)
    drv.write_config(0, 4, 0xFFFFFFFF)  # capacity is read-only
    assert dev.get_config("wr") == 0xABCD
    assert dev.get_config("capacity") == 0
    assert dev.written == [("wr", 0xABCD)]


def test_status_zero_resets_queues_features_and_interrupts(mem):
    """#4: writing 0 to Status is a full, synchronous device reset."""
    dev, t, irqs = make(mem)
    drv = MmioDriver(t, mem)
    drv.probe()
    drv.submit(0, [b"hello"], [16])
    assert drv.used(0)[0][2][0][:5] == b"hello"
    assert t.read(spec.INTERRUPT_STATUS, 4) & spec.VIRTIO_MMIO_INT_VRING
    t.write(spec.QUEUE_SEL, 4, 1)
    t.write(spec.STATUS, 4, 0)
    assert t.read(spec.STATUS, 4) == 0  # Linux reads it back right away
    assert t.read(spec.INTERRUPT_STATUS, 4) == 0
    assert t.read(spec.QUEUE_READY, 4) == 0  # QueueSel went back to 0 and the queue is off
    assert t.queue_sel == 0
    assert all(not q.ready and q.size == q.max_size and q.desc_addr == 0 for q in t.queue_configs)
    assert t.driver_features == 0 and dev.acked_features == 0
    assert not dev.active and dev.resets == 1


def test_activation_repeats_after_reset_many_times(mem):
    """#5: reset → probe → activate works any number of times (rebind, kexec, recovery)."""
    dev, t, _ = make(mem)
    for cycle in range(4):
        drv = MmioDriver(t, mem)
        drv.probe()
        payload = f"cycle {cycle}".encode()
        drv.submit(1, [payload], [32])
        [(_, n, [data])] = drv.used(1)
        assert data[:n] == payload
        drv.remove()
        assert t.read(spec.STATUS, 4) == spec.STATUS_ACKNOWLEDGE
    assert len(dev.activations) == 4
    assert dev.resets == 4


def test_features_ok_refused_when_acked_not_offered(mem):
    """#6: FEATURES_OK does not stick if the driver acks bits the device never offered."""
    dev, t, _ = make(mem)
    drv = MmioDriver(t, mem)
    drv.wr(spec.STATUS, 1)
    drv.wr(spec.STATUS, 3)
    drv.write_features(VERSION_1 | spec.bit(3))  # bit 3 not offered
    drv.add_status(spec.STATUS_FEATURES_OK)
    assert not drv.status() & spec.STATUS_FEATURES_OK
    assert dev.acked_features == 0
    with pytest.raises(DriverError, match="refuses features"):
        MmioDriver(t, mem).probe(exact=VERSION_1 | spec.bit(3))


def test_features_ok_refused_without_version_1_in_modern_mode(mem):
    """#6: the modern transport requires VERSION_1."""
    _, t, _ = make(mem)
    drv = MmioDriver(t, mem)
    drv.wr(spec.STATUS, 1)
    drv.wr(spec.STATUS, 3)
    drv.write_features(spec.bit(0))
    drv.add_status(spec.STATUS_FEATURES_OK)
    assert not drv.status() & spec.STATUS_FEATURES_OK


def test_status_transitions_are_validated_step_by_step(mem):
    """#7: out-of-order status bits are refused; the seed only compared for equality."""
    dev, t, _ = make(mem)
    t.write(spec.STATUS, 4, spec.STATUS_DRIVER)  # DRIVER before ACKNOWLEDGE
    assert t.read(spec.STATUS, 4) == 0
    t.write(spec.STATUS, 4, 1)
    t.write(spec.STATUS, 4, 1 | spec.STATUS_DRIVER_OK)  # DRIVER_OK without FEATURES_OK
    assert t.read(spec.STATUS, 4) == 1
    assert not dev.active
    t.write(spec.STATUS, 4, 3)
    t.write(spec.STATUS, 4, 1)  # clearing a bit without writing 0
    assert t.read(spec.STATUS, 4) == 3


def test_needs_reset_bit_does_not_block_activation(mem):
    """#7: extra status bits do not block activation (seed required exact equality)."""
    dev, t, _ = make(mem)
    drv = MmioDriver(t, mem)
    drv.probe()
    assert dev.active
    # A driver that RMWs the status while DEVICE_NEEDS_RESET is set keeps working.
    t.status |= spec.STATUS_DEVICE_NEEDS_RESET
    drv.add_status(spec.STATUS_DRIVER_OK)
    assert drv.status() & spec.STATUS_DRIVER_OK


def test_failed_status_stops_device_until_reset(mem):
    """#7: FAILED stops processing; only a reset brings the device back."""
    dev, t, _ = make(mem)
    drv = MmioDriver(t, mem)
    drv.probe()
    drv.add_status(spec.STATUS_FAILED)
    assert not dev.active
    drv.submit(0, [b"x"], [8])
    assert drv.used(0) == []
    t.write(spec.STATUS, 4, 1)  # ignored after FAILED
    assert t.read(spec.STATUS, 4) & spec.STATUS_FAILED
    MmioDriver(t, mem).probe()
    assert dev.active


def test_queue_error_sets_needs_reset_and_config_interrupt(mem):
    """#7: a fatal queue error sets DEVICE_NEEDS_RESET and raises a config interrupt."""
    dev, t, irqs = make(mem)
    drv = MmioDriver(t, mem)
    drv.probe()
    ring = drv.rings[0]
    # Corrupt the avail ring: claim 1000 new entries in a 16-entry queue.
    mem.write_u16(ring.driver_addr + 2, 1000)
    t.write(spec.QUEUE_NOTIFY, 4, 0)
    status = t.read(spec.STATUS, 4)
    assert status & spec.STATUS_DEVICE_NEEDS_RESET
    assert t.read(spec.INTERRUPT_STATUS, 4) & spec.VIRTIO_MMIO_INT_CONFIG
    assert not dev.active and irqs
    # The VM keeps going: a reset and re-probe recovers the device.
    drv2 = MmioDriver(t, mem)
    drv2.probe()
    drv2.submit(0, [b"ok"], [4])
    assert drv2.used(0)[0][2][0][:2] == b"ok"


def test_only_ready_queues_activate(mem):
    """#8: a queue never made ready is not handed to the device."""
    dev, t, _ = make(mem)
    drv = MmioDriver(t, mem)
    drv.probe(nqueues=1)
    assert dev.activations == [[16, None]]


@pytest.mark.parametrize("size", [0, 3, 32, 12])
def test_invalid_queue_size_sets_needs_reset_instead_of_activating(mem, size):
    """#8: size 0, > max or not a power of two (split) is refused at DRIVER_OK."""
    dev, t, _ = make(mem)
    drv = MmioDriver(t, mem)
    drv.probe(nqueues=0)  # DRIVER_OK with no queue: activates; now redo it with a bad queue
    drv.remove()
    drv.wr(spec.STATUS, 3)
    drv.write_features(VERSION_1)
    drv.add_status(spec.STATUS_FEATURES_OK)
    ring = drv.setup_queue(0, 16)  # a valid 16-entry layout in RAM ...
    assert t.read(spec.QUEUE_READY, 4) == 1
    drv.wr(spec.QUEUE_READY, 0)  # ... re-programmed with the bad size before DRIVER_OK
    drv.wr(spec.QUEUE_NUM, size)
    drv.wr(spec.QUEUE_READY, 1)
    assert ring.desc_addr == t.queue_configs[0].desc_addr
    drv.add_status(spec.STATUS_DRIVER_OK)
    assert not dev.active
    assert drv.status() & spec.STATUS_DEVICE_NEEDS_RESET


def test_queue_outside_ram_sets_needs_reset(mem):
    """#8: ring addresses outside guest RAM are refused."""
    dev, t, _ = make(mem)
    t.write(spec.STATUS, 4, 1)
    t.write(spec.STATUS, 4, 3)
    t.write(spec.DRIVER_FEATURES_SEL, 4, 1)
    t.write(spec.DRIVER_FEATURES, 4, 1)
    t.write(spec.STATUS, 4, 0xB)
    t.write(spec.QUEUE_NUM, 4, 16)
    t.write(spec.QUEUE_DESC_LOW, 4, 0x0)
    t.write(spec.QUEUE_DESC_HIGH, 4, 0x1)  # 4 GiB: no RAM there
    t.write(spec.QUEUE_DRIVER_LOW, 4, 0x1000)
    t.write(spec.QUEUE_DEVICE_LOW, 4, 0x2000)
    t.write(spec.QUEUE_READY, 4, 1)
    t.write(spec.STATUS, 4, 0xF)
    assert not dev.active
    assert t.read(spec.STATUS, 4) & spec.STATUS_DEVICE_NEEDS_RESET


def test_queue_registers_frozen_while_ready(mem):
    """#9: a live queue cannot be re-pointed."""
    dev, t, _ = make(mem)
    drv = MmioDriver(t, mem)
    drv.probe()
    q = t.queue_configs[0]
    before = (q.size, q.desc_addr, q.driver_addr, q.device_addr)
    t.write(spec.QUEUE_SEL, 4, 0)
    t.write(spec.QUEUE_NUM, 4, 4)
    t.write(spec.QUEUE_DESC_LOW, 4, 0x8000)
    t.write(spec.QUEUE_DEVICE_HIGH, 4, 7)
    assert (q.size, q.desc_addr, q.driver_addr, q.device_addr) == before
    drv.submit(0, [b"still"], [8])
    assert drv.used(0)[0][2][0][:5] == b"still"


def test_queue_reset_resets_one_queue(mem):
    """#9: QueueReset (VIRTIO_F_RING_RESET) resets a single queue, which can be set up again."""
    dev, t, _ = make(mem)
    drv = MmioDriver(t, mem)
    accept = (t.offered_features & ~((1 << 42) - (1 << 24))) | VERSION_1 | spec.bit(
        spec.VIRTIO_F_RING_RESET)
    drv.probe(accept=accept)
    assert dev.has_feature(spec.VIRTIO_F_RING_RESET)
    t.write(spec.QUEUE_SEL, 4, 1)
    t.write(spec.QUEUE_RESET, 4, 1)
    assert t.read(spec.QUEUE_RESET, 4) == 0
    assert t.read(spec.QUEUE_READY, 4) == 0
    assert dev.queues[1] is None and dev.queues[0] is not None
    drv.rings[1] = drv.setup_queue(1, 8)
    drv.submit(1, [b"again"], [8])
    assert drv.used(1)[0][2][0][:5] == b"again"


def test_queue_reset_ignored_without_ring_reset_feature(mem):
    """#9: without the feature QueueReset does nothing."""
    dev, t, _ = make(mem)
    MmioDriver(t, mem).probe()
    t.write(spec.QUEUE_RESET, 4, 1)
    assert dev.queues[0] is not None


def test_queue_notify_on_mmio_path_processes_queue(mem):
    """#10: a QueueNotify write is handled (the seed printed and dropped it)."""
    dev, t, irqs = make(mem)
    drv = MmioDriver(t, mem)
    drv.probe()
    drv.submit(0, [b"kick"], [8])
    assert drv.used(0)[0][2][0][:4] == b"kick"
    assert irqs


def test_queue_notify_hook_routes_kicks_to_an_eventfd(mem):
    """#10: the VMM can route MMIO-path kicks to the queue's eventfd (event-loop thread)."""
    dev, t, _ = make(mem)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        t.notify_hook = lambda i: os.eventfd_write(efd, 1 << (8 * i))
        drv = MmioDriver(t, mem)
        drv.probe()
        os.eventfd_read(efd)  # the DRIVER_OK scan of both queues
        drv.submit(1, [b"evt"], [8])
        assert os.eventfd_read(efd) == 1 << 8
        assert drv.used(1) == []  # nothing processed until the event loop runs it
        t.queue_event(1)
        assert drv.used(1)[0][2][0][:3] == b"evt"
    finally:
        os.close(efd)


def test_notification_data_decoded():
    """#10: with NOTIFICATION_DATA the value carries index, next offset and wrap."""
    assert decode_notification(3, False) == (3, None, None)
    value = 1 | (0x1234 << 16) | (1 << 31)
    assert decode_notification(value, True) == (1, 0x1234, 1)


def test_notification_data_negotiated_kicks_still_work(mem):
    dev, t, _ = make(mem, notification_data=True)
    drv = MmioDriver(t, mem)
    drv.probe()
    assert dev.has_feature(spec.VIRTIO_F_NOTIFICATION_DATA)
    for i in range(3):
        drv.submit(0, [bytes([i])], [4])
    assert [u[2][0][:1] for u in drv.used(0)] == [b"\0", b"\1", b"\2"]


def test_config_change_bumps_generation_and_raises_config_interrupt(mem):
    """#11: a config change bumps ConfigGeneration and sets InterruptStatus bit 1."""
    dev, t, irqs = make(mem)
    drv = MmioDriver(t, mem)
    drv.probe()
    gen = t.read(spec.CONFIG_GENERATION, 4)
    n = len(irqs)
    dev.set_config("capacity", 4096)
    assert t.read(spec.CONFIG_GENERATION, 4) == gen + 1
    assert t.read(spec.INTERRUPT_STATUS, 4) & spec.VIRTIO_MMIO_INT_CONFIG
    assert len(irqs) == n + 1
    assert drv.interrupt() & spec.VIRTIO_MMIO_INT_CONFIG
    assert t.read(spec.INTERRUPT_STATUS, 4) == 0
    assert drv.read_config(0, 8) == 4096


def test_shm_registers_read_all_ones_without_region(mem):
    """#12: SHMLen/SHMBase read as all ones (-1) when the region does not exist."""
    _, t, _ = make(mem)
    for reg in (spec.SHM_LEN_LOW, spec.SHM_LEN_HIGH, spec.SHM_BASE_LOW, spec.SHM_BASE_HIGH):
        assert t.read(reg, 4) == 0xFFFFFFFF
    _, t2, _ = make(mem, shm_regions=((0x1_2345_6000, 0x2_0000_0000),))
    t2.write(spec.SHM_SEL, 4, 0)
    assert t2.read(spec.SHM_LEN_LOW, 4) == 0 and t2.read(spec.SHM_LEN_HIGH, 4) == 2
    assert t2.read(spec.SHM_BASE_LOW, 4) == 0x2345_6000 and t2.read(spec.SHM_BASE_HIGH, 4) == 1
    t2.write(spec.SHM_SEL, 4, 1)
    assert t2.read(spec.SHM_LEN_LOW, 4) == 0xFFFFFFFF


def test_legacy_mode_probe_uses_pfn_and_page_size(mem):
    """#12: version 1 (legacy) register set: GuestPageSize, QueuePFN, QueueAlign."""
    dev, t, _ = make(mem, legacy=True)
    assert t.read(spec.VERSION, 4) == 1
    drv = MmioDriver(t, mem)
    features = drv.probe()
    assert not features >> 32  # no feature words beyond 0 on legacy
    assert t.read(spec.CONFIG_GENERATION, 4) == 0
    t.write(spec.QUEUE_SEL, 4, 0)
    assert t.read(spec.QUEUE_PFN, 4) == drv.rings[0].desc_addr // 4096
    drv.submit(0, [b"legacy"], [8])
    assert drv.used(0)[0][2][0][:6] == b"legacy"
    drv.remove()
    assert t.read(spec.QUEUE_PFN, 4) == 0
    assert not dev.active


def test_bad_accesses_are_logged_rate_limited(mem, caplog):
    """#13: a guest hammering an unknown register cannot flood the host log."""
    _, t, _ = make(mem)
    with caplog.at_level(logging.DEBUG, logger="embervm"):
        for _ in range(1000):
            t.read(0x018, 4)
            t.write(0x0C4, 4, 1)
    lines = [r for r in caplog.records if "0x18" in r.getMessage() or "0xc4" in r.getMessage()]
    assert 2 <= len(lines) <= 2 * 11  # 1, 2, 4, ..., 512 per cause
    assert any("seen 512 times" in r.getMessage() for r in lines)


def test_used_ring_index_wraps_past_65535(mem):
    """Ring-index wrap (queue.rs bug): requests keep flowing past 2**16 on a small queue."""
    dev, t, _ = make(mem, Rng())
    drv = MmioDriver(t, mem)
    drv.probe(queue_sizes=[8])
    total = 0
    for _ in range(70_000):
        drv.submit(0, [], [4], kick=True)
        used = drv.used(0)
        assert len(used) == 1 and used[0][1] == 4
        total += 1
    assert total == 70_000
    assert drv.rings[0].used_idx == 70_000 & 0xFFFF
