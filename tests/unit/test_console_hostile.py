"""virtio-console against a hostile driver (hypothesis).

Three properties:

* arbitrary well-formed traffic — transmit chains with writable parts, receive chains with
  readable parts or no writable byte at all, zero-length descriptors, indirect tables, split and
  packed rings — interleaved with host input: every byte the guest transmits reaches the client
  once and in order, every transmit chain comes back with ``used.len = 0``, the receive chains
  carry a prefix of the host's stream (all of it whenever a usable buffer is still posted) and
  never report more than their writable bytes, and no error is logged;
* garbage descriptors and ring indices on both queues: nothing escapes, the device either returns
  the chains or sets DEVICE_NEEDS_RESET, and after a reset it serves a well-behaved driver again;
* arbitrary config-space accesses: nothing escapes, only writes starting at ``emerg_wr`` produce
  output (their low byte), and ``cols``/``rows`` never change.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from embervm.devices.virtio import spec
from embervm.devices.virtio.console import RECEIVEQ, TRANSMITQ, Console
from embervm.devices.virtio.mmio import MmioTransport
from embervm.eventloop import EventLoop
from embervm.memory import GuestMemory
from embervm.testing.driver import MmioDriver
from embervm.testing.rings import DriverSplitRing

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Hypothesis examples cannot use the function-scoped tmp_path: one directory for the module.
_DIR = Path(tempfile.mkdtemp(prefix="console-hostile-"))
atexit.register(shutil.rmtree, _DIR, True)
_NAMES = itertools.count()


class _Errors(logging.Handler):
    """Collects ERROR records: the event loop logs (and swallows) any callback exception."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def loop_errors():
    h = _Errors()
    logging.getLogger("embervm").addHandler(h)
    yield h
    logging.getLogger("embervm").removeHandler(h)
    assert not h.records, [r.getMessage() for r in h.records]


class Rig:
    def __init__(self, packed: bool) -> None:
        self.mem = GuestMemory([(0, 8 << 20)])
        self.path = _DIR / f"c{next(_NAMES)}.sock"
        self.con = Console("socket", self.path)
        self.loop = EventLoop()
        self.con.loop = self.loop
        self.transport = MmioTransport(self.con, self.mem, packed=packed)
        self.drv = MmioDriver(self.transport, self.mem)
        self.drv.probe()
        self.client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.client.connect(os.fspath(self.path))
        self.client.setblocking(False)
        self.received = bytearray()  # what the client got
        self.to_send = bytearray()  # host input not yet accepted by the socket
        self.sent = bytearray()  # host input accepted by the socket
        self.used: dict[int, list[tuple[int, int, list[bytes]]]] = {RECEIVEQ: [], TRANSMITQ: []}

    def step(self) -> bool:
        """One loop round plus client I/O and used collection; True if anything moved."""
        moved = False
        if self.to_send:
            try:
                n = self.client.send(self.to_send)
            except BlockingIOError:
                n = 0
            if n:
                self.sent += self.to_send[:n]
                del self.to_send[:n]
                moved = True
        self.loop.run_once(0.001)
        try:
            while chunk := self.client.recv(1 << 16):
                self.received += chunk
                moved = True
        except BlockingIOError:
            pass
        for q in (RECEIVEQ, TRANSMITQ):
            new = self.drv.used(q)
            if new:
                self.used[q] += new
                moved = True
        return moved

    def settle(self, timeout: float = 10.0) -> None:
        """Step until nothing moves, the device has no output left and no retry is pending."""
        deadline = time.monotonic() + timeout
        idle = 0
        while idle < 2 and time.monotonic() < deadline:
            busy = self.step() or self.to_send or self.con._out or self.con._timer is not None
            idle = 0 if busy else idle + 1

    def close(self) -> None:
        self.client.close()
        self.con.close()
        self.loop.close()


sizes = st.lists(st.just(0) | st.integers(1, 5000), max_size=3)
some = st.lists(st.integers(1, 5000), min_size=1, max_size=3)
# Linux-shaped chains (data on the right side) and any shape at all (wrong direction, empty).
tx_op = st.tuples(st.just("tx"), some, st.just([]), st.booleans())
rx_op = st.tuples(st.just("rx"), st.just([]), some, st.booleans())
any_op = st.tuples(st.sampled_from(["tx", "rx"]), sizes, sizes, st.booleans())
host_op = st.tuples(st.just("host"), st.binary(min_size=1, max_size=6000))
ops = st.lists(st.one_of(tx_op, rx_op, any_op, host_op, st.just(("run",))), min_size=2,
               max_size=25)


@SETTINGS
@given(packed=st.booleans(), program=ops)
def test_arbitrary_traffic_is_delivered_exactly_and_in_order(packed, program):
    r = Rig(packed)
    try:
        tx_expected = bytearray()
        tx_tokens: list[int] = []
        # token -> writable bytes of each submission (a token is reused once it came back)
        rx_shapes: dict[int, list[int]] = {}
        for op in program:
            if op[0] == "host":
                r.to_send += op[1]
            elif op[0] == "run":
                r.step()
            else:
                kind, readable, writable, indirect = op
                if not readable and not writable:
                    continue
                q = TRANSMITQ if kind == "tx" else RECEIVEQ
                data = [os.urandom(n) for n in readable]
                ring = r.drv.rings[q]
                if ring.num_free < (1 if indirect else len(data) + len(writable)):
                    r.settle()
                    if ring.num_free < (1 if indirect else len(data) + len(writable)):
                        continue
                tok = r.drv.submit(q, data, writable, indirect=indirect)
                if q == TRANSMITQ:
                    tx_tokens.append(tok)
                    tx_expected += b"".join(data)
                else:
                    rx_shapes.setdefault(tok, []).append(sum(writable))
        r.settle()
        event(f"tx bytes > 0: {bool(tx_expected)}, rx bytes > 0: {bool(r.con.metrics['rx_bytes'])}")
        assert not r.transport.status & spec.STATUS_DEVICE_NEEDS_RESET
        # Guest → host: everything, once, in order; every chain back with len 0.
        assert bytes(r.received) == bytes(tx_expected)
        assert [t for t, _, _ in r.used[TRANSMITQ]] == tx_tokens
        assert all(length == 0 for _, length, _ in r.used[TRANSMITQ])
        # Host → guest: a prefix of the stream, within each buffer, nothing lost.
        delivered = bytearray()
        for tok, length, bufs in r.used[RECEIVEQ]:
            assert length <= rx_shapes[tok].pop(0)
            delivered += b"".join(bufs)[:length]
        assert bytes(delivered) == bytes(r.sent[: len(delivered)])
        if any(n > 0 for pending in rx_shapes.values() for n in pending):
            # A usable buffer is still posted: all the host's input must have been taken.
            assert len(delivered) == len(r.sent) and not r.to_send
    finally:
        r.close()


garbage_desc = st.tuples(
    st.sampled_from([0, 0x1000, 0x7F_F000, 8 << 20, (8 << 20) - 8, 1 << 40, 2**64 - 16])
    | st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 16, 4096, 2**32 - 1]) | st.integers(0, 2**32 - 1),
    st.integers(0, 7),  # NEXT | WRITE | INDIRECT in any combination
    st.integers(0, 70),
)


@SETTINGS
@given(
    queue=st.sampled_from([RECEIVEQ, TRANSMITQ]),
    descs=st.lists(garbage_desc, min_size=1, max_size=8),
    heads=st.lists(st.integers(0, 70), min_size=1, max_size=6),
    avail_jump=st.sampled_from([0, 0, 1, 65, 40000]),
    host=st.binary(max_size=3000),
)
def test_garbage_descriptors_never_escape_and_reset_recovers(queue, descs, heads, avail_jump,
                                                            host):
    r = Rig(packed=False)
    try:
        ring = r.drv.rings[queue]
        assert isinstance(ring, DriverSplitRing)
        for i, (addr, ln, flags, nxt) in enumerate(descs):
            ring.write_desc(i, addr, ln, flags, nxt)
        for h in heads:
            ring.publish(h)
        if avail_jump:
            ring.set_avail_idx(ring.avail_idx + avail_jump)
        r.to_send += host
        r.drv.kick(queue)
        for _ in range(30):  # the device's reactions all happen within a few rounds
            r.loop.run_once(0.001)
            try:
                r.client.send(r.to_send)
                r.to_send.clear()
            except BlockingIOError:
                pass
            if r.transport.status & spec.STATUS_DEVICE_NEEDS_RESET:
                break
        event("needs reset" if r.transport.status & spec.STATUS_DEVICE_NEEDS_RESET
              else "invalid chains returned" if r.con.metrics["invalid_chains"]
              else "chains served")
        # Whatever happened, a reset and a fresh probe give a working console.
        r.drv.remove()
        r.drv.probe()
        r.to_send.clear()
        r.sent.clear()
        r.received.clear()
        r.used = {RECEIVEQ: [], TRANSMITQ: []}
        leftover = r.con.metrics["tx_bytes"]
        r.settle()
        r.received.clear()  # output the garbage chains carried, if any
        r.drv.submit(TRANSMITQ, [b"after reset"], [])
        r.settle()
        assert bytes(r.received) == b"after reset"
        assert r.con.metrics["tx_bytes"] == leftover + len(b"after reset")
        r.drv.submit(RECEIVEQ, [], [4096])
        # Bytes the garbage round left in the socket arrive first: compare the tail.
        r.to_send += b"ping"
        r.settle()
        got = b"".join(b"".join(b)[:n] for _, n, b in r.used[RECEIVEQ])
        assert got.endswith(b"ping") or len(got) == 4096
    finally:
        r.close()


@SETTINGS
@given(accesses=st.lists(
    st.tuples(st.booleans(), st.integers(0, 0x200), st.sampled_from([1, 2, 4, 8]),
              st.integers(0, 2**64 - 1)),
    max_size=40))
def test_config_space_accesses_never_escape_and_only_emerg_wr_writes_output(accesses):
    r = Rig(packed=False)
    try:
        expected = bytearray()
        for is_write, offset, size, value in accesses:
            value &= (1 << (8 * size)) - 1
            if is_write:
                r.transport.write(spec.CONFIG + offset, size, value)
                if offset == 8 and size in (1, 2, 4):
                    expected.append(value & 0xFF)
            else:
                got = r.transport.read(spec.CONFIG + offset, size)
                assert 0 <= got < 1 << (8 * size)
                if offset >= 12:
                    assert got == 0
        r.settle()
        assert bytes(r.received) == bytes(expected)
        assert r.con.size == (80, 24)
        assert r.drv.read_config(4, 4) == 1
        assert not r.transport.status & spec.STATUS_DEVICE_NEEDS_RESET
    finally:
        r.close()
