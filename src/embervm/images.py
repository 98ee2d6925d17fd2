"""The embedded default guest: kernels and initramfs images shipped inside the package.

They are the guest kit's prebuilt files (``guest/`` holds the recipe; ``make guest`` rebuilds
them), stored compressed.  The guest must get them *uncompressed*: decompression inside the guest
runs emulated on this project's PVM host and costs tens of seconds, on the host it costs well under
a second.  Decompressed copies are cached under ``$XDG_CACHE_HOME/embervm`` (or ``~/.cache``),
named by the compressed file's SHA-256 from the package's ``SHA256SUMS`` (written by
``make guest``), and written atomically.  So a start reads one small text file, not the
compressed image, and imports no compression module unless it has to decompress; and no hash
is computed at run time (``import hashlib`` would map OpenSSL's libcrypto into the VMM for one
hash, +3.8 MiB of RSS, docs/PERFORMANCE.md).  An image missing from SHA256SUMS (a hand-made
package) is keyed by a CRC-32 of its content instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

DATA_DIR = Path(__file__).with_name("guest")

#: name → compressed file in DATA_DIR
IMAGES = {
    "vmlinux-full": "vmlinux-full.xz",
    "vmlinux-base": "vmlinux-base.xz",
    "initramfs-busybox": "initramfs-busybox.cpio.xz",
    "initramfs-tiny": "initramfs-tiny.cpio.gz",
}
DEFAULT_KERNEL = "vmlinux-full"
DEFAULT_INITRD = "initramfs-busybox"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embervm"


def image(name: str) -> Path:
    """Path of the uncompressed embedded image ``name`` (decompressed once, then cached)."""
    try:
        src = DATA_DIR / IMAGES[name]
    except KeyError:
        raise ConfigError(f"unknown embedded image {name!r}; known: {', '.join(IMAGES)}") from None
    if not src.is_file():
        raise ConfigError(f"embedded image {src} is missing: reinstall embervm or run make guest")
    digest = _checksums().get(src.name)
    if digest is None:
        import zlib

        data = src.read_bytes()
        digest = f"{zlib.crc32(data):08x}{len(data):x}"
    out = cache_dir() / f"{name}-{digest[:24]}"
    if out.is_file():
        return out
    import gzip
    import lzma
    import tempfile

    opener = lzma.open if src.suffix == ".xz" else gzip.open
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as dst, opener(src, "rb") as f:
            while chunk := f.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def _checksums() -> dict[str, str]:
    """file name -> SHA-256 hex, from the package's SHA256SUMS ({} if it is missing)."""
    try:
        text = (DATA_DIR / "SHA256SUMS").read_text()
    except OSError:
        return {}
    sums = {}
    for line in text.splitlines():
        digest, _, fname = line.partition("  ")
        if len(digest) == 64 and fname:
            sums[fname.strip()] = digest
    return sums


def default_kernel() -> Path:
    return image(DEFAULT_KERNEL)


def default_initrd() -> Path:
    return image(DEFAULT_INITRD)
