"""Host side of virtio-net: a Linux TAP device with the virtio-net header (``linux/if_tun.h``).

The TAP is opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``: every ``read()`` returns one
frame preceded by a virtio-net header and every ``write()`` takes one, so guest transmit chains
go to the TAP as they are and the host kernel does the checksum and segmentation work the
guest left to the device (``CSUM``/``HOST_TSO*``).  What the kernel may hand *us* (partial
checksums, GSO frames of up to 64 KiB) is set with ``TUNSETOFFLOAD`` and must match what the
guest accepted (``GUEST_*``), so :class:`~embervm.devices.virtio.net.Net` sets it on every
activation (virtio.md §7.2 "Bridging to a Linux TAP device").

A TAP that exists is attached by name (whoever created it configured it); a name that does not
exist is created when we may (``CAP_NET_ADMIN``), brought up, and disappears with our file
descriptor.  Every failure is a one-line :class:`~embervm.errors.ConfigError` saying what to do.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import Protocol

from ...errors import ConfigError

__all__ = [
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TUN_F_TSO_ECN",
    "TUN_F_UFO",
    "Tap",
    "TapBackend",
]

TUN_PATH = "/dev/net/tun"

# -- linux/if_tun.h: ioctls (_IOW('T', n, int) / _IOR) and flags --------------------------------
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETFEATURES = 0x800454CF
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

# -- linux/sockios.h, linux/if.h: bringing an interface up ----------------------------------------
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

# struct ifreq: char ifr_name[16]; union { short ifr_flags; ... } padded to 40 bytes.
_IFREQ_FLAGS = struct.Struct("16sH22x")
_INT = struct.Struct("i")

# Offload sets tried, largest first, to learn what this kernel's TUNSETOFFLOAD accepts (it
# answers EINVAL for any bit it does not know, so this also probes for UFO, which Linux dropped
# in 4.14 and accepted again for tun in 4.15 to keep old guests working).
_OFFLOAD_PROBES = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
    TUN_F_CSUM,
)


class TapBackend(Protocol):
    """What :class:`~embervm.devices.virtio.net.Net` needs from its host side.

    :class:`Tap` is the real one; tests use a ``SOCK_SEQPACKET`` socket pair, which keeps
    packet boundaries like a TAP does.
    """

    #: interface name (for logs and the default MAC)
    name: str
    #: non-blocking fd: one ``read`` = one header + frame, one ``write`` = one header + frame
    fd: int
    #: the ``TUN_F_*`` offloads :meth:`set_offload` accepts
    offloads: int

    def set_vnet_hdr_size(self, size: int) -> None: ...
    def set_offload(self, flags: int) -> None: ...
    def close(self) -> None: ...


class Tap:
    """An open TAP device (``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``, non-blocking).

    ``Tap(name)`` attaches to the TAP ``name`` or creates it (root only; then it is brought up
    and removed again when closed).  Raises :class:`ConfigError` with a one-line reason.
    """

    __slots__ = ("name", "fd", "offloads", "created")

    def __init__(self, name: str) -> None:
        raw = name.encode()
        if not 1 <= len(raw) <= 15 or b"\0" in raw or b"/" in raw:
            raise ConfigError(f"--net tap={name}: a TAP name is 1 to 15 bytes, no '/' or NUL")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            hint = ("load the tun module (modprobe tun)" if e.errno == errno.ENOENT
                    else "run as root or give this user access to it")
            raise ConfigError(f"--net tap={name}: cannot open {TUN_PATH}: {e.strerror}; {hint}"
                              ) from None
        try:
            self.name, self.created = _attach(fd, name)
            features = _INT.unpack(fcntl.ioctl(fd, TUNGETFEATURES, bytes(_INT.size)))[0]
            if not features & IFF_VNET_HDR:
                raise ConfigError(f"--net tap={name}: this kernel's TAP has no IFF_VNET_HDR")
            # The VERSION_1 header is 12 bytes; TAP's default is the legacy 10.
            self.fd = fd
            self.set_vnet_hdr_size(12)
            self.offloads = _probe_offloads(fd)
            if self.created:
                _bring_up(self.name)
        except ConfigError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise ConfigError(f"--net tap={name}: setting up the TAP failed: {e.strerror}"
                              ) from None

    def set_vnet_hdr_size(self, size: int) -> None:
        """``TUNSETVNETHDRSZ``: 12 (VERSION_1 or MRG_RXBUF) or 10 (legacy).  OSError on failure."""
        fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, _INT.pack(size))

    def set_offload(self, flags: int) -> None:
        """``TUNSETOFFLOAD``: what the kernel may hand us (so, the guest).  OSError on failure."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def close(self) -> None:
        """Close the fd (idempotent).  A TAP we created disappears with it."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"Tap({self.name!r}, fd={self.fd}, offloads={self.offloads:#x})"


def _attach(fd: int, name: str) -> tuple[str, bool]:
    """TUNSETIFF: (actual name, created).  IFF_TUN_EXCL first tells "created" from "existed"."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    raw = name.encode()
    for excl in (IFF_TUN_EXCL, 0):
        try:
            out = fcntl.ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(raw, flags | excl))
        except OSError as e:
            if excl and e.errno == errno.EBUSY:
                continue  # the name exists: attach to it without EXCL
            raise ConfigError(_attach_error(name, e, exists=not excl)) from None
        actual = _IFREQ_FLAGS.unpack(out)[0].rstrip(b"\0").decode(errors="replace")
        return actual, bool(excl)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _attach_error(name: str, e: OSError, *, exists: bool) -> str:
    if e.errno == errno.EPERM:
        if exists:
            return (f"--net tap={name}: not allowed to attach to TAP {name}: it belongs to "
                    f"another user (ip tuntap add dev {name} mode tap user $USER), or run as root")
        return (f"--net tap={name}: TAP {name} does not exist and creating it needs root "
                f"(CAP_NET_ADMIN); create it first: ip tuntap add dev {name} mode tap user $USER")
    if e.errno == errno.EINVAL and exists:
        # tun_set_iff: the name belongs to a device that is not a TAP (or is a TUN).
        return f"--net tap={name}: {name} exists and is not a TAP device; choose another name"
    if e.errno == errno.EBUSY:
        return (f"--net tap={name}: TAP {name} is already in use by another process "
                "(a single-queue TAP can be attached once)")
    return f"--net tap={name}: cannot attach to TAP {name}: {e.strerror}"


def _probe_offloads(fd: int) -> int:
    supported = 0
    for flags in _OFFLOAD_PROBES:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError:
            continue
        supported = flags
        break
    # Nothing offloaded until a guest says what it can take (virtio.md §7.2).
    fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    return supported


def _bring_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        raw = name.encode()
        cur = _IFREQ_FLAGS.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(raw, 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(raw, cur | IFF_UP))
