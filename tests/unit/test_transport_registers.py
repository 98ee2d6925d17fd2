"""Register-level corner cases of the MMIO transport that a driver can hit (virtio.md §1.3)."""

from __future__ import annotations

import pytest

from embervm.devices.virtio import spec
from embervm.devices.virtio.mmio import MmioTransport
from embervm.devices.virtio.rng import Rng
from embervm.memory import GuestMemory
from embervm.testing.driver import MmioDriver

VERSION_1 = spec.bit(spec.VIRTIO_F_VERSION_1)


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory([(0, 1 << 20)])


def started(mem, **kw):
    rng = Rng()
    t = MmioTransport(rng, mem, **kw)
    drv = MmioDriver(t, mem)
    drv.probe()
    return rng, t, drv


def test_absent_queue_reads_zero_and_ignores_writes(mem):
    _, t, _ = started(mem)
    t.write(spec.QUEUE_SEL, 4, 5)
    assert t.read(spec.QUEUE_NUM_MAX, 4) == 0
    assert t.read(spec.QUEUE_READY, 4) == 0
    t.write(spec.QUEUE_NUM, 4, 8)  # ignored, logged
    t.write(spec.QUEUE_NOTIFY, 4, 5)  # notify for an absent queue: ignored
    assert t.read(spec.STATUS, 4) & spec.STATUS_DRIVER_OK


def test_legacy_only_registers_do_not_exist_on_modern(mem):
    _, t, _ = started(mem)
    t.write(spec.QUEUE_SEL, 4, 0)
    t.write(spec.STATUS, 4, 0)
    t.write(spec.QUEUE_ALIGN, 4, 4096)
    t.write(spec.QUEUE_PFN, 4, 1)
    t.write(spec.GUEST_PAGE_SIZE, 4, 4096)
    assert t.read(spec.QUEUE_PFN, 4) == 0
    assert t.queue_configs[0].desc_addr == 0


def test_legacy_page_size_must_be_a_power_of_two(mem):
    t = MmioTransport(Rng(), mem, legacy=True)
    t.write(spec.GUEST_PAGE_SIZE, 4, 3000)
    assert t.guest_page_size == 4096
    t.write(spec.GUEST_PAGE_SIZE, 4, 8192)
    assert t.guest_page_size == 8192


def test_legacy_queue_size_not_power_of_two_needs_reset(mem):
    rng = Rng()
    t = MmioTransport(rng, mem, legacy=True)
    drv = MmioDriver(t, mem)
    drv.probe(nqueues=0)
    drv.remove()
    drv.wr(spec.STATUS, 3)
    drv.wr(spec.QUEUE_SEL, 0)
    drv.wr(spec.QUEUE_NUM, 12)
    drv.wr(spec.QUEUE_ALIGN, 4096)
    drv.wr(spec.QUEUE_PFN, 0x10)
    drv.add_status(spec.STATUS_DRIVER_OK)
    assert not rng.active
    assert t.read(spec.STATUS, 4) & spec.STATUS_DEVICE_NEEDS_RESET


def test_driver_features_after_features_ok_are_ignored(mem):
    rng, t, _ = started(mem)
    acked = rng.acked_features
    t.write(spec.DRIVER_FEATURES_SEL, 4, 0)
    t.write(spec.DRIVER_FEATURES, 4, 0)
    t.write(spec.DRIVER_FEATURES_SEL, 4, 2)
    t.write(spec.DRIVER_FEATURES, 4, 1)
    assert rng.acked_features == acked


def test_feature_words_beyond_64_bits(mem):
    t = MmioTransport(Rng(), mem)
    t.write(spec.DEVICE_FEATURES_SEL, 4, 2)
    assert t.read(spec.DEVICE_FEATURES, 4) == 0
    t.write(spec.STATUS, 4, 1)
    t.write(spec.STATUS, 4, 3)
    t.write(spec.DRIVER_FEATURES_SEL, 4, 3)
    t.write(spec.DRIVER_FEATURES, 4, 0xFFFF)  # ignored
    assert t.driver_features == 0


def test_features_ok_before_driver_is_refused(mem):
    t = MmioTransport(Rng(), mem)
    t.write(spec.STATUS, 4, 1)
    t.write(spec.STATUS, 4, 1 | spec.STATUS_FEATURES_OK)
    assert t.read(spec.STATUS, 4) == 1


def test_features_ok_does_not_exist_on_legacy(mem):
    t = MmioTransport(Rng(), mem, legacy=True)
    t.write(spec.STATUS, 4, 3)
    t.write(spec.STATUS, 4, 3 | spec.STATUS_FEATURES_OK)
    assert t.read(spec.STATUS, 4) == 3


def test_driver_may_not_set_device_status_bits(mem):
    t = MmioTransport(Rng(), mem)
    t.write(spec.STATUS, 4, 1 | spec.STATUS_DEVICE_NEEDS_RESET)
    assert t.read(spec.STATUS, 4) == 1


def test_queue_ready_zero_detaches_a_live_queue(mem):
    rng, t, drv = started(mem)
    t.write(spec.QUEUE_SEL, 4, 0)
    t.write(spec.QUEUE_READY, 4, 0)
    assert rng.queues[0] is None
    drv.submit(0, [], [8])
    assert drv.used(0) == []
    assert rng.active


def test_reenabling_a_queue_with_a_bad_layout_is_refused(mem):
    accept = VERSION_1 | spec.bit(spec.VIRTIO_F_RING_RESET)
    rng, t, drv = started(mem)
    drv.remove()
    drv.probe(accept=accept)
    t.write(spec.QUEUE_SEL, 4, 0)
    t.write(spec.QUEUE_RESET, 4, 1)
    t.write(spec.QUEUE_NUM, 4, 7)  # not a power of two
    t.write(spec.QUEUE_DESC_LOW, 4, 0x1000)
    t.write(spec.QUEUE_READY, 4, 1)
    assert t.read(spec.QUEUE_READY, 4) == 0
    assert rng.queues[0] is None


def test_legacy_queue_attached_after_driver_ok(mem):
    rng = Rng()
    t = MmioTransport(rng, mem, legacy=True)
    drv = MmioDriver(t, mem)
    drv.probe(nqueues=0)
    assert rng.active and rng.queues == [None]
    drv.rings = [drv.setup_queue(0, 16)]
    assert rng.queues[0] is not None
    drv.submit(0, [], [8])
    assert len(drv.used(0)) == 1
    # a PFN pointing outside RAM is refused and reads back 0
    t.write(spec.QUEUE_SEL, 4, 0)
    t.write(spec.QUEUE_PFN, 4, 0)
    t.write(spec.QUEUE_PFN, 4, 0xFFFFF)
    assert t.read(spec.QUEUE_PFN, 4) == 0


def test_write_only_registers_read_zero(mem):
    _, t, _ = started(mem)
    for reg in (spec.QUEUE_NOTIFY, spec.INTERRUPT_ACK, spec.QUEUE_SEL, spec.DRIVER_FEATURES):
        assert t.read(reg, 4) == 0
    assert t.read(0x0C4, 4) == 0


def test_config_access_widths_and_early_writes(mem):
    t = MmioTransport(Rng(), mem)
    assert t.read(spec.CONFIG, 3) == 0
    t.write(spec.CONFIG, 3, 1)
    t.write(spec.CONFIG, 4, 1)  # before DRIVER: ignored
    assert t.activated is False
