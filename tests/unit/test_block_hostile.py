"""virtio-blk against a hostile driver (hypothesis).

Arbitrary headers, segments and chain shapes (short or garbage headers, no writable part, data
on the wrong side, huge sectors, overflowing sector counts, zero-length descriptors) are posted
through the Linux-like driver on split and packed rings, direct and indirect.  Every request is
checked against an independent model of the spec (§5.2.6): the device must answer with the
status the model predicts or drop a chain it cannot answer, never raise, stay usable, and the
image must only change by what valid OUT / DISCARD / WRITE_ZEROES requests write.
"""

from __future__ import annotations

import os
import struct
import tempfile

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from embervm.devices.virtio import block as blk
from embervm.devices.virtio import spec
from embervm.devices.virtio.block import Block
from embervm.devices.virtio.mmio import MmioTransport
from embervm.memory import GuestMemory
from embervm.testing.driver import LINUX_TRANSPORT_FEATURES, MmioDriver

SECTORS = 128
DISK = SECTORS * 512
QUEUE = 16
DROP = -1  # the chain cannot carry a status: returned with used.len 0
OK, IOERR, UNSUPP = blk.VIRTIO_BLK_S_OK, blk.VIRTIO_BLK_S_IOERR, blk.VIRTIO_BLK_S_UNSUPP
PATTERN = bytes(range(251)) * 12  # prime period: a misplaced byte shows up
HDR = struct.Struct("<IIQ")
SEG = struct.Struct("<QII")
SERIAL = b"hostile-serial"
INITIAL = (PATTERN * (DISK // len(PATTERN) + 1))[:DISK]

# -- the model: what §5.2.6 says the device must answer ------------------------------------------


def expected(rstream: bytes, wlen: int, read_only: bool, disk: bytearray) -> tuple[int, int]:
    """(status or DROP, used.len) for one request; applies a successful write to ``disk``."""
    if wlen == 0 or len(rstream) < 16:
        return DROP, 0
    rtype, _reserved, sector = HDR.unpack_from(rstream)
    payload = rstream[16:]
    dlen = wlen - 1
    if rtype == blk.VIRTIO_BLK_T_IN:
        if dlen % 512 or sector * 512 + dlen > DISK:
            return IOERR, 1
        return OK, dlen + 1
    if rtype == blk.VIRTIO_BLK_T_OUT:
        if read_only or len(payload) % 512 or sector * 512 + len(payload) > DISK:
            return IOERR, 1
        disk[sector * 512 : sector * 512 + len(payload)] = payload
        return OK, 1
    if rtype == blk.VIRTIO_BLK_T_FLUSH:
        return OK, 1
    if rtype == blk.VIRTIO_BLK_T_GET_ID:
        return OK, min(dlen, 20) + 1
    if rtype in (blk.VIRTIO_BLK_T_DISCARD, blk.VIRTIO_BLK_T_WRITE_ZEROES):
        wz = rtype == blk.VIRTIO_BLK_T_WRITE_ZEROES
        if read_only:
            return IOERR, 1
        if not payload or len(payload) % 16 or len(payload) // 16 > 32:
            return IOERR, 1
        segs = [SEG.unpack_from(payload, i) for i in range(0, len(payload), 16)]
        if any(flags & ~(1 if wz else 0) for _s, _n, flags in segs):
            return UNSUPP, 1
        if any(n > 1 << 22 or (s + n) * 512 > DISK for s, n, _f in segs):
            return IOERR, 1
        for s, n, _f in segs:
            disk[s * 512 : (s + n) * 512] = bytes(n * 512)
        return OK, 1
    return UNSUPP, 1


# -- strategies --------------------------------------------------------------------------------

KNOWN_TYPES = [0, 1, 4, 8, 11, 13, 2, 5, 10, 14, 0x8000_0001]
types = st.one_of(st.sampled_from(KNOWN_TYPES), st.integers(0, 2**32 - 1))
sectors = st.one_of(
    st.integers(0, SECTORS + 1),
    st.sampled_from([SECTORS - 1, SECTORS, 2**55, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
segments = st.lists(
    st.tuples(
        sectors,
        st.one_of(st.integers(0, SECTORS + 1), st.sampled_from([2**22, 2**22 + 1, 2**32 - 1])),
        st.one_of(st.sampled_from([0, 0, 0, 1, 2]), st.integers(0, 2**32 - 1)),
    ),
    max_size=4,
)
data_lens = st.one_of(st.sampled_from([0, 1, 16, 511, 512, 1024, 1536, 2048]), st.integers(0, 2100))


def cut(draw, total: int, max_cuts: int = 4) -> list[int]:
    """Split ``total`` bytes into descriptor sizes at arbitrary points (zero sizes included)."""
    cuts = sorted(draw(st.lists(st.integers(0, total), max_size=max_cuts)))
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


near_end = st.one_of(st.integers(0, SECTORS - 5), st.integers(SECTORS - 5, SECTORS + 1))


@st.composite
def wellformed(draw) -> tuple[bytes, int]:
    """A request Linux could send, aimed at the edges (last sectors, just past the end)."""
    rtype = draw(
        st.sampled_from(
            [
                blk.VIRTIO_BLK_T_IN,
                blk.VIRTIO_BLK_T_OUT,
                blk.VIRTIO_BLK_T_FLUSH,
                blk.VIRTIO_BLK_T_GET_ID,
                blk.VIRTIO_BLK_T_DISCARD,
                blk.VIRTIO_BLK_T_WRITE_ZEROES,
            ]
        )
    )
    header = HDR.pack(rtype, 0, draw(near_end))
    # whole sectors, now and then one byte more or less
    n = max(0, 512 * draw(st.integers(0, 4)) + draw(st.sampled_from([0, 0, 0, 0, 1, -1])))
    if rtype == blk.VIRTIO_BLK_T_IN:
        return header, n + 1
    if rtype == blk.VIRTIO_BLK_T_OUT:
        start = draw(st.integers(0, 250))
        return header + PATTERN[start : start + n], draw(st.integers(1, 3))
    if rtype == blk.VIRTIO_BLK_T_GET_ID:
        return header, draw(st.integers(1, 40))
    if rtype == blk.VIRTIO_BLK_T_FLUSH:
        return header, 1
    segs = draw(
        st.lists(
            st.tuples(near_end, st.integers(0, 8), st.sampled_from([0, 1])), min_size=1, max_size=3
        )
    )
    return header + b"".join(SEG.pack(*g) for g in segs), 1


@st.composite
def hostile(draw) -> tuple[bytes, int]:
    """Anything: random types and fields, segment lists, garbage, wrong-direction data."""
    kind = draw(st.sampled_from(["structured", "segments", "raw"]))
    if kind == "raw":
        rstream = draw(st.binary(max_size=48))
    elif kind == "segments":
        rtype = draw(st.sampled_from([blk.VIRTIO_BLK_T_DISCARD, blk.VIRTIO_BLK_T_WRITE_ZEROES]))
        body = b"".join(SEG.pack(*g) for g in draw(segments))
        # sometimes a partial segment at the end
        rstream = HDR.pack(rtype, 0, draw(sectors)) + body + draw(st.binary(max_size=3))
    else:
        header = HDR.pack(draw(types), draw(st.integers(0, 2**32 - 1)), draw(sectors))
        start = draw(st.integers(0, 250))
        rstream = header + PATTERN[start : start + draw(data_lens)]
    wlen = draw(st.one_of(st.sampled_from([0, 1, 2, 21, 513, 1025]), st.integers(0, 2400)))
    return rstream, wlen


@st.composite
def requests(draw) -> tuple[list[bytes], list[int], bool]:
    rstream, wlen = draw(st.one_of(wellformed(), hostile()))
    sizes = cut(draw, len(rstream))
    readable = [rstream[a : a + n] for a, n in zip(_offsets(sizes), sizes, strict=True)]
    writable = cut(draw, wlen)
    if not rstream and draw(st.booleans()):
        readable = []
    if wlen == 0 and draw(st.booleans()):
        writable = []
    if not readable and not writable:
        writable = [0]
    return readable, writable, draw(st.booleans())


def _offsets(sizes: list[int]) -> list[int]:
    out, pos = [], 0
    for n in sizes:
        out.append(pos)
        pos += n
    return out


# -- the test ------------------------------------------------------------------------------------


class Rig:
    def __init__(self, directory: str, ring: str, read_only: bool) -> None:
        self.path = os.path.join(directory, "disk.img")
        self.disk = bytearray(INITIAL)
        with open(self.path, "wb") as f:
            f.write(self.disk)
        self.read_only = read_only
        self.mem = GuestMemory([(0, 4 << 20)])
        self.blk = Block(self.path, read_only=read_only, serial=SERIAL.decode(), queue_size=QUEUE)
        self.transport = MmioTransport(self.blk, self.mem, packed=ring == "packed")
        self.drv = MmioDriver(self.transport, self.mem)
        accept = ((1 << 24) - 1) | LINUX_TRANSPORT_FEATURES
        if ring == "split":
            accept &= ~spec.bit(spec.VIRTIO_F_RING_PACKED)
        features = self.drv.probe(accept=accept)
        assert bool(features & spec.bit(spec.VIRTIO_F_RING_PACKED)) == (ring == "packed")

    def submit(self, readable: list[bytes], writable: list[int], indirect: bool):
        self.drv.submit(0, readable=readable, writable=writable, indirect=indirect)
        [(_token, length, bufs)] = self.drv.used(0)
        return length, b"".join(bufs)

    def file(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


def _req(rtype: int, sector: int, data: bytes = b"", writable: tuple[int, ...] = (1,)):
    return [HDR.pack(rtype, 0, sector), data], list(writable), False


# The edges, always tried: one sector past the end, one byte short or over, the last sector.
EDGES = [
    _req(blk.VIRTIO_BLK_T_OUT, SECTORS, PATTERN[:512]),
    _req(blk.VIRTIO_BLK_T_OUT, SECTORS - 1, PATTERN[:1024]),
    _req(blk.VIRTIO_BLK_T_OUT, SECTORS - 1, PATTERN[:512]),
    _req(blk.VIRTIO_BLK_T_OUT, 0, PATTERN[:513]),
    _req(blk.VIRTIO_BLK_T_OUT, 0, PATTERN[:511]),
    _req(blk.VIRTIO_BLK_T_IN, SECTORS - 1, writable=(1024, 1)),
    _req(blk.VIRTIO_BLK_T_IN, SECTORS - 1, writable=(512, 1)),
    _req(blk.VIRTIO_BLK_T_IN, 0, writable=(513, 1)),
    _req(blk.VIRTIO_BLK_T_DISCARD, 0, SEG.pack(SECTORS - 1, 2, 0)),
    _req(blk.VIRTIO_BLK_T_WRITE_ZEROES, 0, SEG.pack(SECTORS - 2, 2, 1)),
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ring=st.sampled_from(["split", "packed"]),
    read_only=st.booleans(),
    reqs=st.lists(requests(), min_size=1, max_size=6),
)
@example(ring="split", read_only=False, reqs=EDGES)
@example(ring="packed", read_only=True, reqs=EDGES)
def test_hostile_requests_get_the_specified_status_and_only_valid_writes_change_the_image(
    ring, read_only, reqs
):
    with tempfile.TemporaryDirectory() as d:
        rig = Rig(d, ring, read_only)
        try:
            for readable, writable, indirect in reqs:
                rstream = b"".join(readable)
                wlen = sum(writable)
                before = bytes(rig.disk)
                status, used_len = expected(rstream, wlen, read_only, rig.disk)
                length, wstream = rig.submit(readable, writable, indirect)

                assert length == used_len, (rstream[:16], writable)
                if status == DROP:
                    assert wstream == bytes(wlen)  # nothing written into a dropped chain
                else:
                    assert wstream[-1] == status, (rstream[:16], writable)
                    if status == OK:
                        rtype, _r, sector = HDR.unpack_from(rstream)
                        if rtype == blk.VIRTIO_BLK_T_IN:
                            off = sector * 512
                            assert wstream[:-1] == before[off : off + wlen - 1]
                        elif rtype == blk.VIRTIO_BLK_T_GET_ID:
                            n = length - 1
                            assert wstream[:n] == SERIAL.ljust(20, b"\0")[:n]
                    # bytes between what the device wrote and the status stay untouched
                    assert wstream[length - 1 : -1] == bytes(wlen - length)
                assert rig.file() == rig.disk
            # the device is still usable: no NEEDS_RESET, a valid read round-trips
            assert not rig.transport.read(spec.STATUS, 4) & spec.STATUS_DEVICE_NEEDS_RESET
            length, wstream = rig.submit([HDR.pack(blk.VIRTIO_BLK_T_IN, 0, 3)], [1024, 1], False)
            assert (length, wstream[-1]) == (1025, OK)
            assert wstream[:-1] == rig.disk[3 * 512 : 5 * 512]
            assert rig.blk.metrics["errors"] == 0
        finally:
            rig.blk.close()


@settings(max_examples=50, deadline=None)
@given(garbage=st.lists(st.binary(min_size=0, max_size=15), min_size=1, max_size=30))
def test_a_flood_of_headerless_chains_is_dropped_without_reset(garbage):
    with tempfile.TemporaryDirectory() as d:
        rig = Rig(d, "split", False)
        try:
            for g in garbage:
                # fewer than 16 readable bytes: no header; completed with used.len 0
                assert rig.submit([g] if g else [], [1], False) == (0, b"\0")
            assert rig.blk.metrics["execute_fails"] == len(garbage)
            assert rig.file() == rig.disk
            assert rig.submit([HDR.pack(blk.VIRTIO_BLK_T_FLUSH, 0, 0)], [1], False) == (1, b"\0")
        finally:
            rig.blk.close()
