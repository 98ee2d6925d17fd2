"""virtio-blk, the block device (virtio 1.2 §5.2, device ID 2), backed by a raw image file.

One request queue.  Every request is one descriptor chain::

    readable:  le32 type | le32 reserved | le64 sector | data (OUT, DISCARD, WRITE_ZEROES)
    writable:  data (IN, GET_ID) | u8 status  <- always the LAST writable byte

The header may share a descriptor with the data and the status may share one with the data
(virtio.md §9 pitfall 11), so requests are parsed over the chain's byte streams, never over
descriptor boundaries.  Data moves with one ``os.preadv``/``os.pwritev`` per request straight
between the image and guest-RAM views: no copy through Python bytes, no per-sector loop.

Error handling (everything in a request is guest-controlled):

* a request the device can answer but not perform gets a status byte: IOERR for bad bounds,
  data lengths that are not whole sectors, writes to a read-only disk (§5.2.6.2: "MUST NOT write
  any data") and host I/O errors (``OSError``); UNSUPP for unknown types, features that were not
  negotiated and unknown segment flags (§5.2.6.2);
* a request with no way to report (header shorter than 16 bytes, no writable byte for the
  status) is returned with ``used.len = 0`` and logged rate-limited.  It is not a reason for
  DEVICE_NEEDS_RESET: the ring itself is fine and the driver can go on.

``used.len`` is the number of bytes the device wrote into the writable buffers, status included:
IN = data + 1, GET_ID = id bytes + 1, everything else (and every error) = 1.

Read-only disks offer VIRTIO_BLK_F_RO and do *not* offer DISCARD/WRITE_ZEROES: Linux then never
sends them, and if a driver sends them anyway they fail with IOERR like any other write.

Durability (§5.2.6.2): FLUSH is always offered and answered with ``fdatasync``; a driver that
does not negotiate it gets write-through behaviour (``fdatasync`` before each write completes).
DISCARD punches holes; WRITE_ZEROES zeroes in place (ZERO_RANGE) and punches only with its unmap
flag; where the filesystem refuses a mode the device writes zeroes instead, so both always read
back as zeroes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable, Sequence
from typing import Any

try:
    # hashlib's own BLAKE2b (hashlib.blake2b is this very function), without the rest of
    # hashlib: importing hashlib loads OpenSSL's libcrypto, +3.8 MiB of VMM RSS for nothing
    # (docs/PERFORMANCE.md, VMM memory).
    from _blake2 import blake2b
except ImportError:  # not CPython
    from hashlib import blake2b

from ...errors import ConfigError
from . import spec
from .device import ConfigField, VirtioDevice
from .queue import ChainReader, ChainWriter, DescriptorChain, Virtqueue

log = logging.getLogger(__name__)

# -- §5.2.3 feature bits (Linux include/uapi/linux/virtio_blk.h names) -------------------------
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# -- §5.2.6 request types and status values -------------------------------------------------------
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20  # §5.2.6: NUL-padded, not terminated when exactly 20 bytes

#: ``sector`` and ``capacity`` are always in 512-byte units, whatever ``blk_size`` says (§5.2.4).
SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT

# -- limits advertised in config space ----------------------------------------------------------
#: Largest data segment.  Linux's own default is unlimited (it caps by the DMA size); 1 MiB is far
#: above the block layer's usual request size and keeps every iovec of a request modest.
SIZE_MAX = 1 << 20
#: DISCARD / WRITE_ZEROES: sectors per segment and segments per request.  Bounded so that the
#: zero-writing fallback (filesystems without fallocate modes) does a bounded amount of work per
#: request: at most 32 x 2 GiB.  crosvm offers 32 segments too.
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 32
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 32
#: 4 KiB: the host filesystem block, so guest discards map onto whole blocks that can be punched.
#: Linux uses it as the discard granularity (``discard_sector_alignment << 9``).
DISCARD_SECTOR_ALIGNMENT = 8

# Linux refuses preadv/pwritev with more than IOV_MAX iovecs (EINVAL); a request within seg_max
# never has that many, a hostile indirect chain might, so larger requests go in batches.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

# Header (§5.2.6): le32 type, le32 reserved (ioprio in legacy), le64 sector.
_HDR = struct.Struct("<IIQ")
# DISCARD / WRITE_ZEROES segment: le64 sector, le32 num_sectors, le32 flags.
_SEG = struct.Struct("<QII")
_STATUS_BYTE = (b"\x00", b"\x01", b"\x02")

# -- fallocate(2) through libc: Python's os module only has posix_fallocate (mode 0) -------------
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_ZERO_RANGE = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
# What a filesystem (or an old kernel) answers for a mode it does not implement.  Bounds are
# checked before the call, so EINVAL here means "mode not supported" too (e.g. FUSE, some NFS).
_FALLOC_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})

_ZERO_CHUNK = 1 << 20


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # not glibc/musl: every zeroing falls back to writes
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


_libc_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError like the os module does."""
    if _libc_fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _libc_fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _advance(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes (after a short transfer)."""
    out = list(views)
    i = 0
    while n and i < len(out):
        k = len(out[i])
        if n < k:
            out[i] = out[i][n:]
            break
        n -= k
        i += 1
    return out[i:]


def _transfer(
    op: Callable[[int, Sequence[Any], int], int],
    fd: int,
    views: list[memoryview],
    offset: int,
    total: int,
) -> None:
    """Run ``os.preadv``/``os.pwritev`` until ``total`` bytes moved.

    Nearly always one call.  More only for the rare short transfer (Linux moves at most
    0x7ffff000 bytes per call; a signal) or a chain with more than IOV_MAX segments.  Every
    iteration moves at least one byte or raises, so the loop is bounded by ``total``.
    """
    done = 0
    while True:
        n = op(fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX], offset + done)
        done += n
        if done >= total:
            return
        if n <= 0:
            # preadv at end of file: the image shrank under us (someone truncated it).
            raise OSError(errno.EIO, f"short transfer: {done} of {total} bytes")
        views = _advance(views, n)


def _default_serial(st: os.stat_result) -> bytes:
    """20 hex digits from (device, inode): stable while the image file exists, and distinct for
    two images in one VM (Firecracker derives its default id from the same fields)."""
    key = f"{st.st_dev}:{st.st_rdev}:{st.st_ino}".encode()
    return blake2b(key, digest_size=VIRTIO_BLK_ID_BYTES // 2).hexdigest().encode()


class Block(VirtioDevice):
    """A virtio-blk device backed by a raw disk image (regular file or host block device).

    Use as a context manager or call :meth:`close` when the VM is gone: the device holds the
    image open and locked (``flock``: exclusive for read-write, shared for read-only, as QEMU
    does) so two VMs cannot write one image at the same time.
    """

    device_type = spec.VIRTIO_ID_BLOCK
    name = "block"
    config_layout = (
        ConfigField("capacity", 0, "Q"),
        ConfigField("size_max", 8, "I"),
        ConfigField("seg_max", 12, "I"),
        ConfigField("blk_size", 20, "I"),
        ConfigField("max_discard_sectors", 36, "I"),
        ConfigField("max_discard_seg", 40, "I"),
        ConfigField("discard_sector_alignment", 44, "I"),
        ConfigField("max_write_zeroes_sectors", 48, "I"),
        ConfigField("max_write_zeroes_seg", 52, "I"),
        ConfigField("write_zeroes_may_unmap", 56, "B"),
        # u8 unused1[3] (57..59) must read 0 (§5.2.5): the config image covers it.
        ConfigField("unused1", 57, "3s"),
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        serial: str | None = None,
        queue_size: int = 256,
    ) -> None:
        if not 4 <= queue_size <= spec.VIRTQ_MAX_SIZE or queue_size & (queue_size - 1):
            # Split rings need a power of two (Linux rejects others); seg_max = size - 2 >= 2.
            raise ConfigError(
                f"block queue size {queue_size} must be a power of two between 4 and "
                f"{spec.VIRTQ_MAX_SIZE}"
            )
        serial_bytes = None if serial is None else self._check_serial(serial)
        self.path = os.fspath(path)
        self.read_only = read_only
        self._fd, st, size = self._open(self.path, read_only)
        try:
            self.size = size
            self.serial = serial_bytes if serial_bytes is not None else _default_serial(st)
            self._unsupported_modes: set[int] = set()
            self._zeros: memoryview | None = None
            may_unmap = not read_only and self._probe_punch()

            self.device_features = (
                spec.bit(VIRTIO_BLK_F_SIZE_MAX)
                | spec.bit(VIRTIO_BLK_F_SEG_MAX)
                | spec.bit(VIRTIO_BLK_F_BLK_SIZE)
                | spec.bit(VIRTIO_BLK_F_FLUSH)
            )
            if read_only:
                self.device_features |= spec.bit(VIRTIO_BLK_F_RO)
            else:
                self.device_features |= spec.bit(VIRTIO_BLK_F_DISCARD) | spec.bit(
                    VIRTIO_BLK_F_WRITE_ZEROES
                )
            self.queue_max_sizes = (queue_size,)
            super().__init__()
            for name, value in (
                ("capacity", size >> SECTOR_SHIFT),
                ("size_max", SIZE_MAX),
                # Linux adds 2 descriptors (header, status) to seg_max data segments: the
                # whole chain then fits the ring even without INDIRECT_DESC.
                ("seg_max", queue_size - 2),
                ("blk_size", SECTOR_SIZE),
            ):
                self.set_config(name, value, notify=False)
            if not read_only:
                for name, value in (
                    ("max_discard_sectors", MAX_DISCARD_SECTORS),
                    ("max_discard_seg", MAX_DISCARD_SEG),
                    ("discard_sector_alignment", DISCARD_SECTOR_ALIGNMENT),
                    ("max_write_zeroes_sectors", MAX_WRITE_ZEROES_SECTORS),
                    ("max_write_zeroes_seg", MAX_WRITE_ZEROES_SEG),
                    # §5.2.6.2: set iff a WRITE_ZEROES may deallocate, i.e. punching works here.
                    ("write_zeroes_may_unmap", int(may_unmap)),
                ):
                    self.set_config(name, value, notify=False)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise
        self.may_unmap = may_unmap
        # Without FLUSH negotiated a completed write must already be stable (§5.2.6.2 case 1).
        self._writethrough = True
        self.metrics.update(
            read_ops=0,
            read_bytes=0,
            write_ops=0,
            write_bytes=0,
            flushes=0,
            discard_ops=0,
            write_zeroes_ops=0,
            get_id_ops=0,
            io_errors=0,
            unsupported=0,
            invalid_requests=0,
        )

    # -- opening the image --------------------------------------------------------------------

    @staticmethod
    def _check_serial(serial: str) -> bytes:
        try:
            raw = serial.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError(f"block serial {serial!r} must be ASCII") from None
        if len(raw) > VIRTIO_BLK_ID_BYTES:
            raise ConfigError(
                f"block serial {serial!r} is {len(raw)} bytes; virtio-blk allows at most "
                f"{VIRTIO_BLK_ID_BYTES}"
            )
        if not all(0x20 <= c < 0x7F for c in raw):
            raise ConfigError(f"block serial {serial!r} must be printable ASCII")
        return raw

    @staticmethod
    def _open(path: str, read_only: bool) -> tuple[int, os.stat_result, int]:
        """Open, check and lock the image; return (fd, stat, size in bytes)."""
        mode = "read-only" if read_only else "read-write"
        # O_NONBLOCK: opening a FIFO must not hang the VMM; it is rejected below and has no
        # effect on regular files or block devices.
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise ConfigError(f"disk image {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"disk image {path} is a directory, not a disk image") from None
        except PermissionError:
            hint = "" if read_only else " (use read_only=True for a read-only image)"
            raise ConfigError(f"no permission to open disk image {path} {mode}{hint}") from None
        except OSError as e:
            raise ConfigError(f"cannot open disk image {path} {mode}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"disk image {path} is a directory, not a disk image")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ConfigError(f"disk image {path} is not a regular file or a block device")
            os.set_blocking(fd, True)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"disk image {path} is in use by another VM or process (it is locked); "
                    f"two writers would corrupt it"
                ) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                    raise
                # Filesystems without locks (some NFS setups): run unlocked, as QEMU does.
                log.warning(
                    "disk image %s cannot be locked (%s); using it unlocked", path, e.strerror
                )
            # Block devices report st_size 0: the end of the device is its size.
            size = os.lseek(fd, 0, os.SEEK_END)
            if size == 0:
                raise ConfigError(
                    f"disk image {path} is empty; give it a size, e.g. truncate -s 1G {path}"
                )
            if size % SECTOR_SIZE:
                raise ConfigError(
                    f"disk image {path} is {size} bytes, not a multiple of {SECTOR_SIZE} "
                    f"(virtio-blk sectors are {SECTOR_SIZE} bytes); resize it, e.g. "
                    f"truncate -s {size + SECTOR_SIZE - size % SECTOR_SIZE} {path}"
                )
        except ConfigError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"cannot use disk image {path}: {e.strerror}") from None
        return fd, st, size

    def _probe_punch(self) -> bool:
        """Whether the image's filesystem can punch holes, without touching its data: punching
        past the end of the file with KEEP_SIZE is a no-op where supported."""
        try:
            fallocate(self._fd, _PUNCH, self.size, SECTOR_SIZE)
        except OSError:
            return False
        return True

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the image (and its lock).  Requests arriving afterwards fail with IOERR."""
        with self.lock:
            fd, self._fd = self._fd, -1
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> Block:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def on_activate(self) -> None:
        self._writethrough = not self.has_feature(VIRTIO_BLK_F_FLUSH)

    # -- request processing ---------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        self.drain(queue, self._handle)

    def _handle(self, chain: DescriptorChain) -> int:
        """Execute one request; return ``used.len``."""
        wlen = chain.writable_len
        if wlen == 0 or chain.readable_len < _HDR.size:
            return self._invalid(chain)
        reader = chain.reader()
        rtype, _reserved, sector = reader.read_struct(_HDR)
        writer = chain.writer()
        data_len = wlen - 1  # the status is the last writable byte
        done = 0
        try:
            if self._fd < 0:
                raise OSError(errno.EBADF, "the disk image was closed")
            if rtype == VIRTIO_BLK_T_IN:
                status, done = self._read(sector, writer, data_len)
            elif rtype == VIRTIO_BLK_T_OUT:
                status = self._write(sector, reader)
            elif rtype == VIRTIO_BLK_T_FLUSH:
                os.fdatasync(self._fd)
                self.metrics["flushes"] += 1
                status = VIRTIO_BLK_S_OK
            elif rtype == VIRTIO_BLK_T_GET_ID:
                done = writer.write(self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:data_len])
                self.metrics["get_id_ops"] += 1
                status = VIRTIO_BLK_S_OK
            elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                status = self._zero_ranges(rtype, reader)
            else:
                self.ratelog.debug(
                    ("unsupp", rtype), "%s: unsupported request type %d", self.name, rtype
                )
                status = VIRTIO_BLK_S_UNSUPP
        except OSError as e:
            self.ratelog.warning(
                ("oserror", rtype, e.errno),
                "%s: request type %d at sector %d failed: %s",
                self.name,
                rtype,
                sector,
                e,
            )
            status = VIRTIO_BLK_S_IOERR
            done = 0
        if status == VIRTIO_BLK_S_IOERR:
            self.metrics["io_errors"] += 1
            done = 0
        elif status == VIRTIO_BLK_S_UNSUPP:
            self.metrics["unsupported"] += 1
            done = 0
        # Step over whatever the data part did not fill (error, short GET_ID) to the last byte.
        pad = data_len - writer.written
        if pad > 0:
            writer.skip(pad)
        writer.write(_STATUS_BYTE[status])
        return done + 1

    def _invalid(self, chain: DescriptorChain) -> int:
        why = "no writable status byte" if chain.writable_len == 0 else "header < 16 bytes"
        self.metrics["invalid_requests"] += 1
        self.ratelog.warning(
            ("invalid", why), "%s: dropping malformed request (%s): %r", self.name, why, chain
        )
        return 0

    def _bad_range(self, what: str, sector: int, nbytes: int) -> bool:
        """True (and logged) if ``nbytes`` at ``sector`` do not fit the disk or whole sectors."""
        if nbytes & (SECTOR_SIZE - 1):
            self.ratelog.debug(
                ("partial", what),
                "%s: %s of %d bytes is not whole sectors",
                self.name,
                what,
                nbytes,
            )
            return True
        if (sector << SECTOR_SHIFT) + nbytes > self.size:
            self.ratelog.debug(
                ("range", what),
                "%s: %s of %d bytes at sector %d is beyond the end of the disk",
                self.name,
                what,
                nbytes,
                sector,
            )
            return True
        return False

    def _read(self, sector: int, writer: ChainWriter, nbytes: int) -> tuple[int, int]:
        if self._bad_range("read", sector, nbytes):
            return VIRTIO_BLK_S_IOERR, 0
        if nbytes:
            _transfer(os.preadv, self._fd, writer.views(nbytes), sector << SECTOR_SHIFT, nbytes)
        self.metrics["read_ops"] += 1
        self.metrics["read_bytes"] += nbytes
        return VIRTIO_BLK_S_OK, nbytes

    def _write(self, sector: int, reader: ChainReader) -> int:
        if self.read_only:
            return self._read_only_error("write")
        nbytes = reader.remaining
        if self._bad_range("write", sector, nbytes):
            return VIRTIO_BLK_S_IOERR
        if nbytes:
            _transfer(os.pwritev, self._fd, reader.views(nbytes), sector << SECTOR_SHIFT, nbytes)
            if self._writethrough:
                os.fdatasync(self._fd)
        self.metrics["write_ops"] += 1
        self.metrics["write_bytes"] += nbytes
        return VIRTIO_BLK_S_OK

    def _read_only_error(self, what: str) -> int:
        self.ratelog.debug(("ro", what), "%s: %s on a read-only disk", self.name, what)
        return VIRTIO_BLK_S_IOERR

    def _zero_ranges(self, rtype: int, reader: ChainReader) -> int:
        """DISCARD and WRITE_ZEROES: validate every segment first, then apply them all, so an
        invalid request never changes the image."""
        write_zeroes = rtype == VIRTIO_BLK_T_WRITE_ZEROES
        what = "write-zeroes" if write_zeroes else "discard"
        if self.read_only:
            return self._read_only_error(what)
        feature = VIRTIO_BLK_F_WRITE_ZEROES if write_zeroes else VIRTIO_BLK_F_DISCARD
        if not self.has_feature(feature):
            self.ratelog.debug(("notneg", what), "%s: %s without the feature", self.name, what)
            return VIRTIO_BLK_S_UNSUPP
        nbytes = reader.remaining
        max_seg = MAX_WRITE_ZEROES_SEG if write_zeroes else MAX_DISCARD_SEG
        if nbytes == 0 or nbytes % _SEG.size or nbytes // _SEG.size > max_seg:
            self.ratelog.debug(
                ("segs", what), "%s: %s with %d bytes of segments", self.name, what, nbytes
            )
            return VIRTIO_BLK_S_IOERR
        segs = list(_SEG.iter_unpack(reader.read(nbytes)))
        # §5.2.6.2: UNSUPP for any unknown flag, and for unmap on a discard.
        allowed = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if write_zeroes else 0
        if any(flags & ~allowed for _s, _n, flags in segs):
            return VIRTIO_BLK_S_UNSUPP
        max_sectors = MAX_WRITE_ZEROES_SECTORS if write_zeroes else MAX_DISCARD_SECTORS
        for sector, num, _flags in segs:
            if num > max_sectors or self._bad_range(what, sector, num << SECTOR_SHIFT):
                return VIRTIO_BLK_S_IOERR
        for sector, num, flags in segs:
            if num:
                # Discard may deallocate (§5.2.6.2); write-zeroes only with the unmap flag.
                punch = not write_zeroes or (
                    flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP and self.may_unmap
                )
                self._zero(sector << SECTOR_SHIFT, num << SECTOR_SHIFT, bool(punch))
        if self._writethrough:
            os.fdatasync(self._fd)
        self.metrics["write_zeroes_ops" if write_zeroes else "discard_ops"] += 1
        return VIRTIO_BLK_S_OK

    def _zero(self, offset: int, length: int, punch: bool) -> None:
        """Make ``[offset, offset+length)`` read back as zeroes: punch a hole (``punch``), else
        zero the range in place (ZERO_RANGE keeps the blocks allocated), else write zeroes."""
        for mode in (_PUNCH, _ZERO_RANGE) if punch else (_ZERO_RANGE,):
            if mode in self._unsupported_modes:
                continue
            try:
                fallocate(self._fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in _FALLOC_UNSUPPORTED:
                    raise
                # Remember: the filesystem will not learn it while we run.
                self._unsupported_modes.add(mode)
        zeros = self._zeros
        if zeros is None:
            zeros = self._zeros = memoryview(bytes(_ZERO_CHUNK))
        end = offset + length
        # Bounded: length <= MAX_*_SECTORS * 512, and each pass writes >= 1 byte or raises.
        while offset < end:
            n = os.pwrite(self._fd, zeros[: min(len(zeros), end - offset)], offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write while zeroing")
            offset += n
