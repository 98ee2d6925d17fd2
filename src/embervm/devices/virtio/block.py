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

Durability follows Firecracker's ``cache_type``: "Unsafe" (the default) does not offer FLUSH
and never syncs a write (the host page cache holds it); "Writeback" offers VIRTIO_BLK_F_FLUSH
and answers FLUSH with ``fdatasync``, and a driver that does not negotiate it gets write-through
behaviour (``fdatasync`` before each write completes, §5.2.6.2).  A FLUSH sent without the
feature is carried out all the same, as Firecracker does.

I/O engines: "Sync" runs every request on the event-loop thread, under the device lock.
"Async" checks each request on the loop thread and hands its I/O to a few ``blk-io`` worker
threads, which complete it themselves (status byte, used ring, interrupt) under the device lock,
so a slow disk never holds up the loop; requests may complete out of order (§2.7.8 allows it).
A reset or close bumps an epoch: completions of older requests never touch the rings.

Rate limiting (Firecracker's protocol): each request costs one op, reads and writes also their
data length in bytes; a refused request goes back on the ring (``undo_pop``), the queue waits
for one timer on the event loop, and kicks meanwhile are only counted.
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
import threading
from collections.abc import Callable, Sequence
from typing import Any

try:
    # hashlib's own BLAKE2b (hashlib.blake2b is this very function), without the rest of
    # hashlib: importing hashlib loads OpenSSL's libcrypto, +3.8 MiB of VMM RSS for nothing
    # (docs/PERFORMANCE.md, VMM memory).
    from _blake2 import blake2b
except ImportError:  # not CPython
    from hashlib import blake2b

from ...config import CACHE_TYPES, IO_ENGINES, RateLimitConfig
from ...errors import ConfigError, GuestError
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


class _Image:
    """An open, locked image file shared by the device and its requests in flight.

    Requests on worker threads hold a reference, so neither :meth:`Block.close` nor a path
    update can close the fd under a ``preadv`` (the fd number could be reused by another open
    and the I/O would land in the wrong file).  ``refs`` is only changed under the device
    lock; the fd is closed when the last holder lets go.
    """

    __slots__ = ("fd", "size", "st", "refs")

    def __init__(self, fd: int, size: int, st: os.stat_result) -> None:
        self.fd = fd
        self.size = size
        self.st = st
        self.refs = 1  # the device's own

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0 and self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class _Request:
    """One parsed request: what the device needs to execute and complete it."""

    __slots__ = (
        "chain",
        "queue",
        "rtype",
        "sector",
        "reader",
        "writer",
        "data_len",
        "image",
        "epoch",
        "status",
        "done",
        "views",
    )

    def __init__(
        self,
        chain: DescriptorChain,
        queue: Virtqueue,
        rtype: int,
        sector: int,
        reader: ChainReader,
        writer: ChainWriter,
        data_len: int,
    ) -> None:
        self.chain = chain
        self.queue = queue
        self.rtype = rtype
        self.sector = sector
        self.reader = reader
        self.writer = writer
        self.data_len = data_len
        self.image: _Image | None = None
        self.epoch = 0
        self.status = VIRTIO_BLK_S_OK
        self.done = 0  # data bytes written into the guest's buffers (IN, GET_ID)
        self.views: list[memoryview] | None = None


#: Worker threads of one Async drive: enough to overlap a few requests on a slow disk, few
#: enough for a 2-core host.  Firecracker's io_uring engine is one ring per drive.
ASYNC_WORKERS = 3

# Metrics with Firecracker's names (src/vmm/src/devices/virtio/block/virtio/metrics.rs), plus
# embervm's own breakdown (discard/write-zeroes/get-id counts, IOERR vs UNSUPP).
_METRICS = (
    "activate_fails",
    "cfg_fails",
    "no_avail_buffer",
    "event_fails",
    "execute_fails",
    "invalid_reqs_count",
    "flush_count",
    "queue_event_count",
    "rate_limiter_event_count",
    "update_count",
    "update_fails",
    "read_bytes",
    "write_bytes",
    "read_count",
    "write_count",
    "rate_limiter_throttled_events",
    "io_engine_throttled_events",
    "remaining_reqs_count",
    "discard_ops",
    "write_zeroes_ops",
    "get_id_ops",
    "io_errors",
    "unsupported",
)


class Block(VirtioDevice):
    """A virtio-blk device backed by a raw disk image (regular file or host block device).

    Firecracker's drive options: ``cache_type`` "Unsafe" (FLUSH not offered, writes left to
    the host page cache) or "Writeback" (FLUSH offered and answered with ``fdatasync``);
    ``io_engine`` "Sync" (I/O on the event-loop thread) or "Async" (I/O on
    :data:`ASYNC_WORKERS` worker threads, completed out of order); ``rate_limiter``
    (Firecracker's token buckets: one op per request, the data length in bytes for reads and
    writes).

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
        cache_type: str = "Unsafe",
        io_engine: str = "Sync",
        rate_limiter: RateLimitConfig | None = None,
    ) -> None:
        if not 4 <= queue_size <= spec.VIRTQ_MAX_SIZE or queue_size & (queue_size - 1):
            # Split rings need a power of two (Linux rejects others); seg_max = size - 2 >= 2.
            raise ConfigError(
                f"block queue size {queue_size} must be a power of two between 4 and "
                f"{spec.VIRTQ_MAX_SIZE}"
            )
        if cache_type not in CACHE_TYPES:
            raise ConfigError(f"block cache_type {cache_type!r} must be one of {CACHE_TYPES}")
        if io_engine not in IO_ENGINES:
            raise ConfigError(f"block io_engine {io_engine!r} must be one of {IO_ENGINES}")
        serial_bytes = None if serial is None else self._check_serial(serial)
        self.path = os.fspath(path)
        self.read_only = read_only
        self.cache_type = cache_type
        self.io_engine = io_engine
        fd, st, size = self._open(self.path, read_only)
        self._image = _Image(fd, size, st)
        try:
            self.size = size
            self._serial_given = serial_bytes is not None
            self.serial = serial_bytes if serial_bytes is not None else _default_serial(st)
            self._unsupported_modes: set[int] = set()
            self._zeros: memoryview | None = None
            may_unmap = not read_only and self._probe_punch()

            self.device_features = (
                spec.bit(VIRTIO_BLK_F_SIZE_MAX)
                | spec.bit(VIRTIO_BLK_F_SEG_MAX)
                | spec.bit(VIRTIO_BLK_F_BLK_SIZE)
            )
            if cache_type == "Writeback":
                self.device_features |= spec.bit(VIRTIO_BLK_F_FLUSH)
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
            self._image.release()
            raise
        self.may_unmap = may_unmap
        # Writeback whose driver did not negotiate FLUSH: a completed write must already be
        # stable (§5.2.6.2).  Unsafe never syncs a write, as Firecracker.
        self._writethrough = False
        self.metrics.update(dict.fromkeys(_METRICS, 0))
        # -- rate limiting (None: unlimited, and embervm.ratelimit is never imported) --
        self._limiter: Any = None
        if rate_limiter is not None:
            self._limiter = self._make_limiter(rate_limiter)
        self._throttled = False  # the limiter said no: queue kicks are ignored until _retry
        self._retry_timer: Any = None
        # -- Async engine --
        #: most requests on worker threads at once; the queue stays untouched beyond that
        self.max_in_flight = queue_size
        self._in_flight = 0
        self._idle = threading.Condition(self.lock)  # notified when _in_flight drops to 0
        self._epoch = 0  # bumped by reset/close: completions of older requests are dropped
        self._jobs: Any = None  # queue.SimpleQueue of _Request, None = no workers running
        self._workers: list[threading.Thread] = []
        self._engine_throttled = False  # stopped popping at max_in_flight / a pending swap
        self._pending_image: _Image | None = None  # update_path waiting for in-flight I/O

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
    def _open(
        path: str, read_only: bool, ours: os.stat_result | None = None
    ) -> tuple[int, os.stat_result, int]:
        """Open, check and lock the image; return (fd, stat, size in bytes).

        ``ours``: the stat of the image this device already holds (a path update).  If the
        new path is that very file, our own lock is the one in the way: the new fd is left
        unlocked and locked by the swap once the old fd is closed.
        """
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
            same = ours is not None and (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino)
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                if not same:
                    raise ConfigError(
                        f"disk image {path} is in use by another VM or process (it is "
                        f"locked); two writers would corrupt it"
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
            fallocate(self._image.fd, _PUNCH, self.size, SECTOR_SIZE)
        except OSError:
            return False
        return True

    @property
    def _fd(self) -> int:
        """The current image's fd (-1 once closed)."""
        return self._image.fd

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the image (and its lock) and stop the I/O workers.

        Never waits for I/O: requests still on a worker keep the old fd open until they
        return, and their completions are dropped.  Requests arriving afterwards fail with
        IOERR.
        """
        with self.lock:
            self._epoch += 1
            self._cancel_retry()
            pending, self._pending_image = self._pending_image, None
            if pending is not None:
                pending.release()
            image = self._image
            if image.fd >= 0 and image.refs > 0:
                self._image = _Image(-1, image.size, image.st)
                image.release()
            jobs, self._jobs = self._jobs, None
            workers, self._workers = self._workers, []
        if jobs is not None:
            for _ in workers:
                jobs.put(None)

    def __enter__(self) -> Block:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._image.fd < 0

    def on_activate(self) -> None:
        self._writethrough = self.cache_type == "Writeback" and not self.has_feature(
            VIRTIO_BLK_F_FLUSH
        )
        if self.io_engine == "Async" and self._jobs is None:
            self._start_workers()

    def on_reset(self) -> None:
        # Requests on workers finish their I/O but never touch the rings again (epoch), and
        # nothing waits for them: reset runs on a vCPU thread and must not hang on a slow disk.
        self._epoch += 1
        self._throttled = False
        self._engine_throttled = False
        self._cancel_retry()
        self._apply_pending_image()

    def _start_workers(self) -> None:
        import queue as jobqueue  # only Async drives need it

        jobs: jobqueue.SimpleQueue[_Request | None] = jobqueue.SimpleQueue()
        workers = []
        try:
            for i in range(ASYNC_WORKERS):
                t = threading.Thread(
                    target=self._worker, args=(jobs,), name=f"blk-io-{i}", daemon=True
                )
                t.start()
                workers.append(t)
        except RuntimeError as e:  # can't start new thread: run what we have, or Sync
            self.metrics["activate_fails"] += 1
            log.error("%s: cannot start I/O worker threads (%s)", self.name, e)
            if not workers:
                log.error("%s: %s runs its I/O on the event loop (Sync)", self.name, self.path)
                self.io_engine = "Sync"
                return
        self._jobs = jobs
        self._workers = workers

    # -- Firecracker's runtime updates (PATCH /drives) ----------------------------------------

    def update_path(self, path: str | os.PathLike[str]) -> None:
        """Switch to the image at ``path`` on a running VM (Firecracker's PATCH /drives
        ``path_on_host``).

        The new image is opened and checked like the first one (same read-only mode, lock);
        on any problem :class:`ConfigError` and the old image stays.  The swap happens at a
        request boundary: at once for Sync, after the requests in flight complete for Async
        (no new request starts meanwhile).  Then ``capacity`` is updated and, if the driver
        is running, a config-change interrupt makes Linux re-read it ("capacity change").
        """
        new_path = os.fspath(path)
        try:
            fd, st, size = self._open(new_path, self.read_only, ours=self._image.st)
        except ConfigError:
            self.metrics["update_fails"] += 1
            raise
        with self.lock:
            if self.closed:
                os.close(fd)
                self.metrics["update_fails"] += 1
                raise ConfigError(f"drive {self.path} is closed; cannot switch to {new_path}")
            old = self._pending_image
            if old is not None:  # a second update before the first applied: newest wins
                old.release()
            self._pending_image = _Image(fd, size, st)
            self.path = new_path
            self.metrics["update_count"] += 1
            if self._in_flight == 0:
                self._apply_pending_image()
            else:
                self._engine_throttled = True  # new requests wait for the swap

    def _apply_pending_image(self) -> None:
        """Swap in the image :meth:`update_path` opened.  Caller holds ``self.lock`` and no
        request of the current epoch is in flight."""
        new = self._pending_image
        if new is None:
            return
        self._pending_image = None
        old, self._image = self._image, new
        same = (old.st.st_dev, old.st.st_ino) == (new.st.st_dev, new.st.st_ino)
        old.release()
        if same:
            # Our old fd held the lock; now that it is closed (or will be, by its last
            # request), take it on the new one.  Failure only means someone else raced us.
            try:
                fcntl.flock(
                    new.fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB
                )
            except OSError as e:
                log.warning("%s: cannot re-lock %s after update: %s", self.name, self.path, e)
        self.size = new.size
        if not self._serial_given:
            self.serial = _default_serial(new.st)
        self.set_config("capacity", new.size >> SECTOR_SHIFT, notify=self.active)
        if self._engine_throttled and self.active and self.queues:
            self._engine_throttled = False
            self._post(self._resume)

    def update_rate_limiter(self, cfg: RateLimitConfig | None) -> None:
        """Replace the rate limiter's buckets (PATCH /drives ``rate_limiter``).  A queue
        throttled under the old buckets is retried at once."""
        with self.lock:
            if self._limiter is None:
                if cfg is None:
                    return
                self._limiter = self._make_limiter(cfg)
            else:
                self._limiter.update(cfg)
            if self._throttled:
                self._cancel_retry()
                self._arm_retry(0.0)

    def _make_limiter(self, cfg: RateLimitConfig) -> Any:
        from ...ratelimit import RateLimiter, TokenType  # only rate-limited drives import it

        self._tok_ops = TokenType.OPS
        self._tok_bytes = TokenType.BYTES
        return RateLimiter(cfg)

    # -- Async engine -------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests handed to worker threads and not completed yet."""
        return self._in_flight

    def quiesce(self, timeout: float) -> bool:
        """Wait until no request is in flight (pause uses it); False after ``timeout`` s."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def _worker(self, jobs: Any) -> None:
        """Body of a ``blk-io`` thread: I/O without the device lock, completion under it."""
        while True:
            req = jobs.get()
            if req is None:
                return
            # An unlocked look at the epoch: a stale value only costs one I/O whose
            # completion is then dropped under the lock.
            if req.epoch == self._epoch:
                self._execute_safely(req)
            with self.lock:
                self._complete_async(req)

    def _execute_safely(self, req: _Request) -> None:
        """:meth:`_execute` on a worker: whatever goes wrong, the request gets a status."""
        try:
            self._execute(req)
        except OSError as e:
            self._io_failed(req, e)
        except Exception:  # a bug: still answer the guest, never leave the queue stalled
            log.exception("%s: request type %d failed", self.name, req.rtype)
            req.status = VIRTIO_BLK_S_IOERR

    def _complete_async(self, req: _Request) -> None:
        """Finish a worker's request: used ring + interrupt.  Caller holds ``self.lock``."""
        self._in_flight -= 1
        image = req.image
        if image is not None:
            req.image = None
            image.release()
        if req.epoch == self._epoch and self.active:
            queue = req.queue
            queue.add_used(req.chain, self._finish(req))
            self._signal(queue)
        if self._in_flight == 0:
            self._idle.notify_all()
            if self._pending_image is not None:
                self._apply_pending_image()
        if (
            self._engine_throttled
            and self._pending_image is None
            and self._in_flight < self.max_in_flight
            and self.active
        ):
            self._engine_throttled = False
            self._post(self._resume)

    def _post(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the event loop (from any thread)."""
        if self.loop is None:
            callback()  # no loop (unit use): the caller's thread does it
        else:
            self.loop.call_soon_threadsafe(callback)

    def _resume(self) -> None:
        """Process the queue again after the engine was throttled (on the loop)."""
        with self.lock:
            if self.active and self.queues and self.queues[0] is not None:
                self._guarded_run(self.queues[0])

    # -- rate limiting ------------------------------------------------------------------------

    def _arm_retry(self, delay: float) -> None:
        if self._retry_timer is not None:
            return
        if self.loop is None:
            raise RuntimeError(f"{self.name}: a rate-limited drive needs an event loop")
        self._retry_timer = self.loop.call_later(max(delay, 0.0), self._retry)

    def _cancel_retry(self) -> None:
        timer, self._retry_timer = self._retry_timer, None
        if timer is not None:
            timer.cancel()

    def _retry(self) -> None:
        """The limiter's wait is over: unblock it and process the queue again."""
        with self.lock:
            self._retry_timer = None
            if not self._throttled or not self.active:
                return
            self.metrics["rate_limiter_event_count"] += 1
            self._throttled = False
            self._limiter.unblock()
            if self.queues and self.queues[0] is not None:
                self._guarded_run(self.queues[0])

    def _admit(self, rtype: int, nbytes: int) -> bool:
        """Charge one request to the limiter (Firecracker: 1 op for every request; the data
        length in bytes for reads and writes only); False, nothing charged, if refused."""
        lim = self._limiter
        if not lim.consume(1, self._tok_ops):
            return False
        data = rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT) and nbytes
        if data and not lim.consume(nbytes, self._tok_bytes):
            lim.manual_replenish(1, self._tok_ops)
            return False
        return True

    # -- request processing ---------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        self.metrics["queue_event_count"] += 1
        if self._throttled:
            # Firecracker counts a kick that arrives while the limiter blocks the queue.
            self.metrics["rate_limiter_throttled_events"] += 1
            return
        if self._engine_throttled:
            self.metrics["io_engine_throttled_events"] += 1
            return
        self._run_queue(queue)

    def _guarded_run(self, queue: Virtqueue) -> None:
        """:meth:`_run_queue` from a timer or resume callback: guest errors reset the device
        as they do on a kick (queue_notify)."""
        try:
            self._run_queue(queue)
        except GuestError as e:
            self.fail(f"queue {queue.index}: {e}")

    def _run_queue(self, queue: Virtqueue) -> None:
        """Pop and handle every available request (lost-wakeup rule as ``drain``), stopping
        early, with the chain put back, when the rate limiter or the Async engine says so."""
        popped = 0
        limited = self._limiter is not None and not self._limiter.unlimited
        async_io = self._jobs is not None
        try:
            while True:
                queue.disable_notifications()
                while True:
                    if async_io and self._in_flight >= self.max_in_flight:
                        self._engine_throttled = True
                        self.metrics["io_engine_throttled_events"] += 1
                        return
                    chain = queue.pop()
                    if chain is None:
                        break
                    popped += 1
                    self.metrics["chains"] += 1
                    req = self._parse(chain, queue)
                    if req is None:  # malformed: no status byte to report in
                        queue.add_used(chain, 0)
                        continue
                    if limited and not self._admit(req.rtype, req.data_len):
                        queue.undo_pop(chain)
                        popped -= 1
                        self._throttled = True
                        self.metrics["rate_limiter_throttled_events"] += 1
                        self._arm_retry(self._limiter.wait_time())
                        return
                    if async_io and req.rtype in _ASYNC_TYPES and self._submit(req):
                        continue
                    self._execute_inline(req)
                    queue.add_used(chain, self._finish(req))
                if not queue.enable_notifications():
                    break
        finally:
            if not popped:
                self.metrics["no_avail_buffer"] += 1
            self._signal(queue)

    def _signal(self, queue: Virtqueue) -> None:
        """``signal_used``, with a failing interrupt line counted (Firecracker event_fails):
        the used ring is already updated, so the next interrupt delivers the request."""
        try:
            self.signal_used(queue)
        except OSError as e:
            self.metrics["event_fails"] += 1
            self.ratelog.error(("irq", e.errno), "%s: interrupt failed: %s", self.name, e)

    def _parse(self, chain: DescriptorChain, queue: Virtqueue) -> _Request | None:
        """Read the header; None (counted, logged) for a request with no way to report."""
        wlen = chain.writable_len
        if wlen == 0 or chain.readable_len < _HDR.size:
            why = "no writable status byte" if wlen == 0 else "header < 16 bytes"
            self.metrics["execute_fails"] += 1
            self.ratelog.warning(
                ("invalid", why), "%s: dropping malformed request (%s): %r", self.name, why, chain
            )
            return None
        reader = chain.reader()
        rtype, _reserved, sector = reader.read_struct(_HDR)
        writer = chain.writer()
        data_len = wlen - 1  # the status is the last writable byte
        if rtype == VIRTIO_BLK_T_OUT:
            data_len = reader.remaining
        return _Request(chain, queue, rtype, sector, reader, writer, data_len)

    def _submit(self, req: _Request) -> bool:
        """Hand ``req`` to the workers after checking it on the loop thread; False if it is
        already answered by the checks (bad range, read-only...) and completes inline."""
        image = self._image
        if image.fd < 0:
            return False
        rtype = req.rtype
        if rtype == VIRTIO_BLK_T_IN:
            if self._bad_range("read", req.sector, req.data_len):
                return False
            req.views = req.writer.views(req.data_len)
        elif rtype == VIRTIO_BLK_T_OUT:
            if self.read_only or self._bad_range("write", req.sector, req.data_len):
                return False
            req.views = req.reader.views(req.data_len)
        image.refs += 1
        req.image = image
        req.epoch = self._epoch
        self._in_flight += 1
        self._jobs.put(req)
        return True

    def _execute_inline(self, req: _Request) -> None:
        """Execute on the calling (loop) thread: Sync engine, and what Async answers at once."""
        try:
            self._execute(req)
        except OSError as e:
            self._io_failed(req, e)

    def _io_failed(self, req: _Request, e: OSError) -> None:
        self.ratelog.warning(
            ("oserror", req.rtype, e.errno),
            "%s: request type %d at sector %d failed: %s",
            self.name,
            req.rtype,
            req.sector,
            e,
        )
        req.status = VIRTIO_BLK_S_IOERR
        req.done = 0

    def _execute(self, req: _Request) -> None:
        """Carry out ``req``; sets ``req.status`` and ``req.done``.  Raises OSError for host
        I/O errors.  Touches no counters and no ring (it may run on a worker thread)."""
        image = req.image if req.image is not None else self._image
        fd = image.fd
        if fd < 0:
            raise OSError(errno.EBADF, "the disk image was closed")
        rtype = req.rtype
        if rtype == VIRTIO_BLK_T_IN:
            req.status, req.done = self._read(fd, req)
        elif rtype == VIRTIO_BLK_T_OUT:
            req.status = self._write(fd, req)
        elif rtype == VIRTIO_BLK_T_FLUSH:
            # Firecracker performs a FLUSH whatever the cache type (Unsafe merely does not
            # offer the feature, so Linux never sends one).
            os.fdatasync(fd)
        elif rtype == VIRTIO_BLK_T_GET_ID:
            writer = req.writer
            req.done = writer.write(self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[: req.data_len])
        elif rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            req.status = self._zero_ranges(fd, rtype, req.reader)
        else:
            self.ratelog.debug(
                ("unsupp", rtype), "%s: unsupported request type %d", self.name, rtype
            )
            req.status = VIRTIO_BLK_S_UNSUPP

    def _finish(self, req: _Request) -> int:
        """Count the outcome, write the status byte; return ``used.len``.  Under the lock."""
        status = req.status
        m = self.metrics
        if status == VIRTIO_BLK_S_OK:
            rtype = req.rtype
            if rtype == VIRTIO_BLK_T_IN:
                m["read_count"] += 1
                m["read_bytes"] += req.data_len
            elif rtype == VIRTIO_BLK_T_OUT:
                m["write_count"] += 1
                m["write_bytes"] += req.data_len
            elif rtype == VIRTIO_BLK_T_FLUSH:
                m["flush_count"] += 1
            elif rtype == VIRTIO_BLK_T_GET_ID:
                m["get_id_ops"] += 1
            elif rtype == VIRTIO_BLK_T_DISCARD:
                m["discard_ops"] += 1
            elif rtype == VIRTIO_BLK_T_WRITE_ZEROES:
                m["write_zeroes_ops"] += 1
        else:
            # Firecracker counts every IOERR/UNSUPP answer as an invalid request.
            m["invalid_reqs_count"] += 1
            m["io_errors" if status == VIRTIO_BLK_S_IOERR else "unsupported"] += 1
            req.done = 0
        writer = req.writer
        # Step over whatever the data part did not fill (error, short GET_ID) to the last byte.
        pad = req.chain.writable_len - 1 - writer.written
        if pad > 0:
            writer.skip(pad)
        writer.write(_STATUS_BYTE[status])
        return req.done + 1

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

    def _read(self, fd: int, req: _Request) -> tuple[int, int]:
        nbytes = req.data_len
        views = req.views
        if views is None:  # not checked by _submit
            if self._bad_range("read", req.sector, nbytes):
                return VIRTIO_BLK_S_IOERR, 0
            views = req.writer.views(nbytes)
        if nbytes:
            _transfer(os.preadv, fd, views, req.sector << SECTOR_SHIFT, nbytes)
        return VIRTIO_BLK_S_OK, nbytes

    def _write(self, fd: int, req: _Request) -> int:
        if self.read_only:
            return self._read_only_error("write")
        nbytes = req.data_len
        views = req.views
        if views is None:
            if self._bad_range("write", req.sector, nbytes):
                return VIRTIO_BLK_S_IOERR
            views = req.reader.views(nbytes)
        if nbytes:
            _transfer(os.pwritev, fd, views, req.sector << SECTOR_SHIFT, nbytes)
            if self._writethrough:
                os.fdatasync(fd)
        return VIRTIO_BLK_S_OK

    def _read_only_error(self, what: str) -> int:
        self.ratelog.debug(("ro", what), "%s: %s on a read-only disk", self.name, what)
        return VIRTIO_BLK_S_IOERR

    def _zero_ranges(self, fd: int, rtype: int, reader: ChainReader) -> int:
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
                self._zero(fd, sector << SECTOR_SHIFT, num << SECTOR_SHIFT, bool(punch))
        if self._writethrough:
            os.fdatasync(fd)
        return VIRTIO_BLK_S_OK

    def _zero(self, fd: int, offset: int, length: int, punch: bool) -> None:
        """Make ``[offset, offset+length)`` read back as zeroes: punch a hole (``punch``), else
        zero the range in place (ZERO_RANGE keeps the blocks allocated), else write zeroes."""
        for mode in (_PUNCH, _ZERO_RANGE) if punch else (_ZERO_RANGE,):
            if mode in self._unsupported_modes:
                continue
            try:
                fallocate(fd, mode, offset, length)
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
            n = os.pwrite(fd, zeros[: min(len(zeros), end - offset)], offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write while zeroing")
            offset += n

    # -- configuration space (Firecracker's cfg_fails) ------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.config):
            self.metrics["cfg_fails"] += 1
        return super().read_config(offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        # virtio-blk has no writable field we implement (no CONFIG_WCE): every write is one.
        self.metrics["cfg_fails"] += 1
        super().write_config(offset, size, value)


#: Request types that go to the worker threads on the Async engine (the rest is answered on
#: the loop thread: GET_ID copies 20 bytes, unknown types only get a status).
_ASYNC_TYPES = frozenset(
    {
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    }
)
