"""virtio-net (virtio 1.2 §5.1, device ID 1) on a Linux TAP device.

Two queues, no control queue: 0 = receiveq1 (host → guest), 1 = transmitq1 (guest → host).
Features offered (virtio.md §7.2):

* ``MAC`` (config ``mac``: given, or derived from the TAP name, so it is stable across runs) and
  ``STATUS`` (config ``status``: LINK_UP; :meth:`Net.set_link` changes it with a generation bump
  and a config interrupt, and the link goes down by itself if the TAP disappears);
* ``CSUM``, ``HOST_TSO4/TSO6/ECN/UFO``: the guest may send partial checksums and 64 KiB GSO
  frames; the TAP (``IFF_VNET_HDR``) finishes and segments them in the host kernel;
* ``GUEST_CSUM``, ``GUEST_TSO4/TSO6/ECN/UFO``, each only if this kernel's ``TUNSETOFFLOAD``
  takes the matching ``TUN_F_*`` bit; what the guest accepts is set on the TAP at every
  activation, so the host kernel never hands us a frame the guest cannot take;
* ``MRG_RXBUF``: a frame may span several receive buffers (``num_buffers``).
* Nothing that needs ``CTRL_VQ``: Linux refuses to probe a device that offers CTRL_RX, MQ,
  CTRL_MAC_ADDR, ... without it (``virtnet_validate_features``), and this device has no use for
  a control queue.  ``validate_features`` refuses the offload combinations §5.1.3.1 forbids.

Data paths, all on the event-loop thread under ``self.lock``; no busy loops, no threads:

* TX (``process_queue(1)`` on the guest's kick): each chain is one virtio-net header plus one
  Ethernet frame, parsed over the chain's byte stream (Linux puts the header and the start of
  the frame in one descriptor, virtio.md §9.11), checked, and written to the TAP with one
  ``writev`` straight from guest RAM.  A callback sends at most :data:`TX_BUDGET` chains, then
  yields to the loop and continues on a zero-delay timer.  ``used.len`` is 0 (§5.1.6.2).
* RX: the TAP fd is on the loop only while the guest has receive buffers posted.  One frame is
  read into a host buffer (its length decides how many buffers it needs), then copied into the
  guest's buffers; with MRG_RXBUF into as many as it takes, each returned with its own length
  and ``num_buffers`` in the first header.  When the ring runs dry the device re-arms the
  rx kick (EVENT_IDX ``avail_event``, re-checked against the lost-wakeup race), stops polling
  the TAP and keeps the frame in hand until the kick.  At most :data:`RX_BUDGET` frames per
  callback; one interrupt decision per batch (EVENT_IDX ``used_event``).

Rate limiting (Firecracker's, per direction, ``rx_rate_limiter`` / ``tx_rate_limiter``): a
frame costs one operation and its length with the virtio-net header in bytes.

* TX: a checked frame is charged just before it is written to the TAP.  If the limiter says
  no, the chain goes back on the ring (``undo_pop``), the queue is throttled and one loop timer
  is armed for when the limiter will have the tokens; tx kicks are ignored until it fires.
* RX: a frame read from the TAP is charged before it is copied to the guest.  If the limiter
  says no, the frame stays in hand (as when the guest has no buffers), the TAP is no longer
  polled and one timer is armed; the frame is delivered when it fires.  A frame is charged once,
  even if it then waits for receive buffers.

A reset cancels both timers and leaves no throttle behind.  :meth:`Net.update_rate_limiters`
changes the buckets at run time (Firecracker's PATCH: what is not given stays).

Metrics: Firecracker's ``net`` group names (``rx_bytes_count``, ``tx_packets_count``,
``rx_rate_limiter_throttled``, ``tap_write_fails``, ...; bytes counted with the virtio-net header,
as Firecracker does) next to embervm's older counters (``rx_frames``, ``tx_bytes``: frame
bytes only, ...).

Hostile drivers: a transmit chain with writable buffers, a header or frame that is too short or
too long, flags or GSO types that were not negotiated are dropped (returned with ``used.len``
0, counted in ``tx_dropped``); a receive chain with readable buffers or too small for a header
is returned unused (``used.len`` 0, which Linux counts as a length error); an invalid chain
(bad address, loop, ...) is returned if its head is known; a broken ring sets
DEVICE_NEEDS_RESET.  Nothing a guest writes raises out of a callback.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, GuestError, QueueError
from ...eventloop import TimerHandle
from ...ratelimit import RateLimiter, TokenType
from . import spec
from .device import ConfigField, VirtioDevice
from .queue import ChainError, DescriptorChain, Virtqueue
from .tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    Tap,
    TapBackend,
)

if TYPE_CHECKING:
    from ...config import RateLimitConfig

try:
    # hashlib's own BLAKE2b without the rest of hashlib, which loads libcrypto (+3.8 MiB of VMM
    # RSS) for a six-byte MAC; block.py does the same.
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - an interpreter built without it
    from hashlib import blake2b

log = logging.getLogger(__name__)

# -- §5.1.3 feature bits (Linux include/uapi/linux/virtio_net.h names) -------------------------
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

#: Features Linux only accepts together with CTRL_VQ (virtnet_validate_features): never offered.
NEEDS_CTRL_VQ = (
    spec.bit(VIRTIO_NET_F_CTRL_RX)
    | spec.bit(VIRTIO_NET_F_CTRL_VLAN)
    | spec.bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
    | spec.bit(VIRTIO_NET_F_MQ)
    | spec.bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
)

# -- §5.1.4 config: status bits --------------------------------------------------------------------
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# -- §5.1.6 the per-packet header ------------------------------------------------------------------
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

#: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (+ num_buffers when 12 bytes)
_HDR = struct.Struct("<BBHHHH")
_U16 = struct.Struct("<H")
HDR_LEN = 12  # VERSION_1 or MRG_RXBUF (§5.1.6); 10 only for a legacy driver without MRG_RXBUF
HDR_LEN_LEGACY = 10

# -- queues and limits -----------------------------------------------------------------------------
RXQ = 0
TXQ = 1
QUEUE_SIZE = 256
ETH_HLEN = 14
#: Largest Ethernet frame without FCS either way: a 64 KiB GSO frame plus Ethernet and VLAN
#: headers (Firecracker's bound as well; Linux's GSO limit is 65536 bytes of skb).
MAX_FRAME = 65550
#: Frames one TAP-readable callback delivers before yielding to the other fds of the loop.
RX_BUDGET = 64
#: Transmit chains one callback sends before yielding (and continuing on a zero-delay timer).
TX_BUDGET = 256
#: How soon a TAP write that would block (never seen in practice) is retried.
TX_RETRY_SECONDS = 0.001
#: writev takes at most IOV_MAX (1024) iovecs; a hostile chain may have more segments.
_MAX_IOV = 1000
#: Shortest wait before a throttled direction is retried, so that a limiter reporting 0 s (its
#: bucket refills in under a millisecond) cannot spin the loop on zero-delay timers.
MIN_RETRY_SECONDS = 0.001

# _transmit outcomes
_TX_DONE = 0  # sent, or dropped and to be completed
_TX_BLOCKED = 1  # the TAP is full: retry the same chain soon (already charged)
_TX_THROTTLED = 2  # the rate limiter refused it: put it back on the ring

_OPS = TokenType.OPS
_BYTES = TokenType.BYTES

#: Firecracker's per-NIC metrics (src/vmm/src/devices/virtio/net/metrics.rs) that this device
#: keeps.  Left out: tap_write_agg (a latency aggregate, not a counter), mac_address_updates
#: (the MAC is read-only here; writes count as cfg_fails) and tx_remaining_reqs_count.
FC_NET_METRICS = (
    "activate_fails", "cfg_fails", "no_rx_avail_buffer", "no_tx_avail_buffer", "event_fails",
    "rx_queue_event_count", "rx_event_rate_limiter_count", "rx_rate_limiter_throttled",
    "rx_tap_event_count", "rx_bytes_count", "rx_packets_count", "rx_fails", "rx_count",
    "tap_read_fails", "tap_write_fails", "tx_bytes_count", "tx_malformed_frames", "tx_fails",
    "tx_count", "tx_packets_count", "tx_queue_event_count", "tx_rate_limiter_event_count",
    "tx_rate_limiter_throttled", "tx_spoofed_mac_count",
)


def _charge(lim: RateLimiter, nbytes: int) -> bool:
    """Take one operation and ``nbytes`` bytes from ``lim``, or nothing (Firecracker's order:
    ops first, given back if the bytes are refused)."""
    if lim.unlimited:
        return True
    if not lim.consume(1, _OPS):
        return False
    if not lim.consume(nbytes, _BYTES):
        lim.manual_replenish(1, _OPS)
        return False
    return True

# GSO type (without the ECN bit) → the feature the sender must have negotiated, per direction.
_HOST_GSO = {
    VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_HDR_GSO_UDP: VIRTIO_NET_F_HOST_UFO,
}
_GUEST_GSO = {
    VIRTIO_NET_HDR_GSO_TCPV4: VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_HDR_GSO_TCPV6: VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_HDR_GSO_UDP: VIRTIO_NET_F_GUEST_UFO,
}
# GUEST_* feature → the TUN_F_* offload that lets the host kernel send such frames.
_GUEST_TO_TUN = (
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
)
# §5.1.3.1 feature dependencies: (feature, needs any of) — the driver MUST NOT negotiate
# the first without one of the others.
_DEPENDS = (
    (VIRTIO_NET_F_GUEST_TSO4, (VIRTIO_NET_F_GUEST_CSUM,)),
    (VIRTIO_NET_F_GUEST_TSO6, (VIRTIO_NET_F_GUEST_CSUM,)),
    (VIRTIO_NET_F_GUEST_ECN, (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6)),
    (VIRTIO_NET_F_GUEST_UFO, (VIRTIO_NET_F_GUEST_CSUM,)),
    (VIRTIO_NET_F_HOST_TSO4, (VIRTIO_NET_F_CSUM,)),
    (VIRTIO_NET_F_HOST_TSO6, (VIRTIO_NET_F_CSUM,)),
    (VIRTIO_NET_F_HOST_ECN, (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6)),
    (VIRTIO_NET_F_HOST_UFO, (VIRTIO_NET_F_CSUM,)),
)

_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` → 6 bytes; ConfigError unless it is a unicast address."""
    if not _MAC_RE.fullmatch(text):
        raise ConfigError(f"--net mac={text}: expected six hex bytes like 52:54:00:12:34:56")
    mac = bytes.fromhex(text.replace(":", ""))
    # Linux's virtio_net replaces an invalid address (multicast or zero) with a random one.
    if mac[0] & 1 or mac == bytes(6):
        raise ConfigError(f"--net mac={text}: a NIC address must be unicast and non-zero "
                          "(the low bit of the first byte clear)")
    return mac


def default_mac(tap: str) -> bytes:
    """A stable MAC for ``tap``: 52:54:00 (locally administered, unicast) + 3 hash bytes."""
    return b"\x52\x54\x00" + blake2b(tap.encode(), digest_size=3,
                                             person=b"embervm-net").digest()


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class Net(VirtioDevice):
    """A virtio-net device on the TAP ``tap`` (opened, or created when root; see ``tap.py``).

    ``rx_rate_limiter`` / ``tx_rate_limiter`` limit each direction (None: unlimited).
    ``backend`` replaces the TAP (tests).  Call :meth:`close` when the VM is gone.
    """

    device_type = spec.VIRTIO_ID_NET
    name = "net"
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    config_layout = (
        ConfigField("mac", 0, "6s"),
        ConfigField("status", 6, "H"),
    )

    def __init__(
        self,
        tap: str,
        *,
        mac: str | None = None,
        rx_rate_limiter: RateLimitConfig | None = None,
        tx_rate_limiter: RateLimitConfig | None = None,
        backend: TapBackend | None = None,
    ) -> None:
        mac_bytes = parse_mac(mac) if mac is not None else default_mac(tap)
        self._tap: TapBackend = backend if backend is not None else Tap(tap)
        self.tap_name = self._tap.name
        tun = self._tap.offloads
        features = (
            spec.bit(VIRTIO_NET_F_MAC)
            | spec.bit(VIRTIO_NET_F_STATUS)
            | spec.bit(VIRTIO_NET_F_MRG_RXBUF)
            | spec.bit(VIRTIO_NET_F_CSUM)
            | spec.bit(VIRTIO_NET_F_HOST_TSO4)
            | spec.bit(VIRTIO_NET_F_HOST_TSO6)
            | spec.bit(VIRTIO_NET_F_HOST_ECN)
            | spec.bit(VIRTIO_NET_F_HOST_UFO)
        )
        if tun & TUN_F_CSUM:
            for feature, flag in _GUEST_TO_TUN:
                if tun & flag:
                    features |= spec.bit(feature)
        self.device_features = features
        super().__init__()
        self.mac = mac_bytes
        self.set_config("mac", mac_bytes, notify=False)
        self.set_config("status", VIRTIO_NET_S_LINK_UP, notify=False)
        self.metrics.update(
            rx_frames=0, rx_bytes=0, rx_gso_frames=0, rx_dropped=0, rx_malformed=0,
            tx_frames=0, tx_bytes=0, tx_gso_frames=0, tx_dropped=0, tx_errors=0,
            invalid_chains=0, link_changes=0,
        )
        self.metrics.update(dict.fromkeys(FC_NET_METRICS, 0))
        self.rx_limiter = RateLimiter(rx_rate_limiter)
        self.tx_limiter = RateLimiter(tx_rate_limiter)
        # A direction is throttled from a refusal until its timer fires (or a reset).
        self._rx_throttled = False
        self._tx_throttled = False
        self._rx_rl_timer: TimerHandle | None = None
        self._tx_rl_timer: TimerHandle | None = None
        self._rx_charged = False  # the frame in hand has been paid for
        self._hdr_len = HDR_LEN
        self._mrg = False
        # One frame read from the TAP waits here until the guest has room for it.
        self._rxbuf = bytearray(HDR_LEN + MAX_FRAME + 1)
        self._rxview = memoryview(self._rxbuf)
        self._rx_len = 0  # bytes of the frame in hand (header included); 0 = none
        self._rx_held: deque[DescriptorChain] = deque()  # popped rx chains not yet used
        self._reading = False  # the TAP fd is registered on the loop
        self._tx_pending: DescriptorChain | None = None  # a chain whose write would block
        self._tx_timer: TimerHandle | None = None
        self._tap_dead = False  # a read failed for good (the TAP was deleted): never poll again
        self._closed = False

    # -- public API --------------------------------------------------------------------------------

    @property
    def link_up(self) -> bool:
        return bool(self.get_config("status") & VIRTIO_NET_S_LINK_UP)

    def set_link(self, up: bool) -> None:
        """Report the link up or down; the driver hears of it with a config interrupt (§5.1.4).

        Any thread.  While the link is down the device still moves frames: Linux stops
        transmitting on carrier loss by itself, and a frame in flight is not worth losing.
        """
        with self.lock:
            if up == self.link_up:
                return
            self.metrics["link_changes"] += 1
            self.set_config("status", VIRTIO_NET_S_LINK_UP if up else 0)

    def update_rate_limiters(
        self, rx: RateLimitConfig | None = None, tx: RateLimitConfig | None = None
    ) -> None:
        """Change the limiters' buckets at run time (loop thread).

        Firecracker's PATCH semantics: None leaves that direction as it is, and a given config
        changes only the buckets it names (``RateLimiter.update``).  A throttled direction is
        retried at once, so that a looser limit takes effect now rather than when the old
        limit's timer would have fired.
        """
        with self.lock:
            if rx is not None:
                self.rx_limiter.update(rx)
                if self._rx_throttled:
                    self._cancel_rl_timer(RXQ)
                    self._arm_rl_timer(RXQ, 0.0)
            if tx is not None:
                self.tx_limiter.update(tx)
                if self._tx_throttled:
                    self._cancel_rl_timer(TXQ)
                    self._arm_rl_timer(TXQ, 0.0)

    def status(self) -> dict[str, Any]:
        return {
            "tap": self.tap_name,
            "mac": format_mac(self.mac),
            "link_up": self.link_up,
            "driver_ready": self.active,
            "features": self.acked_features,
            "metrics": dict(self.metrics),
        }

    def control_commands(self) -> dict[str, Callable[[list[str]], dict[str, Any]]]:
        """``net:TAP status`` and ``net:TAP link up|down`` on the VMM control socket.

        Named after the TAP so that several NICs do not replace each other's command.
        """
        return {f"net:{self.tap_name}": self._control}

    def close(self) -> None:
        """Stop serving and close the TAP (idempotent; a TAP we created disappears)."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._stop_reading()
            self._cancel_tx_timer()
            self._clear_throttle(RXQ)
            self._clear_throttle(TXQ)
            self._tap.close()

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- virtio hooks ------------------------------------------------------------------------------

    def validate_features(self, acked: int) -> str | None:
        for feature, needs in _DEPENDS:
            if acked >> feature & 1 and not any(acked >> n & 1 for n in needs):
                return f"net feature {feature} negotiated without any of {needs} (§5.1.3.1)"
        return None

    def on_activate(self) -> None:
        self._mrg = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        modern = self.has_feature(spec.VIRTIO_F_VERSION_1)
        self._hdr_len = HDR_LEN if modern or self._mrg else HDR_LEN_LEGACY
        offload = 0
        if self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            for feature, flag in _GUEST_TO_TUN:
                if self.has_feature(feature):
                    offload |= flag
        if self._closed:
            return
        try:
            self._tap.set_vnet_hdr_size(self._hdr_len)
            self._tap.set_offload(offload)
        except OSError as e:
            # Runs on a vCPU thread (the DRIVER_OK write): never raise.  Frames that do not
            # match what the guest accepted are dropped on receive anyway.
            self.metrics["activate_fails"] += 1
            self.ratelog.warning(("tapsetup", e.errno), "%s: TAP %s set-up failed: %s",
                                 self.name, self.tap_name, e.strerror)
        # Both queues are scanned by the transport right after this (DRIVER_OK scan): receive
        # buffers posted before DRIVER_OK start the TAP reader from process_queue.

    def on_reset(self) -> None:
        # The chains belong to the old rings.  A frame in hand is dropped (power-on state).
        self._stop_reading()
        self._cancel_tx_timer()
        self._clear_throttle(RXQ)
        self._clear_throttle(TXQ)
        self._rx_held.clear()
        self._tx_pending = None
        if self._rx_len:
            self._rx_len = 0
            self.metrics["rx_dropped"] += 1
        if not self._closed:
            try:
                self._tap.set_offload(0)  # nobody to take GSO frames until the next driver
            except OSError:
                pass

    def set_queue(self, index: int, queue: Virtqueue | None) -> None:
        with self.lock:
            super().set_queue(index, queue)
            if index == RXQ:
                self._rx_held.clear()
                if queue is None:
                    self._stop_reading()
            elif index == TXQ:
                self._tx_pending = None
                self._cancel_tx_timer()

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        if index == RXQ:
            self.metrics["rx_queue_event_count"] += 1
            if self._rx_throttled:
                # The frame in hand waits for the limiter; its timer resumes receiving.
                self.metrics["rx_rate_limiter_throttled"] += 1
                return
            # The driver posted receive buffers: deliver what is in hand, (re)start reading.
            # No more rx kicks until the ring runs dry again (_rx_room re-arms them); with
            # EVENT_IDX this is a no-op, the stale avail_event already means "no kicks".
            queue.disable_notifications()
            self._rx_pump(queue)
        elif index == TXQ:
            self.metrics["tx_queue_event_count"] += 1
            if self._tx_throttled:
                # Kicks are ignored while throttled: the timer's retry drains the ring.
                self.metrics["tx_rate_limiter_throttled"] += 1
                return
            self._tx_pump(queue)

    def read_config(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.config):
            self.metrics["cfg_fails"] += 1  # Firecracker counts reads beyond the config space
        return super().read_config(offset, size)

    def write_config(self, offset: int, size: int, value: int) -> None:
        # Nothing in this device's config space is driver-writable (the MAC is read-only).
        self.metrics["cfg_fails"] += 1
        super().write_config(offset, size, value)

    def fail(self, reason: str) -> None:
        self.metrics["event_fails"] += 1
        super().fail(reason)

    # -- TX ----------------------------------------------------------------------------------------

    def _tx_pump(self, queue: Virtqueue) -> None:
        budget = TX_BUDGET if self.loop is not None else -1
        used = 0
        try:
            while True:
                queue.disable_notifications()
                while budget:
                    chain = self._tx_pending
                    self._tx_pending = None
                    charged = chain is not None  # a blocked chain was paid for already
                    if chain is None:
                        chain = self._pop(queue)
                        if chain is None:
                            break
                    outcome = self._transmit(chain, charged=charged)
                    if outcome == _TX_BLOCKED:
                        self._tx_pending = chain  # the TAP is full: retry soon
                        self._arm_tx_timer(TX_RETRY_SECONDS)
                        return
                    if outcome == _TX_THROTTLED:
                        queue.undo_pop(chain)  # the driver still owns it; the retry re-reads it
                        self.metrics["chains"] -= 1
                        self._throttle(TXQ, self.tx_limiter)
                        return
                    queue.add_used(chain, 0)
                    used += 1
                    budget -= 1
                if not budget:
                    # Fair to the other fds: continue from the loop, kicks stay off meanwhile.
                    self._arm_tx_timer(0.0)
                    return
                if not queue.enable_notifications():
                    return
        finally:
            if not used:
                self.metrics["no_tx_avail_buffer"] += 1
            # Also covers invalid chains returned by _pop; a no-op if nothing was published.
            if self.active:
                self.signal_used(queue)

    def _transmit(self, chain: DescriptorChain, *, charged: bool) -> int:
        """Send one chain's frame to the TAP, paying the tx limiter first unless ``charged``.

        Returns _TX_DONE (sent, or dropped: complete the chain), _TX_BLOCKED (the write would
        block; the frame is paid for) or _TX_THROTTLED (the limiter refused; nothing taken).
        """
        hdr_len = self._hdr_len
        total = chain.readable_len
        frame_len = total - hdr_len
        if chain.writable_len or frame_len < ETH_HLEN or frame_len > MAX_FRAME:
            self._tx_drop("malformed chain", chain)
            return _TX_DONE
        reader = chain.reader()
        hdr = reader.read(hdr_len)
        why = self._tx_header_problem(hdr, frame_len)
        if why is not None:
            self._tx_drop(why, chain)
            return _TX_DONE
        if not charged and not _charge(self.tx_limiter, total):
            return _TX_THROTTLED
        views = reader.views()
        if len(views) >= _MAX_IOV:  # a hostile scatter list: one bounded copy (≤ 64 KiB)
            views = [memoryview(b"".join(views))]
        try:
            os.writev(self._tap.fd, [hdr, *views])
        except BlockingIOError:
            return _TX_BLOCKED
        except OSError as e:
            # EINVAL: the host kernel refused the header (virtio_net_hdr_to_skb); EIO: the TAP
            # is down.  The frame is lost, as on a wire.
            self.metrics["tx_errors"] += 1
            self.metrics["tap_write_fails"] += 1
            self.ratelog.warning(("txerr", e.errno), "%s: TAP %s write failed: %s",
                                 self.name, self.tap_name, e.strerror)
            return _TX_DONE
        m = self.metrics
        m["tx_frames"] += 1
        m["tx_bytes"] += frame_len
        m["tx_count"] += 1
        m["tx_packets_count"] += 1
        m["tx_bytes_count"] += total
        if hdr[1] != VIRTIO_NET_HDR_GSO_NONE:
            m["tx_gso_frames"] += 1
        if self._source_mac(views) != self.mac:
            # Firecracker counts frames whose source is not the guest's MAC, and sends them.
            m["tx_spoofed_mac_count"] += 1
        return _TX_DONE

    @staticmethod
    def _source_mac(views: list[memoryview]) -> bytes:
        """Bytes 6..12 of the frame (its source MAC), wherever the driver split it."""
        first = views[0]
        if len(first) >= 12:
            return bytes(first[6:12])
        head = bytearray()
        for v in views:
            head += v[: 12 - len(head)]
            if len(head) >= 12:
                break
        return bytes(head[6:12])

    def _tx_header_problem(self, hdr: bytes, frame_len: int) -> str | None:
        """Why a driver's header must not go to the TAP (§5.1.6.2 driver requirements)."""
        flags, gso_type, _hlen, gso_size, csum_start, csum_offset = _HDR.unpack_from(hdr)
        if flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return f"tx header flags {flags:#x}"
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            if not self.has_feature(VIRTIO_NET_F_CSUM):
                return "NEEDS_CSUM without CSUM"
            if csum_start + csum_offset + 2 > frame_len:
                return "checksum field beyond the frame"
        if gso_type == VIRTIO_NET_HDR_GSO_NONE:
            return None
        base = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
        feature = _HOST_GSO.get(base)
        if feature is None or not self.has_feature(feature):
            return f"gso_type {gso_type:#x} not negotiated"
        if gso_type & VIRTIO_NET_HDR_GSO_ECN and not self.has_feature(VIRTIO_NET_F_HOST_ECN):
            return "GSO ECN without HOST_ECN"
        if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM or gso_size == 0:
            return "GSO frame without NEEDS_CSUM or gso_size"
        return None

    def _tx_drop(self, why: str, chain: DescriptorChain) -> None:
        self.metrics["tx_dropped"] += 1
        self.metrics["tx_malformed_frames"] += 1
        self.ratelog.warning(("txdrop", why), "%s: dropped a transmit chain (%s): %s",
                             self.name, why, chain)

    def _arm_tx_timer(self, delay: float) -> None:
        if self._tx_timer is None and self.loop is not None:
            self._tx_timer = self.loop.call_later(delay, self._on_tx_timer)

    def _cancel_tx_timer(self) -> None:
        if self._tx_timer is not None:
            self._tx_timer.cancel()
            self._tx_timer = None

    def _on_tx_timer(self) -> None:
        with self.lock:
            self._tx_timer = None
            if self._tx_throttled:
                return  # the rate-limiter timer resumes transmitting
            queue = self._queue(TXQ)
            if queue is not None:
                self._guarded(TXQ, self._tx_pump, queue)

    # -- rate limiting -----------------------------------------------------------------------------

    def _throttle(self, index: int, lim: RateLimiter) -> None:
        """The limiter refused a frame: stop this direction and arm its one retry timer."""
        if index == RXQ:
            self._rx_throttled = True
            self.metrics["rx_rate_limiter_throttled"] += 1
        else:
            self._tx_throttled = True
            self.metrics["tx_rate_limiter_throttled"] += 1
        self._arm_rl_timer(index, lim.wait_time())

    def _arm_rl_timer(self, index: int, delay: float) -> None:
        if self.loop is None:
            # No loop to wait on (a device driven by hand): the direction stays throttled until
            # update_rate_limiters() or a reset; visible in the *_rate_limiter_throttled counts.
            return
        delay = max(delay, MIN_RETRY_SECONDS)
        if index == RXQ:
            if self._rx_rl_timer is None:
                self._rx_rl_timer = self.loop.call_later(delay, self._on_rx_rl_timer)
        elif self._tx_rl_timer is None:
            self._tx_rl_timer = self.loop.call_later(delay, self._on_tx_rl_timer)

    def _cancel_rl_timer(self, index: int) -> None:
        timer = self._rx_rl_timer if index == RXQ else self._tx_rl_timer
        if timer is not None:
            timer.cancel()
        if index == RXQ:
            self._rx_rl_timer = None
        else:
            self._tx_rl_timer = None

    def _clear_throttle(self, index: int) -> None:
        """Forget a throttle (reset, close): no timer left, the limiter not blocked."""
        self._cancel_rl_timer(index)
        if index == RXQ:
            if self._rx_throttled:
                self._rx_throttled = False
                self.rx_limiter.unblock()
        elif self._tx_throttled:
            self._tx_throttled = False
            self.tx_limiter.unblock()

    def _on_tx_rl_timer(self) -> None:
        with self.lock:
            self._tx_rl_timer = None
            if not self._tx_throttled:
                return
            self._tx_throttled = False
            self.tx_limiter.unblock()
            self.metrics["tx_rate_limiter_event_count"] += 1
            queue = self._queue(TXQ)
            if queue is not None:
                self._guarded(TXQ, self._tx_pump, queue)

    def _on_rx_rl_timer(self) -> None:
        with self.lock:
            self._rx_rl_timer = None
            if not self._rx_throttled:
                return
            self._rx_throttled = False
            self.rx_limiter.unblock()
            self.metrics["rx_event_rate_limiter_count"] += 1
            queue = self._queue(RXQ)
            if queue is not None:
                self._guarded(RXQ, self._rx_pump, queue)

    # -- RX ----------------------------------------------------------------------------------------

    def _on_tap_readable(self) -> None:
        with self.lock:
            self.metrics["rx_tap_event_count"] += 1
            if self._rx_throttled:
                self.metrics["rx_rate_limiter_throttled"] += 1
                self._stop_reading()
                return
            queue = self._queue(RXQ)
            if queue is None:
                self._stop_reading()
                return
            self._guarded(RXQ, self._rx_pump, queue)

    def _rx_pump(self, queue: Virtqueue) -> None:
        """Move frames TAP → guest until the TAP is empty, the guest is out of buffers or the
        budget is spent.  Reads the TAP only while the guest has buffers."""
        try:
            for _ in range(RX_BUDGET):
                if not self._rx_len:
                    if not self._rx_room(queue):
                        self.metrics["no_rx_avail_buffer"] += 1
                        self._stop_reading()  # resumed by the driver's kick on the rx queue
                        return
                    if not self._read_frame():
                        break
                    if not self._rx_len:
                        continue  # dropped
                if not self._rx_charged:
                    if not _charge(self.rx_limiter, self._rx_len):
                        self._stop_reading()  # frame in hand: resumed by the limiter's timer
                        self._throttle(RXQ, self.rx_limiter)
                        return
                    self._rx_charged = True
                if self._deliver(queue) is None:
                    # The frame needs more buffers than the ring has: re-arm kicks and re-check
                    # (lost-wakeup rule; the buffers gathered so far are held, so _rx_room alone
                    # would not re-arm them).
                    if queue.enable_notifications():
                        continue
                    self.metrics["no_rx_avail_buffer"] += 1
                    self._stop_reading()  # frame in hand, ring dry: wait for the kick
                    return
            self._start_reading()
        finally:
            # One interrupt decision per batch; also covers chains returned unused.
            if self.active:
                self.signal_used(queue)

    def _rx_room(self, queue: Virtqueue) -> bool:
        """Whether a receive buffer is (or just became) available.  When the ring is empty,
        kicks are re-armed first and the ring re-checked (lost-wakeup rule, virtio.md §4.4)."""
        if self._rx_held or queue.has_available():
            return True
        return queue.enable_notifications()

    def _read_frame(self) -> bool:
        """Read one frame from the TAP into the host buffer; False if there was none."""
        if self._closed:
            return False
        try:
            n = os.readv(self._tap.fd, [self._rxview])
        except BlockingIOError:
            return False
        except OSError as e:
            # EBADFD: the TAP was deleted under us.  Stop polling a dead fd (it would report an
            # error forever) and tell the guest the link is gone.
            # Any other error would repeat on every poll (the fd reports it as readable).
            self.metrics["tap_read_fails"] += 1
            self.ratelog.warning(("rxerr", e.errno), "%s: TAP %s read failed: %s; link down",
                                 self.name, self.tap_name, e.strerror)
            self._tap_dead = True
            self._stop_reading()
            self.set_link(False)
            return False
        if n == 0:
            # A TAP never reads 0 bytes (that is end-of-file on a socket back-end): dead too.
            self.metrics["tap_read_fails"] += 1
            self.ratelog.warning("rxeof", "%s: %s closed; link down", self.name, self.tap_name)
            self._tap_dead = True
            self._stop_reading()
            self.set_link(False)
            return False
        hdr_len = self._hdr_len
        if n < hdr_len + ETH_HLEN or n > hdr_len + MAX_FRAME:
            self.metrics["rx_dropped"] += 1
            return True
        buf = self._rxbuf
        flags, gso_type = buf[0], buf[1]
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            self.metrics["rx_dropped"] += 1  # set up before this driver: checksum unfinished
            return True
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            feature = _GUEST_GSO.get(gso_type & ~VIRTIO_NET_HDR_GSO_ECN)
            if feature is None or not self.has_feature(feature) or (
                gso_type & VIRTIO_NET_HDR_GSO_ECN and not self.has_feature(VIRTIO_NET_F_GUEST_ECN)
            ):
                self.metrics["rx_dropped"] += 1
                return True
            self.metrics["rx_gso_frames"] += 1
        if flags & VIRTIO_NET_HDR_F_DATA_VALID and not self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            buf[0] = flags & ~VIRTIO_NET_HDR_F_DATA_VALID  # §5.1.6.3.2: flags 0 without it
        self._rx_len = n
        self._rx_charged = False
        return True

    def _deliver(self, queue: Virtqueue) -> bool | None:
        """Put the frame in hand into receive buffers.

        True = delivered, False = dropped (does not fit), None = not enough buffers yet.
        """
        n = self._rx_len
        hdr_len = self._hdr_len
        held = self._rx_held
        if not self._mrg:
            chain = self._next_rx_chain(queue, hdr_len + ETH_HLEN)
            if chain is None:
                return None
            if chain.writable_len < n:
                # Does not fit a whole buffer: dropped like a too-long frame on a wire; the
                # buffer stays for the next frame.
                held.appendleft(chain)
                self._rx_len = 0
                self.metrics["rx_dropped"] += 1
                return False
            if hdr_len == HDR_LEN:
                _U16.pack_into(self._rxbuf, HDR_LEN_LEGACY, 1)
            chain.writer().write(self._rxview[:n])
            queue.add_used(chain, n)
            self._rx_done(n, hdr_len)
            return True
        # MRG_RXBUF: gather buffers until the frame fits, then fill them in order.
        capacity = sum(c.writable_len for c in held)
        while capacity < n:
            chain = self._next_rx_chain(queue, hdr_len, from_held=False)
            if chain is None:
                if len(held) >= queue.size:
                    # The whole ring is in our hands and still too small: it never will fit.
                    self._drop_held_frame()
                    return False
                return None
            held.append(chain)
            capacity += chain.writable_len
        count = 0
        cap = 0
        for c in held:
            count += 1
            cap += c.writable_len
            if cap >= n:
                break
        _U16.pack_into(self._rxbuf, HDR_LEN_LEGACY, count)
        view = self._rxview
        pos = 0
        for _ in range(count):
            chain = held.popleft()
            k = chain.writer().write(view[pos:n])
            queue.add_used(chain, k)
            pos += k
        self._rx_done(n, hdr_len)
        return True

    def _next_rx_chain(
        self, queue: Virtqueue, minimum: int, *, from_held: bool = True
    ) -> DescriptorChain | None:
        """The next usable receive chain (held first); unusable ones are returned at once."""
        if from_held and self._rx_held:
            return self._rx_held.popleft()
        # Bounded: every pass consumes one ring entry, and the ring has at most size entries.
        for _ in range(queue.size + 1):
            chain = self._pop(queue)
            if chain is None:
                return None
            if chain.readable_len or chain.writable_len < minimum:
                # §5.1.6.3: receive buffers are device-writable and hold at least a header.
                self.metrics["rx_malformed"] += 1
                self.metrics["rx_fails"] += 1
                self.ratelog.warning("rxmalformed", "%s: unusable receive chain %s",
                                     self.name, chain)
                queue.add_used(chain, 0)
                continue
            return chain
        return None

    def _drop_held_frame(self) -> None:
        self._rx_len = 0
        self.metrics["rx_dropped"] += 1

    def _rx_done(self, n: int, hdr_len: int) -> None:
        """A frame of ``n`` bytes (header included) reached the guest."""
        self._rx_len = 0
        m = self.metrics
        m["rx_frames"] += 1
        m["rx_bytes"] += n - hdr_len
        m["rx_count"] += 1
        m["rx_packets_count"] += 1
        m["rx_bytes_count"] += n

    def _start_reading(self) -> None:
        if self._reading or self._closed or self._tap_dead or self.loop is None:
            return
        if self.active:
            self.loop.add_reader(self._tap.fd, self._on_tap_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            if self.loop is not None:
                self.loop.remove_reader(self._tap.fd)

    # -- common ------------------------------------------------------------------------------------

    def _queue(self, index: int) -> Virtqueue | None:
        if not self.active or index >= len(self.queues):
            return None
        return self.queues[index]

    def _pop(self, queue: Virtqueue) -> DescriptorChain | None:
        """Next chain; an invalid one is returned to the driver (if its head is known) and
        skipped.  A broken ring raises QueueError (→ DEVICE_NEEDS_RESET)."""
        # Bounded: each ChainError consumes one ring entry.
        for _ in range(queue.size + 1):
            try:
                chain = queue.pop()
            except ChainError as e:
                self.metrics["invalid_chains"] += 1
                self.metrics["rx_fails" if queue.index == RXQ else "tx_fails"] += 1
                self.ratelog.warning(("badchain", queue.index), "%s: %s", self.name, e)
                if e.chain is not None:
                    queue.add_used(e.chain, 0)
                continue
            if chain is not None:
                self.metrics["chains"] += 1
            return chain
        raise QueueError(f"queue {queue.index}: more invalid chains than ring entries")

    def _guarded(self, index: int, fn: Callable[[Virtqueue], None], queue: Virtqueue) -> None:
        """Run a loop callback's queue work; a guest error sets DEVICE_NEEDS_RESET."""
        try:
            fn(queue)
        except GuestError as e:
            self.fail(f"queue {index}: {e}")

    def _control(self, args: list[str]) -> dict[str, Any]:
        if args == ["status"]:
            return self.status()
        if len(args) == 2 and args[0] == "link" and args[1] in ("up", "down"):
            self.set_link(args[1] == "up")
            return {"link_up": self.link_up}
        raise ValueError(f"usage: net:{self.tap_name} status | net:{self.tap_name} link up|down")
