"""MMIO exits outside guest RAM, and ioeventfds that absorb matching writes inside KVM."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from embervm.kvm import ioctls as k

pytestmark = pytest.mark.kvm

GuestFactory = Callable[..., Any]  # the make_guest fixture (tests/kvm/conftest.py)

# Flat 32-bit protected-mode code (.code32), hand-assembled. 0xd0000000 is in the x86 MMIO gap:
# no memory slot there, so every access exits to user space.
MMIO_WRITES = bytes.fromhex(
    "c7 05 00 00 00 d0 78 56 34 12"  # mov dword [0xd0000000], 0x12345678
    "66 c7 05 10 00 00 d0 ef be"  # mov word [0xd0000010], 0xbeef
    "c6 05 20 00 00 d0 ab"  # mov byte [0xd0000020], 0xab
    "f4"  # hlt
)
MMIO_READS = bytes.fromhex(
    "8b 1d 04 00 00 d0"  # mov ebx, [0xd0000004]
    "89 1d 00 20 00 00"  # mov [0x2000], ebx
    "0f b7 1d 08 00 00 d0"  # movzx ebx, word [0xd0000008]
    "89 1d 04 20 00 00"  # mov [0x2004], ebx
    "f4"  # hlt
)
NOTIFY_WRITES = bytes.fromhex(
    "c7 05 50 00 00 d0 07 00 00 00"  # mov dword [0xd0000050], 7
    "c7 05 50 00 00 d0 08 00 00 00"  # mov dword [0xd0000050], 8
    "66 ba 10 05"  # mov dx, 0x510
    "66 b8 2a 00"  # mov ax, 0x2a
    "66 ef"  # out dx, ax
    "f4"  # hlt
)
# 64-bit long mode (.code64): 8-byte accesses, which only long mode makes with plain `mov`.
MMIO_QWORDS = bytes.fromhex(
    "48 b8 88 77 66 55 44 33 22 11"  # mov rax, 0x1122334455667788
    "48 a3 00 00 00 d0 00 00 00 00"  # mov [0xd0000000], rax
    "48 a1 08 00 00 d0 00 00 00 00"  # mov rax, [0xd0000008]
    "48 89 04 25 00 20 00 00"  # mov [0x2000], rax
    "f4"  # hlt
)
NOTIFY_ADDR = 0xD000_0050
NOTIFY_PORT = 0x510


@pytest.fixture
def eventfd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def eventfd_count(fd: int) -> int:
    """Read (and reset) an eventfd counter; 0 when it was never signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_mmio_writes_report_address_width_and_value(make_guest: GuestFactory) -> None:
    guest = make_guest(MMIO_WRITES, mode="flat32")
    for expected in (
        (0xD000_0000, 0x12345678, 4, True),
        (0xD000_0010, 0xBEEF, 2, True),
        (0xD000_0020, 0xAB, 1, True),
    ):
        guest.run_expect(k.KVM_EXIT_MMIO)
        assert guest.vcpu.mmio_exit() == expected
    guest.run_expect(k.KVM_EXIT_HLT)


def test_mmio_read_returns_the_value_set_by_the_vmm(make_guest: GuestFactory) -> None:
    guest = make_guest(MMIO_READS, mode="flat32")
    vcpu = guest.vcpu

    guest.run_expect(k.KVM_EXIT_MMIO)
    addr, _, length, is_write = vcpu.mmio_exit()
    assert (addr, length, is_write) == (0xD000_0004, 4, False)
    vcpu.set_mmio_data(0xCAFEF00D, 4)

    guest.run_expect(k.KVM_EXIT_MMIO)
    addr, _, length, is_write = vcpu.mmio_exit()
    assert (addr, length, is_write) == (0xD000_0008, 2, False)
    # Only `length` bytes reach the guest, whatever the VMM passes.
    vcpu.set_mmio_data(0x1234_5678, 2)

    guest.run_expect(k.KVM_EXIT_HLT)
    assert guest.mem.read_u32(guest.DATA) == 0xCAFEF00D
    assert guest.mem.read_u32(guest.DATA + 4) == 0x5678


def test_eight_byte_mmio_from_long_mode_round_trips(make_guest: GuestFactory) -> None:
    guest = make_guest(MMIO_QWORDS, mode="long64")
    guest.run_expect(k.KVM_EXIT_MMIO)
    assert guest.vcpu.mmio_exit() == (0xD000_0000, 0x1122_3344_5566_7788, 8, True)
    guest.run_expect(k.KVM_EXIT_MMIO)
    addr, _, length, is_write = guest.vcpu.mmio_exit()
    assert (addr, length, is_write) == (0xD000_0008, 8, False)
    guest.vcpu.set_mmio_data(0xFEDC_BA98_7654_3210, 8)
    guest.run_expect(k.KVM_EXIT_HLT)
    assert guest.mem.read_u64(guest.DATA) == 0xFEDC_BA98_7654_3210


def test_set_mmio_data_rejects_impossible_lengths(make_guest: GuestFactory) -> None:
    guest = make_guest(MMIO_READS, mode="flat32")
    for length in (0, 9):
        with pytest.raises(ValueError):
            guest.vcpu.set_mmio_data(0, length)


def test_mmio_ioeventfd_absorbs_the_matching_write_and_exits_for_others(
    make_guest: GuestFactory, eventfd: int
) -> None:
    guest = make_guest(NOTIFY_WRITES, mode="flat32")
    guest.vm.ioeventfd(eventfd, NOTIFY_ADDR, 4, datamatch=7)

    # The write of 7 is handled inside KVM: the first exit is already the write of 8.
    guest.run_expect(k.KVM_EXIT_MMIO)
    assert guest.vcpu.mmio_exit() == (NOTIFY_ADDR, 8, 4, True)
    assert eventfd_count(eventfd) == 1


def test_pio_ioeventfd_absorbs_the_matching_port_write(
    make_guest: GuestFactory, eventfd: int
) -> None:
    guest = make_guest(NOTIFY_WRITES, mode="flat32")
    guest.vm.ioeventfd(eventfd, NOTIFY_PORT, 2, datamatch=0x2A, pio=True)

    for value in (7, 8):
        guest.run_expect(k.KVM_EXIT_MMIO)
        assert guest.vcpu.mmio_exit() == (NOTIFY_ADDR, value, 4, True)
    guest.run_expect(k.KVM_EXIT_HLT)  # no exit for the `out`
    assert eventfd_count(eventfd) == 1


def test_deassigned_ioeventfd_lets_writes_exit_again(
    make_guest: GuestFactory, eventfd: int
) -> None:
    guest = make_guest(NOTIFY_WRITES, mode="flat32")
    guest.vm.ioeventfd(eventfd, NOTIFY_ADDR, 4, datamatch=7)
    guest.vm.ioeventfd(eventfd, NOTIFY_ADDR, 4, datamatch=7, deassign=True)

    guest.run_expect(k.KVM_EXIT_MMIO)
    assert guest.vcpu.mmio_exit() == (NOTIFY_ADDR, 7, 4, True)
    assert eventfd_count(eventfd) == 0


def test_ioeventfd_rejects_lengths_kvm_cannot_match(
    make_guest: GuestFactory, eventfd: int
) -> None:
    guest = make_guest(NOTIFY_WRITES, mode="flat32")
    with pytest.raises(ValueError):
        guest.vm.ioeventfd(eventfd, NOTIFY_ADDR, 3)
    with pytest.raises(ValueError):
        guest.vm.ioeventfd(eventfd, NOTIFY_ADDR, 0, datamatch=1)
