"""embervm: a small, hackable microVM monitor on Linux KVM with virtio-mmio devices.

``from embervm import Machine`` is the Python API (:mod:`embervm.machine`); it is imported on
first use, so ``import embervm`` stays cheap for the command-line front ends.
"""

__version__ = "0.1.0"

__all__ = ["Machine", "__version__"]


def __getattr__(name: str):
    if name == "Machine":
        from .machine import Machine

        return Machine
    raise AttributeError(f"module 'embervm' has no attribute {name!r}")
