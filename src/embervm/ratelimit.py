"""Firecracker's rate limiter: token buckets for bandwidth (bytes) and operations.

A :class:`RateLimiter` holds up to two :class:`TokenBucket` s, ``bandwidth`` and ``ops``, built
from a :class:`~embervm.config.RateLimitConfig`.  The arithmetic is Firecracker's
(``src/vmm/src/rate_limiter/mod.rs``), so a drive or NIC limited here lets through what it
would on Firecracker:

* a bucket holds ``size`` tokens and starts full; it refills at ``size`` per ``refill_time_ms``,
  proportionally to the time elapsed, and only when a request finds too few tokens (passive
  refill).  Time is kept as integer nanoseconds; the refill credits whole tokens and carries
  the unused fraction of time over to the next refill, so no float error accumulates;
* ``one_time_burst`` extra tokens are spent first and never refilled;
* a request larger than ``size`` is an *over-consumption*: it is granted at once, empties the
  bucket, and blocks the limiter for ``ratio * refill_time_ms`` where ``ratio`` is the part of
  the request the bucket did not hold, in bucket sizes;
* a request the bucket cannot serve fails, consumes nothing (except the burst it already
  spent, as on Firecracker) and blocks the limiter for 100 ms (Firecracker's refill timer);
* ``size == 0`` or ``refill_time_ms == 0`` means that bucket does not exist (unlimited).

Protocol for device writers (devices are event-driven; nothing here sleeps or owns a timer)::

    if not limiter.consume(n, TokenType.BYTES):      # refused: nothing was consumed
        queue.undo_pop(chain)                        # put the request back
        if self._retry is None:                      # arm ONE retry timer, not one per kick
            self._retry = loop.call_later(limiter.wait_time(), self._on_retry)
        return                                       # stop processing this queue

    def _on_retry(self):
        self._retry = None
        limiter.unblock()                            # the timer fired: lift the block
        self.process_queue(...)                      # and try the queue again

While blocked (:meth:`RateLimiter.is_blocked`), *every* ``consume`` fails, whatever its token
type, until :meth:`RateLimiter.unblock`; a successful over-consumption also leaves the limiter
blocked, so the next ``consume`` fails and the device arms its retry then.  When a device
charges two buckets for one request (ops then bytes) and the second refuses, it gives the
first back with :meth:`RateLimiter.manual_replenish`.  A retry that fires early or a
``consume`` that fails again is harmless: the device just re-arms with the new
:meth:`RateLimiter.wait_time`; the queue is never left without a pending retry.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .logutil import RateLimitedLog

if TYPE_CHECKING:
    from .config import BucketConfig, RateLimitConfig

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

NS_PER_MS = 1_000_000
#: how long a refused ``consume`` blocks the limiter (Firecracker's REFILL_TIMER_DURATION)
REFILL_TIMER_NS = 100 * NS_PER_MS
_U64_MAX = (1 << 64) - 1


class TokenType(enum.Enum):
    """Which bucket a ``consume`` charges (values: Firecracker's config keys)."""

    BYTES = "bandwidth"
    OPS = "ops"


@dataclass(frozen=True, slots=True)
class BucketReduction:
    """The outcome of :meth:`TokenBucket.reduce`: ``BucketReduction.Success``,
    ``BucketReduction.Failure`` or ``BucketReduction.OverConsumption(ratio)`` (granted, but
    ``ratio`` bucket sizes more than the bucket held)."""

    kind: str
    ratio: float = 0.0

    Success: ClassVar[BucketReduction]
    Failure: ClassVar[BucketReduction]

    @staticmethod
    def OverConsumption(ratio: float) -> BucketReduction:  # noqa: N802 (Firecracker's name)
        return BucketReduction("OverConsumption", ratio)

    @property
    def granted(self) -> bool:
        """True unless the request was refused (Success or OverConsumption)."""
        return self.kind != "Failure"


BucketReduction.Success = BucketReduction("Success")
BucketReduction.Failure = BucketReduction("Failure")


def _ns_clock(clock: Callable[[], float]) -> Callable[[], int]:
    """An integer-nanosecond view of ``clock`` (seconds as a float).  The default clock is read
    with ``time.monotonic_ns`` directly, so real time never goes through a float."""
    if clock is time.monotonic:
        return time.monotonic_ns
    return lambda: round(clock() * 1e9)


class TokenBucket:
    """One bucket of ``size`` tokens refilled every ``refill_time_ms`` (Firecracker's
    ``TokenBucket``).  ``size == 0`` or ``refill_time_ms == 0`` makes an unlimited bucket
    (every ``reduce`` succeeds); :class:`RateLimiter` creates no bucket at all then."""

    __slots__ = ("_size", "_refill_ms", "_initial_burst", "_burst", "_budget", "_last",
                 "_pcap", "_prefill", "_now", "unlimited")

    def __init__(self, size: int, refill_time_ms: int, one_time_burst: int = 0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if size < 0 or refill_time_ms < 0 or one_time_burst < 0:
            raise ValueError("token bucket parameters must not be negative")
        self._now = _ns_clock(clock)
        self._size = size
        self._refill_ms = refill_time_ms
        self._initial_burst = one_time_burst
        self._burst = one_time_burst
        self._budget = size  # starts full
        self._last = self._now()
        refill_ns = refill_time_ms * NS_PER_MS
        # Firecracker disables a bucket whose refill time in ns overflows a u64, too.
        self.unlimited = size == 0 or refill_time_ms == 0 or refill_ns > _U64_MAX
        if self.unlimited:
            self._pcap = self._prefill = 1
        else:
            # tokens = elapsed_ns * size / refill_ns, the fraction reduced by its gcd (exact
            # integers: Python's are unbounded, but the reduced form keeps them small).
            g = _gcd(size, refill_ns)
            self._pcap = size // g
            self._prefill = refill_ns // g

    # -- Firecracker's accessors --------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def refill_time_ms(self) -> int:
        return self._refill_ms

    @property
    def budget(self) -> int:
        """Tokens in the bucket now (the one-time burst not included; no refill is applied)."""
        return self._budget

    @property
    def one_time_burst(self) -> int:
        """What is left of the one-time burst."""
        return self._burst

    @property
    def initial_one_time_burst(self) -> int:
        return self._initial_burst

    # -- arithmetic ---------------------------------------------------------------------------

    def _auto_replenish(self) -> None:
        """Credit the tokens earned since the last update.  A whole refill period (or more)
        fills the bucket; less credits ``elapsed * size / refill`` whole tokens and advances the
        last-update time only by the time those tokens took (rounded up), so the remainder
        counts towards the next token and no fraction of a nanosecond is used twice."""
        now = self._now()
        delta = max(0, now - self._last)
        if delta >= self._refill_ms * NS_PER_MS:
            self._budget = self._size
            self._last = now
            return
        tokens = delta * self._pcap // self._prefill
        adjust = -(-tokens * self._prefill // self._pcap)  # ceil division
        self._last += adjust
        self._budget = min(self._budget + tokens, self._size)

    def reduce(self, tokens: int) -> BucketReduction:
        """Take ``tokens`` from the bucket: the one-time burst first, then the budget (refilled
        only when it is short).  Failure: the budget could not cover it (a burst already spent
        on it stays spent, as on Firecracker).  OverConsumption(ratio): ``tokens`` exceeded
        ``size``; the bucket is emptied and the request granted anyway."""
        if self.unlimited:
            return BucketReduction.Success
        if self._burst > 0:
            if self._burst >= tokens:
                self._burst -= tokens
                self._last = self._now()
                return BucketReduction.Success
            tokens -= self._burst
            self._burst = 0
        if tokens > self._budget:
            self._auto_replenish()
            if tokens > self._size:
                _guest_log.log(logging.ERROR, ("overconsumption", self._size),
                               "Consumed %d tokens from bucket of size %d", tokens, self._size)
                tokens -= self._budget
                self._budget = 0
                return BucketReduction.OverConsumption(tokens / self._size)
            if tokens > self._budget:
                return BucketReduction.Failure
        self._budget -= tokens
        return BucketReduction.Success

    def force_replenish(self, tokens: int) -> None:
        """Give ``tokens`` back (undoing a reduce): to the burst while any burst is left (up to
        its initial size), else to the budget (up to ``size``)."""
        if self._burst > 0:
            self._burst = min(self._burst + tokens, self._initial_burst)
            return
        self._budget = min(self._budget + tokens, self._size)

    def __repr__(self) -> str:
        return (f"TokenBucket(size={self._size}, refill_time_ms={self._refill_ms}, "
                f"budget={self._budget}, one_time_burst={self._burst})")


def _gcd(x: int, y: int) -> int:
    while y:
        x, y = y, x % y
    return x


class RateLimiter:
    """Firecracker's ``RateLimiter``: a bandwidth and an ops bucket, either absent (unlimited),
    and one pending "timer" (a deadline; the device owns the real timer, see the module
    docstring).  ``RateLimiter(None)`` limits nothing."""

    __slots__ = ("_clock", "_now", "bandwidth", "ops", "_blocked", "_deadline")

    def __init__(self, config: RateLimitConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._now = _ns_clock(clock)
        #: the buckets (None: that token type is not limited); read-only for callers
        self.bandwidth: TokenBucket | None = None
        self.ops: TokenBucket | None = None
        self._blocked = False
        self._deadline = 0  # ns on the clock, meaningful while blocked
        if config is not None:
            self.bandwidth = self._bucket(config.bandwidth)
            self.ops = self._bucket(config.ops)

    def _bucket(self, cfg: BucketConfig | None) -> TokenBucket | None:
        """A bucket for ``cfg``, or None when ``cfg`` is absent or disables limiting."""
        if cfg is None:
            return None
        bucket = TokenBucket(cfg.size, cfg.refill_time_ms, cfg.one_time_burst or 0,
                             clock=self._clock)
        return None if bucket.unlimited else bucket

    @property
    def unlimited(self) -> bool:
        """True when there is no bucket at all: ``consume`` never refuses (unless blocked by
        an earlier bucket that an update removed; the device's pending retry lifts that)."""
        return self.bandwidth is None and self.ops is None

    def _block(self, ns: int) -> None:
        self._blocked = True
        self._deadline = self._now() + ns

    def consume(self, tokens: int, kind: TokenType) -> bool:
        """Charge ``tokens`` of ``kind``.  False: refused, nothing consumed, and the limiter is
        blocked (the caller must arm a retry after :meth:`wait_time`).  True: granted; after an
        over-consumption the limiter is blocked for the debt all the same."""
        if self._blocked:
            return False
        bucket = self.bandwidth if kind is TokenType.BYTES else self.ops
        if bucket is None:
            return True
        r = bucket.reduce(tokens)
        if r is BucketReduction.Success:
            return True
        if r is BucketReduction.Failure:
            self._block(REFILL_TIMER_NS)
            return False
        # Over-consumption: the bucket needs ``ratio`` whole refills to pay the debt.
        # Firecracker truncates the delay to whole milliseconds.
        self._block(int(r.ratio * bucket.refill_time_ms) * NS_PER_MS)
        return True

    def manual_replenish(self, tokens: int, kind: TokenType) -> None:
        """Give back ``tokens`` of ``kind`` consumed for a request that was then not done."""
        bucket = self.bandwidth if kind is TokenType.BYTES else self.ops
        if bucket is not None:
            bucket.force_replenish(tokens)

    def is_blocked(self) -> bool:
        """True from a refused ``consume`` (or an over-consumption) until :meth:`unblock`."""
        return self._blocked

    def wait_time(self) -> float:
        """Seconds until the block ends (0.0 when not blocked or already due): the delay the
        device's retry timer should have."""
        if not self._blocked:
            return 0.0
        return max(0, self._deadline - self._now()) / 1e9

    def unblock(self) -> None:
        """The device's retry timer fired: lift the block.  Harmless when not blocked."""
        self._blocked = False

    def update(self, config: RateLimitConfig | None) -> None:
        """Apply a run-time update (PATCH), as Firecracker's ``update_buckets``: ``None``, or a
        bucket left out (None), keeps that bucket and its state; a bucket with ``size`` or
        ``refill_time_ms`` 0 removes it; any other bucket replaces it with a new, full one.
        A pending block stays until the device's retry timer calls :meth:`unblock`."""
        if config is None:
            return
        if config.bandwidth is not None:
            self.bandwidth = self._bucket(config.bandwidth)
        if config.ops is not None:
            self.ops = self._bucket(config.ops)

    def to_config(self) -> RateLimitConfig | None:
        """The configuration of the buckets present (for GET /vm/config), None if none."""
        if self.unlimited:
            return None
        from .config import BucketConfig, RateLimitConfig

        def cfg(b: TokenBucket | None) -> BucketConfig | None:
            if b is None:
                return None
            return BucketConfig(b.size, b.refill_time_ms, b.initial_one_time_burst)

        return RateLimitConfig(bandwidth=cfg(self.bandwidth), ops=cfg(self.ops))

    def __repr__(self) -> str:
        return (f"RateLimiter(bandwidth={self.bandwidth!r}, ops={self.ops!r}, "
                f"blocked={self._blocked})")
