"""Exit cost under embervm: a hand-built guest making N port-I/O or MMIO exits.

The embervm side of the exit-cost benchmark (``benchmarks/bench.py`` runs it next to the raw
C loop in ``benchmarks/exitloop.c``).  The guest code is byte for byte the C program's: a
one-vCPU VM in flat 32-bit protected mode counts ECX down from N, exiting once per iteration,
then halts.  Each exit goes through the VMM's own exit loop (:func:`embervm.vmm.exit_loop`),
its buses and real devices, on a thread of its own as in the VMM (the main thread waits):

* ``pio_out``    ``out dx, al`` to port 0x80, the PC's POST/delay port (``PortSink``, as the
  VMM maps it; Linux writes it for every ``outb_p``): the exit path with the least device work;
* ``pio_in``     ``in al, dx`` from 0x3fd, the 16550's LSR, which Linux's 8250 console driver
  polls before every character it prints;
* ``mmio_write`` ``mov [0xd0000064], ecx``: virtio-mmio InterruptACK of a virtio-rng device,
  written by the guest's interrupt handler;
* ``mmio_read``  ``mov eax, [0xd0000060]``: virtio-mmio InterruptStatus, read by the same.

With ``--c-lib exitloop.so`` the C loop of ``exitloop.c`` serves the same guest on the same vCPU,
in blocks alternating with embervm's (``--blocks``, default 20), so that both are timed under
the same host load: exit costs on this shared PVM host drift by +-20% from one second to the
next, more than the difference being measured.

Run: ``python benchmarks/exitbench.py [N] [MODE...] [--c-lib PATH]``; prints one line per mode,
``<mode> exits=<n> embervm_us=<us per exit> [c_us=<us per exit>]``.
"""

from __future__ import annotations

import argparse
import ctypes
import struct
import sys
import threading
import time
from pathlib import Path

try:
    import embervm  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from embervm.bus import Bus
from embervm.devices.legacy.misc import PortSink
from embervm.devices.legacy.serial import Serial
from embervm.devices.virtio.mmio import MmioTransport
from embervm.devices.virtio.rng import Rng
from embervm.kvm import Kvm, Segment, Vcpu, Vm, install_kick_handler
from embervm.kvm import ioctls as k
from embervm.memory import GuestMemory
from embervm.vmm import SERIAL_PORT, VIRTIO_MMIO_BASE, exit_loop

RAM_SIZE = 0x10000
CODE = 0x1000
GDT = 0x500
TSS_ADDR = 0xFFFB_D000
# Flat 4 GiB ring-0 code (0x08) and data (0x10) descriptors.
GDT_ENTRIES = (0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF)
# If the guest stops exiting, the watchdog kicks the vCPU and the run fails.
WATCHDOG_SECONDS = 120.0
# Blocks per measurement: the C loop and embervm's take turns, so both see the same host load.
BLOCKS = 20
POST_PORT = 0x80


def _loop(body: bytes) -> bytes:
    """``mov ecx, N; 1: <body>; dec ecx; jnz 1b; hlt`` (N patched in at offset 1)."""
    return b"\xb9\0\0\0\0" + body + b"\x49\x75" + bytes([(-(len(body) + 3)) & 0xFF]) + b"\xf4"


MOV_DX = b"\x66\xba"  # mov dx, imm16 (before the loop)
MODES: dict[str, bytes] = {
    # mov dx, 0x80; 1: out dx, al; ...
    "pio_out": b"\xb9\0\0\0\0" + MOV_DX + struct.pack("<H", POST_PORT) + b"\xee"
    b"\x49\x75\xfc\xf4",
    # mov dx, 0x3fd; 1: in al, dx; ...
    "pio_in": b"\xb9\0\0\0\0" + MOV_DX + struct.pack("<H", SERIAL_PORT + 5) + b"\xec"
    b"\x49\x75\xfc\xf4",
    # 1: mov [0xd0000064], ecx; ...
    "mmio_write": _loop(b"\x89\x0d" + struct.pack("<I", VIRTIO_MMIO_BASE + 0x64)),
    # 1: mov eax, [0xd0000060]; ...
    "mmio_read": _loop(b"\x8b\x05" + struct.pack("<I", VIRTIO_MMIO_BASE + 0x60)),
}


def _flat(selector: int, type_: int) -> Segment:
    return Segment(base=0, limit=0xFFFF_FFFF, selector=selector, type=type_, present=1, dpl=0,
                   db=1, s=1, l=0, g=1)


def _make_vm(kvm: Kvm, code: bytes) -> tuple[Vm, GuestMemory, Vcpu]:
    vm = kvm.create_vm()
    mem = GuestMemory([(0, RAM_SIZE)])
    vm.set_tss_addr(TSS_ADDR)
    vm.register_memory(mem)
    mem.write(GDT, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))
    mem.write(CODE, code)
    vcpu = vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.gdt.base, sregs.gdt.limit = GDT, 8 * len(GDT_ENTRIES) - 1
    sregs.cr0 |= 1  # PE
    sregs.cs = _flat(0x08, 0xB)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _flat(0x10, 0x3))
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rflags = CODE, 0x8000, 0x2
    vcpu.set_regs(regs)
    return vm, mem, vcpu


class _Runner:
    """One VM running one mode's guest; serves blocks of exits on its own thread."""

    def __init__(self, kvm: Kvm, mode: str, block: int) -> None:
        code = bytearray(MODES[mode])
        code[1:5] = struct.pack("<I", block)
        self.mode = mode
        self.end = CODE + len(code)
        self.vm, self.mem, self.vcpu = _make_vm(kvm, bytes(code))
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.pio.insert(Serial(lambda: None, lambda data: None), SERIAL_PORT, 8)
        self.pio.insert(PortSink(), POST_PORT, 1)
        self.mmio.insert(MmioTransport(Rng(), self.mem, interrupt=lambda: None),
                         VIRTIO_MMIO_BASE, 0x1000)
        self.stopped = threading.Event()

    def restart(self) -> None:
        regs = self.vcpu.get_regs()
        regs.rip, regs.rsp, regs.rflags = CODE, 0x8000, 0x2
        self.vcpu.set_regs(regs)

    def check_block(self, reason: int) -> None:
        if reason != k.KVM_EXIT_HLT or self.stopped.is_set():
            raise SystemExit(f"exitbench: {self.mode}: ended with "
                             f"{self.vcpu.describe_exit(reason)}")
        regs = self.vcpu.get_regs()
        # Every iteration exited once: ECX counted down to 0 and the guest halted after the loop.
        if regs.rcx & 0xFFFF_FFFF or regs.rip != self.end:
            raise SystemExit(f"exitbench: {self.mode}: guest stopped early (ecx {regs.rcx:#x}, "
                             f"rip {regs.rip:#x})")

    def check_devices(self) -> None:
        pio, mmio = self.pio, self.mmio
        if pio.unknown_reads + pio.unknown_writes + mmio.unknown_reads + mmio.unknown_writes:
            raise SystemExit(f"exitbench: {self.mode}: exits reached no device")
        if pio.device_errors or mmio.device_errors:
            raise SystemExit(f"exitbench: {self.mode}: a device raised")

    def close(self) -> None:
        self.vm.close()
        self.mem.close()


def run_mode(kvm: Kvm, mode: str, n: int, clib: ctypes.CDLL | None,
             blocks: int = BLOCKS) -> dict[str, float]:
    """Seconds for ``n`` exits of ``mode`` through embervm's exit loop (``"embervm"``) and, with
    ``clib``, through the C loop (``"c"``), in alternating blocks on the same vCPU."""
    blocks = max(1, min(blocks, n))
    r = _Runner(kvm, mode, n // blocks)
    times = {"embervm": 0.0, "c": 0.0} if clib else {"embervm": 0.0}
    errors: list[BaseException] = []

    def vcpu_thread() -> None:
        vcpu = r.vcpu
        vcpu.attach_thread()
        page = ctypes.c_char.from_buffer(vcpu.run_mmap) if clib else None
        try:
            for b in range(blocks):
                order = ("embervm", "c") if b % 2 == 0 else ("c", "embervm")
                for who in order:
                    if who not in times:
                        continue
                    r.restart()
                    start = time.perf_counter()
                    if who == "embervm":
                        reason = exit_loop(vcpu, r.pio, r.mmio, r.stopped.is_set)
                    else:
                        served = clib.exitloop_serve(vcpu.fd, ctypes.addressof(page))
                        reason = vcpu.run_mmap[8] if served >= 0 else -1  # exit_reason
                    times[who] += time.perf_counter() - start
                    r.check_block(reason)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            del page  # the mmap cannot close while ctypes holds its buffer

    def watchdog() -> None:
        r.stopped.set()
        r.vcpu.kick()

    timer = threading.Timer(WATCHDOG_SECONDS, watchdog)
    thread = threading.Thread(target=vcpu_thread, name="vcpu0")
    timer.start()
    try:
        thread.start()
        thread.join()
        timer.cancel()
        if errors:
            raise errors[0]
        r.check_devices()
    finally:
        r.close()
    served = n // blocks * blocks  # exits each loop served
    return {who: t / served * n for who, t in times.items()}


def load_clib(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.exitloop_serve.argtypes = (ctypes.c_int, ctypes.c_void_p)
    lib.exitloop_serve.restype = ctypes.c_long
    return lib


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exits", nargs="?", type=int, default=200_000)
    ap.add_argument("modes", nargs="*", metavar="MODE", help=f"of {', '.join(MODES)} (all)")
    ap.add_argument("--c-lib", help="exitloop.so (exitloop.c built with -DEXITLOOP_LIB): "
                    "time the C loop too, in blocks alternating with embervm's")
    ap.add_argument("--blocks", type=int, default=BLOCKS)
    a = ap.parse_args(argv)
    if set(a.modes) - set(MODES):
        ap.error(f"unknown mode(s) {', '.join(set(a.modes) - set(MODES))}")
    clib = load_clib(a.c_lib) if a.c_lib else None
    install_kick_handler()
    with Kvm() as kvm:
        for mode in a.modes or MODES:
            t = run_mode(kvm, mode, a.exits, clib, a.blocks)
            line = " ".join(f"{who}_us={v / a.exits * 1e6:.3f}" for who, v in t.items())
            print(f"{mode} exits={a.exits} {line}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
