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

Run: ``python benchmarks/exitbench.py [N] [MODE...]``; prints the C program's line format,
``<mode> exits=<n> seconds=<s> us_per_exit=<us>``.
"""

from __future__ import annotations

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


def run_mode(kvm: Kvm, mode: str, n: int) -> float:
    """Seconds for ``n`` exits of ``mode`` through embervm's exit loop."""
    code = bytearray(MODES[mode])
    code[1:5] = struct.pack("<I", n)
    vm, mem, vcpu = _make_vm(kvm, bytes(code))
    try:
        pio, mmio = Bus("pio"), Bus("mmio")
        serial = Serial(lambda: None, lambda data: None)
        pio.insert(serial, SERIAL_PORT, 8)
        pio.insert(PortSink(), POST_PORT, 1)
        mmio.insert(MmioTransport(Rng(), mem, interrupt=lambda: None), VIRTIO_MMIO_BASE, 0x1000)
        stopped = threading.Event()
        result: list[object] = []

        def vcpu_thread() -> None:
            vcpu.attach_thread()
            try:
                result.append(exit_loop(vcpu, pio, mmio, stopped.is_set))
            except BaseException as e:  # reported by the main thread
                result.append(e)

        def watchdog() -> None:
            stopped.set()
            vcpu.kick()

        timer = threading.Timer(WATCHDOG_SECONDS, watchdog)
        thread = threading.Thread(target=vcpu_thread, name="vcpu0")
        timer.start()
        start = time.perf_counter()
        thread.start()
        thread.join()
        elapsed = time.perf_counter() - start
        timer.cancel()
        if isinstance(result[0], BaseException):
            raise result[0]
        if result[0] != k.KVM_EXIT_HLT or stopped.is_set():
            raise SystemExit(f"exitbench: {mode}: ended with {vcpu.describe_exit(result[0])}")
        regs = vcpu.get_regs()
        # Every iteration exited once: ECX counted down to 0 and the guest halted after the loop.
        if regs.rcx & 0xFFFF_FFFF or regs.rip != CODE + len(code):
            raise SystemExit(f"exitbench: {mode}: guest stopped early (ecx {regs.rcx:#x}, "
                             f"rip {regs.rip:#x})")
        if pio.unknown_reads + pio.unknown_writes + mmio.unknown_reads + mmio.unknown_writes:
            raise SystemExit(f"exitbench: {mode}: exits reached no device")
        if pio.device_errors or mmio.device_errors:
            raise SystemExit(f"exitbench: {mode}: a device raised")
        return elapsed
    finally:
        vm.close()
        mem.close()


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 200_000
    modes = [m for m in MODES if len(argv) <= 1 or m in argv[1:]]
    install_kick_handler()
    with Kvm() as kvm:
        for mode in modes:
            t = run_mode(kvm, mode, n)
            print(f"{mode} exits={n} seconds={t:.6f} us_per_exit={t / n * 1e6:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
