"""virtio-blk rate limiting, Firecracker's protocol: undo_pop, one retry timer, kicks ignored.

The device is tested against a scripted limiter with the interface of
``embervm.ratelimit.RateLimiter`` (the token-bucket arithmetic is that module's own business):
the test decides how many tokens there are and when the wait is over.
"""

from __future__ import annotations

import os
import time

import pytest
from test_block import DISK_SIZE, Disk, hdr

from embervm.config import BucketConfig, RateLimitConfig
from embervm.devices.virtio.block import VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, Block
from embervm.eventloop import EventLoop

CFG = RateLimitConfig(ops=BucketConfig(size=1, refill_time_ms=100))


class ScriptedLimiter:
    """Tokens the test hands out; refused consumes block it until unblock()."""

    def __init__(self, cfg) -> None:
        self.tokens = {"ops": 0, "bytes": 0}
        self.blocked = False
        self.unblocks = 0
        self.cfg = cfg
        self.wait = 0.05
        self.asked = 0  # consume() calls

    @property
    def unlimited(self) -> bool:
        return self.cfg is None

    def consume(self, n: int, kind: str) -> bool:
        self.asked += 1
        if self.tokens[kind] < n:
            self.blocked = True
            return False
        self.tokens[kind] -= n
        return True

    def manual_replenish(self, n: int, kind: str) -> None:
        self.tokens[kind] += n

    def is_blocked(self) -> bool:
        return self.blocked

    def wait_time(self) -> float:
        return self.wait

    def unblock(self) -> None:
        self.blocked = False
        self.unblocks += 1

    def update(self, cfg) -> None:
        self.cfg = cfg


@pytest.fixture
def limited(monkeypatch):
    """Make Block build a ScriptedLimiter; returns the list of limiters built."""
    built: list[ScriptedLimiter] = []

    def make(self, cfg):
        self._tok_ops, self._tok_bytes = "ops", "bytes"
        lim = ScriptedLimiter(cfg)
        built.append(lim)
        return lim

    monkeypatch.setattr(Block, "_make_limiter", make)
    return built


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(DISK_SIZE))
    return path


class Timers:
    """The device's event loop, with every call_later recorded."""

    def __init__(self) -> None:
        self.loop = EventLoop()
        self.handles: list = []
        real = self.loop.call_later

        def call_later(delay, cb):
            h = real(delay, cb)
            self.handles.append((delay, h))
            return h

        self.loop.call_later = call_later  # type: ignore[method-assign]

    def run_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.loop.run_once(left)


@pytest.fixture
def timers():
    t = Timers()
    yield t
    t.loop.close()


@pytest.fixture
def disk(image, limited, timers):
    d = Disk(image, rate_limiter=CFG)
    d.blk.loop = timers.loop
    d.lim = limited[0]
    yield d
    d.blk.close()


def read(d, sector=0, n=512, kick=True):
    return d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, sector)], writable=[n, 1], kick=kick)


def test_throttled_request_goes_back_on_the_ring_and_one_timer_retries_it(disk, timers):
    d, lim = disk, disk.lim
    lim.tokens.update(ops=2, bytes=1 << 20)
    tokens = [read(d, i, kick=False) for i in range(3)]
    d.drv.kick(0)
    got = d.drv.used(0)
    assert [t for t, _n, _b in got] == tokens[:2]
    assert d.drv.rings[0].outstanding == 1  # the third is still the driver's, on the ring
    assert d.blk.metrics["rate_limiter_throttled_events"] == 1
    assert [delay for delay, _h in timers.handles] == [lim.wait]
    # Kicks while throttled are counted and ignored (the limiter is not even asked); no
    # second timer.
    asked = lim.asked
    d.drv.kick(0)
    d.drv.kick(0)
    assert d.drv.used(0) == []
    assert d.blk.metrics["rate_limiter_throttled_events"] == 3
    assert lim.asked == asked
    assert len(timers.handles) == 1
    lim.tokens["ops"] = 1
    timers.run_for(lim.wait + 0.05)
    assert [t for t, _n, _b in d.drv.used(0)] == tokens[2:]
    assert lim.unblocks == 1
    assert d.blk.metrics["rate_limiter_event_count"] == 1
    assert d.blk.metrics["read_count"] == 3


def test_bytes_refusal_gives_the_op_back_and_flush_costs_no_bytes(disk, timers):
    d, lim = disk, disk.lim
    lim.tokens.update(ops=5, bytes=1024)
    read(d, 0, 4096)
    assert d.drv.used(0) == []
    assert lim.tokens == {"ops": 5, "bytes": 1024}  # nothing consumed
    lim.tokens["bytes"] = 1 << 20
    timers.run_for(lim.wait + 0.05)
    assert len(d.drv.used(0)) == 1
    assert lim.tokens == {"ops": 4, "bytes": (1 << 20) - 4096}
    lim.tokens["bytes"] = 0
    d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_FLUSH)], writable=[16])
    [(_t, length, [status])] = d.drv.used(0)
    assert (length, status[-1]) == (1, 0)
    assert lim.tokens["ops"] == 3


def test_reset_while_throttled_cancels_the_timer_and_leaves_nothing_pending(disk, timers):
    d, lim = disk, disk.lim
    read(d)
    [(_delay, handle)] = timers.handles
    d.drv.remove()
    assert handle.cancelled
    lim.tokens.update(ops=10, bytes=1 << 20)
    timers.run_for(lim.wait + 0.05)
    assert d.blk.metrics["rate_limiter_event_count"] == 0
    assert lim.unblocks == 0
    # After a re-probe the queue is not throttled: the first kick is served.
    d.drv.probe(accept=d.accept)
    read(d)
    assert len(d.drv.used(0)) == 1


def test_update_rate_limiter_retries_a_throttled_queue_at_once(disk, timers):
    d, lim = disk, disk.lim
    read(d)
    [(_delay, first)] = timers.handles
    lim.tokens.update(ops=1, bytes=1 << 20)
    d.blk.update_rate_limiter(RateLimitConfig())
    assert lim.cfg == RateLimitConfig()
    assert first.cancelled
    assert timers.handles[-1][0] == 0.0
    timers.run_for(0.01)
    assert len(d.drv.used(0)) == 1


def test_an_unlimited_drive_never_imports_or_asks_a_limiter(image, limited, timers):
    d = Disk(image)
    try:
        assert limited == []
        read(d)
        assert len(d.drv.used(0)) == 1
        d.blk.update_rate_limiter(CFG)  # PATCH adds one later
        assert len(limited) == 1 and limited[0].cfg is CFG
    finally:
        d.blk.close()


def test_with_the_real_rate_limiter(image, timers):
    pytest.importorskip("embervm.ratelimit")
    cfg = RateLimitConfig(ops=BucketConfig(size=2, refill_time_ms=100))
    d = Disk(image, rate_limiter=cfg)
    d.blk.loop = timers.loop
    try:
        tokens = [read(d, i, kick=False) for i in range(3)]
        d.drv.kick(0)
        assert len(d.drv.used(0)) == 2
        assert d.blk.metrics["rate_limiter_throttled_events"] == 1
        timers.run_for(0.3)
        assert [t for t, _n, _b in d.drv.used(0)] == tokens[2:]
    finally:
        d.blk.close()
