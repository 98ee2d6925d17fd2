"""Boot orchestration: load a kernel, initrd and command line and describe the boot CPU.

:func:`setup_boot` detects the kernel format by content, copies everything into guest memory
(see ``layout.py`` for the address map) and returns a :class:`BootInfo` whose
:class:`CpuBootState` the KVM layer turns into KVM_SET_REGS/KVM_SET_SREGS.  Nothing here touches
/dev/kvm.  Two entry protocols:

* ``"pvh"`` -- a vmlinux with the XEN_ELFNOTE_PHYS32_ENTRY note: 32-bit protected mode, paging
  off, flat 4 GiB segments, %ebx = &hvm_start_info (Xen's docs/misc/pvh.pandoc; Linux
  arch/x86/platform/pvh).  No decompressor runs, which matters on an emulating host.
* ``"bzimage"`` -- the 64-bit boot protocol (Documentation/x86/boot.rst): long mode with an
  identity map of the first GiB, CS = __BOOT_CS (0x10), DS = __BOOT_DS (0x18),
  %rsi = &boot_params.

Application processors need nothing from here: they start in real mode through INIT/SIPI from
the in-kernel LAPIC, and find themselves in the MP table written for ``nr_vcpus``.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, replace
from typing import BinaryIO

from ..errors import ConfigError
from ..memory import PAGE_SIZE, GuestMemory
from . import bzimage as bz
from . import elf
from .layout import (
    BOOT_GDT_ENTRIES,
    BOOT_GDT_START,
    BOOT_IDT_SIZE,
    BOOT_IDT_START,
    BOOT_STACK_POINTER,
    CMDLINE_AREA_SIZE,
    CMDLINE_START,
    E820_RAM,
    E820_RESERVED,
    EBDA_START,
    GDT_SEL_CODE32,
    GDT_SEL_CODE64,
    GDT_SEL_DATA,
    GDT_SEL_TSS,
    HIMEM_START,
    IDENTITY_MAP_SIZE,
    INITRD_ALIGN,
    INITRD_MAX_END_32BIT,
    PDE_START,
    PDPTE_START,
    PML4_START,
    PVH_CMDLINE_MAX,
    PVH_INFO_START,
    PVH_MEMMAP_MAX_ENTRIES,
    PVH_MEMMAP_START,
    PVH_MODLIST_START,
    ZERO_PAGE_START,
)
from .mptable import MAX_VCPUS, setup_mptable

# Control register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1).
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4  # hardwired to 1 on every CPU since the i486; reported as such
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED_1 = 1 << 1  # bit 1 always reads 1; IF, TF and VM clear as both ABIs require

# Page-table entry bits.
_PTE_PRESENT = 1 << 0
_PTE_WRITE = 1 << 1
_PTE_PS = 1 << 7  # 2 MiB page in a PD entry
_PAGE_TABLE_ENTRIES = 512
_HUGE_PAGE_SHIFT = 21

# Xen's hvm_start_info ABI (xen/include/public/arch-x86/hvm/start_info.h).
XEN_HVM_START_MAGIC_VALUE = 0x336EC578
_HVM_START_INFO = struct.Struct("<IIIIQQQQII")  # version 1: 56 bytes
_HVM_MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr size cmdline_paddr reserved
_HVM_MEMMAP_ENTRY = struct.Struct("<QQII")  # addr size type reserved

_PD_IDENTITY = struct.pack(
    f"<{_PAGE_TABLE_ENTRIES}Q",
    *(
        (i << _HUGE_PAGE_SHIFT) | _PTE_PRESENT | _PTE_WRITE | _PTE_PS
        for i in range(IDENTITY_MAP_SIZE >> _HUGE_PAGE_SHIFT)
    ),
)


@dataclass
class Segment:
    """An x86 segment in the form of KVM's struct kvm_segment (limit in bytes, not pages)."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int
    g: int
    avl: int = 0

    def descriptor(self) -> int:
        """The 8-byte GDT descriptor (Intel SDM vol. 3, 3.4.5) describing this segment."""
        limit = self.limit >> 12 if self.g else self.limit
        if limit > 0xFFFFF or (self.g and self.limit & 0xFFF != 0xFFF):
            raise ValueError(f"segment limit {self.limit:#x} cannot be encoded with g={self.g}")
        access = self.type | self.s << 4 | self.dpl << 5 | self.present << 7
        flags = self.avl | self.l << 1 | self.db << 2 | self.g << 3
        return (
            (limit & 0xFFFF)
            | (self.base & 0xFF_FFFF) << 16
            | access << 40
            | (limit >> 16) << 48
            | flags << 52
            | (self.base >> 24 & 0xFF) << 56
        )

    @classmethod
    def from_descriptor(cls, desc: int, selector: int) -> Segment:
        """Decode a GDT descriptor into the hidden segment state a selector load produces."""
        g = desc >> 55 & 1
        limit = (desc & 0xFFFF) | (desc >> 32 & 0xF_0000)
        return cls(
            base=(desc >> 16 & 0xFF_FFFF) | (desc >> 56 & 0xFF) << 24,
            limit=(limit << 12 | 0xFFF) if g else limit,
            selector=selector,
            type=desc >> 40 & 0xF,
            present=desc >> 47 & 1,
            dpl=desc >> 45 & 3,
            db=desc >> 54 & 1,
            s=desc >> 44 & 1,
            l=desc >> 53 & 1,
            g=g,
            avl=desc >> 52 & 1,
        )


@dataclass
class CpuBootState:
    """What the boot CPU's registers must hold at the kernel entry."""

    rip: int
    rsp: int
    rbx: int
    rsi: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: Segment
    ds: Segment  # also es, fs, gs and ss
    tr: Segment
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int


@dataclass
class BootInfo:
    """The result of :func:`setup_boot`.

    ``kernel_range`` is the guest-physical [start, end) the kernel occupies: the loaded ELF
    segments (.bss included) for PVH; for a bzImage, the image at 1 MiB up to the end of the
    area it decompresses into (runtime start + init_size).  ``initrd_range`` is [start, end).
    """

    kind: str  # "pvh" or "bzimage"
    cpu: CpuBootState
    kernel_range: tuple[int, int]  # [start, end) guest-physical
    initrd_range: tuple[int, int] | None  # [start, end) guest-physical
    cmdline: str


# Flat 4 GiB segments; the CPU states get copies since the dataclass is mutable.  Types:
# 0xb = execute/read code, accessed; 0x3 = read/write data, accessed; 0xb with s=0 = busy
# 32/64-bit TSS (VMX requires a busy TSS in TR).
CODE32_SEGMENT = Segment(0, 0xFFFF_FFFF, GDT_SEL_CODE32, 0xB, 1, 0, 1, 1, 0, 1)
CODE64_SEGMENT = Segment(0, 0xFFFF_FFFF, GDT_SEL_CODE64, 0xB, 1, 0, 0, 1, 1, 1)
DATA_SEGMENT = Segment(0, 0xFFFF_FFFF, GDT_SEL_DATA, 0x3, 1, 0, 1, 1, 0, 1)
#: The PVH ABI asks for a TSS with base 0 and limit 0x67 (a 104-byte 32-bit TSS).
TSS_SEGMENT = Segment(0, 0x67, GDT_SEL_TSS, 0xB, 1, 0, 0, 0, 0, 0)


def e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """The guest's memory map as ``(addr, size, type)``, sorted by address.

    RAM below the EBDA, the EBDA + legacy VGA/BIOS hole reserved (it holds the MP table), RAM
    from 1 MiB to the end of every region (low RAM up to the 32-bit MMIO gap, then above 4 GiB).
    """
    entries = [(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)]
    for r in mem.regions:
        if r.guest_addr < EBDA_START:
            entries.append((r.guest_addr, min(r.end, EBDA_START) - r.guest_addr, E820_RAM))
        start = max(r.guest_addr, HIMEM_START)
        if start < r.end:
            entries.append((start, r.end - start, E820_RAM))
    entries.sort()
    return entries


def setup_boot(
    mem: GuestMemory,
    kernel: str | os.PathLike[str],
    initrd: str | os.PathLike[str] | None,
    cmdline: str,
    nr_vcpus: int,
) -> BootInfo:
    """Load ``kernel`` (vmlinux with PVH note, or bzImage), ``initrd`` and ``cmdline``.

    Writes the kernel, initrd, command line, MP table, GDT/IDT and either the PVH start info or
    the zero page plus identity page tables.  Raises :class:`ConfigError` with a one-line,
    actionable message for anything wrong with the inputs or too little guest memory.
    """
    if not 1 <= nr_vcpus <= MAX_VCPUS:
        raise ConfigError(f"{nr_vcpus} vCPUs requested: embervm supports 1 to {MAX_VCPUS}")
    low_end = _low_ram_end(mem)
    try:
        cmd = cmdline.encode()
    except UnicodeEncodeError:
        raise ConfigError("the kernel command line is not valid Unicode text") from None
    if b"\0" in cmd:
        raise ConfigError("the kernel command line contains a NUL character")

    kernel_name = os.fspath(kernel)
    with _open_image(kernel, "kernel") as kf:
        plan = _plan_kernel(kf, kernel_name, cmd)
        for seg in plan.segments:
            _check_kernel_fits(mem, kernel_name, seg.paddr, seg.end)
        if plan.header is not None:
            # The decompressed kernel's runtime area must be RAM too, and identity-mapped.
            _check_kernel_fits(mem, kernel_name, *plan.kernel_range)
            if plan.kernel_range[1] > IDENTITY_MAP_SIZE:
                raise ConfigError(
                    f"{kernel_name} needs memory up to {plan.kernel_range[1]:#x}, beyond the "
                    "1 GiB identity map of the 64-bit entry"
                )
        for seg in plan.segments:
            _copy_from_file(mem, kf, seg.offset, seg.paddr, seg.filesz, kernel_name)
            if seg.memsz > seg.filesz:
                mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)

    initrd_range = None
    if initrd is not None:
        limit = min(low_end, plan.initrd_limit)
        initrd_range = _load_initrd(mem, initrd, plan.kernel_range[1], limit)

    mem.fill(CMDLINE_START, CMDLINE_AREA_SIZE)
    mem.write(CMDLINE_START, cmd)
    setup_mptable(mem, nr_vcpus)
    _write_gdt_idt(mem)
    e820 = e820_map(mem)
    if plan.header is None:
        _write_pvh_start_info(mem, initrd_range, e820)
        cpu = _pvh_cpu_state(plan.entry)
    else:
        params = bz.build_boot_params(
            plan.header,
            cmdline_addr=CMDLINE_START,
            initrd=None if initrd_range is None else (initrd_range[0], _span(initrd_range)),
            e820=e820,
        )
        mem.write(ZERO_PAGE_START, params)
        _write_identity_page_tables(mem)
        cpu = _long_mode_cpu_state(plan.entry)
    return BootInfo(plan.kind, cpu, plan.kernel_range, initrd_range, cmdline)


# -- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _KernelPlan:
    kind: str
    segments: tuple[elf.LoadSegment, ...]
    entry: int
    kernel_range: tuple[int, int]
    initrd_limit: int  # exclusive end address the initrd must stay below
    header: bz.SetupHeader | None  # bzImage only


def _plan_cache_dir():
    """Where parsed vmlinux load plans are kept (the embedded images' cache), or None when
    EMBERVM_NO_PLAN_CACHE is set."""
    if os.environ.get("EMBERVM_NO_PLAN_CACHE"):
        return None
    from ..images import cache_dir

    return cache_dir()


def _plan_kernel(f: BinaryIO, name: str, cmd: bytes) -> _KernelPlan:
    """Detect the format by content, parse it and check the command line against its limit."""
    head = os.pread(f.fileno(), bz.BZIMAGE_HEAD_SIZE, 0)
    if head.startswith(elf.ELF_MAGIC):
        image = elf.cached_pvh_plan(f, name, _plan_cache_dir())
        _check_cmdline(cmd, PVH_CMDLINE_MAX - 1, "the PVH boot ABI (COMMAND_LINE_SIZE)")
        return _KernelPlan(
            "pvh", image.segments, image.entry, image.kernel_range, INITRD_MAX_END_32BIT, None
        )
    if head[bz.HDR_MAGIC_OFFSET : bz.HDR_MAGIC_OFFSET + len(bz.HDR_MAGIC)] == bz.HDR_MAGIC:
        bzi = bz.parse_bzimage(head, os.fstat(f.fileno()).st_size, name)
        _check_cmdline(cmd, bzi.header.cmdline_size, f"{name} (cmdline_size)")
        return _KernelPlan(
            "bzimage", (bzi.segment,), bzi.entry, bzi.kernel_range, bzi.initrd_max_end, bzi.header
        )
    raise ConfigError(f"{name} is not a Linux kernel: expected a vmlinux ELF or a bzImage")


def _span(r: tuple[int, int]) -> int:
    return r[1] - r[0]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _low_ram_end(mem: GuestMemory) -> int:
    """End of the RAM region at address 0, which must hold the boot structures (first MiB)."""
    first = mem.regions[0]
    if first.guest_addr != 0 or first.end <= HIMEM_START:
        raise ConfigError(
            "guest memory must start at address 0 and extend beyond 1 MiB to hold the boot "
            f"structures ({mem!r})"
        )
    return first.end


def _open_image(path: str | os.PathLike[str], what: str) -> BinaryIO:
    name = os.fspath(path)
    try:
        f = open(name, "rb")  # noqa: SIM115 - returned to the caller's with-block
    except OSError as e:
        raise ConfigError(f"cannot open {what} {name}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ConfigError(f"{what} {name} is not a regular file")
    except BaseException:
        f.close()
        raise
    return f


def _check_cmdline(cmd: bytes, max_len: int, limit_source: str) -> None:
    limit = min(max_len, CMDLINE_AREA_SIZE - 1)
    if len(cmd) > limit:
        raise ConfigError(
            f"kernel command line is {len(cmd)} bytes, longer than the {limit} bytes allowed by "
            f"{limit_source}: shorten it"
        )


def _check_kernel_fits(mem: GuestMemory, name: str, start: int, end: int) -> None:
    if start < HIMEM_START:
        raise ConfigError(
            f"{name} wants to load at {start:#x}, below 1 MiB where the boot structures live"
        )
    if not mem.contains(start, end - start):
        raise ConfigError(
            f"{name} needs guest RAM at {start:#x}-{end:#x} but the VM has {_mib(mem.size)} "
            f"({mem!r}): give it at least {_mib(-(-end // (1 << 20)) << 20)}"
        )


def _copy_from_file(
    mem: GuestMemory, f: BinaryIO, offset: int, addr: int, size: int, name: str
) -> None:
    """Read ``size`` bytes at file ``offset`` straight into guest RAM at ``addr`` (no copy)."""
    view = mem.view(addr, size)
    fd = f.fileno()
    done = 0
    while done < size:
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise ConfigError(f"cannot read {name}: {e.strerror}") from None
        if n == 0:
            raise ConfigError(f"{name} is truncated: it ended while it was being loaded")
        done += n


def _load_initrd(
    mem: GuestMemory, path: str | os.PathLike[str], kernel_end: int, limit: int
) -> tuple[int, int]:
    """Place the initrd as high as possible below ``limit`` and above the kernel; load it."""
    name = os.fspath(path)
    with _open_image(path, "initrd") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ConfigError(f"initrd {name} is empty")
        floor = -(-kernel_end // PAGE_SIZE) * PAGE_SIZE
        addr = (limit - size) // INITRD_ALIGN * INITRD_ALIGN
        if addr < floor:
            raise ConfigError(
                f"initrd {name} ({_mib(size)}) does not fit between the kernel end {floor:#x} "
                f"and {limit:#x}: give the VM more memory or use a smaller initrd"
            )
        _copy_from_file(mem, f, 0, addr, size, name)
    return addr, addr + size


def _write_gdt_idt(mem: GuestMemory) -> None:
    # Slot 4 and 5: the 16-byte long-mode TSS descriptor; its upper half (base bits 63:32)
    # is zero, which in 32-bit mode reads as a harmless null descriptor.
    gdt = struct.pack(
        f"<{BOOT_GDT_ENTRIES}Q",
        0,
        CODE32_SEGMENT.descriptor(),
        CODE64_SEGMENT.descriptor(),
        DATA_SEGMENT.descriptor(),
        TSS_SEGMENT.descriptor(),
        0,
    )
    mem.write(BOOT_GDT_START, gdt)
    # An empty IDT: both ABIs enter with interrupts off and the kernel installs its own IDT
    # before it enables them.
    mem.fill(BOOT_IDT_START, BOOT_IDT_SIZE)


def _write_pvh_start_info(
    mem: GuestMemory, initrd: tuple[int, int] | None, e820: list[tuple[int, int, int]]
) -> None:
    if len(e820) > PVH_MEMMAP_MAX_ENTRIES:
        raise ConfigError(f"guest memory map has {len(e820)} entries, more than PVH room for it")
    memmap = b"".join(_HVM_MEMMAP_ENTRY.pack(a, s, t, 0) for a, s, t in e820)
    mem.write(PVH_MEMMAP_START, memmap)
    # Linux takes the first module as the initrd (arch/x86/platform/pvh/enlighten.c).
    nr_modules = 0
    if initrd is not None:
        mem.write(PVH_MODLIST_START, _HVM_MODLIST_ENTRY.pack(initrd[0], _span(initrd), 0, 0))
        nr_modules = 1
    info = _HVM_START_INFO.pack(
        XEN_HVM_START_MAGIC_VALUE,
        1,  # version 1: memmap_paddr/memmap_entries present (Linux BUG()s on 0 outside Xen)
        0,  # flags
        nr_modules,
        PVH_MODLIST_START if nr_modules else 0,
        CMDLINE_START,
        0,  # rsdp_paddr: no ACPI tables passed; the kernel scans for an RSDP itself
        PVH_MEMMAP_START,
        len(e820),
        0,
    )
    mem.write(PVH_INFO_START, info)


def _write_identity_page_tables(mem: GuestMemory) -> None:
    """PML4[0] -> PDPT[0] -> PD of 512 2 MiB pages: virtual == physical for the first GiB."""
    entry = _PTE_PRESENT | _PTE_WRITE
    page = bytearray(PAGE_SIZE)
    struct.pack_into("<Q", page, 0, PDPTE_START | entry)
    mem.write(PML4_START, page)
    struct.pack_into("<Q", page, 0, PDE_START | entry)
    mem.write(PDPTE_START, page)
    mem.write(PDE_START, _PD_IDENTITY)


def _pvh_cpu_state(entry: int) -> CpuBootState:
    # docs/misc/pvh.pandoc: CR0.PE set, other writable CR0 bits and all of CR4 clear, paging
    # off, EFLAGS.IF/TF/VM clear; %ebx = &hvm_start_info.
    return CpuBootState(
        rip=entry,
        rsp=BOOT_STACK_POINTER,
        rbx=PVH_INFO_START,
        rsi=0,
        rflags=RFLAGS_RESERVED_1,
        cr0=X86_CR0_PE | X86_CR0_ET,
        cr3=0,
        cr4=0,
        efer=0,
        cs=replace(CODE32_SEGMENT),
        ds=replace(DATA_SEGMENT),
        tr=replace(TSS_SEGMENT),
        gdt_base=BOOT_GDT_START,
        gdt_limit=BOOT_GDT_ENTRIES * 8 - 1,
        idt_base=BOOT_IDT_START,
        idt_limit=BOOT_IDT_SIZE - 1,
    )


def _long_mode_cpu_state(entry: int) -> CpuBootState:
    # boot.rst: 64-bit mode with paging on, the identity map covering kernel/zero page/cmdline,
    # CS = __BOOT_CS, DS/ES/SS = __BOOT_DS, interrupts off, %rsi = &boot_params.
    return CpuBootState(
        rip=entry,
        rsp=BOOT_STACK_POINTER,
        rbx=0,
        rsi=ZERO_PAGE_START,
        rflags=RFLAGS_RESERVED_1,
        cr0=X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
        cr3=PML4_START,
        cr4=X86_CR4_PAE,
        efer=EFER_LME | EFER_LMA,
        cs=replace(CODE64_SEGMENT),
        ds=replace(DATA_SEGMENT),
        tr=replace(TSS_SEGMENT),
        gdt_base=BOOT_GDT_START,
        gdt_limit=BOOT_GDT_ENTRIES * 8 - 1,
        idt_base=BOOT_IDT_START,
        idt_limit=BOOT_IDT_SIZE - 1,
    )
