"""Emulated devices: legacy PC devices and virtio devices."""
