"""virtio-blk through the Linux-like MMIO driver on a real image file (no KVM).

Each test drives the device exactly as the guest would: probe, post a chain, kick, read the used
ring; and checks both what the guest sees (status byte, used.len, data) and the image file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

import pytest

from embervm.devices.virtio import block as blockmod
from embervm.devices.virtio import spec
from embervm.devices.virtio.block import (
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    Block,
)
from embervm.devices.virtio.mmio import MmioTransport
from embervm.errors import ConfigError
from embervm.memory import GuestMemory
from embervm.testing.driver import LINUX_TRANSPORT_FEATURES, MmioDriver

DISK_SIZE = 4 << 20
CAPACITY = DISK_SIZE // 512
DEVICE_BITS = (1 << 24) - 1
PACKED = spec.bit(spec.VIRTIO_F_RING_PACKED)
RINGS = {
    # What Linux accepts, with the packed ring (the default when offered) or without it.
    "split": DEVICE_BITS | (LINUX_TRANSPORT_FEATURES & ~PACKED),
    "packed": DEVICE_BITS | LINUX_TRANSPORT_FEATURES,
}


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def seg(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


@pytest.fixture
def image(tmp_path):
    """A 4 MiB image full of random bytes; returns (path, original contents)."""
    path = tmp_path / "disk.img"
    data = os.urandom(DISK_SIZE)
    path.write_bytes(data)
    return path, data


class Disk:
    """A Block device behind an MMIO transport, probed by the Linux-like driver."""

    def __init__(
        self, path, *, ring: str = "split", accept: int | None = None, legacy: bool = False, **kw
    ) -> None:
        self.path = path
        self.mem = GuestMemory([(0, 32 << 20)])
        self.blk = Block(path, **kw)
        # The packed ring is opt-in on the transport (Linux takes it whenever it is offered).
        self.transport = MmioTransport(self.blk, self.mem, legacy=legacy, packed=ring == "packed")
        self.drv = MmioDriver(self.transport, self.mem)
        self.accept = RINGS[ring] if accept is None else accept
        self.features = self.drv.probe(accept=self.accept)

    def request(self, readable, writable, *, indirect: bool = False):
        """Submit one chain; return (used.len, writable buffer contents, status byte)."""
        self.drv.submit(0, readable=readable, writable=writable, indirect=indirect)
        [(_token, length, bufs)] = self.drv.used(0)
        tail = b"".join(bufs)
        return length, bufs, tail[-1] if tail else None

    def read(self, sector: int, nbytes: int) -> tuple[int, bytes]:
        length, bufs, status = self.request([hdr(VIRTIO_BLK_T_IN, sector)], [nbytes, 1])
        assert length == (nbytes + 1 if status == VIRTIO_BLK_S_OK else 1)
        return status, bufs[0]

    def write(self, sector: int, data: bytes) -> int:
        length, _bufs, status = self.request([hdr(VIRTIO_BLK_T_OUT, sector), data], [1])
        assert length == 1
        return status

    def file(self) -> bytes:
        return self.path.read_bytes()


@pytest.fixture
def disks():
    opened: list[Disk] = []

    def make(path, **kw) -> Disk:
        d = Disk(path, **kw)
        opened.append(d)
        return d

    yield make
    for d in opened:
        d.blk.close()


# -- probe and configuration space ----------------------------------------------------------------


def test_probe_negotiates_block_features_and_transport_bits(image, disks):
    d = disks(image[0], ring="packed", cache_type="Writeback")
    assert d.drv.device_id == spec.VIRTIO_ID_BLOCK
    for bit in (
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        spec.VIRTIO_F_VERSION_1,
        spec.VIRTIO_F_EVENT_IDX,
        spec.VIRTIO_F_INDIRECT_DESC,
        spec.VIRTIO_F_RING_PACKED,
    ):
        assert d.features >> bit & 1, bit
    assert not d.features >> VIRTIO_BLK_F_RO & 1


def test_config_fields_read_back_with_1_2_4_and_8_byte_accesses(image, disks):
    d = disks(image[0], queue_size=128)
    drv = d.drv
    # Linux: le64 as two readl (low, high), le32 readl, u8 readb, all in a generation loop.
    assert drv.read_config(0, 8) == CAPACITY
    assert drv.read_config(8, 4) == blockmod.SIZE_MAX
    assert drv.read_config(12, 4) == 128 - 2  # seg_max = queue size - 2
    assert drv.read_config(20, 4) == 512
    assert drv.read_config(36, 4) == blockmod.MAX_DISCARD_SECTORS
    assert drv.read_config(40, 4) == blockmod.MAX_DISCARD_SEG
    assert drv.read_config(44, 4) == blockmod.DISCARD_SECTOR_ALIGNMENT
    assert drv.read_config(48, 4) == blockmod.MAX_WRITE_ZEROES_SECTORS
    assert drv.read_config(52, 4) == blockmod.MAX_WRITE_ZEROES_SEG
    assert drv.read_config(56, 1) == int(d.blk.may_unmap)
    assert drv.read_config_bytes(57, 3) == b"\0\0\0"  # unused1 must read 0 (§5.2.5)
    # Other widths: one 8-byte access, 2-byte halves and single bytes must agree.
    assert d.transport.read(spec.CONFIG, 8) == CAPACITY
    assert d.transport.read(spec.CONFIG + 20, 2) == 512
    assert d.transport.read(spec.CONFIG + 22, 2) == 0
    cap = bytes(d.transport.read(spec.CONFIG + i, 1) for i in range(8))
    assert int.from_bytes(cap, "little") == CAPACITY
    # geometry/topology/writeback are not offered and read as zero
    assert d.transport.read(spec.CONFIG + 16, 4) == 0
    assert d.transport.read(spec.CONFIG + 24, 8) == 0


def test_config_space_cannot_be_written_by_the_driver(image, disks):
    d = disks(image[0])
    d.drv.write_config(0, 4, 7)
    d.drv.write_config(12, 4, 1)
    assert d.drv.read_config(0, 8) == CAPACITY
    assert d.drv.read_config(12, 4) == 254


# -- reads and writes -----------------------------------------------------------------------------


SHAPES = {
    # Linux's layout: header, one data segment, status.
    "separate": lambda data: ([hdr(VIRTIO_BLK_T_OUT, 8), data], [1]),
    # data in three descriptors cut off sector boundaries
    "multi": lambda data: (
        [hdr(VIRTIO_BLK_T_OUT, 8), data[:100], data[100:1900], data[1900:]],
        [1],
    ),
    # header and data in one descriptor
    "shared": lambda data: ([hdr(VIRTIO_BLK_T_OUT, 8) + data], [1]),
    # header split in two, first half alone
    "split-header": lambda data: (
        [hdr(VIRTIO_BLK_T_OUT, 8)[:5], hdr(VIRTIO_BLK_T_OUT, 8)[5:] + data[:7], data[7:]],
        [1],
    ),
}
READ_SHAPES = {
    "separate": [2048, 1],
    "multi": [512, 1000, 536, 1],
    # data and status share one descriptor
    "shared": [2049],
    "pages": [100, 1, 1947, 1],
}


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("wshape", sorted(SHAPES))
@pytest.mark.parametrize("rshape", sorted(READ_SHAPES))
def test_write_then_read_back_a_pattern_for_any_chain_shape(
    image, disks, ring, indirect, wshape, rshape
):
    path, original = image
    d = disks(path, ring=ring)
    assert bool(d.features & PACKED) == (ring == "packed")
    data = bytes(range(256)) * 8  # 4 sectors
    readable, writable = SHAPES[wshape](data)
    length, _bufs, status = d.request(readable, writable, indirect=indirect)
    assert (status, length) == (VIRTIO_BLK_S_OK, 1)
    disk = d.file()
    assert disk[8 * 512 : 8 * 512 + 2048] == data
    assert disk[: 8 * 512] == original[: 8 * 512]
    assert disk[8 * 512 + 2048 :] == original[8 * 512 + 2048 :]

    sizes = READ_SHAPES[rshape]
    length, bufs, status = d.request([hdr(VIRTIO_BLK_T_IN, 8)], sizes, indirect=indirect)
    assert status == VIRTIO_BLK_S_OK
    assert length == sum(sizes)  # every data byte + the status byte
    assert b"".join(bufs)[:-1] == data


def test_read_of_a_random_1mib_region_equals_the_file(image, disks):
    path, original = image
    d = disks(path, ring="split")
    sector = int.from_bytes(os.urandom(2), "little") % (CAPACITY - 2048)
    # 256 page-sized segments, the way Linux's block layer builds a 1 MiB read
    length, bufs, status = d.request(
        [hdr(VIRTIO_BLK_T_IN, sector)], [4096] * 256 + [1], indirect=True
    )
    assert (status, length) == (VIRTIO_BLK_S_OK, (1 << 20) + 1)
    assert b"".join(bufs[:-1]) == original[sector * 512 : sector * 512 + (1 << 20)]
    assert d.blk.metrics["read_bytes"] == 1 << 20
    assert d.blk.metrics["read_count"] == 1


def test_first_and_last_sector_are_readable_and_writable(image, disks):
    path, original = image
    d = disks(path)
    assert d.read(0, 512) == (VIRTIO_BLK_S_OK, original[:512])
    assert d.read(CAPACITY - 1, 512) == (VIRTIO_BLK_S_OK, original[-512:])
    assert d.write(CAPACITY - 1, b"\x5a" * 512) == VIRTIO_BLK_S_OK
    assert d.file()[-512:] == b"\x5a" * 512


def test_writes_and_reads_work_on_the_legacy_transport(image, disks):
    d = disks(image[0], legacy=True, accept=DEVICE_BITS | LINUX_TRANSPORT_FEATURES)
    assert d.write(3, b"\x11" * 1024) == VIRTIO_BLK_S_OK
    assert d.read(3, 1024) == (VIRTIO_BLK_S_OK, b"\x11" * 1024)


def test_device_works_again_after_driver_reset_and_reprobe(image, disks):
    d = disks(image[0], ring="packed")
    assert d.write(0, b"\x01" * 512) == VIRTIO_BLK_S_OK
    for _ in range(3):
        d.drv.remove()
        d.drv.probe(accept=d.accept)
        assert d.read(0, 512) == (VIRTIO_BLK_S_OK, b"\x01" * 512)


# -- used.len and where the status goes -----------------------------------------------------------


def test_status_is_the_last_byte_of_a_larger_writable_buffer(image, disks):
    d = disks(image[0])
    # OUT with a 16-byte writable buffer: only its last byte is the status; used.len counts the
    # bytes the device wrote (just the status).
    length, [buf], status = d.request([hdr(VIRTIO_BLK_T_OUT, 0), b"\x22" * 512], [16])
    assert (status, length) == (VIRTIO_BLK_S_OK, 1)
    assert buf == b"\0" * 16
    # FLUSH the same way
    length, [buf], status = d.request([hdr(VIRTIO_BLK_T_FLUSH)], [4])
    assert (length, buf) == (1, b"\0\0\0\0")


def test_used_len_is_one_for_a_failed_read(image, disks):
    d = disks(image[0])
    length, bufs, status = d.request([hdr(VIRTIO_BLK_T_IN, CAPACITY)], [512, 1])
    assert (status, length) == (VIRTIO_BLK_S_IOERR, 1)
    assert bufs[0] == b"\0" * 512  # nothing was read into the data buffer


# -- FLUSH and write durability -------------------------------------------------------------------


@pytest.fixture
def synced(monkeypatch):
    """Record every fdatasync the device makes."""
    calls: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(blockmod.os, "fdatasync", spy)
    return calls


def test_flush_syncs_the_image_and_written_data_is_in_the_file(image, disks, synced):
    path, _ = image
    d = disks(path, cache_type="Writeback")
    assert d.write(16, b"\x77" * 4096) == VIRTIO_BLK_S_OK
    assert synced == []  # FLUSH negotiated: writes are volatile until FLUSH
    length, _bufs, status = d.request([hdr(VIRTIO_BLK_T_FLUSH)], [1])
    assert (status, length) == (VIRTIO_BLK_S_OK, 1)
    assert synced == [d.blk._fd]
    assert d.blk.metrics["flush_count"] == 1
    with open(path, "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == b"\x77" * 4096


def test_writes_are_synced_before_completion_when_flush_is_not_negotiated(image, disks, synced):
    d = disks(
        image[0], accept=RINGS["split"] & ~spec.bit(VIRTIO_BLK_F_FLUSH), cache_type="Writeback"
    )
    assert not d.features >> VIRTIO_BLK_F_FLUSH & 1
    assert d.write(0, b"\x01" * 512) == VIRTIO_BLK_S_OK
    # §5.2.6.2: FLUSH offered but not negotiated → a completed write must be stable.
    assert len(synced) == 1
    assert d.request([hdr(VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 8)], [1])[2] == VIRTIO_BLK_S_OK
    assert len(synced) == 2


def test_failed_flush_reports_ioerr(image, disks, monkeypatch):
    d = disks(image[0])

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(blockmod.os, "fdatasync", broken)
    _length, _bufs, status = d.request([hdr(VIRTIO_BLK_T_FLUSH)], [1])
    assert status == VIRTIO_BLK_S_IOERR
    assert d.blk.metrics["io_errors"] == 1


# -- GET_ID ---------------------------------------------------------------------------------------


def test_get_id_returns_the_serial_nul_padded_to_20_bytes(image, disks):
    d = disks(image[0], serial="vm-7-root")
    length, [ident, st], status = d.request([hdr(VIRTIO_BLK_T_GET_ID)], [20, 1])
    assert (status, length) == (VIRTIO_BLK_S_OK, 21)
    assert ident == b"vm-7-root" + b"\0" * 11


def test_get_id_of_exactly_20_bytes_has_no_terminator(image, disks):
    d = disks(image[0], serial="A" * 20)
    length, [ident, _], status = d.request([hdr(VIRTIO_BLK_T_GET_ID)], [20, 1])
    assert (status, length, ident) == (VIRTIO_BLK_S_OK, 21, b"A" * 20)


def test_default_serial_is_20_bytes_derived_from_the_image_file(image, disks, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * 4096)
    a, b = disks(image[0]), disks(other)
    ids = []
    for d in (a, b):
        _length, [ident, _], status = d.request([hdr(VIRTIO_BLK_T_GET_ID)], [20, 1])
        assert status == VIRTIO_BLK_S_OK
        assert len(ident) == 20 and b"\0" not in ident and ident.isascii()
        ids.append(ident)
    assert ids[0] != ids[1]
    a.blk.close()
    with Block(image[0]) as again:  # stable across reopening the same file
        assert again.serial == ids[0]


def test_get_id_into_a_short_buffer_is_truncated_and_a_long_one_is_not_overrun(image, disks):
    d = disks(image[0], serial="0123456789abcdef")
    length, [ident, _], status = d.request([hdr(VIRTIO_BLK_T_GET_ID)], [8, 1])
    assert (status, length, ident) == (VIRTIO_BLK_S_OK, 9, b"01234567")
    length, [buf], status = d.request([hdr(VIRTIO_BLK_T_GET_ID)], [64])
    assert (status, length) == (VIRTIO_BLK_S_OK, 21)
    assert buf == b"0123456789abcdef" + b"\0" * 48


# -- DISCARD and WRITE_ZEROES ---------------------------------------------------------------------


def blocks(path) -> int:
    return os.stat(path).st_blocks


def test_discard_reads_back_zeroes_and_deallocates(image, disks):
    path, original = image
    d = disks(path)
    before = blocks(path)
    length, _bufs, status = d.request([hdr(VIRTIO_BLK_T_DISCARD), seg(64, 128) + seg(1024, 8)], [1])
    assert (status, length) == (VIRTIO_BLK_S_OK, 1)
    disk = d.file()
    assert disk[64 * 512 : 192 * 512] == bytes(128 * 512)
    assert disk[1024 * 512 : 1032 * 512] == bytes(8 * 512)
    assert disk[: 64 * 512] == original[: 64 * 512]
    assert disk[192 * 512 : 1024 * 512] == original[192 * 512 : 1024 * 512]
    assert disk[1032 * 512 :] == original[1032 * 512 :]
    assert len(disk) == DISK_SIZE
    if d.blk.may_unmap:  # the filesystem punches holes: the blocks are gone
        assert blocks(path) < before
    assert status == d.read(64, 512)[0] == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("flags", [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP], ids=["keep", "unmap"])
def test_write_zeroes_reads_back_zeroes(image, disks, flags):
    path, original = image
    d = disks(path)
    before = blocks(path)
    length, _bufs, status = d.request([hdr(VIRTIO_BLK_T_WRITE_ZEROES), seg(10, 1000, flags)], [1])
    assert (status, length) == (VIRTIO_BLK_S_OK, 1)
    assert d.read(10, 1000 * 512) == (VIRTIO_BLK_S_OK, bytes(1000 * 512))
    disk = d.file()
    assert disk[: 10 * 512] == original[: 10 * 512]
    assert disk[1010 * 512 :] == original[1010 * 512 :]
    if not flags:
        # without unmap the device must not deallocate (only unmap allows it, §5.2.6.2)
        assert blocks(path) >= before
    elif d.blk.may_unmap:
        assert blocks(path) < before
    assert d.blk.metrics["write_zeroes_ops"] == 1


def test_zeroing_falls_back_to_writing_zeroes_when_fallocate_is_refused(image, disks, monkeypatch):
    path, original = image
    d = disks(path)
    modes: list[int] = []

    def refuse(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(blockmod, "fallocate", refuse)
    monkeypatch.setattr(blockmod, "_ZERO_CHUNK", 4096)  # several passes of the write loop
    for _ in range(2):
        _length, _bufs, status = d.request(
            [hdr(VIRTIO_BLK_T_DISCARD), seg(1, 33) + seg(100, 2)], [1]
        )
        assert status == VIRTIO_BLK_S_OK
    assert d.file()[512 : 34 * 512] == bytes(33 * 512)
    assert d.file()[100 * 512 : 102 * 512] == bytes(1024)
    assert d.file()[34 * 512 : 100 * 512] == original[34 * 512 : 100 * 512]
    # each refused mode is tried once, then the device remembers
    assert sorted(modes) == sorted({blockmod._PUNCH, blockmod._ZERO_RANGE})


def test_fallocate_io_error_is_reported_as_ioerr(image, disks, monkeypatch):
    d = disks(image[0])

    def fail(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(blockmod, "fallocate", fail)
    _length, _bufs, status = d.request([hdr(VIRTIO_BLK_T_DISCARD), seg(0, 8)], [1])
    assert status == VIRTIO_BLK_S_IOERR


def test_write_zeroes_may_unmap_is_clear_where_holes_cannot_be_punched(image, disks, monkeypatch):
    path, original = image
    modes: list[int] = []
    real = blockmod.fallocate

    def no_punch(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        if mode & blockmod.FALLOC_FL_PUNCH_HOLE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        real(fd, mode, offset, length)

    monkeypatch.setattr(blockmod, "fallocate", no_punch)
    d = disks(path)
    assert d.drv.read_config(56, 1) == 0
    modes.clear()
    flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    length, _bufs, status = d.request([hdr(VIRTIO_BLK_T_WRITE_ZEROES), seg(4, 4, flags)], [1])
    assert status == VIRTIO_BLK_S_OK
    assert modes == [blockmod._ZERO_RANGE]  # unmap allowed, but the device knows it cannot
    assert d.file()[4 * 512 : 8 * 512] == bytes(2048)
    assert d.file()[8 * 512 :] == original[8 * 512 :]


def test_fallocate_wrapper_raises_oserror_with_the_errno():
    with pytest.raises(OSError) as e:
        blockmod.fallocate(-1, blockmod._PUNCH, 0, 512)
    assert e.value.errno == errno.EBADF


def test_discard_with_the_unmap_flag_or_unknown_flags_is_unsupp(image, disks):
    path, original = image
    d = disks(path)
    for rtype, flags in (
        (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
        (VIRTIO_BLK_T_DISCARD, 2),
        (VIRTIO_BLK_T_WRITE_ZEROES, 2),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0x8000_0001),
    ):
        # the bad flag is on the second segment: the first must not be applied either
        _length, _bufs, status = d.request([hdr(rtype), seg(0, 8) + seg(8, 8, flags)], [1])
        assert status == VIRTIO_BLK_S_UNSUPP, (rtype, flags)
    assert d.file() == original


@pytest.mark.parametrize(
    "segments",
    [
        b"",  # no segment
        seg(0, 8)[:15],  # not a whole segment
        seg(0, 8) * (blockmod.MAX_DISCARD_SEG + 1),  # too many segments
        seg(0, blockmod.MAX_DISCARD_SECTORS + 1),  # too many sectors
        seg(CAPACITY - 1, 2),  # past the end
        seg(0, 8) + seg(CAPACITY, 1),  # second segment past the end
        seg(2**64 - 1, 2**32 - 1),  # overflows 64 bits
    ],
    ids=[
        "empty",
        "partial",
        "too-many-segs",
        "too-many-sectors",
        "past-end",
        "second-past-end",
        "overflow",
    ],
)
@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
def test_invalid_discard_and_write_zeroes_fail_with_ioerr_and_change_nothing(
    image, disks, segments, rtype
):
    path, original = image
    d = disks(path)
    length, _bufs, status = d.request([hdr(rtype), segments], [1])
    assert (status, length) == (VIRTIO_BLK_S_IOERR, 1)
    assert d.file() == original


def test_discard_is_unsupp_when_the_driver_did_not_negotiate_it(image, disks):
    path, original = image
    no_discard = (
        RINGS["split"] & ~spec.bit(VIRTIO_BLK_F_DISCARD) & ~spec.bit(VIRTIO_BLK_F_WRITE_ZEROES)
    )
    d = disks(path, accept=no_discard)
    for rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        _length, _bufs, status = d.request([hdr(rtype), seg(0, 8)], [1])
        assert status == VIRTIO_BLK_S_UNSUPP
    assert d.file() == original


# -- bounds and malformed data lengths ------------------------------------------------------------


@pytest.mark.parametrize(
    ("sector", "nbytes"),
    [(CAPACITY, 512), (CAPACITY - 1, 1024), (2**64 - 1, 512), (CAPACITY + 1, 0)],
    ids=["at-end", "straddles-end", "huge-sector", "empty-past-end"],
)
def test_out_of_range_requests_fail_with_ioerr(image, disks, sector, nbytes):
    path, original = image
    d = disks(path)
    assert d.read(sector, nbytes)[0] == VIRTIO_BLK_S_IOERR
    assert d.write(sector, b"\xee" * nbytes) == VIRTIO_BLK_S_IOERR
    assert d.file() == original
    assert d.blk.metrics["io_errors"] == 2


@pytest.mark.parametrize("nbytes", [1, 100, 511, 513, 4095])
def test_data_that_is_not_whole_sectors_fails_with_ioerr(image, disks, nbytes):
    path, original = image
    d = disks(path)
    assert d.read(0, nbytes)[0] == VIRTIO_BLK_S_IOERR
    assert d.write(0, b"\xee" * nbytes) == VIRTIO_BLK_S_IOERR
    assert d.file() == original


def test_zero_length_read_and_write_inside_the_disk_succeed(image, disks):
    path, original = image
    d = disks(path)
    assert d.request([hdr(VIRTIO_BLK_T_IN, CAPACITY)], [1])[2] == VIRTIO_BLK_S_OK
    assert d.write(5, b"") == VIRTIO_BLK_S_OK
    assert d.file() == original


@pytest.mark.parametrize("rtype", [2, 3, 5, 10, 14, 15, 26, 0x8000_0000, 0xFFFF_FFFF])
def test_unknown_or_unoffered_request_types_are_unsupp(image, disks, rtype):
    path, original = image
    d = disks(path)
    length, _bufs, status = d.request([hdr(rtype), b"\xee" * 512], [8, 1])
    assert (status, length) == (VIRTIO_BLK_S_UNSUPP, 1)
    assert d.file() == original
    assert d.blk.metrics["unsupported"] == 1


# -- read-only disks ------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_type", ["Unsafe", "Writeback"])
def test_read_only_disk_offers_ro_and_no_discard(image, disks, cache_type):
    d = disks(image[0], read_only=True, cache_type=cache_type)
    assert d.features >> VIRTIO_BLK_F_RO & 1
    assert not d.features >> VIRTIO_BLK_F_DISCARD & 1
    assert not d.features >> VIRTIO_BLK_F_WRITE_ZEROES & 1
    assert d.features >> VIRTIO_BLK_F_FLUSH & 1 == (cache_type == "Writeback")


def test_read_only_disk_rejects_every_write_with_ioerr_and_keeps_the_file(image, disks):
    path, original = image
    os.chmod(path, 0o444)
    d = disks(path, read_only=True)
    assert d.write(0, b"\xee" * 512) == VIRTIO_BLK_S_IOERR
    for rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        length, _bufs, status = d.request([hdr(rtype), seg(0, 8)], [1])
        assert (status, length) == (VIRTIO_BLK_S_IOERR, 1)
    assert d.read(0, 512) == (VIRTIO_BLK_S_OK, original[:512])
    assert d.request([hdr(VIRTIO_BLK_T_FLUSH)], [1])[2] == VIRTIO_BLK_S_OK
    assert d.file() == original
    assert d.blk.metrics["write_count"] == 0


def test_two_read_only_users_may_share_an_image_but_not_with_a_writer(image, disks):
    path, _ = image
    disks(path, read_only=True)
    disks(path, read_only=True)
    with pytest.raises(ConfigError, match="in use"):
        Block(path)


def test_a_read_write_image_is_locked_until_closed(image):
    path, _ = image
    with Block(path) as blk:
        with pytest.raises(ConfigError, match="in use"):
            Block(path, read_only=True)
        assert not blk.closed
    assert blk.closed
    Block(path).close()


def test_an_image_on_a_filesystem_without_locks_is_used_unlocked(image, disks, monkeypatch, caplog):
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(blockmod.fcntl, "flock", no_locks)
    d = disks(image[0])
    assert "cannot be locked" in caplog.text
    assert d.write(0, b"\x01" * 512) == VIRTIO_BLK_S_OK


# -- host I/O errors ------------------------------------------------------------------------------


def test_host_read_error_is_reported_as_ioerr_and_the_device_keeps_working(
    image, disks, monkeypatch
):
    path, original = image
    d = disks(path)

    def eio(*args):
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(blockmod.os, "preadv", eio)
        m.setattr(blockmod.os, "pwritev", eio)
        length, _bufs, status = d.request([hdr(VIRTIO_BLK_T_IN, 0)], [512, 1])
        assert (status, length) == (VIRTIO_BLK_S_IOERR, 1)
        assert d.write(0, b"\x01" * 512) == VIRTIO_BLK_S_IOERR
    assert d.read(0, 512) == (VIRTIO_BLK_S_OK, original[:512])
    status = d.transport.read(spec.STATUS, 4)
    assert not status & spec.STATUS_DEVICE_NEEDS_RESET
    assert d.blk.metrics["io_errors"] == 2


def test_short_host_transfers_are_completed(image, disks, monkeypatch):
    path, original = image
    d = disks(path)
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def at_most_700(real):
        def op(fd, views, offset):
            # move at most 700 bytes per call, like a signal-interrupted transfer
            budget, part = 700, []
            for v in views:
                part.append(v[:budget])
                budget -= len(part[-1])
                if not budget:
                    break
            return real(fd, part, offset)

        return op

    monkeypatch.setattr(blockmod.os, "preadv", at_most_700(real_preadv))
    monkeypatch.setattr(blockmod.os, "pwritev", at_most_700(real_pwritev))
    data = os.urandom(4096)
    length, _bufs, status = d.request([hdr(VIRTIO_BLK_T_OUT, 2), data[:1000], data[1000:]], [1])
    assert status == VIRTIO_BLK_S_OK
    length, bufs, status = d.request([hdr(VIRTIO_BLK_T_IN, 2)], [3000, 1096, 1])
    assert (status, length) == (VIRTIO_BLK_S_OK, 4097)
    assert b"".join(bufs[:2]) == data
    assert d.file()[1024 : 1024 + 4096] == data


def test_requests_with_more_segments_than_iov_max_are_batched(image, disks, monkeypatch):
    path, original = image
    d = disks(path)
    monkeypatch.setattr(blockmod, "_IOV_MAX", 3)
    data = os.urandom(5 * 512)
    pieces = [data[i : i + 256] for i in range(0, len(data), 256)]  # 10 segments
    assert d.request([hdr(VIRTIO_BLK_T_OUT, 4), *pieces], [1])[2] == VIRTIO_BLK_S_OK
    length, bufs, status = d.request([hdr(VIRTIO_BLK_T_IN, 4)], [256] * 10 + [1])
    assert (status, length) == (VIRTIO_BLK_S_OK, 5 * 512 + 1)
    assert b"".join(bufs[:-1]) == data


def test_reading_past_an_image_truncated_under_the_device_is_ioerr(image, disks):
    path, original = image
    d = disks(path)
    os.truncate(path, DISK_SIZE // 2)  # someone else shrank the file
    length, _bufs, status = d.request([hdr(VIRTIO_BLK_T_IN, CAPACITY - 1)], [512, 1])
    assert (status, length) == (VIRTIO_BLK_S_IOERR, 1)
    assert d.read(0, 512) == (VIRTIO_BLK_S_OK, original[:512])


def test_requests_after_close_fail_with_ioerr(image, disks):
    d = disks(image[0])
    d.blk.close()
    d.blk.close()  # idempotent
    assert d.read(0, 512)[0] == VIRTIO_BLK_S_IOERR
    assert d.request([hdr(VIRTIO_BLK_T_FLUSH)], [1])[2] == VIRTIO_BLK_S_IOERR


def test_metrics_count_operations_and_bytes(image, disks):
    d = disks(image[0])
    kicks = d.blk.metrics["queue_event_count"]
    d.write(0, b"\x01" * 1024)
    d.read(0, 512)
    d.read(0, 2048)
    d.request([hdr(VIRTIO_BLK_T_FLUSH)], [1])
    d.request([hdr(VIRTIO_BLK_T_DISCARD), seg(0, 8)], [1])
    d.request([hdr(VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 8)], [1])
    d.request([hdr(99)], [1])
    d.read(CAPACITY, 512)
    d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN)], writable=[])  # no status byte at all
    d.drv.used(0)
    m = d.blk.metrics
    # Firecracker's names (block/metrics.rs) ...
    assert (m["write_count"], m["write_bytes"]) == (1, 1024)
    assert (m["read_count"], m["read_bytes"]) == (2, 2560)
    assert m["flush_count"] == 1
    assert (m["invalid_reqs_count"], m["execute_fails"]) == (2, 1)  # IOERR + UNSUPP; no status
    assert m["queue_event_count"] - kicks == 9
    # ... and embervm's breakdown.
    assert (m["discard_ops"], m["write_zeroes_ops"]) == (1, 1)
    assert (m["unsupported"], m["io_errors"]) == (1, 1)


# -- configuration errors -------------------------------------------------------------------------


def test_missing_image_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Block(tmp_path / "nope.img")


def test_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        Block(tmp_path)
    with pytest.raises(ConfigError, match="is a directory"):
        Block(tmp_path, read_only=True)


def test_size_not_a_multiple_of_512_is_a_config_error_that_says_so(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(ConfigError, match="not a multiple of 512") as e:
        Block(path)
    assert "truncate -s 1024" in str(e.value)


def test_unopenable_path_is_a_config_error_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="cannot open disk image .*File name too long"):
        Block(tmp_path / ("x" * 300))


def test_host_error_while_checking_the_image_is_a_config_error(image, monkeypatch):
    def broken(fd: int, op: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(blockmod.fcntl, "flock", broken)
    with pytest.raises(ConfigError, match="cannot use disk image .*Input/output error"):
        Block(image[0])


def test_empty_image_is_a_config_error(tmp_path):
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        Block(path)


def test_fifo_is_a_config_error_and_does_not_hang(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    for ro in (False, True):
        with pytest.raises(ConfigError, match="not a regular file"):
            Block(path, read_only=ro)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unwritable_image_is_a_config_error_unless_read_only(image):
    path, _ = image
    os.chmod(path, stat.S_IRUSR)
    with pytest.raises(ConfigError, match="no permission.*read_only=True"):
        Block(path)
    Block(path, read_only=True).close()
    os.chmod(path, 0)
    with pytest.raises(ConfigError, match="no permission"):
        Block(path, read_only=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"serial": "x" * 21}, "at most 20"),
        ({"serial": "disk\u00e9"}, "ASCII"),
        ({"serial": "a\nb"}, "printable"),
        ({"queue_size": 100}, "power of two"),
        ({"queue_size": 2}, "power of two"),
        ({"queue_size": 65536}, "power of two"),
    ],
)
def test_bad_parameters_are_config_errors(image, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Block(image[0], **kwargs)
    Block(image[0]).close()  # and the failed attempt left no lock or fd behind


def test_permission_denied_says_how_to_fix_it(image, monkeypatch):
    # Runs as root too (where chmod does not deny): the host refusal is simulated.
    path, _ = image
    real_open = os.open

    def deny_writes(p, flags, *args):
        if flags & os.O_RDWR:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(p, flags, *args)

    monkeypatch.setattr(blockmod.os, "open", deny_writes)
    with pytest.raises(
        ConfigError,
        match=r"no permission to open disk image .* read-write "
        r"\(use read_only=True",
    ):
        Block(path)
    Block(path, read_only=True).close()


# -- Firecracker's cache_type ----------------------------------------------------------------------


def test_unsafe_is_the_default_offers_no_flush_and_never_syncs_a_write(image, disks, synced):
    d = disks(image[0], accept=DEVICE_BITS | LINUX_TRANSPORT_FEATURES)
    assert d.blk.cache_type == "Unsafe"
    assert not d.features >> VIRTIO_BLK_F_FLUSH & 1
    assert d.write(0, b"\x01" * 512) == VIRTIO_BLK_S_OK
    assert d.request([hdr(VIRTIO_BLK_T_WRITE_ZEROES), seg(0, 8)], [1])[2] == VIRTIO_BLK_S_OK
    assert synced == []  # Unsafe: the host page cache keeps the writes, no write-through


def test_unsafe_still_carries_out_a_flush_sent_without_the_feature(image, disks, synced):
    # Firecracker executes a FLUSH whatever the cache type (request.rs: Flush -> file flush).
    d = disks(image[0])
    assert d.write(8, b"\x02" * 512) == VIRTIO_BLK_S_OK
    length, _bufs, status = d.request([hdr(VIRTIO_BLK_T_FLUSH)], [1])
    assert (status, length) == (VIRTIO_BLK_S_OK, 1)
    assert synced == [d.blk._fd]
    assert d.blk.metrics["flush_count"] == 1


def test_writeback_offers_flush(image, disks):
    d = disks(image[0], cache_type="Writeback")
    assert d.features >> VIRTIO_BLK_F_FLUSH & 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"cache_type": "unsafe"}, "cache_type"),
        ({"cache_type": "WriteThrough"}, "cache_type"),
        ({"io_engine": "IoUring"}, "io_engine"),
    ],
)
def test_unknown_drive_options_are_config_errors(image, kw, match):
    with pytest.raises(ConfigError, match=match):
        Block(image[0], **kw)
    Block(image[0]).close()  # and the image was not left locked


def test_config_space_writes_and_reads_past_the_end_count_cfg_fails(image, disks):
    d = disks(image[0])
    d.drv.write_config(0, 4, 1)  # capacity is read-only
    assert d.blk.metrics["cfg_fails"] == 1
    assert d.drv.read_config(0, 8) == CAPACITY
    assert d.blk.metrics["cfg_fails"] == 1
    assert d.drv.read_config(0x100, 4) == 0
    assert d.blk.metrics["cfg_fails"] == 2


# -- update_path (Firecracker's PATCH /drives path_on_host) ----------------------------------------


def test_update_path_swaps_the_image_and_announces_the_new_capacity(image, disks, tmp_path):
    path, _original = image
    d = disks(path)
    new = tmp_path / "new.img"
    new.write_bytes(b"\x44" * (DISK_SIZE * 2))
    gen = d.drv.config_generation()
    d.drv.interrupt()  # acknowledge anything pending
    d.blk.update_path(new)
    assert d.drv.interrupt() & spec.VIRTIO_MMIO_INT_CONFIG  # "capacity change"
    assert d.drv.config_generation() != gen
    assert d.drv.read_config(0, 8) == 2 * CAPACITY
    assert d.read(2 * CAPACITY - 1, 512) == (VIRTIO_BLK_S_OK, b"\x44" * 512)
    assert d.write(0, b"\x55" * 512) == VIRTIO_BLK_S_OK
    assert new.read_bytes()[:512] == b"\x55" * 512
    assert d.blk.metrics["update_count"] == 1
    Block(path).close()  # the old image was closed and unlocked


def test_update_path_to_a_bad_image_keeps_the_old_one(image, disks, tmp_path):
    path, original = image
    d = disks(path)
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"\0" * 1000)
    for bad in (tmp_path / "missing.img", tmp_path, odd):
        with pytest.raises(ConfigError):
            d.blk.update_path(bad)
    assert d.blk.metrics["update_fails"] == 3
    assert d.blk.metrics["update_count"] == 0
    assert d.drv.read_config(0, 8) == CAPACITY
    assert d.read(0, 512) == (VIRTIO_BLK_S_OK, original[:512])
    with pytest.raises(ConfigError, match="in use"):
        Block(path)  # still ours, still locked


def test_update_path_to_an_image_locked_by_someone_else_fails(image, disks, tmp_path):
    d = disks(image[0])
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * DISK_SIZE)
    holder = disks(other)
    with pytest.raises(ConfigError, match="in use"):
        d.blk.update_path(other)
    assert d.blk.metrics["update_fails"] == 1
    holder.blk.close()


def test_update_path_to_the_same_grown_file_rereads_its_size_and_keeps_it_locked(image, disks):
    path, _ = image
    d = disks(path)
    os.truncate(path, 2 * DISK_SIZE)
    d.blk.update_path(path)
    assert d.drv.read_config(0, 8) == 2 * CAPACITY
    assert d.read(2 * CAPACITY - 1, 512) == (VIRTIO_BLK_S_OK, b"\0" * 512)
    with pytest.raises(ConfigError, match="in use"):
        Block(path)


def test_update_path_of_a_read_only_drive_opens_the_new_image_read_only(image, disks, tmp_path):
    d = disks(image[0], read_only=True)
    new = tmp_path / "ro.img"
    new.write_bytes(b"\x66" * DISK_SIZE)
    os.chmod(new, 0o444)
    d.blk.update_path(new)
    assert fcntl.fcntl(d.blk._fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    assert d.read(0, 512) == (VIRTIO_BLK_S_OK, b"\x66" * 512)
    assert d.write(0, b"\x01" * 512) == VIRTIO_BLK_S_IOERR
