"""End-to-end fixtures.  Linux boots in tens of seconds on this host (guest kernel code is
emulated), so each test module shares as few boots as it can and each boot serves several
assertions.  Tests here skip, with the reason, only where /dev/kvm is unusable.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from e2e_helpers import kvm_usable

from embervm import images


def pytest_collection_modifyitems(config, items):
    reason = kvm_usable()
    for item in items:
        if "tests/e2e" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.e2e)
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"needs KVM: {reason}"))


@pytest.fixture(scope="session")
def kernel_base() -> Path:
    return images.image("vmlinux-base")


@pytest.fixture(scope="session")
def kernel_full() -> Path:
    return images.image("vmlinux-full")


@pytest.fixture(scope="session")
def initrd_tiny() -> Path:
    return images.image("initramfs-tiny")


@pytest.fixture(scope="session")
def initrd_busybox() -> Path:
    return images.image("initramfs-busybox")
