"""virtio-console (virtio 1.2 §5.3, device ID 3): port 0 only, the guest's ``hvc0``.

Two queues, no MULTIPORT (so no control queues and no port hot-plug): queue 0 is port 0's
receiveq (host → guest), queue 1 its transmitq (guest → host).  Features offered:

* ``VIRTIO_CONSOLE_F_SIZE``: ``cols``/``rows`` in config space.  On stdio they come from the
  terminal (``TIOCGWINSZ``), on a socket they default to 80x24; :meth:`Console.resize` (control
  socket: ``console resize COLS ROWS``) and :meth:`Console.terminal_resized` (the SIGWINCH hook)
  change them with a generation bump and a config interrupt.  Linux reads the size only in its
  config-change handler (``config_work_handler``: without MULTIPORT the probe starts at 0x0), so
  the device also raises one config interrupt right after DRIVER_OK, as cloud-hypervisor does
  (the e2e test sees 80x24 in ``stty size`` on the first open of hvc0).
* ``VIRTIO_CONSOLE_F_EMERG_WRITE``: a driver write to ``emerg_wr`` puts its low byte on the
  output, even before FEATURES_OK/DRIVER_OK (that is its purpose: early debugging, before the
  queues exist), as QEMU does once the feature is offered; the transport takes config writes
  from the DRIVER status bit on.  Linux 6.1 never negotiates it.

Data paths (all on the event-loop thread, under ``self.lock``):

* TX: every readable byte of a transmit chain goes to the output, in ring order; the chain is
  completed with ``used.len = 0`` (the device writes nothing, §5.3.6.2).  Output is buffered up
  to :data:`OUTPUT_LIMIT`; when the sink does not take it (a socket client that does not read, a
  blocked terminal), the device stops taking transmit chains — back-pressure to the guest, whose
  hvc ``put_chars`` spins until the buffer is used — and retries every :data:`RETRY_SECONDS`
  (the event loop watches fds for reading only).
* RX: host bytes are read straight into the guest's posted receive buffers with one ``readv``
  (no copy, no host-side input buffer, so nothing is ever dropped).  While no receive buffer is
  posted the device does not read the host fd at all; the driver's kick on the receiveq resumes
  reading (virtio.md §4.4: notifications are re-armed and the ring re-checked first).

Back-ends:

* ``stdio``: output to fd 1, input from fd 0 (the VMM puts a terminal in raw mode and leaves
  stdin to this device).  An unpollable stdin (``/dev/null``, a regular file) or EOF simply
  means no input.  A broken stdout (EPIPE) drops output from then on, the guest is not stalled.
* ``socket``: a listening Unix stream socket; one client at a time (another connection is
  accepted and closed at once).  While no client is connected, output is kept in a ring of the
  most recent :data:`BACKLOG_LIMIT` bytes (older bytes are dropped and counted in
  ``metrics["dropped_bytes"]``) and replayed to the next client, so the guest never blocks on an
  absent reader.  A client that disconnects returns the device to that state.

Hostile drivers: a receive chain without writable bytes or a transmit chain with writable ones
is served by its useful part only (an empty receive chain is returned with ``used.len = 0``); an
invalid chain (bad address, loop, ...) is returned with ``used.len = 0`` and counted; a broken
ring (``QueueError``) sets DEVICE_NEEDS_RESET.  Every loop is bounded per callback.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import stat
import struct
import termios
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import ConfigError, GuestError, QueueError
from ...eventloop import TimerHandle
from . import spec
from .device import ConfigField, VirtioDevice
from .queue import ChainError, ChainReader, DescriptorChain, Virtqueue

log = logging.getLogger(__name__)

# -- §5.3.3 feature bits (Linux include/uapi/linux/virtio_console.h) ---------------------------
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

# -- §5.3.2 virtqueues (without MULTIPORT) ---------------------------------------------------------
RECEIVEQ = 0  # port 0 receiveq: device → driver
TRANSMITQ = 1  # port 0 transmitq: driver → device

# -- §5.3.4 config layout (offsets from 0x100) -----------------------------------------------------
CONFIG_COLS = 0
CONFIG_ROWS = 2
CONFIG_MAX_NR_PORTS = 4
CONFIG_EMERG_WR = 8

#: Ring size of both queues.  Linux posts one PAGE_SIZE receive buffer per descriptor at probe
#: (``fill_queue``), so this is also how much host input the guest can hold (256 KiB).
QUEUE_SIZE = 64
DEFAULT_COLS = 80
DEFAULT_ROWS = 24
#: Guest output held for a sink that is not taking it, before transmit chains stop being taken.
OUTPUT_LIMIT = 64 << 10
#: Output kept for the next socket client while none is connected (the most recent bytes).
BACKLOG_LIMIT = 64 << 10
#: Emergency writes bypass the queues, so they cannot be back-pressured: past this much unsent
#: output they are dropped (a hostile driver looping on ``emerg_wr`` cannot grow the buffer).
EMERG_LIMIT = 2 * OUTPUT_LIMIT
#: One ``readv`` fills at most this many bytes, chains and iovecs (IOV_MAX is 1024).
RX_BATCH_BYTES = 64 << 10
RX_BATCH_CHAINS = 32
RX_MAX_IOV = 64
#: Work one transmit callback does before yielding to the other fds of the event loop.
TX_BUDGET_BYTES = 1 << 20
TX_BUDGET_CHAINS = 4 * QUEUE_SIZE
#: How often a sink that stopped taking output is retried.
RETRY_SECONDS = 0.01
#: Largest single write to a socket client.
_SOCKET_CHUNK = 64 << 10

_WINSIZE = struct.Struct("HHHH")  # struct winsize (native): ws_row, ws_col, ws_xpixel, ws_ypixel
_SIZE = struct.Struct("<HH")  # config cols, rows
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

KINDS = ("stdio", "socket")


class Console(VirtioDevice):
    """virtio-console port 0 on stdio (``kind="stdio"``) or a Unix socket (``"socket"``).

    ``input_fd``/``output_fd`` replace stdin/stdout for ``stdio`` (tests, or a pty).
    """

    device_type = spec.VIRTIO_ID_CONSOLE
    name = "console"
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    device_features = spec.bit(VIRTIO_CONSOLE_F_SIZE) | spec.bit(VIRTIO_CONSOLE_F_EMERG_WRITE)
    config_layout = (
        ConfigField("cols", CONFIG_COLS, "H"),
        ConfigField("rows", CONFIG_ROWS, "H"),
        ConfigField("max_nr_ports", CONFIG_MAX_NR_PORTS, "I"),
        ConfigField("emerg_wr", CONFIG_EMERG_WR, "I", writable=True),
    )

    def __init__(
        self,
        kind: str,
        path: Path | None = None,
        *,
        input_fd: int = 0,
        output_fd: int = 1,
    ) -> None:
        if kind not in KINDS:
            raise ConfigError(f"--console {kind!r}: expected stdio or socket:PATH")
        if kind == "socket" and path is None:
            raise ConfigError("--console socket:PATH needs a path")
        super().__init__()
        self.kind = kind
        self.path: Path | None = Path(path) if kind == "socket" and path is not None else None
        self.metrics.update(
            tx_bytes=0, rx_bytes=0, emerg_bytes=0, dropped_bytes=0, invalid_chains=0,
            clients=0, refused_clients=0, resizes=0,
        )
        self._out = bytearray()  # guest output not yet taken by the sink
        self._backlog = bytearray()  # socket: output kept while no client is connected
        self._tx_chain: DescriptorChain | None = None  # a transmit chain being copied out
        self._tx_reader: ChainReader | None = None
        self._rx_held: deque[DescriptorChain] = deque()  # popped receive chains awaiting input
        self._reading_fd: int | None = None  # the input fd registered on the loop, if any
        self._timer: TimerHandle | None = None
        self._flush_queued = False
        self._closed = False
        # stdio
        self._in_fd = input_fd
        self._out_fd = output_fd
        self._in_done = False  # stdin at EOF or not pollable: no more input
        self._out_broken = False  # stdout gone (EPIPE): output is dropped
        self._out_poll: Any = None
        # Largest single write: a writable pipe takes PIPE_BUF without blocking (stdio).
        self._out_chunk = _SOCKET_CHUNK if kind == "socket" else select.PIPE_BUF
        # socket
        self._listener: socket.socket | None = None
        self._listening = False  # the listener is registered on the loop
        self._ident: tuple[int, int] | None = None
        self._client: socket.socket | None = None
        if kind == "stdio":
            self._out_poll = select.poll()
            self._out_poll.register(output_fd, select.POLLOUT)
            try:
                if stat.S_ISREG(os.fstat(output_fd).st_mode):
                    self._out_chunk = OUTPUT_LIMIT  # a file never blocks: no need for small writes
            except OSError:
                pass
            cols, rows = _terminal_size((output_fd, input_fd)) or (DEFAULT_COLS, DEFAULT_ROWS)
        else:
            assert self.path is not None
            self._listener, self._ident = _listen(self.path)
            cols, rows = DEFAULT_COLS, DEFAULT_ROWS
        _SIZE.pack_into(self.config, CONFIG_COLS, cols, rows)
        # Only meaningful with MULTIPORT (not offered); 1 is the truth: port 0 alone.
        self.set_config("max_nr_ports", 1, notify=False)

    # -- public API -------------------------------------------------------------------------------

    @property
    def size(self) -> tuple[int, int]:
        """The console size in config space, as (cols, rows)."""
        cols, rows = _SIZE.unpack_from(self.config, CONFIG_COLS)
        return cols, rows

    @property
    def reading(self) -> bool:
        """Whether the host input is being read now (False while the guest posted no buffers)."""
        return self._reading_fd is not None

    def resize(self, cols: int, rows: int) -> None:
        """Set the console size; the driver hears of it through a config interrupt (§5.3.4).

        ``cols`` and ``rows`` must be within 1..65535 (ValueError otherwise).  Any thread.
        """
        if not (1 <= cols <= 0xFFFF and 1 <= rows <= 0xFFFF):
            raise ValueError(f"console size {cols}x{rows}: columns and rows must be 1..65535")
        with self.lock:
            if (cols, rows) == self.size:
                return
            # Both fields in one store: a reader inside the generation loop never sees half.
            _SIZE.pack_into(self.config, CONFIG_COLS, cols, rows)
            self.metrics["resizes"] += 1
            self.on_config_changed()

    def terminal_resized(self) -> None:
        """Re-read the terminal size (stdio).  The VMM calls this on SIGWINCH (any thread)."""
        if self.kind != "stdio":
            return
        size = _terminal_size((self._out_fd, self._in_fd))
        if size is not None:
            self.resize(*size)

    def control_commands(self) -> dict[str, Callable[[list[str]], dict[str, Any]]]:
        """Commands offered on the VMM control socket: ``console size``, ``console resize C R``."""
        return {"console": self._control}

    def close(self) -> None:
        """Stop serving, flush what output can be flushed, close the socket (idempotent)."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._set_reader(None)
            self._final_flush()
            if self._client is not None:
                self._client.close()
                self._client = None
            listener, self._listener = self._listener, None
            if listener is not None:
                if self._listening and self.loop is not None:
                    _quiet_remove_reader(self.loop, listener.fileno())
                listener.close()
                try:
                    # Only our own socket file: another VMM may have replaced it since.
                    if self.path is not None and _identity(self.path) == self._ident:
                        os.unlink(self.path)
                except OSError:
                    pass

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- virtio hooks ------------------------------------------------------------------------------

    def on_activate(self) -> None:
        if self.kind == "socket" and not self._listening and self.loop is not None:
            assert self._listener is not None
            self.loop.add_reader(self._listener.fileno(), self._on_accept)
            self._listening = True
        if self.has_feature(VIRTIO_CONSOLE_F_SIZE):
            # Linux reads cols/rows only when told the config changed (module docstring).
            self.on_config_changed()
        # Both queues are scanned by the transport right after this (DRIVER_OK scan).

    def on_reset(self) -> None:
        # The chains belong to the old rings; the host connection and unsent output survive
        # (output already completed to the guest is the host's to deliver).
        self._rx_held.clear()
        self._tx_chain = None
        self._tx_reader = None
        self._set_reader(None)

    def set_queue(self, index: int, queue: Virtqueue | None) -> None:
        with self.lock:
            super().set_queue(index, queue)
            if index == RECEIVEQ:
                self._rx_held.clear()
                self._update_reading()
            elif index == TRANSMITQ:
                self._tx_chain = None
                self._tx_reader = None

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        if index == RECEIVEQ:
            # The driver posted receive buffers: (re)start reading the host input.
            self._update_reading()
        elif index == TRANSMITQ:
            self._pump_tx()

    def write_config(self, offset: int, size: int, value: int) -> None:
        if offset == CONFIG_EMERG_WR and size in (1, 2, 4):
            # §5.3.6.2: the low byte written to emerg_wr is one character of output.  Nothing is
            # stored: emerg_wr reads as 0.
            with self.lock:
                if len(self._out) >= EMERG_LIMIT:
                    self.metrics["dropped_bytes"] += 1
                    return
                self._out.append(value & 0xFF)
                self.metrics["emerg_bytes"] += 1
                self._schedule_flush()
            return
        self.ratelog.debug(("cfgwrite", offset, size), "%s: ignored config write at %#x/%d",
                           self.name, offset, size)

    # -- transmit: guest → host -------------------------------------------------------------------

    def _pump_tx(self) -> None:
        """Copy transmit chains to the output until the ring is empty or the sink is full."""
        q = self._queue(TRANSMITQ)
        if q is None:
            return
        budget = TX_BUDGET_BYTES
        chains = TX_BUDGET_CHAINS
        completed = False
        yielded = False
        out = self._out
        while True:
            if budget <= 0 or chains <= 0:
                yielded = True  # let the loop serve other fds; continue from a timer
                break
            if self._tx_chain is None:
                if len(out) >= OUTPUT_LIMIT:
                    self._flush()
                    if len(out) >= OUTPUT_LIMIT:
                        # Back-pressure: leave the chains in the ring; the retry timer that
                        # _flush armed resumes here once the sink takes output again.
                        break
                chain = self._pop(q)
                if chain is None:
                    if q.enable_notifications():
                        continue  # a chain raced in while re-arming kicks (§4.4)
                    break
                chains -= 1
                self.metrics["chains"] += 1
                self._tx_chain = chain
                self._tx_reader = chain.reader()
            reader = self._tx_reader
            assert reader is not None
            if reader.remaining:
                room = OUTPUT_LIMIT - len(out)
                if room <= 0:
                    self._flush()
                    room = OUTPUT_LIMIT - len(out)
                    if room <= 0:
                        break  # as above: the retry timer resumes this chain
                data = reader.read(min(room, reader.remaining, budget))
                out += data
                budget -= len(data)
                self.metrics["tx_bytes"] += len(data)
            if not reader.remaining:
                # A transmit buffer is device-readable only: nothing written, used.len = 0.
                q.add_used(self._tx_chain, 0)
                self._tx_chain = None
                self._tx_reader = None
                completed = True
        if completed:
            self.signal_used(q)
        self._flush()
        if yielded and self.loop is not None:
            self._arm_timer(0.0)

    def _flush(self) -> None:
        """Give pending output to the sink without blocking; arm a retry if it is full."""
        out = self._out
        if not out:
            return
        if self.kind == "socket" and self._client is None:
            self._to_backlog(out)
            out.clear()
            return
        if self._out_broken:
            self.metrics["dropped_bytes"] += len(out)
            out.clear()
            return
        # Bounded: each pass moves a chunk or stops.
        chunk = self._out_chunk
        for _ in range(2 + len(out) // chunk):
            if not out:
                break
            n = self._sink_write(bytes(out[:chunk]))
            if n is None:  # the sink is gone: what is left goes where output goes now
                self._flush()
                return
            if n == 0:
                break
            del out[:n]
        if out:
            self._arm_timer(RETRY_SECONDS)

    def _sink_write(self, data: bytes) -> int | None:
        """Write without blocking; the count taken (0: try later), or None if the sink is gone."""
        if self.kind == "socket":
            client = self._client
            assert client is not None
            try:
                return client.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return 0
            except OSError as e:
                self.ratelog.warning(("client", e.errno), "%s: client gone: %s", self.name, e)
                self._drop_client()
                return None
        # stdio: never O_NONBLOCK on a shared stdout (it would leak into the user's shell);
        # poll first, then write at most PIPE_BUF, which a writable pipe takes without blocking.
        try:
            events = self._out_poll.poll(0)
        except OSError:
            return 0
        if not events:
            return 0
        ev = events[0][1]
        if ev & (select.POLLERR | select.POLLNVAL) or not ev & select.POLLOUT:
            self._stdout_broken(f"poll reports {ev:#x}")
            return None
        try:
            return os.write(self._out_fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            self._stdout_broken(str(e))
            return None

    def _stdout_broken(self, why: str) -> None:
        self.ratelog.warning(("stdout",), "%s: stdout unusable (%s): guest output dropped",
                             self.name, why)
        self._out_broken = True

    def _to_backlog(self, data: bytes | bytearray) -> None:
        backlog = self._backlog
        backlog += data
        excess = len(backlog) - BACKLOG_LIMIT
        if excess > 0:
            del backlog[:excess]
            self.metrics["dropped_bytes"] += excess

    def _final_flush(self) -> None:
        """At close: what the sink takes within about a second; the rest is dropped."""
        for _ in range(100):
            self._flush()
            if not self._out or self._out_broken:
                break
            if self.kind == "stdio":
                try:
                    self._out_poll.poll(10)
                except OSError:
                    break
            elif self._client is not None:
                select.select([], [self._client], [], 0.01)
        self.metrics["dropped_bytes"] += len(self._out)
        self._out.clear()

    def _schedule_flush(self) -> None:
        """Flush from any thread: on the loop if there is one (timers are loop-only)."""
        if self.loop is None:
            self._flush()
        elif not self._flush_queued:
            # One queued callback at a time: a driver looping on emerg_wr must not grow the
            # loop's callback list.
            self._flush_queued = True
            self.loop.call_soon_threadsafe(self._flush_locked)

    def _flush_locked(self) -> None:
        with self.lock:
            self._flush_queued = False
            if not self._closed:
                self._flush()

    def _arm_timer(self, delay: float) -> None:
        if self._timer is None and self.loop is not None and not self._closed:
            self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._timer = None
            self._flush()
            if self.active:
                try:
                    self._pump_tx()
                except GuestError as e:
                    self.fail(f"transmitq: {e}")

    # -- receive: host → guest --------------------------------------------------------------------

    def _input_fd(self) -> int | None:
        if self.kind == "socket":
            return self._client.fileno() if self._client is not None else None
        return None if self._in_done else self._in_fd

    def _update_reading(self) -> None:
        """Read the host input exactly while the guest has receive buffers posted."""
        fd = self._input_fd()
        want = False
        if fd is not None and self.active and not self._closed:
            q = self._queue(RECEIVEQ)
            if q is not None:
                want = bool(self._rx_held) or q.has_available()
                if not want:
                    # Going idle: re-arm the driver's kicks, then look once more (§4.4).
                    want = q.enable_notifications()
        self._set_reader(fd if want else None)

    def _set_reader(self, fd: int | None) -> None:
        if fd == self._reading_fd or self.loop is None:
            return
        if self._reading_fd is not None:
            _quiet_remove_reader(self.loop, self._reading_fd)
            self._reading_fd = None
        if fd is None:
            return
        try:
            self.loop.add_reader(fd, lambda fd=fd: self._on_input(fd))
        except (PermissionError, ValueError, OSError) as e:
            # epoll refuses regular files and /dev/null: such a stdin never has input.
            log.info("%s: input fd %d cannot be polled (%s): no console input", self.name, fd, e)
            self._in_done = True
            return
        self._reading_fd = fd

    def _on_input(self, fd: int) -> None:
        with self.lock:
            if fd != self._reading_fd or not self.active:
                return
            try:
                self._receive(fd)
            except GuestError as e:
                self.fail(f"receiveq: {e}")
                return
            self._update_reading()

    def _receive(self, fd: int) -> None:
        """One ``readv`` from ``fd`` straight into the held receive buffers."""
        q = self._queue(RECEIVEQ)
        if q is None:
            return
        held = self._rx_held
        completed = False
        while len(held) < RX_BATCH_CHAINS:
            chain = self._pop(q)
            if chain is None:
                break
            self.metrics["chains"] += 1
            if not chain.writable_len:
                # Nothing can be delivered into it (wrong direction or empty): give it back.
                self._invalid(f"receive chain {chain.head} has no writable bytes")
                q.add_used(chain, 0)
                completed = True
                continue
            held.append(chain)
        if held:
            iov: list[memoryview] = []
            plan: list[int] = []
            budget = RX_BATCH_BYTES
            for chain in held:
                if budget <= 0 or len(iov) >= RX_MAX_IOV:
                    break
                views = chain.writer().views(min(chain.writable_len, budget))
                views = views[: RX_MAX_IOV - len(iov)]
                covered = sum(v.nbytes for v in views)
                iov.extend(views)
                plan.append(covered)
                budget -= covered
            try:
                n = os.readv(fd, iov)
            except (BlockingIOError, InterruptedError):
                n = -1
            except OSError as e:
                self.ratelog.warning(("input", e.errno), "%s: input error: %s", self.name, e)
                n = 0
            if n == 0:
                self._input_closed()
            for covered in plan:
                if n <= 0:
                    break
                k = min(n, covered)
                q.add_used(held.popleft(), k)
                self.metrics["rx_bytes"] += k
                n -= k
                completed = True
        if completed:
            self.signal_used(q)

    def _input_closed(self) -> None:
        if self.kind == "socket":
            self._drop_client()
        else:
            log.info("%s: end of input on fd %d", self.name, self._in_fd)
            self._in_done = True
            self._set_reader(None)

    # -- socket clients ----------------------------------------------------------------------------

    def _on_accept(self) -> None:
        with self.lock:
            listener = self._listener
            if listener is None:
                return
            for _ in range(8):  # bounded: the backlog is tiny anyway
                try:
                    conn, _addr = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:
                    self.ratelog.warning(("accept", e.errno), "%s: accept: %s", self.name, e)
                    return
                if self._client is not None:
                    # One client at a time: the second learns it at once (EOF), not by a hang.
                    self.metrics["refused_clients"] += 1
                    self.ratelog.warning(("refused",), "%s: a client is already connected: "
                                         "refused another", self.name)
                    conn.close()
                    continue
                conn.setblocking(False)
                self._client = conn
                self.metrics["clients"] += 1
                # Replay what the guest wrote while nobody listened, then the rest.
                self._out[:0] = self._backlog
                self._backlog.clear()
                self._flush()
                self._update_reading()

    def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        if self._reading_fd == client.fileno():
            self._set_reader(None)
        client.close()

    # -- helpers -----------------------------------------------------------------------------------

    def _queue(self, index: int) -> Virtqueue | None:
        if not self.active or index >= len(self.queues):
            return None
        return self.queues[index]

    def _pop(self, q: Virtqueue) -> DescriptorChain | None:
        """The next valid chain; invalid ones are returned with used.len 0 and counted.

        A broken ring (QueueError other than ChainError) propagates: DEVICE_NEEDS_RESET.
        """
        for _ in range(q.size):
            try:
                return q.pop()
            except ChainError as e:
                self._invalid(str(e))
                if e.chain is not None:
                    q.add_used(e.chain, 0)
                    self.signal_used(q)
        raise QueueError(f"queue {q.index}: more than {q.size} invalid chains in a row")

    def _invalid(self, why: str) -> None:
        self.metrics["invalid_chains"] += 1
        self.ratelog.warning(("invalid", why[:40]), "%s: %s", self.name, why)

    def _control(self, args: list[str]) -> dict[str, Any]:
        if args == ["size"]:
            cols, rows = self.size
            return {"cols": cols, "rows": rows}
        if len(args) == 3 and args[0] == "resize":
            try:
                cols, rows = int(args[1]), int(args[2])
            except ValueError:
                raise ValueError(
                    f"resize {args[1]} {args[2]}: COLS and ROWS must be integers"
                ) from None
            self.resize(cols, rows)
            return {"cols": cols, "rows": rows}
        raise ValueError("usage: console size | console resize COLS ROWS")


# -- module helpers --------------------------------------------------------------------------------


def _terminal_size(fds: tuple[int, ...]) -> tuple[int, int] | None:
    """(cols, rows) of the first terminal among ``fds`` that knows its size."""
    for fd in fds:
        try:
            rows, cols, _x, _y = _WINSIZE.unpack(
                fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(_WINSIZE.size))
            )
        except OSError:
            continue
        if rows and cols:
            return cols, rows
    return None


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _quiet_remove_reader(loop: Any, fd: int) -> None:
    try:
        loop.remove_reader(fd)
    except (OSError, RuntimeError, ValueError):
        pass  # the loop may already be closed at VMM shutdown


def _listen(path: Path) -> tuple[socket.socket, tuple[int, int] | None]:
    """A listening Unix socket at ``path``, replacing a stale one (nobody listening)."""
    label = f"--console socket:{path}"
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ConfigError(f"{label}: path longer than {_SUN_PATH_MAX} bytes; use a shorter one")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ConfigError(f"{label}: {e.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{label}: exists and is not a socket; choose another path or "
                              "remove the file")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(1.0)
            probe.connect(os.fspath(path))
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise ConfigError(f"{label}: cannot check the existing socket: "
                                  f"{e.strerror}") from None
        else:
            raise ConfigError(f"{label}: another process is serving this socket")
        finally:
            probe.close()
        try:
            os.unlink(path)  # a leftover of a VMM that died
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ConfigError(f"{label}: cannot remove the stale socket: {e.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(os.fspath(path))
        sock.listen(2)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ConfigError(f"{label}: cannot listen: {e.strerror}") from None
    return sock, _identity(path)
