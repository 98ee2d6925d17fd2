"""Guest-physical address map of the boot structures (x86-64).

Everything the loaders write below 1 MiB lives here, so no two structures can collide by
accident.  The low addresses follow Firecracker's layout (src/vmm/src/arch/x86_64/layout.rs);
the PVH area and the GDT selectors are our own.

    0x0000_0500  GDT (null, code32, code64, data, 16-byte TSS descriptor)
    0x0000_0540  IDT (one empty gate; the kernel installs its own before enabling interrupts)
    0x0000_6000  PVH struct hvm_start_info, then its module list and memory map
    0x0000_7000  bzImage struct boot_params ("zero page")
    0x0000_8ff0  initial stack pointer (grows down inside 0x8000-0x8fff)
    0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD: identity map of the first GiB (bzImage)
    0x0002_0000  kernel command line
    0x0009_fc00  EBDA: MP floating pointer + MP configuration table (may run into 0xa0000+)
    0x0010_0000  kernel (bzImage protected-mode part; vmlinux lands at its own p_paddr)
    top of RAM   initrd, page-aligned, as high as the kernel allows

The e820 map (``setup.e820_map``) reports 0 .. EBDA_START as RAM and EBDA_START .. HIMEM_START
as reserved, so the MP table and the legacy VGA/BIOS hole are never handed to the allocator.
Linux reserves the whole first MiB early anyway (arch/x86/kernel/setup.c), but only after it has
copied the zero page, the command line and the PVH start info out of it.
"""

from __future__ import annotations

from ..memory import PAGE_SIZE

# -- descriptor tables ---------------------------------------------------------------------

BOOT_GDT_START = 0x500
#: GDT selectors.  0x10/0x18 are the __BOOT_CS/__BOOT_DS values Documentation/x86/boot.rst
#: requires for the 64-bit boot protocol; the PVH ABI leaves selectors unspecified, so its
#: 32-bit code segment takes the otherwise unused slot 1.
GDT_SEL_CODE32 = 0x08
GDT_SEL_CODE64 = 0x10
GDT_SEL_DATA = 0x18
GDT_SEL_TSS = 0x20
#: A long-mode TSS descriptor is 16 bytes: slots 4 and 5.
BOOT_GDT_ENTRIES = 6
BOOT_IDT_START = 0x540
BOOT_IDT_SIZE = 8

# -- PVH (Xen's x86/HVM direct boot ABI, xen/include/public/arch-x86/hvm/start_info.h) -------

PVH_INFO_START = 0x6000
PVH_MODLIST_START = 0x6040
#: struct hvm_modlist_entry is 32 bytes; room for 4 modules before the memory map.
PVH_MODLIST_MAX = 4
PVH_MEMMAP_START = 0x6100
#: struct hvm_memmap_table_entry is 24 bytes; the map must end before the zero page.
PVH_MEMMAP_MAX_ENTRIES = (0x7000 - PVH_MEMMAP_START) // 24

# -- 64-bit boot protocol (Documentation/x86/boot.rst) ---------------------------------------

ZERO_PAGE_START = 0x7000
BOOT_STACK_POINTER = 0x8FF0
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000
#: The identity map built for the 64-bit entry: 512 PD entries of 2 MiB (as Firecracker).
IDENTITY_MAP_SIZE = 1 << 30

# -- command line --------------------------------------------------------------------------

CMDLINE_START = 0x20000
#: Room reserved for the command line (the kernel's own limit is usually far smaller).
CMDLINE_AREA_SIZE = 0x10000
#: Linux's x86 COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h), terminating NUL included: the
#: PVH entry copies at most this much into boot_command_line.
PVH_CMDLINE_MAX = 2048

# -- EBDA / MP table -----------------------------------------------------------------------

#: The last KiB below 640 KiB: Linux's smp_scan_config() searches 639 KiB .. 640 KiB for the MP
#: floating pointer (arch/x86/kernel/mpparse.c), so no BDA pointer to the EBDA is needed.
EBDA_START = 0x9FC00
MPTABLE_START = EBDA_START

# -- kernel and initrd ---------------------------------------------------------------------

#: First byte above the legacy hole; the bzImage protected-mode kernel is loaded here.
HIMEM_START = 0x10_0000
BZIMAGE_LOAD_ADDR = HIMEM_START
#: Offset of startup_64 in a bzImage's protected-mode part (boot.rst, 64-bit boot protocol).
BZIMAGE_ENTRY_OFFSET = 0x200
#: The PVH start info and the bzImage ramdisk_image field are 32-bit physical addresses.
INITRD_MAX_END_32BIT = 1 << 32
INITRD_ALIGN = PAGE_SIZE

# -- interrupt controllers (arch/x86/include/asm/apicdef.h) ---------------------------------

APIC_DEFAULT_PHYS_BASE = 0xFEE0_0000
IO_APIC_DEFAULT_PHYS_BASE = 0xFEC0_0000
#: KVM's in-kernel IOAPIC has 24 pins (KVM_IOAPIC_NUM_PINS).
IOAPIC_NUM_PINS = 24

# -- e820 types (arch/x86/include/asm/e820/types.h) -----------------------------------------

E820_RAM = 1
E820_RESERVED = 2
#: boot_params.e820_table has this many slots (E820_MAX_ENTRIES_ZEROPAGE).
E820_MAX_ENTRIES_ZEROPAGE = 128
