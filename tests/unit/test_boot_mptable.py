"""MP table: read back the way Linux's mpparse.c reads it."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from embervm.boot.mptable import MAX_VCPUS, mptable_size, setup_mptable
from embervm.errors import ConfigError
from embervm.memory import GuestMemory

# Intel MP spec 1.4 / arch/x86/include/asm/mpspec_def.h, written independently of the module.
SCAN_START, SCAN_LEN = 639 * 1024, 1024  # where smp_scan_config() looks
ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


@dataclass
class MpTable:
    mpf: bytes
    header: bytes
    cpus: list[tuple[int, int]] = field(default_factory=list)  # (apicid, cpuflag)
    buses: list[tuple[int, bytes]] = field(default_factory=list)
    ioapics: list[tuple[int, int, int]] = field(default_factory=list)  # (id, flags, addr)
    intsrc: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    lintsrc: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    length: int = 0
    count: int = 0
    table_bytes: bytes = b""


def read_mptable(mem: GuestMemory) -> MpTable:
    area = mem.read(SCAN_START, SCAN_LEN)
    # The floating pointer is 16-byte aligned (mpparse.c scans in 16-byte steps).
    offsets = [o for o in range(0, SCAN_LEN, 16) if area[o : o + 4] == b"_MP_"]
    assert len(offsets) == 1, "exactly one MP floating pointer in the last KiB below 640 KiB"
    mpf = area[offsets[0] : offsets[0] + 16]
    physptr = struct.unpack_from("<I", mpf, 4)[0]
    header = mem.read(physptr, 44)
    assert header[:4] == b"PCMP"
    length, count = struct.unpack_from("<H", header, 4)[0], struct.unpack_from("<H", header, 34)[0]
    table = mem.read(physptr, length)
    t = MpTable(mpf, header, length=length, count=count, table_bytes=table)
    pos = 44
    for _ in range(count):
        kind = table[pos]
        if kind == 0:
            t.cpus.append((table[pos + 1], table[pos + 3]))
        elif kind == 1:
            t.buses.append((table[pos + 1], table[pos + 2 : pos + 8]))
        elif kind == 2:
            addr = struct.unpack_from("<I", table, pos + 4)[0]
            t.ioapics.append((table[pos + 1], table[pos + 3], addr))
        elif kind == 3:
            t.intsrc.append(struct.unpack_from("<BHBBBB", table, pos + 1))
        elif kind == 4:
            t.lintsrc.append(struct.unpack_from("<BHBBBB", table, pos + 1))
        pos += ENTRY_SIZES[kind]
    assert pos == length, "entries fill the table exactly"
    return t


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.x86(2 << 20)


def test_floating_pointer_is_found_and_sums_to_zero(mem: GuestMemory) -> None:
    setup_mptable(mem, 2)
    t = read_mptable(mem)
    assert sum(t.mpf) % 256 == 0
    assert t.mpf[8] == 1  # length in 16-byte units
    assert t.mpf[9] == 4  # spec revision 1.4
    assert t.mpf[11] == 0  # feature1 0: a configuration table follows, no default config


@pytest.mark.parametrize("nr_vcpus", [1, 2, 8, 37, MAX_VCPUS])
def test_config_table_checksum_sums_to_zero(mem: GuestMemory, nr_vcpus: int) -> None:
    setup_mptable(mem, nr_vcpus)
    t = read_mptable(mem)
    assert sum(t.table_bytes) % 256 == 0
    assert sum(t.mpf) % 256 == 0


@pytest.mark.parametrize("nr_vcpus", [1, 2, 5, MAX_VCPUS])
def test_one_processor_entry_per_vcpu_with_bsp_flag_only_on_cpu0(
    mem: GuestMemory, nr_vcpus: int
) -> None:
    setup_mptable(mem, nr_vcpus)
    t = read_mptable(mem)
    assert [apicid for apicid, _ in t.cpus] == list(range(nr_vcpus))
    assert [flags for _, flags in t.cpus] == [3] + [1] * (nr_vcpus - 1)  # ENABLED | BSP


def test_header_count_length_and_lapic_address(mem: GuestMemory) -> None:
    start, end = setup_mptable(mem, 4)
    t = read_mptable(mem)
    assert t.count == 4 + 1 + 1 + 24 + 2
    assert end - start == mptable_size(4) == 16 + t.length
    assert struct.unpack_from("<I", t.header, 36)[0] == 0xFEE0_0000
    assert t.header[6] == 4  # spec revision


def test_isa_bus_and_ioapic_after_the_cpus(mem: GuestMemory) -> None:
    setup_mptable(mem, 3)
    t = read_mptable(mem)
    assert t.buses == [(0, b"ISA   ")]
    assert t.ioapics == [(3, 1, 0xFEC0_0000)]  # id nr_vcpus, usable, default base


def test_io_interrupts_route_isa_irqs_and_gsis_16_to_23_to_the_same_pin(mem: GuestMemory) -> None:
    setup_mptable(mem, 2)
    t = read_mptable(mem)
    # (irqtype, irqflag, srcbus, srcbusirq, dstapic, dstirq): mp_INT, conforming, ISA bus 0.
    assert t.intsrc == [(0, 0, 0, irq, 2, irq) for irq in range(24)]


def test_local_interrupts_extint_on_lint0_and_nmi_on_lint1(mem: GuestMemory) -> None:
    setup_mptable(mem, 2)
    t = read_mptable(mem)
    assert t.lintsrc == [(3, 0, 0, 0, 0, 0), (1, 0, 0, 0, 0xFF, 1)]


def test_smaller_table_rewrites_cleanly_over_a_larger_one(mem: GuestMemory) -> None:
    setup_mptable(mem, 30)
    setup_mptable(mem, 1)
    t = read_mptable(mem)
    assert len(t.cpus) == 1
    assert sum(t.table_bytes) % 256 == 0


@pytest.mark.parametrize("nr_vcpus", [0, -1, MAX_VCPUS + 1])
def test_vcpu_count_out_of_range_is_config_error(mem: GuestMemory, nr_vcpus: int) -> None:
    with pytest.raises(ConfigError, match="vCPUs"):
        setup_mptable(mem, nr_vcpus)


def test_table_outside_guest_ram_is_config_error() -> None:
    mem = GuestMemory([(0, 0x9F000)])
    with pytest.raises(ConfigError, match="MP table"):
        setup_mptable(mem, 1)
