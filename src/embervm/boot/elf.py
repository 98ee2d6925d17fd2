"""vmlinux (ELF) parsing for the PVH entry.

A Linux vmlinux built with CONFIG_PVH carries an ELF note ``XEN_ELFNOTE_PHYS32_ENTRY`` (type 18,
owner "Xen") whose value is the guest-physical address of ``pvh_start_xen``
(arch/x86/platform/pvh/head.S).  The loader copies every PT_LOAD segment to its ``p_paddr``
(vmlinux's virtual addresses are the kernel's high mapping, useless before paging) and starts
the boot CPU there in 32-bit protected mode with %ebx pointing at a struct hvm_start_info.

This module only *parses*: it returns a load plan (:class:`LoadSegment` list plus the entry);
``setup.py`` checks the plan against guest memory and copies the bytes.

Start-up time: importing pyelftools costs ~30 ms, a third of the VMM's start.  So a kernel's
plan is parsed by pyelftools once and kept in a small JSON file in the image cache
(:func:`cached_pvh_plan`), keyed by the file's identity (device, inode, size, mtime); later
starts read that instead and do not import pyelftools at all.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError

ELF_MAGIC = b"\x7fELF"
#: xen/include/public/elfnote.h: "Physical entry point into the kernel" (32-bit protected mode).
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_ELFNOTE_OWNER = b"Xen"

_NHDR = struct.Struct("<III")  # n_namesz, n_descsz, n_type (same layout for ELF32 and ELF64)
#: A vmlinux has one small .notes segment; anything bigger is not a kernel's note segment.
_MAX_NOTE_SEGMENT = 1 << 20


@dataclass(frozen=True, slots=True)
class LoadSegment:
    """``filesz`` bytes at file ``offset`` go to guest-physical ``paddr``; zero up to ``memsz``."""

    paddr: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True, slots=True)
class ElfKernel:
    """A vmlinux ready to load: its PT_LOAD segments and the PVH entry point."""

    entry: int
    segments: tuple[LoadSegment, ...]

    @property
    def kernel_range(self) -> tuple[int, int]:
        """[start, end) guest-physical range covered by the loaded image, .bss included."""
        return min(s.paddr for s in self.segments), max(s.end for s in self.segments)


def iter_elf_notes(data: bytes, align: int = 4) -> Iterator[tuple[bytes, int, bytes]]:
    """Yield ``(owner, type, desc)`` for each note in a PT_NOTE segment's bytes.

    Name and descriptor are padded to ``align`` (4 for Linux's notes, 8 for segments aligned so,
    e.g. GNU property notes).  A note that runs past the end of ``data`` stops the walk: the
    notes before it are still reported.  Every iteration consumes at least 12 bytes, so the loop
    is bounded by ``len(data)``.
    """
    pos = 0
    end = len(data)
    while pos + _NHDR.size <= end:
        namesz, descsz, ntype = _NHDR.unpack_from(data, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + -(-namesz // align) * align
        next_at = desc_at + -(-descsz // align) * align
        if desc_at + descsz > end:
            return
        # The owner name is NUL-terminated and namesz counts the NUL (gABI "Note Section").
        owner = data[name_at : name_at + namesz].rstrip(b"\0")
        yield owner, ntype, data[desc_at : desc_at + descsz]
        pos = next_at


def _pvh_entry_from_desc(desc: bytes) -> int:
    # elfnote.h: numeric notes are 4 or 8 bytes; Linux 6.x emits _ASM_PTR (8 on x86-64).
    if len(desc) == 4:
        return int.from_bytes(desc, "little")
    if len(desc) == 8:
        value = int.from_bytes(desc, "little")
        if value >> 32 == 0:
            return value
        raise ConfigError(f"PVH entry point {value:#x} is above 4 GiB: not a 32-bit entry")
    raise ConfigError(f"malformed XEN_ELFNOTE_PHYS32_ENTRY note ({len(desc)}-byte value)")


def parse_pvh_elf(stream: BinaryIO, name: str = "kernel") -> ElfKernel:
    """Read the ELF headers of ``stream`` and return its load plan.

    ``name`` is used in error messages (the path the user gave).  Raises :class:`ConfigError`
    for a malformed ELF, a non-x86 ELF, segments outside the file, or a missing PVH note.
    """
    from elftools.common.exceptions import ELFError
    from elftools.construct.core import ConstructError
    from elftools.elf.elffile import ELFFile

    stream.seek(0, 2)
    file_size = stream.tell()
    stream.seek(0)
    try:
        elf = ELFFile(stream)
        if not elf.little_endian or elf["e_machine"] not in ("EM_X86_64", "EM_386"):
            raise ConfigError(f"{name} is an ELF file for {elf['e_machine']}, not an x86 kernel")
        loads: list[LoadSegment] = []
        entry: int | None = None
        for seg in elf.iter_segments():
            ptype = seg["p_type"]
            if ptype not in ("PT_LOAD", "PT_NOTE"):
                continue
            offset, filesz, memsz = seg["p_offset"], seg["p_filesz"], seg["p_memsz"]
            if offset + filesz > file_size:
                raise ConfigError(f"{name} is truncated: a segment ends past the end of the file")
            if ptype == "PT_LOAD":
                if filesz > memsz:
                    raise ConfigError(f"{name} has a PT_LOAD segment with p_filesz > p_memsz")
                if memsz:
                    loads.append(LoadSegment(seg["p_paddr"], offset, filesz, memsz))
            elif entry is None and filesz <= _MAX_NOTE_SEGMENT:
                align = 8 if seg["p_align"] == 8 else 4
                stream.seek(offset)
                for owner, ntype, desc in iter_elf_notes(stream.read(filesz), align):
                    if owner == XEN_ELFNOTE_OWNER and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                        entry = _pvh_entry_from_desc(desc)
                        break
    except (ELFError, ConstructError, struct.error, ValueError, OverflowError) as e:
        raise ConfigError(f"{name} is not a valid ELF file ({e})") from None
    if not loads:
        raise ConfigError(f"{name} has no loadable (PT_LOAD) segments")
    if entry is None:
        raise ConfigError(
            f"{name} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): embervm boots a vmlinux "
            "through PVH, so build the kernel with CONFIG_PVH=y, or pass its bzImage"
        )
    if not any(s.paddr <= entry < s.paddr + s.filesz for s in loads):
        raise ConfigError(f"{name}: PVH entry point {entry:#x} is not inside a loaded segment")
    return ElfKernel(entry, tuple(loads))


PLAN_CACHE_VERSION = 1


def _plan_cache_path(st: os.stat_result, cache_dir: Path) -> Path:
    key = f"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"
    return cache_dir / "elf-plans" / f"{key}.json"


def cached_pvh_plan(stream: BinaryIO, name: str, cache_dir: Path | None) -> ElfKernel:
    """:func:`parse_pvh_elf`, remembered per file in ``cache_dir`` (None: no cache).

    A cache entry that is unreadable or malformed is ignored and rewritten; a cache that
    cannot be written (read-only home, full disk) only costs the parse next time.
    """
    if cache_dir is None:
        return parse_pvh_elf(stream, name)
    path = _plan_cache_path(os.fstat(stream.fileno()), cache_dir)
    try:
        doc = json.loads(path.read_bytes())
        if doc["version"] == PLAN_CACHE_VERSION:
            return ElfKernel(int(doc["entry"]), tuple(
                LoadSegment(int(a), int(b), int(c), int(d)) for a, b, c, d in doc["segments"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    plan = parse_pvh_elf(stream, name)
    doc = {"version": PLAN_CACHE_VERSION, "entry": plan.entry,
           "segments": [[s.paddr, s.offset, s.filesz, s.memsz] for s in plan.segments]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)
    except OSError:
        pass
    return plan
