"""KVM through ctypes: ioctl numbers and structs (``ioctls``), the Kvm/Vm/Vcpu objects
(``kvm``) and the guest CPUID table (``cpuid``).

Layering: this package imports nothing from embervm except ``errors`` and ``memory``, and
nothing virtio imports it.
"""

from .cpuid import CpuidEntry, build_cpuid
from .ioctls import Regs, Segment, Sregs
from .kvm import (
    EXIT_INTR,
    KICK_SIGNAL,
    REQUIRED_CAPABILITIES,
    Kvm,
    Vcpu,
    Vm,
    install_kick_handler,
)

__all__ = [
    "EXIT_INTR",
    "KICK_SIGNAL",
    "REQUIRED_CAPABILITIES",
    "CpuidEntry",
    "Kvm",
    "Regs",
    "Segment",
    "Sregs",
    "Vcpu",
    "Vm",
    "build_cpuid",
    "install_kick_handler",
]
