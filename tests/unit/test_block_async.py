"""virtio-blk with io_engine="Async": I/O on worker threads, completion without the event loop.

The backend is made deliberately slow by wrapping ``os.preadv`` in a gate the test opens, so
every test decides exactly when a request's I/O returns.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from test_block import CAPACITY, DISK_SIZE, Disk, hdr

from embervm.devices.virtio import spec
from embervm.devices.virtio.block import (
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from embervm.eventloop import EventLoop

WAIT = 5.0  # generous upper bound for things that happen in milliseconds


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    data = os.urandom(DISK_SIZE)
    path.write_bytes(data)
    return path, data


class SlowDisk:
    """os.preadv that blocks until released; records the offsets it was called for."""

    def __init__(self, monkeypatch) -> None:
        self.real = os.preadv
        self.gate = threading.Event()
        self.calls: list[int] = []
        self.started = threading.Semaphore(0)
        self.fast_offsets: set[int] = set()
        monkeypatch.setattr(os, "preadv", self)

    def __call__(self, fd, views, offset):
        if threading.current_thread().name.startswith("blk-io"):
            self.calls.append(offset)
            self.started.release()
            if offset not in self.fast_offsets:
                assert self.gate.wait(WAIT), "test never released the slow disk"
        return self.real(fd, views, offset)

    def wait_started(self, n: int = 1) -> None:
        for _ in range(n):
            assert self.started.acquire(timeout=WAIT)


@pytest.fixture
def slow(monkeypatch):
    s = SlowDisk(monkeypatch)
    yield s
    s.gate.set()


@pytest.fixture
def loop():
    """An event loop running in its own thread, with a ticking timer to show it is alive."""
    lp = EventLoop()
    ticks = [0]

    def tick() -> None:
        ticks[0] += 1
        lp.call_later(0.005, tick)

    lp.call_later(0, tick)
    t = threading.Thread(target=lp.run, name="test-loop", daemon=True)
    t.start()
    lp.ticks = ticks  # type: ignore[attr-defined]
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join(WAIT)
    lp.close()


@pytest.fixture
def disks():
    opened: list[Disk] = []

    def make(path, loop=None, **kw) -> Disk:
        d = Disk(path, io_engine="Async", **kw)
        d.blk.loop = loop
        opened.append(d)
        return d

    yield make
    for d in opened:
        d.blk.close()


def wait_used(d: Disk, n: int = 1) -> list:
    """Poll the used ring (as a guest would after an interrupt) until ``n`` elements came."""
    got: list = []
    deadline = time.monotonic() + WAIT
    while len(got) < n:
        got += d.drv.used(0)
        assert time.monotonic() < deadline, f"only {len(got)} of {n} requests completed"
        time.sleep(0.001)
    return got


def test_async_reads_and_writes_round_trip(image, disks):
    path, original = image
    d = disks(path)
    d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_OUT, 4), b"\x5a" * 1024], writable=[1])
    [(_t, length, [status])] = wait_used(d)
    assert (length, status) == (1, b"\0")
    d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, 3)], writable=[2048, 1])
    [(_t, length, [data, status])] = wait_used(d)
    assert (length, status) == (2049, b"\0")
    assert data == original[3 * 512 : 4 * 512] + b"\x5a" * 1024 + original[6 * 512 : 7 * 512]
    assert d.blk.in_flight == 0
    assert (d.blk.metrics["read_count"], d.blk.metrics["write_count"]) == (1, 1)
    assert any(t.name.startswith("blk-io") for t in threading.enumerate())


def test_a_slow_disk_does_not_hold_up_the_loop_or_the_kick(image, disks, slow, loop):
    d = disks(image[0], loop=loop)
    irqs = d.transport.interrupt.count
    t0 = time.monotonic()
    d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, 0)], writable=[512, 1])
    assert time.monotonic() - t0 < 0.5  # the kick returned while the read is stuck
    slow.wait_started()
    assert d.blk.in_flight == 1
    assert d.drv.used(0) == []
    ticks = loop.ticks[0]
    # The loop keeps running its other callbacks, and the device lock is free for register
    # accesses (a vCPU thread) while the I/O is pending.
    deadline = time.monotonic() + WAIT
    while loop.ticks[0] < ticks + 5:
        assert time.monotonic() < deadline, "the event loop stalled behind the disk"
        time.sleep(0.005)
    assert d.blk.lock.acquire(timeout=0.5)
    d.blk.lock.release()
    slow.gate.set()
    [(_t, length, _bufs)] = wait_used(d)
    assert length == 513
    assert d.transport.interrupt.count > irqs  # the worker raised the interrupt itself
    assert d.blk.in_flight == 0


def test_completion_needs_no_event_loop(image, disks, slow):
    # No loop at all: the worker alone publishes the used element and interrupts.
    d = disks(image[0], loop=None)
    d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, 0)], writable=[512, 1])
    slow.wait_started()
    slow.gate.set()
    assert wait_used(d)[0][1] == 513


def test_requests_complete_out_of_order(image, disks, slow):
    path, original = image
    d = disks(path)
    slow.fast_offsets.add(8 * 512)
    first = d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, 0)], writable=[512, 1])
    second = d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, 8)], writable=[512, 1])
    slow.wait_started(2)
    [(token, _len, [data, _st])] = wait_used(d)
    assert token == second and data == original[8 * 512 : 9 * 512]
    slow.gate.set()
    [(token, _len, [data, _st])] = wait_used(d)
    assert token == first and data == original[:512]


def test_quiesce_waits_for_requests_in_flight(image, disks, slow):
    d = disks(image[0])
    assert d.blk.quiesce(0.01)  # nothing in flight
    d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, 0)], writable=[512, 1])
    slow.wait_started()
    t0 = time.monotonic()
    assert not d.blk.quiesce(0.1)
    assert time.monotonic() - t0 >= 0.09
    threading.Timer(0.05, slow.gate.set).start()
    t0 = time.monotonic()
    assert d.blk.quiesce(WAIT)
    assert time.monotonic() - t0 < 1.0  # woken by the completion, not by the timeout
    assert d.blk.in_flight == 0


def test_reset_with_requests_in_flight_does_not_hang_or_touch_the_rings(image, disks, slow):
    d = disks(image[0])
    # More requests than workers: some are running (stuck in preadv), some still queued.
    for i in range(5):
        d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, i)], writable=[512, 1])
    slow.wait_started(3)
    assert d.blk.in_flight == 5
    ring = d.drv.rings[0]
    used_addr = ring.device_addr
    t0 = time.monotonic()
    d.drv.wr(spec.STATUS, 0)  # driver reset, on a "vCPU" thread
    assert time.monotonic() - t0 < 0.5
    status_bytes = [d.mem.read(buf_addr, 1) for buf_addr in _status_addresses(ring)]
    slow.gate.set()
    assert d.blk.quiesce(WAIT)
    # Nothing was published after the reset: used.idx still 0, status bytes untouched.
    assert d.mem.read_u16(used_addr + 2) == 0
    assert [d.mem.read(a, 1) for a in _status_addresses(ring)] == status_bytes
    # The queued requests never did their I/O.
    assert len(slow.calls) == 3
    # And the device works again after a re-probe.
    d.drv.remove()
    d.drv.probe(accept=d.accept)
    slow.fast_offsets.add(0)
    d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, 0)], writable=[512, 1])
    assert wait_used(d)[0][1] == 513


def _status_addresses(ring) -> list[int]:
    """Guest addresses of the status byte of every outstanding request of a split ring."""
    out = []
    for req in ring._out.values():
        addr, n, _w = req.bufs[-1]
        out.append(addr + n - 1)
    return out


def test_in_flight_is_bounded_and_the_rest_waits_on_the_ring(image, disks, slow, loop):
    d = disks(image[0], loop=loop)
    d.blk.max_in_flight = 2
    tokens = [
        d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, i)], writable=[512, 1], kick=False)
        for i in range(4)
    ]
    d.drv.kick(0)
    slow.wait_started(2)
    assert d.blk.in_flight == 2
    assert d.blk.metrics["io_engine_throttled_events"] >= 1
    assert d.drv.rings[0].outstanding == 4
    slow.gate.set()
    got = wait_used(d, 4)
    assert sorted(t for t, _n, _b in got) == sorted(tokens)
    assert all(n == 513 for _t, n, _b in got)


def test_flush_runs_on_a_worker(image, disks, monkeypatch):
    threads: list[str] = []
    real = os.fdatasync
    monkeypatch.setattr(
        os, "fdatasync", lambda fd: (threads.append(threading.current_thread().name), real(fd))
    )
    d = disks(image[0])
    d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_FLUSH)], writable=[1])
    [(_t, length, [status])] = wait_used(d)
    assert (length, status) == (1, b"\0")
    assert len(threads) == 1 and threads[0].startswith("blk-io")


def test_update_path_waits_for_requests_in_flight(image, disks, slow, tmp_path):
    path, original = image
    d = disks(path)
    new = tmp_path / "new.img"
    new.write_bytes(b"\x33" * (2 * DISK_SIZE))
    d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, 0)], writable=[512, 1])
    slow.wait_started()
    gen = d.drv.config_generation()
    d.blk.update_path(new)
    # Not yet swapped: the read in flight still uses the old image, capacity unchanged.
    assert d.drv.read_config(0, 8) == CAPACITY
    # A request arriving now waits for the swap.
    slow.fast_offsets.add(0)
    d.drv.submit(0, readable=[hdr(VIRTIO_BLK_T_IN, 0)], writable=[512, 1])
    slow.gate.set()
    got = wait_used(d, 2)
    assert [b[0] for _t, _n, b in got] == [original[:512], b"\x33" * 512]
    assert d.drv.read_config(0, 8) == 2 * CAPACITY
    assert d.drv.config_generation() != gen
    assert d.blk.metrics["update_count"] == 1
