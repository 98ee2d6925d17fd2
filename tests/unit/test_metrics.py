"""embervm.metrics: Firecracker-shaped JSON lines, counter deltas, FIFOs, the periodic timer."""

from __future__ import annotations

import json
import logging
import os
import threading
import time

import pytest

from embervm.eventloop import EventLoop
from embervm.metrics import FC_GROUPS, STORE_METRICS, MetricsWriter


@pytest.fixture(autouse=True)
def _no_fclog_counts():
    """fclog's counters are process-wide: other tests' missed lines must not show here."""
    from embervm import fclog

    saved = dict(fclog.counters)
    fclog.counters.update(dict.fromkeys(saved, 0))
    yield
    fclog.counters.update(saved)


class Source:
    """A collect() callable over a mutable dict of absolute values."""

    def __init__(self, groups=None) -> None:
        self.groups = groups or {}
        self.fail = False

    def __call__(self):
        if self.fail:
            raise RuntimeError("collector bug")
        return self.groups


def lines(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(x) for x in f.read().splitlines()]


def flat(group: dict) -> dict[str, int]:
    out = {}
    for k, v in group.items():
        if isinstance(v, dict):
            out.update({f"{k}.{n}": x for n, x in v.items()})
        else:
            out[k] = v
    return out


def test_counters_are_written_as_increases_and_store_metrics_as_values(tmp_path):
    src = Source({"vcpu": {"exit_io_in": 10, "exit_mmio_read": 3},
                  "latencies_us": {"pause_vm": 1234}})
    w = MetricsWriter(tmp_path / "m", src)
    w.write()
    src.groups["vcpu"]["exit_io_in"] = 25
    w.write()
    w.write()
    w.close()
    first, second, third = lines(tmp_path / "m")
    assert first["vcpu"]["exit_io_in"] == 10 and first["vcpu"]["exit_mmio_read"] == 3
    assert second["vcpu"]["exit_io_in"] == 15 and second["vcpu"]["exit_mmio_read"] == 0
    assert third["vcpu"]["exit_io_in"] == 0
    assert [x["latencies_us"]["pause_vm"] for x in (first, second, third)] == [1234] * 3
    assert "latencies_us.pause_vm" in STORE_METRICS and "vcpu.exit_io_in" not in STORE_METRICS


def test_absent_devices_give_zeros_for_every_firecracker_name(tmp_path):
    w = MetricsWriter(tmp_path / "m", Source())
    w.write()
    w.close()
    (line,) = lines(tmp_path / "m")
    assert abs(line["utc_timestamp_ms"] - time.time() * 1000) < 5000
    assert list(line) == ["utc_timestamp_ms", *FC_GROUPS]  # Firecracker's order
    for group, names in FC_GROUPS.items():
        assert flat(line[group]) == dict.fromkeys(names, 0), group
    assert line["block"]["read_agg"] == {"min_us": 0, "max_us": 0, "sum_us": 0}
    assert not any(k.startswith(("block_", "net_")) for k in line)


def test_per_device_groups_and_their_sums(tmp_path):
    src = Source({"block_rootfs": {"read_count": 3, "write_bytes": 512, "chains": 9},
                  "block_data": {"read_count": 4},
                  "net_eth0": {"tx_count": 2},
                  "uart": {"write_count": 7, "host_rx_bytes": 5},
                  "embervm_only": {"x": 1}})
    w = MetricsWriter(tmp_path / "m", src)
    w.write()
    w.close()
    (line,) = lines(tmp_path / "m")
    assert list(line).index("block_data") < list(line).index("block_rootfs") \
        < list(line).index("block")
    assert line["block_rootfs"]["read_count"] == 3 and line["block_data"]["read_count"] == 4
    assert line["block"]["read_count"] == 7 and line["block"]["write_bytes"] == 512
    assert line["net_eth0"]["tx_count"] == 2 and line["net"]["tx_count"] == 2
    assert set(flat(line["block_data"])) == set(FC_GROUPS["block"])
    # names and groups that are not Firecracker's are left out (its schema allows none)
    assert "chains" not in line["block_rootfs"] and "host_rx_bytes" not in line["uart"]
    assert "embervm_only" not in line
    assert line["uart"]["write_count"] == 7


def test_extra_names_are_written_on_request(tmp_path):
    src = Source({"uart": {"host_rx_bytes": 5}, "embervm_only": {"x": 1}})
    w = MetricsWriter(tmp_path / "m", src, extra=True)
    w.write()
    src.groups["uart"]["host_rx_bytes"] = 8
    w.write()
    w.close()
    a, b = lines(tmp_path / "m")
    assert (a["uart"]["host_rx_bytes"], b["uart"]["host_rx_bytes"]) == (5, 3)
    assert a["embervm_only"] == {"x": 1}


def test_collect_giving_the_sum_is_not_summed_again(tmp_path):
    src = Source({"block_a": {"read_count": 1}, "block": {"read_count": 100}})
    w = MetricsWriter(tmp_path / "m", src)
    w.write()
    w.close()
    assert lines(tmp_path / "m")[0]["block"]["read_count"] == 100


def test_a_counter_that_restarts_counts_from_zero(tmp_path):
    src = Source({"vsock": {"conns_added": 10}})
    w = MetricsWriter(tmp_path / "m", src)
    w.write()
    src.groups["vsock"]["conns_added"] = 4  # the device was re-created
    w.write()
    w.close()
    assert [x["vsock"]["conns_added"] for x in lines(tmp_path / "m")] == [10, 4]


def test_file_is_appended_to(tmp_path):
    path = tmp_path / "m"
    path.write_text('{"old": 1}\n')
    w = MetricsWriter(path, Source())
    w.write()
    w.close()
    assert lines(path)[0] == {"old": 1} and len(lines(path)) == 2


def test_open_errors_raise_oserror(tmp_path):
    with pytest.raises(OSError):
        MetricsWriter(tmp_path / "no" / "such" / "dir", Source())


def test_collector_errors_are_counted_and_logged_not_raised(tmp_path, caplog):
    src = Source({"vmm": {"panic_count": 0}})
    w = MetricsWriter(tmp_path / "m", src)
    src.fail = True
    with caplog.at_level(logging.ERROR, logger="embervm.metrics"):
        w.write()
        w.write()
    assert w.counters["missed_metrics_count"] == 2
    assert sum("Failed to collect metrics" in r.getMessage() for r in caplog.records) == 2
    src.fail = False
    w.write()
    w.close()
    (line,) = lines(tmp_path / "m")
    assert line["logger"]["missed_metrics_count"] == 2


def _open_with_deadline(fn, timeout=5.0):
    """Run fn() on a thread; fail (instead of hanging the suite) if it blocks."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked on a FIFO without a reader"
    return box[0]


def test_fifo_without_reader_neither_blocks_nor_loses_line_integrity(tmp_path):
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    src = Source({"vcpu": {"exit_io_in": 0}})
    w = _open_with_deadline(lambda: MetricsWriter(fifo, src))
    loop = EventLoop()
    w.start_periodic(loop, interval=3600)  # attach the loop (and write line 1)
    for i in range(1, 40):  # ~8 KB lines: the 64 KiB pipe fills up after a few
        src.groups["vcpu"]["exit_io_in"] = i
        _open_with_deadline(lambda: (w.write(), 0)[1])
    missed = w.counters["missed_metrics_count"]
    assert missed > 0
    # a reader appears: what was written is whole lines, and the pending rest follows
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            chunk = os.read(rfd, 1 << 16)
        except BlockingIOError:
            chunk = b""
        data += chunk
        loop.run_once(0.01)  # the writer callback finishes a partial line
        if data.endswith(b"\n") and not chunk:
            break
    got = [json.loads(x) for x in data.splitlines()]
    assert len(got) + missed == 40
    # increases of missed lines were carried: the lines add up to the last absolute value
    assert sum(x["vcpu"]["exit_io_in"] for x in got) <= 39
    src.groups["vcpu"]["exit_io_in"] = 100
    w.write()
    last = json.loads(os.read(rfd, 1 << 16).splitlines()[-1])
    assert sum(x["vcpu"]["exit_io_in"] for x in got) + last["vcpu"]["exit_io_in"] == 100
    w.close()
    os.close(rfd)
    loop.close()


def test_periodic_timer_on_a_stepped_event_loop(tmp_path):
    loop = EventLoop()
    src = Source({"entropy": {"entropy_bytes": 0}})
    w = MetricsWriter(tmp_path / "m", src)
    w.start_periodic(loop, interval=0.05)
    assert len(lines(tmp_path / "m")) == 1  # Firecracker writes at start
    deadline = time.monotonic() + 5
    n = 1
    while len(lines(tmp_path / "m")) < 4 and time.monotonic() < deadline:
        src.groups["entropy"]["entropy_bytes"] = n
        n += 1
        loop.run_once(0.2)
    got = lines(tmp_path / "m")
    assert len(got) == 4
    assert sum(x["entropy"]["entropy_bytes"] for x in got) == src.groups["entropy"]["entropy_bytes"]
    w.close()
    t_end = time.monotonic() + 0.15
    while time.monotonic() < t_end:
        loop.run_once(0.05)
    assert len(lines(tmp_path / "m")) == 4  # closed: the timer is gone
    w.write()  # after close: a no-op, no error
    loop.close()


def test_start_periodic_from_another_thread_runs_on_the_loop(tmp_path):
    loop = EventLoop()
    w = MetricsWriter(tmp_path / "m", Source())
    loop.thread = threading.current_thread()  # as if this thread ran the loop
    t = threading.Thread(target=w.start_periodic, args=(loop, 10.0))
    t.start()
    t.join()
    assert not (tmp_path / "m").read_text()  # posted, not done on the caller's thread
    loop.run_once(1.0)
    assert len(lines(tmp_path / "m")) == 1
    w.close()
    loop.thread = None
    loop.close()


def test_fclog_missed_log_count_is_reported(tmp_path):
    from embervm import fclog

    before = fclog.counters["missed_log_count"]
    fclog.counters["missed_log_count"] = before + 3
    try:
        w = MetricsWriter(tmp_path / "m", Source())
        w.write()
        w.close()
        assert lines(tmp_path / "m")[0]["logger"]["missed_log_count"] == before + 3
    finally:
        fclog.counters["missed_log_count"] = before


def test_a_refused_line_is_counted_and_its_increases_carried(tmp_path, monkeypatch):
    import embervm.metrics as m

    src = Source({"net_eth0": {"rx_count": 5}})
    w = MetricsWriter(tmp_path / "m", src)
    real_write = os.write

    def full_pipe(fd, data):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(m.os, "write", full_pipe)
    w.write()
    monkeypatch.setattr(m.os, "write", real_write)
    assert w.counters["missed_metrics_count"] == 1
    src.groups["net_eth0"]["rx_count"] = 7
    w.write()
    w.close()
    (line,) = lines(tmp_path / "m")
    assert line["net_eth0"]["rx_count"] == 7 and line["net"]["rx_count"] == 7
    assert line["logger"]["missed_metrics_count"] == 1
