"""The x86-64 KVM ABI: ioctl numbers, capabilities, exit reasons and ctypes structs.

Everything here is transcribed from ``include/uapi/linux/kvm.h`` and
``arch/x86/include/uapi/asm/kvm.h`` (Linux 6.x), with the kernel's names.  Struct sizes are
asserted at import time against the kernel's ``sizeof`` (a wrong field silently corrupts a
neighbour through the ioctl), and ``tests/kvm/test_abi.py`` compares every number here with
what a C compiler computes from the installed headers.

Nothing in this module opens /dev/kvm.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64

# -- ioctl number encoding (include/uapi/asm-generic/ioctl.h) ------------------------------------

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:  # noqa: N802 - the kernel's macro names
    return _ioc(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type[ctypes._CData]) -> int:  # noqa: N802
    return _ioc(_IOC_READ, type_, nr, ctypes.sizeof(struct))


def _IOW(type_: int, nr: int, struct: type[ctypes._CData]) -> int:  # noqa: N802
    return _ioc(_IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type[ctypes._CData]) -> int:  # noqa: N802
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


KVMIO = 0xAE
KVM_API_VERSION = 12

# -- structs ------------------------------------------------------------------------------------


class Regs(ctypes.Structure):
    """struct kvm_regs (KVM_GET_REGS / KVM_SET_REGS)."""

    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class Segment(ctypes.Structure):
    """struct kvm_segment: a segment register as the VMCS/VMCB holds it (hidden part included)."""

    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class Dtable(ctypes.Structure):
    """struct kvm_dtable: GDTR/IDTR."""

    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


# (KVM_NR_INTERRUPTS + 63) / 64 with KVM_NR_INTERRUPTS = 256
_NR_INTERRUPT_WORDS = 4


class Sregs(ctypes.Structure):
    """struct kvm_sregs (KVM_GET_SREGS / KVM_SET_SREGS)."""

    _fields_ = [
        ("cs", Segment),
        ("ds", Segment),
        ("es", Segment),
        ("fs", Segment),
        ("gs", Segment),
        ("ss", Segment),
        ("tr", Segment),
        ("ldt", Segment),
        ("gdt", Dtable),
        ("idt", Dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * _NR_INTERRUPT_WORDS),
    ]


class Fpu(ctypes.Structure):
    """struct kvm_fpu (KVM_GET_FPU / KVM_SET_FPU): the legacy FXSAVE image."""

    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class MsrEntry(ctypes.Structure):
    """struct kvm_msr_entry."""

    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class MsrsHeader(ctypes.Structure):
    """struct kvm_msrs without its flexible array ``entries[]`` (this is what the ioctl's
    size field encodes)."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


def msrs_struct(n: int) -> type[ctypes.Structure]:
    """struct kvm_msrs with room for ``n`` entries."""

    class Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", MsrEntry * n)]

    return Msrs


class CpuidEntry2(ctypes.Structure):
    """struct kvm_cpuid_entry2."""

    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class Cpuid2Header(ctypes.Structure):
    """struct kvm_cpuid2 without its flexible array ``entries[]``."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


def cpuid2_struct(n: int) -> type[ctypes.Structure]:
    """struct kvm_cpuid2 with room for ``n`` entries."""

    class Cpuid2(ctypes.Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", CpuidEntry2 * n)]

    return Cpuid2


KVM_APIC_REG_SIZE = 0x400


class LapicState(ctypes.Structure):
    """struct kvm_lapic_state: the 1 KiB xAPIC register page (registers at their MMIO offsets)."""

    # The kernel declares ``char regs[1024]``; u8 keeps ctypes from treating it as a C string.
    _fields_ = [("regs", c_uint8 * KVM_APIC_REG_SIZE)]


class UserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region."""

    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class Ioeventfd(ctypes.Structure):
    """struct kvm_ioeventfd."""

    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


class Irqfd(ctypes.Structure):
    """struct kvm_irqfd."""

    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class IrqLevel(ctypes.Structure):
    """struct kvm_irq_level (the first member is a union of ``irq`` and ``status``)."""

    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class PitConfig(ctypes.Structure):
    """struct kvm_pit_config."""

    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class MpState(ctypes.Structure):
    """struct kvm_mp_state."""

    _fields_ = [("mp_state", c_uint32)]


# The kernel's sizes (x86-64). A mismatch here means a transcription error above.
_EXPECTED_SIZES = {
    Regs: 144,
    Segment: 24,
    Dtable: 16,
    Sregs: 312,
    Fpu: 416,
    MsrEntry: 16,
    MsrsHeader: 8,
    CpuidEntry2: 40,
    Cpuid2Header: 8,
    LapicState: 1024,
    UserspaceMemoryRegion: 32,
    Ioeventfd: 64,
    Irqfd: 32,
    IrqLevel: 8,
    PitConfig: 64,
    MpState: 4,
}
for _struct, _size in _EXPECTED_SIZES.items():
    if ctypes.sizeof(_struct) != _size:
        raise ImportError(f"{_struct.__name__} is {ctypes.sizeof(_struct)} bytes, kernel: {_size}")
del _struct, _size

# -- ioctls -------------------------------------------------------------------------------------

# system (/dev/kvm)
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, Cpuid2Header)

# VM
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, UserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, IrqLevel)
KVM_IRQFD = _IOW(KVMIO, 0x76, Irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, PitConfig)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, Ioeventfd)

# vCPU
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, Regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, Regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, Sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, Sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, MsrsHeader)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, MsrsHeader)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, Fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, Fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, LapicState)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, LapicState)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, Cpuid2Header)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, Cpuid2Header)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, MpState)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, MpState)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)

# -- capabilities (KVM_CHECK_EXTENSION) ---------------------------------------------------------

KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_IMMEDIATE_EXIT = 136

# -- flags --------------------------------------------------------------------------------------

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

# KVM_CREATE_PIT2 flags: without SPEAKER_DUMMY, port 0x61 is left to user space.
KVM_PIT_SPEAKER_DUMMY = 1

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic, the kernel's spelling

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# -- struct kvm_run (the mmap'd vCPU page) ------------------------------------------------------

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

EXIT_REASON_NAMES: dict[int, str] = {
    value: name
    for name, value in globals().items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# Byte offsets in struct kvm_run (x86-64). The exit union starts at 32.
RUN_REQUEST_INTERRUPT_WINDOW = 0
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_READY_FOR_INTERRUPT_INJECTION = 12
RUN_IF_FLAG = 13
RUN_EXIT_UNION = 32
# io: direction u8, size u8, port u16, count u32, data_offset u64
RUN_IO = RUN_EXIT_UNION
# mmio: phys_addr u64, data u8[8], len u32, is_write u8
RUN_MMIO = RUN_EXIT_UNION
RUN_MMIO_DATA = RUN_MMIO + 8
# fail_entry: hardware_entry_failure_reason u64, cpu u32
RUN_FAIL_ENTRY = RUN_EXIT_UNION
# internal: suberror u32, ndata u32, data u64[16]; system_event: type u32, ndata u32, data u64[16]
RUN_INTERNAL = RUN_EXIT_UNION
RUN_SYSTEM_EVENT = RUN_EXIT_UNION
RUN_UNION_DATA_WORDS = 16
# struct kvm_run is 2352 bytes; the mmap is larger (PIO data page, coalesced MMIO ring).
RUN_STRUCT_SIZE = 2352

# -- x86 architectural numbers used when setting vCPUs up ---------------------------------------

MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_DEF_TYPE_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

# Local APIC register offsets and LVT delivery modes (arch/x86/include/asm/apicdef.h).
APIC_ID = 0x20
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7
