"""virtio-vsock, the socket device (virtio 1.2 §5.10, device ID 19), Firecracker-style host side.

Queues: 0 rx (device → guest packets), 1 tx (guest → device packets), 2 event.  Config space:
``le64 guest_cid``.  No device feature bits are offered: stream sockets only (§5.10.3, "no
feature = VIRTIO_VSOCK_F_STREAM"); SEQPACKET packets are answered with RST.

The host side (connections, Unix sockets, credit) lives in :mod:`.vsock_muxer`; this module
moves packets between the virtqueues and the muxer:

* **tx**: every chain is one packet, a 44-byte header and its payload, parsed over the chain's
  readable byte stream (the header may share a descriptor with the payload or be split across
  several).  Chains too short for a header are returned and counted; everything in a header is
  guest-controlled and checked by the muxer.  tx buffers are always returned with used.len 0.
* **rx**: packets go into the guest only when it has posted buffers.  The muxer keeps what
  connections owe the guest (control packets, "host data readable" marks) and produces one
  packet per buffer, reading host data straight into guest RAM, bounded by the guest's credit.
  When the guest has no buffers, connections stop polling their host sockets; the guest's next
  rx kick resumes them.  Both Linux rx layouts work: header and payload in two descriptors
  (Linux ≤ 6.1) or one (skb-based Linux ≥ 6.2); ``used.len`` = 44 + payload.
* **event**: the guest keeps a few 4-byte buffers posted; the device uses one to send
  VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (``used.len`` 4, Linux checks it) after
  :meth:`Vsock.transport_reset`: every connection is dropped host-side and the guest resets its
  sockets and re-reads ``guest_cid``.

Device reset (Status := 0, e.g. the guest unbinding the driver) drops every connection: host
streams are closed (their owners read EOF) and the guest driver resets its own sockets when it
goes away (``virtio_vsock_remove``).  The listening socket survives resets; host clients that
connect while the driver is away wait in its backlog.

Threads: queue work, host socket events and timers run on the event-loop thread under
``self.lock``; activation and reset arrive from vCPU threads (the lock orders them).  Timer and
deferred callbacks carry the activation epoch, so one scheduled before a reset does nothing after.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import ConfigError, GuestError
from ...eventloop import TimerHandle
from . import spec
from .device import ConfigField, VirtioDevice
from .queue import DescriptorChain, Virtqueue
from .vsock_muxer import HDR, HDR_SIZE, VsockMuxer

RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2
#: Ring sizes, as Firecracker.  Linux fills the whole rx ring with 4 KiB buffers.
QUEUE_SIZE = 256

#: §5.10.6 "Device Events": event ids (``enum virtio_vsock_event_id``).
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0
_EVENT = struct.Struct("<I")

#: CIDs 0, 1 and 2 (hypervisor, local, host) and 0xffffffff (any) are reserved (§5.10.4); the
#: upper 32 bits of guest_cid must be zero.
MIN_GUEST_CID = 3
MAX_GUEST_CID = 0xFFFF_FFFE


def _check_cid(cid: int, what: str) -> int:
    if not isinstance(cid, int) or not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
        raise ConfigError(f"{what}={cid}: guest CIDs are {MIN_GUEST_CID} to {MAX_GUEST_CID} "
                          "(0-2 and 0xffffffff are reserved)")
    return cid


class Vsock(VirtioDevice):
    """virtio-vsock with Firecracker's Unix-socket host side (see the module docstring)."""

    device_type = spec.VIRTIO_ID_VSOCK
    name = "vsock"
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)
    config_layout = (ConfigField("guest_cid", 0, "Q"),)

    def __init__(self, cid: int, uds_path: Path | str) -> None:
        _check_cid(cid, "--vsock cid")
        super().__init__()
        self.set_config("guest_cid", cid, notify=False)
        self.metrics.update({"events": 0, "transport_resets": 0})
        # Binds the listening socket now, so a bad path is a configuration error at start-up.
        self.muxer = VsockMuxer(cid, uds_path, self.metrics, self.ratelog)
        self._event_pending = False
        self._epoch = 0
        self._timer: TimerHandle | None = None
        self._timer_when = float("inf")
        self._pump_deferred = False
        self._closed = False

    @property
    def guest_cid(self) -> int:
        return self.muxer.guest_cid

    @property
    def uds_path(self) -> str:
        return self.muxer.uds_path

    # -- lifecycle ------------------------------------------------------------------------------

    def on_activate(self) -> None:
        self._epoch += 1
        if self.loop is None:
            self.ratelog.warning("noloop", "vsock: no event loop: host sockets are not served")
            return
        self.loop.add_reader(self.muxer.fileno(), self._on_host_events)

    def on_reset(self) -> None:
        self._epoch += 1
        if self.loop is not None:
            self.loop.remove_reader(self.muxer.fileno())
        self._cancel_timer()
        self._pump_deferred = False
        self._event_pending = False
        self.muxer.reset()

    def close(self) -> None:
        """Close every connection and the listener; remove the socket file (VMM shutdown)."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self.reset()  # unregisters from the loop, stops timers, drops connections
            self.muxer.close()

    def transport_reset(self, guest_cid: int | None = None) -> None:
        """Drop every connection and tell the guest (TRANSPORT_RESET, §5.10.6 "Device Events").

        With ``guest_cid``, the guest's CID changes first (config space, with a generation
        bump); Linux re-reads it when it handles the event.  Call on the event-loop thread.
        """
        with self.lock:
            if guest_cid is not None:
                _check_cid(guest_cid, "guest_cid")
                self.muxer.guest_cid = guest_cid
                self.set_config("guest_cid", guest_cid)
            self.muxer.reset()
            self.metrics["transport_resets"] += 1
            if not self.active:
                return  # the driver reads guest_cid when it probes; nothing to tell
            self._event_pending = True
            try:
                self._deliver_event()
            except GuestError as e:
                self.fail(f"event queue: {e}")

    # -- queues ---------------------------------------------------------------------------------

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        if index == TX_QUEUE:
            self.drain(queue, self._tx_chain)
        elif index == EVENT_QUEUE:
            self._deliver_event()
            return
        # rx kick (new buffers), or tx may have produced replies (RESPONSE, RST, credit).
        self._rx_pump()
        self._arm_timer()

    def _tx_chain(self, chain: DescriptorChain) -> int:
        reader = chain.reader()
        if reader.remaining < HDR_SIZE:
            self.metrics["tx_dropped"] += 1
            self.ratelog.warning("txshort", "vsock: tx chain of %d readable bytes has no "
                                 "header: dropped", reader.remaining)
            return 0
        self.muxer.send_pkt(reader.read_struct(HDR), reader)
        return 0

    def _rx_queue(self) -> Virtqueue | None:
        return self.queues[RX_QUEUE] if len(self.queues) > RX_QUEUE else None

    def _rx_pump(self) -> None:
        """Give the guest what the muxer has, one packet per posted rx buffer."""
        queue = self._rx_queue()
        if queue is None:
            return
        muxer = self.muxer
        sent = 0
        # A guest recycling buffers on another vCPU could keep this going for ever: after one
        # ring's worth, let the event loop serve others and come back.
        budget = queue.size
        while muxer.has_pending_rx():
            if sent >= budget:
                self._defer_pump()
                break
            chain = queue.pop()
            if chain is None:
                # Out of buffers: ask for a kick when the guest posts more (lost-wakeup rule:
                # re-check after re-enabling).
                if queue.enable_notifications():
                    continue
                break
            queue.add_used(chain, muxer.recv_pkt(chain.writer()))
            sent += 1
        if sent:
            self.metrics["chains"] += sent
            self.signal_used(queue)

    def _defer_pump(self) -> None:
        if self._pump_deferred or self.loop is None:
            return
        self._pump_deferred = True
        epoch = self._epoch
        self.loop.call_later(0, lambda: self._deferred_pump(epoch))

    def _deferred_pump(self, epoch: int) -> None:
        with self.lock:
            self._pump_deferred = False
            if epoch == self._epoch and self.active:
                self._guarded(self._rx_pump)

    def _deliver_event(self) -> None:
        if not self._event_pending or len(self.queues) <= EVENT_QUEUE:
            return
        queue = self.queues[EVENT_QUEUE]
        if queue is None:
            return
        used = False
        for _ in range(queue.size):  # bounded: unusable buffers are returned and skipped
            chain = queue.pop()
            if chain is None:
                if queue.enable_notifications():
                    continue
                break
            writer = chain.writer()
            used = True
            if writer.remaining < _EVENT.size:
                queue.add_used(chain, 0)
                self.ratelog.warning("eventsmall", "vsock: event buffer of %d bytes is too "
                                     "small", writer.remaining)
                continue
            writer.write(_EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
            queue.add_used(chain, _EVENT.size)
            self._event_pending = False
            self.metrics["events"] += 1
            break
        if used:
            self.signal_used(queue)

    # -- event-loop callbacks -------------------------------------------------------------------

    def _guarded(self, work: Callable[[], None]) -> None:
        """Run ``work`` then the rx pump; a guest error sets DEVICE_NEEDS_RESET (lock held)."""
        try:
            work()
            self._rx_pump()
        except GuestError as e:
            self.fail(str(e))
            return
        self._arm_timer()

    def _on_host_events(self) -> None:
        with self.lock:
            if self.active:
                self._guarded(self.muxer.handle_events)

    def _arm_timer(self) -> None:
        """Make sure a loop timer fires at the muxer's next deadline (loop thread only)."""
        if self.loop is None or not self.active:
            return
        when = self.muxer.next_deadline()
        if when is None or when >= self._timer_when:
            return
        self._cancel_timer()
        epoch = self._epoch
        self._timer_when = when
        self._timer = self.loop.call_later(max(0.0, when - time.monotonic()),
                                           lambda: self._on_timer(epoch))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_when = float("inf")

    def _on_timer(self, epoch: int) -> None:
        with self.lock:
            if epoch != self._epoch or not self.active:
                return
            self._timer = None
            self._timer_when = float("inf")
            self._guarded(self.muxer.expire)

    # -- host control ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"guest_cid": self.guest_cid, "active": self.active,
                    **self.muxer.status(), "metrics": dict(self.metrics)}

    def control_commands(self) -> dict[str, Callable[[list[str]], dict[str, Any]]]:
        """Commands for :class:`embervm.control.ControlServer`: ``vsock status|reset [CID]``."""
        return {"vsock": self._control}

    def _control(self, args: list[str]) -> dict[str, Any]:
        usage = "usage: vsock status | vsock reset [CID]"
        if args == ["status"]:
            return self.status()
        if args and args[0] == "reset" and len(args) <= 2:
            cid = None
            if len(args) == 2:
                if not args[1].isdigit():
                    raise ValueError(f"vsock reset: CID {args[1]!r} is not a number")
                try:
                    cid = _check_cid(int(args[1]), "CID")
                except ConfigError as e:
                    raise ValueError(str(e)) from None
            self.transport_reset(cid)
            return self.status()
        raise ValueError(usage)

