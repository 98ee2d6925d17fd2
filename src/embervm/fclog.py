"""Firecracker-style logging for the whole ``embervm`` logger tree.

:func:`configure` makes every record of the ``embervm`` loggers come out as a Firecracker log
line (``src/vmm/src/logger/logging.rs``)::

    2025-01-31T14:02:03.123456789 [instance-id:thread:LEVEL:file:line] message

the time local, to the nanosecond; ``:LEVEL`` (``ERROR``, ``WARN``, ``INFO``, ``DEBUG``,
``TRACE``: Rust's names) only with ``show_level``; ``:file:line`` only with
``show_log_origin`` (the path from the directory that holds the ``embervm`` package, e.g.
``embervm/devices/virtio/block.py``).  The thread is the Python thread's name (the main thread
is called ``main``, as Rust's).

Levels are Firecracker's, case-insensitive: ``Error``, ``Warning`` (or ``Warn``), ``Info``,
``Debug``, ``Trace`` (Python level 5), ``Off``; anything else is a ConfigError.

Module filter: Firecracker keeps a record when its Rust module path starts with ``module``.
embervm's modules are not Firecracker's, so a Rust path is mapped onto embervm's loggers by
:data:`MODULE_MAP` (the longest entry that is the filter or a ``::``-prefix of it wins; e.g.
``vmm::devices::virtio::block::virtio::device`` keeps ``embervm.devices.virtio.block``).  A
filter that is only the beginning of mapped paths (``vmm::devices::vir``) keeps what those
paths map to.  A filter written as an embervm logger name (``embervm.devices``) is used as a
prefix of logger names directly.  A filter that matches nothing keeps nothing, as on
Firecracker.

Destination: ``path`` opened as Firecracker opens it (read-write, non-blocking, created if
missing; appended to), so a FIFO without a reader neither blocks nor fails; or stderr.  A line
that cannot be written is dropped and counted in ``counters["missed_log_count"]`` (Firecracker's
``logger.missed_log_count`` metric, which :mod:`embervm.metrics` reports).

Guest-triggered messages stay rate limited: they go through
:class:`embervm.logutil.RateLimitedLog` before they reach a logger.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TextIO

from .errors import ConfigError

#: Python level for Firecracker's Trace
TRACE = 5

#: Firecracker's level names (lower case) -> Python levels; "off" disables everything
LEVELS: dict[str, int] = {
    "off": logging.CRITICAL + 10,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}

#: Firecracker's module paths -> the embervm logger-name prefixes they stand for
MODULE_MAP: dict[str, tuple[str, ...]] = {
    "vmm": ("embervm",),
    "vmm::devices": ("embervm.devices",),
    "vmm::devices::virtio": ("embervm.devices.virtio",),
    "vmm::devices::virtio::block": ("embervm.devices.virtio.block",),
    "vmm::devices::virtio::net": ("embervm.devices.virtio.net", "embervm.devices.virtio.tap"),
    "vmm::devices::virtio::vsock": ("embervm.devices.virtio.vsock",),
    "vmm::devices::virtio::balloon": ("embervm.devices.virtio.balloon",),
    "vmm::devices::virtio::rng": ("embervm.devices.virtio.rng",),
    "vmm::devices::virtio::queue": ("embervm.devices.virtio.queue",),
    "vmm::devices::virtio::transport": ("embervm.devices.virtio.mmio",),
    "vmm::devices::legacy": ("embervm.devices.legacy",),
    "vmm::devices::legacy::serial": ("embervm.devices.legacy.serial",),
    "vmm::devices::legacy::i8042": ("embervm.devices.legacy.i8042",),
    "vmm::device_manager": ("embervm.devices.manager", "embervm.bus"),
    "vmm::vstate": ("embervm.kvm", "embervm.memory"),
    "vmm::vstate::vcpu": ("embervm.kvm",),
    "vmm::vstate::memory": ("embervm.memory",),
    "vmm::arch": ("embervm.boot",),
    "vmm::builder": ("embervm.vmm", "embervm.machine"),
    "vmm::rate_limiter": ("embervm.ratelimit",),
    "vmm::logger": ("embervm.fclog", "embervm.metrics", "embervm.logutil"),
    "vmm::mmds": ("embervm.mmds",),
    "vmm::rpc_interface": ("embervm.fc.api",),
    "firecracker": ("embervm.fc", "embervm.cli"),
    "firecracker::api_server": ("embervm.fc.http", "embervm.fc.api"),
    "api_server": ("embervm.fc.http", "embervm.fc.api"),
}

#: what this module counts; reported by embervm.metrics in the ``logger`` group
counters = {"missed_log_count": 0}

_ROOT = "embervm"
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rust_level(levelno: int) -> str:
    """Rust's name for a Python level (CRITICAL is ERROR; in-between levels round down)."""
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARN"
    if levelno >= logging.INFO:
        return "INFO"
    if levelno >= logging.DEBUG:
        return "DEBUG"
    return "TRACE"


_lock = threading.Lock()
_handler: FcHandler | None = None
_saved: tuple[int, bool] | None = None  # the embervm logger's level and propagate, before us


def parse_level(level: str) -> int:
    """Firecracker's level name (any case) -> Python level; ConfigError if unknown."""
    try:
        return LEVELS[level.lower()]
    except (KeyError, AttributeError):
        raise ConfigError(f"invalid log level {level!r}: expected one of Error, Warning, "
                          "Info, Debug, Trace, Off") from None


def module_prefixes(module: str) -> tuple[str, ...]:
    """The embervm logger-name prefixes that Firecracker module filter ``module`` keeps."""
    if module == _ROOT or module.startswith(_ROOT + "."):
        return (module,)
    # Firecracker's rule, a string prefix: every mapped path the filter begins
    out: list[str] = []
    for key, prefixes in MODULE_MAP.items():
        if key.startswith(module):
            out += [p for p in prefixes if p not in out]
    if out:
        return tuple(out)
    # a path deeper than embervm's modules: the most specific mapped path above it
    best = None
    for key in MODULE_MAP:
        if module.startswith(key + "::") and (best is None or len(key) > len(best)):
            best = key
    return MODULE_MAP[best] if best is not None else ()


class FcFormatter(logging.Formatter):
    """Formats a record as Firecracker's log line (without the newline)."""

    def __init__(self, instance_id: str, show_level: bool, show_log_origin: bool) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.show_level = show_level
        self.show_log_origin = show_log_origin

    @staticmethod
    def timestamp(record: logging.LogRecord) -> str:
        """Local time, ``YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`` (Firecracker's LocalTime)."""
        ns = getattr(record, "created_ns", None)  # Python >= 3.13
        if ns is None:
            ns = round(record.created * 1e9)
        sec, nsec = divmod(ns, 1_000_000_000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(sec)) + f".{nsec:09d}"

    @staticmethod
    def origin(record: logging.LogRecord) -> str:
        path = record.pathname or "?"
        if path.startswith(_PKG_PARENT + os.sep):
            path = path[len(_PKG_PARENT) + 1:]
        return f"{path}:{record.lineno}"

    def format(self, record: logging.LogRecord) -> str:
        thread = record.threadName or "-"
        if thread == "MainThread":
            thread = "main"
        tag = f"{self.instance_id}:{thread}"
        if self.show_level:
            tag += ":" + rust_level(record.levelno)
        if self.show_log_origin:
            tag += ":" + self.origin(record)
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return f"{self.timestamp(record)} [{tag}] {msg}"


class FcHandler(logging.Handler):
    """Writes each record as one line to a file descriptor (non-blocking) or a stream, after
    the module filter; a line that cannot be written is counted, never raised."""

    def __init__(self, fd: int | None, stream: TextIO | None,
                 prefixes: tuple[str, ...] | None) -> None:
        super().__init__()
        self.fd = fd
        self.stream = stream
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if self.prefixes is not None and not record.name.startswith(self.prefixes):
            return False
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # a bad format string in a log call: report it the logging way
            self.handleError(record)
            return
        try:
            if self.fd is not None:
                data = line.encode(errors="replace")
                if os.write(self.fd, data) != len(data):
                    counters["missed_log_count"] += 1  # the pipe took only part of it
            else:
                stream = self.stream if self.stream is not None else sys.stderr
                stream.write(line)
                stream.flush()
        except (OSError, ValueError):  # full pipe, closed stream: Firecracker counts it
            counters["missed_log_count"] += 1

    def close(self) -> None:
        with self.lock:
            fd, self.fd = self.fd, None
            if fd is not None:
                os.close(fd)
        super().close()


def configure(instance_id: str, *, path: str | None = None, level: str = "Info",
              show_level: bool = False, show_log_origin: bool = False,
              module: str | None = None, stream: TextIO | None = None) -> None:
    """Send the ``embervm`` logger tree to Firecracker-format lines at ``path`` (a file or FIFO,
    appended to) or to ``stream`` (default: stderr; Firecracker itself writes to stdout when
    no log_path is given).  Replaces an earlier configuration entirely.  Raises ConfigError
    for a bad level or a path that cannot be opened (nothing is changed then)."""
    global _handler, _saved
    pylevel = parse_level(level)
    prefixes = module_prefixes(module) if module is not None else None
    fd = None
    if path is not None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CREAT | os.O_APPEND
                         | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise ConfigError(f"log_path {path}: {e.strerror}") from None
    handler = FcHandler(fd, stream, prefixes)
    handler.setFormatter(FcFormatter(instance_id, show_level, show_log_origin))
    logging.addLevelName(TRACE, "TRACE")
    root = logging.getLogger(_ROOT)
    with _lock:
        old, _handler = _handler, handler
        if _saved is None:
            _saved = (root.level, root.propagate)
        root.addHandler(handler)
        if old is not None:
            root.removeHandler(old)
        root.setLevel(pylevel)
        root.propagate = False  # our lines only, not the application's root handlers too
    if old is not None:
        old.close()


def reset() -> None:
    """Undo :func:`configure`: remove the handler, close its file, restore the ``embervm``
    logger's level and propagation."""
    global _handler, _saved
    root = logging.getLogger(_ROOT)
    with _lock:
        old, _handler = _handler, None
        if old is not None:
            root.removeHandler(old)
        if _saved is not None:
            root.setLevel(_saved[0])
            root.propagate = _saved[1]
            _saved = None
    if old is not None:
        old.close()
