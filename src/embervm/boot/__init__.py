"""Boot loaders: vmlinux through PVH, bzImage through the 64-bit boot protocol.

Pure with respect to KVM: everything is written into a :class:`~embervm.memory.GuestMemory` and
the boot CPU's register state comes back as plain data for the KVM layer to apply.
"""

from .setup import BootInfo, CpuBootState, Segment, e820_map, setup_boot

__all__ = ["BootInfo", "CpuBootState", "Segment", "e820_map", "setup_boot"]
