"""bzImage parsing and the boot_params "zero page" for the 64-bit boot protocol.

Documentation/x86/boot.rst, "64-bit BOOT PROTOCOL": the loader fills a struct boot_params
(arch/x86/include/uapi/asm/bootparam.h) whose setup header is copied from offset 0x1f1 of the
image, loads the protected-mode part (everything after the ``setup_sects`` real-mode sectors),
and jumps to its start + 0x200 in long mode with %rsi = &boot_params.  The real-mode setup code
is never run, so none of the 16-bit protocol's heap/segment fields matter.

Pure functions: :func:`parse_bzimage` turns the image's first bytes into a load plan and
:func:`build_boot_params` returns the zero page as bytes; ``setup.py`` writes them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import ConfigError
from .elf import LoadSegment
from .layout import (
    BZIMAGE_ENTRY_OFFSET,
    BZIMAGE_LOAD_ADDR,
    E820_MAX_ENTRIES_ZEROPAGE,
    INITRD_MAX_END_32BIT,
)

HDR_MAGIC = b"HdrS"  # setup_header.header, "HdrS" = 0x53726448
HDR_MAGIC_OFFSET = 0x202
BOOT_FLAG_MAGIC = 0xAA55
#: Reading this many bytes from the start of the image covers the whole setup header.
BZIMAGE_HEAD_SIZE = 0x1000
BOOT_PARAMS_SIZE = 0x1000

# struct boot_params offsets (bootparam.h; boot.rst "THE REAL-MODE KERNEL HEADER").
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SETUP_HEADER_START = 0x1F1
SETUP_SECTS = 0x1F1
BOOT_FLAG = 0x1FE
JUMP = 0x200
VERSION = 0x206
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
CMD_LINE_PTR = 0x228
INITRD_ADDR_MAX = 0x22C
KERNEL_ALIGNMENT = 0x230
RELOCATABLE_KERNEL = 0x234
XLOADFLAGS = 0x236
CMDLINE_SIZE = 0x238
PREF_ADDRESS = 0x258
INIT_SIZE = 0x260
#: boot_params pads the setup header up to edd_mbr_sig_buffer; a longer header is cut here.
SETUP_HEADER_MAX_END = 0x290
E820_TABLE = 0x2D0

# loadflags / xloadflags bits.
LOADED_HIGH = 1 << 0
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
#: type_of_loader 0xff: "undefined" boot loader (boot.rst; embervm has no assigned ID).
LOADER_TYPE_UNDEFINED = 0xFF

MIN_PROTOCOL = 0x206  # 2.06: cmdline_size exists, initrd_addr_max is meaningful
XLOADFLAGS_PROTOCOL = 0x20C  # 2.12: xloadflags (and with it XLF_KERNEL_64) appeared

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_E820_ENTRY = struct.Struct("<QQI")  # struct boot_e820_entry, packed (20 bytes)


@dataclass(frozen=True, slots=True)
class SetupHeader:
    """The fields of a bzImage's setup header the loader needs, plus the raw bytes to copy."""

    raw: bytes  # image[0x1f1 : end of header], copied verbatim into boot_params
    setup_sects: int
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int

    @classmethod
    def parse(cls, head: bytes, name: str = "kernel") -> SetupHeader:
        """Parse the setup header from the first bytes of a bzImage (at least 0x290)."""
        magic = head[HDR_MAGIC_OFFSET : HDR_MAGIC_OFFSET + len(HDR_MAGIC)]
        if len(head) < SETUP_HEADER_MAX_END or magic != HDR_MAGIC:
            raise ConfigError(f"{name} is not a bzImage (no 'HdrS' setup header magic at 0x202)")
        version = _U16.unpack_from(head, VERSION)[0]
        if version < MIN_PROTOCOL:
            raise ConfigError(
                f"{name} uses boot protocol {version >> 8}.{version & 0xFF:02d}, too old: "
                "embervm needs 2.06 or later (use a newer kernel or its vmlinux)"
            )
        xloadflags = _U16.unpack_from(head, XLOADFLAGS)[0] if version >= XLOADFLAGS_PROTOCOL else 0
        if not xloadflags & XLF_KERNEL_64:
            raise ConfigError(
                f"{name} has no 64-bit entry point (XLF_KERNEL_64 not set): embervm needs an "
                "x86_64 bzImage from Linux 3.8 or later"
            )
        if _U16.unpack_from(head, BOOT_FLAG)[0] != BOOT_FLAG_MAGIC:
            raise ConfigError(f"{name} is not a bzImage (boot_flag is not 0xAA55)")
        loadflags = head[LOADFLAGS]
        if not loadflags & LOADED_HIGH:
            raise ConfigError(f"{name} is a zImage (loaded low): embervm needs a bzImage")
        # The header ends at 0x202 + the jump's 8-bit displacement (boot.rst, 64-bit protocol).
        end = min(HDR_MAGIC_OFFSET + head[JUMP + 1], SETUP_HEADER_MAX_END)
        setup_sects = head[SETUP_SECTS] or 4  # 0 means 4 (boot.rst, setup_sects)
        return cls(
            raw=bytes(head[SETUP_HEADER_START:end]),
            setup_sects=setup_sects,
            version=version,
            loadflags=loadflags,
            initrd_addr_max=_U32.unpack_from(head, INITRD_ADDR_MAX)[0],
            kernel_alignment=_U32.unpack_from(head, KERNEL_ALIGNMENT)[0],
            relocatable_kernel=bool(head[RELOCATABLE_KERNEL]),
            xloadflags=xloadflags,
            cmdline_size=_U32.unpack_from(head, CMDLINE_SIZE)[0],
            pref_address=_U64.unpack_from(head, PREF_ADDRESS)[0],
            init_size=_U32.unpack_from(head, INIT_SIZE)[0],
        )


@dataclass(frozen=True, slots=True)
class BzImage:
    """A bzImage ready to load: where its protected-mode part goes and what it will occupy."""

    header: SetupHeader
    segment: LoadSegment
    entry: int
    #: Where the decompressor puts the kernel (boot.rst, "kernel runtime start address").
    runtime_start: int

    @property
    def kernel_range(self) -> tuple[int, int]:
        """[start, end): the loaded image plus the runtime area of init_size bytes.

        Until it has parsed the e820 map the kernel may use all of it (the decompressor copies
        itself to the end of that area), so the initrd must lie above.
        """
        end = max(self.segment.end, self.runtime_start + self.header.init_size)
        return self.segment.paddr, end

    @property
    def initrd_max_end(self) -> int:
        """Exclusive upper bound for the initrd: initrd_addr_max is the last usable byte."""
        return min(self.header.initrd_addr_max + 1, INITRD_MAX_END_32BIT)


def parse_bzimage(head: bytes, file_size: int, name: str = "kernel") -> BzImage:
    """Turn the first bytes of a bzImage and its size into a load plan."""
    hdr = SetupHeader.parse(head, name)
    setup_size = (hdr.setup_sects + 1) * 512
    if setup_size >= file_size:
        raise ConfigError(f"{name} is truncated: no protected-mode kernel after the setup code")
    load = BZIMAGE_LOAD_ADDR
    if hdr.relocatable_kernel:
        align = hdr.kernel_alignment or 1
        runtime_start = -(-max(load, hdr.pref_address) // align) * align
    else:
        # A non-relocatable kernel decompresses to LOAD_PHYSICAL_ADDR, its pref_address.
        runtime_start = hdr.pref_address
    pm_size = file_size - setup_size
    return BzImage(
        header=hdr,
        segment=LoadSegment(paddr=load, offset=setup_size, filesz=pm_size, memsz=pm_size),
        entry=load + BZIMAGE_ENTRY_OFFSET,
        runtime_start=runtime_start,
    )


def build_boot_params(
    header: SetupHeader,
    *,
    cmdline_addr: int,
    initrd: tuple[int, int] | None,
    e820: list[tuple[int, int, int]],
) -> bytes:
    """The zero page: copied setup header, loader type, command line, ramdisk and e820 map.

    ``initrd`` is ``(addr, size)``; ``e820`` is a list of ``(addr, size, type)``.
    """
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise ConfigError(f"guest memory map has {len(e820)} e820 entries, more than 128")
    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[SETUP_HEADER_START : SETUP_HEADER_START + len(header.raw)] = header.raw
    bp[TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    # LOADED_HIGH: the protected-mode part is at 1 MiB.  No CAN_USE_HEAP: no real-mode code runs.
    bp[LOADFLAGS] = header.loadflags | LOADED_HIGH
    _U32.pack_into(bp, CMD_LINE_PTR, cmdline_addr & 0xFFFF_FFFF)
    _U32.pack_into(bp, EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    addr, size = initrd if initrd is not None else (0, 0)
    _U32.pack_into(bp, RAMDISK_IMAGE, addr & 0xFFFF_FFFF)
    _U32.pack_into(bp, RAMDISK_SIZE, size & 0xFFFF_FFFF)
    _U32.pack_into(bp, EXT_RAMDISK_IMAGE, addr >> 32)
    _U32.pack_into(bp, EXT_RAMDISK_SIZE, size >> 32)
    _U8.pack_into(bp, E820_ENTRIES, len(e820))
    for i, (start, length, kind) in enumerate(e820):
        _E820_ENTRY.pack_into(bp, E820_TABLE + i * _E820_ENTRY.size, start, length, kind)
    return bytes(bp)
