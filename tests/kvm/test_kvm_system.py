"""Opening /dev/kvm, capability checks, memory slots and vCPU state set-up."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest

from embervm.errors import KvmError
from embervm.kvm import Kvm, Vm
from embervm.kvm import ioctls as k
from embervm.kvm import kvm as kvm_module
from embervm.memory import GuestMemory

GuestFactory = Callable[..., Any]  # the make_guest fixture (tests/kvm/conftest.py)


def test_missing_device_names_the_path_and_the_fix() -> None:
    with pytest.raises(KvmError) as info:
        Kvm("/nonexistent/kvm")
    message = str(info.value)
    assert "no /nonexistent/kvm" in message
    assert "load the kvm module" in message
    assert "\n" not in message


def test_a_file_that_is_not_kvm_is_refused() -> None:
    with pytest.raises(KvmError, match="/dev/null is not a KVM device"):
        Kvm("/dev/null")


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (PermissionError(errno.EACCES, "Permission denied"), "add yourself to the kvm group"),
        (OSError(errno.ENXIO, "No such device or address"), "load the kvm module"),
    ],
)
def test_open_failures_say_how_to_fix_them(
    monkeypatch: pytest.MonkeyPatch, error: OSError, advice: str
) -> None:
    def refuse(path: str, flags: int) -> int:
        raise error

    monkeypatch.setattr(kvm_module.os, "open", refuse)
    with pytest.raises(KvmError, match=advice) as info:
        Kvm("/dev/kvm")
    assert "/dev/kvm" in str(info.value)
    assert "\n" not in str(info.value)


def test_an_unexpected_api_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm_module, "_ioctl", lambda fd, request, arg: 11)
    with pytest.raises(KvmError, match="API version 11; embervm needs 12"):
        Kvm("/dev/null")


@pytest.mark.kvm
def test_api_version_and_vcpu_mmap_size(kvm: Kvm) -> None:
    assert kvm.api_version == 12
    # struct kvm_run plus at least the PIO data page
    assert kvm.vcpu_mmap_size >= k.RUN_STRUCT_SIZE


@pytest.mark.kvm
def test_require_extensions_names_the_first_missing_capability(
    kvm: Kvm, monkeypatch: pytest.MonkeyPatch
) -> None:
    kvm.require_extensions()  # this host has them all
    real = kvm.check_extension
    monkeypatch.setattr(
        kvm, "check_extension", lambda cap: 0 if cap == k.KVM_CAP_IRQFD else real(cap)
    )
    with pytest.raises(KvmError, match="lacks KVM_CAP_IRQFD"):
        kvm.require_extensions()


@pytest.mark.kvm
def test_kvm_refusal_is_a_kvm_error_naming_the_ioctl(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        with pytest.raises(KvmError, match="KVM_CREATE_IRQCHIP failed: .*EEXIST"):
            vm.create_irqchip()


@pytest.mark.kvm
def test_every_region_gets_its_own_slot(make_guest: GuestFactory) -> None:
    # Code in low RAM copies a dword from a second region at 1 MiB into low RAM.
    code = bytes.fromhex(
        "a1 00 00 10 00"  # mov eax, [0x100000]
        "a3 00 20 00 00"  # mov [0x2000], eax
        "f4"  # hlt
    )
    guest = make_guest(code, mode="flat32")
    high = GuestMemory([(0x10_0000, 0x1_0000)])
    try:
        high.write_u32(0x10_0000, 0x600DCAFE)
        guest.vm.register_memory(high)
        guest.run_expect(k.KVM_EXIT_HLT)
        assert guest.mem.read_u32(guest.DATA) == 0x600DCAFE
    finally:
        guest.vm.close()
        high.close()


@pytest.mark.kvm
def test_vm_close_closes_its_vcpus(kvm: Kvm) -> None:
    vm: Vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    vm.close()
    assert (vm.fd, vcpu.fd) == (-1, -1)
    assert vcpu.run_mmap.closed
    vm.close()  # idempotent


@pytest.mark.kvm
def test_set_fpu_sets_the_x87_control_word(make_guest: GuestFactory) -> None:
    # MXCSR is not checked: this PVM host ignores it in KVM_SET_FPU and reports 0 from
    # KVM_GET_FPU (KVM_GET_XSAVE shows the reset value 0x1f80 either way).
    vcpu = make_guest(b"\xf4").vcpu
    vcpu.set_fpu(fcw=0x27F)
    assert vcpu.get_fpu().fcw == 0x27F
    vcpu.set_fpu()
    assert vcpu.get_fpu().fcw == 0x37F


@pytest.mark.kvm
def test_boot_msrs_are_accepted_and_read_back(make_guest: GuestFactory) -> None:
    vcpu = make_guest(b"\xf4").vcpu
    vcpu.set_msrs({k.MSR_LSTAR: 0xFFFF_FFFF_8100_0000})
    vcpu.set_boot_msrs()
    msrs = vcpu.get_msrs([k.MSR_LSTAR, k.MSR_IA32_MISC_ENABLE, k.MSR_MTRR_DEF_TYPE])
    assert msrs[k.MSR_LSTAR] == 0
    assert msrs[k.MSR_IA32_MISC_ENABLE] & k.MSR_IA32_MISC_ENABLE_FAST_STRING
    assert msrs[k.MSR_MTRR_DEF_TYPE] == k.MTRR_DEF_TYPE_ENABLE | k.MTRR_TYPE_WRBACK


@pytest.mark.kvm
def test_set_msrs_names_the_msr_kvm_refused(make_guest: GuestFactory) -> None:
    vcpu = make_guest(b"\xf4").vcpu
    # 0x1 is not an MSR KVM emulates (it is reserved on Intel and AMD).
    with pytest.raises(KvmError, match="refused MSR 0x1 "):
        vcpu.set_msrs({k.MSR_STAR: 0, 0x1: 0})


@pytest.mark.kvm
def test_tsc_khz_is_known(make_guest: GuestFactory) -> None:
    khz = make_guest(b"\xf4").vcpu.get_tsc_khz()
    assert 100_000 < khz < 10_000_000  # 100 MHz .. 10 GHz


@pytest.mark.kvm
def test_mp_state_round_trips(make_guest: GuestFactory) -> None:
    vcpu = make_guest(b"\xf4", irqchip=True).vcpu
    assert vcpu.get_mp_state() == k.KVM_MP_STATE_RUNNABLE  # the BSP
    vcpu.set_mp_state(k.KVM_MP_STATE_HALTED)
    assert vcpu.get_mp_state() == k.KVM_MP_STATE_HALTED


@pytest.mark.kvm
def test_describe_exit_names_the_exit_and_rip(make_guest: GuestFactory) -> None:
    guest = make_guest(bytes.fromhex("b0 5a e6 10 f4"))  # mov al, 0x5a; out 0x10, al; hlt
    reason = guest.run()
    assert guest.vcpu.describe_exit(reason) == (
        f"vCPU 0: KVM_EXIT_IO at rip {guest.CODE + 4:#x}: out port 0x10 size 1 count 1"
    )
