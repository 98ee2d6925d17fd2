"""InterruptStatus / InterruptACK: per-bit state, and no wait for the device lock.

The guest's interrupt handler reads InterruptStatus and writes InterruptACK on a vCPU thread for
every virtio interrupt; queue work (a disk read) holds the device lock on the event-loop thread.
The two registers must not wait for it.
"""

from __future__ import annotations

import threading

from embervm.devices.virtio import spec
from embervm.devices.virtio.device import Interrupt
from embervm.devices.virtio.mmio import MmioTransport
from embervm.devices.virtio.rng import Rng
from embervm.memory import GuestMemory

JOIN_SECONDS = 10.0
VRING, CONFIG = spec.VIRTIO_MMIO_INT_VRING, spec.VIRTIO_MMIO_INT_CONFIG


def test_ack_clears_only_the_acknowledged_bits() -> None:
    raised: list[int] = []
    irq = Interrupt(lambda: raised.append(1))
    irq.signal_used()
    irq.signal_config()
    assert irq.status == VRING | CONFIG
    irq.ack(VRING)
    assert irq.status == CONFIG
    irq.signal_used()  # a new notification after the ack sets the bit again
    irq.ack(CONFIG)
    assert irq.status == VRING
    irq.ack(0xFFFF_FFFC)  # bits that do not exist clear nothing
    assert irq.status == VRING
    assert len(raised) == irq.count == 3  # every notification is an edge


def test_interrupt_registers_do_not_wait_for_queue_work() -> None:
    mem = GuestMemory([(0, 1 << 16)])
    device = Rng()
    transport = MmioTransport(device, mem)
    transport.interrupt.signal_used()
    holding, release = threading.Event(), threading.Event()

    def queue_work() -> None:  # what the event loop does while it processes a queue
        with device.lock:
            holding.set()
            release.wait(JOIN_SECONDS)

    worker = threading.Thread(target=queue_work)
    worker.start()
    try:
        assert holding.wait(JOIN_SECONDS)
        seen: list[int] = []
        handler = threading.Thread(target=lambda: (
            seen.append(transport.read(spec.INTERRUPT_STATUS, 4)),
            transport.write(spec.INTERRUPT_ACK, 4, VRING),
            seen.append(transport.read(spec.INTERRUPT_STATUS, 4)),
        ))
        handler.start()
        handler.join(JOIN_SECONDS)
        assert not handler.is_alive(), "InterruptStatus/ACK waited for the device lock"
        assert seen == [VRING, 0]
    finally:
        release.set()
        worker.join(JOIN_SECONDS)


def test_interrupt_registers_keep_their_width_rule() -> None:
    mem = GuestMemory([(0, 1 << 16)])
    transport = MmioTransport(Rng(), mem)
    transport.interrupt.signal_used()
    assert transport.read(spec.INTERRUPT_STATUS, 2) == 0  # registers are 32-bit only
    transport.write(spec.INTERRUPT_ACK, 2, VRING)
    assert transport.read(spec.INTERRUPT_STATUS, 4) == VRING
