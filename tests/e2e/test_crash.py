"""A guest that crashes: embervm reports the triple fault clearly and exits non-zero.

The "kernel" is a minimal PVH ELF whose entry point executes ``ud2`` with no IDT: the #UD
escalates to a double and then a triple fault, which KVM reports as KVM_EXIT_SHUTDOWN.
No Linux boot is needed, so this runs in about a second.
"""

from __future__ import annotations

import struct
from pathlib import Path

from e2e_helpers import run_embervm

LOAD = 0x100000
XEN_ELFNOTE_PHYS32_ENTRY = 18


def pvh_elf(code: bytes) -> bytes:
    """ELF64 with one PT_LOAD at 1 MiB holding ``code`` and a PT_NOTE with the PVH entry."""
    desc = struct.pack("<I", LOAD)
    note = struct.pack("<III", 4, len(desc), XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + desc
    phoff, phnum = 64, 2
    code_off = phoff + 56 * phnum
    note_off = code_off + len(code)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1, LOAD,
                       phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, code_off, LOAD, LOAD, len(code), len(code), 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + load + pnote + code + note


def test_triple_fault_exits_nonzero_with_a_clear_message(tmp_path: Path):
    kernel = tmp_path / "crash.elf"
    kernel.write_bytes(pvh_elf(b"\x0f\x0b"))  # ud2
    initrd = tmp_path / "empty.cpio"
    initrd.write_bytes(b"\0" * 512)
    run = run_embervm("run", "--kernel", str(kernel), "--initrd", str(initrd), "--mem", "64",
                      timeout=120)
    assert run.status == 1, run.tail()
    assert "triple fault" in run.stderr, run.tail()
    assert "Traceback" not in run.stderr, run.tail()
