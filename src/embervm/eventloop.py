"""The VMM's event loop: one thread (the main thread) serving every device back-end.

A tiny, explicit loop over ``selectors`` (epoll): readers on file descriptors (ioeventfds,
TAP devices, Unix sockets, stdin), timers, and thread-safe callbacks.  Devices get it as
``device.loop`` and register what they need when activated; everything registered runs on the
loop's thread, so a device only has to take its own lock against register accesses from vCPU
threads.  It works without KVM, so device tests can drive it with :meth:`EventLoop.run_once`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class TimerHandle:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._pending: list[Callback] = []
        self._pending_lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sel.register(self._wake_fd, selectors.EVENT_READ, None)
        self.stopped = False

    # -- registration ------------------------------------------------------------------------

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (replaces an earlier callback)."""
        try:
            self._sel.modify(fd, selectors.EVENT_READ, callback)
        except KeyError:
            self._sel.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        try:
            self._sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def has_reader(self, fd: int) -> bool:
        try:
            self._sel.get_key(fd)
        except KeyError:
            return False
        return True

    def add_eventfd(self, fd: int, callback: Callback) -> None:
        """Like :meth:`add_reader` for an eventfd: the counter is drained before ``callback``."""

        def drain_then_call() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            callback()

        self.add_reader(fd, drain_then_call)

    def call_later(self, delay: float, callback: Callback) -> TimerHandle:
        """Run ``callback`` once after ``delay`` seconds (loop thread only)."""
        handle = TimerHandle(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (handle.when, next(self._seq), handle))
        return handle

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """Run ``callback`` on the loop thread soon; callable from any thread."""
        with self._pending_lock:
            self._pending.append(callback)
        os.eventfd_write(self._wake_fd, 1)

    def stop(self) -> None:
        """Make :meth:`run` return (any thread)."""
        self.stopped = True
        os.eventfd_write(self._wake_fd, 1)

    # -- running -------------------------------------------------------------------------------

    def run(self) -> None:
        while not self.stopped:
            self.run_once()

    def run_once(self, timeout: float | None = None) -> None:
        """Wait for events (at most ``timeout`` s, or until the next timer) and dispatch them."""
        if self._timers:
            wait = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        for key, _ in self._sel.select(timeout):
            cb = key.data
            if cb is None:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                continue
            self._dispatch(cb)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, handle = heapq.heappop(self._timers)
            if not handle.cancelled:
                self._dispatch(handle.callback)
        if self._pending:
            with self._pending_lock:
                pending, self._pending = self._pending, []
            for cb in pending:
                self._dispatch(cb)

    def _dispatch(self, cb: Callback) -> None:
        try:
            cb()
        except Exception:  # one device's bug must not stop every other device
            log.exception("event loop callback %r failed", cb)

    def close(self) -> None:
        self._sel.close()
        os.close(self._wake_fd)
