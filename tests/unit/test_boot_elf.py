"""vmlinux/PVH note parsing on hand-made ELF files (no kernel image needed)."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embervm.boot import setup_boot
from embervm.boot.elf import XEN_ELFNOTE_PHYS32_ENTRY, iter_elf_notes, parse_pvh_elf
from embervm.errors import ConfigError
from embervm.memory import GuestMemory

EM_X86_64 = 62
EM_AARCH64 = 183
PT_LOAD = 1
PT_NOTE = 4
LOAD_PADDR = 0x20_0000
LOAD_OFFSET = 0x1000
CODE = bytes(range(256)) * 4  # 1 KiB of recognisable "text"


def note(owner: bytes, ntype: int, desc: bytes, align: int = 4) -> bytes:
    name = owner + b"\0"

    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % align)

    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def pvh_note(entry: int, size: int = 8) -> bytes:
    return note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, entry.to_bytes(size, "little"))


def make_elf(
    notes: bytes = b"",
    *,
    machine: int = EM_X86_64,
    bss: int = 0x800,
    load_filesz: int | None = None,
) -> bytes:
    """A minimal ELF64 executable: one PT_LOAD (CODE + bss) and, if given, one PT_NOTE."""
    phdrs = [(PT_LOAD, LOAD_OFFSET, LOAD_PADDR, load_filesz or len(CODE), len(CODE) + bss, 0x1000)]
    note_offset = LOAD_OFFSET + len(CODE)
    if notes:
        phdrs.append((PT_NOTE, note_offset, 0, len(notes), len(notes), 4))
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),  # ELFCLASS64, little endian, EV_CURRENT
        2,  # ET_EXEC
        machine,
        1,
        LOAD_PADDR,
        64,  # e_phoff
        0,  # no section headers
        0,
        64,
        56,
        len(phdrs),
        64,
        0,
        0,
    )
    out = bytearray(ehdr)
    for ptype, off, paddr, filesz, memsz, align in phdrs:
        out += struct.pack("<IIQQQQQQ", ptype, 5, off, paddr, paddr, filesz, memsz, align)
    out += bytes(LOAD_OFFSET - len(out))
    return bytes(out + CODE + notes)


def parse(tmp_path: Path, data: bytes):
    p = tmp_path / "vmlinux"
    p.write_bytes(data)
    with open(p, "rb") as f:
        return parse_pvh_elf(f, str(p))


def test_notes_walk_yields_owner_type_and_desc_of_each_note() -> None:
    data = note(b"GNU", 3, b"\x01\x02\x03") + note(b"Xen", 18, b"\x00\x05\x00\x01")
    assert list(iter_elf_notes(data)) == [
        (b"GNU", 3, b"\x01\x02\x03"),
        (b"Xen", 18, b"\x00\x05\x00\x01"),
    ]


def test_notes_walk_honours_8_byte_alignment() -> None:
    data = note(b"Xen", 18, b"\x01\x00\x00\x00\x00", align=8) + note(b"A", 1, b"", align=8)
    assert list(iter_elf_notes(data, align=8)) == [
        (b"Xen", 18, b"\x01\x00\x00\x00\x00"),
        (b"A", 1, b""),
    ]


def test_notes_walk_stops_at_a_note_running_past_the_segment() -> None:
    good = note(b"Xen", 18, b"\x00" * 4)
    bad = struct.pack("<III", 4, 0xFFFF_FFF0, 1) + b"Xen\0"
    assert list(iter_elf_notes(good + bad)) == [(b"Xen", 18, b"\x00" * 4)]
    assert list(iter_elf_notes(b"\x01\x02")) == []


@pytest.mark.parametrize("size", [4, 8])
def test_pvh_entry_read_from_4_and_8_byte_notes(tmp_path: Path, size: int) -> None:
    entry = LOAD_PADDR + 0x40
    kernel = parse(tmp_path, make_elf(note(b"GNU", 3, b"id") + pvh_note(entry, size)))
    assert kernel.entry == entry
    assert kernel.kernel_range == (LOAD_PADDR, LOAD_PADDR + len(CODE) + 0x800)


def test_xen_note_of_another_type_is_not_the_pvh_entry(tmp_path: Path) -> None:
    data = make_elf(note(b"Xen", 1, (LOAD_PADDR).to_bytes(8, "little")))  # XEN_ELFNOTE_ENTRY
    with pytest.raises(ConfigError, match="CONFIG_PVH"):
        parse(tmp_path, data)


def test_elf_without_pvh_note_asks_for_config_pvh(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CONFIG_PVH") as e:
        parse(tmp_path, make_elf())
    assert "\n" not in str(e.value)


def test_setup_boot_rejects_elf_without_pvh_note(tmp_path: Path) -> None:
    p = tmp_path / "vmlinux"
    p.write_bytes(make_elf(note(b"GNU", 3, b"id")))
    mem = GuestMemory.x86(16 << 20)
    with pytest.raises(ConfigError, match="CONFIG_PVH"):
        setup_boot(mem, p, None, "console=ttyS0", 1)


def test_setup_boot_loads_hand_made_elf_and_zeroes_bss(tmp_path: Path) -> None:
    p = tmp_path / "vmlinux"
    p.write_bytes(make_elf(pvh_note(LOAD_PADDR)))
    mem = GuestMemory.x86(16 << 20)
    mem.fill(LOAD_PADDR, len(CODE) + 0x800, 0xAA)
    info = setup_boot(mem, p, None, "", 1)
    assert info.kind == "pvh"
    assert info.cpu.rip == LOAD_PADDR
    assert mem.read(LOAD_PADDR, len(CODE)) == CODE
    assert mem.read(LOAD_PADDR + len(CODE), 0x800) == bytes(0x800)


def test_entry_outside_loaded_segments_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not inside a loaded segment"):
        parse(tmp_path, make_elf(pvh_note(0x10_0000)))


def test_entry_above_4gib_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="above 4 GiB"):
        parse(tmp_path, make_elf(pvh_note(1 << 32)))


def test_malformed_entry_note_size_is_rejected(tmp_path: Path) -> None:
    data = make_elf(note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, b"\x00\x00"))
    with pytest.raises(ConfigError, match="malformed"):
        parse(tmp_path, data)


def test_non_x86_elf_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an x86 kernel"):
        parse(tmp_path, make_elf(pvh_note(LOAD_PADDR), machine=EM_AARCH64))


def test_segment_past_end_of_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="truncated"):
        parse(tmp_path, make_elf(pvh_note(LOAD_PADDR), load_filesz=1 << 20, bss=1 << 20))


def test_truncated_elf_header_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a valid ELF"):
        parse(tmp_path, make_elf(pvh_note(LOAD_PADDR))[:40])


def test_elf_of_other_class_bytes_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a valid ELF"):
        parse(tmp_path, b"\x7fELF\x07\x01\x01" + bytes(100))


@pytest.mark.parametrize("in_memory", [False, True])
def test_program_header_offset_beyond_any_file_is_a_config_error(
    tmp_path: Path, in_memory: bool
) -> None:
    data = bytearray(make_elf(pvh_note(LOAD_PADDR)))
    struct.pack_into("<Q", data, 32, 0xFFFF_FFFF_FFFF_FFF0)  # e_phoff
    with pytest.raises(ConfigError, match="not a valid ELF"):
        if in_memory:  # BytesIO.seek raises OverflowError where a file raises ValueError
            parse_pvh_elf(io.BytesIO(bytes(data)), "vmlinux")
        else:
            parse(tmp_path, bytes(data))


_VALID = make_elf(note(b"GNU", 3, b"id") + pvh_note(LOAD_PADDR))
# Bytes worth corrupting: ELF header + program headers, and the notes after CODE.
_POSITIONS = st.one_of(
    st.integers(0, 64 + 2 * 56 - 1), st.integers(LOAD_OFFSET + len(CODE), len(_VALID) - 1)
)


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(st.tuples(_POSITIONS, st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, len(_VALID))),
)
def test_corrupted_elf_gives_a_sound_load_plan_or_config_error_only(
    edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(_VALID)
    for pos, value in edits:
        data[pos] = value
    try:
        kernel = parse_pvh_elf(io.BytesIO(bytes(data[:cut])), "vmlinux")
    except ConfigError:
        return
    assert any(s.paddr <= kernel.entry < s.paddr + s.filesz for s in kernel.segments)
    assert all(s.filesz <= s.memsz for s in kernel.segments)


def test_load_plan_is_parsed_once_then_read_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    import sys

    from embervm.boot import elf

    data = make_elf(pvh_note(LOAD_PADDR))
    p = tmp_path / "vmlinux"
    p.write_bytes(data)
    cache = tmp_path / "cache"
    with open(p, "rb") as f:
        first = elf.cached_pvh_plan(f, "vmlinux", cache)
    assert first.entry == LOAD_PADDR and first.segments
    assert len(list((cache / "elf-plans").iterdir())) == 1
    # The second start must not need pyelftools at all.
    monkeypatch.setattr(elf, "parse_pvh_elf", lambda *a: pytest.fail("parsed again"))
    monkeypatch.setitem(sys.modules, "elftools.elf.elffile", None)
    with open(p, "rb") as f:
        assert elf.cached_pvh_plan(f, "vmlinux", cache) == first


def test_a_changed_kernel_or_a_corrupt_cache_entry_is_parsed_again(tmp_path: Path) -> None:
    from embervm.boot import elf

    p = tmp_path / "vmlinux"
    p.write_bytes(make_elf(pvh_note(LOAD_PADDR)))
    cache = tmp_path / "cache"
    with open(p, "rb") as f:
        plan = elf.cached_pvh_plan(f, "vmlinux", cache)
    (entry_file,) = (cache / "elf-plans").iterdir()
    entry_file.write_text('{"version": 1, "entry": "x"')  # truncated JSON
    with open(p, "rb") as f:
        assert elf.cached_pvh_plan(f, "vmlinux", cache) == plan
    # A new file (another inode, size or mtime) is another key: never a stale plan.
    data = make_elf(pvh_note(LOAD_PADDR + 0x40))
    p.unlink()
    p.write_bytes(data)
    with open(p, "rb") as f:
        assert elf.cached_pvh_plan(f, "vmlinux", cache).entry == LOAD_PADDR + 0x40
