"""The CPUID table a vCPU presents: KVM's supported set, adjusted for topology and timing.

:func:`build_cpuid` starts from ``KVM_GET_SUPPORTED_CPUID`` and changes only what KVM cannot
know, as Firecracker's CPUID normalisation does (``src/vmm/src/cpu_config/x86_64/cpuid``):

* which vCPU this is (initial APIC ID / x2APIC ID, which KVM also uses as the LAPIC ID because
  embervm creates vCPU *i* with KVM vCPU id *i*);
* how many vCPUs there are (1 thread per core, ``nr_vcpus`` cores in one package);
* that this is a virtual machine (the HYPERVISOR bit, SDM vol. 2A CPUID leaf 1 ECX[31]);
* the TSC and LAPIC-timer frequencies, in the "generic timing" leaf ``0x40000010`` that VMware
  defined and QEMU (``vmware-cpuid-freq``) and Linux's VMware guest code share.

Everything else stays as KVM reports it.

**Hypervisor signature.** If KVM reports a ``0x40000000`` leaf (it always does, with
``"KVMKVMKVM\\0\\0\\0"``), its signature is kept and only its max-leaf field (EAX) is raised
to ``0x40000010``; this is what QEMU does.  KVM itself implements the paravirtual features
listed in leaf ``0x40000001`` (kvmclock, PV EOI, steal time, ...), and a Linux guest built with
``CONFIG_KVM_GUEST`` looks for exactly that signature (``kvm_cpuid_base()``) before using them,
so a VMM-specific signature would silently switch them off.  Only when KVM reports no
hypervisor leaf at all does embervm add its own, :data:`EMBERVM_SIGNATURE`.

Nothing here needs /dev/kvm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ConfigError
from .ioctls import KVM_CPUID_FLAG_SIGNIFCANT_INDEX


@dataclass(slots=True)
class CpuidEntry:
    """One CPUID leaf/subleaf result, as struct kvm_cpuid_entry2 carries it."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0


# Leaf 1 (SDM vol. 2A, CPUID "Initial EAX Value = 01H")
LEAF_FEATURES = 0x1
EBX_APIC_ID_SHIFT = 24  # EBX[31:24] initial APIC ID
EBX_LOGICAL_COUNT_SHIFT = 16  # EBX[23:16] max addressable logical processor IDs in the package
ECX_HYPERVISOR = 1 << 31
EDX_HTT = 1 << 28  # EBX[23:16] is valid (more than one logical processor per package)

# Leaf 4: deterministic cache parameters (Intel; AMD reports zeros and uses 0x8000001d)
LEAF_CACHE_PARAMS = 0x4

# Leaves 0xB and 0x1F: (V2) extended topology enumeration
LEAF_TOPOLOGY = 0xB
LEAF_TOPOLOGY_V2 = 0x1F
TOPOLOGY_LEVEL_INVALID = 0
TOPOLOGY_LEVEL_SMT = 1
TOPOLOGY_LEVEL_CORE = 2

# Hypervisor leaves (Linux: arch/x86/include/asm/kvm_para.h, arch/x86/kernel/cpu/vmware.c)
LEAF_HYPERVISOR_BASE = 0x40000000
LEAF_HYPERVISOR_TIMING = 0x40000010  # EAX = TSC kHz, EBX = LAPIC bus (timer) kHz
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
EMBERVM_SIGNATURE = b"EmberVMEmber"
# KVM's local APIC timer counts at 1 GHz (APIC_BUS_CYCLE_NS_DEFAULT = 1 in arch/x86/kvm/lapic.h)
KVM_LAPIC_BUS_KHZ = 1_000_000

# xAPIC IDs are 8 bits and 0xff is the broadcast ID, so at most 255 vCPUs (ids 0..254).
MAX_VCPUS = 255


def signature_registers(signature: bytes) -> tuple[int, int, int]:
    """The (EBX, ECX, EDX) values that spell a 12-byte hypervisor signature."""
    if len(signature) != 12:
        raise ValueError("a CPUID hypervisor signature is exactly 12 bytes")
    return (
        int.from_bytes(signature[0:4], "little"),
        int.from_bytes(signature[4:8], "little"),
        int.from_bytes(signature[8:12], "little"),
    )


def _topology_subleaves(function: int, x2apic_id: int, nr_vcpus: int) -> list[CpuidEntry]:
    """Leaf 0xB/0x1F subleaves for 1 thread per core and ``nr_vcpus`` cores per package.

    EAX[4:0] is how far to shift the x2APIC ID right to reach the next level's ID, EBX[15:0]
    the number of logical processors at this level, ECX[7:0] the subleaf and ECX[15:8] the
    level type; EDX is the x2APIC ID in every subleaf.  A subleaf of type 0 ends the list
    (Linux's ``detect_extended_topology`` walks until it sees one).
    """
    core_bits = (nr_vcpus - 1).bit_length()
    levels = [
        (0, 1, TOPOLOGY_LEVEL_SMT),
        (core_bits, nr_vcpus, TOPOLOGY_LEVEL_CORE),
        (0, 0, TOPOLOGY_LEVEL_INVALID),
    ]
    return [
        CpuidEntry(
            function=function,
            index=subleaf,
            flags=KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax=shift,
            ebx=count,
            ecx=(level_type << 8) | subleaf,
            edx=x2apic_id,
        )
        for subleaf, (shift, count, level_type) in enumerate(levels)
    ]


def _fix_cache_params(entry: CpuidEntry, nr_vcpus: int) -> None:
    """Leaf 4: EAX[25:14] = logical processors sharing this cache - 1, EAX[31:26] = cores per
    package - 1.  One thread per core: L1/L2 are private, the last level is shared by all."""
    cache_type = entry.eax & 0x1F
    if cache_type == 0:  # no more caches (and every subleaf on AMD)
        return
    level = (entry.eax >> 5) & 0x7
    sharing = nr_vcpus if level >= 3 else 1
    cores = min(nr_vcpus, 64)  # six bits
    entry.eax = (entry.eax & 0x3FFF) | ((sharing - 1) << 14) | ((cores - 1) << 26)


def build_cpuid(
    supported: Iterable[CpuidEntry], vcpu_index: int, nr_vcpus: int, tsc_khz: int | None
) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``vcpu_index`` of ``nr_vcpus``; ``supported`` is not modified.

    ``tsc_khz`` (from ``KVM_GET_TSC_KHZ``) fills the timing leaf 0x40000010; ``None`` leaves
    the hypervisor leaves as KVM reports them.
    """
    if not 1 <= nr_vcpus <= MAX_VCPUS:
        raise ConfigError(f"vCPU count {nr_vcpus} must be between 1 and {MAX_VCPUS}")
    if not 0 <= vcpu_index < nr_vcpus:
        raise ConfigError(f"vCPU index {vcpu_index} is outside 0..{nr_vcpus - 1}")
    if tsc_khz is not None and not 0 < tsc_khz < 1 << 32:
        raise ConfigError(f"TSC frequency {tsc_khz} kHz does not fit a CPUID register")

    out: list[CpuidEntry] = []
    topology_done: set[int] = set()
    for original in supported:
        e = dataclasses.replace(original)
        fn = e.function
        if fn == LEAF_FEATURES:
            e.ebx = (
                (e.ebx & 0xFFFF)
                | (nr_vcpus << EBX_LOGICAL_COUNT_SHIFT)
                | (vcpu_index << EBX_APIC_ID_SHIFT)
            )
            e.ecx |= ECX_HYPERVISOR
            e.edx = e.edx | EDX_HTT if nr_vcpus > 1 else e.edx & ~EDX_HTT
        elif fn == LEAF_CACHE_PARAMS:
            _fix_cache_params(e, nr_vcpus)
        elif fn in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
            # KVM reports the host's subleaves; replace the whole leaf with ours, once.
            if fn not in topology_done:
                topology_done.add(fn)
                out.extend(_topology_subleaves(fn, vcpu_index, nr_vcpus))
            continue
        elif fn == LEAF_HYPERVISOR_TIMING and tsc_khz is not None:
            continue  # replaced below
        out.append(e)

    if tsc_khz is not None:
        base = next((e for e in out if e.function == LEAF_HYPERVISOR_BASE), None)
        if base is None:
            ebx, ecx, edx = signature_registers(EMBERVM_SIGNATURE)
            base = CpuidEntry(LEAF_HYPERVISOR_BASE, ebx=ebx, ecx=ecx, edx=edx)
            out.append(base)
        base.eax = max(base.eax, LEAF_HYPERVISOR_TIMING)
        out.append(CpuidEntry(LEAF_HYPERVISOR_TIMING, eax=tsc_khz, ebx=KVM_LAPIC_BUS_KHZ))
    return out


def find_entry(entries: Iterable[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry for ``function``/``index`` (``index`` only matters for indexed leaves)."""
    for e in entries:
        if e.function == function and (
            e.index == index or not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        ):
            return e
    return None
