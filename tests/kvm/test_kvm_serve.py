"""Vcpu.serve(): the inlined exit loop hands every PIO/MMIO exit to the handlers, both ways."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from embervm.kvm import EXIT_INTR
from embervm.kvm import ioctls as k

pytestmark = pytest.mark.kvm

GuestFactory = Callable[..., Any]  # the make_guest fixture (tests/kvm/conftest.py)
JOIN_SECONDS = 30.0

# Flat 32-bit code (.code32), assembled with GNU as.
MIXED_EXITS = bytes.fromhex(
    "b0 5a"  # mov al, 0x5a
    "e6 10"  # out 0x10, al
    "66 ba f8 03"  # mov dx, 0x3f8
    "66 b8 ef be"  # mov ax, 0xbeef
    "66 ef"  # out dx, ax
    "b8 ef be ad de"  # mov eax, 0xdeadbeef
    "ef"  # out dx, eax
    "e4 11"  # in al, 0x11
    "a2 00 20 00 00"  # mov [0x2000], al
    "66 ba 12 00"  # mov dx, 0x12
    "ed"  # in eax, dx
    "a3 04 20 00 00"  # mov [0x2004], eax
    "c7 05 00 00 00 d0 78 56 34 12"  # mov dword [0xd0000000], 0x12345678
    "8b 1d 04 00 00 d0"  # mov ebx, [0xd0000004]
    "89 1d 08 20 00 00"  # mov [0x2008], ebx
    "be 00 21 00 00"  # mov esi, 0x2100
    "b9 06 00 00 00"  # mov ecx, 6
    "66 ba 10 00"  # mov dx, 0x10
    "fc"  # cld
    "f3 6e"  # rep outsb
    "f4"  # hlt
)
SPIN = bytes.fromhex("eb fe")  # 1: jmp 1b


class Recorder:
    """Handlers that log every access and answer reads from a table."""

    def __init__(self, answers: dict[tuple[str, int], int]) -> None:
        self.log: list[tuple[str, int, int, int | None]] = []
        self.answers = answers

    def pio_read(self, port: int, size: int) -> int:
        self.log.append(("pio_read", port, size, None))
        return self.answers[("pio", port)]

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.log.append(("pio_write", port, size, value))

    def mmio_read(self, addr: int, size: int) -> int:
        self.log.append(("mmio_read", addr, size, None))
        return self.answers[("mmio", addr)]

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        # serve() passes the raw 8-byte data word; masking is the handler's job.
        self.log.append(("mmio_write", addr, size, value & ((1 << (8 * size)) - 1)))


def test_serve_dispatches_every_width_and_direction_then_returns_the_halt(
    make_guest: GuestFactory,
) -> None:
    guest = make_guest(MIXED_EXITS, mode="flat32")
    guest.mem.write(0x2100, b"ember!")
    # A 1-byte read answered with a wider value: only the low byte may reach the guest.
    rec = Recorder({("pio", 0x11): 0x1C3, ("pio", 0x12): 0x8BADF00D,
                    ("mmio", 0xD000_0004): 0xCAFEF00D})
    reason = guest.vcpu.serve(rec.pio_read, rec.pio_write, rec.mmio_read, rec.mmio_write,
                              lambda: False)
    assert reason == k.KVM_EXIT_HLT
    assert rec.log[:7] == [
        ("pio_write", 0x10, 1, 0x5A),
        ("pio_write", 0x3F8, 2, 0xBEEF),
        ("pio_write", 0x3F8, 4, 0xDEADBEEF),
        ("pio_read", 0x11, 1, None),
        ("pio_read", 0x12, 4, None),
        ("mmio_write", 0xD000_0000, 4, 0x12345678),
        ("mmio_read", 0xD000_0004, 4, None),
    ]
    # rep outsb: KVM may batch the string into one exit or split it; the bytes arrive in order.
    assert rec.log[7:] == [("pio_write", 0x10, 1, b) for b in b"ember!"]
    assert guest.mem.read_u8(0x2000) == 0xC3
    assert guest.mem.read_u32(0x2004) == 0x8BADF00D
    assert guest.mem.read_u32(0x2008) == 0xCAFEF00D
    # The metrics' exit counts: [io_in, io_out, mmio_read, mmio_write]; rep outsb is 1 to 6
    # exits depending on how KVM batches it.
    io_in, io_out, mmio_read, mmio_write = guest.vcpu.exit_counts
    assert (io_in, mmio_read, mmio_write) == (2, 1, 1)
    assert 3 + 1 <= io_out <= 3 + 6


def test_serve_returns_intr_after_a_kick_only_once_stopping_says_so(
    make_guest: GuestFactory,
) -> None:
    guest = make_guest(SPIN)
    vcpu = guest.vcpu
    stop = threading.Event()
    asked = threading.Event()
    results: list[int] = []

    def stopping() -> bool:
        asked.set()
        return stop.is_set()

    def vcpu_thread() -> None:
        vcpu.attach_thread()
        results.append(vcpu.serve(lambda p, s: 0, lambda p, s, v: None, lambda a, s: 0,
                                  lambda a, s, v: None, stopping))

    thread = threading.Thread(target=vcpu_thread, name="vcpu0")
    thread.start()
    vcpu.kick()
    # The kick alone does not end serve(): it asks stopping() and runs on.
    assert asked.wait(JOIN_SECONDS)
    assert thread.is_alive() and not results
    stop.set()
    thread.join(JOIN_SECONDS)
    assert not thread.is_alive(), "serve() did not return once stopping() was true"
    assert results == [EXIT_INTR]
