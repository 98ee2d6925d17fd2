"""embervm: a small, hackable microVM monitor on Linux KVM with virtio-mmio devices."""

__version__ = "0.1.0"
