"""The embedded images: decompressed once into the cache, named by the SHA-256 that
SHA256SUMS records for the compressed file (a CRC-32 of the content when it records none)."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from embervm import images


@pytest.fixture
def pkg(tmp_path: Path, monkeypatch) -> Path:
    data = tmp_path / "guest"
    data.mkdir()
    (data / "vmlinux-full.xz").write_bytes(lzma.compress(b"kernel bytes"))
    monkeypatch.setattr(images, "DATA_DIR", data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return data


def test_image_is_named_by_the_recorded_sha256_and_decompressed_once(pkg: Path) -> None:
    (pkg / "SHA256SUMS").write_text("ab" * 32 + "  vmlinux-full.xz\n")
    out = images.image("vmlinux-full")
    assert out.name == "vmlinux-full-" + ("ab" * 32)[:24]
    assert out.read_bytes() == b"kernel bytes"
    out.write_bytes(b"cached copy")  # a second call must not decompress again
    assert images.image("vmlinux-full").read_bytes() == b"cached copy"


def test_without_a_recorded_sum_the_content_checksum_names_it(pkg: Path) -> None:
    out = images.image("vmlinux-full")
    assert out.read_bytes() == b"kernel bytes"
    (pkg / "vmlinux-full.xz").write_bytes(lzma.compress(b"another kernel"))
    assert images.image("vmlinux-full").read_bytes() == b"another kernel"


def test_unknown_and_missing_images_are_config_errors(pkg: Path) -> None:
    from embervm.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown embedded image"):
        images.image("vmlinux-nope")
    with pytest.raises(ConfigError, match="missing"):
        images.image("vmlinux-base")
