"""The host side of virtio-vsock: guest AF_VSOCK streams relayed to host AF_UNIX streams.

This is Firecracker's "hybrid vsock" (``devices/virtio/vsock/unix/muxer.rs`` and
``csm/connection.rs``), with the same conventions so that tools written for Firecracker work:

* **host-initiated**: a host process connects to ``uds_path`` and writes ``CONNECT <port>\\n``
  (the word is case-insensitive, extra words are ignored, the line is at most 32 bytes).  The
  muxer picks a host port in [2**30, 2**31), sends a REQUEST to guest port ``<port>`` and, on the
  guest's RESPONSE, writes ``OK <host port>\\n`` back; from then on the Unix stream carries the
  connection's bytes.  RST (no guest listener), a bad line or no RESPONSE within
  :data:`CONN_REQUEST_TIMEOUT` closes the host stream;
* **guest-initiated**: a REQUEST to CID 2 port ``P`` connects, without blocking, to the Unix
  socket ``<uds_path>_P``; success is answered with RESPONSE, failure (no such socket, nobody
  listening, backlog full) with RST.

Packets (virtio 1.2 §5.10.6) come in as a parsed header plus a :class:`ChainReader` over the
payload and go out into a :class:`ChainWriter`: nothing here knows about virtqueues.  The device
(``vsock.py``) owns the queues; this module owns the sockets.

Flow control (§5.10.6 "Buffer Space Management"), both directions, per connection:

* host → guest: data is read from the host socket *straight into the guest's rx buffer*
  (``recv_into`` on guest-RAM views), at most ``min(guest credit, buffer room)`` bytes, and only
  when the guest has posted a buffer.  Nothing is ever read that cannot be forwarded, so there is
  no host → guest buffering at all; while a connection cannot forward, its socket is not polled
  for input (no busy loop on a level-triggered epoll).  When the guest's credit is exhausted a
  single CREDIT_REQUEST is sent (Firecracker does the same); Linux also sends CREDIT_UPDATEs on
  its own as its reader drains;
* guest → host: the device advertises ``buf_alloc =`` :data:`CONN_BUF_ALLOC` and ``fwd_cnt`` =
  bytes written to the host socket.  RW payloads are written to the host socket directly from
  guest RAM (``sendmsg`` on the views); what the socket does not take waits in a per-connection
  buffer that a compliant guest can never overflow (it is bounded by the credit we gave).  A guest
  that overflows it anyway is reset.  A CREDIT_UPDATE is sent whenever :data:`CREDIT_UPDATE_STEP`
  bytes were forwarded since the guest last heard our ``fwd_cnt`` (every packet carries it).

Closing (§5.10.6 "Stream Sockets"): a guest SHUTDOWN with SEND half-closes the host stream
(``shutdown(SHUT_WR)`` once buffered data is out); SEND|RCV (the guest closed) closes it and
answers RST.  Host EOF is forwarded as SHUTDOWN: with only SEND if the host half-closed
(``shutdown(SHUT_WR)``: it may still read), with SEND|RCV if it closed for good (``POLLHUP``;
Firecracker sends both flags on any EOF).  A connection the guest does not finish within
:data:`CONN_SHUTDOWN_TIMEOUT` is reset.  Any RST closes the host stream at once; a host socket
error resets the guest side.

Limits: :data:`MAX_CONNECTIONS` connections (host handshakes included, as Firecracker), a bounded
queue of RSTs for unknown connections (:data:`RST_QUEUE_SIZE`), bounded handshake lines.

Threads: the device calls in with its lock held, on the event-loop thread (register writes from
vCPU threads only reach :meth:`VsockMuxer.reset`).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import select
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from typing import Any

from ...errors import ConfigError
from ...logutil import RateLimitedLog
from .queue import ChainReader, ChainWriter

log = logging.getLogger(__name__)

# -- §5.10.6 packet header and constants (Linux include/uapi/linux/virtio_vsock.h names) --------
#: le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port, le32 len, le16 type, le16 op,
#: le32 flags, le32 buf_alloc, le32 fwd_cnt
HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size  # 44

VMADDR_CID_HOST = 2
VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_TYPE_SEQPACKET = 2

VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7

VIRTIO_VSOCK_SHUTDOWN_RCV = 1
VIRTIO_VSOCK_SHUTDOWN_SEND = 2
_SHUTDOWN_BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND

# -- limits and timing ----------------------------------------------------------------------------
#: Receive buffer the device advertises per connection (guest → host bytes not yet written to the
#: host socket).  Linux's own default is 256 KiB (VIRTIO_VSOCK_DEFAULT_BUF_SIZE); Firecracker uses
#: 64 KiB.  The buffer only fills while the host reader is slower than the guest.
CONN_BUF_ALLOC = 256 * 1024
#: Forwarded bytes after which the guest is told our new ``fwd_cnt`` (CREDIT_UPDATE), unless a
#: packet carried it meanwhile.  A quarter of the window: the guest never stalls on stale credit.
CREDIT_UPDATE_STEP = CONN_BUF_ALLOC // 4
#: Largest RW payload accepted from the guest: VIRTIO_VSOCK_MAX_PKT_BUF_SIZE (Linux sends at
#: most 4 KiB or 64 KiB per packet, depending on the version).
MAX_PKT_PAYLOAD = 64 * 1024
#: Largest RW payload sent to the guest (further bounded by its buffer and its credit).
MAX_RX_PAYLOAD = 64 * 1024
#: Connections, including host streams that have not sent their CONNECT line (Firecracker).
MAX_CONNECTIONS = 1023
#: RSTs for unknown connections waiting for rx buffers; more are dropped (Firecracker's
#: MUXER_RXQ_SIZE).  Only a misbehaving guest gets anywhere near it.
RST_QUEUE_SIZE = 256
#: Seconds the guest has to answer our REQUEST, and to finish a shutdown (Firecracker: 2 s each).
CONN_REQUEST_TIMEOUT = 2.0
CONN_SHUTDOWN_TIMEOUT = 2.0
#: Longest ``CONNECT <port>\n`` line, newline included (Firecracker reads at most 32 bytes).
CONNECT_LINE_MAX = 32
#: Host-initiated connections get host ports in [2**30, 2**31), allocated round-robin.
LOCAL_PORT_FIRST = 1 << 30
#: Accepts per listener event, and seconds to stop polling the listener when accept fails for
#: lack of file descriptors (the pending connection keeps the listener readable: polling it would
#: spin).
ACCEPT_BATCH = 32
ACCEPT_PAUSE = 0.1
#: Host socket events handled per call of :meth:`VsockMuxer.handle_events`; the nested epoll fd
#: stays readable while more are ready, so the loop comes back for them.
MAX_EVENTS = 64
LISTEN_BACKLOG = 128

# Unix socket paths are limited by sockaddr_un.sun_path (108 bytes with the NUL).
_SUN_PATH_MAX = 107
_U32 = 0xFFFF_FFFF
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_HUPERR = select.EPOLLHUP | select.EPOLLERR
_NOSIGNAL = socket.MSG_NOSIGNAL

# Connection states.  Shutdown progress is kept in flags beside the state (guest_shut /
# host_shut), like TCP's half-close: the two directions end independently.
LOCAL_INIT = 0  # host-initiated, REQUEST queued or sent, waiting for the guest's RESPONSE
PEER_INIT = 1  # guest-initiated, host socket connected, RESPONSE queued
ESTABLISHED = 2
DEAD = 3  # host socket closed; an RST for the guest is queued (or the connection is gone)
STATE_NAMES = ("local-init", "peer-init", "established", "dead")

# Control packets a connection owes the guest (a set, as Firecracker's PendingRxSet).
_P_REQUEST = 1
_P_RESPONSE = 2
_P_CREDIT_UPDATE = 4
_P_CREDIT_REQUEST = 8
_P_RST = 16

METRIC_NAMES = (
    "tx_packets",  # packets from the guest
    "rx_packets",  # packets to the guest
    "tx_bytes",  # guest → host payload bytes accepted
    "rx_bytes",  # host → guest payload bytes delivered
    "tx_dropped",  # guest packets dropped (malformed, misaddressed, invalid for the state)
    "rx_buffer_errors",  # rx buffers too small for a header (returned with used.len 0)
    "conns_added",
    "conns_removed",
    "conns_killed",  # reset by the device (timeouts, host errors, guest protocol violations)
    "connect_refused",  # guest REQUESTs with nobody listening on <uds_path>_<port>
    "host_rejected",  # host streams closed before becoming a connection (bad line, limit)
    "rst_dropped",  # RSTs for unknown connections dropped because the RST queue was full
)


class Connection:
    """One vsock stream: a guest (CID, port) ↔ a host Unix stream, and its credit counters."""

    __slots__ = (
        "local_port", "peer_port", "sock", "fd", "state", "pending", "local_init", "readable",
        "guest_shut", "host_shut", "shut_wr", "peer_buf_alloc", "peer_fwd_cnt", "rx_cnt",
        "fwd_cnt", "last_fwd_sent", "credit_requested", "tx_buf", "deadline", "queued", "events",
    )

    def __init__(
        self,
        local_port: int,
        peer_port: int,
        sock: socket.socket,
        state: int,
        pending: int,
        *,
        local_init: bool,
        peer_buf_alloc: int = 0,
        peer_fwd_cnt: int = 0,
    ) -> None:
        self.local_port = local_port  # host side: the port the guest addresses
        self.peer_port = peer_port  # the guest's port
        self.sock: socket.socket | None = sock
        self.fd = sock.fileno()
        self.state = state
        self.pending = pending
        self.local_init = local_init  # local_port was allocated by us (host-initiated)
        self.readable = False  # the host socket has input (or EOF) we have not read yet
        self.guest_shut = 0  # SHUTDOWN flags received from the guest
        self.host_shut = 0  # SHUTDOWN flags sent to the guest (host EOF / host gone)
        self.shut_wr = False  # shutdown(SHUT_WR) done on the host socket
        # host → guest credit (§5.10.6): the guest's buffer and what it consumed of ours
        self.peer_buf_alloc = peer_buf_alloc
        self.peer_fwd_cnt = peer_fwd_cnt
        self.rx_cnt = 0  # payload bytes sent to the guest (u32, free-running)
        # guest → host credit: our fwd_cnt, and the value the guest last saw
        self.fwd_cnt = 0
        self.last_fwd_sent = 0
        self.credit_requested = False
        self.tx_buf = bytearray()  # guest bytes the host socket has not taken yet
        self.deadline: float | None = None
        self.queued = False  # in the muxer's ready queue
        self.events = 0  # epoll mask registered for the host socket (0 = not registered)

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    def credit(self) -> int:
        """Payload bytes the guest can take now: buf_alloc - (rx_cnt - fwd_cnt), u32 counters."""
        c = self.peer_buf_alloc - ((self.rx_cnt - self.peer_fwd_cnt) & _U32)
        return c if c > 0 else 0

    def can_send_data(self) -> bool:
        """Whether host → guest data may still flow on this connection."""
        return (
            self.state == ESTABLISHED
            and not self.host_shut
            and not self.guest_shut & VIRTIO_VSOCK_SHUTDOWN_RCV
        )

    def wants_rx(self) -> bool:
        """Whether the connection has a packet for the guest (a control packet or data)."""
        if self.pending:
            return True
        return self.readable and self.can_send_data() and self.credit() > 0

    def wanted_events(self) -> int:
        """The epoll mask for the host socket: input only while it could be forwarded."""
        if self.state == DEAD:
            return 0
        ev = 0
        if (
            (self.state == ESTABLISHED or self.state == PEER_INIT)
            and not self.readable
            and not self.host_shut
            and not self.guest_shut & VIRTIO_VSOCK_SHUTDOWN_RCV
        ):
            ev = _IN
        if self.tx_buf:
            ev |= _OUT
        return ev

    def __repr__(self) -> str:
        return (
            f"Connection(host_port={self.local_port}, guest_port={self.peer_port}, "
            f"state={STATE_NAMES[self.state]}, pending={self.pending:#x}, "
            f"guest_shut={self.guest_shut}, host_shut={self.host_shut}, "
            f"credit={self.credit()}, buffered={len(self.tx_buf)})"
        )


class _Handshake:
    """A host stream that has not finished its ``CONNECT <port>`` line yet."""

    __slots__ = ("sock", "fd", "buf")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = b""


def parse_connect_line(line: bytes) -> int | None:
    """The port of a ``CONNECT <port>\\n`` line, or None (Firecracker's parsing rules)."""
    if len(line) > CONNECT_LINE_MAX or not line.endswith(b"\n"):
        return None
    words = line.split()
    if len(words) < 2 or words[0].lower() != b"connect":
        return None
    word = words[1]
    # isdigit on bytes is ASCII-only; int() alone would also take "+5", "5_0" or " 5".
    if not word.isdigit() or len(word) > 10:
        return None
    port = int(word)
    return port if port <= _U32 else None


def _write_views(views: list[memoryview], data: bytes) -> None:
    """Copy ``data`` into consecutive guest-RAM views covering exactly ``len(data)`` bytes."""
    if len(views) == 1:
        views[0][:] = data
        return
    pos = 0
    for v in views:
        n = len(v)
        v[:] = data[pos : pos + n]
        pos += n


def _peer_gone(sock: socket.socket) -> bool:
    """True if the peer of a Unix stream closed both directions (not just ``shutdown(WR)``).

    AF_UNIX marks a socket SHUTDOWN_MASK when its peer is released, and only then reports
    POLLHUP (``unix_poll``); a peer's ``shutdown(SHUT_WR)`` sets just RCV_SHUTDOWN (POLLRDHUP).
    """
    p = select.poll()
    p.register(sock.fileno(), select.POLLOUT)
    return any(ev & select.POLLHUP for _fd, ev in p.poll(0))


def _bind_listener(path: str) -> tuple[socket.socket, int]:
    """Listen on ``path``; replace a stale socket file, refuse anything else already there."""
    what = f"--vsock uds={path}"
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise ConfigError(f"{what}: a Unix socket path is at most {_SUN_PATH_MAX} bytes "
                          "(and <path>_<port> must fit too): use a shorter path")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ConfigError(f"{what}: {e.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{what}: the path exists and is not a socket; remove it or "
                              "choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            # A socket file nobody listens on: left behind by an earlier run.
            try:
                os.unlink(path)
            except OSError as e:
                raise ConfigError(f"{what}: stale socket cannot be removed: {e.strerror}") from None
        except OSError:
            pass  # bind() below reports the problem
        else:
            raise ConfigError(f"{what}: another process is listening on this socket "
                              "(is another embervm using it?)")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        ino = os.stat(path).st_ino
    except OSError as e:
        sock.close()
        raise ConfigError(f"{what}: cannot listen: {e.strerror}") from None
    return sock, ino


class VsockMuxer:
    """All vsock connections of one device, their host sockets and what they owe the guest.

    The device registers :meth:`fileno` (a nested epoll fd, as Firecracker's muxer) on the event
    loop and calls :meth:`handle_events` when it is readable; it feeds guest packets to
    :meth:`send_pkt`, asks :meth:`has_pending_rx` / :meth:`recv_pkt` for packets when the guest
    has rx buffers, and runs :meth:`expire` at :meth:`next_deadline`.
    """

    def __init__(
        self,
        guest_cid: int,
        uds_path: str | os.PathLike[str],
        metrics: MutableMapping[str, int] | None = None,
        ratelog: RateLimitedLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.guest_cid = guest_cid
        self.uds_path = os.fspath(uds_path)
        self.metrics: MutableMapping[str, int] = metrics if metrics is not None else {}
        for name in METRIC_NAMES:
            self.metrics.setdefault(name, 0)
        self._log = ratelog or RateLimitedLog(log)
        self._clock = clock
        self._listener, self._listener_ino = _bind_listener(self.uds_path)
        self._listener_fd = self._listener.fileno()
        try:
            self._epoll = select.epoll()
            self._epoll.register(self._listener_fd, _IN)
        except OSError as e:
            self._listener.close()
            raise ConfigError(f"vsock: cannot create an epoll instance: {e.strerror}") from None
        self._listener_paused_until: float | None = None
        self._conns: dict[tuple[int, int], Connection] = {}
        self._fds: dict[int, Connection | _Handshake] = {}
        self._handshakes = 0
        self._ready: deque[Connection] = deque()
        self._rsts: deque[tuple[int, int]] = deque()
        self._local_ports: set[int] = set()
        self._port_last = LOCAL_PORT_FIRST - 1
        self._timers: list[tuple[float, int, Connection]] = []
        self._seq = itertools.count()
        self._closed = False

    # -- introspection ------------------------------------------------------------------------

    def fileno(self) -> int:
        """The nested epoll fd: readable when a host socket of this muxer has an event."""
        return self._epoll.fileno()

    @property
    def connections(self) -> dict[tuple[int, int], Connection]:
        """Live connections by (host port, guest port) (read-only use)."""
        return self._conns

    @property
    def handshakes(self) -> int:
        """Host streams waiting for their CONNECT line."""
        return self._handshakes

    def status(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for c in self._conns.values():
            states[STATE_NAMES[c.state]] = states.get(STATE_NAMES[c.state], 0) + 1
        return {"uds": self.uds_path, "connections": len(self._conns), "states": states,
                "handshakes": self._handshakes}

    # -- host events --------------------------------------------------------------------------

    def handle_events(self) -> None:
        """Serve the host sockets that are ready (non-blocking, bounded)."""
        if self._closed:
            return
        try:
            events = self._epoll.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        for fd, ev in events:
            if fd == self._listener_fd:
                self._accept()
                continue
            obj = self._fds.get(fd)
            if obj is None:
                continue  # closed earlier in this batch
            if type(obj) is _Handshake:
                self._read_connect_line(obj)
            else:
                self._conn_event(obj, ev)  # type: ignore[arg-type]

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE/ENFILE/ENOBUFS: the connection stays queued and the listener readable,
                # so stop polling it for a moment instead of spinning on it.
                self._log.warning(("accept", e.errno), "vsock: accept on %s failed: %s",
                                  self.uds_path, e.strerror)
                self._pause_listener()
                return
            if len(self._conns) + self._handshakes >= MAX_CONNECTIONS:
                self.metrics["host_rejected"] += 1
                self._log.warning("conn-limit", "vsock: %d connections: refusing a host "
                                  "connection on %s", MAX_CONNECTIONS, self.uds_path)
                sock.close()
                continue
            sock.setblocking(False)
            hs = _Handshake(sock)
            try:
                self._epoll.register(hs.fd, _IN)
            except OSError:
                sock.close()
                continue
            self._fds[hs.fd] = hs
            self._handshakes += 1

    def _pause_listener(self) -> None:
        if self._listener_paused_until is None:
            try:
                self._epoll.unregister(self._listener_fd)
            except OSError:
                pass
        self._listener_paused_until = self._clock() + ACCEPT_PAUSE

    def _resume_listener(self) -> None:
        if self._listener_paused_until is not None:
            self._listener_paused_until = None
            try:
                self._epoll.register(self._listener_fd, _IN)
            except OSError:
                pass

    def _drop_handshake(self, hs: _Handshake, why: str | None, *, keep: bool = False) -> None:
        """Forget a handshake stream; close it unless ``keep`` (it becomes a connection)."""
        self._fds.pop(hs.fd, None)
        self._handshakes -= 1
        try:
            self._epoll.unregister(hs.fd)
        except OSError:
            pass
        if why is not None:
            self.metrics["host_rejected"] += 1
            self._log.warning(("handshake", why), "vsock: host connection on %s closed: %s",
                              self.uds_path, why)
        if not keep:
            hs.sock.close()

    def _read_connect_line(self, hs: _Handshake) -> None:
        """Read ``CONNECT <port>\\n`` without consuming a byte after the newline.

        Firecracker reads byte by byte and fails if the line arrives in pieces; here a partial
        line is kept, and whatever the host sent after the newline (it may pipeline data before
        ``OK``) stays in the socket for the guest.
        """
        sock = hs.sock
        try:
            data = sock.recv(CONNECT_LINE_MAX, socket.MSG_PEEK)
            if not data:
                # A client that connects and leaves (a probe) is not an error.
                self._drop_handshake(hs, "closed before a CONNECT line" if hs.buf else None)
                return
            nl = data.find(b"\n")
            if nl < 0:
                if len(hs.buf) + len(data) >= CONNECT_LINE_MAX:
                    self._drop_handshake(hs, "no newline within 32 bytes")
                    return
                hs.buf += sock.recv(len(data))
                return
            line = hs.buf + sock.recv(nl + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop_handshake(hs, f"read error: {e.strerror}")
            return
        port = parse_connect_line(line)
        if port is None:
            self._drop_handshake(hs, "expected 'CONNECT <port>\\n'")
            return
        self._drop_handshake(hs, None, keep=True)
        local_port = self._alloc_port(port)
        conn = Connection(local_port, port, sock, LOCAL_INIT, _P_REQUEST, local_init=True)
        # The REQUEST must reach the guest in time too (it needs an rx buffer): a guest that
        # posts none must not collect host streams whose closing nobody watches.
        self._set_deadline(conn, CONN_REQUEST_TIMEOUT)
        self._add(conn)

    def _alloc_port(self, peer_port: int) -> int:
        # Bounded: at most MAX_CONNECTIONS of the 2**30 ports are in use.
        while True:
            p = ((self._port_last + 1) & ~(1 << 31)) | LOCAL_PORT_FIRST
            self._port_last = p
            if p not in self._local_ports and (p, peer_port) not in self._conns:
                self._local_ports.add(p)
                return p

    def _conn_event(self, conn: Connection, ev: int) -> None:
        # HUP/ERR are reported whatever the mask: they surface through the operation the
        # connection was waiting for (a read returns EOF/error, a write fails).
        if ev & _OUT or (ev & _HUPERR and conn.tx_buf):
            self._flush(conn)
        if conn.state != DEAD and conn.events & _IN and ev & (_IN | _HUPERR):
            conn.readable = True
        self._update(conn)

    # -- connection bookkeeping ------------------------------------------------------------------

    def _add(self, conn: Connection) -> None:
        self._conns[conn.key] = conn
        self._fds[conn.fd] = conn
        self.metrics["conns_added"] += 1
        self._update(conn)

    def _update(self, conn: Connection) -> None:
        """After any change: fix the epoll mask, ask for credit, queue the connection for rx."""
        want = conn.wanted_events()
        if want != conn.events:
            try:
                if conn.events == 0:
                    self._epoll.register(conn.fd, want)
                elif want == 0:
                    self._epoll.unregister(conn.fd)
                else:
                    self._epoll.modify(conn.fd, want)
                conn.events = want
            except OSError as e:
                self._log.warning(("epoll", e.errno), "vsock: epoll_ctl failed: %s", e.strerror)
                self.kill(conn, "epoll_ctl failed")
                return
        if (
            conn.readable
            and not conn.credit_requested
            and conn.can_send_data()
            and conn.credit() == 0
        ):
            # Data is waiting but the guest has no room: ask once (Firecracker does the same);
            # the answer, or any guest packet with more credit, resumes the flow.
            conn.credit_requested = True
            conn.pending |= _P_CREDIT_REQUEST
        if not conn.queued and conn.wants_rx():
            conn.queued = True
            self._ready.append(conn)

    def _close_sock(self, conn: Connection) -> None:
        sock = conn.sock
        if sock is None:
            return
        if conn.events:
            try:
                self._epoll.unregister(conn.fd)
            except OSError:
                pass
            conn.events = 0
        if self._fds.get(conn.fd) is conn:
            del self._fds[conn.fd]
        conn.sock = None
        sock.close()

    def kill(self, conn: Connection, why: str) -> None:
        """Reset a connection: close the host stream now, owe the guest an RST."""
        if conn.state == DEAD:
            return
        self.metrics["conns_killed"] += 1
        self._log.debug(("kill", why), "vsock: resetting %r: %s", conn, why)
        self._close_sock(conn)
        conn.state = DEAD
        conn.pending = _P_RST
        conn.readable = False
        conn.tx_buf = bytearray()
        conn.deadline = None
        self._update(conn)

    def _finish(self, conn: Connection) -> None:
        """Both sides are done (the guest closed): close the host stream, RST the guest."""
        self._close_sock(conn)
        conn.state = DEAD
        conn.pending = _P_RST
        conn.readable = False
        conn.deadline = None
        self._update(conn)

    def _remove(self, conn: Connection) -> None:
        self._close_sock(conn)
        conn.state = DEAD
        conn.pending = 0
        conn.deadline = None
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
            self.metrics["conns_removed"] += 1
            if conn.local_init:
                self._local_ports.discard(conn.local_port)

    def _set_deadline(self, conn: Connection, delay: float) -> None:
        conn.deadline = when = self._clock() + delay
        heapq.heappush(self._timers, (when, next(self._seq), conn))

    def _enq_rst(self, local_port: int, peer_port: int) -> None:
        if len(self._rsts) >= RST_QUEUE_SIZE:
            self.metrics["rst_dropped"] += 1
            self._log.warning("rstq", "vsock: RST queue full; dropping RST for %d:%d",
                              local_port, peer_port)
            return
        self._rsts.append((local_port, peer_port))

    # -- guest → host ---------------------------------------------------------------------------

    def send_pkt(self, hdr: tuple[int, ...], reader: ChainReader) -> None:
        """Handle one packet from the guest; ``reader`` is positioned at its payload."""
        src_cid, dst_cid, src_port, dst_port, length, type_, op, flags, buf_alloc, fwd_cnt = hdr
        m = self.metrics
        m["tx_packets"] += 1
        if src_cid != self.guest_cid or dst_cid != VMADDR_CID_HOST:
            # Not from this guest, or for a CID we do not serve: nobody to answer (Firecracker
            # drops these too; a Linux guest then times out its connect()).
            m["tx_dropped"] += 1
            self._log.warning("cid", "vsock: dropping a packet from CID %d "
                              "to CID %d (guest is %d, host is 2)", src_cid, dst_cid,
                              self.guest_cid)
            return
        if type_ != VIRTIO_VSOCK_TYPE_STREAM:
            # Only stream sockets exist here (SEQPACKET is not offered): refuse like Linux.
            m["tx_dropped"] += 1
            if op != VIRTIO_VSOCK_OP_RST:
                self._enq_rst(dst_port, src_port)
            return
        conn = self._conns.get((dst_port, src_port))
        if conn is None:
            if op == VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            elif op != VIRTIO_VSOCK_OP_RST:
                self._enq_rst(dst_port, src_port)
            return
        if op == VIRTIO_VSOCK_OP_RST:
            self._remove(conn)
            return
        if conn.state == DEAD:
            if op == VIRTIO_VSOCK_OP_REQUEST:
                # The guest reuses the port of a connection whose RST we still owe it: that
                # RST would now hit the new connection, so forget the old one silently.
                self._remove(conn)
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            return
        # Every packet carries the sender's credit (§5.10.6).
        conn.peer_buf_alloc = buf_alloc
        conn.peer_fwd_cnt = fwd_cnt
        if conn.credit_requested and conn.credit() > 0:
            conn.credit_requested = False
        if op == VIRTIO_VSOCK_OP_RW:
            self._guest_rw(conn, length, reader)
        elif op == VIRTIO_VSOCK_OP_RESPONSE and conn.state == LOCAL_INIT:
            self._established(conn)
        elif op == VIRTIO_VSOCK_OP_SHUTDOWN and conn.state == ESTABLISHED:
            self._guest_shutdown(conn, flags)
        elif op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            pass  # the credit is already taken in
        elif op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            conn.pending |= _P_CREDIT_UPDATE
        else:
            # REQUEST on a live connection, RESPONSE out of place, INVALID, unknown ops:
            # Firecracker drops these too; the connection carries on.
            m["tx_dropped"] += 1
            self._log.warning(("badop", conn.state), "vsock: dropping op %d for a %s "
                              "connection", op, STATE_NAMES[conn.state])
        self._update(conn)

    def _guest_connect(self, local_port: int, peer_port: int, buf_alloc: int,
                       fwd_cnt: int) -> None:
        if len(self._conns) + self._handshakes >= MAX_CONNECTIONS:
            self._log.warning("conn-limit-guest", "vsock: %d connections: refusing a guest "
                              "connection to port %d", MAX_CONNECTIONS, local_port)
            self._enq_rst(local_port, peer_port)
            return
        path = f"{self.uds_path}_{local_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            # AF_UNIX connects at once or fails (EAGAIN when the backlog is full): no waiting.
            sock.connect(path)
        except OSError as e:
            sock.close()
            self.metrics["connect_refused"] += 1
            self._log.debug(("connect", e.errno), "vsock: guest connect to %s: %s",
                            path, e.strerror)
            self._enq_rst(local_port, peer_port)
            return
        conn = Connection(local_port, peer_port, sock, PEER_INIT, _P_RESPONSE, local_init=False,
                          peer_buf_alloc=buf_alloc, peer_fwd_cnt=fwd_cnt)
        self._add(conn)

    def _established(self, conn: Connection) -> None:
        conn.state = ESTABLISHED
        conn.deadline = None
        # A RESPONSE that overtakes our queued REQUEST (a guest guessing ports) settles it too.
        conn.pending &= ~_P_REQUEST
        msg = b"OK %d\n" % conn.local_port
        try:
            # Raw, like Firecracker: a dozen bytes into a fresh socket always fit.
            n = conn.sock.send(msg, _NOSIGNAL) if conn.sock is not None else -1
        except OSError:
            n = -1
        if n != len(msg):
            self.kill(conn, "host stream gone before OK")

    def _guest_rw(self, conn: Connection, length: int, reader: ChainReader) -> None:
        if length == 0:
            return
        if length > MAX_PKT_PAYLOAD or length > reader.remaining:
            self.metrics["tx_dropped"] += 1
            self._log.warning("rwlen", "vsock: RW of %d bytes with %d in the buffer: resetting",
                              length, reader.remaining)
            self.kill(conn, "malformed RW")
            return
        if (
            conn.state != ESTABLISHED
            or conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND
            or conn.host_shut & VIRTIO_VSOCK_SHUTDOWN_RCV
        ):
            # Data after the guest's own SHUTDOWN(SEND), before the handshake, or for a host that
            # is gone (we told the guest with SHUTDOWN RCV): nowhere to put it.
            self.metrics["tx_dropped"] += 1
            self._log.debug(("rwstate", conn.state), "vsock: dropping RW for %r", conn)
            return
        self.metrics["tx_bytes"] += length
        views = reader.views(length)
        tx_buf = conn.tx_buf
        if tx_buf:
            # Older bytes are still waiting: keep the order.
            if len(tx_buf) + length > CONN_BUF_ALLOC:
                self._overflow(conn)
                return
            for v in views:
                tx_buf += v
            return
        sock = conn.sock
        assert sock is not None
        try:
            if len(views) == 1:
                written = sock.send(views[0], _NOSIGNAL)
            else:
                written = sock.sendmsg(views, (), _NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            written = 0
        except OSError as e:
            self.kill(conn, f"host write failed: {e.strerror}")
            return
        conn.fwd_cnt = (conn.fwd_cnt + written) & _U32
        if written < length:
            if length - written > CONN_BUF_ALLOC:
                self._overflow(conn)
                return
            skip = written
            for v in views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                tx_buf += v[skip:]
                skip = 0
        self._credit_check(conn)

    def _overflow(self, conn: Connection) -> None:
        self.metrics["tx_dropped"] += 1
        self._log.warning("overflow", "vsock: guest sent beyond the credit we gave (%d bytes "
                          "buffered): resetting", len(conn.tx_buf))
        self.kill(conn, "credit overflow")

    def _credit_check(self, conn: Connection) -> None:
        if (conn.fwd_cnt - conn.last_fwd_sent) & _U32 >= CREDIT_UPDATE_STEP:
            conn.pending |= _P_CREDIT_UPDATE

    def _flush(self, conn: Connection) -> None:
        """EPOLLOUT: write buffered guest bytes to the host socket."""
        sock = conn.sock
        if not conn.tx_buf or sock is None:
            return
        try:
            written = sock.send(conn.tx_buf, _NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.kill(conn, f"host write failed: {e.strerror}")
            return
        del conn.tx_buf[:written]
        conn.fwd_cnt = (conn.fwd_cnt + written) & _U32
        if not conn.tx_buf:
            self._drained(conn)
        if conn.state != DEAD:
            self._credit_check(conn)

    def _drained(self, conn: Connection) -> None:
        """Nothing buffered for the host any more: carry out the guest's shutdown, if any."""
        if conn.guest_shut == _SHUTDOWN_BOTH:
            self._finish(conn)
        elif conn.guest_shut & VIRTIO_VSOCK_SHUTDOWN_SEND and not conn.shut_wr:
            conn.shut_wr = True
            try:
                assert conn.sock is not None
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the host is gone; its read side will tell us

    def _guest_shutdown(self, conn: Connection, flags: int) -> None:
        flags &= _SHUTDOWN_BOTH
        if not flags:
            return
        conn.guest_shut |= flags
        if flags & VIRTIO_VSOCK_SHUTDOWN_RCV:
            conn.readable = False  # the guest will not read: stop forwarding host data
        if not conn.tx_buf:
            self._drained(conn)
        elif conn.guest_shut == _SHUTDOWN_BOTH and conn.deadline is None:
            # Give the host reader a moment to take the rest, then reset (Firecracker).
            self._set_deadline(conn, CONN_SHUTDOWN_TIMEOUT)

    # -- host → guest ---------------------------------------------------------------------------

    def has_pending_rx(self) -> bool:
        """Whether :meth:`recv_pkt` has a packet for the guest."""
        if self._rsts:
            return True
        ready = self._ready
        while ready:  # bounded: every pass drops one stale entry
            conn = ready[0]
            if conn.wants_rx():
                return True
            ready.popleft()
            conn.queued = False
        return False

    def recv_pkt(self, writer: ChainWriter) -> int:
        """Write the next packet for the guest into ``writer``; return ``used.len``.

        0 means the buffer cannot hold a header: it is returned empty (Linux drops such
        buffers) and the packet stays queued.  Call only when :meth:`has_pending_rx` is true.
        """
        if writer.remaining < HDR_SIZE:
            self.metrics["rx_buffer_errors"] += 1
            self._log.warning("rxsmall", "vsock: rx buffer of %d bytes cannot hold a header",
                              writer.remaining)
            return 0
        hv = writer.views(HDR_SIZE)
        if self._rsts:
            local_port, peer_port = self._rsts.popleft()
            _write_views(hv, HDR.pack(VMADDR_CID_HOST, self.guest_cid, local_port, peer_port, 0,
                                      VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RST, 0, 0, 0))
            self.metrics["rx_packets"] += 1
            return HDR_SIZE
        ready = self._ready
        while ready:
            conn = ready.popleft()
            conn.queued = False
            if not conn.wants_rx():
                continue
            n = self._produce(conn, hv, writer)
            if conn.state == DEAD and not conn.pending:
                self._remove(conn)  # its RST just went out
            else:
                self._update(conn)  # back of the queue if it has more: round-robin
            self.metrics["rx_packets"] += 1
            return n
        # Nothing to say after all (the caller did not check has_pending_rx): an empty buffer.
        return 0

    def _hdr(self, conn: Connection, op: int, length: int = 0, flags: int = 0) -> bytes:
        conn.last_fwd_sent = conn.fwd_cnt
        conn.pending &= ~_P_CREDIT_UPDATE  # every packet tells the guest our fwd_cnt
        return HDR.pack(VMADDR_CID_HOST, self.guest_cid, conn.local_port, conn.peer_port, length,
                        VIRTIO_VSOCK_TYPE_STREAM, op, flags, CONN_BUF_ALLOC, conn.fwd_cnt)

    def _produce(self, conn: Connection, hv: list[memoryview], writer: ChainWriter) -> int:
        """One packet of ``conn`` into the rx buffer (header views ``hv`` already reserved)."""
        p = conn.pending
        if p & _P_RST:
            conn.pending = 0
            _write_views(hv, self._hdr(conn, VIRTIO_VSOCK_OP_RST))
            return HDR_SIZE
        if p & _P_RESPONSE:
            conn.pending &= ~_P_RESPONSE
            conn.state = ESTABLISHED
            _write_views(hv, self._hdr(conn, VIRTIO_VSOCK_OP_RESPONSE))
            return HDR_SIZE
        if p & _P_REQUEST:
            conn.pending &= ~_P_REQUEST
            self._set_deadline(conn, CONN_REQUEST_TIMEOUT)
            _write_views(hv, self._hdr(conn, VIRTIO_VSOCK_OP_REQUEST))
            return HDR_SIZE
        if conn.readable and conn.can_send_data():
            credit = conn.credit()
            if credit > 0:
                n = self._read_host(conn, hv, writer, credit)
                if n:
                    return n
        if conn.pending & _P_CREDIT_REQUEST:
            conn.pending &= ~_P_CREDIT_REQUEST
            _write_views(hv, self._hdr(conn, VIRTIO_VSOCK_OP_CREDIT_REQUEST))
            return HDR_SIZE
        # A pending CREDIT_UPDATE; also the answer when a read found nothing after all: a
        # packet carrying only credit is always valid and harmless.
        _write_views(hv, self._hdr(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE))
        return HDR_SIZE

    def _read_host(self, conn: Connection, hv: list[memoryview], writer: ChainWriter,
                   credit: int) -> int:
        """Read host bytes straight into the guest's buffer; 0 if there was nothing to read."""
        room = writer.remaining
        want = min(credit, room, MAX_RX_PAYLOAD)
        if want <= 0:
            return 0
        views = writer.views(want)
        sock = conn.sock
        assert sock is not None
        try:
            # Scatter straight into guest RAM: one copy, kernel to guest.
            n = sock.recv_into(views[0]) if len(views) == 1 else sock.recvmsg_into(views)[0]
        except (BlockingIOError, InterruptedError):
            conn.readable = False
            return 0
        except OSError as e:
            self.kill(conn, f"host read failed: {e.strerror}")
            conn.pending = 0
            _write_views(hv, self._hdr(conn, VIRTIO_VSOCK_OP_RST))
            return HDR_SIZE
        if n == 0:
            # EOF.  A host that only half-closed may still read what the guest sends.
            conn.readable = False
            if _peer_gone(sock):
                conn.host_shut = _SHUTDOWN_BOTH
                conn.tx_buf = bytearray()  # undeliverable
                self._set_deadline(conn, CONN_SHUTDOWN_TIMEOUT)
            else:
                conn.host_shut = VIRTIO_VSOCK_SHUTDOWN_SEND
            _write_views(hv, self._hdr(conn, VIRTIO_VSOCK_OP_SHUTDOWN, 0, conn.host_shut))
            return HDR_SIZE
        if n < want:
            conn.readable = False  # drained for now: poll the socket again
        conn.rx_cnt = (conn.rx_cnt + n) & _U32
        self.metrics["rx_bytes"] += n
        _write_views(hv, self._hdr(conn, VIRTIO_VSOCK_OP_RW, n))
        return HDR_SIZE + n

    # -- time -----------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has something to do (monotonic clock), or None."""
        timers = self._timers
        while timers:
            when, _seq, conn = timers[0]
            if conn.deadline == when and self._conns.get(conn.key) is conn:
                break
            heapq.heappop(timers)  # stale: the deadline moved or the connection is gone
        first = timers[0][0] if timers else None
        resume = self._listener_paused_until
        if resume is not None and (first is None or resume < first):
            return resume
        return first

    def expire(self, now: float | None = None) -> None:
        """Reset connections whose handshake or shutdown took too long; resume the listener."""
        if now is None:
            now = self._clock()
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _seq, conn = heapq.heappop(timers)
            if conn.deadline != when or self._conns.get(conn.key) is not conn:
                continue
            conn.deadline = None
            self.kill(conn, "timed out waiting for the guest")
        if self._listener_paused_until is not None and self._listener_paused_until <= now:
            self._resume_listener()

    # -- lifecycle ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Drop every connection and pending host stream (device or transport reset).

        Host streams are closed (their owners read EOF); nothing is owed to the guest any more.
        The listening socket stays.
        """
        for conn in list(self._conns.values()):
            self._close_sock(conn)
            conn.state = DEAD
            conn.pending = 0
        self.metrics["conns_removed"] += len(self._conns)
        self._conns.clear()
        for obj in list(self._fds.values()):
            if type(obj) is _Handshake:
                self._drop_handshake(obj, None)
        self._fds.clear()
        self._handshakes = 0
        self._ready.clear()
        self._rsts.clear()
        self._local_ports.clear()
        self._timers.clear()
        self._resume_listener()

    def close(self) -> None:
        """Close every connection, the listener and the epoll fd; remove the socket file."""
        if self._closed:
            return
        self.reset()
        self._closed = True
        try:
            self._epoll.close()
        finally:
            self._listener.close()
        try:
            # Only our own socket: the path may have been replaced since.
            if os.lstat(self.uds_path).st_ino == self._listener_ino:
                os.unlink(self.uds_path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("vsock: cannot remove %s: %s", self.uds_path, e.strerror)
