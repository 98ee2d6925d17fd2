"""virtio-balloon, the traditional memory balloon (virtio 1.2 §5.5, device ID 5).

The host asks the guest to give memory back by setting a target balloon size (``num_pages``,
4 KiB pages) in config space and raising a config interrupt.  The Linux driver
(``drivers/virtio/virtio_balloon.c``) then allocates pages and posts their page frame numbers on
the inflate queue, or hands pages back and posts them on the deflate queue, and writes the
balloon's current size to ``actual`` after each batch.

Queues, in Linux's numbering: Linux creates only the queues whose features it negotiated and
numbers them consecutively (``vm_find_vqs`` skips unnamed slots without using an index), so the
spec's queue numbers (inflate 0, deflate 1, stats 2, free_page 3, reporting 4) are not the
transport's indices in general.  :func:`queue_roles` computes the indices from the negotiated
features.  The device offers STATS_VQ always (as QEMU does), so Linux always sets up three
queues; a driver that does not negotiate it gets two.

* inflate / deflate: one readable buffer of ``le32`` PFNs per request (Linux: at most 256).  On
  inflate each valid page is released on the host with ``MADV_DONTNEED``
  (:meth:`GuestMemory.discard`): its host memory is freed and it reads as zero when the guest
  touches it again.  On deflate nothing needs doing: the next guest access faults a fresh page
  in.  Every PFN is checked against guest RAM; PFNs outside it (the MMIO gap, beyond the end)
  are skipped and counted, never an error.  Contiguous PFNs are released with one ``madvise``.
* stats (STATS_VQ): the driver posts one readable buffer of ``{le16 tag; le64 val}`` entries at
  probe and keeps it there.  The device parses it, keeps it, and every ``stats_seconds`` returns
  it (used, length 0) to ask for fresh values; the driver refills it and posts it again.  The
  last values are kept by tag and shown by ``balloon status``.
* DEFLATE_ON_OOM is offered when asked for: Linux then deflates by itself under memory pressure
  and accounts ballooned pages as used memory instead of taking them off ``MemTotal``.

Everything in the queues is guest-controlled: PFN buffers are bounded (:data:`MAX_PFNS`), trailing
bytes, writable descriptors on the inflate/deflate/stats queues and oversized stats buffers are
counted and ignored; a structurally invalid chain (bad address, loop) is a
:class:`~embervm.errors.QueueError` and makes the device set DEVICE_NEEDS_RESET (base class).

Host control (:meth:`Balloon.control_commands`, served by :mod:`embervm.control`):
``balloon set MIB``, ``balloon status``, ``balloon stats SECONDS``.  Firecracker's view:
:meth:`Balloon.fc_stats` is the body of ``GET /balloon/statistics``, and the statistics interval
follows Firecracker's rule (it may change, but not between 0 and non-zero once the device
exists: :meth:`Balloon.set_stats_interval`).

Metrics: Firecracker's ``balloon`` group names (``activate_fails``, ``inflate_count``,
``deflate_count``, ``stats_updates_count``, ``stats_update_fails``, ``event_fails``; the free
page hinting/reporting counters are left out, those features are not offered) next to embervm's
page-level counters (``inflated_pages``, ``bad_pfns``, ...).

Threads: queue work and the stats timer run on the event-loop thread, control commands too;
activation and reset arrive from vCPU threads.  All state is guarded by ``self.lock``; timer
callbacks carry the activation epoch so that one scheduled before a reset does nothing after it.
"""

from __future__ import annotations

import array
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError
from . import spec
from .device import ConfigField, VirtioDevice
from .queue import DescriptorChain, Virtqueue

if TYPE_CHECKING:
    from ...eventloop import TimerHandle

# -- §5.5.3 feature bits (Linux include/uapi/linux/virtio_balloon.h names) ---------------------
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_REPORTING = 5

#: PFNs are always in 4 KiB units, whatever the guest's page size (§5.5.6).
VIRTIO_BALLOON_PFN_SHIFT = 12
BALLOON_PAGE_SIZE = 1 << VIRTIO_BALLOON_PFN_SHIFT
PAGES_PER_MIB = (1 << 20) // BALLOON_PAGE_SIZE

# -- §5.5.6.3 statistics tags and the names ``balloon status`` shows (Firecracker's names) -------
VIRTIO_BALLOON_S_SWAP_IN = 0
VIRTIO_BALLOON_S_SWAP_OUT = 1
VIRTIO_BALLOON_S_MAJFLT = 2
VIRTIO_BALLOON_S_MINFLT = 3
VIRTIO_BALLOON_S_MEMFREE = 4
VIRTIO_BALLOON_S_MEMTOT = 5
VIRTIO_BALLOON_S_AVAIL = 6
VIRTIO_BALLOON_S_CACHES = 7
VIRTIO_BALLOON_S_HTLB_PGALLOC = 8
VIRTIO_BALLOON_S_HTLB_PGFAIL = 9
STAT_NAMES: dict[int, str] = {
    VIRTIO_BALLOON_S_SWAP_IN: "swap_in",
    VIRTIO_BALLOON_S_SWAP_OUT: "swap_out",
    VIRTIO_BALLOON_S_MAJFLT: "major_faults",
    VIRTIO_BALLOON_S_MINFLT: "minor_faults",
    VIRTIO_BALLOON_S_MEMFREE: "free_memory",
    VIRTIO_BALLOON_S_MEMTOT: "total_memory",
    VIRTIO_BALLOON_S_AVAIL: "available_memory",
    VIRTIO_BALLOON_S_CACHES: "disk_caches",
    VIRTIO_BALLOON_S_HTLB_PGALLOC: "hugetlb_allocations",
    VIRTIO_BALLOON_S_HTLB_PGFAIL: "hugetlb_failures",
    # Linux 6.12+ (include/uapi/linux/virtio_balloon.h); Firecracker's BalloonStats names
    10: "oom_kill",
    11: "alloc_stall",
    12: "async_scan",
    13: "direct_scan",
    14: "async_reclaim",
    15: "direct_reclaim",
}
#: Firecracker's message when the statistics interval would change between 0 and non-zero
#: (BalloonError::StatisticsStateChange).
STATS_STATE_CHANGE = "Statistics cannot be enabled/disabled after activation."
#: Firecracker's message for a statistics query with statistics off (StatisticsDisabled).
STATS_DISABLED = "Received stats query when stats are disabled."

#: One statistic: le16 tag, le64 val, packed (10 bytes; §5.5.6.3 ``struct virtio_balloon_stat``).
STAT_SIZE = 10

# -- limits --------------------------------------------------------------------------------------
#: Linux's virtqueues for the balloon need one buffer at a time; 256 entries as Firecracker.
QUEUE_SIZE = 256
#: PFNs handled per inflate/deflate buffer.  Linux sends at most 256
#: (VIRTIO_BALLOON_ARRAY_PFNS_MAX); the bound keeps one hostile buffer from holding the event
#: loop (PFNs beyond it are counted and ignored).
MAX_PFNS = 1 << 14
#: Statistics entries read per buffer: Linux sends at most 16 tags; beyond: counted, ignored.
MAX_STATS = 64
#: Largest target: num_pages is a le32.
MAX_TARGET_PAGES = 0xFFFF_FFFF

# Host byte order of array("I"): the PFN arrays are little-endian (virtio32 with VERSION_1; x86
# guests are little-endian in legacy mode too).
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def queue_roles(features: int) -> tuple[str, ...]:
    """Queue role per transport index, the way Linux numbers them (``init_vqs``).

    Only queues whose feature is negotiated exist, and they are numbered consecutively:
    inflate, deflate, then stats / free_page / reporting when negotiated.
    """
    roles = ["inflate", "deflate"]
    if features >> VIRTIO_BALLOON_F_STATS_VQ & 1:
        roles.append("stats")
    if features >> VIRTIO_BALLOON_F_FREE_PAGE_HINT & 1:
        roles.append("free_page")
    if features >> VIRTIO_BALLOON_F_REPORTING & 1:
        roles.append("reporting")
    return tuple(roles)


def stat_name(tag: int) -> str:
    return STAT_NAMES.get(tag, f"tag_{tag}")


def _parse_uint(word: str, what: str, maximum: int) -> int:
    # int() would also take "+5", " 5" or "5_0"; a control word is plain decimal digits.
    if not word.isascii() or not word.isdigit() or len(word) > 12:
        raise ValueError(f"{what} must be a whole number, got {word!r}")
    value = int(word)
    if value > maximum:
        raise ValueError(f"{what} {value} is too large (at most {maximum})")
    return value


class Balloon(VirtioDevice):
    """A virtio-balloon device with an initial target of ``target_mib`` MiB.

    ``deflate_on_oom`` offers VIRTIO_BALLOON_F_DEFLATE_ON_OOM; ``stats_seconds`` > 0 asks the
    driver for fresh memory statistics that often (0: only the values the driver sends at probe).
    """

    device_type = spec.VIRTIO_ID_BALLOON
    name = "balloon"
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)
    # §5.5.4: num_pages is written by the device, actual by the driver.  Little-endian even for
    # legacy devices (the spec's exception; Linux converts with le32_to_cpu there).
    config_layout = (
        ConfigField("num_pages", 0, "I"),
        ConfigField("actual", 4, "I", writable=True),
    )

    def __init__(
        self, target_mib: int, *, deflate_on_oom: bool = False, stats_seconds: int = 0
    ) -> None:
        if target_mib < 0 or target_mib * PAGES_PER_MIB > MAX_TARGET_PAGES:
            raise ConfigError(f"--balloon {target_mib}: the target must be between 0 and "
                              f"{MAX_TARGET_PAGES // PAGES_PER_MIB} MiB")
        if stats_seconds < 0:
            raise ConfigError("--balloon stats=SECONDS must not be negative")
        self.device_features = spec.bit(VIRTIO_BALLOON_F_STATS_VQ)
        if deflate_on_oom:
            self.device_features |= spec.bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
        super().__init__()
        self.deflate_on_oom = deflate_on_oom
        self.stats_seconds = stats_seconds
        self.set_config("num_pages", target_mib * PAGES_PER_MIB, notify=False)
        #: the last statistics the driver sent, by tag (values as sent: bytes or counts)
        self.stats: dict[int, int] = {}
        #: every known statistic's latest value, by Firecracker's name: like Firecracker's
        #: BalloonStats, a tag keeps its value until the driver sends it again
        self.latest_stats: dict[str, int] = {}
        self.stats_time: float | None = None  # time.monotonic() of the last stats buffer
        #: guest RAM size, learnt at the first activation (bounds ``balloon set``)
        self.guest_bytes: int | None = None
        self._roles: tuple[str, ...] = ()
        self._stats_index: int | None = None
        self._stats_chain: DescriptorChain | None = None
        self._timer: TimerHandle | None = None
        self._epoch = 0  # bumped at every activation and reset
        self.metrics.update({
            "inflated_pages": 0,   # valid PFNs released on the host
            "deflated_pages": 0,   # valid PFNs the guest took back
            "bad_pfns": 0,         # PFNs outside guest RAM (skipped)
            "ignored_pfns": 0,     # PFNs beyond MAX_PFNS in one buffer
            "malformed": 0,        # trailing bytes, writable parts, stats on the wrong queue
            "stats_updates": 0,    # stats buffers received
            "stats_requests": 0,   # stats buffers returned to ask for fresh values
            # Firecracker's names.  activate_fails stays 0: activation here cannot fail (the
            # transport validates the queues before it activates the device).
            "activate_fails": 0,
            # passes over a queue (a kick, or the scan at DRIVER_OK), as Firecracker counts them
            "inflate_count": 0,
            "deflate_count": 0,
            "stats_updates_count": 0,
            "stats_update_fails": 0,   # statistics with a tag Firecracker does not know
            "event_fails": 0,          # queue errors that made the device need a reset
        })

    # -- configuration ------------------------------------------------------------------------

    @property
    def target_pages(self) -> int:
        return int(self.get_config("num_pages"))

    @property
    def actual_pages(self) -> int:
        return int(self.get_config("actual"))

    def set_target_mib(self, mib: int) -> None:
        """Ask the guest for a balloon of ``mib`` MiB (config change + config interrupt).

        ValueError if it is negative, does not fit ``num_pages`` or is not below guest RAM
        (once the guest's memory size is known).
        """
        if mib < 0:
            raise ValueError(f"balloon target {mib} MiB is negative")
        pages = mib * PAGES_PER_MIB
        if pages > MAX_TARGET_PAGES:
            raise ValueError(f"balloon target {mib} MiB does not fit num_pages (le32 pages)")
        with self.lock:
            if self.guest_bytes is not None and mib << 20 >= self.guest_bytes:
                raise ValueError(f"balloon target {mib} MiB must be below the guest memory "
                                 f"({self.guest_bytes >> 20} MiB)")
            # The transport bumps ConfigGeneration and raises a config interrupt (if DRIVER_OK);
            # Linux's virtballoon_changed then inflates or deflates towards the target.
            self.set_config("num_pages", pages)

    def config_written(self, name: str, value: int | bytes) -> None:
        # ``actual``: the driver's report of the balloon size after each batch; nothing to do
        # beyond keeping it (the config image holds it) for ``balloon status``.
        self.ratelog.debug(("actual",), "%s: driver reports %s = %s", self.name, name, value)

    # -- lifecycle ------------------------------------------------------------------------------

    def on_activate(self) -> None:
        assert self.mem is not None
        self.guest_bytes = self.mem.size
        self._epoch += 1
        self._roles = queue_roles(self.acked_features)
        self._stats_index = self._roles.index("stats") if "stats" in self._roles else None
        self._stats_chain = None
        if self._stats_index is not None and self.loop is not None:
            # on_activate runs on a vCPU thread (the DRIVER_OK write): timers belong to the loop.
            epoch = self._epoch
            self.loop.call_soon_threadsafe(lambda: self._start_stats_timer(epoch))

    def on_reset(self) -> None:
        self._epoch += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Drop the held stats buffer without touching guest memory: the driver's rings are gone.
        self._stats_chain = None
        self._roles = ()
        self._stats_index = None

    def reset(self) -> None:
        with self.lock:
            super().reset()
            # §2.4 / virtio.md §2.2: the target survives a reset, the balloon itself does not
            # (Linux deflates completely before it resets the device, a rebooted guest starts
            # with all its memory).
            self.set_config("actual", 0, notify=False)

    def set_queue(self, index: int, queue: Virtqueue | None) -> None:
        with self.lock:
            if index == self._stats_index:
                # QueueReset / QueueReady=0 on the stats queue: the held buffer went with it.
                self._stats_chain = None
            super().set_queue(index, queue)

    # -- queues ---------------------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        role = self._roles[index] if index < len(self._roles) else None
        if role == "inflate":
            self.metrics["inflate_count"] += 1
            self.drain(queue, self._inflate)
        elif role == "deflate":
            self.metrics["deflate_count"] += 1
            self.drain(queue, self._deflate)
        elif role == "stats":
            self.metrics["stats_updates_count"] += 1
            self._receive_stats(queue)
        else:
            # A queue the negotiated features do not create (e.g. index 2 without STATS_VQ):
            # a driver bug.  Leave its buffers alone, as a device without that queue would.
            self.metrics["malformed"] += 1
            self.ratelog.warning(("noqueue", index), "%s: kick on queue %d, which the "
                                 "negotiated features do not define", self.name, index)

    def _read_pfns(self, chain: DescriptorChain, what: str) -> array.array[int]:
        if chain.writable_len:
            self.metrics["malformed"] += 1
            self.ratelog.warning((what, "writable"), "%s: %s buffer has %d writable bytes "
                                 "(ignored)", self.name, what, chain.writable_len)
        reader = chain.reader()
        total = reader.remaining
        if total % 4:
            self.metrics["malformed"] += 1
            self.ratelog.warning((what, "partial"), "%s: %s buffer of %d bytes is not whole "
                                 "le32 PFNs (tail ignored)", self.name, what, total)
        n = total // 4
        if n > MAX_PFNS:
            self.metrics["ignored_pfns"] += n - MAX_PFNS
            self.ratelog.warning((what, "long"), "%s: %s buffer of %d PFNs: only the first %d "
                                 "are used", self.name, what, n, MAX_PFNS)
            n = MAX_PFNS
        pfns = array.array("I")
        pfns.frombytes(reader.read(4 * n))
        if _BIG_ENDIAN_HOST:
            pfns.byteswap()
        return pfns

    def _inflate(self, chain: DescriptorChain) -> int:
        pfns = self._read_pfns(chain, "inflate")
        good, bad = self._apply(pfns, discard=True)
        self.metrics["inflated_pages"] += good
        self._count_bad("inflate", bad)
        return 0

    def _deflate(self, chain: DescriptorChain) -> int:
        # Nothing to do on the host: the pages fault back in (zero-filled) when the guest uses
        # them.  The PFNs are still checked so that a confused driver shows up in the metrics.
        pfns = self._read_pfns(chain, "deflate")
        good, bad = self._apply(pfns, discard=False)
        self.metrics["deflated_pages"] += good
        self._count_bad("deflate", bad)
        return 0

    def _count_bad(self, what: str, bad: int) -> None:
        if bad:
            self.metrics["bad_pfns"] += bad
            self.ratelog.warning((what, "badpfn"), "%s: %d %s PFNs outside guest RAM skipped",
                                 self.name, bad, what)

    def _apply(self, pfns: Sequence[int], *, discard: bool) -> tuple[int, int]:
        """Walk the distinct PFNs as runs of contiguous pages; release the ones inside RAM.

        Returns (pages inside guest RAM, pages outside).  One ``madvise`` per run and region:
        Linux's balloon pages are often contiguous, and a run is checked against each RAM region
        with integer arithmetic, so no per-page Python loop touches memory.
        """
        assert self.mem is not None
        regions = self.mem.regions
        good = 0
        total = 0
        pages = sorted(set(pfns))
        i = 0
        n = len(pages)
        while i < n:  # bounded: every pass consumes at least one PFN
            start = pages[i]
            j = i + 1
            while j < n and pages[j] == start + (j - i):
                j += 1
            count = j - i
            total += count
            lo = start << VIRTIO_BALLOON_PFN_SHIFT
            hi = (start + count) << VIRTIO_BALLOON_PFN_SHIFT
            for r in regions:
                a = max(lo, r.guest_addr)
                b = min(hi, r.end)
                if a < b:
                    good += (b - a) >> VIRTIO_BALLOON_PFN_SHIFT
                    if discard:
                        self.mem.discard(a, b - a)
            i = j
        return good, total - good

    # -- statistics -----------------------------------------------------------------------------

    def _receive_stats(self, queue: Virtqueue) -> None:
        # The lost-wakeup pattern of drain(), but the newest buffer is kept instead of returned.
        while True:
            queue.disable_notifications()
            while (chain := queue.pop()) is not None:  # bounded by the ring size
                self.metrics["chains"] += 1
                if self._stats_chain is not None:
                    # §5.5.6.3: the driver has one buffer in flight; a second one means it did
                    # not wait.  Hand back the older one (as QEMU does) and keep the newest.
                    self.metrics["malformed"] += 1
                    queue.add_used(self._stats_chain, 0)
                self._parse_stats(chain)
                self._stats_chain = chain
            if not queue.enable_notifications():
                break
        self.signal_used(queue)

    def _parse_stats(self, chain: DescriptorChain) -> None:
        if chain.writable_len:
            self.metrics["malformed"] += 1
            self.ratelog.warning(("stats", "writable"), "%s: stats buffer has writable bytes "
                                 "(ignored)", self.name)
        reader = chain.reader()
        total = reader.remaining
        n = total // STAT_SIZE
        if total % STAT_SIZE or n > MAX_STATS:
            self.metrics["malformed"] += 1
            self.ratelog.warning(("stats", "size"), "%s: stats buffer of %d bytes is not whole "
                                 "10-byte entries or has more than %d", self.name, total,
                                 MAX_STATS)
            n = min(n, MAX_STATS)
        data = reader.read(n * STAT_SIZE)
        stats: dict[int, int] = {}
        for k in range(0, len(data), STAT_SIZE):
            stats[int.from_bytes(data[k : k + 2], "little")] = int.from_bytes(
                data[k + 2 : k + STAT_SIZE], "little")
        latest = self.latest_stats
        for tag, value in stats.items():
            name = STAT_NAMES.get(tag)
            if name is None:
                self.metrics["stats_update_fails"] += 1  # Firecracker's count of unknown tags
            else:
                latest[name] = value
        self.stats = stats
        self.stats_time = time.monotonic()
        self.metrics["stats_updates"] += 1

    def request_stats(self) -> bool:
        """Return the held stats buffer so the driver refills it.  False if none is held."""
        with self.lock:
            chain = self._stats_chain
            if not self.active or chain is None or self._stats_index is None:
                return False
            queue = self.queues[self._stats_index]
            if queue is None:
                self._stats_chain = None
                return False
            self._stats_chain = None
            queue.add_used(chain, 0)
            self.metrics["stats_requests"] += 1
            self.signal_used(queue)
            return True

    def set_stats_interval(self, seconds: int) -> None:
        """Change how often fresh statistics are requested.  Loop thread only.

        Firecracker's rule (``update_stats_polling_interval``): the interval may change, but
        statistics cannot be switched on (0 → n) or off (n → 0) once the device exists;
        ValueError with Firecracker's message.  A change asks the driver for fresh values at
        once (the held buffer is returned) and restarts the timer.
        """
        if seconds < 0:
            raise ValueError(f"stats interval {seconds} s is negative")
        with self.lock:
            if seconds == self.stats_seconds:
                return
            if seconds == 0 or self.stats_seconds == 0:
                raise ValueError(STATS_STATE_CHANGE)
            self.stats_seconds = seconds
            self.request_stats()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self.active and self._stats_index is not None:
                self._start_stats_timer(self._epoch)

    def _start_stats_timer(self, epoch: int) -> None:
        with self.lock:
            if epoch != self._epoch or not self.active or self.loop is None:
                return
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self.stats_seconds > 0:
                self._timer = self.loop.call_later(self.stats_seconds,
                                                   lambda: self._stats_tick(epoch))

    def _stats_tick(self, epoch: int) -> None:
        with self.lock:
            if epoch != self._epoch or not self.active:
                return
            self._timer = None
            try:
                self.request_stats()
            except Exception as e:  # a timer must never take the loop down
                self.fail(f"stats request: {e}")
                return
            self._start_stats_timer(epoch)

    def fail(self, reason: str) -> None:
        self.metrics["event_fails"] += 1
        super().fail(reason)

    # -- host control -----------------------------------------------------------------------------

    def fc_stats(self) -> dict[str, int]:
        """The body of Firecracker's ``GET /balloon/statistics`` (swagger ``BalloonStats``):
        target and actual size in pages and MiB, then every statistic the driver has sent under
        Firecracker's names; those it never sent are absent, as in Firecracker.

        ValueError (Firecracker's message) when statistics are off (interval 0).
        """
        with self.lock:
            if self.stats_seconds == 0:
                raise ValueError(STATS_DISABLED)
            target = self.target_pages
            actual = self.actual_pages
            body = {
                "target_pages": target,
                "actual_pages": actual,
                "target_mib": target // PAGES_PER_MIB,
                "actual_mib": actual // PAGES_PER_MIB,
            }
            # Firecracker's field order (tag order) whatever order the driver sent them in.
            for name in STAT_NAMES.values():
                if name in self.latest_stats:
                    body[name] = self.latest_stats[name]
            return body


    def status(self) -> dict[str, Any]:
        """What ``balloon status`` reports (JSON-able)."""
        with self.lock:
            target = self.target_pages
            actual = self.actual_pages
            age = None if self.stats_time is None else round(time.monotonic() - self.stats_time,
                                                             3)
            return {
                "target_mib": target // PAGES_PER_MIB,
                "target_pages": target,
                "actual_mib": actual // PAGES_PER_MIB,
                "actual_pages": actual,
                "deflate_on_oom": self.deflate_on_oom,
                "stats_seconds": self.stats_seconds,
                "stats": {stat_name(t): v for t, v in sorted(self.stats.items())},
                "stats_age_seconds": age,
                "driver_ready": self.active,
            }

    def control_commands(self) -> dict[str, Callable[[list[str]], dict[str, Any]]]:
        """Commands for :class:`embervm.control.ControlServer`: ``balloon ...``."""
        return {"balloon": self._control}

    def _control(self, args: list[str]) -> dict[str, Any]:
        usage = "usage: balloon set MIB | balloon status | balloon stats SECONDS"
        if not args:
            raise ValueError(usage)
        sub, rest = args[0], args[1:]
        if sub == "status" and not rest:
            return self.status()
        if sub == "set" and len(rest) == 1:
            self.set_target_mib(_parse_uint(rest[0], "MIB", MAX_TARGET_PAGES // PAGES_PER_MIB))
            return self.status()
        if sub == "stats" and len(rest) == 1:
            self.set_stats_interval(_parse_uint(rest[0], "SECONDS", 86400))
            return self.status()
        raise ValueError(usage)
