"""bzImage setup header parsing and the boot_params zero page (no guest memory needed)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from embervm.boot.bzimage import SetupHeader, build_boot_params, parse_bzimage
from embervm.errors import ConfigError

BZIMAGE = Path("/work/shared/guest/prebuilt/bzImage-base")

# Offsets from Documentation/x86/boot.rst ("THE REAL-MODE KERNEL HEADER") and bootparam.h,
# written here independently of the module under test.
O_SETUP_SECTS = 0x1F1
O_BOOT_FLAG = 0x1FE
O_JUMP = 0x200
O_HEADER = 0x202
O_VERSION = 0x206
O_TYPE_OF_LOADER = 0x210
O_LOADFLAGS = 0x211
O_RAMDISK_IMAGE = 0x218
O_RAMDISK_SIZE = 0x21C
O_CMD_LINE_PTR = 0x228
O_INITRD_ADDR_MAX = 0x22C
O_KERNEL_ALIGNMENT = 0x230
O_RELOCATABLE = 0x234
O_XLOADFLAGS = 0x236
O_CMDLINE_SIZE = 0x238
O_PREF_ADDRESS = 0x258
O_INIT_SIZE = 0x260
O_EXT_RAMDISK_IMAGE = 0x0C0
O_EXT_RAMDISK_SIZE = 0x0C4
O_EXT_CMD_LINE_PTR = 0x0C8
O_E820_ENTRIES = 0x1E8
O_E820_TABLE = 0x2D0


def u16(b: bytes, o: int) -> int:
    return struct.unpack_from("<H", b, o)[0]


def u32(b: bytes, o: int) -> int:
    return struct.unpack_from("<I", b, o)[0]


def u64(b: bytes, o: int) -> int:
    return struct.unpack_from("<Q", b, o)[0]


def make_head(
    *,
    version: int = 0x20F,
    setup_sects: int = 4,
    loadflags: int = 1,
    xloadflags: int = 1,
    relocatable: int = 1,
    pref_address: int = 0x100_0000,
    kernel_alignment: int = 0x20_0000,
    init_size: int = 0x80_0000,
    cmdline_size: int = 2047,
) -> bytes:
    head = bytearray(0x1000)
    head[O_SETUP_SECTS] = setup_sects
    struct.pack_into("<H", head, O_BOOT_FLAG, 0xAA55)
    head[O_JUMP : O_JUMP + 2] = b"\xeb\x6a"  # jmp over a header ending at 0x26c
    head[O_HEADER : O_HEADER + 4] = b"HdrS"
    struct.pack_into("<H", head, O_VERSION, version)
    head[O_LOADFLAGS] = loadflags
    struct.pack_into("<I", head, O_INITRD_ADDR_MAX, 0x7FFF_FFFF)
    struct.pack_into("<I", head, O_KERNEL_ALIGNMENT, kernel_alignment)
    head[O_RELOCATABLE] = relocatable
    struct.pack_into("<H", head, O_XLOADFLAGS, xloadflags)
    struct.pack_into("<I", head, O_CMDLINE_SIZE, cmdline_size)
    struct.pack_into("<Q", head, O_PREF_ADDRESS, pref_address)
    struct.pack_into("<I", head, O_INIT_SIZE, init_size)
    return bytes(head)


@pytest.fixture(scope="module")
def kit_head() -> bytes:
    if not BZIMAGE.exists():
        pytest.skip(f"guest kit bzImage {BZIMAGE} not present")
    with open(BZIMAGE, "rb") as f:
        return f.read(0x1000)


def test_kit_bzimage_header_fields_match_the_image_bytes(kit_head: bytes) -> None:
    hdr = SetupHeader.parse(kit_head)
    assert hdr.version == u16(kit_head, O_VERSION) >= 0x20C
    assert hdr.setup_sects == kit_head[O_SETUP_SECTS]
    assert hdr.xloadflags == u16(kit_head, O_XLOADFLAGS) and hdr.xloadflags & 1
    assert hdr.cmdline_size == u32(kit_head, O_CMDLINE_SIZE)
    assert hdr.initrd_addr_max == u32(kit_head, O_INITRD_ADDR_MAX)
    assert hdr.pref_address == u64(kit_head, O_PREF_ADDRESS)
    assert hdr.init_size == u32(kit_head, O_INIT_SIZE)
    assert hdr.relocatable_kernel == bool(kit_head[O_RELOCATABLE])
    # The raw header runs from 0x1f1 to 0x202 + the jump displacement.
    assert hdr.raw == kit_head[O_SETUP_SECTS : O_HEADER + kit_head[O_JUMP + 1]]


def test_kit_bzimage_load_plan(kit_head: bytes) -> None:
    size = BZIMAGE.stat().st_size
    img = parse_bzimage(kit_head, size)
    setup_size = (kit_head[O_SETUP_SECTS] + 1) * 512
    assert img.segment.paddr == 0x10_0000
    assert img.segment.offset == setup_size
    assert img.segment.filesz == img.segment.memsz == size - setup_size
    assert img.entry == 0x10_0200
    # The kit kernel is not relocatable: it decompresses to pref_address (CONFIG_PHYSICAL_START).
    assert not kit_head[O_RELOCATABLE]
    assert img.runtime_start == u64(kit_head, O_PREF_ADDRESS)
    assert img.kernel_range == (0x10_0000, img.runtime_start + u32(kit_head, O_INIT_SIZE))
    assert img.initrd_max_end == u32(kit_head, O_INITRD_ADDR_MAX) + 1


def test_setup_sects_zero_means_four() -> None:
    img = parse_bzimage(make_head(setup_sects=0), 0x10000)
    assert img.header.setup_sects == 4
    assert img.segment.offset == 5 * 512


@pytest.mark.parametrize(
    ("pref", "align", "runtime"),
    [
        (0x100_0000, 0x20_0000, 0x100_0000),  # below pref_address: run at pref_address
        (0, 0x20_0000, 0x20_0000),  # load address 1 MiB rounded up to the alignment
        (0, 0x10_0000, 0x10_0000),  # already aligned: run in place
    ],
)
def test_relocatable_kernel_runtime_start(pref: int, align: int, runtime: int) -> None:
    img = parse_bzimage(make_head(pref_address=pref, kernel_alignment=align), 0x10000)
    assert img.runtime_start == runtime
    assert img.kernel_range == (0x10_0000, runtime + 0x80_0000)


def test_non_relocatable_kernel_runs_at_pref_address() -> None:
    img = parse_bzimage(make_head(relocatable=0, pref_address=0x200_0000), 0x10000)
    assert img.runtime_start == 0x200_0000


def test_protocol_older_than_2_06_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"2\.05, too old") as e:
        parse_bzimage(make_head(version=0x205), 0x10000)
    assert "\n" not in str(e.value)


def test_protocol_2_06_without_xloadflags_has_no_64bit_entry() -> None:
    # xloadflags only exists from 2.12 on: a 2.06 kernel cannot promise a 64-bit entry.
    with pytest.raises(ConfigError, match="XLF_KERNEL_64"):
        parse_bzimage(make_head(version=0x206, xloadflags=1), 0x10000)


def test_missing_xlf_kernel_64_is_rejected() -> None:
    with pytest.raises(ConfigError, match="XLF_KERNEL_64"):
        parse_bzimage(make_head(xloadflags=0x2), 0x10000)


def test_zimage_loaded_low_is_rejected() -> None:
    with pytest.raises(ConfigError, match="zImage"):
        parse_bzimage(make_head(loadflags=0), 0x10000)


def test_missing_hdrs_magic_is_rejected() -> None:
    head = bytearray(make_head())
    head[O_HEADER] = ord("X")
    with pytest.raises(ConfigError, match="HdrS"):
        parse_bzimage(bytes(head), 0x10000)


def test_image_without_protected_mode_part_is_truncated() -> None:
    with pytest.raises(ConfigError, match="truncated"):
        parse_bzimage(make_head(setup_sects=4), 5 * 512)


def test_boot_params_carry_header_loader_cmdline_ramdisk_and_e820() -> None:
    head = make_head()
    hdr = SetupHeader.parse(head)
    e820 = [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x10_0000, 0x7F0_0000, 1)]
    bp = build_boot_params(hdr, cmdline_addr=0x20000, initrd=(0x7E0_0000, 0x1234), e820=e820)
    assert len(bp) == 4096
    assert bp[O_HEADER : O_HEADER + 4] == b"HdrS"
    assert u16(bp, O_VERSION) == 0x20F
    assert u16(bp, O_BOOT_FLAG) == 0xAA55
    assert bp[O_TYPE_OF_LOADER] == 0xFF
    assert bp[O_LOADFLAGS] & 1  # LOADED_HIGH
    assert u32(bp, O_CMD_LINE_PTR) == 0x20000 and u32(bp, O_EXT_CMD_LINE_PTR) == 0
    assert (u32(bp, O_RAMDISK_IMAGE), u32(bp, O_RAMDISK_SIZE)) == (0x7E0_0000, 0x1234)
    assert bp[O_E820_ENTRIES] == 3
    table = [struct.unpack_from("<QQI", bp, O_E820_TABLE + 20 * i) for i in range(3)]
    assert table == e820
    # Past the header (0x26c) up to the e820 table, nothing else is set.
    assert bp[0x26C:O_E820_TABLE] == bytes(O_E820_TABLE - 0x26C)


def test_boot_params_split_addresses_above_4gib_into_ext_fields() -> None:
    hdr = SetupHeader.parse(make_head())
    bp = build_boot_params(
        hdr, cmdline_addr=0x1_0002_0000, initrd=(0x2_0000_1000, 0x1_0000_0010), e820=[]
    )
    assert (u32(bp, O_CMD_LINE_PTR), u32(bp, O_EXT_CMD_LINE_PTR)) == (0x20000, 1)
    assert (u32(bp, O_RAMDISK_IMAGE), u32(bp, O_EXT_RAMDISK_IMAGE)) == (0x1000, 2)
    assert (u32(bp, O_RAMDISK_SIZE), u32(bp, O_EXT_RAMDISK_SIZE)) == (0x10, 1)


def test_boot_params_without_initrd_have_zero_ramdisk_fields() -> None:
    bp = build_boot_params(
        SetupHeader.parse(make_head()), cmdline_addr=0x20000, initrd=None, e820=[]
    )
    assert u32(bp, O_RAMDISK_IMAGE) == u32(bp, O_RAMDISK_SIZE) == 0


def test_boot_params_refuse_more_e820_entries_than_the_zero_page_holds() -> None:
    hdr = SetupHeader.parse(make_head())
    e820 = [(i << 20, 1 << 20, 1) for i in range(129)]
    with pytest.raises(ConfigError, match="e820"):
        build_boot_params(hdr, cmdline_addr=0x20000, initrd=None, e820=e820)
