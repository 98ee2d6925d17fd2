"""Probe / activate / reset cycles through the Linux-like driver kit, over every transport and
ring flavour: legacy and modern, split and packed, direct and indirect, EVENT_IDX."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embervm.devices.virtio import spec
from embervm.devices.virtio.mmio import MmioTransport
from embervm.devices.virtio.rng import Rng
from embervm.memory import GuestMemory
from embervm.testing.driver import MmioDriver
from embervm.testing.fuzz import fuzz_transport_once
from embervm.testing.rings import DriverPackedRing, DriverSplitRing

FLAVOURS = [
    pytest.param(dict(legacy=True), False, id="legacy-split"),
    pytest.param(dict(), False, id="modern-split"),
    pytest.param(dict(), True, id="modern-split-indirect"),
    pytest.param(dict(packed=True), False, id="modern-packed"),
    pytest.param(dict(packed=True), True, id="modern-packed-indirect"),
]


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory([(0, 2 << 20)])


@pytest.mark.parametrize("kw, indirect", FLAVOURS)
def test_rng_probe_activate_reset_cycles(mem, kw, indirect):
    """Four full driver lifetimes on one device; each fills buffers with fresh entropy."""
    rng = Rng()
    irqs = []
    t = MmioTransport(rng, mem, interrupt=lambda: irqs.append(1), **kw)
    seen = set()
    for _cycle in range(4):
        drv = MmioDriver(t, mem)
        features = drv.probe()
        assert drv.has(spec.VIRTIO_F_RING_PACKED) == bool(kw.get("packed"))
        assert bool(features >> spec.VIRTIO_F_VERSION_1 & 1) != bool(kw.get("legacy"))
        ring_type = DriverPackedRing if kw.get("packed") else DriverSplitRing
        assert isinstance(drv.rings[0], ring_type)
        tokens = [drv.submit(0, [], [64], indirect=indirect) for _ in range(3)]
        if indirect:
            tokens.append(drv.submit(0, [], [16, 16, 32], indirect=True))
        used = drv.used(0)
        assert sorted(u[0] for u in used) == sorted(tokens)
        for _, length, bufs in used:
            assert length == sum(len(b) for b in bufs)
            blob = b"".join(bufs)
            assert blob != bytes(len(blob))
            seen.add(blob)
        assert drv.interrupt() & spec.VIRTIO_MMIO_INT_VRING
        drv.remove()
        assert not rng.active
    assert len(seen) >= 12  # never repeating
    assert rng.metrics["activations"] == 4


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_event_idx_suppresses_interrupts_until_used_event(mem, packed):
    """Device→driver: with EVENT_IDX the device interrupts only when used_event is crossed."""
    irqs = []
    t = MmioTransport(Rng(), mem, interrupt=lambda: irqs.append(1), packed=packed)
    drv = MmioDriver(t, mem)
    drv.probe()
    assert drv.has(spec.VIRTIO_F_EVENT_IDX)
    ring = drv.rings[0]
    # Ask to be interrupted only after the 4th completion from now.
    if packed:
        ring.set_event(spec.RING_EVENT_FLAGS_DESC, off_wrap=(ring.used_idx + 3) | (1 << 15))
    else:
        ring.set_used_event((ring.used_idx + 3) & 0xFFFF)
    n0 = len(irqs)
    for i in range(3):
        drv.submit(0, [], [8])
        assert len(irqs) == n0, f"interrupt after completion {i + 1}"
    drv.submit(0, [], [8])
    assert len(irqs) == n0 + 1
    assert len(drv.used(0)) == 4


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_event_idx_suppresses_kicks_until_avail_event(mem, packed):
    """Driver→device: the device publishes the avail index it wants a kick at."""
    t = MmioTransport(Rng(), mem, packed=packed)
    drv = MmioDriver(t, mem)
    drv.probe()
    kicks = []
    t.notify_hook = lambda i: kicks.append(i)  # record kicks without processing them
    drv.submit(0, [], [8])
    assert kicks == [0]  # the device is idle and asked for the next kick
    drv.submit(0, [], [8])  # the device has not run since: no new kick wanted
    assert kicks == [0]
    t.queue_event(0)  # the device drains both and re-arms
    assert len(drv.used(0)) == 2
    drv.submit(0, [], [8])
    assert kicks == [0, 0]


def test_no_interrupt_flag_suppresses_without_event_idx(mem):
    irqs = []
    t = MmioTransport(Rng(), mem, interrupt=lambda: irqs.append(1))
    drv = MmioDriver(t, mem)
    drv.probe(accept=spec.bit(spec.VIRTIO_F_VERSION_1))
    drv.rings[0].set_no_interrupt(True)
    drv.submit(0, [], [8])
    assert irqs == [] and len(drv.used(0)) == 1
    drv.rings[0].set_no_interrupt(False)
    drv.submit(0, [], [8])
    assert irqs == [1]


def test_buffers_posted_before_driver_ok_are_processed(mem):
    """virtio.md §2.3: a driver may post buffers before DRIVER_OK."""
    rng = Rng()
    t = MmioTransport(rng, mem)
    drv = MmioDriver(t, mem)
    drv.probe(nqueues=0)
    drv.remove()
    drv.wr(spec.STATUS, 3)
    drv.write_features(spec.bit(spec.VIRTIO_F_VERSION_1))
    drv.add_status(spec.STATUS_FEATURES_OK)
    drv.features = spec.bit(spec.VIRTIO_F_VERSION_1)
    drv.rings = [drv.setup_queue(0, 16)]
    drv.submit(0, [], [32], kick=False)
    assert drv.used(0) == []
    drv.add_status(spec.STATUS_DRIVER_OK)
    assert len(drv.used(0)) == 1


def test_rng_bounds_one_fill_and_counts_bytes(mem):
    calls = []

    def source(n):
        calls.append(n)
        return os.urandom(n)

    rng = Rng(source=source)
    t = MmioTransport(rng, mem)
    drv = MmioDriver(t, mem)
    drv.probe()
    drv.submit(0, [], [100])
    # §5.4.6: the driver must place only device-writable buffers; as Firecracker, a chain with
    # a readable part is returned unfilled.
    drv.submit(0, [b"readable part"], [10])
    lens = [u[1] for u in drv.used(0)]
    assert lens == [100, 0]
    assert calls == [100]
    assert rng.metrics["entropy_bytes"] == 100


def test_rng_completes_a_chain_without_writable_space_with_zero(mem):
    rng = Rng()
    t = MmioTransport(rng, mem)
    drv = MmioDriver(t, mem)
    drv.probe()
    drv.submit(0, [b"only readable"], [])
    assert [u[1] for u in drv.used(0)] == [0]
    assert rng.active


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=2, max_size=1500))
def test_hostile_register_traffic_never_raises(data):
    """Arbitrary register accesses of any width, plus ring scribbles: nothing escapes."""
    fuzz_transport_once(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0xFFF), st.sampled_from([1, 2, 3, 4, 8]),
                          st.integers(0, 2**32 - 1)), max_size=60))
def test_hostile_writes_anywhere_in_the_window_never_raise(ops):
    mem = GuestMemory([(0, 1 << 16)])
    t = MmioTransport(Rng(), mem)
    MmioDriver(t, mem).probe()
    for offset, width, value in ops:
        t.write(offset, width, value)
        t.read(offset, width)
    assert t.read(spec.MAGIC_VALUE, 4) == spec.MMIO_MAGIC
