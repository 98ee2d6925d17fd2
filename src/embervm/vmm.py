"""Builds a VM from a :class:`~embervm.config.VmConfig` and runs it.

Threads (see docs/ARCHITECTURE.md):

* one thread per vCPU runs ``KVM_RUN`` and dispatches PIO/MMIO exits through the two buses.
  Exit handling is the hot path (~12 µs per exit on this host from C): it does a dict lookup and
  one device call, nothing else;
* the main thread runs the event loop (epoll through ``selectors``): queue ioeventfds, stdin,
  the stop eventfd.  All virtio queue work happens here, so device I/O never runs on a vCPU's
  exit path.  Signals (SIGINT/SIGTERM) are handled here too.

Exit statuses: 0 the guest rebooted or powered off (i8042 reset, ``reboot=k``); 1 the guest
crashed (triple fault, KVM internal error); 2 bad configuration (from the CLI); 128+N killed by
signal N (SIGINT 130, SIGTERM 143), after a clean shutdown.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import dataclass

from . import images
from .boot import BootInfo, CpuBootState, Segment, setup_boot
from .bus import Bus
from .config import CMDLINE_EMBERVM, CMDLINE_RECOMMENDED, CMDLINE_REQUIRED, VmConfig
from .devices.legacy.i8042 import I8042
from .devices.legacy.misc import CmosAbsent, PortSink
from .devices.legacy.serial import Serial
from .devices.virtio import spec
from .devices.virtio.block import Block
from .devices.virtio.device import VirtioDevice
from .devices.virtio.mmio import MmioTransport
from .devices.virtio.rng import Rng
from .errors import ConfigError, EmbervmError
from .eventloop import EventLoop
from .kvm import ioctls as kvmio
from .kvm import kvm as kvmmod
from .kvm.cpuid import build_cpuid
from .memory import GuestMemory

log = logging.getLogger(__name__)

# Guest-physical layout of the virtio-mmio windows (docs/ARCHITECTURE.md): 4 KiB slots from the
# start of the 32-bit MMIO gap, as Firecracker.  IRQs avoid the legacy ones (1 i8042, 3/4 COM,
# 8 RTC, 12 PS/2 mouse, 13 FPU); 16..23 are IOAPIC pins described in the MP table.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_IRQS = (5, 6, 7, 9, 10, 11, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23)
SERIAL_PORT = 0x3F8
SERIAL_IRQ = 4

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 2


@dataclass
class VirtioSlot:
    device: VirtioDevice
    transport: MmioTransport
    base: int
    irq: int
    irq_fd: int
    queue_fds: list[int]


class Vmm:
    """One VM: memory, vCPUs, buses, devices and the event loop."""

    def __init__(self, config: VmConfig, *, console_out: Callable[[bytes], None] | None = None):
        config.validate()
        self.config = config
        self.exit_status: int | None = None
        self.exit_reason = ""
        self._stop_lock = threading.Lock()
        self._fds: list[int] = []
        self._closers: list[Callable[[], None]] = []
        self.slots: list[VirtioSlot] = []
        self.vcpus: list[kvmmod.Vcpu] = []
        self._threads: list[threading.Thread] = []
        self._console_out = console_out
        self._stdin_attrs: list | None = None
        try:
            self._build(config)
        except BaseException:
            # Leave nothing behind (fds, sockets, the KVM VM) when the input was bad.
            self.close()
            raise

    def _build(self, config: VmConfig) -> None:
        self.kvm = kvmmod.Kvm()
        self._closers.append(self.kvm.close)
        self.kvm.require_extensions()
        self.vm = self.kvm.create_vm()
        self._closers.append(self.vm.close)
        self.mem = GuestMemory.x86(config.mem_mib << 20)
        self.vm.set_tss_addr(0xFFFB_D000)
        self.vm.set_identity_map_addr(0xFFFB_C000)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.vm.register_memory(self.mem)

        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self._stop_fd = self._eventfd()
        self.loop = EventLoop()
        self._closers.append(self.loop.close)
        self._setup_legacy()
        for d in config.disks:
            self._add_virtio(Block(d.path, read_only=d.read_only, serial=d.id))
        for device in _optional_devices(config):
            self._add_virtio(device)

        if config.control is not None:
            self._setup_control(config.control)

        # vCPUs first: the TSC frequency for the command line comes from a vCPU fd.
        for i in range(config.vcpus):
            self.vcpus.append(self.vm.create_vcpu(i))
        self.tsc_khz = self._tsc_khz()
        kernel = config.kernel or images.default_kernel()
        initrd = config.initrd
        if initrd is None and config.kernel is None:
            initrd = images.default_initrd()
        self.cmdline = self._cmdline()
        self.boot: BootInfo = setup_boot(self.mem, kernel, initrd, self.cmdline, config.vcpus)
        self._setup_vcpus(self.boot.cpu)

    # -- construction -------------------------------------------------------------------------

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(fd)
        return fd

    def _irqfd(self, gsi: int) -> int:
        fd = self._eventfd()
        self.vm.irqfd(fd, gsi)
        return fd

    def _setup_legacy(self) -> None:
        serial_irq = self._irqfd(SERIAL_IRQ)
        out = self._console_out or self._serial_sink()
        self.serial = Serial(lambda: os.eventfd_write(serial_irq, 1), out)
        self.pio.insert(self.serial, SERIAL_PORT, 8)
        self.pio.insert(I8042(self._guest_reset), 0x60, 5)
        self.pio.insert(CmosAbsent(), 0x70, 2)
        self.pio.insert(PortSink(), 0x80, 1)
        self.pio.insert(PortSink(), 0xED, 1)

    def _serial_sink(self) -> Callable[[bytes], None]:
        kind = self.config.serial.kind
        if kind == "null":
            return lambda data: None
        if kind == "file":
            path = self.config.serial.path
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ConfigError(f"--serial file:{path}: {e.strerror}") from None
            self._fds.append(fd)
        else:
            fd = sys.stdout.fileno()

        def write(data: bytes, fd: int = fd) -> None:
            try:
                os.write(fd, data)
            except OSError:
                pass  # a closed terminal must not take the VM down

        return write

    def _add_virtio(self, device: VirtioDevice) -> None:
        index = len(self.slots)
        if index >= len(VIRTIO_IRQS):
            raise ConfigError(f"too many virtio devices (at most {len(VIRTIO_IRQS)})")
        base = VIRTIO_MMIO_BASE + index * spec.MMIO_SIZE
        irq = VIRTIO_IRQS[index]
        irq_fd = self._irqfd(irq)
        transport = MmioTransport(device, self.mem, interrupt=lambda: os.eventfd_write(irq_fd, 1))
        queue_fds = []
        for q in range(len(device.queue_max_sizes)):
            fd = self._eventfd()
            self.vm.ioeventfd(fd, base + spec.QUEUE_NOTIFY, 4, datamatch=q)
            queue_fds.append(fd)
        # Kicks that reach the MMIO path (no datamatch, DRIVER_OK scan) go through the same
        # eventfd, so queue work always runs on the event-loop thread.
        transport.notify_hook = lambda q, fds=queue_fds: os.eventfd_write(fds[q], 1)
        self.mmio.insert(transport, base, spec.MMIO_SIZE)
        device.loop = self.loop
        closer = getattr(device, "close", None)
        if closer is not None:
            self._closers.append(closer)
        self.slots.append(VirtioSlot(device, transport, base, irq, irq_fd, queue_fds))

    def _setup_control(self, path: os.PathLike[str]) -> None:
        """The control socket: commands from the VMM and from devices that offer some."""
        from .control import ControlServer

        commands: dict[str, Callable[[list[str]], dict]] = {
            "status": lambda args: {"devices": [
                {"name": s.device.name, "base": s.base, "irq": s.irq, "active": s.device.active,
                 "metrics": dict(s.device.metrics)} for s in self.slots]},
            "stop": lambda args: (self.stop(EXIT_OK, "stop requested on the control socket"),
                                  {})[1],
        }
        for slot in self.slots:
            offered = getattr(slot.device, "control_commands", None)
            if offered is not None:
                commands.update(offered())
        server = ControlServer(path, self.loop, commands)
        self._closers.append(server.close)

    def _tsc_khz(self) -> int | None:
        try:
            return self.vcpus[0].get_tsc_khz()
        except EmbervmError as e:
            log.info("no TSC frequency from KVM (%s): the guest will calibrate", e)
            return None

    def _cmdline(self) -> str:
        words = [self.config.cmdline if self.config.cmdline is not None else (
            f"{CMDLINE_REQUIRED} {CMDLINE_RECOMMENDED} {CMDLINE_EMBERVM}"
            + (f" tsc_early_khz={self.tsc_khz} tsc=reliable" if self.tsc_khz else "")
        )]
        # ACPI boot of the kit kernel does not work: devices are announced on the command line.
        for s in self.slots:
            words.append(f"virtio_mmio.device=4K@{s.base:#x}:{s.irq}")
        if self.config.console is not None:
            # The last console= word names /dev/console: the virtio console (port 0 = hvc0).
            words.append("console=hvc0")
        if self.config.append:
            words.append(self.config.append)
        return " ".join(words)

    def _setup_vcpus(self, cpu: CpuBootState) -> None:
        supported = self.kvm.get_supported_cpuid()
        n = len(self.vcpus)
        for vcpu in self.vcpus:
            vcpu.set_cpuid(build_cpuid(supported, vcpu.index, n, self.tsc_khz))
            vcpu.set_boot_msrs()
            vcpu.set_fpu()
            vcpu.set_lint()
        bsp = self.vcpus[0]
        regs = bsp.get_regs()
        regs.rip, regs.rsp, regs.rbp = cpu.rip, cpu.rsp, cpu.rsp
        regs.rbx, regs.rsi, regs.rflags = cpu.rbx, cpu.rsi, cpu.rflags
        bsp.set_regs(regs)
        sregs = bsp.get_sregs()
        _set_segment(sregs.cs, cpu.cs)
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _set_segment(seg, cpu.ds)
        _set_segment(sregs.tr, cpu.tr)
        sregs.gdt.base, sregs.gdt.limit = cpu.gdt_base, cpu.gdt_limit
        sregs.idt.base, sregs.idt.limit = cpu.idt_base, cpu.idt_limit
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer
        bsp.set_sregs(sregs)

    # -- running ------------------------------------------------------------------------------

    def run(self) -> int:
        """Boot the guest and serve it until it exits; return the exit status."""
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            # vCPU threads are kicked out of KVM_RUN with this signal; the handler does nothing.
            old_handlers[kvmmod.KICK_SIGNAL] = signal.signal(kvmmod.KICK_SIGNAL,
                                                             lambda *_: None)
            resized = [getattr(s.device, "terminal_resized", None) for s in self.slots]
            hooks = [h for h in resized if h is not None]
            if hooks and self._uses_stdin():
                # The host terminal changed size: a stdio console tells the guest (config change).
                old_handlers[signal.SIGWINCH] = signal.signal(
                    signal.SIGWINCH,
                    lambda *_: [self.loop.call_soon_threadsafe(h) for h in hooks],
                )
        try:
            self._enter_terminal()
            for vcpu in self.vcpus:
                t = threading.Thread(target=self._vcpu_thread, args=(vcpu,),
                                     name=f"vcpu{vcpu.index}", daemon=True)
                self._threads.append(t)
            for t in self._threads:
                t.start()
            self._event_loop()
            for vcpu in self.vcpus:
                vcpu.kick()
            for t in self._threads:
                t.join(timeout=5)
        finally:
            self._leave_terminal()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            self.close()
        return self.exit_status if self.exit_status is not None else EXIT_CRASH

    def stop(self, status: int, reason: str = "") -> None:
        """Ask the VM to stop (any thread, idempotent): the first status wins."""
        with self._stop_lock:
            if self.exit_status is not None:
                return
            self.exit_status = status
            self.exit_reason = reason
        log.info("stopping: %s (status %d)", reason, status)
        for vcpu in self.vcpus:
            vcpu.kick()
        os.eventfd_write(self._stop_fd, 1)

    def _guest_reset(self) -> None:
        self.stop(EXIT_OK, "guest reset through the i8042 (reboot)")

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop(128 + signum, f"signal {signal.Signals(signum).name}")

    def _vcpu_thread(self, vcpu: kvmmod.Vcpu) -> None:
        try:
            reason = self._vcpu_loop(vcpu)
        except BaseException as e:  # never die silently: a vCPU thread error stops the VM
            log.exception("vcpu%d failed", vcpu.index)
            self.stop(EXIT_CRASH, f"vcpu{vcpu.index} error: {e}")
            return
        if reason:
            self.stop(EXIT_CRASH, reason)

    def _vcpu_loop(self, vcpu: kvmmod.Vcpu) -> str:
        """The exit loop.  Returns a crash description, or "" when asked to stop."""
        vcpu.attach_thread()
        if vcpu.index == 0:
            # For benchmarks/bench.py (VMM start -> first KVM_RUN): CLOCK_MONOTONIC is
            # system-wide, so the parent process can subtract its own start timestamp.
            log.info("vcpu0: first KVM_RUN at monotonic %.6f", time.monotonic())
        reason = exit_loop(vcpu, self.pio, self.mmio, lambda: self.exit_status is not None)
        if reason == kvmmod.EXIT_INTR:
            return ""
        return self._unusual_exit(vcpu, reason)

    def _unusual_exit(self, vcpu: kvmmod.Vcpu, reason: int) -> str:
        if reason == kvmio.KVM_EXIT_SHUTDOWN:
            return f"vcpu{vcpu.index}: triple fault (KVM_EXIT_SHUTDOWN): the guest crashed"
        if reason == kvmio.KVM_EXIT_HLT:
            return f"vcpu{vcpu.index}: halted with interrupts off"
        if reason == kvmio.KVM_EXIT_SYSTEM_EVENT:
            self.stop(EXIT_OK, "guest system event (reset/shutdown)")
            return ""
        return f"vcpu{vcpu.index}: unhandled KVM exit {vcpu.describe_exit(reason)}"

    def _event_loop(self) -> None:
        loop = self.loop
        loop.add_eventfd(self._stop_fd, loop.stop)
        for slot in self.slots:
            for q, fd in enumerate(slot.queue_fds):
                loop.add_eventfd(fd, lambda t=slot.transport, q=q: t.queue_event(q))
        stdin_fd = self._stdin_fd()
        if stdin_fd is not None:
            try:
                loop.add_reader(stdin_fd, lambda: self._stdin_ready(stdin_fd))
            except PermissionError:
                pass  # a regular file or /dev/null cannot be polled: no console input
        loop.run()

    def _stdin_fd(self) -> int | None:
        """stdin, when the serial port is the interactive console."""
        if self._console_out is not None or self.config.serial.kind != "stdio":
            return None
        if self.config.console is not None and self.config.console.kind == "stdio":
            return None  # virtio-console owns stdin
        try:
            fd = sys.stdin.fileno()
            os.fstat(fd)
        except (OSError, ValueError):
            return None
        return fd

    def _stdin_ready(self, fd: int) -> None:
        room = self.serial.input_room()
        if room <= 0:
            # The guest is not reading: stop polling stdin until it drained some input.
            self.loop.remove_reader(fd)
            self.loop.call_later(0.05, lambda: self.loop.add_reader(
                fd, lambda: self._stdin_ready(fd)))
            return
        try:
            data = os.read(fd, min(4096, room))
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(fd)
            return
        self.serial.enqueue_input(data)

    def _enter_terminal(self) -> None:
        fd = sys.stdin.fileno() if self._uses_stdin() else None
        if fd is not None and os.isatty(fd):
            self._stdin_attrs = termios.tcgetattr(fd)
            tty.setraw(fd, termios.TCSANOW)
            # Keep output post-processing so the host terminal still turns \n into \r\n.
            attrs = termios.tcgetattr(fd)
            attrs[1] |= termios.OPOST
            termios.tcsetattr(fd, termios.TCSANOW, attrs)

    def _uses_stdin(self) -> bool:
        console = self.config.console
        return self._stdin_fd() is not None or (console is not None and console.kind == "stdio")

    def _leave_terminal(self) -> None:
        if self._stdin_attrs is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self._stdin_attrs)
            self._stdin_attrs = None

    def close(self) -> None:
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:  # closing must go on
                log.debug("close failed", exc_info=True)
        self._closers = []
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def exit_loop(
    vcpu: kvmmod.Vcpu, pio: Bus, mmio: Bus, stopping: Callable[[], bool]
) -> int:
    """Run ``vcpu`` and serve its port-I/O and MMIO exits through ``pio`` and ``mmio`` until
    another exit arrives; return that exit's reason.  An interrupted KVM_RUN (a kick) returns
    :data:`~embervm.kvm.kvm.EXIT_INTR` when ``stopping()`` is true and is retried otherwise.

    This is the VMM's hottest path, one iteration per guest exit: the loop itself is
    :meth:`embervm.kvm.Vcpu.serve` (kvm_run decoding stays in the KVM layer); the buses mask
    every value to the access width, as it requires.  docs/PERFORMANCE.md has its cost.
    """
    return vcpu.serve(pio.read, pio.write, mmio.read, mmio.write, stopping)


def _optional_devices(config: VmConfig) -> list[VirtioDevice]:
    """The devices beyond the disks, in a fixed order (their IRQs and addresses follow it).

    Imported here, not at the top, so a VMM without these devices does not load them.
    """
    devices: list[VirtioDevice] = []
    for n in config.nets:
        from .devices.virtio.net import Net

        devices.append(Net(n.tap, mac=n.mac))
    if config.console is not None:
        from .devices.virtio.console import Console

        devices.append(Console(config.console.kind, config.console.path))
    if config.vsock is not None:
        from .devices.virtio.vsock import Vsock

        devices.append(Vsock(config.vsock.cid, config.vsock.uds))
    if config.balloon is not None:
        from .devices.virtio.balloon import Balloon

        b = config.balloon
        devices.append(Balloon(b.target_mib, deflate_on_oom=b.deflate_on_oom,
                               stats_seconds=b.stats_seconds))
    if config.rng:
        devices.append(Rng())
    return devices


def _set_segment(dst: object, src: Segment) -> None:
    for name in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
                 "avl"):
        setattr(dst, name, getattr(src, name))
