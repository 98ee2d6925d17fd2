"""Every number in embervm.kvm.ioctls, checked against the installed <linux/kvm.h>.

A C compiler computes the ioctl numbers, constants, struct sizes and kvm_run offsets from
the kernel headers; a mismatch is a transcription error that would corrupt ioctl arguments.
Skipped when there is no C compiler or no kernel headers (nothing here needs /dev/kvm).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from embervm.kvm import ioctls as k

HEADER = Path("/usr/include/linux/kvm.h")

# Python struct -> C struct
STRUCTS = {
    k.Regs: "kvm_regs",
    k.Segment: "kvm_segment",
    k.Dtable: "kvm_dtable",
    k.Sregs: "kvm_sregs",
    k.Fpu: "kvm_fpu",
    k.MsrEntry: "kvm_msr_entry",
    k.MsrsHeader: "kvm_msrs",
    k.CpuidEntry2: "kvm_cpuid_entry2",
    k.Cpuid2Header: "kvm_cpuid2",
    k.LapicState: "kvm_lapic_state",
    k.UserspaceMemoryRegion: "kvm_userspace_memory_region",
    k.Ioeventfd: "kvm_ioeventfd",
    k.Irqfd: "kvm_irqfd",
    k.IrqLevel: "kvm_irq_level",
    k.PitConfig: "kvm_pit_config",
    k.MpState: "kvm_mp_state",
}

# Python offset constant -> C offsetof(struct kvm_run, ...)
RUN_OFFSETS = {
    "RUN_REQUEST_INTERRUPT_WINDOW": "request_interrupt_window",
    "RUN_IMMEDIATE_EXIT": "immediate_exit",
    "RUN_EXIT_REASON": "exit_reason",
    "RUN_READY_FOR_INTERRUPT_INJECTION": "ready_for_interrupt_injection",
    "RUN_IF_FLAG": "if_flag",
    "RUN_IO": "io",
    "RUN_MMIO": "mmio",
    "RUN_MMIO_DATA": "mmio.data",
    "RUN_FAIL_ENTRY": "fail_entry",
    "RUN_INTERNAL": "internal",
    "RUN_SYSTEM_EVENT": "system_event",
}

# Every KVM_* name in the module is the kernel's, with the kernel's value.
CONSTANTS = sorted(n for n in dir(k) if n.startswith("KVM") and isinstance(getattr(k, n), int))


def kernel_values(tmp_path: Path) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not HEADER.exists():
        pytest.skip("needs a C compiler and the kernel headers (linux-libc-dev)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>"]
    lines.append("int main(void) {")
    show = '    printf("%s %llu\\n", "{name}", (unsigned long long)({expr}));'
    lines += [show.format(name=n, expr=n) for n in CONSTANTS]
    lines += [show.format(name=f"sizeof {c}", expr=f"sizeof(struct {c})") for c in STRUCTS.values()]
    lines += [
        show.format(name=f"offsetof {f}", expr=f"offsetof(struct kvm_run, {f})")
        for f in RUN_OFFSETS.values()
    ]
    lines += [show.format(name="sizeof kvm_run", expr="sizeof(struct kvm_run)"), "}"]
    source = tmp_path / "abi.c"
    source.write_text("\n".join(lines) + "\n")
    binary = tmp_path / "abi"
    subprocess.run([cc, "-o", str(binary), str(source)], check=True, capture_output=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.rsplit(" ", 1) for line in out.splitlines())}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    return kernel_values(tmp_path_factory.mktemp("abi"))


def test_constants_and_ioctl_numbers_match_the_kernel(kernel: dict[str, int]) -> None:
    mismatched = {n: (hex(getattr(k, n)), hex(kernel[n])) for n in CONSTANTS
                  if getattr(k, n) != kernel[n]}  # fmt: skip
    assert mismatched == {}
    assert len(CONSTANTS) > 80  # the comparison really covered the module


def test_struct_sizes_match_the_kernel(kernel: dict[str, int]) -> None:
    for struct, name in STRUCTS.items():
        assert ctypes.sizeof(struct) == kernel[f"sizeof {name}"], name


def test_kvm_run_offsets_match_the_kernel(kernel: dict[str, int]) -> None:
    for const, field in RUN_OFFSETS.items():
        assert getattr(k, const) == kernel[f"offsetof {field}"], field
    assert kernel["sizeof kvm_run"] == k.RUN_STRUCT_SIZE
