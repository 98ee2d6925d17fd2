"""The busybox ext4 root filesystem image (guest/rootfs/build-rootfs.sh, make rootfs,
embervm.testing.rootfs): built without root, checked with e2fsck and debugfs.  No guest boot;
booting it (root=/dev/vda rw) is left to the tests that use it."""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from embervm.errors import EmbervmError
from embervm.testing import rootfs
from embervm.testing.rootfs import build_rootfs

UUID = "5eedf00d-e3be-4a3e-9000-0000000000e4"
SBIN = os.pathsep.join(["/usr/sbin", "/sbin", os.environ.get("PATH", "")])

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t, path=SBIN) for t in ("mkfs.ext4", "debugfs", "e2fsck", "cpio")),
    reason="needs e2fsprogs and cpio (make rootfs installs them)")


def tool(name: str) -> str:
    path = shutil.which(name, path=SBIN)
    assert path
    return path


def debugfs(image: Path, request: str) -> str:
    proc = subprocess.run([tool("debugfs"), "-R", request, str(image)], capture_output=True,
                          text=True, check=True)
    return proc.stdout


def initramfs_files() -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of the kit's busybox initramfs (cpio newc)."""
    data = lzma.decompress(rootfs.INITRAMFS.read_bytes())
    files, pos = {}, 0
    while True:
        assert data[pos:pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = data[pos + 110:name_end - 1].decode()
        body = (name_end + 3) & ~3
        if name == "TRAILER!!!":
            return files
        files[name] = (mode, data[body:body + size])
        pos = (body + size + 3) & ~3


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_rootfs(tmp_path_factory.mktemp("rootfs"))


def test_image_is_a_clean_ext4_filesystem_of_the_requested_size(image: Path) -> None:
    assert image.name == "rootfs.ext4"
    assert image.stat().st_size == 64 << 20
    proc = subprocess.run([tool("e2fsck"), "-fn", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stats = debugfs(image, "stats")
    assert f"Filesystem UUID:          {UUID}" in stats
    assert "Filesystem volume name:   rootfs" in stats
    assert "has_journal" in stats and "extent" in stats  # ext4, not ext2


def test_init_is_the_kits_busybox_init_at_sbin_init(image: Path, tmp_path: Path) -> None:
    listing = debugfs(image, "ls -l /sbin")
    assert any(line.split()[-1] == "init" and line.split()[1] == "100755"
               for line in listing.splitlines() if line.strip())
    out = tmp_path / "init"
    debugfs(image, f"dump /sbin/init {out}")
    _, want = initramfs_files()["init"]
    assert out.read_bytes() == want
    assert want.startswith(b"#!/bin/busybox sh") and b"guest.script=" in want


def test_busybox_and_its_applet_links_come_from_the_initramfs(image: Path,
                                                             tmp_path: Path) -> None:
    files = initramfs_files()
    out = tmp_path / "busybox"
    debugfs(image, f"dump /bin/busybox {out}")
    assert out.read_bytes() == files["bin/busybox"][1]
    links = {n.removeprefix("bin/") for n, (mode, _) in files.items()
             if n.startswith("bin/") and mode & 0o170000 == 0o120000}
    assert "sh" in links
    listing = debugfs(image, "ls -l /bin")
    in_image = {line.split()[-1] for line in listing.splitlines()
                if line.strip() and line.split()[1] == "120777"}
    assert in_image == links
    assert debugfs(image, "stat /bin/sh").count('Fast link dest: "busybox"') == 1


def test_device_nodes_mount_points_and_root_ownership(image: Path) -> None:
    dev = debugfs(image, "ls -l /dev").split("\n")
    console = next(line.split() for line in dev if line.strip().endswith(" console"))
    null = next(line.split() for line in dev if line.strip().endswith(" null"))
    assert console[1] == "20600" and null[1] == "20666"
    assert "Device major/minor number: 05:01" in debugfs(image, "stat /dev/console")
    assert "Device major/minor number: 01:03" in debugfs(image, "stat /dev/null")
    top = {line.split()[-1]: line.split() for line in debugfs(image, "ls -l /").splitlines()
           if line.strip()}
    for d in ("dev", "proc", "sys", "run", "tmp", "root", "bin", "sbin"):
        assert d in top, d
    assert top["tmp"][1] == "41777" and top["root"][1] == "40700"
    for listing in (debugfs(image, "ls -l /"), debugfs(image, "ls -l /bin"),
                    debugfs(image, "ls -l /dev"), debugfs(image, "ls -l /sbin")):
        for line in listing.splitlines():
            if line.strip():
                uid, gid = line.split()[3:5]
                assert (uid, gid) == ("0", "0"), line


def test_second_build_comes_from_the_cache_as_a_private_sparse_copy(image: Path,
                                                                     tmp_path: Path) -> None:
    cached = list(rootfs.cache_dir().glob("rootfs-*.ext4"))
    assert cached
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    again = build_rootfs(tmp_path / "copy.ext4")
    assert again == tmp_path / "copy.ext4"
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # not rebuilt
    assert again.read_bytes() == image.read_bytes()
    assert again.stat().st_blocks * 512 < 16 << 20  # holes, not 64 MiB of zeros
    assert os.stat(again).st_ino != os.stat(image).st_ino


def test_size_is_part_of_the_cache_key(tmp_path: Path) -> None:
    small = build_rootfs(tmp_path / "small.ext4", size_mib=16)
    assert small.stat().st_size == 16 << 20
    proc = subprocess.run([tool("e2fsck"), "-fn", str(small)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_script_failure_is_an_error_with_its_message(tmp_path: Path) -> None:
    with pytest.raises(EmbervmError, match="SIZE_MIB must be at least 8"):
        build_rootfs(tmp_path / "tiny.ext4", size_mib=1)
    assert not (tmp_path / "tiny.ext4").exists()


@pytest.mark.skipif(os.getuid() != 0 or not shutil.which("setpriv"),
                    reason="checks a build by an unprivileged user; needs root to switch")
def test_an_unprivileged_user_builds_the_same_tree() -> None:
    work = Path(tempfile.mkdtemp(prefix="rootfs-nobody-"))  # pytest's tmp dirs are 0700
    try:
        work.chmod(0o777)
        out = work / "nobody.ext4"
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             str(rootfs.SCRIPT), str(out), "16"],
            env={"PATH": SBIN, "TMPDIR": str(work)}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_uid == 65534
        fsck = subprocess.run([tool("e2fsck"), "-fn", str(out)], capture_output=True)
        assert fsck.returncode == 0
        for listing in (debugfs(out, "ls -l /bin"), debugfs(out, "ls -l /dev")):
            for line in listing.splitlines():
                if line.strip():
                    assert line.split()[3:5] == ["0", "0"], line
    finally:
        shutil.rmtree(work)
