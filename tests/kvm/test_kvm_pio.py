"""Port I/O exits: what run() and io_exit() report, and data passed both ways in place."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from embervm.kvm import EXIT_INTR
from embervm.kvm import ioctls as k

GuestFactory = Callable[..., Any]  # the make_guest fixture (tests/kvm/conftest.py)

pytestmark = pytest.mark.kvm

# Real-mode code (.code16), hand-assembled.
OUT_BYTE = bytes.fromhex(
    "b0 5a"  # mov al, 0x5a
    "e6 10"  # out 0x10, al
    "f4"  # hlt
)
OUT_WORD_DWORD = bytes.fromhex(
    "ba f8 03"  # mov dx, 0x3f8
    "b8 ef be"  # mov ax, 0xbeef
    "ef"  # out dx, ax
    "66 b8 ef be ad de"  # mov eax, 0xdeadbeef
    "66 ef"  # out dx, eax
    "f4"  # hlt
)
IN_THEN_ECHO = bytes.fromhex(
    "e4 10"  # in al, 0x10
    "e6 11"  # out 0x11, al
    "ba 10 00"  # mov dx, 0x10
    "66 ed"  # in eax, dx
    "66 a3 00 20"  # mov [0x2000], eax
    "f4"  # hlt
)
REP_OUTSB = bytes.fromhex(
    "be 00 20"  # mov si, 0x2000
    "b9 06 00"  # mov cx, 6
    "ba 10 00"  # mov dx, 0x10
    "fc"  # cld
    "f3 6e"  # rep outsb
    "f4"  # hlt
)
OUT_LOOP_20000 = bytes.fromhex(
    "b9 20 4e"  # mov cx, 20000
    "e6 10"  # 1: out 0x10, al
    "e2 fc"  # loop 1b
    "f4"  # hlt
)


def test_out_byte_reports_direction_size_port_and_value(make_guest: GuestFactory) -> None:
    guest = make_guest(OUT_BYTE)
    assert guest.run() == k.KVM_EXIT_IO
    direction, size, port, count, offset = guest.vcpu.io_exit()
    assert (direction, size, port, count) == (k.KVM_EXIT_IO_OUT, 1, 0x10, 1)
    assert guest.vcpu.run_mmap[offset] == 0x5A
    guest.run_expect(k.KVM_EXIT_HLT)


def test_out_word_and_dword_report_their_size_and_little_endian_value(
    make_guest: GuestFactory,
) -> None:
    guest = make_guest(OUT_WORD_DWORD)
    assert guest.expect_out() == (0x3F8, 2, 0xBEEF)
    assert guest.expect_out() == (0x3F8, 4, 0xDEADBEEF)
    guest.run_expect(k.KVM_EXIT_HLT)


def test_in_value_written_at_data_offset_reaches_the_guest(make_guest: GuestFactory) -> None:
    guest = make_guest(IN_THEN_ECHO)
    vcpu = guest.vcpu

    guest.run_expect(k.KVM_EXIT_IO)
    direction, size, port, count, offset = vcpu.io_exit()
    assert (direction, size, port, count) == (k.KVM_EXIT_IO_IN, 1, 0x10, 1)
    vcpu.run_mmap[offset] = 0xC3
    assert guest.expect_out() == (0x11, 1, 0xC3)

    guest.run_expect(k.KVM_EXIT_IO)
    direction, size, port, count, offset = vcpu.io_exit()
    assert (direction, size, port, count) == (k.KVM_EXIT_IO_IN, 4, 0x10, 1)
    vcpu.run_mmap[offset : offset + 4] = (0x8BADF00D).to_bytes(4, "little")
    guest.run_expect(k.KVM_EXIT_HLT)
    assert guest.mem.read_u32(guest.DATA) == 0x8BADF00D


def test_string_out_data_is_size_times_count_bytes_at_data_offset(
    make_guest: GuestFactory,
) -> None:
    # KVM may batch a `rep outsb` into one exit (count > 1) or split it; either way the bytes
    # at data_offset, size * count of them per exit, are the string in order.
    guest = make_guest(REP_OUTSB)
    guest.mem.write(guest.DATA, b"ember!")
    received = b""
    for _ in range(6):
        guest.run_expect(k.KVM_EXIT_IO)
        direction, size, port, count, offset = guest.vcpu.io_exit()
        assert (direction, size, port) == (k.KVM_EXIT_IO_OUT, 1, 0x10)
        assert count >= 1
        received += guest.vcpu.run_mmap[offset : offset + size * count]
        if len(received) >= 6:
            break
    assert received == b"ember!"
    guest.run_expect(k.KVM_EXIT_HLT)


def test_twenty_thousand_pio_exits_are_all_delivered(make_guest: GuestFactory) -> None:
    """Also the measurement of the run()+io_exit() round trip (printed, not asserted: the
    host is shared and PVM exit costs vary)."""
    guest = make_guest(OUT_LOOP_20000)
    vcpu = guest.vcpu
    run, io_exit = vcpu.run, vcpu.io_exit
    exits = 0
    # A kick ends the loop (run() returns EXIT_INTR) if the guest stops exiting.
    watchdog = threading.Timer(guest.WATCHDOG_SECONDS, vcpu.kick)
    watchdog.start()
    start = time.perf_counter()
    try:
        # Bounded by the guest's own loop count; a stray exit ends it and fails below.
        while exits <= 20_000:
            reason = run()
            if reason != k.KVM_EXIT_IO:
                break
            io_exit()
            exits += 1
        elapsed = time.perf_counter() - start
    finally:
        watchdog.cancel()
        watchdog.join()
    assert reason != EXIT_INTR, f"the guest stopped exiting after {exits} exits"
    assert exits == 20_000
    assert reason == k.KVM_EXIT_HLT
    print(f"\nPIO exit round trip: {elapsed / exits * 1e6:.2f} us per run()+io_exit() "
          f"({exits} exits in {elapsed:.3f} s)")  # fmt: skip
