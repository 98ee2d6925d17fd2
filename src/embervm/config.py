"""The typed configuration of one VM, validated before anything is created.

Every check here turns bad user input into a :class:`~embervm.errors.ConfigError` whose message
says what to fix; the CLI prints it on one line and exits with status 2.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .host import host_profile

# Every guest's base words (Firecracker's defaults, with panic=-1: a panic reboots at once, which
# ends the VM) and, on this project's PVM host only, the words without which the kit kernel
# cannot boot there (embervm.host, guest/README.md).  embervm puts them first; the user's words
# follow and may override.
CMDLINE_BASE = "console=ttyS0 panic=-1 reboot=k"
CMDLINE_REQUIRED = f"{CMDLINE_BASE} {host_profile().cmdline_words}".strip()
# Recommended: each saves boot time under emulation.  tsc_early_khz= is added from
# KVM_GET_TSC_KHZ at start-up.
CMDLINE_RECOMMENDED = "quiet noreplace-smp percpu_alloc=page rodata=off"
# embervm provides no ACPI tables (ACPI boot of the kit kernel does not work yet): say so, and
# the `full` kernel skips its search for an RSDP instead of logging a firmware error.
CMDLINE_EMBERVM = "acpi=off"


def max_vcpus() -> int:
    """The vCPU limit before KVM is asked: the MP table's room, and the host profile's cap
    (the VMM also checks KVM_CAP_MAX_VCPUS when it creates the VM)."""
    from .boot.mptable import MAX_VCPUS as MPTABLE_MAX

    cap = host_profile().max_vcpus
    return min(MPTABLE_MAX, cap) if cap else MPTABLE_MAX


#: how long a graceful stop (SIGTERM, ``stop`` on the control socket, Machine.shutdown) waits
#: for the guest to react to Ctrl-Alt-Del before stopping it
STOP_GRACE_SECONDS = 10.0

MIN_MEM_MIB = 32
MAX_MEM_MIB = 64 * 1024


@dataclass
class BucketConfig:
    """One token bucket (Firecracker's ``TokenBucket``): ``size`` tokens (bytes or operations),
    refilled completely every ``refill_time_ms``; ``one_time_burst`` extra tokens at the start."""

    size: int
    refill_time_ms: int
    one_time_burst: int = 0


@dataclass
class RateLimitConfig:
    """Firecracker's ``RateLimiter``: a bandwidth bucket (bytes) and an ops bucket (requests);
    either may be absent (unlimited)."""

    bandwidth: BucketConfig | None = None
    ops: BucketConfig | None = None


CACHE_TYPES = ("Unsafe", "Writeback")
IO_ENGINES = ("Sync", "Async")


@dataclass
class DiskConfig:
    path: Path
    read_only: bool = False
    id: str | None = None  # Firecracker's drive_id; also the virtio-blk serial
    is_root_device: bool = False  # root=/dev/vdX (or PARTUUID=partuuid) on the command line
    partuuid: str | None = None
    cache_type: str = "Unsafe"  # Unsafe: FLUSH not offered; Writeback: FLUSH -> fdatasync
    io_engine: str = "Sync"  # Sync: on the event loop; Async: on I/O worker threads
    rate_limiter: RateLimitConfig | None = None


@dataclass
class SerialConfig:
    kind: str = "stdio"  # "stdio" | "file" | "null"
    path: Path | None = None


@dataclass
class NetConfig:
    tap: str
    mac: str | None = None  # "52:54:00:12:34:56"; None: derived from the TAP name
    id: str | None = None  # Firecracker's iface_id
    rx_rate_limiter: RateLimitConfig | None = None
    tx_rate_limiter: RateLimitConfig | None = None


@dataclass
class ConsoleConfig:
    kind: str = "stdio"  # "stdio" | "socket"
    path: Path | None = None


@dataclass
class VsockConfig:
    cid: int
    uds: Path
    id: str | None = None  # Firecracker's deprecated vsock_id, echoed back by GET /vm/config


@dataclass
class BalloonConfig:
    target_mib: int = 0
    deflate_on_oom: bool = False
    stats_seconds: int = 0  # 0: no statistics queue polling


@dataclass
class VmConfig:
    kernel: Path | None = None  # None: the embedded default kernel
    initrd: Path | None = None  # None: the embedded default initramfs (with the default kernel)
    cmdline: str | None = None  # None: required + recommended words
    append: str = ""
    mem_mib: int = 256
    vcpus: int = 1
    disks: list[DiskConfig] = field(default_factory=list)
    serial: SerialConfig = field(default_factory=SerialConfig)
    rng: bool = False
    rng_rate_limiter: RateLimitConfig | None = None
    nets: list[NetConfig] = field(default_factory=list)
    console: ConsoleConfig | None = None
    vsock: VsockConfig | None = None
    balloon: BalloonConfig | None = None
    control: Path | None = None  # control socket (balloon target, stats, ...)

    def validate(self) -> None:
        if not MIN_MEM_MIB <= self.mem_mib <= MAX_MEM_MIB:
            raise ConfigError(
                f"--mem {self.mem_mib}: guest memory must be between {MIN_MEM_MIB} and "
                f"{MAX_MEM_MIB} MiB"
            )
        limit = max_vcpus()
        if not 1 <= self.vcpus <= limit:
            why = f" ({host_profile().description})" if host_profile().max_vcpus else ""
            raise ConfigError(f"--vcpus {self.vcpus}: must be between 1 and {limit}{why}")
        for label, p in (("--kernel", self.kernel), ("--initrd", self.initrd)):
            if p is not None:
                check_readable_file(p, label)
        seen: set[str] = set()
        for d in self.disks:
            check_readable_file(d.path, "--disk")
            if not d.read_only and not os.access(d.path, os.W_OK):
                raise ConfigError(f"--disk {d.path}: not writable; add ',ro' to attach read-only")
            if d.id is not None:
                if len(d.id.encode()) > 20:
                    raise ConfigError(f"--disk id={d.id}: at most 20 bytes (virtio-blk serial)")
                if d.id in seen:
                    raise ConfigError(f"--disk id={d.id}: used twice")
                seen.add(d.id)
        if len(self.disks) > 8:
            raise ConfigError("at most 8 disks")
        for n in self.nets:
            if not n.tap or len(n.tap.encode()) > 15:
                raise ConfigError(f"--net tap={n.tap}: a TAP name is 1 to 15 bytes")
            if n.mac is not None and not _MAC.fullmatch(n.mac):
                raise ConfigError(f"--net mac={n.mac}: expected six hex bytes like "
                                  "52:54:00:12:34:56")
        if self.vsock is not None:
            if not 3 <= self.vsock.cid <= 0xFFFF_FFFE:
                raise ConfigError(f"--vsock cid={self.vsock.cid}: guest CIDs are 3 to 4294967294"
                                  " (0-2 and -1 are reserved)")
            if not self.vsock.uds.parent.is_dir():
                raise ConfigError(f"--vsock uds={self.vsock.uds}: {self.vsock.uds.parent} is not "
                                  "a directory")
        if self.balloon is not None:
            if not 0 <= self.balloon.target_mib < self.mem_mib:
                raise ConfigError(f"--balloon {self.balloon.target_mib}: the target must be "
                                  f"below the guest memory ({self.mem_mib} MiB)")
            if self.balloon.stats_seconds < 0:
                raise ConfigError("--balloon stats=SECONDS must not be negative")
        if self.console is not None and self.console.kind == "socket":
            assert self.console.path is not None
            if not self.console.path.parent.is_dir():
                raise ConfigError(f"--console socket:{self.console.path}: "
                                  f"{self.console.path.parent} is not a directory")
        if self.serial.kind == "file" and self.serial.path is not None:
            parent = self.serial.path.parent
            if not parent.is_dir():
                raise ConfigError(f"--serial file:{self.serial.path}: {parent} is not a directory")


_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def check_readable_file(path: Path, label: str) -> None:
    if not path.exists():
        raise ConfigError(f"{label} {path}: no such file")
    if path.is_dir():
        raise ConfigError(f"{label} {path}: is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{label} {path}: permission denied")
