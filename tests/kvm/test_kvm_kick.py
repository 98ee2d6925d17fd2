"""Stopping a vCPU: kick() from another thread, immediate_exit, and the handler requirement."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

from embervm.errors import KvmError
from embervm.kvm import EXIT_INTR, KICK_SIGNAL
from embervm.kvm import ioctls as k

pytestmark = pytest.mark.kvm

GuestFactory = Callable[..., Any]  # the make_guest fixture (tests/kvm/conftest.py)

SPIN = bytes.fromhex("eb fe")  # 1: jmp 1b
OUT_BYTE = bytes.fromhex("b0 5a e6 10 f4")  # mov al, 0x5a; out 0x10, al; hlt
JOIN_SECONDS = 30.0


def test_kick_from_another_thread_stops_a_spinning_guest(make_guest: GuestFactory) -> None:
    guest = make_guest(SPIN)
    vcpu = guest.vcpu
    results: list[int] = []
    entered = threading.Event()

    def vcpu_thread() -> None:
        vcpu.attach_thread()
        entered.set()
        try:
            results.append(vcpu.run())
        finally:
            vcpu.detach_thread()

    thread = threading.Thread(target=vcpu_thread, name="vcpu0")
    thread.start()
    assert entered.wait(JOIN_SECONDS)
    # Kicking before the thread is inside KVM_RUN is fine too: immediate_exit covers it.
    vcpu.kick()
    thread.join(JOIN_SECONDS)
    assert not thread.is_alive(), "kick() did not make KVM_RUN return"
    assert results == [EXIT_INTR]
    assert vcpu.immediate_exit == 1  # left for the caller to clear


def test_kicked_guest_resumes_where_it_stopped(make_guest: GuestFactory) -> None:
    guest = make_guest(SPIN)
    vcpu = guest.vcpu
    timer = threading.Timer(0.2, vcpu.kick)
    timer.start()
    try:
        assert vcpu.run() == EXIT_INTR
    finally:
        timer.join()
    assert vcpu.get_regs().rip == guest.CODE  # still on its `jmp $`


def test_immediate_exit_returns_without_entering_the_guest(make_guest: GuestFactory) -> None:
    guest = make_guest(OUT_BYTE)
    vcpu = guest.vcpu
    vcpu.immediate_exit = 1
    assert vcpu.run() == EXIT_INTR
    assert vcpu.get_regs().rip == guest.CODE
    vcpu.immediate_exit = 0
    assert vcpu.run() == k.KVM_EXIT_IO


@pytest.mark.parametrize("handler", [signal.SIG_DFL, signal.SIG_IGN])
def test_kick_without_a_signal_handler_is_refused(make_guest: GuestFactory, handler: Any) -> None:
    # SIG_DFL would kill the process; SIG_IGN would never interrupt KVM_RUN.
    guest = make_guest(SPIN)
    previous = signal.signal(KICK_SIGNAL, handler)
    try:
        with pytest.raises(KvmError, match="install_kick_handler"):
            guest.vcpu.kick()
    finally:
        signal.signal(KICK_SIGNAL, previous)
    assert guest.vcpu.immediate_exit == 0


def test_kick_after_the_vcpu_thread_ended_signals_nobody(make_guest: GuestFactory) -> None:
    guest = make_guest(SPIN)
    vcpu = guest.vcpu
    thread = threading.Thread(target=vcpu.attach_thread)
    thread.start()
    thread.join(JOIN_SECONDS)
    received: list[int] = []
    previous = signal.signal(KICK_SIGNAL, lambda signum, frame: received.append(signum))
    try:
        vcpu.kick()  # any Python handler will do, not only install_kick_handler()'s
        signal.pthread_kill(threading.get_ident(), KICK_SIGNAL)  # this one does arrive
    finally:
        signal.signal(KICK_SIGNAL, previous)
    assert received == [KICK_SIGNAL]
    assert vcpu.immediate_exit == 1
