"""An ext4 root filesystem image of the kit's busybox userland, for tests that boot from a disk.

:func:`build_rootfs` runs ``guest/rootfs/build-rootfs.sh`` (the script ``make rootfs`` runs)
and caches its result under the temporary directory, keyed by a hash of everything the image is
made from: the script, the busybox initramfs it unpacks and the size.  Each call hands out its
own sparse copy of the cached image, because a guest mounts it ``rw`` and writes to it (the
journal, /run).  The boot needs the full guest kernel (ext4), no initramfs, and the kernel
command line ``root=/dev/vda rw`` with the image as the first virtio-blk drive; init is the
kit's busybox init at /sbin/init (``guest.script=`` etc. as in the initramfs).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from ..errors import EmbervmError

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "guest" / "rootfs" / "build-rootfs.sh"
INITRAMFS = Path(__file__).resolve().parents[1] / "guest" / "initramfs-busybox.cpio.xz"
IMAGE_NAME = "rootfs.ext4"
_CHUNK = 1 << 16


def cache_dir() -> Path:
    """Where built images are kept: ``$TMPDIR/embervm-rootfs-cache``."""
    return Path(tempfile.gettempdir()) / "embervm-rootfs-cache"


def _inputs_key(size_mib: int) -> str:
    h = hashlib.sha256()
    for path in (SCRIPT, INITRAMFS):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(b"size=%d" % size_mib)
    return h.hexdigest()[:32]


def build_rootfs(out: Path, size_mib: int = 64) -> Path:
    """Write the busybox root filesystem image (``size_mib`` MiB of ext4) to ``out``.

    ``out`` is the image's path, or a directory to put ``rootfs.ext4`` in; returns the image's
    path.  The image is built once per set of inputs (see the module docstring) and copied from
    the cache afterwards; concurrent builders each build and the last rename wins, with the
    same content.  Raises EmbervmError if the script fails (missing e2fsprogs, cpio or xz: its
    message says what to install).
    """
    if not SCRIPT.is_file():
        raise EmbervmError(f"{SCRIPT} is missing: build_rootfs needs the embervm source tree")
    out = Path(out)
    if out.is_dir():
        out = out / IMAGE_NAME
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / f"rootfs-{_inputs_key(size_mib)}.ext4"
    if not cached.is_file():
        partial = cache / f".{cached.name}.{os.getpid()}.partial"
        proc = subprocess.run(
            [str(SCRIPT), str(partial), str(size_mib)],
            env={**os.environ, "ROOTFS_INITRAMFS": str(INITRAMFS)},
            capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            partial.unlink(missing_ok=True)
            raise EmbervmError(f"{SCRIPT.name} failed (exit {proc.returncode}): "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        os.replace(partial, cached)
    _sparse_copy(cached, out)
    return out


def _sparse_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` leaving all-zero 64 KiB chunks as holes (the image is mostly
    empty: ~6 MiB of 64 are written), through a temporary name so ``dst`` is never partial."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    zero = bytes(_CHUNK)
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                if chunk == zero[: len(chunk)]:
                    fout.seek(len(chunk), os.SEEK_CUR)
                else:
                    fout.write(chunk)
            fout.truncate()
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
