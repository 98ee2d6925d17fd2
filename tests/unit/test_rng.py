"""virtio-rng through the Linux-like MMIO driver: fills, errors, Firecracker's rate limiter and
its ``entropy`` metric names.  The event loop runs by hand on the real clock (buckets of 100-
200 ms keep every test well under two seconds)."""

from __future__ import annotations

import time

import pytest
from ratelimit_helpers import Spy, bandwidth, ops

from embervm.config import BucketConfig, RateLimitConfig
from embervm.devices.virtio import spec
from embervm.devices.virtio.mmio import MmioTransport
from embervm.devices.virtio.rng import MAX_FILL, Rng
from embervm.eventloop import EventLoop
from embervm.memory import GuestMemory
from embervm.testing.driver import MmioDriver

FC_ENTROPY_METRICS = ("activate_fails", "entropy_event_fails", "entropy_event_count",
                      "entropy_bytes", "host_rng_fails", "entropy_rate_limiter_throttled",
                      "rate_limiter_event_count")




class Counter:
    """A deterministic source: byte i of the stream is i & 0xff; can be told to fail."""

    def __init__(self) -> None:
        self.pos = 0
        self.fail: OSError | None = None

    def __call__(self, n: int) -> bytes:
        if self.fail is not None:
            raise self.fail
        out = bytes((self.pos + i) & 0xFF for i in range(n))
        self.pos += n
        return out


class Guest:
    def __init__(self, **kw) -> None:
        self.loop = EventLoop()
        self.source = Counter()
        self.mem = GuestMemory([(0, 4 << 20)])
        self.dev = Rng(self.source, **kw)
        self.dev.loop = self.loop
        self.delays: list[float] = []
        real = self.loop.call_later

        def call_later(delay, cb):
            self.delays.append(delay)
            return real(delay, cb)

        self.loop.call_later = call_later
        self.transport = MmioTransport(self.dev, self.mem)
        self.drv = MmioDriver(self.transport, self.mem)
        self.drv.probe()
        self.done: list[tuple[int, bytes]] = []

    def request(self, *sizes: int, kick: bool = True) -> None:
        for n in sizes:
            self.drv.submit(0, writable=[n], kick=False)
        if kick:
            self.drv.kick(0)

    def collect(self) -> list[tuple[int, bytes]]:
        for _tok, ln, bufs in self.drv.used(0):
            self.done.append((ln, bytes(bufs[0][:ln]) if bufs else b""))
        return self.done

    def run_until(self, count: int, timeout: float = 5.0) -> float:
        t0 = time.monotonic()
        while len(self.collect()) < count:
            assert time.monotonic() - t0 < timeout, f"{len(self.done)} of {count} requests"
            self.loop.run_once(0.01)
        return time.monotonic() - t0

    def pending_timers(self) -> int:
        return sum(1 for _w, _s, h in self.loop._timers if not h.cancelled)

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def made():
    guests: list[Guest] = []

    def make(**kw) -> Guest:
        g = Guest(**kw)
        guests.append(g)
        return g

    yield make
    for g in guests:
        g.close()


# -- filling --------------------------------------------------------------------------------------


def test_requests_are_filled_from_the_source_and_counted(made):
    g = made()
    g.request(16, 64)
    assert g.collect() == [(16, bytes(range(16))), (64, bytes(range(16, 80)))]
    m = g.dev.metrics
    assert (m["entropy_event_count"], m["entropy_bytes"]) == (2, 80)
    assert all(name in m for name in FC_ENTROPY_METRICS)


def test_a_huge_buffer_gets_at_most_max_fill_bytes(made):
    g = made()
    g.request(MAX_FILL + 4096)
    [(ln, _data)] = g.collect()
    assert ln == MAX_FILL == 64 * 1024
    assert g.dev.metrics["entropy_bytes"] == MAX_FILL


def test_a_request_with_readable_buffers_is_returned_empty(made):
    g = made()
    g.drv.submit(0, readable=[b"hello"], writable=[8])
    g.request(4)
    assert [ln for ln, _ in g.collect()] == [0, 4]
    assert g.dev.metrics["entropy_event_fails"] == 1
    assert g.source.pos == 4  # nothing drawn for the bad request


def test_a_host_source_failure_returns_the_request_empty_and_later_ones_work(made):
    g = made()
    g.source.fail = OSError(5, "Input/output error")
    g.request(32)
    assert g.collect() == [(0, b"")]
    m = g.dev.metrics
    assert (m["host_rng_fails"], m["entropy_event_fails"], m["entropy_bytes"]) == (1, 1, 0)
    g.source.fail = None
    g.request(8)
    assert g.collect()[-1] == (8, bytes(range(8)))
    assert not g.drv.status() & spec.STATUS_DEVICE_NEEDS_RESET


# -- rate limiting --------------------------------------------------------------------------------


def test_ops_bucket_holds_the_request_rate_and_serves_everything_in_order(made):
    g = made(rate_limiter=ops(3, 100))  # 3 requests, then 30/s
    g.request(*([8] * 12))
    t0 = time.monotonic()
    assert len(g.collect()) == 3
    m = g.dev.metrics
    assert m["entropy_rate_limiter_throttled"] == 1 and len(g.delays) == 1
    g.run_until(12)
    assert time.monotonic() - t0 >= 0.2  # 9 more at 30/s
    # Served in ring order: the refused request went back and was taken again.
    assert b"".join(d for _ln, d in g.done) == bytes(range(96))
    assert m["rate_limiter_event_count"] >= 1


def test_bytes_are_charged_for_the_whole_buffer(made):
    g = made(rate_limiter=bandwidth(100, 60_000))
    g.request(64)
    g.request(64)  # 128 > 100: refused until the bucket refills (10 s)
    assert len(g.collect()) == 1
    assert g.dev.metrics["entropy_rate_limiter_throttled"] == 1
    big = MAX_FILL + 4096
    g2 = made(rate_limiter=bandwidth(big + 100, 1_000_000))  # 70 tokens/s
    g2.request(big)  # MAX_FILL bytes served, but the buffer's size is charged
    g2.request(200)  # 100 tokens left, not 4196
    assert [ln for ln, _ in g2.collect()] == [MAX_FILL]


def test_a_request_refused_for_bytes_gives_its_op_back(made):
    cfg = RateLimitConfig(bandwidth=BucketConfig(size=100, refill_time_ms=60_000),
                          ops=BucketConfig(size=2, refill_time_ms=60_000))
    g = made(rate_limiter=cfg)
    g.request(64)  # 1 op, 36 bytes left
    g.request(64)  # refused for bytes: its op given back
    assert len(g.collect()) == 1
    g.dev.update_rate_limiter(bandwidth(100_000, 60_000))  # bytes plentiful, ops kept
    g.run_until(2)  # the refused request takes the 2nd op
    g.request(4)  # no 3rd op
    g.loop.run_once(0.05)
    assert len(g.collect()) == 2


def test_kicks_while_throttled_are_ignored_and_one_timer_is_armed(made):
    g = made(rate_limiter=ops(1, 200))
    g.request(8, 8)
    assert len(g.collect()) == 1
    m = g.dev.metrics
    before = m["rate_limiter_event_count"]
    spy = g.dev.limiter = Spy(g.dev.limiter)
    calls = spy.calls
    for _ in range(3):
        g.request(8)
    assert calls == []  # a kick while throttled does not even ask the limiter
    assert len(g.collect()) == 1
    assert m["rate_limiter_event_count"] == before + 3  # Firecracker counts them here
    assert m["entropy_rate_limiter_throttled"] == 1
    assert len(g.delays) == 1 and 0 < g.delays[0] <= 0.2
    g.run_until(5)


def test_reset_while_throttled_leaves_nothing_pending(made):
    g = made(rate_limiter=ops(1, 60_000))
    g.request(8, 8)
    assert g.dev._throttled and g.pending_timers() == 1
    g.drv.remove()
    assert g.pending_timers() == 0
    assert not g.dev._throttled and not g.dev.limiter.is_blocked()
    pos = g.source.pos
    for _ in range(3):
        g.loop.run_once(0.01)
    assert g.source.pos == pos  # nothing of the old ring is served


def test_update_at_run_time_takes_effect_at_once_and_none_changes_nothing(made):
    g = made(rate_limiter=ops(1, 60_000))
    g.request(8, 8, 8)
    assert len(g.collect()) == 1
    g.dev.update_rate_limiter(None)
    g.loop.run_once(0.02)
    assert len(g.collect()) == 1 and len(g.delays) == 1
    g.dev.update_rate_limiter(ops(100, 100))
    # At once (a retry is armed with no delay), not when the old limiter's timer fires.
    assert len(g.delays) == 2 and g.delays[-1] < 0.005
    g.run_until(3)


def test_a_limiter_can_be_added_to_an_unlimited_device(made):
    g = made()
    g.dev.update_rate_limiter(ops(1, 60_000))
    g.request(8, 8)
    assert len(g.collect()) == 1
