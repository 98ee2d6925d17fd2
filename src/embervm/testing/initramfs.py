"""Build small initramfs archives (cpio "newc") in Python, to extend the guest's initramfs.

Linux unpacks *concatenated* cpio archives in one initrd, later files replacing earlier ones
(Documentation/driver-api/early-userspace/buffer-format.rst).  Tests add helper programs or
scripts to the kit's busybox initramfs by appending an archive built here — no root, no cpio
tool, and the (uncompressed) result boots without the emulated gzip inflation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

_MAGIC = b"070701"


def _entry(name: str, data: bytes, mode: int, ino: int) -> bytes:
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0]
    hdr = _MAGIC + b"".join(b"%08X" % f for f in fields)
    out = hdr + namez
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def newc_archive(files: Mapping[str, bytes | tuple[bytes, int]]) -> bytes:
    """An archive of regular files (``name -> data`` or ``(data, mode)``, default 0o755).

    Parent directories are created (mode 0o755).  Names are relative ("usr/bin/x").
    """
    dirs: set[str] = set()
    for name in files:
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    out = bytearray()
    ino = 1000
    for d in sorted(dirs):
        out += _entry(d, b"", 0o040755, ino)
        ino += 1
    for name, value in files.items():
        data, perm = (value, 0o755) if isinstance(value, bytes) else value
        out += _entry(name.strip("/"), data, 0o100000 | perm, ino)
        ino += 1
    out += _entry("TRAILER!!!", b"", 0, 0)
    out += b"\0" * (-len(out) % 512)
    return bytes(out)


def extend_initramfs(base: str | os.PathLike[str], files: Mapping[str, bytes | tuple[bytes, int]],
                     out: str | os.PathLike[str]) -> Path:
    """Write ``base`` (an uncompressed or compressed initramfs) followed by ``files``."""
    data = Path(base).read_bytes()
    data += b"\0" * (-len(data) % 4)
    Path(out).write_bytes(data + newc_archive(files))
    return Path(out)
