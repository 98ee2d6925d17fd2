"""Builds a VM from a :class:`~embervm.config.VmConfig` and runs it.

Threads (see docs/ARCHITECTURE.md):

* one thread per vCPU runs ``KVM_RUN`` and dispatches PIO/MMIO exits through the two buses.
  Exit handling is the hot path (~12 µs per exit on this host from C): it does a dict lookup and
  one device call, nothing else;
* the main thread runs the event loop (epoll through ``selectors``): queue ioeventfds, stdin,
  the stop eventfd.  All virtio queue work happens here, so device I/O never runs on a vCPU's
  exit path.  Signals (SIGINT/SIGTERM) are handled here too.

Lifecycle: ``Vmm(config)`` builds everything (memory, vCPUs, devices, boot structures) or
nothing; :meth:`Vmm.start` starts the vCPU threads and registers the devices on the event loop;
:meth:`Vmm.pause` parks every vCPU outside ``KVM_RUN`` and stops device work at a request
boundary, :meth:`Vmm.resume` continues both; :meth:`Vmm.stop` ends the VM and
:meth:`Vmm.teardown` joins the threads and releases everything.  :meth:`Vmm.run` does it all
for a one-shot VM on its own loop (``embervm run``); :class:`embervm.machine.Machine` drives
the same steps on a shared loop.

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
from typing import TYPE_CHECKING

from . import images
from .boot import BootInfo, CpuBootState, Segment, setup_boot
from .bus import Bus
from .config import (
    CMDLINE_EMBERVM,
    CMDLINE_RECOMMENDED,
    CMDLINE_REQUIRED,
    STOP_GRACE_SECONDS,
    VmConfig,
)
from .devices.legacy.i8042 import I8042
from .devices.legacy.misc import CmosAbsent, PortSink
from .devices.legacy.serial import Serial
from .devices.manager import VIRTIO_IRQS, VIRTIO_MMIO_BASE, DeviceManager, VirtioSlot
from .devices.virtio.device import VirtioDevice
from .errors import ConfigError, EmbervmError, KvmError, StateError
from .eventloop import EventLoop
from .host import host_profile
from .kvm import ioctls as kvmio
from .kvm import kvm as kvmmod
from .kvm.cpuid import build_cpuid
from .memory import GuestMemory

if TYPE_CHECKING:
    from .devices.virtio.block import Block

log = logging.getLogger(__name__)

__all__ = ["VIRTIO_IRQS", "VIRTIO_MMIO_BASE", "Vmm", "VirtioSlot", "exit_loop"]

SERIAL_PORT = 0x3F8
SERIAL_IRQ = 4
KEYBOARD_IRQ = 1

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 2


class Vmm:
    """One VM: memory, vCPUs, buses, devices; served by an event loop (its own or a shared one).

    ``extra_devices``: user-written virtio devices, after the configured ones, each as
    ``(device, slot_id or None)``.  ``on_exit``: called on the loop's thread once the VM has
    stopped (any reason), instead of stopping the loop; the callee calls :meth:`teardown`.
    """

    def __init__(self, config: VmConfig, *, console_out: Callable[[bytes], None] | None = None,
                 loop: EventLoop | None = None,
                 extra_devices: list[tuple[VirtioDevice, str | None]] | tuple = (),
                 on_exit: Callable[[], None] | None = None):
        config.validate()
        self.config = config
        self.exit_status: int | None = None
        self.exit_reason = ""
        self._stop_lock = threading.Lock()
        self._fds: list[int] = []
        self._closers: list[Callable[[], None]] = []
        self.vcpus: list[kvmmod.Vcpu] = []
        self._threads: list[threading.Thread] = []
        self._console_out = console_out
        self._stdin_attrs: list | None = None
        self._own_loop = loop is None
        self._on_exit = on_exit
        self.started = False
        # Pause: vCPU threads park on this condition outside KVM_RUN.
        self._pause_cv = threading.Condition()
        self._pause_requested = False
        self._parked = 0
        self.paused = False
        self._stop_requested: tuple[int, str] | None = None
        self._stop_timer = None
        try:
            if loop is None:
                loop = EventLoop()
                self._closers.append(loop.close)
            self.loop = loop
            self._build(config, list(extra_devices))
        except BaseException:
            # Leave nothing behind (fds, sockets, the KVM VM) when the input was bad.
            self.close()
            raise

    @property
    def slots(self) -> list[VirtioSlot]:
        return self.devices.slots

    def _build(self, config: VmConfig,
               extra_devices: list[tuple[VirtioDevice, str | None]]) -> None:
        self.kvm = kvmmod.Kvm()
        self._closers.append(self.kvm.close)
        self.kvm.require_extensions()
        max_vcpus = self.kvm.check_extension(kvmio.KVM_CAP_MAX_VCPUS)
        if max_vcpus and config.vcpus > max_vcpus:
            raise ConfigError(f"{config.vcpus} vCPUs: this host's KVM allows at most {max_vcpus}")
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
        self.devices = DeviceManager(self.vm, self.mem, self.mmio, self.loop, self._eventfd)
        self._closers.append(self.devices.close)
        self._setup_legacy()
        # Firecracker puts the root device first, so it is /dev/vda.
        disks = sorted(config.disks, key=lambda d: not d.is_root_device)
        for i, d in enumerate(disks):
            self.devices.add(self._block(d), d.id or f"drive{i}")
        for device, slot_id in _optional_devices(config):
            self.devices.add(device, slot_id)
        for device, slot_id in extra_devices:
            self.devices.add(device, slot_id)
        self._root_disk = disks[0] if disks and disks[0].is_root_device else None

        if config.control is not None:
            self._setup_control(config.control)

        # vCPUs first: the TSC frequency for the command line comes from a vCPU fd.
        for i in range(config.vcpus):
            self.vcpus.append(self.vm.create_vcpu(i))
        self.tsc_khz = self._tsc_khz()
        kernel = config.kernel or images.default_kernel()
        initrd = config.initrd
        if initrd is None and config.kernel is None and self._root_disk is None:
            initrd = images.default_initrd()  # a root disk boots its own init, not busybox's
        self.cmdline = self._cmdline()
        self.boot: BootInfo = setup_boot(self.mem, kernel, initrd, self.cmdline, config.vcpus)
        self._setup_vcpus(self.boot.cpu)

    # -- construction -------------------------------------------------------------------------

    @staticmethod
    def _block(d) -> Block:
        from .devices.virtio.block import Block  # only runs with drives import it

        kwargs = {}
        # Firecracker's drive options, passed only when set, so Block's defaults stay its own.
        if d.cache_type != "Unsafe":
            kwargs["cache_type"] = d.cache_type
        if d.io_engine != "Sync":
            kwargs["io_engine"] = d.io_engine
        if d.rate_limiter is not None:
            kwargs["rate_limiter"] = d.rate_limiter
        return Block(d.path, read_only=d.read_only, serial=d.id, **kwargs)

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
        kbd_irq = self._irqfd(KEYBOARD_IRQ)
        self.i8042 = I8042(self._guest_reset, irq=lambda: os.eventfd_write(kbd_irq, 1))
        self.pio.insert(self.i8042, 0x60, 5)
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
                # O_NONBLOCK: a FIFO without a reader must not hang the VMM (its writes then
                # fail with EAGAIN and are dropped, as a disconnected serial line's).
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                             | os.O_NONBLOCK, 0o644)
            except OSError as e:
                raise ConfigError(f"serial output {path}: {e.strerror}") from None
            self._fds.append(fd)
        else:
            fd = sys.stdout.fileno()

        def write(data: bytes, fd: int = fd) -> None:
            try:
                os.write(fd, data)
            except OSError:
                pass  # a closed terminal must not take the VM down

        return write

    def _setup_control(self, path: os.PathLike[str]) -> None:
        """The control socket: commands from the VMM and from devices that offer some."""
        from .control import ControlServer

        commands: dict[str, Callable[[list[str]], dict]] = {
            "status": lambda args: {"devices": self.devices.status()},
            "stop": lambda args: (self.request_stop(EXIT_OK, "stop requested on the control "
                                                    "socket"), {})[1],
        }
        commands.update(self.devices.commands())
        server = ControlServer(path, self.loop, commands)
        self._closers.append(server.close)

    def _tsc_khz(self) -> int | None:
        try:
            return self.vcpus[0].get_tsc_khz()
        except EmbervmError as e:
            log.info("no TSC frequency from KVM (%s): the guest will calibrate", e)
            return None

    def _cmdline(self) -> str:
        """The kernel command line: the user's words (or the defaults), then what embervm
        must announce (devices, root device, console).  On the PVM host the words the kit
        kernel needs there come first in every case (embervm.host)."""
        if self.config.cmdline is None:
            words = [f"{CMDLINE_REQUIRED} {CMDLINE_RECOMMENDED} {CMDLINE_EMBERVM}"
                     + (f" tsc_early_khz={self.tsc_khz} tsc=reliable" if self.tsc_khz else "")]
        else:
            profile = host_profile()
            words = [w for w in (profile.cmdline_words, self.config.cmdline) if w]
            if "acpi=" not in self.config.cmdline:
                words.append(CMDLINE_EMBERVM)  # no ACPI tables yet: devices are below
        # ACPI boot of the kit kernel does not work: devices are announced on the command line.
        for s in self.devices:
            words.append(s.kernel_arg)
        root = self._root_disk
        if root is not None:
            # As Firecracker: root=/dev/vda (the root drive is the first) or its PARTUUID.
            words.append(f"root=PARTUUID={root.partuuid}" if root.partuuid else "root=/dev/vda")
            words.append("ro" if root.read_only else "rw")
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
        """Boot the guest and serve it on this thread until it exits; return the exit status.
        Only for a VMM with its own loop (``embervm run``)."""
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            # vCPU threads are kicked out of KVM_RUN with this signal; the handler does nothing.
            old_handlers[kvmmod.KICK_SIGNAL] = signal.signal(kvmmod.KICK_SIGNAL,
                                                             lambda *_: None)
            if self._uses_stdin():
                # The host terminal changed size: a stdio console tells the guest (config change).
                old_handlers[signal.SIGWINCH] = signal.signal(
                    signal.SIGWINCH,
                    lambda *_: self.loop.call_soon_threadsafe(self._terminal_resized),
                )
        try:
            self._enter_terminal()
            self.start()
            self.loop.run()
        finally:
            self.teardown()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        return self.exit_status if self.exit_status is not None else EXIT_CRASH

    def _terminal_resized(self) -> None:
        for slot in self.devices:
            slot.device.terminal_resized()

    def start(self) -> None:
        """Register the devices and the VMM's fds on the loop and start the vCPU threads.
        Returns at once; the loop must be run (by the caller) for devices to work."""
        if self.started:
            raise StateError("the VM was already started")
        self.started = True
        loop = self.loop
        loop.add_eventfd(self._stop_fd, self._stopped)
        self.devices.register()
        stdin_fd = self._stdin_fd()
        if stdin_fd is not None:
            try:
                loop.add_reader(stdin_fd, lambda: self._stdin_ready(stdin_fd))
            except PermissionError:
                pass  # a regular file or /dev/null cannot be polled: no console input
        for vcpu in self.vcpus:
            t = threading.Thread(target=self._vcpu_thread, args=(vcpu,),
                                 name=f"vcpu{vcpu.index}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()

    def _stopped(self) -> None:
        """The stop eventfd fired (loop thread): the VM has ended."""
        self.loop.remove_reader(self._stop_fd)
        if self._on_exit is not None:
            self._on_exit()
        else:
            self.loop.stop()

    def teardown(self) -> None:
        """Stop the vCPU threads, restore the terminal and release everything (idempotent)."""
        if self.exit_status is None and self.started:
            self.stop(EXIT_CRASH, "torn down while running")
        with self._pause_cv:
            self._pause_requested = False
            self._pause_cv.notify_all()
        for vcpu in self.vcpus:
            if self._threads:
                vcpu.kick()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []
        self._leave_terminal()
        if self.started and not self._own_loop:
            self.loop.remove_reader(self._stop_fd)
            stdin_fd = self._stdin_fd()
            if stdin_fd is not None:
                self.loop.remove_reader(stdin_fd)
            for slot in self.devices:
                for fd in slot.queue_fds:
                    self.devices.device_loop.remove_reader(fd)
        self.close()

    def stop(self, status: int, reason: str = "") -> None:
        """Ask the VM to stop (any thread, idempotent): the first status wins, except that a
        guest that shuts down after :meth:`request_stop` exits with the requested status."""
        with self._stop_lock:
            if self.exit_status is not None:
                return
            if self._stop_requested is not None:
                status, asked = self._stop_requested
                reason = f"{asked}: {reason}"
            self.exit_status = status
            self.exit_reason = reason
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        log.info("stopping: %s (status %d)", reason, status)
        with self._pause_cv:  # a paused vCPU must wake up to leave
            self._pause_cv.notify_all()
        for vcpu in self.vcpus:
            vcpu.kick()
        os.eventfd_write(self._stop_fd, 1)

    # -- pause and resume ------------------------------------------------------------------------

    def pause(self, timeout: float = 5.0) -> None:
        """Park every vCPU outside KVM_RUN and stop device work at a request boundary.

        The vCPUs are kicked (``immediate_exit`` + signal), so KVM completes any MMIO or PIO
        in progress before KVM_RUN returns; each then waits on a condition.  The guest's
        clocks are not stopped: the TSC runs on (as on Firecracker), so after a resume guest
        time has advanced by the pause; guests with kvmclock get KVM_KVMCLOCK_CTRL so they do
        not report soft lockups.  Raises KvmError if a vCPU does not park in ``timeout``.
        """
        if self.paused or self.exit_status is not None:
            return
        self.devices.pause(timeout)
        with self._pause_cv:
            self._pause_requested = True
        for vcpu in self.vcpus:
            vcpu.kick()
        deadline = time.monotonic() + timeout
        with self._pause_cv:
            while self._parked < len(self._threads) and self.exit_status is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._pause_requested = False
                    self._pause_cv.notify_all()
                    self.devices.resume()
                    raise KvmError(f"only {self._parked} of {len(self._threads)} vCPUs paused "
                                   f"within {timeout} s")
                self._pause_cv.wait(left)
        for vcpu in self.vcpus:
            vcpu.kvmclock_ctrl()
        self.paused = True

    def resume(self) -> None:
        """Continue the vCPUs and device work where :meth:`pause` stopped them."""
        if not self.paused:
            return
        with self._pause_cv:
            self._pause_requested = False
            self._pause_cv.notify_all()
        self.devices.resume()
        self.paused = False

    def _park(self, vcpu: kvmmod.Vcpu) -> None:
        with self._pause_cv:
            self._parked += 1
            self._pause_cv.notify_all()
            while self._pause_requested and self.exit_status is None:
                self._pause_cv.wait()
            self._parked -= 1
        vcpu.immediate_exit = 0

    def ctrl_alt_del(self) -> None:
        """Press Ctrl-Alt-Del on the i8042 keyboard (Firecracker's SendCtrlAltDel): a Linux
        guest with the keyboard driver reboots (``reboot=k``: the VM then exits 0).  Raises
        StateError if the keyboard buffer is full (the guest is not reading it)."""
        if not self.i8042.trigger_ctrl_alt_del():
            raise StateError("the i8042 keyboard buffer is full: the guest is not reading it")

    # -- vCPU threads ------------------------------------------------------------------------------

    def request_stop(self, status: int, reason: str, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop gracefully (loop thread): press Ctrl-Alt-Del so the guest can shut down, and
        stop it after ``grace`` seconds if it has not.  The VM's exit status is ``status``
        either way.  A paused guest cannot react, and a second request does not wait: both
        stop at once."""
        if self.exit_status is not None:
            return
        if self._stop_requested or self.paused or grace <= 0 or not self.started:
            self.stop(status, reason)
            return
        self._stop_requested = (status, reason)
        try:
            self.ctrl_alt_del()
        except EmbervmError as e:
            self.stop(status, f"{reason} (Ctrl-Alt-Del not delivered: {e})")
            return
        log.info("%s: asked the guest to shut down (Ctrl-Alt-Del), %.0f s grace", reason, grace)
        self._stop_timer = self.loop.call_later(
            grace, lambda: self.stop(status, f"{reason}; the guest did not shut down within "
                                             f"{grace:.0f} s"))

    def _on_signal(self, signum: int, _frame: object) -> None:
        reason = f"signal {signal.Signals(signum).name}"
        self.loop.call_soon_threadsafe(lambda: self.request_stop(128 + signum, reason))

    def _guest_reset(self) -> None:
        self.stop(EXIT_OK, "guest reset through the i8042 (reboot)")

    def _vcpu_thread(self, vcpu: kvmmod.Vcpu) -> None:
        try:
            reason = self._vcpu_loop(vcpu)
        except BaseException as e:  # never die silently: a vCPU thread error stops the VM
            log.exception("vcpu%d failed", vcpu.index)
            self.stop(EXIT_CRASH, f"vcpu{vcpu.index} error: {e}")
            return
        if reason:
            self.stop(EXIT_CRASH, reason)

    def _leaving(self) -> bool:
        return self.exit_status is not None or self._pause_requested

    def _vcpu_loop(self, vcpu: kvmmod.Vcpu) -> str:
        """The exit loop.  Returns a crash description, or "" when asked to stop."""
        vcpu.attach_thread()
        if vcpu.index == 0:
            # For benchmarks/bench.py (VMM start -> first KVM_RUN): CLOCK_MONOTONIC is
            # system-wide, so the parent process can subtract its own start timestamp.
            log.info("vcpu0: first KVM_RUN at monotonic %.6f", time.monotonic())
        while True:
            reason = exit_loop(vcpu, self.pio, self.mmio, self._leaving)
            if reason != kvmmod.EXIT_INTR:
                return self._unusual_exit(vcpu, reason)
            if self.exit_status is not None:
                return ""
            self._park(vcpu)

    def _unusual_exit(self, vcpu: kvmmod.Vcpu, reason: int) -> str:
        if reason == kvmio.KVM_EXIT_SHUTDOWN:
            return f"vcpu{vcpu.index}: triple fault (KVM_EXIT_SHUTDOWN): the guest crashed"
        if reason == kvmio.KVM_EXIT_HLT:
            return f"vcpu{vcpu.index}: halted with interrupts off"
        if reason == kvmio.KVM_EXIT_SYSTEM_EVENT:
            self.stop(EXIT_OK, "guest system event (reset/shutdown)")
            return ""
        return f"vcpu{vcpu.index}: unhandled KVM exit {vcpu.describe_exit(reason)}"

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


def _optional_devices(config: VmConfig) -> list[tuple[VirtioDevice, str | None]]:
    """The devices beyond the disks with their slot ids, in a fixed order (their IRQs and
    addresses follow it).

    Imported here, not at the top, so a VMM without these devices does not load them.
    """
    devices: list[tuple[VirtioDevice, str | None]] = []
    for i, n in enumerate(config.nets):
        from .devices.virtio.net import Net

        kwargs = {}
        if n.rx_rate_limiter is not None:
            kwargs["rx_rate_limiter"] = n.rx_rate_limiter
        if n.tx_rate_limiter is not None:
            kwargs["tx_rate_limiter"] = n.tx_rate_limiter
        devices.append((Net(n.tap, mac=n.mac, **kwargs), n.id or f"net{i}"))
    if config.console is not None:
        from .devices.virtio.console import Console

        devices.append((Console(config.console.kind, config.console.path), "console"))
    if config.vsock is not None:
        from .devices.virtio.vsock import Vsock

        devices.append((Vsock(config.vsock.cid, config.vsock.uds), "vsock"))
    if config.balloon is not None:
        from .devices.virtio.balloon import Balloon

        b = config.balloon
        devices.append((Balloon(b.target_mib, deflate_on_oom=b.deflate_on_oom,
                                stats_seconds=b.stats_seconds), "balloon"))
    if config.rng:
        from .devices.virtio.rng import Rng  # with its rate limiter (embervm.ratelimit)

        kwargs = {}
        if config.rng_rate_limiter is not None:
            kwargs["rate_limiter"] = config.rng_rate_limiter
        devices.append((Rng(**kwargs), "rng"))
    return devices


def _set_segment(dst: object, src: Segment) -> None:
    for name in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
                 "avl"):
        setattr(dst, name, getattr(src, name))
