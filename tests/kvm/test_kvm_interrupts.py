"""Interrupts through the in-kernel irqchip: irqfd and KVM_IRQ_LINE reach a real-mode handler.

The guest programs the in-kernel 8259 PIC (vector base 0x20, only IRQ 5 unmasked), puts its
handler in the real-mode IVT, reports "ready" with ``out 0x10, 1``, then waits with
``sti; hlt``.  With the irqchip, HLT is handled inside KVM (the vCPU sleeps in KVM_RUN), so the
only way to the next exit is the handler's ``out 0x10, 0x99``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from embervm.kvm import Vcpu
from embervm.kvm import ioctls as k

pytestmark = pytest.mark.kvm

GuestFactory = Callable[..., Any]  # the make_guest fixture (tests/kvm/conftest.py)

IRQ = 5
READY = 0x01
HANDLED = 0x99

WAIT_FOR_IRQ5 = bytes.fromhex(
    "b0 11 e6 20"  # ICW1: edge-triggered, cascade, ICW4 follows  (out 0x20, 0x11)
    "b0 20 e6 21"  # ICW2: vector base 0x20                         (out 0x21, 0x20)
    "b0 04 e6 21"  # ICW3: slave on IRQ 2                           (out 0x21, 0x04)
    "b0 01 e6 21"  # ICW4: 8086 mode                                (out 0x21, 0x01)
    "b0 df e6 21"  # OCW1: mask everything but IRQ 5                (out 0x21, 0xdf)
    "c7 06 94 00 00 11"  # mov word [0x25*4], 0x1100  (IVT vector 0x25: offset)
    "c7 06 96 00 00 00"  # mov word [0x25*4+2], 0     (segment)
    "b0 01 e6 10"  # out 0x10, READY
    "fb"  # sti
    "f4"  # 1: hlt
    "eb fd"  # jmp 1b
)
HANDLER_ADDR = 0x1100
HANDLER = bytes.fromhex(
    "b0 99 e6 10"  # out 0x10, HANDLED
    "b0 20 e6 20"  # non-specific EOI to the master PIC
    "cf"  # iret
)


def waiting_guest(make_guest: GuestFactory) -> Any:
    guest = make_guest(WAIT_FOR_IRQ5, irqchip=True)
    guest.mem.write(HANDLER_ADDR, HANDLER)
    # LINT0 = ExtINT is what lets the PIC's output into the BSP's local APIC.
    guest.vcpu.set_lint()
    assert guest.expect_out() == (0x10, 1, READY)
    return guest


def test_irqfd_write_runs_the_guest_interrupt_handler(make_guest: GuestFactory) -> None:
    guest = waiting_guest(make_guest)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        guest.vm.irqfd(efd, IRQ)
        os.eventfd_write(efd, 1)
        assert guest.expect_out() == (0x10, 1, HANDLED)
        guest.vm.irqfd(efd, IRQ, deassign=True)
    finally:
        os.close(efd)


def test_irq_line_pulse_runs_the_guest_interrupt_handler(make_guest: GuestFactory) -> None:
    guest = waiting_guest(make_guest)
    guest.vm.irq_line(IRQ, 1)
    guest.vm.irq_line(IRQ, 0)
    assert guest.expect_out() == (0x10, 1, HANDLED)


def test_set_lint_makes_lint0_extint_and_lint1_nmi(make_guest: GuestFactory) -> None:
    guest = make_guest(WAIT_FOR_IRQ5, irqchip=True)
    vcpu: Vcpu = guest.vcpu
    # Start from Fixed delivery on both (KVM already makes the BSP's LINT0 ExtINT at reset).
    lapic = vcpu.get_lapic()
    for reg in (k.APIC_LVT0, k.APIC_LVT1):
        lapic.regs[reg + 1] &= ~0x07
    vcpu.set_lapic(lapic)
    vcpu.set_lint()
    regs = bytes(vcpu.get_lapic().regs)
    lvt0 = int.from_bytes(regs[k.APIC_LVT0 : k.APIC_LVT0 + 4], "little")
    lvt1 = int.from_bytes(regs[k.APIC_LVT1 : k.APIC_LVT1 + 4], "little")
    assert (lvt0 >> 8) & 0x7 == k.APIC_MODE_EXTINT
    assert (lvt1 >> 8) & 0x7 == k.APIC_MODE_NMI
