"""One exception hierarchy for embervm.

User-facing errors (:class:`ConfigError`) carry a message that says what was wrong and how to
fix it; the CLI prints it on one line and exits with status 2.  Errors caused by the guest
(:class:`GuestError` and subclasses) never escape to the VMM's top level: the device that sees
them reports an error status or sets DEVICE_NEEDS_RESET and the VM keeps running.
"""


class EmbervmError(Exception):
    """Base class of every error embervm raises on purpose."""


class ConfigError(EmbervmError):
    """Bad input from the user: configuration, paths, images, sizes."""


class StateError(EmbervmError):
    """An operation that the VM's current state does not allow (e.g. adding a drive after
    start, pausing a VM that is not running)."""


class KvmError(EmbervmError):
    """The host's KVM refused something or lacks a capability embervm needs."""


class GuestError(EmbervmError):
    """The guest did something invalid (hostile or buggy driver)."""


class GuestMemoryError(GuestError):
    """An access to guest-physical memory outside RAM (or across a region boundary)."""


class QueueError(GuestError):
    """A virtqueue (ring layout, descriptor chain) violates the virtio spec."""
