"""virtio-rng, the entropy device (virtio 1.2 §5.4, device ID 4).

One request queue, no device features, no config space.  The driver posts writable buffers;
the device fills them from the host kernel's CSPRNG (``os.getrandom``) and reports the count.

Rate limiting (Firecracker's entropy device): every request costs one operation and as many
bytes as its buffer holds, charged before it is filled.  A refused request is put back on the
ring (``undo_pop``), the queue is throttled and one loop timer is armed for when the limiter
will have the tokens; kicks that arrive meanwhile are ignored (the timer's retry drains the
ring).  A reset cancels the timer, so nothing of an old activation runs later.

Errors: a request with device-readable parts (Linux never sends one) and a failure of the host
source are answered with ``used.len`` 0, the guest's sign that nothing was delivered, and
counted (``entropy_event_fails``, ``host_rng_fails``); a structurally invalid chain or ring
sets DEVICE_NEEDS_RESET (base class).

Metrics: Firecracker's ``entropy`` group names (``entropy_bytes``, ``entropy_event_count``,
``entropy_event_fails``, ``host_rng_fails``, ``entropy_rate_limiter_throttled``,
``rate_limiter_event_count``, ``activate_fails``) next to the base device counters.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...errors import GuestError
from ...ratelimit import RateLimiter, TokenType
from . import spec
from .device import VirtioDevice
from .queue import DescriptorChain, Virtqueue

if TYPE_CHECKING:
    from ...config import RateLimitConfig
    from ...eventloop import TimerHandle

#: Bytes served per request at most (Firecracker's bound too): a chain's length can be inflated
#: by overlapping descriptors, and one fill must not stall the event loop.
MAX_FILL = 64 * 1024
#: Shortest wait before a throttled queue is retried, so that a limiter reporting 0 s (its
#: bucket refills in under a millisecond) cannot spin the loop on zero-delay timers.
MIN_RETRY_SECONDS = 0.001

_OPS = TokenType.OPS
_BYTES = TokenType.BYTES


class Rng(VirtioDevice):
    """A virtio-rng device drawing from ``source(n) -> bytes`` (default ``os.getrandom``),
    limited by ``rate_limiter`` (None: unlimited)."""

    device_type = spec.VIRTIO_ID_RNG
    name = "rng"
    queue_max_sizes = (256,)

    def __init__(
        self,
        source: Callable[[int], bytes] = os.getrandom,
        *,
        rate_limiter: RateLimitConfig | None = None,
    ) -> None:
        super().__init__()
        self._source = source
        self.limiter = RateLimiter(rate_limiter)
        self._throttled = False  # a request was refused; the retry timer is (or will be) armed
        self._retry_timer: TimerHandle | None = None
        self.metrics.update(
            activate_fails=0,
            entropy_event_fails=0,
            entropy_event_count=0,
            entropy_bytes=0,
            host_rng_fails=0,
            entropy_rate_limiter_throttled=0,
            rate_limiter_event_count=0,
        )

    # -- host control ----------------------------------------------------------------------------

    def update_rate_limiter(self, cfg: RateLimitConfig | None) -> None:
        """Replace the limiter's buckets (Firecracker's PATCH semantics: what ``cfg`` leaves
        out stays as it is; None changes nothing).  Loop thread.

        A throttled queue is retried at once, so that a looser limit takes effect now rather
        than when the old limit's timer would have fired.
        """
        if cfg is None:
            return
        with self.lock:
            self.limiter.update(cfg)
            if self._throttled:
                self._cancel_retry()
                self._arm_retry(0.0)

    # -- virtio hooks ----------------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        if self._throttled:
            # The retry timer will drain the ring; a kick changes nothing before then.
            self.metrics["rate_limiter_event_count"] += 1
            return
        self._serve(queue)

    def on_reset(self) -> None:
        self._cancel_retry()
        if self._throttled:
            self._throttled = False
            self.limiter.unblock()

    def set_queue(self, index: int, queue: Virtqueue | None) -> None:
        with self.lock:
            super().set_queue(index, queue)
            # A queue reset takes the refused request with it; a new ring starts unthrottled
            # (the limiter still holds no more tokens than it had).
            self._cancel_retry()
            if self._throttled:
                self._throttled = False
                self.limiter.unblock()

    # -- requests --------------------------------------------------------------------------------

    def _serve(self, queue: Virtqueue) -> None:
        """Fill every available request the limiter allows; the lost-wakeup pattern of
        :meth:`VirtioDevice.drain`, stopping early (kicks left off) when throttled."""
        lim = self.limiter
        try:
            while True:
                queue.disable_notifications()
                while (chain := queue.pop()) is not None:
                    self.metrics["chains"] += 1
                    self.metrics["entropy_event_count"] += 1
                    if chain.readable_len:
                        # §5.4.6.1: request buffers are device-writable only.
                        self.metrics["entropy_event_fails"] += 1
                        self.ratelog.warning("readable", "%s: request %s has device-readable "
                                             "buffers; returned unused", self.name, chain)
                        queue.add_used(chain, 0)
                        continue
                    size = chain.writable_len
                    if not lim.unlimited:
                        if not lim.consume(1, _OPS):
                            self._throttle(queue, chain)
                            return
                        if not lim.consume(size, _BYTES):
                            lim.manual_replenish(1, _OPS)
                            self._throttle(queue, chain)
                            return
                    queue.add_used(chain, self._fill(chain))
                if not queue.enable_notifications():
                    return
        finally:
            if self.active:
                self.signal_used(queue)

    def _fill(self, chain: DescriptorChain) -> int:
        """Write random bytes into ``chain``; the count written (0 if the host source failed)."""
        writer = chain.writer()
        n = min(writer.remaining, MAX_FILL)
        if not n:
            return 0
        try:
            data = self._source(n)
        except OSError as e:
            self.metrics["host_rng_fails"] += 1
            self.metrics["entropy_event_fails"] += 1
            self.ratelog.warning(("source", e.errno), "%s: host entropy source failed: %s; "
                                 "request returned empty", self.name, e)
            return 0
        written = writer.write(data[:n])
        self.metrics["entropy_bytes"] += written
        return written

    # -- throttling ------------------------------------------------------------------------------

    def _throttle(self, queue: Virtqueue, chain: DescriptorChain) -> None:
        queue.undo_pop(chain)  # the driver still owns it; the retry reads it again
        self.metrics["entropy_rate_limiter_throttled"] += 1
        self._throttled = True
        self._arm_retry(self.limiter.wait_time())

    def _arm_retry(self, delay: float) -> None:
        if self._retry_timer is not None:
            return
        if self.loop is None:
            # No loop to wait on (a device driven by hand): the queue stays throttled until
            # update_rate_limiter() or a reset; visible as entropy_rate_limiter_throttled.
            return
        self._retry_timer = self.loop.call_later(max(delay, MIN_RETRY_SECONDS), self._on_retry)

    def _cancel_retry(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None

    def _on_retry(self) -> None:
        with self.lock:
            self._retry_timer = None
            if not self._throttled:
                return
            self._throttled = False
            self.limiter.unblock()
            self.metrics["rate_limiter_event_count"] += 1
            if not self.active or not self.queues or self.queues[0] is None:
                return
            try:
                self._serve(self.queues[0])
            except GuestError as e:  # a broken ring: DEVICE_NEEDS_RESET, as on a kick
                self.fail(f"queue 0: {e}")
