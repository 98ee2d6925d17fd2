"""Firecracker-style metrics: one JSON line per flush, to a file or a named pipe.

The line has Firecracker's shape (``src/vmm/src/logger/metrics.rs``), so tools written for
Firecracker (its test suite's schema in ``tests/host_tools/fcmetrics.py`` included) read it::

    {"utc_timestamp_ms": 1700000000000, "api_server": {"process_startup_time_us": 0, ...},
     "balloon": {...}, "block_rootfs": {...}, "block": {...}, ..., "net_eth0": {...},
     "net": {...}, ..., "vsock": {...}, "entropy": {...}, ...}

Every group and name of :data:`FC_GROUPS` is written, 0 when nothing counts it (an absent
device), as Firecracker does.  ``block_<drive_id>`` and ``net_<iface_id>`` are written for each
drive / interface that ``collect`` reports, with the names of ``block`` / ``net``; ``block`` and
``net`` are then their sums (computed here when ``collect`` does not give them).  A latency
aggregate (``read_agg``, ``exit_io_in_agg``, ...) is a nested object; its names are written
dotted here: ``"read_agg.min_us"`` in :data:`FC_GROUPS` and in a device's ``metrics`` dict
becomes ``{"read_agg": {"min_us": ...}}`` in the line.

Where the numbers come from: ``collect()`` returns ``{group: {name: value}}`` with *absolute*
values (counters since start).  Devices keep their counters in their ``metrics`` dict under the
names below (e.g. a virtio-blk device's ``metrics["read_bytes"]``); :meth:`Machine.metrics
<embervm.machine.Machine.metrics>` gathers them into groups.

Two kinds of metric, as Firecracker's:

* counters (``SharedIncMetric``): written as the increase since the last successful write;
* "store" metrics (``SharedStoreMetric``: start-up times, latencies, min/max of aggregates,
  ``vmm.panic_count``, most signals): written as their current value.  :data:`STORE_METRICS`
  lists them as ``"group.name"`` (per-device groups use their base group's entries).

Names that are not Firecracker's are left out unless ``MetricsWriter(..., extra=True)``:
Firecracker's schema allows no other property.  The writer's own counter
``logger.missed_metrics_count`` (lines that could not be written) and, when
:mod:`embervm.fclog` is in use, ``logger.missed_log_count`` are added to the ``logger`` group.

The destination is opened as Firecracker opens it (read-write, non-blocking, created if
missing), but appending: a FIFO without a reader neither blocks the open nor a write.  When the
pipe is full the line is not written (``missed_metrics_count``; the counters' increases are
kept for the next line, so nothing is lost); a line written in part is finished, before any
other, when the pipe drains.  Nothing here raises into the event loop: errors are counted and
logged (rate limited).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from .logutil import RateLimitedLog

log = logging.getLogger(__name__)


def _agg(name: str) -> tuple[str, ...]:
    """The three fields of a latency aggregate (Firecracker's LatencyAggregateMetrics)."""
    return (f"{name}.min_us", f"{name}.max_us", f"{name}.sum_us")


_BLOCK = (
    "activate_fails", "cfg_fails", "no_avail_buffer", "event_fails", "execute_fails",
    "invalid_reqs_count", "flush_count", "queue_event_count", "rate_limiter_event_count",
    "update_count", "update_fails", "read_bytes", "write_bytes", "read_count", "write_count",
    "rate_limiter_throttled_events", "io_engine_throttled_events", "remaining_reqs_count",
    *_agg("read_agg"), *_agg("write_agg"),
)
_NET = (
    "activate_fails", "cfg_fails", "mac_address_updates", "no_rx_avail_buffer",
    "no_tx_avail_buffer", "event_fails", "rx_queue_event_count", "rx_event_rate_limiter_count",
    "rx_rate_limiter_throttled", "rx_tap_event_count", "rx_bytes_count", "rx_packets_count",
    "rx_fails", "rx_count", "tap_read_fails", "tap_write_fails", *_agg("tap_write_agg"),
    "tx_bytes_count", "tx_malformed_frames", "tx_fails", "tx_count", "tx_packets_count",
    "tx_queue_event_count", "tx_rate_limiter_event_count", "tx_rate_limiter_throttled",
    "tx_spoofed_mac_count", "tx_remaining_reqs_count",
)

#: Firecracker v1.16.1's metric groups (x86_64) and names, in the order Firecracker writes them.
#: ``block`` and ``net`` also name the fields of every ``block_<drive_id>`` / ``net_<iface_id>``.
FC_GROUPS: dict[str, tuple[str, ...]] = {
    "api_server": ("process_startup_time_us", "process_startup_time_cpu_us"),
    "balloon": (
        "activate_fails", "inflate_count", "stats_updates_count", "stats_update_fails",
        "deflate_count", "event_fails", "free_page_report_count", "free_page_report_freed",
        "free_page_report_fails", "free_page_hint_count", "free_page_hint_freed",
        "free_page_hint_fails",
    ),
    "block": _BLOCK,
    "deprecated_api": ("deprecated_http_api_calls",),
    "get_api_requests": (
        "instance_info_count", "machine_cfg_count", "mmds_count", "vmm_version_count",
        "hotplug_memory_count",
    ),
    "i8042": ("error_count", "missed_read_count", "missed_write_count", "read_count",
              "reset_count", "write_count"),
    "uart": ("error_count", "flush_count", "missed_read_count", "missed_write_count",
             "read_count", "write_count", "rate_limiter_dropped_bytes"),
    "latencies_us": (
        "full_create_snapshot", "diff_create_snapshot", "load_snapshot", "pause_vm", "resume_vm",
        "vmm_full_create_snapshot", "vmm_diff_create_snapshot", "vmm_load_snapshot",
        "vmm_pause_vm", "vmm_resume_vm",
    ),
    "logger": ("missed_metrics_count", "metrics_fails", "missed_log_count",
               "rate_limited_log_count"),
    "mmds": (
        "rx_accepted", "rx_accepted_err", "rx_accepted_unusual", "rx_bad_eth",
        "rx_invalid_token", "rx_no_token", "rx_count", "tx_bytes", "tx_count", "tx_errors",
        "tx_frames", "connections_created", "connections_destroyed",
    ),
    "net": _NET,
    "patch_api_requests": (
        "drive_count", "drive_fails", "network_count", "network_fails", "machine_cfg_count",
        "machine_cfg_fails", "mmds_count", "mmds_fails", "hotplug_memory_count",
        "hotplug_memory_fails", "pmem_count", "pmem_fails",
    ),
    "put_api_requests": (
        "actions_count", "actions_fails", "boot_source_count", "boot_source_fails",
        "drive_count", "drive_fails", "logger_count", "logger_fails", "machine_cfg_count",
        "machine_cfg_fails", "cpu_cfg_count", "cpu_cfg_fails", "metrics_count", "metrics_fails",
        "network_count", "network_fails", "mmds_count", "mmds_fails", "vsock_count",
        "vsock_fails", "pmem_count", "pmem_fails", "serial_count", "serial_fails",
        "hotplug_memory_count", "hotplug_memory_fails",
    ),
    "seccomp": ("num_faults",),
    "vcpu": (
        "exit_io_in", "exit_io_out", "exit_mmio_read", "exit_mmio_write", "failures",
        "kvmclock_ctrl_fails", *_agg("exit_io_in_agg"), *_agg("exit_io_out_agg"),
        *_agg("exit_mmio_read_agg"), *_agg("exit_mmio_write_agg"),
    ),
    "vmm": ("panic_count",),
    "signals": ("sigbus", "sigsegv", "sigxfsz", "sigxcpu", "sigpipe", "sighup", "sigill"),
    "vsock": (
        "activate_fails", "cfg_fails", "rx_queue_event_fails", "tx_queue_event_fails",
        "ev_queue_event_fails", "muxer_event_fails", "conn_event_fails", "rx_queue_event_count",
        "tx_queue_event_count", "rx_bytes_count", "tx_bytes_count", "rx_packets_count",
        "tx_packets_count", "conns_added", "conns_killed", "conns_removed", "killq_resync",
        "tx_flush_fails", "tx_write_fails", "rx_read_fails",
    ),
    "entropy": (
        "activate_fails", "entropy_event_fails", "entropy_event_count", "entropy_bytes",
        "host_rng_fails", "entropy_rate_limiter_throttled", "rate_limiter_event_count",
    ),
    "pmem": ("activate_fails", "cfg_fails", "event_fails", "queue_event_count",
             "rate_limiter_throttled_events", "rate_limiter_event_count"),
    "interrupts": ("triggers", "config_updates"),
    "memory_hotplug": (
        "activate_fails", "queue_event_fails", "queue_event_count", "plug_count", "plug_bytes",
        "plug_fails", *_agg("plug_agg"), "unplug_count", "unplug_bytes", "unplug_fails",
        "unplug_discard_fails", *_agg("unplug_agg"), "state_count", "state_fails",
        *_agg("state_agg"), "unplug_all_count", "unplug_all_fails", *_agg("unplug_all_agg"),
    ),
}

#: groups written once per device (``block_<drive_id>``), followed by their sum (``block``)
PER_DEVICE_GROUPS = ("block", "net")

#: Firecracker's SharedStoreMetric fields ("group.name"): written as values, not increases
STORE_METRICS: frozenset[str] = frozenset(
    [f"api_server.{n}" for n in FC_GROUPS["api_server"]]
    + [f"latencies_us.{n}" for n in FC_GROUPS["latencies_us"]]
    + ["seccomp.num_faults", "vmm.panic_count"]
    + [f"signals.{n}" for n in FC_GROUPS["signals"] if n != "sigpipe"]
    + [f"{g}.{n}" for g, names in FC_GROUPS.items() for n in names
       if n.endswith((".min_us", ".max_us"))]
)


def base_group(group: str) -> str:
    """``block_rootfs`` -> ``block``, ``net_eth0`` -> ``net``; any other group is its own."""
    for g in PER_DEVICE_GROUPS:
        if group.startswith(g + "_"):
            return g
    return group


def group_names(group: str) -> tuple[str, ...]:
    """Firecracker's names for ``group`` (a per-device group has its base group's)."""
    return FC_GROUPS.get(base_group(group), ())


def _nest(flat: dict[str, int]) -> dict[str, Any]:
    """``{"read_agg.min_us": 1}`` -> ``{"read_agg": {"min_us": 1}}`` (order kept)."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        head, dot, tail = name.partition(".")
        if dot:
            out.setdefault(head, {})[tail] = value
        else:
            out[name] = value
    return out


#: the RDWR open of a FIFO never waits for a reader (Linux), O_NONBLOCK makes writes fail
#: with EAGAIN instead of blocking when the pipe is full
_OPEN_FLAGS = os.O_RDWR | os.O_NONBLOCK | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


class MetricsWriter:
    """Writes ``collect()`` as one Firecracker metrics line per :meth:`write` to ``path``.

    ``store_metrics``: the "group.name" fields written as values (default: Firecracker's);
    every other field is a counter written as its increase since the last line written.
    ``extra``: also write groups and names that are not Firecracker's (off by default, so the
    line validates against Firecracker's schema).  Opening ``path`` raises ``OSError``."""

    def __init__(self, path: str | os.PathLike[str],
                 collect: Callable[[], dict[str, dict[str, int]]], *,
                 store_metrics: frozenset[str] = STORE_METRICS, extra: bool = False) -> None:
        self.path = os.fspath(path)
        self._collect = collect
        self._store = store_metrics
        self._extra = extra
        self._fd: int | None = os.open(self.path, _OPEN_FLAGS, 0o666)
        #: (group, name) -> the absolute value of the last line written
        self._prev: dict[tuple[str, str], int] = {}
        #: the writer's own counters (absolute), merged into the ``logger`` group
        self.counters = {"missed_metrics_count": 0}
        self._pending = b""  # the rest of a line the pipe took only part of
        self._loop: Any = None
        self._timer: Any = None
        self._interval = 0.0
        self._next = 0.0
        self._watching = False
        self._errlog = RateLimitedLog(log)

    # -- the line --------------------------------------------------------------------------

    def _gather(self) -> dict[str, dict[str, int]]:
        """collect() plus what this module and fclog count, and block/net sums if missing."""
        groups = {g: dict(v) for g, v in self._collect().items()}
        logger = groups.setdefault("logger", {})
        for name, value in self.counters.items():
            logger[name] = logger.get(name, 0) + value
        fclog = sys.modules.get("embervm.fclog")
        if fclog is not None:
            for name, value in fclog.counters.items():
                logger[name] = logger.get(name, 0) + value
        for base in PER_DEVICE_GROUPS:
            if base in groups:
                continue
            total: dict[str, int] = {}
            for g, values in groups.items():
                if base_group(g) == base and g != base:
                    for name, v in values.items():
                        total[name] = total.get(name, 0) + v
            groups[base] = total
        return groups

    def _render(self) -> tuple[bytes, dict[tuple[str, str], int]]:
        """The line, and the absolute values it reports (committed once the line is out)."""
        groups = self._gather()
        line: dict[str, Any] = {"utc_timestamp_ms": time.time_ns() // 1_000_000}
        seen: dict[tuple[str, str], int] = {}

        def fields(group: str, values: dict[str, int]) -> dict[str, Any]:
            base = base_group(group)
            names = list(group_names(group))
            if self._extra:
                names += [n for n in values if n not in names]
            flat: dict[str, int] = {}
            for name in names:
                cur = int(values.get(name, 0))
                if f"{base}.{name}" in self._store:
                    flat[name] = cur
                    continue
                prev = self._prev.get((group, name), 0)
                # a counter that went down was restarted (a device re-created): count from 0
                flat[name] = cur - prev if cur >= prev else cur
                seen[(group, name)] = cur
            return _nest(flat)

        for group in FC_GROUPS:
            if group in PER_DEVICE_GROUPS:
                for g in sorted(g for g in groups if g != group and base_group(g) == group):
                    line[g] = fields(g, groups[g])
            line[group] = fields(group, groups.get(group, {}))
        if self._extra:
            for g in groups:
                if g not in line:
                    line[g] = fields(g, groups[g])
        data = json.dumps(line, separators=(",", ":")).encode() + b"\n"
        return data, seen

    def write(self) -> None:
        """Write one line now (the counters' increases since the last line written).  Never
        raises: a line that cannot be written is counted in ``logger.missed_metrics_count``
        and the error logged (rate limited); its increases go into the next line."""
        if self._fd is None:
            return
        try:
            data, seen = self._render()
        except Exception as e:  # a collector's bug must not stop the VMM
            self._missed(("collect", type(e).__name__), "Failed to collect metrics: %r", e)
            return
        try:
            if self._pending:
                self._flush_pending()
                if self._pending:  # the reader is still behind: keep the order, skip a line
                    self._missed(("busy",), "Failed to write metrics: %s",
                                 "the metrics pipe is full")
                    return
            n = os.write(self._fd, data)
        except BlockingIOError:
            self._missed(("busy",), "Failed to write metrics: %s", "the metrics pipe is full")
            return
        except OSError as e:
            self._pending = b""  # a hard error: the partial line cannot be finished
            self._missed(("oserror", e.errno), "Failed to write metrics: %s", e)
            return
        self._prev.update(seen)
        if n < len(data):
            self._pending = data[n:]
            self._watch()

    def _missed(self, cause: tuple, msg: str, *args: object) -> None:
        self.counters["missed_metrics_count"] += 1
        self._errlog.log(logging.ERROR, cause, msg, *args)

    def _flush_pending(self) -> None:
        """Write what is left of a partly written line (EAGAIN: keep it for later)."""
        try:
            n = os.write(self._fd, self._pending)
        except BlockingIOError:
            return
        self._pending = self._pending[n:]

    def _watch(self) -> None:
        """Finish a partial line as soon as the pipe drains (when a loop is known)."""
        if self._loop is not None and not self._watching and self._fd is not None:
            self._watching = True
            self._loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            self._flush_pending()
        except OSError as e:
            self._pending = b""
            self._missed(("oserror", e.errno), "Failed to write metrics: %s", e)
        if not self._pending and self._watching:
            self._watching = False
            self._loop.remove_writer(self._fd)

    # -- periodic flushing ------------------------------------------------------------------

    def start_periodic(self, loop: Any, interval: float = 60.0) -> None:
        """Write a line now and then every ``interval`` seconds on ``loop``'s timers (as
        Firecracker's PeriodicMetrics: first line at start).  Callable from any thread: the
        work is done on the loop's thread."""
        if interval <= 0:
            raise ValueError("the metrics interval must be positive")

        def start() -> None:
            if self._fd is None:
                return
            self._cancel_timer()
            self._loop = loop
            self._interval = interval
            self._next = time.monotonic() + interval
            self._timer = loop.call_later(interval, self._tick)
            self.write()

        if loop.in_loop_thread():
            start()
        else:
            loop.call_soon_threadsafe(start)

    def _tick(self) -> None:
        """The timer fired: write, and re-arm on the original schedule (no drift)."""
        self._timer = None
        if self._fd is None:
            return
        self._next += self._interval
        now = time.monotonic()
        if self._next <= now:  # the loop was held up for more than a period: skip ahead
            self._next = now + self._interval
        self._timer = self._loop.call_later(self._next - now, self._tick)
        self.write()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        """Stop the timer and close the file (a partly written line is completed if the pipe
        takes it now).  Idempotent."""
        self._cancel_timer()
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._watching:
            self._watching = False
            self._loop.remove_writer(fd)  # EventLoop ignores an fd it no longer watches
        if self._pending:
            try:
                os.write(fd, self._pending)
            except OSError as e:
                self._missed(("close", e.errno), "Failed to finish a metrics line: %s", e)
            self._pending = b""
        os.close(fd)
