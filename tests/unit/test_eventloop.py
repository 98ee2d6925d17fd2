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


def test_reader_and_writer_on_one_fd_are_independent(loop):
    import socket

    a, b = socket.socketpair()
    a.setblocking(False)
    seen = []
    loop.add_reader(a.fileno(), lambda: seen.append(("r", a.recv(10))))
    loop.add_writer(a.fileno(), lambda: seen.append(("w",)))
    loop.run_once(1)
    assert seen == [("w",)]  # writable, nothing to read yet
    loop.remove_writer(a.fileno())
    b.send(b"x")
    loop.run_once(1)
    assert seen == [("w",), ("r", b"x")]
    assert loop.has_reader(a.fileno())
    loop.remove_reader(a.fileno())
    b.send(b"y")
    loop.run_once(0)
    assert len(seen) == 2
    a.close()
    b.close()


def test_gated_loop_holds_readers_timers_and_callbacks_while_paused(loop):
    from embervm.eventloop import GatedLoop

    gate = GatedLoop(loop)
    r, w = os.pipe()
    seen = []
    gate.add_reader(r, lambda: seen.append(os.read(r, 10)))
    gate.call_later(0, lambda: seen.append("timer"))
    gate.pause()
    gate.call_soon_threadsafe(lambda: seen.append("soon"))
    os.write(w, b"a")
    for _ in range(3):
        loop.run_once(0.01)
    assert seen == []  # nothing ran while paused, and the readable fd did not spin
    assert not loop.has_reader(r) and gate.has_reader(r)
    gate.resume()
    assert seen == ["timer", "soon"]  # deferred work runs at resume, in order
    loop.run_once(0.1)
    assert seen == ["timer", "soon", b"a"]  # the parked reader fires once re-registered
    gate.remove_reader(r)
    assert not gate.has_reader(r) and not loop.has_reader(r)
    os.close(r)
    os.close(w)


def test_in_loop_thread(loop):
    assert loop.in_loop_thread()  # nobody runs it: callers may act directly
    flags = []
    t = threading.Thread(target=loop.run)
    t.start()
    loop.call_soon_threadsafe(lambda: flags.append(loop.in_loop_thread()))
    while not flags:
        pass
    assert flags == [True] and not loop.in_loop_thread()
    loop.stop()
    t.join()
    assert loop.in_loop_thread()
