"""setup_boot with the guest kit's real kernels: what lands in guest memory and in the CPU state."""

from __future__ import annotations

import lzma
import shutil
import struct
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from embervm.boot import BootInfo, Segment, e820_map, setup_boot
from embervm.errors import ConfigError
from embervm.memory import GuestMemory

KIT = Path("/work/shared/guest/prebuilt")
CMDLINE = "console=ttyS0 panic=-1 reboot=k noxsave quiet"
MiB = 1 << 20
GiB = 1 << 30

# Independent constants (Xen start_info.h, boot.rst, Intel SDM).
HVM_START_MAGIC = 0x336EC578
CR0_PE, CR0_PG, CR4_PAE, EFER_LME, EFER_LMA = 1, 1 << 31, 1 << 5, 1 << 8, 1 << 10


def kit_file(name: str) -> Path:
    p = KIT / name
    if not p.exists():
        pytest.skip(f"guest kit file {p} not present")
    return p


@pytest.fixture(scope="session")
def vmlinux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vmlinux-base, decompressed once per test session."""
    src = kit_file("vmlinux-base.xz")
    out = tmp_path_factory.mktemp("kit") / "vmlinux-base"
    with lzma.open(src) as f, open(out, "wb") as o:
        shutil.copyfileobj(f, o, 1 << 20)
    return out


@pytest.fixture
def bzimage() -> Path:
    return kit_file("bzImage-base")


@pytest.fixture
def initrd() -> Path:
    return kit_file("initramfs-tiny.cpio.gz")


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.x86(256 * MiB)


def read_cstring(mem: GuestMemory, addr: int, limit: int = 4096) -> str:
    raw = mem.read(addr, limit)
    assert b"\0" in raw, "command line is NUL-terminated"
    return raw[: raw.index(b"\0")].decode()


def gdt_segment(mem: GuestMemory, info: BootInfo, selector: int) -> Segment:
    assert selector + 7 <= info.cpu.gdt_limit
    desc = mem.read_u64(info.cpu.gdt_base + selector)
    return Segment.from_descriptor(desc, selector)


def translate(mem: GuestMemory, cr3: int, va: int) -> int | None:
    """Walk 4-level page tables like the MMU (4 KiB and 2 MiB pages)."""
    addr_mask = ((1 << 52) - 1) & ~0xFFF
    table = cr3 & addr_mask
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = mem.read_u64(table + ((va >> shift) & 511) * 8)
        if not entry & 1:
            return None
        if level in (1, 2) and entry & 0x80:  # 1 GiB or 2 MiB page
            return (entry & addr_mask & ~((1 << shift) - 1)) | (va & ((1 << shift) - 1))
        table = entry & addr_mask
    return table | (va & 0xFFF)


# -- e820 ------------------------------------------------------------------------------------


def test_e820_reserves_ebda_and_legacy_hole_and_reports_ram_on_both_sides_of_the_gap() -> None:
    mem = GuestMemory.x86(5 * GiB)  # 3 GiB below the MMIO gap, 2 GiB above 4 GiB
    assert e820_map(mem) == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x100000 - 0x9FC00, 2),
        (0x100000, 3 * GiB - 0x100000, 1),
        (4 * GiB, 2 * GiB, 1),
    ]


def test_e820_ram_entries_cover_exactly_the_guest_ram_outside_the_reserved_hole(
    mem: GuestMemory,
) -> None:
    ram = [(a, s) for a, s, t in e820_map(mem) if t == 1]
    assert sum(s for _, s in ram) == mem.size - (0x100000 - 0x9FC00)
    assert all(mem.contains(a, s) for a, s in ram)


# -- PVH (vmlinux) -----------------------------------------------------------------------------


def test_pvh_entry_is_the_elf_note_value_inside_the_loaded_image(
    mem: GuestMemory, vmlinux: Path
) -> None:
    info = setup_boot(mem, vmlinux, None, CMDLINE, 1)
    with open(vmlinux, "rb") as f:
        notes = [
            n
            for seg in ELFFile(f).iter_segments("PT_NOTE")
            for n in seg.iter_notes()
            if n["n_name"] == "Xen" and n["n_type"] == 18
        ]
    assert info.kind == "pvh"
    assert info.cpu.rip == int.from_bytes(notes[0]["n_descdata"][:4], "little")
    start, end = info.kernel_range
    assert start <= info.cpu.rip < end


def test_pvh_segments_land_at_p_paddr_with_bss_zeroed(mem: GuestMemory, vmlinux: Path) -> None:
    with open(vmlinux, "rb") as f:
        loads = [
            (s["p_paddr"], s.data(), s["p_memsz"]) for s in ELFFile(f).iter_segments("PT_LOAD")
        ]
    for paddr, _, memsz in loads:
        mem.fill(paddr, memsz, 0xAA)  # stale content from a previous boot
    info = setup_boot(mem, vmlinux, None, CMDLINE, 1)
    for paddr, data, memsz in loads:
        assert mem.read(paddr, len(data)) == data
        assert mem.read(paddr + len(data), memsz - len(data)) == bytes(memsz - len(data))
    assert info.kernel_range == (min(p for p, _, _ in loads), max(p + m for p, _, m in loads))


def test_pvh_start_info_describes_cmdline_initrd_and_memmap(
    mem: GuestMemory, vmlinux: Path, initrd: Path
) -> None:
    info = setup_boot(mem, vmlinux, initrd, CMDLINE, 2)
    si = mem.read(info.cpu.rbx, 56)
    magic, version, flags, nr_modules = struct.unpack_from("<IIII", si, 0)
    modlist, cmdline_paddr, rsdp, memmap, memmap_entries = struct.unpack_from("<QQQQI", si, 16)
    assert (magic, version, flags, nr_modules, rsdp) == (HVM_START_MAGIC, 1, 0, 1, 0)
    assert read_cstring(mem, cmdline_paddr) == CMDLINE == info.cmdline

    paddr, size, mod_cmdline, reserved = struct.unpack("<QQQQ", mem.read(modlist, 32))
    assert info.initrd_range == (paddr, paddr + size)
    assert mem.read(paddr, size) == initrd.read_bytes()
    assert (mod_cmdline, reserved) == (0, 0)

    entries = [
        struct.unpack_from("<QQII", mem.read(memmap + 24 * i, 24)) for i in range(memmap_entries)
    ]
    assert [(a, s, t) for a, s, t, _ in entries] == e820_map(mem)
    assert all(r == 0 for *_, r in entries)


def test_pvh_without_initrd_has_no_modules(mem: GuestMemory, vmlinux: Path) -> None:
    info = setup_boot(mem, vmlinux, None, CMDLINE, 1)
    nr_modules, modlist = struct.unpack("<IQ", mem.read(info.cpu.rbx + 12, 12))
    assert (nr_modules, modlist) == (0, 0)
    assert info.initrd_range is None


def test_pvh_cpu_state_is_flat_32bit_protected_mode_without_paging(
    mem: GuestMemory, vmlinux: Path
) -> None:
    cpu = setup_boot(mem, vmlinux, None, CMDLINE, 1).cpu
    assert cpu.cr0 & CR0_PE and not cpu.cr0 & CR0_PG
    assert (cpu.cr3, cpu.cr4, cpu.efer, cpu.rflags) == (0, 0, 0, 2)
    assert (cpu.cs.type, cpu.cs.db, cpu.cs.l, cpu.cs.g) == (0xB, 1, 0, 1)
    assert (cpu.ds.type, cpu.ds.db, cpu.ds.g) == (0x3, 1, 1)
    for seg in (cpu.cs, cpu.ds):
        assert (seg.base, seg.limit, seg.present, seg.s, seg.dpl) == (0, 0xFFFF_FFFF, 1, 1, 0)
    # PVH ABI: TR a 32-bit TSS (busy) with base 0 and limit 0x67.
    assert (cpu.tr.type, cpu.tr.s, cpu.tr.base, cpu.tr.limit, cpu.tr.present) == (
        0xB,
        0,
        0,
        0x67,
        1,
    )


@pytest.mark.parametrize("kernel_fixture", ["vmlinux", "bzimage"])
def test_gdt_in_guest_memory_matches_the_segment_registers(
    mem: GuestMemory, kernel_fixture: str, request: pytest.FixtureRequest
) -> None:
    info = setup_boot(mem, request.getfixturevalue(kernel_fixture), None, CMDLINE, 1)
    cpu = info.cpu
    assert mem.read_u64(cpu.gdt_base) == 0  # null descriptor
    for seg in (cpu.cs, cpu.ds, cpu.tr):
        assert gdt_segment(mem, info, seg.selector) == seg
    assert cpu.tr.selector + 15 <= cpu.gdt_limit  # the long-mode TSS descriptor is 16 bytes
    assert mem.read(cpu.idt_base, cpu.idt_limit + 1) == bytes(cpu.idt_limit + 1)


def test_initrd_is_page_aligned_at_the_top_of_low_ram_above_the_kernel(
    mem: GuestMemory, vmlinux: Path, initrd: Path
) -> None:
    info = setup_boot(mem, vmlinux, initrd, CMDLINE, 1)
    assert info.initrd_range is not None
    start, end = info.initrd_range
    assert start % 4096 == 0
    assert end - start == initrd.stat().st_size
    assert 256 * MiB - 4096 < end <= 256 * MiB
    assert start >= info.kernel_range[1]


def test_initrd_stays_below_the_32bit_mmio_gap_with_memory_above_4gib(
    vmlinux: Path, initrd: Path
) -> None:
    mem = GuestMemory.x86(5 * GiB)
    start, end = setup_boot(mem, vmlinux, initrd, CMDLINE, 1).initrd_range or (0, 0)
    assert 3 * GiB - 4096 < end <= 3 * GiB


# -- bzImage -----------------------------------------------------------------------------------


def test_bzimage_protected_mode_part_loaded_at_1mib(mem: GuestMemory, bzimage: Path) -> None:
    data = bzimage.read_bytes()
    setup_size = ((data[0x1F1] or 4) + 1) * 512
    info = setup_boot(mem, bzimage, None, CMDLINE, 1)
    assert info.kind == "bzimage"
    assert mem.read(0x100000, len(data) - setup_size) == data[setup_size:]
    assert info.cpu.rip == 0x100000 + 0x200
    assert info.kernel_range[0] == 0x100000


def test_bzimage_zero_page_fields(mem: GuestMemory, bzimage: Path, initrd: Path) -> None:
    data = bzimage.read_bytes()
    info = setup_boot(mem, bzimage, initrd, CMDLINE, 1)
    bp = mem.read(info.cpu.rsi, 4096)
    hdr_end = 0x202 + data[0x201]
    assert bp[0x202:0x206] == b"HdrS"
    # Copied setup header, except the fields a loader writes.
    written = {0x210, 0x211, *range(0x218, 0x220), *range(0x228, 0x22C)}
    assert all(bp[i] == data[i] for i in range(0x1F1, hdr_end) if i not in written)
    assert bp[0x210] == 0xFF  # type_of_loader: undefined
    assert bp[0x211] & 0x01  # LOADED_HIGH
    assert read_cstring(mem, struct.unpack_from("<I", bp, 0x228)[0]) == CMDLINE
    image, size = struct.unpack_from("<II", bp, 0x218)
    assert info.initrd_range == (image, image + size)
    assert mem.read(image, size) == initrd.read_bytes()
    n = bp[0x1E8]
    assert [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(n)] == e820_map(mem)


def test_bzimage_cpu_state_is_long_mode(mem: GuestMemory, bzimage: Path) -> None:
    cpu = setup_boot(mem, bzimage, None, CMDLINE, 1).cpu
    assert cpu.cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG
    assert cpu.cr4 & CR4_PAE
    assert cpu.efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert (cpu.cs.l, cpu.cs.db, cpu.cs.type) == (1, 0, 0xB)
    # boot.rst: CS = __BOOT_CS (0x10), DS/ES/SS = __BOOT_DS (0x18), both flat 4 GiB.
    assert (cpu.cs.selector, cpu.ds.selector) == (0x10, 0x18)
    assert cpu.ds.limit == cpu.cs.limit == 0xFFFF_FFFF
    assert cpu.rflags == 2
    assert cpu.rbx == 0


def test_bzimage_page_tables_identity_map_the_first_gib(mem: GuestMemory, bzimage: Path) -> None:
    info = setup_boot(mem, bzimage, None, CMDLINE, 1)
    cr3 = info.cpu.cr3
    for va in (0, info.cpu.rsi, 0x20000, info.cpu.rip, info.kernel_range[1] - 1, GiB - 1):
        assert translate(mem, cr3, va) == va
    for va in range(0, GiB, 2 * MiB):
        assert translate(mem, cr3, va) == va
    assert translate(mem, cr3, GiB) is None


def test_bzimage_initrd_respects_initrd_addr_max(bzimage: Path, initrd: Path) -> None:
    data = bzimage.read_bytes()
    addr_max = struct.unpack_from("<I", data, 0x22C)[0]
    mem = GuestMemory.x86(4 * GiB)  # low RAM reaches 3 GiB, above the kit's 2 GiB limit
    start, end = setup_boot(mem, bzimage, initrd, CMDLINE, 1).initrd_range or (0, 0)
    assert end <= addr_max + 1
    assert addr_max + 1 - end < 4096


def test_bzimage_cmdline_up_to_cmdline_size_is_accepted(mem: GuestMemory, bzimage: Path) -> None:
    limit = struct.unpack_from("<I", bzimage.read_bytes(), 0x238)[0]
    info = setup_boot(mem, bzimage, None, "x" * limit, 1)
    cmd_line_ptr = mem.read_u32(info.cpu.rsi + 0x228)
    assert read_cstring(mem, cmd_line_ptr) == "x" * limit
    with pytest.raises(ConfigError, match="command line"):
        setup_boot(mem, bzimage, None, "x" * (limit + 1), 1)


def test_mp_table_written_for_the_vcpu_count(mem: GuestMemory, vmlinux: Path) -> None:
    setup_boot(mem, vmlinux, None, CMDLINE, 3)
    area = mem.read(0x9FC00, 1024)
    assert area[:4] == b"_MP_"
    physptr = struct.unpack_from("<I", area, 4)[0]
    table = mem.read(physptr, struct.unpack_from("<H", mem.read(physptr + 4, 2))[0])
    cpus = [table[p] for p in range(44, 44 + 20 * 3, 20)]
    assert cpus == [0, 0, 0] and table[44 + 60] == 1  # three processor entries, then the bus


# -- configuration errors ----------------------------------------------------------------------


def assert_one_line(e: pytest.ExceptionInfo[ConfigError]) -> None:
    assert "\n" not in str(e.value) and str(e.value)


def test_missing_kernel_file(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open kernel .*No such file") as e:
        setup_boot(mem, tmp_path / "nope", None, CMDLINE, 1)
    assert_one_line(e)


def test_kernel_path_that_is_a_directory(mem: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kernel"):
        setup_boot(mem, tmp_path, None, CMDLINE, 1)


def test_file_that_is_not_a_kernel(mem: GuestMemory, tmp_path: Path) -> None:
    p = tmp_path / "notes.txt"
    p.write_bytes(b"hello, I am not a kernel\n" * 100)
    with pytest.raises(ConfigError, match="not a Linux kernel") as e:
        setup_boot(mem, p, None, CMDLINE, 1)
    assert_one_line(e)


def test_empty_kernel_file(mem: GuestMemory, tmp_path: Path) -> None:
    p = tmp_path / "empty"
    p.write_bytes(b"")
    with pytest.raises(ConfigError, match="not a Linux kernel"):
        setup_boot(mem, p, None, CMDLINE, 1)


def patched_bzimage(tmp_path: Path, bzimage: Path, offset: int, fmt: str, value: int) -> Path:
    data = bytearray(bzimage.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    p = tmp_path / "bzImage"
    p.write_bytes(data)
    return p


def test_bzimage_protocol_too_old(mem: GuestMemory, tmp_path: Path, bzimage: Path) -> None:
    p = patched_bzimage(tmp_path, bzimage, 0x206, "<H", 0x205)
    with pytest.raises(ConfigError, match="too old") as e:
        setup_boot(mem, p, None, CMDLINE, 1)
    assert_one_line(e)


def test_bzimage_without_64bit_entry(mem: GuestMemory, tmp_path: Path, bzimage: Path) -> None:
    p = patched_bzimage(tmp_path, bzimage, 0x236, "<H", 0)
    with pytest.raises(ConfigError, match="XLF_KERNEL_64") as e:
        setup_boot(mem, p, None, CMDLINE, 1)
    assert_one_line(e)


def test_vmlinux_not_fitting_in_guest_memory(vmlinux: Path) -> None:
    mem = GuestMemory.x86(16 * MiB)  # the kit kernel loads at 16 MiB
    with pytest.raises(ConfigError, match="give it at least") as e:
        setup_boot(mem, vmlinux, None, CMDLINE, 1)
    assert_one_line(e)


def test_bzimage_runtime_area_not_fitting_in_guest_memory(bzimage: Path) -> None:
    mem = GuestMemory.x86(24 * MiB)  # image fits at 1 MiB, the decompressed kernel does not
    with pytest.raises(ConfigError, match="give it at least"):
        setup_boot(mem, bzimage, None, CMDLINE, 1)


def test_initrd_not_fitting_in_guest_memory(
    mem: GuestMemory, vmlinux: Path, tmp_path: Path
) -> None:
    big = tmp_path / "big.cpio"
    with open(big, "wb") as f:
        f.truncate(250 * MiB)  # sparse: only the size matters
    with pytest.raises(ConfigError, match="initrd .* does not fit") as e:
        setup_boot(mem, vmlinux, big, CMDLINE, 1)
    assert_one_line(e)


def test_missing_initrd_file(mem: GuestMemory, vmlinux: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot open initrd"):
        setup_boot(mem, vmlinux, tmp_path / "nope.cpio", CMDLINE, 1)


def test_empty_initrd_file(mem: GuestMemory, vmlinux: Path, tmp_path: Path) -> None:
    p = tmp_path / "empty.cpio"
    p.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        setup_boot(mem, vmlinux, p, CMDLINE, 1)


def test_pvh_cmdline_limit_is_2047_bytes_plus_nul(mem: GuestMemory, vmlinux: Path) -> None:
    info = setup_boot(mem, vmlinux, None, "y" * 2047, 1)
    assert read_cstring(mem, 0x20000) == info.cmdline == "y" * 2047
    with pytest.raises(ConfigError, match="command line is 2048 bytes") as e:
        setup_boot(mem, vmlinux, None, "y" * 2048, 1)
    assert_one_line(e)


def test_cmdline_with_nul_is_rejected(mem: GuestMemory, vmlinux: Path) -> None:
    with pytest.raises(ConfigError, match="NUL"):
        setup_boot(mem, vmlinux, None, "console=ttyS0\0root=/dev/vda", 1)


def test_shorter_cmdline_leaves_no_tail_of_the_previous_one(
    mem: GuestMemory, vmlinux: Path
) -> None:
    setup_boot(mem, vmlinux, None, "a" * 100, 1)
    setup_boot(mem, vmlinux, None, "b", 1)
    assert mem.read(0x20000, 101) == b"b" + bytes(100)


@pytest.mark.parametrize("nr_vcpus", [0, 255])
def test_vcpu_count_out_of_range(mem: GuestMemory, vmlinux: Path, nr_vcpus: int) -> None:
    with pytest.raises(ConfigError, match="vCPUs"):
        setup_boot(mem, vmlinux, None, CMDLINE, nr_vcpus)


def test_guest_memory_without_the_first_mib(vmlinux: Path) -> None:
    mem = GuestMemory([(1 * GiB, 256 * MiB)])
    with pytest.raises(ConfigError, match="start at address 0"):
        setup_boot(mem, vmlinux, None, CMDLINE, 1)
