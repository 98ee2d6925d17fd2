"""/dev/kvm through ctypes: the system, VM and vCPU file descriptors (as rust-vmm kvm-ioctls).

Every ioctl goes through libc's ``ioctl`` called with ctypes (``use_errno=True``).  ctypes
releases the GIL for the duration of the call, so a vCPU thread sitting in ``KVM_RUN`` does not
stop the rest of the VMM, and a failed call gives its errno back instead of being retried.

The exit loop (:meth:`Vcpu.serve`) is the exception: it calls ``fcntl.ioctl(fd, KVM_RUN)``,
which is 0.2 us cheaper per exit than the ctypes call (measured: ctypes 0.52 us, fcntl 0.32 us,
C 0.23 us for a trivial ioctl).  Only the two-argument form is that cheap: with an ``arg`` it
first tries to parse it as a buffer, twice, and costs 1.0 us.  It releases the GIL too, and it
does not retry on EINTR (``ioctl`` is not among the calls PEP 475 retries): an interrupted
``KVM_RUN`` raises InterruptedError, which the loop turns into :data:`EXIT_INTR`.

Stopping a running vCPU (:meth:`Vcpu.kick`) follows the KVM API documentation
(``immediate_exit``, Documentation/virt/kvm/api.rst): set ``kvm_run.immediate_exit`` so a
``KVM_RUN`` that has not started yet returns at once, then signal the vCPU thread so one that
is already inside the guest leaves with EINTR.  The signal is :data:`KICK_SIGNAL` and needs a
Python-level handler (any callable; :func:`install_kick_handler` installs a no-op one), set
from the main thread because Python only lets the main thread install handlers.  Without one
the signal would kill the process (SIG_DFL) or never interrupt KVM_RUN (SIG_IGN), so
:meth:`Vcpu.kick` refuses to send it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterable
from types import FrameType, TracebackType
from typing import Self

from ..errors import KvmError
from ..memory import GuestMemory
from . import ioctls as k
from .cpuid import CpuidEntry
from .ioctls import (
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_SYSTEM_EVENT,
    Regs,
    Sregs,
)

__all__ = [
    "EXIT_INTR",
    "KICK_SIGNAL",
    "KVM_EXIT_FAIL_ENTRY",
    "KVM_EXIT_HLT",
    "KVM_EXIT_INTERNAL_ERROR",
    "KVM_EXIT_IO",
    "KVM_EXIT_IO_IN",
    "KVM_EXIT_IO_OUT",
    "KVM_EXIT_MMIO",
    "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_SYSTEM_EVENT",
    "REQUIRED_CAPABILITIES",
    "Kvm",
    "Vcpu",
    "Vm",
    "install_kick_handler",
]

# Returned by Vcpu.run() when KVM_RUN was interrupted (EINTR: a signal or immediate_exit;
# EAGAIN: KVM asks to be called again). Not a KVM exit reason: those are all >= 0.
EXIT_INTR = -1

# A real-time signal, as Firecracker uses SIGRTMIN + 0 for its vCPU kicks: nothing else in a
# Python process (pytest, faulthandler, subprocess) expects it, unlike SIGUSR1/SIGUSR2.
KICK_SIGNAL: int = signal.SIGRTMIN

# Capabilities embervm relies on, in the order a missing one is reported.
REQUIRED_CAPABILITIES: tuple[tuple[str, int], ...] = (
    ("KVM_CAP_USER_MEMORY", k.KVM_CAP_USER_MEMORY),
    ("KVM_CAP_IRQCHIP", k.KVM_CAP_IRQCHIP),
    ("KVM_CAP_PIT2", k.KVM_CAP_PIT2),
    ("KVM_CAP_IOEVENTFD", k.KVM_CAP_IOEVENTFD),
    ("KVM_CAP_IRQFD", k.KVM_CAP_IRQFD),
    ("KVM_CAP_SET_TSS_ADDR", k.KVM_CAP_SET_TSS_ADDR),
    ("KVM_CAP_SET_IDENTITY_MAP_ADDR", k.KVM_CAP_SET_IDENTITY_MAP_ADDR),
    ("KVM_CAP_EXT_CPUID", k.KVM_CAP_EXT_CPUID),
    ("KVM_CAP_IMMEDIATE_EXIT", k.KVM_CAP_IMMEDIATE_EXIT),
    ("KVM_CAP_MP_STATE", k.KVM_CAP_MP_STATE),
    ("KVM_CAP_GET_TSC_KHZ", k.KVM_CAP_GET_TSC_KHZ),
)

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int
# KVM_RUN gets its own function object without argtypes: converting through argtypes cost
# ~0.4 us per exit in the PIO loop of tests/kvm (8.5 -> 8.1 us; C does the exit in ~7.0 us).
# Plain ints are passed as C int and widened to 64 bits by libffi; KVM_RUN (0xae80) is
# positive and ignores its argument.
_ioctl_run = _libc["ioctl"]  # item access makes a new object; attribute access is cached
_ioctl_run.restype = ctypes.c_int
_get_errno = ctypes.get_errno
_KVM_RUN = k.KVM_RUN
_RUN_INTERRUPTED = (errno.EINTR, errno.EAGAIN)

# Largest table KVM_GET_SUPPORTED_CPUID is asked for before giving up (the kernel's own limit,
# KVM_MAX_CPUID_ENTRIES, is 256 today).
_MAX_CPUID_ENTRIES = 4096

_IO_EXIT = struct.Struct("<BBHIQ")  # kvm_run.io
_MMIO_EXIT = struct.Struct("<QQIB")  # kvm_run.mmio: phys_addr, data[8] as one u64, len, is_write
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_FAIL_ENTRY = struct.Struct("<QI")
_EVENT_HEAD = struct.Struct("<II")  # internal / system_event: suberror or type, ndata
_MASKS = tuple((1 << (8 * n)) - 1 for n in range(9))


def _error_text(err: int) -> str:
    return f"{os.strerror(err)} ({errno.errorcode.get(err, err)})"


def _call(fd: int, request: int, arg: object, what: str) -> int:
    """ioctl that raises KvmError on failure. EINTR is retried: only KVM_RUN must surface it."""
    while True:
        ret: int = _ioctl(fd, request, arg)
        if ret >= 0:
            return ret
        err = _get_errno()
        if err != errno.EINTR:
            raise KvmError(f"{what} failed: {_error_text(err)}")


def _noop_kick_handler(signum: int, frame: FrameType | None) -> None:
    """The kick only has to interrupt KVM_RUN; there is nothing to do when it arrives."""


def install_kick_handler() -> None:
    """Install the (no-op) handler for :data:`KICK_SIGNAL`. Call once, from the main thread,
    before any :meth:`Vcpu.kick`."""
    try:
        signal.signal(KICK_SIGNAL, _noop_kick_handler)
    except ValueError as e:  # "signal only works in main thread of the main interpreter"
        raise KvmError(f"install_kick_handler() must run in the main thread: {e}") from None


class Kvm:
    """The KVM system file descriptor (/dev/kvm)."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmError(
                f"no {path}: this host has no KVM; enable virtualization (VT-x/AMD-V, or nested "
                "virtualization in a VM) and load the kvm module (modprobe kvm_intel or kvm_amd)"
            ) from None
        except PermissionError:
            raise KvmError(
                f"no permission to open {path}: add yourself to the kvm group "
                "(usermod -aG kvm $USER, then log in again) or run as root"
            ) from None
        except OSError as e:
            if e.errno in (errno.ENXIO, errno.ENODEV):
                raise KvmError(
                    f"{path} exists but no KVM driver answers: load the kvm module "
                    "(modprobe kvm_intel or kvm_amd) and check that virtualization is enabled"
                ) from None
            raise KvmError(f"cannot open {path}: {e.strerror}") from None
        self.fd = fd
        try:
            api = _ioctl(fd, k.KVM_GET_API_VERSION, 0)
            if api < 0:
                raise KvmError(
                    f"{path} is not a KVM device: KVM_GET_API_VERSION failed with "
                    f"{_error_text(_get_errno())}"
                )
            if api != k.KVM_API_VERSION:
                raise KvmError(
                    f"{path} speaks KVM API version {api}; embervm needs {k.KVM_API_VERSION}"
                )
            self.api_version: int = api
            self.vcpu_mmap_size: int = _call(
                fd, k.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"
            )
        except BaseException:
            os.close(fd)
            raise

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if absent, otherwise a capability-specific positive value."""
        return _call(self.fd, k.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def require_extensions(self) -> None:
        """Raise KvmError naming the first capability embervm needs that this KVM lacks."""
        for name, cap in REQUIRED_CAPABILITIES:
            if self.check_extension(cap) <= 0:
                raise KvmError(
                    f"this host's KVM lacks {name}, which embervm needs; "
                    "use a newer host kernel (Linux 4.11 or later has them all)"
                )

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: every leaf/subleaf KVM can present to a guest."""
        n = 256
        while True:
            buf = k.cpuid2_struct(n)()
            buf.nent = n
            ret = _ioctl(self.fd, k.KVM_GET_SUPPORTED_CPUID, ctypes.byref(buf))
            if ret >= 0:
                break
            err = _get_errno()
            if err == errno.E2BIG and n < _MAX_CPUID_ENTRIES:
                n *= 2  # the kernel wants a larger table
                continue
            if err == errno.EINTR:
                continue
            raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {_error_text(err)}")
        return [
            CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in buf.entries[: buf.nent]
        ]

    def create_vm(self) -> Vm:
        """KVM_CREATE_VM (machine type 0: the default x86 VM)."""
        return Vm(self, _call(self.fd, k.KVM_CREATE_VM, 0, "KVM_CREATE_VM"))

    def close(self) -> None:
        """Close /dev/kvm. VMs created from it stay valid (the kernel counts references)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Vm:
    """A KVM VM file descriptor. Owns the vCPUs created from it (closed with it)."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = kvm.vcpu_mmap_size
        self.vcpus: list[Vcpu] = []
        self._next_slot = 0
        # KVM maps guest RAM by host virtual address; the mappings must outlive the VM.
        self._memory: list[GuestMemory] = []

    # -- machine set-up ---------------------------------------------------------------------

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: 3 pages of guest-physical space Intel's real-mode emulation needs
        (outside RAM and MMIO; Firecracker uses 0xfffbd000)."""
        _call(self.fd, k.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the identity page table of Intel's
        unrestricted-guest-less real mode (Firecracker uses 0xfffbc000, below the TSS)."""
        value = ctypes.c_uint64(addr)
        what = "KVM_SET_IDENTITY_MAP_ADDR"
        _call(self.fd, k.KVM_SET_IDENTITY_MAP_ADDR, ctypes.byref(value), what)

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC pair, IOAPIC and a local APIC per vCPU. Must come
        before the vCPUs are created."""
        _call(self.fd, k.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        """KVM_CREATE_PIT2: in-kernel i8254 on ports 0x40-0x43, plus port 0x61 (the speaker
        port Linux reads while calibrating: SPEAKER_DUMMY, as Firecracker)."""
        config = k.PitConfig(flags=k.KVM_PIT_SPEAKER_DUMMY)
        _call(self.fd, k.KVM_CREATE_PIT2, ctypes.byref(config), "KVM_CREATE_PIT2")

    def set_user_memory_region(
        self, slot: int, guest_addr: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION (size 0 deletes the slot)."""
        region = k.UserspaceMemoryRegion(slot, flags, guest_addr, size, host_addr)
        _call(
            self.fd,
            k.KVM_SET_USER_MEMORY_REGION,
            ctypes.byref(region),
            f"KVM_SET_USER_MEMORY_REGION (slot {slot}, {guest_addr:#x}+{size:#x})",
        )

    def register_memory(self, mem: GuestMemory) -> None:
        """Give KVM every region of ``mem``, one memory slot each, from the next free slot."""
        for region in mem.regions:
            self.set_user_memory_region(
                self._next_slot, region.guest_addr, region.size, region.host_addr
            )
            self._next_slot += 1
        self._memory.append(mem)

    # -- interrupts and notifications -------------------------------------------------------

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        datamatch: int | None = None,
        *,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """KVM_IOEVENTFD: a guest write of ``length`` bytes at ``addr`` (of ``datamatch``, if
        given) signals eventfd ``fd`` inside KVM, without an exit to user space. ``length`` 0
        matches writes of any size (KVM_CAP_IOEVENTFD_ANY_LENGTH; no datamatch then).
        Deassigning needs the same arguments as the assignment."""
        if length not in (0, 1, 2, 4, 8):
            raise ValueError(f"ioeventfd length must be 0, 1, 2, 4 or 8, not {length}")
        flags = 0
        if datamatch is not None:
            if length == 0:
                raise ValueError("an ioeventfd with datamatch needs a length")
            flags |= k.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= k.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= k.KVM_IOEVENTFD_FLAG_DEASSIGN
        req = k.Ioeventfd(
            datamatch=(datamatch or 0) & _MASKS[8], addr=addr, len=length, fd=fd, flags=flags
        )
        space = "port" if pio else "MMIO"
        _call(
            self.fd,
            k.KVM_IOEVENTFD,
            ctypes.byref(req),
            f"KVM_IOEVENTFD ({'deassign ' if deassign else ''}{space} {addr:#x}/{length})",
        )

    def irqfd(
        self, fd: int, gsi: int, resample_fd: int | None = None, *, deassign: bool = False
    ) -> None:
        """KVM_IRQFD: writing eventfd ``fd`` raises ``gsi`` inside KVM. With ``resample_fd`` the
        line is level-triggered: KVM lowers it on the guest's EOI and signals ``resample_fd``
        so the device can raise it again if still pending."""
        flags = 0
        if resample_fd is not None:
            flags |= k.KVM_IRQFD_FLAG_RESAMPLE
        if deassign:
            flags |= k.KVM_IRQFD_FLAG_DEASSIGN
        req = k.Irqfd(fd=fd, gsi=gsi, flags=flags, resamplefd=resample_fd or 0)
        _call(
            self.fd,
            k.KVM_IRQFD,
            ctypes.byref(req),
            f"KVM_IRQFD ({'deassign ' if deassign else ''}gsi {gsi})",
        )

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: set GSI ``irq`` to ``level`` (0/1) on the in-kernel PIC and IOAPIC."""
        req = k.IrqLevel(irq, level)
        _call(self.fd, k.KVM_IRQ_LINE, ctypes.byref(req), f"KVM_IRQ_LINE (irq {irq})")

    # -- vCPUs ------------------------------------------------------------------------------

    def create_vcpu(self, index: int) -> Vcpu:
        """KVM_CREATE_VCPU with vCPU id ``index`` (which is also its initial APIC ID)."""
        fd = _call(self.fd, k.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU ({index})")
        try:
            vcpu = Vcpu(fd, index, self.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close the vCPUs and the VM. Guest memory stays mapped (it belongs to its owner)."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._memory.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Vcpu:
    """A KVM vCPU file descriptor and its mmap'd ``struct kvm_run``.

    Threading: :meth:`run` and the exit accessors belong to the vCPU's own thread.
    :meth:`kick` (and the ``immediate_exit`` property) may be used from any thread.
    """

    __slots__ = ("fd", "index", "run_mmap", "_thread", "_u8", "_u32", "_u64", "_kick_lock",
                 "exit_counts")

    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        self.run_mmap: mmap.mmap = mmap.mmap(
            fd, mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        # Typed views of the same page: the hot exit_reason read is one index, not an unpack.
        self._u8 = memoryview(self.run_mmap)
        self._u32 = self._u8.cast("I")
        self._u64 = self._u8.cast("Q")
        # The thread that calls run(): recorded by attach_thread() or by the first run().
        self._thread: threading.Thread | None = None
        self._kick_lock = threading.Lock()
        #: exits served by :meth:`serve`: [io_in, io_out, mmio_read, mmio_write]
        self.exit_counts = [0, 0, 0, 0]

    # -- registers --------------------------------------------------------------------------

    def get_regs(self) -> Regs:
        regs = Regs()
        _call(self.fd, k.KVM_GET_REGS, ctypes.byref(regs), "KVM_GET_REGS")
        return regs

    def set_regs(self, r: Regs) -> None:
        _call(self.fd, k.KVM_SET_REGS, ctypes.byref(r), "KVM_SET_REGS")

    def get_sregs(self) -> Sregs:
        sregs = Sregs()
        _call(self.fd, k.KVM_GET_SREGS, ctypes.byref(sregs), "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, s: Sregs) -> None:
        _call(self.fd, k.KVM_SET_SREGS, ctypes.byref(s), "KVM_SET_SREGS")

    def set_fpu(self, fcw: int = 0x37F, mxcsr: int = 0x1F80) -> None:
        """KVM_SET_FPU with the x87 control word and MXCSR a CPU has after FNINIT / reset
        (all exceptions masked, round to nearest); the rest is zero.  (The PVM host this was
        written on ignores MXCSR here and reads it back as 0; its reset value is 0x1f80.)"""
        fpu = k.Fpu(fcw=fcw, mxcsr=mxcsr)
        _call(self.fd, k.KVM_SET_FPU, ctypes.byref(fpu), "KVM_SET_FPU")

    def get_fpu(self) -> k.Fpu:
        fpu = k.Fpu()
        _call(self.fd, k.KVM_GET_FPU, ctypes.byref(fpu), "KVM_GET_FPU")
        return fpu

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS; KvmError if KVM could not read one of them."""
        wanted = list(indices)
        buf = k.msrs_struct(len(wanted))()
        buf.nmsrs = len(wanted)
        for entry, index in zip(buf.entries, wanted, strict=True):
            entry.index = index
        got = _call(self.fd, k.KVM_GET_MSRS, ctypes.byref(buf), "KVM_GET_MSRS")
        if got < len(wanted):
            raise KvmError(f"KVM_GET_MSRS could not read MSR {wanted[got]:#x}")
        return {e.index: e.data for e in buf.entries}

    def set_msrs(self, msrs: dict[int, int]) -> None:
        """KVM_SET_MSRS; KvmError naming the first MSR KVM refused (it stops there)."""
        buf = k.msrs_struct(len(msrs))()
        buf.nmsrs = len(msrs)
        for entry, (index, value) in zip(buf.entries, msrs.items(), strict=True):
            entry.index = index
            entry.data = value
        done = _call(self.fd, k.KVM_SET_MSRS, ctypes.byref(buf), "KVM_SET_MSRS")
        if done < len(msrs):
            index = buf.entries[done].index
            raise KvmError(
                f"KVM_SET_MSRS set {done} of {len(msrs)} MSRs: KVM refused MSR {index:#x} "
                f"= {buf.entries[done].data:#x}"
            )

    def set_boot_msrs(self) -> None:
        """The MSRs a 64-bit Linux entry expects, as Firecracker's create_boot_msr_entries:
        SYSENTER/SYSCALL MSRs and KERNEL_GS_BASE cleared, TSC at 0, fast strings enabled
        (Linux checks MISC_ENABLE before using ``rep movs`` for memcpy).  Plus, as
        cloud-hypervisor, MTRRs enabled with write-back as the default type: with MTRRs off a
        Linux guest treats its RAM as uncached wherever the MTRRs decide the memory type."""
        self.set_msrs(
            {
                k.MSR_IA32_SYSENTER_CS: 0,
                k.MSR_IA32_SYSENTER_ESP: 0,
                k.MSR_IA32_SYSENTER_EIP: 0,
                k.MSR_STAR: 0,
                k.MSR_CSTAR: 0,
                k.MSR_KERNEL_GS_BASE: 0,
                k.MSR_SYSCALL_MASK: 0,
                k.MSR_LSTAR: 0,
                k.MSR_IA32_TSC: 0,
                k.MSR_IA32_MISC_ENABLE: k.MSR_IA32_MISC_ENABLE_FAST_STRING,
                k.MSR_MTRR_DEF_TYPE: k.MTRR_DEF_TYPE_ENABLE | k.MTRR_TYPE_WRBACK,
            }
        )

    def set_cpuid(self, entries: list[CpuidEntry]) -> None:
        """KVM_SET_CPUID2 (see :func:`embervm.kvm.cpuid.build_cpuid`). Must come before the
        first KVM_RUN: KVM refuses CPUID changes afterwards."""
        buf = k.cpuid2_struct(len(entries))()
        buf.nent = len(entries)
        for dst, src in zip(buf.entries, entries, strict=True):
            dst.function = src.function
            dst.index = src.index
            dst.flags = src.flags
            dst.eax = src.eax
            dst.ebx = src.ebx
            dst.ecx = src.ecx
            dst.edx = src.edx
        _call(self.fd, k.KVM_SET_CPUID2, ctypes.byref(buf), "KVM_SET_CPUID2")

    def get_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the table this vCPU presents (after set_cpuid)."""
        n = 256
        while True:
            buf = k.cpuid2_struct(n)()
            buf.nent = n
            if _ioctl(self.fd, k.KVM_GET_CPUID2, ctypes.byref(buf)) >= 0:
                break
            err = _get_errno()
            if err == errno.E2BIG and n < _MAX_CPUID_ENTRIES:
                n *= 2
            elif err != errno.EINTR:
                raise KvmError(f"KVM_GET_CPUID2 failed: {_error_text(err)}")
        return [
            CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in buf.entries[: buf.nent]
        ]

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency (what Linux's tsc_early_khz= wants)."""
        return _call(self.fd, k.KVM_GET_TSC_KHZ, 0, "KVM_GET_TSC_KHZ")

    def kvmclock_ctrl(self) -> bool:
        """KVM_KVMCLOCK_CTRL: tell a kvmclock guest that it was paused (so its watchdogs do
        not report soft lockups).  False when the guest has no kvmclock (EINVAL): nothing to
        tell."""
        try:
            _call(self.fd, k.KVM_KVMCLOCK_CTRL, 0, "KVM_KVMCLOCK_CTRL")
        except KvmError:
            return False
        return True

    def get_lapic(self) -> k.LapicState:
        lapic = k.LapicState()
        _call(self.fd, k.KVM_GET_LAPIC, ctypes.byref(lapic), "KVM_GET_LAPIC")
        return lapic

    def set_lapic(self, lapic: k.LapicState) -> None:
        _call(self.fd, k.KVM_SET_LAPIC, ctypes.byref(lapic), "KVM_SET_LAPIC")

    def set_lint(self) -> None:
        """Local APIC LVT LINT0 = ExtINT (the 8259 PIC's output, so legacy interrupts reach
        the BSP through virtual-wire mode) and LINT1 = NMI, as a PC's firmware leaves them and
        as Firecracker's set_lint does. Needs the in-kernel irqchip."""
        lapic = self.get_lapic()
        regs = lapic.regs
        for reg, mode in ((k.APIC_LVT0, k.APIC_MODE_EXTINT), (k.APIC_LVT1, k.APIC_MODE_NMI)):
            value = _U32.unpack_from(regs, reg)[0]
            # delivery mode is LVT bits 10:8
            _U32.pack_into(regs, reg, (value & ~0x700) | (mode << 8))
        self.set_lapic(lapic)

    def get_mp_state(self) -> int:
        state = k.MpState()
        _call(self.fd, k.KVM_GET_MP_STATE, ctypes.byref(state), "KVM_GET_MP_STATE")
        return state.mp_state

    def set_mp_state(self, mp_state: int) -> None:
        state = k.MpState(mp_state)
        _call(self.fd, k.KVM_SET_MP_STATE, ctypes.byref(state), "KVM_SET_MP_STATE")

    # -- the run loop (vCPU thread) ---------------------------------------------------------

    def run(self) -> int:
        """One KVM_RUN. Returns ``kvm_run.exit_reason`` (a ``KVM_EXIT_*``), or
        :data:`EXIT_INTR` when KVM_RUN was interrupted (kick, another signal, or
        ``immediate_exit`` already set).  Never retries by itself; ``immediate_exit`` is left
        as it is, so the caller decides when to clear it and run again."""
        if self._thread is None:
            self._thread = threading.current_thread()
        if _ioctl_run(self.fd, _KVM_RUN, 0) < 0:
            err = _get_errno()
            if err in _RUN_INTERRUPTED:
                return EXIT_INTR
            raise KvmError(f"KVM_RUN on vCPU {self.index} failed: {_error_text(err)}")
        return self._u32[2]  # exit_reason, byte offset 8

    def serve(
        self,
        pio_read: Callable[[int, int], int],
        pio_write: Callable[[int, int, int], None],
        mmio_read: Callable[[int, int], int],
        mmio_write: Callable[[int, int, int], None],
        stopping: Callable[[], bool],
    ) -> int:
        """Run the vCPU, serving its port-I/O and MMIO exits, until any other exit; return
        that exit's reason.  An interrupted KVM_RUN returns :data:`EXIT_INTR` if
        ``stopping()`` is true and is retried otherwise.

        The handlers get ``(port_or_addr, size)`` / ``(port_or_addr, size, value)`` with
        little-endian integer values; what a read handler returns is masked to ``size`` bytes
        before the guest sees it.  An MMIO write handler gets the raw 64-bit
        ``kvm_run.mmio.data`` word for MMIO: the bytes past ``size`` are stale, so it must
        mask (the bus does).

        This is the VMM's hottest loop (one iteration per exit; see docs/PERFORMANCE.md), so
        it is :meth:`run`, :meth:`io_exit`, :meth:`mmio_exit` and :meth:`set_mmio_data`
        inlined: ``KVM_RUN`` through ``fcntl.ioctl`` (see the module docstring), kvm_run read
        through memoryview casts instead of struct unpacking, every name a local, and the
        common one-byte port access read and written as a single mmap index.  Measured in
        place (benchmarks/exitbench.py, port 0x80 writes against the C loop on the same
        vCPU): +1.07 us per exit over C with the method calls, +0.65 us like this.
        """
        if self._thread is None:
            self._thread = threading.current_thread()
        ioctl, fd, req = fcntl.ioctl, self.fd, _KVM_RUN
        page = self.run_mmap
        u32 = self._u32
        u64 = self._u64
        from_bytes = int.from_bytes
        interrupted = _RUN_INTERRUPTED
        # Exit counts for the metrics (Firecracker's vcpu group): one list store per exit.
        counts = self.exit_counts
        while True:
            try:
                ioctl(fd, req)
            except OSError as e:
                if e.errno in interrupted:
                    if stopping():
                        return EXIT_INTR
                    continue
                raise KvmError(
                    f"KVM_RUN on vCPU {self.index} failed: {_error_text(e.errno)}"
                ) from None
            reason = u32[2]  # exit_reason
            if reason == KVM_EXIT_IO:
                # kvm_run.io: u8 direction, u8 size, u16 port | u32 count | u64 data_offset
                # (the offset is inside the kvm_run mapping: its low half is all of it).
                head = u32[8]
                off = u32[10]
                if head & 0xFF00 == 0x100 and u32[9] == 1:  # one byte: the common case
                    if head & 1:  # KVM_EXIT_IO_OUT
                        counts[1] += 1
                        pio_write(head >> 16, 1, page[off])
                    else:
                        counts[0] += 1
                        page[off] = pio_read(head >> 16, 1) & 0xFF
                    continue
                out, size, port, count = head & 1, head >> 8 & 0xFF, head >> 16, u32[9]
                counts[out] += 1
                # Wider accesses, and string I/O (``rep outsb``: count items of size bytes).
                # KVM bounds count * size by the data area, the rest of the kvm_run mapping.
                mask = _MASKS[size if size <= 8 else 8]
                for i in range(count):
                    o = off + i * size
                    if out:
                        pio_write(port, size, from_bytes(page[o : o + size], "little"))
                    else:
                        page[o : o + size] = (pio_read(port, size) & mask).to_bytes(size, "little")
            elif reason == KVM_EXIT_MMIO:
                # kvm_run.mmio: u64 phys_addr | u8 data[8] | u32 len | u8 is_write
                if page[52]:
                    counts[3] += 1
                    mmio_write(u64[4], u32[12], u64[5])
                else:
                    counts[2] += 1
                    # kvm_run.mmio.data is 8 bytes: KVM never asks for more.
                    u64[5] = mmio_read(u64[4], u32[12]) & 0xFFFF_FFFF_FFFF_FFFF
            else:
                return reason

    @property
    def immediate_exit(self) -> int:
        """``kvm_run.immediate_exit``: when non-zero, KVM_RUN returns EINTR without entering
        the guest."""
        return self._u8[k.RUN_IMMEDIATE_EXIT]

    @immediate_exit.setter
    def immediate_exit(self, value: int) -> None:
        self._u8[k.RUN_IMMEDIATE_EXIT] = value

    @property
    def thread_id(self) -> int | None:
        """``threading.get_ident()`` of the vCPU thread, once known."""
        thread = self._thread
        return thread.ident if thread is not None else None

    def attach_thread(self) -> None:
        """Record the calling thread as this vCPU's thread, the one kick() signals. The first
        run() does it too; call it explicitly when a vCPU moves to another thread."""
        with self._kick_lock:
            self._thread = threading.current_thread()

    def detach_thread(self) -> None:
        """Forget the vCPU thread (kick() then only sets immediate_exit)."""
        with self._kick_lock:
            self._thread = None

    def kick(self) -> None:
        """Make this vCPU's KVM_RUN return EXIT_INTR soon, from any thread: sets
        ``immediate_exit`` (covers a vCPU thread that is about to enter KVM_RUN) and sends
        :data:`KICK_SIGNAL` to the vCPU thread (covers one already inside the guest).
        Requires a Python handler for the signal (:func:`install_kick_handler`)."""
        handler = signal.getsignal(KICK_SIGNAL)
        if not callable(handler):  # SIG_DFL, SIG_IGN, or installed outside Python
            raise KvmError(
                "Vcpu.kick() needs a handler for the kick signal: call "
                "embervm.kvm.install_kick_handler() from the main thread first"
            )
        self._u8[k.RUN_IMMEDIATE_EXIT] = 1
        with self._kick_lock:
            thread = self._thread
            # A thread that has ended must not be signalled: its id may be reused or freed.
            if thread is not None and thread.is_alive() and thread.ident is not None:
                # ProcessLookupError: it ended between is_alive() and the kill
                with contextlib.suppress(ProcessLookupError):
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)

    # -- exit decoding (zero-copy on the kvm_run page) --------------------------------------

    def io_exit(self) -> tuple[int, int, int, int, int]:
        """KVM_EXIT_IO: (direction, size, port, count, data_offset). The data, ``size *
        count`` bytes, is at ``data_offset`` in :attr:`run_mmap`: read it for OUT (direction
        1), write it there for IN (direction 0)."""
        return _IO_EXIT.unpack_from(self.run_mmap, 32)  # type: ignore[return-value]

    def mmio_exit(self) -> tuple[int, int, int, bool]:
        """KVM_EXIT_MMIO: (phys_addr, value, length, is_write); ``value`` is the written data
        as a little-endian integer of ``length`` bytes (meaningless for a read)."""
        addr, data, length, is_write = _MMIO_EXIT.unpack_from(self.run_mmap, 32)
        return addr, data & _MASKS[length if length <= 8 else 8], length, is_write != 0

    def set_mmio_data(self, value: int, length: int) -> None:
        """The result of an MMIO read exit, for the guest to see on the next KVM_RUN."""
        if not 0 < length <= 8:
            raise ValueError(f"MMIO access length must be 1..8 bytes, not {length}")
        _U64.pack_into(self.run_mmap, k.RUN_MMIO_DATA, value & _MASKS[length])

    def fail_entry_exit(self) -> tuple[int, int]:
        """KVM_EXIT_FAIL_ENTRY: (hardware_entry_failure_reason, host cpu)."""
        return _FAIL_ENTRY.unpack_from(self.run_mmap, k.RUN_FAIL_ENTRY)  # type: ignore[return-value]

    def _event_exit(self) -> tuple[int, tuple[int, ...]]:
        kind, ndata = _EVENT_HEAD.unpack_from(self.run_mmap, k.RUN_EXIT_UNION)
        ndata = min(ndata, k.RUN_UNION_DATA_WORDS)  # the array has 16 slots whatever ndata says
        data = struct.unpack_from(f"<{ndata}Q", self.run_mmap, k.RUN_EXIT_UNION + 8)
        return kind, data

    def internal_error_exit(self) -> tuple[int, tuple[int, ...]]:
        """KVM_EXIT_INTERNAL_ERROR: (suberror, data words)."""
        return self._event_exit()

    def system_event_exit(self) -> tuple[int, tuple[int, ...]]:
        """KVM_EXIT_SYSTEM_EVENT: (type, data words), type KVM_SYSTEM_EVENT_SHUTDOWN etc."""
        return self._event_exit()

    def describe_exit(self, exit_reason: int) -> str:
        """A one-line account of an exit the VMM cannot handle, for its error message."""
        name = k.EXIT_REASON_NAMES.get(exit_reason, f"exit reason {exit_reason}")
        if exit_reason == k.KVM_EXIT_FAIL_ENTRY:
            reason, cpu = self.fail_entry_exit()
            detail = f"hardware entry failure reason {reason:#x} on host cpu {cpu}"
        elif exit_reason == k.KVM_EXIT_INTERNAL_ERROR:
            suberror, data = self.internal_error_exit()
            detail = f"suberror {suberror}, data [{', '.join(f'{d:#x}' for d in data)}]"
        elif exit_reason == k.KVM_EXIT_SYSTEM_EVENT:
            kind, data = self.system_event_exit()
            detail = f"event type {kind}, data [{', '.join(f'{d:#x}' for d in data)}]"
        elif exit_reason == k.KVM_EXIT_SHUTDOWN:
            detail = "the guest triple-faulted or asked for a shutdown"
        elif exit_reason == k.KVM_EXIT_IO:
            direction, size, port, count, _ = self.io_exit()
            detail = f"{'out' if direction else 'in'} port {port:#x} size {size} count {count}"
        elif exit_reason == k.KVM_EXIT_MMIO:
            addr, value, length, is_write = self.mmio_exit()
            detail = f"{'write' if is_write else 'read'} {addr:#x}/{length} value {value:#x}"
        else:
            detail = ""
        try:
            rip = f" at rip {self.get_regs().rip:#x}"
        except KvmError:
            rip = ""
        return f"vCPU {self.index}: {name}{rip}{': ' + detail if detail else ''}"

    def close(self) -> None:
        if self.fd < 0:
            return
        self._u64.release()
        self._u32.release()
        self._u8.release()
        self.run_mmap.close()
        os.close(self.fd)
        self.fd = -1

    def __repr__(self) -> str:
        return f"Vcpu(index={self.index}, fd={self.fd})"
