"""ChainReader / ChainWriter: one byte stream over a chain however the driver split it."""

from __future__ import annotations

import array
import os
import struct

import pytest

from embervm.devices.virtio.queue import DescriptorChain
from embervm.errors import QueueError
from embervm.memory import GuestMemory

MEM_SIZE = 1 << 20


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.x86(MEM_SIZE)


def chain_over(mem: GuestMemory, readable: list[bytes], writable: list[int]) -> DescriptorChain:
    """A chain whose segments sit at scattered addresses, filled with ``readable``."""
    addr = 0x10000
    rsegs, wsegs = [], []
    for data in readable:
        mem.write(addr, data)
        rsegs.append((addr, len(data)))
        addr += len(data) + 0x100
    for n in writable:
        mem.fill(addr, n, 0xEE)
        wsegs.append((addr, n))
        addr += n + 0x100
    rlen = sum(len(d) for d in readable)
    return DescriptorChain(mem, 0, len(rsegs) + len(wsegs), rsegs, wsegs, rlen, sum(writable))


def test_read_spans_segments_in_order(mem):
    r = chain_over(mem, [b"vir", b"tio-", b"net"], []).reader()
    assert r.remaining == 10
    assert r.read(2) == b"vi"
    assert r.read(4) == b"rtio"
    assert r.read() == b"-net"
    assert r.remaining == 0
    assert r.read() == b""
    assert r.read(5) == b""


def test_read_returns_at_most_what_remains(mem):
    r = chain_over(mem, [b"abc"], []).reader()
    assert r.read(100) == b"abc"


def test_header_split_across_descriptors_parses_like_one_buffer(mem):
    # virtio.md §9 pitfall 11: a 16-byte blk header may arrive as 5 + 11 bytes.
    hdr = struct.pack("<IIQ", 1, 0, 0x1234)
    hdr_st = struct.Struct("<IIQ")
    for cut in (1, 5, 8, 15):
        r = chain_over(mem, [hdr[:cut], hdr[cut:] + b"data"], []).reader()
        assert r.read_struct(hdr_st) == (1, 0, 0x1234)
        assert r.read() == b"data"
    r = chain_over(mem, [hdr + b"data"], []).reader()
    assert r.read_struct(hdr_st) == (1, 0, 0x1234)
    assert r.remaining == 4
    r = chain_over(mem, [hdr, b"data"], []).reader()  # the header is exactly one descriptor
    assert r.read_struct(hdr_st) == (1, 0, 0x1234)
    assert r.read(2) == b"da"


def test_read_exact_raises_and_consumes_nothing_when_short(mem):
    r = chain_over(mem, [b"ab", b"c"], []).reader()
    with pytest.raises(QueueError, match="too short"):
        r.read_exact(4)
    assert r.remaining == 3
    assert r.read_exact(3) == b"abc"
    with pytest.raises(ValueError):
        r.read_exact(-1)


def test_read_struct_raises_when_short(mem):
    r = chain_over(mem, [b"\x01\x02"], []).reader()
    with pytest.raises(QueueError):
        r.read_struct(struct.Struct("<I"))
    assert r.remaining == 2


def test_readinto_fills_any_buffer_across_segments(mem):
    r = chain_over(mem, [b"\x01\x00", b"\x00\x00\x02\x00\x00\x00", b"xyz"], []).reader()
    words = array.array("I", [0, 0])
    assert r.readinto(words) == 8
    assert list(words) == [1, 2]
    buf = bytearray(10)
    assert r.readinto(buf) == 3
    assert bytes(buf[:3]) == b"xyz"


def test_reader_views_alias_guest_ram_without_copies(mem):
    chain = chain_over(mem, [b"hello", b"world"], [])
    r = chain.reader()
    r.skip(2)
    views = r.views(6)
    assert [bytes(v) for v in views] == [b"llo", b"wor"]
    assert all(v.readonly for v in views)
    mem.write(chain.readable[1][0], b"W")  # the guest changes the buffer
    assert bytes(views[1]) == b"Wor"
    assert r.read() == b"ld"


def test_reader_views_feed_pwritev(mem, tmp_path):
    chain = chain_over(mem, [b"sector-", b"data"], [])
    fd = os.open(tmp_path / "disk", os.O_RDWR | os.O_CREAT)
    try:
        assert os.pwritev(fd, chain.reader().views(), 0) == 11
        assert os.pread(fd, 11, 0) == b"sector-data"
    finally:
        os.close(fd)


def test_skip_moves_across_segment_boundaries(mem):
    r = chain_over(mem, [b"ab", b"cd", b"ef"], []).reader()
    assert r.skip(2) == 2  # exactly the first segment
    assert r.read(1) == b"c"
    assert r.skip(2) == 2
    assert r.read() == b"f"
    assert r.skip(10) == 0


def test_views_after_a_skip_to_a_segment_boundary_have_no_empty_pieces(mem):
    r = chain_over(mem, [b"ab", b"cd"], []).reader()
    r.skip(2)
    assert [bytes(v) for v in r.views()] == [b"cd"]
    w = chain_over(mem, [], [3, 2]).writer()
    w.skip(3)
    assert [len(v) for v in w.views()] == [2]


def test_writer_writes_across_segments_and_counts(mem):
    chain = chain_over(mem, [], [3, 2, 4])
    w = chain.writer()
    assert (w.written, w.remaining) == (0, 9)
    assert w.write(b"abcd") == 4
    assert w.write(memoryview(b"efg")) == 3
    assert (w.written, w.remaining) == (7, 2)
    (a0, _), (a1, _), (a2, _) = chain.writable
    assert (
        mem.read(a0, 3) == b"abc" and mem.read(a1, 2) == b"de" and mem.read(a2, 4) == b"fg\xee\xee"
    )


def test_writer_truncates_at_the_end_of_the_chain(mem):
    chain = chain_over(mem, [], [2, 1])
    w = chain.writer()
    assert w.write(b"toolong") == 3
    assert w.written == 3
    assert w.write(b"more") == 0
    assert mem.read(chain.writable[1][0], 1) == b"o"


def test_writer_accepts_typed_buffers(mem):
    chain = chain_over(mem, [], [8])
    w = chain.writer()
    assert w.write(array.array("H", [1, 2, 3, 4])) == 8
    assert mem.read(chain.writable[0][0], 8) == struct.pack("<4H", 1, 2, 3, 4)


def test_write_struct_packs_at_the_cursor(mem):
    chain = chain_over(mem, [], [1, 4])
    w = chain.writer()
    assert w.write_struct(struct.Struct("<BI"), 7, 0x01020304) == 5
    a0, a1 = chain.writable[0][0], chain.writable[1][0]
    assert mem.read(a0, 1) + mem.read(a1, 4) == b"\x07\x04\x03\x02\x01"


def test_writer_views_reserve_bytes_that_count_as_written(mem, tmp_path):
    chain = chain_over(mem, [], [4, 6, 2])
    w = chain.writer()
    w.skip(1)
    views = w.views(8)
    assert [len(v) for v in views] == [3, 5]
    assert w.written == 9
    path = tmp_path / "f"
    path.write_bytes(b"ABCDEFGH")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.preadv(fd, views, 0) == 8
    finally:
        os.close(fd)
    (a0, _), (a1, _), _ = chain.writable
    assert mem.read(a0, 4) == b"\xeeABC" and mem.read(a1, 6) == b"DEFGH\xee"
    assert w.write(b"zzzz") == 3
    assert w.remaining == 0


def test_reader_and_writer_are_independent_streams(mem):
    chain = chain_over(mem, [b"req"], [2])
    r, w = chain.reader(), chain.writer()
    assert w.write(b"ok") == 2
    assert r.read() == b"req"
    assert chain.reader().read() == b"req"  # a fresh reader starts over


def test_empty_chain_streams(mem):
    chain = DescriptorChain(mem, 3, 1, [], [], 0, 0)
    assert chain.reader().read() == b""
    assert chain.reader().views() == []
    assert chain.writer().write(b"x") == 0
    assert chain.writer().views() == []


def test_segments_in_the_high_region_are_reachable():
    mem = GuestMemory.x86(0xC000_0000 + 0x2000)
    hi = 0x1_0000_0000
    mem.write(hi, b"above4G")
    chain = DescriptorChain(mem, 0, 2, [(hi, 7)], [(hi + 0x1000, 4)], 7, 4)
    assert chain.reader().read() == b"above4G"
    chain.writer().write(b"done")
    assert mem.read(hi + 0x1000, 4) == b"done"
