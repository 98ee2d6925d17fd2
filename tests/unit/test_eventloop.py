"""The VMM event loop: readers, eventfds, timers, thread-safe callbacks, contained errors."""

from __future__ import annotations

import os
import threading

import pytest

from embervm.eventloop import EventLoop


@pytest.fixture
def loop():
    lp = EventLoop()
    yield lp
    lp.close()


def test_reader_runs_when_fd_readable_and_stops_after_removal(loop):
    r, w = os.pipe()
    seen = []
    loop.add_reader(r, lambda: seen.append(os.read(r, 10)))
    os.write(w, b"hi")
    loop.run_once(1)
    assert seen == [b"hi"]
    loop.remove_reader(r)
    assert not loop.has_reader(r)
    os.write(w, b"x")
    loop.run_once(0)
    assert seen == [b"hi"]
    loop.remove_reader(r)  # twice is harmless
    os.close(r)
    os.close(w)


def test_eventfd_counter_is_drained_before_the_callback(loop):
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    calls = []
    loop.add_eventfd(fd, lambda: calls.append(1))
    os.eventfd_write(fd, 3)
    loop.run_once(1)
    loop.run_once(0)
    assert calls == [1]
    os.close(fd)


def test_timers_fire_in_order_and_can_be_cancelled(loop):
    order = []
    loop.call_later(0.02, lambda: order.append("b"))
    loop.call_later(0.01, lambda: order.append("a"))
    h = loop.call_later(0.01, lambda: order.append("never"))
    h.cancel()
    while len(order) < 2:
        loop.run_once(1)
    assert order == ["a", "b"]


def test_call_soon_threadsafe_wakes_the_loop_and_stop_ends_run(loop):
    done = []

    def other():
        loop.call_soon_threadsafe(lambda: done.append(threading.current_thread().name))
        loop.call_soon_threadsafe(loop.stop)

    t = threading.Thread(target=other, name="other")
    t.start()
    loop.run()
    t.join()
    assert done == [threading.main_thread().name]


def test_a_failing_callback_does_not_stop_the_loop(loop, caplog):
    ran = []
    loop.call_soon_threadsafe(lambda: 1 / 0)
    loop.call_soon_threadsafe(lambda: ran.append(1))
    loop.run_once(1)
    assert ran == [1]
    assert "ZeroDivisionError" in caplog.text
