"""Fixtures for the KVM tests: one-vCPU VMs running a few hand-assembled instructions.

Tests marked ``kvm`` are skipped, with the reason, only when /dev/kvm is absent or unusable
(missing capability, no permission).  Guests start in real mode (CS base 0), in flat 32-bit
protected mode (a GDT at 0x500) or in 64-bit long mode (identity-mapped 2 MiB pages for low RAM
and for the MMIO window at 0xd0000000), with their code at ``Guest.CODE`` and a scratch data
area at ``Guest.DATA``.  Every KVM_RUN made through :meth:`Guest.run` has a watchdog that
kicks the vCPU, so a guest that never exits fails its test instead of hanging the run.

Test modules take everything through fixtures (``make_guest``, ``kvm``) and never import this
file: tests/e2e has a conftest.py too, and ``import conftest`` would pick either.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from embervm.errors import KvmError
from embervm.kvm import EXIT_INTR, Kvm, Segment, Vcpu, Vm, install_kick_handler
from embervm.kvm import ioctls as k
from embervm.memory import GuestMemory

CODE = 0x1000
DATA = 0x2000
GDT = 0x500
STACK_TOP = 0x8000
# long64 page tables: PML4 -> one PDPT -> a PD for 0..1 GiB and a PD for 3..4 GiB
PML4 = 0x9000
PDPT = 0xA000
PD_LOW = 0xB000
PD_GAP = 0xC000
MMIO_WINDOW = 0xD000_0000
RAM_SIZE = 0x10000
# Firecracker's addresses for the Intel real-mode helpers: just below the 4 GiB BIOS area.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
# Long enough for any of these guests on a loaded 2-core host (PVM emulates guest kernel code
# at ~0.3 us/instruction); only a broken guest or KVM ever gets near it.
WATCHDOG_SECONDS = 20.0

DEV_KVM = "/dev/kvm"


@functools.cache
def kvm_unusable_reason() -> str | None:
    """Why the kvm-marked tests cannot run here, or None if they can."""
    if not os.path.exists(DEV_KVM):
        return f"{DEV_KVM} does not exist on this host"
    try:
        with Kvm(DEV_KVM) as kvm:
            kvm.require_extensions()
    except KvmError as e:
        return str(e)
    return None


@pytest.fixture(autouse=True)
def _skip_without_kvm(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("kvm") is not None:
        reason = kvm_unusable_reason()
        if reason is not None:
            pytest.skip(reason)


@pytest.fixture(scope="session")
def kvm() -> Iterator[Kvm]:
    # Session fixtures are set up before the autouse skip above: skip here too.
    reason = kvm_unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    # Fixtures run in the main thread: the only place Python lets us install the handler.
    install_kick_handler()
    with Kvm(DEV_KVM) as handle:
        yield handle


def flat_segment(selector: int, type_: int) -> Segment:
    """A 4 GiB, base 0, 32-bit, present ring-0 segment (the descriptor the GDT also holds)."""
    return Segment(
        base=0, limit=0xFFFF_FFFF, selector=selector, type=type_, present=1, dpl=0, db=1, s=1,
        l=0, g=1,
    )  # fmt: skip


# GDT descriptors matching flat_segment(): null, code (0x08, type 0xb), data (0x10, type 0x3)
# with the accessed bit set, as KVM reports the loaded segments; 0x18 is the 64-bit code
# segment (L=1, D=0).
_GDT_ENTRIES = (0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF, 0x00AF_9B00_0000_FFFF)

_PTE_P, _PTE_RW, _PTE_PS = 1 << 0, 1 << 1, 1 << 7
_CR0_PE, _CR0_PG = 1 << 0, 1 << 31
_CR4_PAE = 1 << 5
_EFER_LME, _EFER_LMA = 1 << 8, 1 << 10


class Guest:
    """A VM with RAM at 0..RAM_SIZE and one vCPU about to execute ``code`` at CODE."""

    CODE = CODE
    DATA = DATA
    WATCHDOG_SECONDS = WATCHDOG_SECONDS

    def __init__(
        self, kvm: Kvm, code: bytes, *, mode: str, irqchip: bool, vcpu_index: int = 0
    ) -> None:
        self.vm: Vm = kvm.create_vm()
        self.mem = GuestMemory([(0, RAM_SIZE)])
        try:
            self.vm.set_tss_addr(TSS_ADDR)
            self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
            if irqchip:
                self.vm.create_irqchip()  # before the vCPU, so it gets a local APIC
            self.vm.register_memory(self.mem)
            self.mem.write(CODE, code)
            self.vcpu: Vcpu = self.vm.create_vcpu(vcpu_index)
            self._reset_registers(mode)
        except BaseException:
            self.close()
            raise

    def _reset_registers(self, mode: str) -> None:
        sregs = self.vcpu.get_sregs()
        if mode == "real":
            # Out of reset CS is f000:fff0 with base 0xffff0000; point it at 0000:CODE.
            sregs.cs.base = 0
            sregs.cs.selector = 0
        elif mode in ("flat32", "long64"):
            self.mem.write(GDT, struct.pack(f"<{len(_GDT_ENTRIES)}Q", *_GDT_ENTRIES))
            sregs.gdt.base = GDT
            sregs.gdt.limit = 8 * len(_GDT_ENTRIES) - 1
            sregs.cr0 |= _CR0_PE
            sregs.cs = flat_segment(0x08, 0xB)
            for name in ("ds", "es", "fs", "gs", "ss"):
                setattr(sregs, name, flat_segment(0x10, 0x3))
            if mode == "long64":
                self._identity_map()
                sregs.cr3 = PML4
                sregs.cr4 |= _CR4_PAE
                sregs.cr0 |= _CR0_PG
                sregs.efer |= _EFER_LME | _EFER_LMA
                sregs.cs = flat_segment(0x18, 0xB)
                sregs.cs.l, sregs.cs.db = 1, 0
        else:
            raise ValueError(mode)
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        regs.rip = CODE
        regs.rsp = STACK_TOP
        regs.rflags = 0x2  # bit 1 is reserved-as-one
        self.vcpu.set_regs(regs)

    def _identity_map(self) -> None:
        """2 MiB pages: guest-virtual = guest-physical for 0..2 MiB and the MMIO window."""
        table = _PTE_P | _PTE_RW
        self.mem.write_u64(PML4, PDPT | table)
        self.mem.write_u64(PDPT + 8 * 0, PD_LOW | table)
        self.mem.write_u64(PDPT + 8 * 3, PD_GAP | table)
        self.mem.write_u64(PD_LOW, 0 | table | _PTE_PS)
        gap_index = (MMIO_WINDOW - 0xC000_0000) >> 21
        self.mem.write_u64(PD_GAP + 8 * gap_index, MMIO_WINDOW | table | _PTE_PS)

    def run(self) -> int:
        """One KVM_RUN on this (the main) thread; fails the test if the guest does not exit
        within WATCHDOG_SECONDS."""
        self.vcpu.immediate_exit = 0
        watchdog = threading.Timer(WATCHDOG_SECONDS, self.vcpu.kick)
        watchdog.start()
        try:
            reason = self.vcpu.run()
        finally:
            watchdog.cancel()
            watchdog.join()
        if reason == EXIT_INTR:
            rip = self.vcpu.get_regs().rip
            pytest.fail(f"guest did not exit within {WATCHDOG_SECONDS} s (rip {rip:#x})")
        return reason

    def run_expect(self, expected: int) -> None:
        reason = self.run()
        if reason != expected:
            pytest.fail(
                f"expected {k.EXIT_REASON_NAMES[expected]}, got {self.vcpu.describe_exit(reason)}"
            )

    def expect_out(self) -> tuple[int, int, int]:
        """Run to the next port write; return (port, size, value)."""
        self.run_expect(k.KVM_EXIT_IO)
        direction, size, port, count, offset = self.vcpu.io_exit()
        assert (direction, count) == (k.KVM_EXIT_IO_OUT, 1)
        value = int.from_bytes(self.vcpu.run_mmap[offset : offset + size], "little")
        return port, size, value

    def close(self) -> None:
        self.vm.close()
        self.mem.close()


@pytest.fixture
def make_guest(kvm: Kvm) -> Iterator[Callable[..., Guest]]:
    """``make_guest(code, mode="real"|"flat32"|"long64", irqchip=False, vcpu_index=0)`` -> Guest,
    closed after the test."""
    guests: list[Guest] = []

    def factory(
        code: bytes, *, mode: str = "real", irqchip: bool = False, vcpu_index: int = 0
    ) -> Guest:
        guest = Guest(kvm, code, mode=mode, irqchip=irqchip, vcpu_index=vcpu_index)
        guests.append(guest)
        return guest

    yield factory
    for guest in guests:
        guest.close()
