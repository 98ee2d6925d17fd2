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


def _drained(fd: int, callback: Callback) -> Callback:
    """``callback`` behind a read of eventfd ``fd``'s counter (a spurious wake-up with the
    counter already 0 calls nothing)."""

    def drain_then_call() -> None:
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        callback()

    return drain_then_call


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
        # fd -> [reader callback | None, writer callback | None]; the selector's key data is
        # this list, so one fd can have both.
        self._callbacks: dict[int, list[Callback | None]] = {}
        #: the thread running :meth:`run` (None while nobody runs it)
        self.thread: threading.Thread | None = None
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._pending: list[Callback] = []
        self._pending_lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._sel.register(self._wake_fd, selectors.EVENT_READ, None)
        self.stopped = False

    # -- registration ------------------------------------------------------------------------

    def _set(self, fd: int, slot: int, callback: Callback | None) -> None:
        cbs = self._callbacks.get(fd)
        if cbs is None:
            if callback is None:
                return
            cbs = self._callbacks[fd] = [None, None]
        cbs[slot] = callback
        events = (selectors.EVENT_READ if cbs[0] else 0) | (selectors.EVENT_WRITE if cbs[1] else 0)
        try:
            if not events:
                del self._callbacks[fd]
                self._sel.unregister(fd)
            else:
                try:
                    self._sel.modify(fd, events, cbs)
                except KeyError:
                    self._sel.register(fd, events, cbs)
        except (KeyError, ValueError):
            pass  # an fd already closed or never registered: nothing to watch

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (replaces an earlier callback)."""
        self._set(fd, 0, callback)

    def remove_reader(self, fd: int) -> None:
        self._set(fd, 0, None)

    def has_reader(self, fd: int) -> bool:
        cbs = self._callbacks.get(fd)
        return cbs is not None and cbs[0] is not None

    def add_writer(self, fd: int, callback: Callback) -> None:
        """Call ``callback()`` whenever ``fd`` is writable (replaces an earlier callback)."""
        self._set(fd, 1, callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, 1, None)

    def in_loop_thread(self) -> bool:
        """True on the thread running :meth:`run` (or when nobody runs it yet)."""
        t = self.thread
        return t is None or t is threading.current_thread()

    def add_eventfd(self, fd: int, callback: Callback) -> None:
        """Like :meth:`add_reader` for an eventfd: the counter is drained before ``callback``."""
        self.add_reader(fd, _drained(fd, callback))

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
        self.thread = threading.current_thread()
        try:
            while not self.stopped:
                self.run_once()
        finally:
            self.thread = None

    def run_once(self, timeout: float | None = None) -> None:
        """Wait for events (at most ``timeout`` s, or until the next timer) and dispatch them."""
        if self._timers:
            wait = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        for key, events in self._sel.select(timeout):
            cbs = key.data
            if cbs is None:
                try:
                    os.eventfd_read(self._wake_fd)
                except BlockingIOError:
                    pass
                continue
            if events & selectors.EVENT_READ and cbs[0] is not None:
                self._dispatch(cbs[0])
            if events & selectors.EVENT_WRITE and cbs[1] is not None:
                self._dispatch(cbs[1])
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


class GatedLoop:
    """The event loop as one group of devices sees it, with a gate that :meth:`pause` closes.

    Devices register their readers, timers and callbacks here instead of on the loop itself.
    While the gate is closed none of them runs: a reader whose fd becomes readable is taken
    off the selector (epoll is level-triggered: it would spin) and put back on :meth:`resume`,
    when it fires again if its fd is still readable; a timer or callback that comes due is
    kept and runs on :meth:`resume`.  So a pause stops device work between two callbacks, i.e.
    at a request boundary, and a resume continues exactly where it stopped.  Only the loop's
    thread may call :meth:`pause` and :meth:`resume`.
    """

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.paused = False
        self._readers: dict[int, Callback] = {}  # fd -> the device's callback (all, registered)
        self._parked: set[int] = set()  # fds taken off the selector while paused
        self._deferred: list[Callback] = []

    # -- the EventLoop interface devices use -----------------------------------------------------

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._readers[fd] = callback
        self._parked.discard(fd)
        self.loop.add_reader(fd, lambda: self._on_readable(fd))

    def remove_reader(self, fd: int) -> None:
        self._readers.pop(fd, None)
        self._parked.discard(fd)
        self.loop.remove_reader(fd)

    def has_reader(self, fd: int) -> bool:
        return fd in self._readers

    def add_writer(self, fd: int, callback: Callback) -> None:
        self.loop.add_writer(fd, lambda: self._gated(callback))

    def remove_writer(self, fd: int) -> None:
        self.loop.remove_writer(fd)

    def add_eventfd(self, fd: int, callback: Callback) -> None:
        self.add_reader(fd, _drained(fd, callback))

    def call_later(self, delay: float, callback: Callback) -> TimerHandle:
        return self.loop.call_later(delay, lambda: self._gated(callback))

    def call_soon_threadsafe(self, callback: Callback) -> None:
        self.loop.call_soon_threadsafe(lambda: self._gated(callback))

    def in_loop_thread(self) -> bool:
        return self.loop.in_loop_thread()

    # -- the gate --------------------------------------------------------------------------------

    def _on_readable(self, fd: int) -> None:
        cb = self._readers.get(fd)
        if cb is None:
            return
        if self.paused:
            self._parked.add(fd)
            self.loop.remove_reader(fd)
            return
        cb()

    def _gated(self, callback: Callback) -> None:
        if self.paused:
            self._deferred.append(callback)
        else:
            callback()

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        parked, self._parked = self._parked, set()
        for fd in parked:
            if fd in self._readers:
                self.loop.add_reader(fd, lambda fd=fd: self._on_readable(fd))
        deferred, self._deferred = self._deferred, []
        for cb in deferred:
            self.loop._dispatch(cb)
