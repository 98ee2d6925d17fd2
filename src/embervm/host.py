"""What kind of KVM host this is, and what that means for guests (the host profile).

Two profiles:

* ``kvm`` — an ordinary KVM host (VMX/SVM).  Guests get Firecracker's default command line
  (``console=ttyS0 reboot=k panic=1``) plus what embervm needs, and as many vCPUs as KVM and the
  MP table allow.
* ``pvm`` — a host whose ``/dev/kvm`` is PVM (``kvm_pvm``: paravirtualized nested KVM, guest
  kernel code emulated).  The kit kernel boots there only with extra command-line words
  (``noxsave clearcpuid=...``, see guest/README.md), which embervm adds on this host only,
  first, before any user words; and guests are held to 8 vCPUs (bringing up more was not
  validated under PVM's emulator, and each costs seconds of emulated boot).

Detection: the ``kvm_pvm`` module is loaded (``/sys/module/kvm_pvm``).  ``EMBERVM_HOST_PROFILE``
(``kvm`` or ``pvm``) overrides it, for tests and for hosts where /sys is hidden.
"""

from __future__ import annotations

import functools
import os

# Needed by the kit kernel on PVM (guest/README.md "Guest kernel command line (required)").
PVM_CMDLINE = "noxsave clearcpuid=smap,popcnt,cx16,erms,fsrm,rep_good"
PVM_MAX_VCPUS = 8


class HostProfile:
    """One kind of host (a plain class, not a dataclass: ``embervm run --help`` names the
    profile, and importing dataclasses would cost it ~10 ms)."""

    __slots__ = ("name", "cmdline_words", "max_vcpus")

    def __init__(self, name: str, cmdline_words: str, max_vcpus: int | None) -> None:
        self.name = name  # "kvm" | "pvm"
        #: command-line words the guest kernel needs on this host (before the user's words)
        self.cmdline_words = cmdline_words
        #: a cap on vCPUs that this host imposes beyond KVM's own (None: KVM's limit only)
        self.max_vcpus = max_vcpus

    def __repr__(self) -> str:
        return f"HostProfile({self.name!r})"

    @property
    def description(self) -> str:
        if self.name == "pvm":
            return (f"PVM host (kvm_pvm): guest command line gets '{self.cmdline_words}', "
                    f"at most {self.max_vcpus} vCPUs")
        return "ordinary KVM host: no extra guest command-line words"


KVM = HostProfile("kvm", "", None)
PVM = HostProfile("pvm", PVM_CMDLINE, PVM_MAX_VCPUS)


@functools.cache
def host_profile() -> HostProfile:
    forced = os.environ.get("EMBERVM_HOST_PROFILE", "")
    if forced in ("kvm", "pvm"):
        return PVM if forced == "pvm" else KVM
    return PVM if os.path.isdir("/sys/module/kvm_pvm") else KVM
