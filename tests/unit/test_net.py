"""virtio-net through the Linux-like MMIO driver, with a socket pair standing in for the TAP.

A ``SOCK_SEQPACKET`` pair keeps packet boundaries like a TAP: the device reads and writes one
end (virtio-net header + frame per packet), the test the other.  The event loop is run by hand.
The last tests use real TAP devices in a throwaway network namespace (root only).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

from embervm.devices.virtio import net as netmod
from embervm.devices.virtio import spec
from embervm.devices.virtio import tap as tapmod
from embervm.devices.virtio.mmio import MmioTransport
from embervm.devices.virtio.net import (
    NEEDS_CTRL_VQ,
    RXQ,
    TXQ,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    Net,
    default_mac,
)
from embervm.devices.virtio.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO
from embervm.errors import ConfigError
from embervm.eventloop import EventLoop
from embervm.memory import GuestMemory
from embervm.testing.driver import LINUX_TRANSPORT_FEATURES, MmioDriver

ALL_TUN = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO
DEVICE_BITS = (1 << 24) - 1
PACKED = spec.bit(spec.VIRTIO_F_RING_PACKED)
LINUX = DEVICE_BITS | (LINUX_TRANSPORT_FEATURES & ~PACKED)  # what Linux 6.1 accepts (split)
GUEST_OFFLOADS = (spec.bit(VIRTIO_NET_F_GUEST_CSUM) | spec.bit(VIRTIO_NET_F_GUEST_TSO4)
                  | spec.bit(VIRTIO_NET_F_GUEST_TSO6) | spec.bit(VIRTIO_NET_F_GUEST_ECN)
                  | spec.bit(VIRTIO_NET_F_GUEST_UFO))
MRG = spec.bit(VIRTIO_NET_F_MRG_RXBUF)
HDR = struct.Struct("<BBHHHHH")
GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("02aabbccddee")


def frame(payload: bytes, ethertype: int = 0x0800) -> bytes:
    return GUEST_MAC + HOST_MAC + struct.pack("!H", ethertype) + payload


def vhdr(flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0,
         csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    return HDR.pack(flags, gso, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(n))


class PairTap:
    """A TapBackend over a SOCK_SEQPACKET pair; ``peer`` is the host network's end."""

    def __init__(self, offloads: int = ALL_TUN) -> None:
        self._dev, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._dev.setblocking(False)
        self.peer.setblocking(False)
        for s in (self._dev, self.peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.name = "tap-test"
        self.fd = self._dev.fileno()
        self.offloads = offloads
        self.hdr_size = 12
        self.offload = 0
        self.closed = False

    def set_vnet_hdr_size(self, size: int) -> None:
        self.hdr_size = size

    def set_offload(self, flags: int) -> None:
        if flags & ~self.offloads:
            raise OSError(22, "Invalid argument")
        self.offload = flags

    def close(self) -> None:
        if not self.closed:
            self._dev.close()
            self.closed = True

    def send(self, packet: bytes) -> None:
        self.peer.send(packet)

    def discard_queued(self) -> None:
        """Throw away what the "host network" queued for the device and it has not read."""
        while True:
            try:
                self._dev.recv(1 << 17)
            except BlockingIOError:
                return

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(1 << 17))
            except BlockingIOError:
                return out


class Guest:
    """A Net device behind an MMIO transport, probed by the Linux-like driver."""

    def __init__(self, *, offloads: int = ALL_TUN, accept: int | None = LINUX,
                 legacy: bool = False, packed: bool = False, mac: str | None = None,
                 queue_sizes: list[int] | None = None, exact: int | None = None,
                 mem_size: int = 32 << 20, **net_kw) -> None:
        self.tap = PairTap(offloads)
        self.loop = EventLoop()
        self.mem = GuestMemory([(0, mem_size)])
        self.dev = Net("tap-test", mac=mac, backend=self.tap, **net_kw)
        self.dev.loop = self.loop
        self.transport = MmioTransport(self.dev, self.mem, legacy=legacy, packed=packed)
        self.drv = MmioDriver(self.transport, self.mem)
        if packed and accept == LINUX:
            accept = LINUX | PACKED
        self.features = self.drv.probe(accept=accept, queue_sizes=queue_sizes, exact=exact)

    @property
    def reading(self) -> bool:
        return self.loop.has_reader(self.tap.fd)

    def post_rx(self, count: int, size: int = 1526) -> None:
        for _ in range(count):
            self.drv.submit(RXQ, writable=[size])

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            self.loop.run_once(0)

    def rx(self) -> list[tuple[int, bytes]]:
        """(used.len, bytes written) per used receive buffer."""
        return [(ln, bufs[0][:ln]) for _tok, ln, bufs in self.drv.used(RXQ)]

    def send(self, data: bytes, *, split: list[int] | None = None) -> None:
        """Transmit ``data`` (header + frame), cut into descriptors at ``split`` offsets."""
        cuts = [0, *(split or []), len(data)]
        self.drv.submit(TXQ, readable=[data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)])

    def close(self) -> None:
        self.dev.close()
        self.tap.peer.close()
        self.loop.close()


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


# -- features and configuration ---------------------------------------------------------------


def test_offers_mac_status_mrg_checksum_and_tso_but_nothing_that_needs_a_control_queue(guest):
    offered = guest.transport.offered_features
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4):
        assert offered >> bit & 1, bit
    # virtio.md §7.2: Linux refuses to probe if any of these come without CTRL_VQ.
    assert not offered & (NEEDS_CTRL_VQ | spec.bit(VIRTIO_NET_F_CTRL_VQ))
    assert guest.drv.device_id == spec.VIRTIO_ID_NET
    assert len(guest.drv.rings) == 2  # receiveq1, transmitq1; no control queue


@pytest.mark.parametrize(("tun", "expected"), [
    (0, 0),
    (TUN_F_CSUM, spec.bit(VIRTIO_NET_F_GUEST_CSUM)),
    (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
     spec.bit(VIRTIO_NET_F_GUEST_CSUM) | spec.bit(VIRTIO_NET_F_GUEST_TSO4)
     | spec.bit(VIRTIO_NET_F_GUEST_TSO6)),
    (ALL_TUN, GUEST_OFFLOADS),
])
def test_guest_offloads_are_offered_only_as_far_as_the_tap_takes_them(tun, expected):
    g = Guest(offloads=tun)
    assert g.transport.offered_features & GUEST_OFFLOADS == expected
    g.close()


def test_config_has_the_mac_byte_by_byte_and_link_up_status():
    g = Guest(mac="52:54:00:AB:cd:01")
    assert g.drv.read_config_bytes(0, 6) == bytes.fromhex("525400abcd01")
    assert g.drv.read_config(6, 2) == netmod.VIRTIO_NET_S_LINK_UP
    g.drv.write_config(0, 1, 0xFF)  # mac is not writable without CTRL_MAC_ADDR
    assert g.drv.read_config_bytes(0, 6) == bytes.fromhex("525400abcd01")
    g.close()


def test_default_mac_is_stable_unicast_locally_administered_and_per_tap():
    mac = default_mac("tap0")
    assert mac == default_mac("tap0") and mac != default_mac("tap1")
    assert mac[0] & 1 == 0 and mac[0] & 2  # unicast, locally administered
    assert mac[:3] == b"\x52\x54\x00"
    g = Guest()
    assert g.drv.read_config_bytes(0, 6) == default_mac("tap-test")
    g.close()


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "00:00:00:00:00:00", "52:54:00:12:34",
                                 "52-54-00-12-34-56", "zz:54:00:12:34:56"])
def test_bad_mac_is_a_config_error_naming_it(mac):
    with pytest.raises(ConfigError, match=f"mac={mac}"):
        Net("tap0", mac=mac, backend=PairTap())


@pytest.mark.parametrize("bits", [
    (VIRTIO_NET_F_GUEST_TSO4,),  # GUEST_TSO4 needs GUEST_CSUM
    (VIRTIO_NET_F_HOST_TSO4,),  # HOST_TSO4 needs CSUM
    (VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN),  # ECN needs TSO4 or TSO6
])
def test_features_ok_is_refused_for_offloads_without_what_they_depend_on(bits):
    exact = spec.bit(spec.VIRTIO_F_VERSION_1)
    for b in bits:
        exact |= spec.bit(b)
    with pytest.raises(Exception, match="refuses features"):
        Guest(exact=exact)


def test_activation_matches_the_tap_header_size_and_offloads_to_the_guest():
    g = Guest()
    assert (g.tap.hdr_size, g.tap.offload) == (12, ALL_TUN)
    g.close()
    g = Guest(accept=LINUX & ~GUEST_OFFLOADS)
    assert (g.tap.hdr_size, g.tap.offload) == (12, 0)
    g.close()
    g = Guest(accept=LINUX & ~spec.bit(VIRTIO_NET_F_GUEST_TSO6) & ~spec.bit(VIRTIO_NET_F_GUEST_ECN))
    assert g.tap.offload == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_UFO
    g.close()
    # Legacy (no VERSION_1) without MRG_RXBUF uses the 10-byte header (§5.1.6).
    g = Guest(legacy=True, accept=LINUX & ~MRG)
    assert g.tap.hdr_size == 10
    g.close()
    g = Guest(legacy=True)
    assert g.tap.hdr_size == 12
    g.close()


# -- transmit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [None, [12], [5, 15], [12, 13, 14, 100]])
def test_transmit_sends_header_and_frame_to_the_tap_as_one_packet(guest, split):
    packet = vhdr() + frame(pattern(300))
    guest.send(packet, split=split)
    assert guest.tap.received() == [packet]
    [(_tok, ln, _bufs)] = guest.drv.used(TXQ)
    assert ln == 0  # §5.1.6.2: the device writes nothing into a transmit chain
    assert guest.dev.metrics["tx_frames"] == 1 and guest.dev.metrics["tx_bytes"] == 314


def test_transmit_passes_checksum_and_tso_headers_through(guest):
    tso = vhdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 66, 1448, 34, 16)
    packet = tso + frame(pattern(20000))
    guest.send(packet, split=[12])
    assert guest.tap.received() == [packet]
    assert guest.dev.metrics["tx_gso_frames"] == 1


def test_transmit_completion_interrupts_the_driver(guest):
    before = guest.transport.interrupt.count
    guest.send(vhdr() + frame(b"x" * 60))
    assert guest.transport.interrupt.count == before + 1
    assert guest.drv.interrupt() & spec.VIRTIO_MMIO_INT_VRING


def test_transmit_yields_to_the_loop_after_its_budget_and_finishes_on_a_timer(guest, monkeypatch):
    monkeypatch.setattr(netmod, "TX_BUDGET", 4)
    for i in range(10):
        guest.drv.submit(TXQ, readable=[vhdr() + frame(pattern(100, i))], kick=False)
    guest.drv.kick(TXQ)
    assert len(guest.tap.received()) == 4
    guest.pump()
    assert len(guest.tap.received()) == 6
    assert len(guest.drv.used(TXQ)) == 10


def test_transmit_error_from_the_tap_drops_the_frame_and_completes_the_chain(guest):
    guest.tap.peer.close()  # writes now fail (EPIPE), as a TAP write fails when it is down
    guest.send(vhdr() + frame(b"y" * 60))
    [(_tok, ln, _)] = guest.drv.used(TXQ)
    assert ln == 0 and guest.dev.metrics["tx_errors"] == 1


# -- receive --------------------------------------------------------------------------------------


def test_receive_fills_a_mergeable_buffer_with_num_buffers_1(guest):
    guest.post_rx(4)
    f = frame(pattern(100))
    guest.tap.send(vhdr(flags=VIRTIO_NET_HDR_F_DATA_VALID) + f)
    guest.pump()
    [(ln, data)] = guest.rx()
    assert ln == 12 + len(f)
    assert data == vhdr(flags=VIRTIO_NET_HDR_F_DATA_VALID, num_buffers=1) + f
    assert guest.dev.metrics["rx_frames"] == 1


def test_receive_spreads_a_64k_gso_frame_over_mergeable_buffers(guest):
    guest.post_rx(64, 1526)
    f = frame(pattern(65000, 3))
    h = vhdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 66, 1448, 34, 16)
    guest.tap.send(h + f)
    guest.pump()
    got = guest.rx()
    n = -(-(12 + len(f)) // 1526)
    assert len(got) == n
    assert [ln for ln, _ in got] == [1526] * (n - 1) + [(12 + len(f)) - 1526 * (n - 1)]
    data = b"".join(d for _, d in got)
    assert data[:12] == h[:10] + struct.pack("<H", n)  # num_buffers in the first header
    assert data[12:] == f
    assert guest.dev.metrics["rx_gso_frames"] == 1


def test_receive_without_mrg_rxbuf_uses_one_buffer_and_drops_frames_too_big_for_it():
    g = Guest(accept=LINUX & ~MRG & ~GUEST_OFFLOADS)
    g.post_rx(2, 12 + 1514)
    big, small = frame(pattern(1600)), frame(pattern(1500))
    g.tap.send(vhdr() + big)
    g.tap.send(vhdr() + small)
    g.pump()
    [(ln, data)] = g.rx()
    assert (ln, data) == (12 + len(small), vhdr(num_buffers=1) + small)
    assert g.dev.metrics["rx_dropped"] == 1
    g.close()


def test_tap_is_not_read_until_the_guest_posts_receive_buffers(guest):
    guest.tap.send(vhdr() + frame(b"early"))
    guest.pump()
    assert not guest.reading
    assert guest.dev.metrics["rx_frames"] == 0
    guest.post_rx(1)  # the kick starts the reader
    guest.pump()
    [(_, data)] = guest.rx()
    assert data.endswith(b"early")


def test_receive_stops_polling_when_the_ring_runs_dry_and_resumes_on_the_kick(guest):
    guest.post_rx(2)
    for i in range(3):
        guest.tap.send(vhdr() + frame(pattern(64, i)))
    guest.pump()
    assert len(guest.rx()) == 2
    # The third frame waits in the device; the TAP is not polled (no busy loop on a readable
    # fd) and the rx kick is re-armed: the driver's next buffer is announced.
    assert not guest.reading
    guest.post_rx(1)
    assert guest.dev.metrics["rx_frames"] == 3
    [(_, data)] = guest.rx()
    assert data[12:] == frame(pattern(64, 2))
    assert not guest.reading  # that buffer is used: dry again
    guest.post_rx(1)
    assert guest.reading


def test_receive_raises_one_interrupt_per_batch(guest):
    guest.post_rx(16)
    for i in range(10):
        guest.tap.send(vhdr() + frame(pattern(64, i)))
    before = guest.transport.interrupt.count
    guest.loop.run_once(0)
    assert guest.transport.interrupt.count == before + 1
    assert len(guest.rx()) == 10


def test_frames_with_offloads_the_guest_did_not_accept_are_dropped_or_cleaned():
    g = Guest(accept=LINUX & ~GUEST_OFFLOADS)
    g.post_rx(8)
    f = frame(pattern(200))
    g.tap.send(vhdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 66, 1448, 34, 16) + f)
    g.tap.send(vhdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 16) + f)
    g.tap.send(vhdr(VIRTIO_NET_HDR_F_DATA_VALID) + f)
    g.pump()
    [(_, data)] = g.rx()
    assert data == vhdr(num_buffers=1) + f  # §5.1.6.3.2: flags 0 without GUEST_CSUM
    assert g.dev.metrics["rx_dropped"] == 2
    g.close()


@pytest.mark.parametrize("packed", [False, True])
def test_frames_move_both_ways_on_split_and_packed_rings(packed):
    g = Guest(packed=packed)
    assert bool(g.features & PACKED) == packed
    g.post_rx(8)
    for i in range(5):
        g.send(vhdr() + frame(pattern(80, i)))
        g.tap.send(vhdr() + frame(pattern(90, i)))
    g.pump()
    assert g.tap.received() == [vhdr() + frame(pattern(80, i)) for i in range(5)]
    assert [d[12:] for _, d in g.rx()] == [frame(pattern(90, i)) for i in range(5)]
    g.close()


# -- link, lifecycle -------------------------------------------------------------------------------


def test_link_changes_raise_a_config_interrupt_and_bump_the_generation(guest):
    gen = guest.drv.config_generation()
    guest.drv.interrupt()
    guest.dev.set_link(False)
    assert guest.drv.interrupt() & spec.VIRTIO_MMIO_INT_CONFIG
    assert guest.drv.config_generation() != gen
    assert guest.drv.read_config(6, 2) == 0
    guest.dev.set_link(False)  # no change, no interrupt
    assert guest.drv.interrupt() == 0
    guest.dev.set_link(True)
    assert guest.drv.interrupt() & spec.VIRTIO_MMIO_INT_CONFIG
    assert guest.drv.read_config(6, 2) == netmod.VIRTIO_NET_S_LINK_UP


def test_control_command_named_after_the_tap_reports_and_sets_the_link(guest):
    [(name, handler)] = guest.dev.control_commands().items()
    assert name == "net:tap-test"
    assert handler(["link", "down"]) == {"link_up": False}
    status = handler(["status"])
    assert status["link_up"] is False and status["mac"] == "52:54:00:" + default_mac(
        "tap-test")[3:].hex(":")
    with pytest.raises(ValueError, match="usage"):
        handler(["link", "sideways"])


def test_dead_tap_stops_polling_and_takes_the_link_down(guest):
    guest.post_rx(2)
    guest.pump()
    assert guest.reading
    guest.tap.peer.close()  # the read end sees EOF: a back-end that is gone
    guest.pump()
    assert not guest.reading
    assert guest.drv.read_config(6, 2) == 0
    guest.post_rx(1)
    assert not guest.reading  # never polled again


def test_reset_stops_polling_clears_offloads_and_reprobes_three_times(guest):
    for _ in range(3):
        guest.post_rx(2)
        guest.pump()
        assert guest.reading
        guest.drv.remove()
        assert not guest.reading and guest.tap.offload == 0
        guest.drv.probe(accept=LINUX)
        assert guest.tap.offload == ALL_TUN
        guest.post_rx(1)
        guest.tap.send(vhdr() + frame(b"after reset"))
        guest.send(vhdr() + frame(b"from guest"))
        guest.pump()
        assert guest.rx()[-1][1].endswith(b"after reset")
        assert guest.tap.received() == [vhdr() + frame(b"from guest")]
    assert guest.dev.metrics["activations"] == 4


def test_a_frame_in_hand_at_reset_is_dropped_and_later_frames_still_arrive(guest):
    # A frame is only read when a buffer is posted; this one needs two mergeable buffers and
    # the guest posted one, so the device holds it when the driver goes away.
    guest.post_rx(1)
    guest.tap.send(vhdr() + frame(pattern(3000)))
    guest.tap.send(vhdr() + frame(b"two"))
    guest.pump()
    assert guest.rx() == [] and not guest.reading
    guest.drv.remove()
    guest.drv.probe(accept=LINUX)
    guest.post_rx(4)
    guest.pump()
    [(_, data)] = guest.rx()
    assert data.endswith(b"two")  # still queued in the TAP: delivered to the new driver
    assert guest.dev.metrics["rx_dropped"] == 1


def test_close_closes_the_tap_once_and_stops_polling(guest):
    guest.post_rx(1)
    guest.pump()
    guest.dev.close()
    assert guest.tap.closed and not guest.reading
    guest.dev.close()
    guest.drv.remove()  # a reset after close is harmless


# -- TAP set-up errors -----------------------------------------------------------------------------


def test_no_access_to_dev_net_tun_is_a_one_line_config_error(monkeypatch):
    def refuse(path, flags, mode=0o777):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(tapmod.os, "open", refuse)
    with pytest.raises(ConfigError, match=r"^--net tap=tap9: cannot open /dev/net/tun: "
                                          r"Permission denied; run as root"):
        tapmod.Tap("tap9")


@pytest.mark.parametrize(("exists", "message"), [
    (False, "TAP tap9 does not exist and creating it needs root"),
    (True, "not allowed to attach to TAP tap9: it belongs to another user"),
])
def test_no_permission_for_the_tap_says_how_to_get_it(monkeypatch, exists, message):
    r, w = os.pipe()  # any fd: every ioctl on it is answered by the fake below
    os.close(w)
    monkeypatch.setattr(tapmod.os, "open", lambda *a, **k: r)

    def ioctl(fd, request, arg=0, *rest):
        if request == tapmod.TUNSETIFF:
            excl = struct.unpack_from("16sH", arg)[1] & tapmod.IFF_TUN_EXCL
            if excl and exists:
                raise OSError(errno.EBUSY, "Device or resource busy")
            raise OSError(errno.EPERM, "Operation not permitted")
        raise AssertionError("no other ioctl after a refused TUNSETIFF")

    monkeypatch.setattr(tapmod.fcntl, "ioctl", ioctl)
    with pytest.raises(ConfigError, match=message) as info:
        tapmod.Tap("tap9")
    assert "\n" not in str(info.value) and "ip tuntap add dev tap9 mode tap user" in str(
        info.value)
    with pytest.raises(OSError):
        os.fstat(r)  # the fd was closed on the error path


# -- real TAP devices (root, in a throwaway network namespace) -------------------------------------


def _in_netns(code: str) -> dict:
    """Run ``code`` (which prints one JSON line) with python inside a fresh namespace."""
    if os.geteuid() != 0:
        pytest.skip("needs root: TAP devices in a network namespace")
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs iproute2 (ip) and /dev/net/tun")
    ns = f"embervm-unet-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True, timeout=30)
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c",
                            textwrap.dedent(code)], capture_output=True, timeout=120)
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=30)
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout.decode().splitlines()[-1])


def test_tap_errors_are_one_line_config_errors_that_say_what_to_do():
    out = _in_netns("""
        import json
        from embervm.devices.virtio.tap import Tap
        from embervm.errors import ConfigError
        def err(name):
            try:
                Tap(name).close()
            except ConfigError as e:
                return str(e)
        first = Tap("busy0")
        print(json.dumps({"lo": err("lo"), "busy": err("busy0"), "slash": err("a/b")}))
    """)
    assert "lo exists and is not a TAP device" in out["lo"]
    assert "already in use by another process" in out["busy"]
    assert "no '/'" in out["slash"]
    assert all("\n" not in msg for msg in out.values())


def test_absent_tap_is_created_up_and_removed_with_the_fd_while_an_existing_one_stays():
    out = _in_netns("""
        import json, socket, subprocess
        from embervm.devices.virtio.tap import Tap, TUN_F_CSUM
        def flags(name):
            return open(f"/sys/class/net/{name}/flags").read().strip()
        t = Tap("new0")
        created = (t.created, int(flags("new0"), 16) & 1, t.offloads & TUN_F_CSUM)
        t.close()
        gone = "new0" not in socket.if_nameindex().__repr__()
        subprocess.run(["ip", "tuntap", "add", "dev", "old0", "mode", "tap"], check=True)
        t = Tap("old0")
        existing = (t.created, int(flags("old0"), 16) & 1)
        t.close()
        kept = "old0" in socket.if_nameindex().__repr__()
        print(json.dumps({"created": created, "gone": gone, "existing": existing, "kept": kept}))
    """)
    assert out["created"] == [True, 1, TUN_F_CSUM]
    assert out["gone"] is True
    assert out["existing"] == [False, 0]  # attached as it is: its owner configures it
    assert out["kept"] is True


def test_frames_cross_a_real_tap_with_partial_checksums_completed_by_the_host():
    # The guest sends a UDP datagram with only the pseudo-header sum in its checksum field and
    # NEEDS_CSUM (what Linux does with CSUM); the host stack must receive it.  The host sends
    # a datagram back; the guest's buffer gets it (header flags say how the checksum stands).
    out = _in_netns("""
        import json, socket, struct, subprocess
        from embervm.devices.virtio.mmio import MmioTransport
        from embervm.devices.virtio.net import Net, RXQ, TXQ
        from embervm.eventloop import EventLoop
        from embervm.memory import GuestMemory
        from embervm.testing.driver import MmioDriver

        def csum(data):
            data += b"\\0" * (len(data) % 2)
            s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
            s = (s >> 16) + (s & 0xFFFF)
            return (s + (s >> 16)) & 0xFFFF

        loop, mem = EventLoop(), GuestMemory([(0, 8 << 20)])
        dev = Net("rt0")
        dev.loop = loop
        drv = MmioDriver(MmioTransport(dev, mem), mem)
        drv.probe()
        for cmd in (["ip", "addr", "add", "10.9.0.1/24", "dev", "rt0"],
                    ["ip", "neigh", "add", "10.9.0.2", "lladdr", dev.status()["mac"], "dev",
                     "rt0", "nud", "permanent"]):
            subprocess.run(cmd, check=True)
        host_mac = bytes.fromhex(open("/sys/class/net/rt0/address").read().replace(":", ""))
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("10.9.0.1", 7000))
        sink.settimeout(5)
        payload = b"from the guest" * 10
        udp_len = 8 + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0,
                         socket.inet_aton("10.9.0.2"), socket.inet_aton("10.9.0.1"))
        ip = ip[:10] + struct.pack("!H", 0xFFFF - csum(ip)) + ip[12:]
        pseudo = csum(ip[12:20] + struct.pack("!BBH", 0, 17, udp_len))
        udp = struct.pack("!HHHH", 7001, 7000, udp_len, pseudo) + payload
        eth = host_mac + bytes.fromhex(dev.status()["mac"].replace(":", "")) + b"\\x08\\x00"
        hdr = struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 6, 0)  # NEEDS_CSUM at UDP + 6
        drv.submit(TXQ, readable=[hdr + eth + ip + udp])
        got, addr = sink.recvfrom(2048)
        for _ in range(4):
            drv.submit(RXQ, writable=[1526])
        sink.sendto(b"to the guest", ("10.9.0.2", 7001))
        used = []
        for _ in range(100):
            loop.run_once(0.05)
            used += drv.used(RXQ)
            if used:
                break
        (_tok, ln, [buf]), = used
        frame = buf[12:ln]
        print(json.dumps({"host_got": got.decode(), "from": addr[0],
                          "guest_got": frame.endswith(b"to the guest"),
                          "ethertype": frame[12:14].hex(), "num_buffers": buf[10]}))
        dev.close()
    """)
    assert out["host_got"] == "from the guest" * 10 and out["from"] == "10.9.0.2"
    assert out["guest_got"] is True and out["ethertype"] == "0800" and out["num_buffers"] == 1
