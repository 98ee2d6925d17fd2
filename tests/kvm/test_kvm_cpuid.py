"""build_cpuid: topology, hypervisor bit and timing leaf (pure), then as a guest sees them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from embervm.errors import ConfigError
from embervm.kvm import CpuidEntry, Kvm, build_cpuid
from embervm.kvm import cpuid as c
from embervm.kvm import ioctls as k

GuestFactory = Callable[..., Any]  # the make_guest fixture (tests/kvm/conftest.py)

IDX = k.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
KVM_SIG = c.signature_registers(c.KVM_SIGNATURE)


def intel_like_supported() -> list[CpuidEntry]:
    """A trimmed KVM_GET_SUPPORTED_CPUID of a 16-thread host (APIC id 1 in leaf 1)."""
    return [
        CpuidEntry(0x0, eax=0x1F, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
        CpuidEntry(0x1, eax=0x806F8, ebx=0x0110_0800, ecx=0x7EFA_3203, edx=0x1F8B_FBFF),
        # leaf 4: L1d, L2, L3, end of list
        CpuidEntry(0x4, 0, IDX, eax=0xFC00_4121, ebx=0x02C0_003F, ecx=0x3F),
        CpuidEntry(0x4, 1, IDX, eax=0xFC00_4143, ebx=0x03C0_003F, ecx=0x7FF),
        CpuidEntry(0x4, 2, IDX, eax=0xFC1F_C163, ebx=0x0380_003F, ecx=0xFFFF),
        CpuidEntry(0x4, 3, IDX),
        CpuidEntry(0x7, 0, IDX, eax=1, ebx=0xF1BF_07AB),
        CpuidEntry(0xB, 0, IDX, eax=1, ebx=2, ecx=0x100, edx=1),
        CpuidEntry(0xB, 1, IDX, eax=5, ebx=16, ecx=0x201, edx=1),
        CpuidEntry(0xB, 2, IDX, ecx=2, edx=1),
        CpuidEntry(0x1F, 0, IDX, eax=1, ebx=2, ecx=0x100, edx=1),
        CpuidEntry(0x1F, 1, IDX, eax=5, ebx=16, ecx=0x201, edx=1),
        CpuidEntry(0x40000000, eax=0x40000001, ebx=KVM_SIG[0], ecx=KVM_SIG[1], edx=KVM_SIG[2]),
        CpuidEntry(0x40000001, eax=0x0100_7EFB),
        CpuidEntry(0x80000000, eax=0x80000008),
    ]


def only(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    found = [e for e in entries if e.function == function and e.index == index]
    assert len(found) == 1, f"{len(found)} entries for {function:#x}/{index}"
    return found[0]


def subleaves(entries: list[CpuidEntry], function: int) -> list[tuple[int, ...]]:
    return [
        (e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in entries if e.function == function
    ]


def test_leaf1_carries_apic_id_logical_count_and_hypervisor_bit() -> None:
    leaf1 = only(build_cpuid(intel_like_supported(), 3, 4, None), 0x1)
    assert leaf1.ebx >> 24 == 3
    assert (leaf1.ebx >> 16) & 0xFF == 4
    assert leaf1.ebx & 0xFFFF == 0x0800  # brand index / CLFLUSH size as KVM reported
    assert leaf1.ecx & c.ECX_HYPERVISOR
    assert leaf1.edx & c.EDX_HTT


def test_single_vcpu_has_no_htt_and_apic_id_zero() -> None:
    leaf1 = only(build_cpuid(intel_like_supported(), 0, 1, None), 0x1)
    assert leaf1.ebx >> 16 == 0x0001
    assert not leaf1.edx & c.EDX_HTT


@pytest.mark.parametrize("function", [0xB, 0x1F])
def test_topology_leaf_lists_smt_and_core_levels_with_the_x2apic_id(function: int) -> None:
    entries = build_cpuid(intel_like_supported(), 5, 6, None)
    assert subleaves(entries, function) == [
        # index, flags, EAX shift, EBX count, ECX level type << 8 | index, EDX x2APIC id
        (0, IDX, 0, 1, 0x100, 5),
        (1, IDX, 3, 6, 0x201, 5),  # 6 cores need 3 bits of APIC id
        (2, IDX, 0, 0, 0x002, 5),  # level type 0 ends the enumeration
    ]


def test_topology_leaf_is_not_invented_when_kvm_lacks_it() -> None:
    supported = [e for e in intel_like_supported() if e.function != 0x1F]
    assert subleaves(build_cpuid(supported, 0, 2, None), 0x1F) == []


def test_cache_leaf_shares_only_the_last_level_between_vcpus() -> None:
    entries = build_cpuid(intel_like_supported(), 0, 4, None)
    sharing = [((e.eax >> 14) & 0xFFF) + 1 for e in entries if e.function == 0x4]
    cores = [(e.eax >> 26) + 1 for e in entries if e.function == 0x4]
    assert sharing[:3] == [1, 1, 4]  # L1d, L2 per core; L3 shared by all four
    assert cores[:3] == [4, 4, 4]
    assert only(entries, 0x4, 3).eax == 0  # the end-of-list subleaf stays empty
    # cache type, level and the other low bits are KVM's
    assert [e.eax & 0x3FFF for e in entries if e.function == 0x4] == [0x121, 0x143, 0x163, 0]


def test_timing_leaf_reports_tsc_and_lapic_khz_under_the_kvm_signature() -> None:
    entries = build_cpuid(intel_like_supported(), 0, 1, 2_445_424)
    base = only(entries, 0x40000000)
    assert (base.ebx, base.ecx, base.edx) == KVM_SIG
    assert base.eax == 0x40000010
    timing = only(entries, 0x40000010)
    assert (timing.eax, timing.ebx) == (2_445_424, 1_000_000)
    assert only(entries, 0x40000001).eax == 0x0100_7EFB


def test_without_tsc_frequency_hypervisor_leaves_stay_as_kvm_reports() -> None:
    entries = build_cpuid(intel_like_supported(), 0, 1, None)
    assert only(entries, 0x40000000).eax == 0x40000001
    assert subleaves(entries, 0x40000010) == []


def test_missing_hypervisor_leaf_gets_the_embervm_signature() -> None:
    supported = [e for e in intel_like_supported() if e.function < 0x40000000]
    base = only(build_cpuid(supported, 0, 1, 1_000_000), 0x40000000)
    assert (base.ebx, base.ecx, base.edx) == c.signature_registers(b"EmberVMEmber")
    assert base.eax == 0x40000010


def test_other_leaves_and_the_input_are_left_alone() -> None:
    supported = intel_like_supported()
    before = [dataclasses.replace(e) for e in supported]
    entries = build_cpuid(supported, 1, 2, 3_000_000)
    assert supported == before
    for function in (0x0, 0x7, 0x80000000):
        assert only(entries, function) == only(before, function)


@pytest.mark.parametrize(
    ("index", "count", "tsc_khz"),
    [(0, 0, None), (0, 256, None), (2, 2, None), (-1, 2, None), (0, 1, 0), (0, 1, 1 << 32)],
)
def test_impossible_topology_or_frequency_is_a_config_error(
    index: int, count: int, tsc_khz: int | None
) -> None:
    with pytest.raises(ConfigError):
        build_cpuid(intel_like_supported(), index, count, tsc_khz)


# -- on a real vCPU ---------------------------------------------------------------------------

# Flat 32-bit: CPUID with EAX/ECX from [0x2000]/[0x2004], results to 0x2010.., then exit.
CPUID_ORACLE = bytes.fromhex(
    "a1 00 20 00 00"  # 1: mov eax, [0x2000]
    "8b 0d 04 20 00 00"  # mov ecx, [0x2004]
    "0f a2"  # cpuid
    "a3 10 20 00 00"  # mov [0x2010], eax
    "89 1d 14 20 00 00"  # mov [0x2014], ebx
    "89 0d 18 20 00 00"  # mov [0x2018], ecx
    "89 15 1c 20 00 00"  # mov [0x201c], edx
    "e6 10"  # out 0x10, al
    "eb d8"  # jmp 1b
)


@pytest.mark.kvm
def test_guest_cpuid_shows_the_built_table(kvm: Kvm, make_guest: GuestFactory) -> None:
    guest = make_guest(CPUID_ORACLE, mode="flat32", irqchip=True, vcpu_index=1)
    vcpu = guest.vcpu
    tsc_khz = vcpu.get_tsc_khz()
    vcpu.set_cpuid(build_cpuid(kvm.get_supported_cpuid(), 1, 2, tsc_khz))
    # With the in-kernel irqchip, vCPU 1 is an AP waiting for INIT/SIPI: let it run directly.
    vcpu.set_mp_state(k.KVM_MP_STATE_RUNNABLE)

    def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        guest.mem.write_u32(guest.DATA, leaf)
        guest.mem.write_u32(guest.DATA + 4, subleaf)
        port, _, _ = guest.expect_out()
        assert port == 0x10
        return tuple(guest.mem.read_u32(guest.DATA + 0x10 + 4 * i) for i in range(4))

    _, ebx, ecx, _ = cpuid(0x1)
    assert ebx >> 24 == 1
    assert ecx & c.ECX_HYPERVISOR
    _, _, _, x2apic_id = cpuid(0xB, 1)
    assert x2apic_id == 1
    max_leaf, *signature = cpuid(0x40000000)
    assert max_leaf == 0x40000010
    assert tuple(signature) == KVM_SIG
    assert cpuid(0x40000010)[:2] == (tsc_khz, 1_000_000)
    # KVM made the LAPIC ID the vCPU id: the two views of "who am I" agree.
    assert bytes(vcpu.get_lapic().regs)[k.APIC_ID + 3] == 1
    assert c.find_entry(vcpu.get_cpuid(), 0x40000010) == CpuidEntry(
        0x40000010, eax=tsc_khz, ebx=1_000_000
    )
