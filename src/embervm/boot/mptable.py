"""Intel MultiProcessor Specification 1.4 tables: how a kernel without ACPI finds its CPUs.

Linux (arch/x86/kernel/mpparse.c) scans the last KiB below 640 KiB for the 16-byte MP floating
pointer ("_MP_"), follows it to the configuration table ("PCMP") and reads, in order: one
processor entry per vCPU, the ISA bus, the IOAPIC, one I/O interrupt entry per IOAPIC pin and
the two local interrupt entries (ExtINT on LINT0, NMI on LINT1).  Struct layouts and constants
follow arch/x86/include/asm/mpspec_def.h; the set of entries follows Firecracker's mptable.rs.

Interrupt routing matches KVM's default GSI routing (kvm_setup_default_irq_routing): GSI n is
IOAPIC pin n, so ISA IRQ 0 (the PIT) goes to pin 0 and no override for pin 2 is declared.
GSIs 16-23 (virtio-mmio devices) are declared as ISA-bus sources too, as Firecracker does:
edge-triggered, active high, which is what KVM's irqfd injection produces.
"""

from __future__ import annotations

import struct

from ..errors import ConfigError
from ..memory import GuestMemory
from .layout import (
    APIC_DEFAULT_PHYS_BASE,
    IO_APIC_DEFAULT_PHYS_BASE,
    IOAPIC_NUM_PINS,
    MPTABLE_START,
)

SMP_MAGIC_IDENT = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MPC_SPEC = 4  # MP spec revision 1.4
MPC_OEM = b"EMBERVM "
MPC_PRODUCT_ID = b"000000000000"
BUSTYPE_ISA = b"ISA   "

# Entry types.
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4

# Processor flags.
CPU_ENABLED = 1
CPU_BOOTPROCESSOR = 2
MPC_APIC_USABLE = 1

# mp_irq_source_types.
MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3
MP_IRQPOL_DEFAULT = 0  # polarity and trigger "conform to the bus" (ISA: active high, edge)

#: Local APIC version register value of KVM's in-kernel LAPIC (integrated APIC, 0x14).
APIC_VERSION = 0x14
#: CPU signature (family 6) and CPUID.1:EDX feature flags (FPU, APIC) as Firecracker reports.
CPU_STEPPING = 0x600
CPU_FEATURE_FPU = 1 << 0
CPU_FEATURE_APIC = 1 << 9

#: xAPIC IDs are 8 bits, 0xff is the broadcast ID and the IOAPIC takes one more: 254 vCPUs.
MAX_VCPUS = 254

_MPF_INTEL = struct.Struct("<4sIBBBB4s")  # signature physptr length spec checksum feature1 f2-5
_MPC_TABLE = struct.Struct("<4sHBB8s12sIHHIHBB")
_MPC_CPU = struct.Struct("<BBBBII8x")
_MPC_BUS = struct.Struct("<BB6s")
_MPC_IOAPIC = struct.Struct("<BBBBI")
_MPC_INTSRC = struct.Struct("<BBHBBBB")  # also mpc_lintsrc: same layout
_MPC_TABLE_CHECKSUM = 7  # offset of mpc_table.checksum
_MPF_CHECKSUM = 10  # offset of mpf_intel.checksum


def mptable_size(nr_vcpus: int) -> int:
    """Bytes the floating pointer and the configuration table take for ``nr_vcpus``."""
    return (
        _MPF_INTEL.size
        + _MPC_TABLE.size
        + _MPC_CPU.size * nr_vcpus
        + _MPC_BUS.size
        + _MPC_IOAPIC.size
        + _MPC_INTSRC.size * (IOAPIC_NUM_PINS + 2)
    )


def _checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` (with it, in place of a zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def ioapic_id(nr_vcpus: int) -> int:
    """The IOAPIC's ID: the first APIC ID after the vCPUs' 0 .. nr_vcpus-1."""
    return nr_vcpus


def build_mptable(nr_vcpus: int, addr: int = MPTABLE_START) -> bytes:
    """The floating pointer followed by the configuration table, to be written at ``addr``."""
    if not 1 <= nr_vcpus <= MAX_VCPUS:
        raise ConfigError(f"{nr_vcpus} vCPUs requested: embervm supports 1 to {MAX_VCPUS}")
    table_addr = addr + _MPF_INTEL.size
    apic = ioapic_id(nr_vcpus)
    entries = bytearray()
    for cpu in range(nr_vcpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += _MPC_CPU.pack(
            MP_PROCESSOR,
            cpu,
            APIC_VERSION,
            flags,
            CPU_STEPPING,
            CPU_FEATURE_FPU | CPU_FEATURE_APIC,
        )
    entries += _MPC_BUS.pack(MP_BUS, 0, BUSTYPE_ISA)
    entries += _MPC_IOAPIC.pack(
        MP_IOAPIC, apic, APIC_VERSION, MPC_APIC_USABLE, IO_APIC_DEFAULT_PHYS_BASE
    )
    for pin in range(IOAPIC_NUM_PINS):
        entries += _MPC_INTSRC.pack(MP_INTSRC, MP_INT, MP_IRQPOL_DEFAULT, 0, pin, apic, pin)
    # LINT0 of the BSP is the virtual-wire ExtINT input (8259 PIC), LINT1 of every CPU is NMI.
    entries += _MPC_INTSRC.pack(MP_LINTSRC, MP_EXTINT, MP_IRQPOL_DEFAULT, 0, 0, 0, 0)
    entries += _MPC_INTSRC.pack(MP_LINTSRC, MP_NMI, MP_IRQPOL_DEFAULT, 0, 0, 0xFF, 1)
    count = nr_vcpus + 1 + 1 + IOAPIC_NUM_PINS + 2

    table = bytearray(
        _MPC_TABLE.pack(
            MPC_SIGNATURE,
            _MPC_TABLE.size + len(entries),  # base table length, header included
            MPC_SPEC,
            0,  # checksum, below
            MPC_OEM,
            MPC_PRODUCT_ID,
            0,  # no OEM table
            0,
            count,
            APIC_DEFAULT_PHYS_BASE,
            0,  # no extended table
            0,
            0,
        )
    )
    table += entries
    table[_MPC_TABLE_CHECKSUM] = _checksum(table)

    # feature1 = 0: a configuration table is present; feature2 bit 7 (IMCR) clear: the
    # interrupt mode is virtual wire, which is what KVM's in-kernel LAPIC/PIC provide.
    mpf = bytearray(_MPF_INTEL.pack(SMP_MAGIC_IDENT, table_addr, 1, MPC_SPEC, 0, 0, bytes(4)))
    mpf[_MPF_CHECKSUM] = _checksum(mpf)
    return bytes(mpf + table)


def setup_mptable(mem: GuestMemory, nr_vcpus: int, addr: int = MPTABLE_START) -> tuple[int, int]:
    """Write the MP tables for ``nr_vcpus`` at ``addr``; return the [start, end) written."""
    data = build_mptable(nr_vcpus, addr)
    if not mem.contains(addr, len(data)):
        raise ConfigError(
            f"guest memory has no RAM at {addr:#x}-{addr + len(data):#x} for the MP table: "
            "it must cover the first MiB"
        )
    mem.write(addr, data)
    return addr, addr + len(data)
