"""``embervm run --disk ROOTFS,root`` boots Linux from an ext4 root disk, the way a user would:
the embedded kernel (``vmlinux-full``, which has ext4), no ``--initrd`` (a root disk means the
embedded initramfs is not used), the kit's busybox init from the disk's /sbin/init.

One boot: a script disk (``guest.script=/dev/vdb``, the second drive: the root drive is put
first) reports the kernel command line and what is mounted on ``/``, writes a file with a
nonce, syncs, and the init reboots the guest (exit 0).  The host then reads the file out of the
image with ``debugfs``: the guest's write reached the image file through virtio-blk.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from e2e_helpers import Run, run_embervm, script_disk

SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t, path=SBIN) for t in ("mkfs.ext4", "debugfs", "cpio")),
    reason="needs e2fsprogs and cpio (make rootfs installs them)")

NONCE = secrets.token_hex(8)

GUEST_SCRIPT = f"""
echo "ROOTFS-CMDLINE [$(cat /proc/cmdline)]"
echo "ROOTFS-ROOT [$(grep ' / ' /proc/mounts)]"
root=$(grep '^[0-9]* [0-9]* [0-9:]* / / ' /proc/self/mountinfo)
echo "ROOTFS-DEV [$root] vda [$(cat /sys/block/vda/dev)]"
echo "written by the guest {NONCE}" > /embervm-rootfs-test.txt
sync
echo "ROOTFS-WROTE status=$?"
"""


@pytest.fixture(scope="module")
def boot(tmp_path_factory) -> tuple[Run, Path]:
    from embervm.testing.rootfs import build_rootfs

    d = tmp_path_factory.mktemp("rootfs-boot")
    image = build_rootfs(d / "rootfs.ext4")
    script = script_disk(d / "script.img", GUEST_SCRIPT)
    run = run_embervm("run", "--disk", f"{image},root", "--disk", f"{script},ro",
                      "--append", "guest.script=/dev/vdb", "--serial", "stdio", timeout=600)
    return run, image


def _line(run: Run, pattern: str) -> re.Match[str]:
    m = re.search(pattern, run.console)
    assert m, f"no line matching {pattern!r}" + run.tail()
    return m


def test_root_disk_is_vda_on_the_kernel_command_line(boot):
    run, _ = boot
    words = _line(run, r"ROOTFS-CMDLINE \[([^\]]*)\]").group(1).split()
    assert "root=/dev/vda" in words and "rw" in words, run.tail()


def test_root_is_the_ext4_disk_not_an_initramfs(boot):
    run, _ = boot
    # /proc/mounts names a root mounted by the kernel "/dev/root": the device numbers in
    # /proc/self/mountinfo say which disk it is.
    device, mountpoint, fstype, options = _line(
        run, r"ROOTFS-ROOT \[(\S+) (\S+) (\S+) (\S+)[^\]]*\]").groups()
    assert (device, mountpoint, fstype) == ("/dev/root", "/", "ext4"), run.tail()
    assert options.split(",")[0] == "rw", run.tail()
    root_dev, vda_dev = _line(
        run, r"ROOTFS-DEV \[\d+ \d+ (\d+:\d+) / / [^\]]*\] vda \[(\d+:\d+)\]").groups()
    assert root_dev == vda_dev, run.tail()


def test_guest_reboots_cleanly(boot):
    run, _ = boot
    assert _line(run, r"ROOTFS-WROTE status=(\d+)").group(1) == "0", run.tail()
    assert run.status == 0, f"exit status {run.status}" + run.tail()


def test_the_guests_file_is_in_the_image(boot):
    run, image = boot
    debugfs = shutil.which("debugfs", path=SBIN)
    assert debugfs
    proc = subprocess.run([debugfs, "-R", "cat /embervm-rootfs-test.txt", str(image)],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout == f"written by the guest {NONCE}\n", proc.stderr + run.tail()
