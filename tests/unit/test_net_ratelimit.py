"""virtio-net rate limiters (Firecracker's token buckets) and Firecracker's net metric names.

The socket-pair TAP and the Linux-like driver of ``test_net``; the event loop is run by hand on
the real clock, with buckets of 100-200 ms so that a test takes well under two seconds.
"""

from __future__ import annotations

import time

import pytest
from ratelimit_helpers import Spy, bandwidth, ops
from test_net import Guest, frame, pattern, vhdr

from embervm.config import BucketConfig, RateLimitConfig
from embervm.devices.virtio import spec
from embervm.devices.virtio.net import FC_NET_METRICS, RXQ, TXQ

HDR = 12




def count_timers(g: Guest) -> list[float]:
    """Record the delay of every timer the device arms from now on."""
    delays: list[float] = []
    real = g.loop.call_later

    def call_later(delay, cb):
        delays.append(delay)
        return real(delay, cb)

    g.loop.call_later = call_later
    g.dev.loop = g.loop
    return delays


def run_until(g: Guest, done, timeout: float = 5.0) -> float:
    """Run the loop until ``done()``; the seconds it took."""
    t0 = time.monotonic()
    while not done():
        assert time.monotonic() - t0 < timeout, "timed out"
        g.loop.run_once(0.01)
    return time.monotonic() - t0


def pending_timers(g: Guest) -> int:
    return sum(1 for _w, _s, h in g.loop._timers if not h.cancelled)


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


# -- transmit -------------------------------------------------------------------------------------


def test_tx_ops_bucket_holds_the_frame_rate_and_sends_everything_in_order(made):
    g = made(tx_rate_limiter=ops(5, 100))  # 5 frames, then 50 frames/s
    packets = [vhdr() + frame(pattern(100, i)) for i in range(30)]
    for p in packets:
        g.drv.submit(TXQ, readable=[p], kick=False)
    t0 = time.monotonic()
    g.drv.kick(TXQ)
    sent: list[bytes] = g.tap.received()
    assert len(sent) == 5  # the bucket's worth, then throttled
    m = g.dev.metrics
    assert m["tx_rate_limiter_throttled"] == 1
    assert len(g.drv.used(TXQ)) == 5  # the refused chain went back to the driver's ring

    def all_sent() -> bool:
        sent.extend(g.tap.received())
        elapsed = time.monotonic() - t0
        assert len(sent) <= 5 + 50 * elapsed + 2, f"{len(sent)} frames after {elapsed:.3f} s"
        return len(sent) == 30

    run_until(g, all_sent)
    assert time.monotonic() - t0 >= 0.4  # 25 frames at 50/s
    assert sent == packets
    assert len(g.drv.used(TXQ)) == 25
    assert m["tx_packets_count"] == m["tx_count"] == 30
    assert m["tx_rate_limiter_event_count"] >= 1


def test_tx_without_a_limiter_sends_at_once(made):
    g = made()
    for i in range(30):
        g.drv.submit(TXQ, readable=[vhdr() + frame(pattern(100, i))], kick=False)
    g.drv.kick(TXQ)
    assert len(g.tap.received()) == 30
    assert g.dev.metrics["tx_rate_limiter_throttled"] == 0


def test_tx_bandwidth_is_charged_with_the_virtio_header(made):
    size = HDR + 14 + 100
    g = made(tx_rate_limiter=bandwidth(size, 60_000))  # one such frame per 10 s
    g.send(vhdr() + frame(pattern(100)))
    assert len(g.tap.received()) == 1
    g.send(vhdr() + frame(b"z"))  # 27 bytes more than nothing: refused
    assert g.tap.received() == []
    assert g.dev.metrics["tx_rate_limiter_throttled"] == 1
    assert g.dev.metrics["tx_bytes_count"] == size


def test_tx_kicks_while_throttled_are_counted_and_ignored_with_one_timer(made):
    g = made(tx_rate_limiter=ops(1, 200))
    delays = count_timers(g)
    g.send(vhdr() + frame(pattern(60, 1)))
    g.send(vhdr() + frame(pattern(60, 2)))  # refused: one timer
    m = g.dev.metrics
    assert (m["tx_rate_limiter_throttled"], len(delays)) == (1, 1)
    events = m["tx_queue_event_count"]
    spy = g.dev.tx_limiter = Spy(g.dev.tx_limiter)
    calls = spy.calls
    for i in range(3):
        g.drv.submit(TXQ, readable=[vhdr() + frame(pattern(60, 3 + i))], kick=False)
        g.drv.kick(TXQ)  # the driver kicks anyway
    assert m["tx_queue_event_count"] == events + 3
    assert m["tx_rate_limiter_throttled"] == 4
    assert len(g.tap.received()) == 1 and len(delays) == 1
    assert calls == []  # a kick while throttled does not even ask the limiter
    assert 0 < delays[0] <= 0.2


def test_tx_frame_refused_for_bytes_gives_its_op_back(made):
    size = HDR + 14 + 100
    cfg = RateLimitConfig(bandwidth=BucketConfig(size=size + 50, refill_time_ms=60_000),
                          ops=BucketConfig(size=3, refill_time_ms=60_000))
    g = made(tx_rate_limiter=cfg)
    g.send(vhdr() + frame(pattern(100, 1)))  # 1 op, `size` bytes: 50 bytes left
    g.send(vhdr() + frame(pattern(100, 2)))  # refused for bytes: its op given back
    assert len(g.tap.received()) == 1
    g.dev.update_rate_limiters(tx=bandwidth(100_000, 60_000))  # bytes plentiful, ops kept
    run_until(g, lambda: len(g.tap.received()) == 1)  # the refused frame: the 2nd op
    g.send(vhdr() + frame(pattern(10)))  # the 3rd op
    assert len(g.tap.received()) == 1
    g.send(vhdr() + frame(pattern(10)))  # no 4th
    assert g.tap.received() == []


def test_a_frame_the_full_tap_held_back_is_not_charged_again(made, monkeypatch):
    from embervm.devices.virtio import net as netmod

    g = made(tx_rate_limiter=ops(1, 60_000))
    real_writev = netmod.os.writev
    calls = []

    def writev(fd, bufs):
        calls.append(fd)
        if len(calls) == 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_writev(fd, bufs)

    monkeypatch.setattr(netmod.os, "writev", writev)
    g.send(vhdr() + frame(b"w" * 60))
    assert g.tap.received() == [] and len(calls) == 1
    run_until(g, lambda: len(calls) == 2)
    assert len(g.tap.received()) == 1
    assert g.dev.metrics["tx_rate_limiter_throttled"] == 0


def test_malformed_tx_frames_are_dropped_without_paying(made):
    g = made(tx_rate_limiter=ops(1, 60_000))
    g.send(vhdr() + b"short")
    g.send(vhdr(flags=0x80) + frame(b"bad flags"))
    g.send(vhdr() + frame(b"ok"))
    assert len(g.tap.received()) == 1
    m = g.dev.metrics
    assert m["tx_malformed_frames"] == 2 and m["tx_rate_limiter_throttled"] == 0


# -- receive --------------------------------------------------------------------------------------


def test_rx_ops_bucket_holds_the_frame_in_hand_and_stops_polling_the_tap(made):
    g = made(rx_rate_limiter=ops(2, 200))  # 2 frames, then 10 frames/s
    g.post_rx(16)
    frames = [vhdr() + frame(pattern(80, i)) for i in range(5)]
    for f in frames:
        g.tap.send(f)
    t0 = time.monotonic()
    g.pump(3)
    assert len(g.rx()) == 2
    m = g.dev.metrics
    assert m["rx_rate_limiter_throttled"] == 1
    assert not g.reading  # throttled: the TAP is left alone
    got: list[bytes] = []

    def all_in() -> bool:
        got.extend(data for _ln, data in g.rx())
        return len(got) == 3

    run_until(g, all_in)
    assert time.monotonic() - t0 >= 0.2  # 3 more frames at 10/s
    # The frames arrive whole and in order (num_buffers 1 in each header).
    assert [d[:10] + d[12:] for d in got] == [f[:10] + f[12:] for f in frames[2:]]
    assert m["rx_packets_count"] == m["rx_count"] == 5
    assert m["rx_event_rate_limiter_count"] >= 1


def test_rx_bandwidth_is_charged_once_per_frame_with_the_header(made):
    f = vhdr() + frame(pattern(200))
    g = made(rx_rate_limiter=bandwidth(len(f), 60_000))
    g.tap.send(f)
    g.tap.send(f)
    g.pump(3)  # no buffers yet: nothing read
    g.post_rx(1)
    g.pump(3)
    assert len(g.rx()) == 1
    assert g.dev.metrics["rx_bytes_count"] == len(f)  # header included, as Firecracker counts
    assert g.dev.metrics["rx_bytes"] == len(f) - HDR  # embervm's frame-only count
    g.post_rx(1)
    g.pump(3)
    assert g.rx() == [] and g.dev.metrics["rx_rate_limiter_throttled"] == 1


def test_a_frame_waiting_for_buffers_is_not_charged_twice(made):
    f = vhdr() + frame(pattern(200))
    g = made(rx_rate_limiter=bandwidth(len(f), 60_000))
    g.post_rx(1, size=HDR + 20)  # too small for the frame with MRG_RXBUF: it waits for more
    g.tap.send(f)
    g.pump(3)
    assert g.rx() == [] and g.dev.metrics["no_rx_avail_buffer"] >= 1
    g.post_rx(1)  # the device must have re-armed the kick for this (lost-wakeup rule)
    g.pump(3)
    assert len(g.rx()) == 2  # spread over both buffers, paid for once
    assert g.dev.metrics["rx_rate_limiter_throttled"] == 0


def test_rx_kicks_and_tap_events_while_throttled_are_counted(made):
    g = made(rx_rate_limiter=ops(1, 300))
    delays = count_timers(g)
    g.post_rx(2)
    g.tap.send(vhdr() + frame(b"a" * 60))
    g.tap.send(vhdr() + frame(b"b" * 60))
    g.pump(3)
    m = g.dev.metrics
    assert len(g.rx()) == 1 and m["rx_rate_limiter_throttled"] == 1
    events = m["rx_queue_event_count"]
    g.post_rx(1)
    g.drv.kick(RXQ)
    assert m["rx_queue_event_count"] > events
    assert m["rx_rate_limiter_throttled"] > 1
    assert g.rx() == [] and not g.reading and len(delays) == 1


# -- reset, update --------------------------------------------------------------------------------


def test_reset_while_throttled_leaves_nothing_pending(made):
    g = made(rx_rate_limiter=ops(1, 60_000), tx_rate_limiter=ops(1, 60_000))
    g.post_rx(4)
    g.tap.send(vhdr() + frame(b"a" * 60))
    g.tap.send(vhdr() + frame(b"b" * 60))
    g.pump(3)
    g.send(vhdr() + frame(b"c" * 60))
    g.send(vhdr() + frame(b"d" * 60))  # refused
    assert g.dev._rx_throttled and g.dev._tx_throttled
    assert pending_timers(g) == 2
    g.drv.remove()
    assert pending_timers(g) == 0
    assert not g.dev.rx_limiter.is_blocked() and not g.dev.tx_limiter.is_blocked()
    assert not g.dev._rx_throttled and not g.dev._tx_throttled
    sent = g.tap.received()
    g.pump(3)
    assert g.tap.received() == []  # the refused chain of the old ring is never sent
    assert len(sent) == 1


def test_update_at_run_time_takes_effect_at_once_and_none_changes_nothing(made):
    g = made(tx_rate_limiter=ops(1, 60_000))
    g.send(vhdr() + frame(pattern(60, 0)))
    for i in range(1, 4):
        g.drv.submit(TXQ, readable=[vhdr() + frame(pattern(60, i))], kick=False)
    g.drv.kick(TXQ)
    assert len(g.tap.received()) == 1
    g.dev.update_rate_limiters()  # nothing given: still throttled
    g.dev.update_rate_limiters(rx=ops(1000, 100))  # the other direction only
    deadline = time.monotonic() + 0.3  # past the limiter's 100 ms retry
    while time.monotonic() < deadline:
        g.loop.run_once(0.02)
    assert g.tap.received() == []
    used = g.drv.used(TXQ)
    delays = count_timers(g)
    g.dev.update_rate_limiters(tx=ops(1000, 100))
    # At once (a retry is armed with no delay), not when the old limiter's timer fires.
    assert delays and delays[-1] < 0.005
    run_until(g, lambda: len(used.extend(g.drv.used(TXQ)) or used) == 4)
    assert len(g.tap.received()) == 3


def test_update_can_tighten_a_running_limiter(made):
    g = made()
    g.dev.update_rate_limiters(tx=ops(1, 60_000))
    g.send(vhdr() + frame(b"x" * 60))
    g.send(vhdr() + frame(b"y" * 60))
    assert len(g.tap.received()) == 1
    assert g.dev.metrics["tx_rate_limiter_throttled"] == 1


# -- Firecracker's metric names -------------------------------------------------------------------


def test_firecracker_metric_names_are_all_there_from_the_start(made):
    g = made()
    assert set(FC_NET_METRICS) <= set(g.dev.metrics)
    for name in ("rx_bytes_count", "tx_bytes_count", "rx_packets_count", "tx_packets_count",
                 "rx_rate_limiter_throttled", "tx_rate_limiter_throttled", "rx_fails",
                 "tx_fails", "rx_queue_event_count", "tx_queue_event_count"):
        assert name in FC_NET_METRICS


def test_firecracker_tx_metrics(made):
    g = made(mac="52:54:00:12:34:56")
    own = vhdr() + bytes.fromhex("02aabbccddee") + bytes.fromhex("525400123456") + b"\x08\x00" \
        + pattern(50)
    g.send(own, split=[HDR + 3])  # source MAC split across descriptors
    g.send(vhdr() + frame(pattern(50)))  # test_net's frames come from another MAC
    m = g.dev.metrics
    assert (m["tx_packets_count"], m["tx_count"], m["tx_spoofed_mac_count"]) == (2, 2, 1)
    assert m["tx_bytes_count"] == 2 * (HDR + 64)
    g.tap.peer.close()
    g.send(vhdr() + frame(b"lost"))
    assert m["tap_write_fails"] == 1 and m["tx_packets_count"] == 2


def test_firecracker_rx_fail_and_config_metrics(made):
    g = made()
    g.drv.submit(RXQ, readable=[b"not writable"])  # a receive buffer the device cannot use
    g.tap.send(vhdr() + frame(b"q" * 60))
    g.pump(3)
    m = g.dev.metrics
    assert m["rx_fails"] == 1 and m["rx_packets_count"] == 0
    assert m["rx_tap_event_count"] == 1  # the frame's arrival; then no buffer to put it in
    g.post_rx(1)
    g.pump(3)
    assert m["rx_packets_count"] == 1
    g.transport.write(spec.CONFIG, 1, 0x99)  # the MAC is read-only
    assert m["cfg_fails"] == 1 and g.dev.mac == g.dev.get_config("mac")


def test_a_broken_tx_ring_counts_an_event_failure(made):
    g = made()
    g.drv.submit(TXQ, readable=[vhdr() + frame(b"x" * 60)], kick=False)
    g.mem.write_u16(g.drv.rings[TXQ].driver_addr + 2, 0x8000)
    g.drv.kick(TXQ)
    assert g.dev.metrics["event_fails"] == 1
    assert g.drv.status() & spec.STATUS_DEVICE_NEEDS_RESET
