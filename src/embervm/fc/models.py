"""Request bodies of the Firecracker v1.16.1 API as msgspec Structs.

One Struct per body of the swagger (``tests/data/firecracker-v1.16.1.yaml``), with
Firecracker's field names, defaults and enum values, checked against the Rust types that
actually decode them (``src/vmm/src/vmm_config/*.rs``, ``logger/logging.rs``; where the code
and the swagger differ, the code wins):

* every body that Firecracker decodes with ``#[serde(deny_unknown_fields)]`` refuses unknown
  fields (``forbid_unknown_fields=True``); the two that do not (``TokenBucket``, ``Metrics``)
  ignore them, as Firecracker does;
* JSON types are strict (a string where an integer is expected is refused), and integers carry
  the range of their Rust type (``u8``, ``u16``, ``u32``, ``u64``);
* ``PATCH /machine-config`` has every field optional (the swagger marks two as required, the
  code does not).

:func:`decode` turns any decoding failure into :class:`BodyError`, whose message is
Firecracker's ``An error occurred when deserializing the json body of a request: ...`` with a
serde-like detail (``missing field `vcpu_count```, ``unknown field `foo```, ``unknown variant
`foo`, expected `V1` or `V2```).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

U8 = Annotated[int, Meta(ge=0, le=0xFF)]
U16 = Annotated[int, Meta(ge=0, le=0xFFFF)]
U32 = Annotated[int, Meta(ge=0, le=0xFFFF_FFFF)]
U64 = Annotated[int, Meta(ge=0)]  # msgspec itself refuses integers beyond 2**64 - 1
I32 = Annotated[int, Meta(ge=-(2**31), le=2**31 - 1)]

CpuTemplate = Literal["C3", "T2", "T2S", "T2CL", "T2A", "None"]
LOG_LEVELS = {"off": "Off", "trace": "Trace", "debug": "Debug", "info": "Info", "warn": "Warn",
              "warning": "Warn", "error": "Error"}
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


class Body(Struct, forbid_unknown_fields=True, omit_defaults=False):
    """Base of the request bodies: unknown fields are refused (serde ``deny_unknown_fields``)."""


# -- shared ------------------------------------------------------------------------------------


class TokenBucket(Struct):
    """``TokenBucketConfig``: ``size`` tokens refilled every ``refill_time`` ms, plus an
    optional ``one_time_burst``.  Firecracker does not deny unknown fields here."""

    size: U64
    refill_time: U64
    one_time_burst: U64 | None = None


class RateLimiter(Body):
    """``RateLimiterConfig``: a bandwidth (bytes) and an ops bucket, each optional."""

    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


# -- actions, instance ---------------------------------------------------------------------------


class InstanceActionInfo(Body):
    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class Vm(Body):
    state: Literal["Paused", "Resumed"]


class BootSource(Body):
    kernel_image_path: str
    initrd_path: str | None = None
    boot_args: str | None = None


class MachineConfiguration(Body):
    """PUT ``/machine-config``: omitted optional fields take their defaults."""

    vcpu_count: U8
    mem_size_mib: U64
    smt: bool = False
    cpu_template: CpuTemplate | None = None
    track_dirty_pages: bool = False
    huge_pages: Literal["None", "2M"] = "None"


class MachineConfigurationUpdate(Body):
    """PATCH ``/machine-config``: only the given fields change."""

    vcpu_count: U8 | None = None
    mem_size_mib: U64 | None = None
    smt: bool | None = None
    cpu_template: CpuTemplate | None = None
    track_dirty_pages: bool | None = None
    huge_pages: Literal["None", "2M"] | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.__struct_fields__)


# -- devices -------------------------------------------------------------------------------------


class Drive(Body):
    drive_id: str
    is_root_device: bool
    partuuid: str | None = None
    cache_type: Literal["Unsafe", "Writeback"] = "Unsafe"
    is_read_only: bool | None = None
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None
    io_engine: Literal["Sync", "Async"] | None = None
    socket: str | None = None


class PartialDrive(Body):
    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None


class NetworkInterface(Body):
    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    mtu: U16 | None = None
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None

    def __post_init__(self) -> None:
        # Firecracker's MacAddr is decoded from "xx:xx:xx:xx:xx:xx" (six hex bytes).
        if self.guest_mac is not None and not _MAC.fullmatch(self.guest_mac):
            raise ValueError(f"invalid MAC address `{self.guest_mac}`")


class PartialNetworkInterface(Body):
    iface_id: str
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class Vsock(Body):
    guest_cid: U32
    uds_path: str
    vsock_id: str | None = None  # deprecated: answered with "Deprecation: true"


class Balloon(Body):
    amount_mib: U32
    deflate_on_oom: bool
    stats_polling_interval_s: U16 = 0
    free_page_hinting: bool = False
    free_page_reporting: bool = False


class BalloonUpdate(Body):
    amount_mib: U32


class BalloonStatsUpdate(Body):
    stats_polling_interval_s: U16


class BalloonStartCmd(Struct):
    """PATCH ``/balloon/hinting/start`` (Firecracker does not deny unknown fields here)."""

    acknowledge_on_stop: bool = True


class EntropyDevice(Body):
    rate_limiter: RateLimiter | None = None


class SerialDevice(Body):
    serial_out_path: str | None = None
    rate_limiter: TokenBucket | None = None


class Pmem(Body):
    id: str
    path_on_host: str
    root_device: bool = False
    read_only: bool = False
    rate_limiter: RateLimiter | None = None


class PartialPmem(Body):
    id: str
    rate_limiter: RateLimiter | None = None


class MemoryHotplugConfig(Body):
    total_size_mib: U64
    block_size_mib: U64 = 2
    slot_size_mib: U64 = 128


class MemoryHotplugSizeUpdate(Body):
    requested_size_mib: U64


# -- logging, metrics, MMDS ----------------------------------------------------------------------


class LoggerConfig(Body):
    """PUT ``/logger``.  ``level`` is matched case-insensitively and ``Warning`` means
    ``Warn``, as Firecracker's ``LevelFilter`` does; after decoding it holds the canonical name
    (Off, Trace, Debug, Info, Warn, Error) or None."""

    log_path: str | None = None
    level: str | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: str | None = None

    def __post_init__(self) -> None:
        if self.level is not None:
            canonical = LOG_LEVELS.get(self.level.lower())
            if canonical is None:
                raise ValueError("Invalid LevelFilter")
            self.level = canonical


class Metrics(Struct):
    """PUT ``/metrics`` (Firecracker's ``MetricsConfig`` does not deny unknown fields)."""

    metrics_path: str


class MmdsConfig(Body):
    network_interfaces: list[str]
    version: Literal["V1", "V2"] = "V1"
    ipv4_address: str | None = None
    imds_compat: bool = False


# -- snapshots, CPU templates --------------------------------------------------------------------


class SnapshotCreateParams(Body):
    mem_file_path: str
    snapshot_path: str
    snapshot_type: Literal["Full", "Diff"] = "Full"


class MemoryBackend(Body):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class NetworkOverride(Body):
    iface_id: str
    host_dev_name: str


class VsockOverride(Body):
    uds_path: str


class SnapshotLoadParams(Body):
    snapshot_path: str
    mem_file_path: str | None = None
    mem_backend: MemoryBackend | None = None
    enable_diff_snapshots: bool = False
    track_dirty_pages: bool = False
    resume_vm: bool = False
    network_overrides: list[NetworkOverride] = []
    vsock_override: VsockOverride | None = None
    clock_realtime: bool = False

    def __post_init__(self) -> None:
        if self.mem_backend is not None and self.mem_file_path is not None:
            raise ValueError("too many fields: either `mem_backend` or `mem_file_path` "
                             "exclusively is required")
        if self.mem_backend is None and self.mem_file_path is None:
            raise ValueError("missing field: either `mem_backend` or `mem_file_path` is "
                             "required")


class CpuidRegisterModifier(Body):
    register: Literal["eax", "ebx", "ecx", "edx"]
    bitmap: str


class CpuidLeafModifier(Body):
    leaf: str
    subleaf: str
    flags: I32
    modifiers: list[CpuidRegisterModifier]


class MsrModifier(Body):
    addr: str
    bitmap: str


class ArmRegisterModifier(Body):
    addr: str
    bitmap: str


class VcpuFeatures(Body):
    index: I32
    bitmap: str


class CpuConfig(Body):
    kvm_capabilities: list[str] = []
    cpuid_modifiers: list[CpuidLeafModifier] = []
    msr_modifiers: list[MsrModifier] = []
    reg_modifiers: list[ArmRegisterModifier] = []
    vcpu_features: list[VcpuFeatures] = []


# -- decoding ------------------------------------------------------------------------------------

SERDE_PREFIX = "An error occurred when deserializing the json body of a request: "

T = TypeVar("T")
_decoders: dict[Any, msgspec.json.Decoder] = {}


class BodyError(ValueError):
    """A request body that does not decode; ``str()`` is the fault message."""


def decode(body: bytes, kind: type[T]) -> T:
    """Decode ``body`` (JSON) as ``kind``, raising :class:`BodyError` with Firecracker's
    message prefix and a serde-like description of what is wrong."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        value = decoder.decode(body)
    except msgspec.ValidationError as e:
        raise BodyError(f"{SERDE_PREFIX}{_serde_like(str(e), kind)}.") from None
    except msgspec.DecodeError as e:
        raise BodyError(f"{SERDE_PREFIX}{e}.") from None
    if kind is not Any:
        _check_u64(value)
    return value


def _check_u64(value: Any) -> None:
    """msgspec decodes integers of any size and cannot bound them beyond int64 in a type, so
    the largest Rust integer type (u64) is enforced here on every integer of a Struct."""
    if isinstance(value, Struct):
        for name in value.__struct_fields__:
            _check_u64(getattr(value, name))
    elif isinstance(value, list):
        for item in value:
            _check_u64(item)
    elif isinstance(value, int) and not isinstance(value, bool) and value > _U64_MAX:
        raise BodyError(f"{SERDE_PREFIX}invalid value: integer `{value}`, expected u64.")


_U64_MAX = 2**64 - 1


def decode_any(body: bytes) -> Any:
    """Decode any JSON value (the MMDS bodies), with the same error message form."""
    return decode(body, Any)


_MISSING = re.compile(r"Object missing required field `([^`]*)`(?: - at `\$(.*)`)?$")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`(?: - at `\$(.*)`)?$")
_ENUM = re.compile(r"Invalid enum value '(.*)'(?: - at `\$(.*)`)?$")
_AT = re.compile(r"^(.*) - at `\$(.*)`$")


def _where(path: str | None) -> str:
    return f" at `{path.lstrip('.')}`" if path else ""


def _serde_like(msg: str, kind: Any) -> str:
    """Rewrite a msgspec validation message in serde's words where Firecracker's clients
    match on them (missing/unknown field, unknown variant)."""
    if m := _MISSING.match(msg):
        return f"missing field `{m.group(1)}`{_where(m.group(2))}"
    if m := _UNKNOWN.match(msg):
        return f"unknown field `{m.group(1)}`{_where(m.group(2))}"
    if m := _ENUM.match(msg):
        values = _literal_values(kind, m.group(2) or "")
        expected = ""
        if values:
            quoted = [f"`{v}`" for v in values]
            expected = ", expected " + (" or ".join(quoted) if len(quoted) <= 2 else
                                        ", ".join(quoted[:-1]) + " or " + quoted[-1])
        return f"unknown variant `{m.group(1)}`{expected}{_where(m.group(2))}"
    if m := _AT.match(msg):
        return f"{m.group(1)}{_where(m.group(2))}"
    return msg


def _literal_values(kind: Any, path: str) -> list[str]:
    """The allowed values of the Literal field at ``path`` (``.a.b[0].c``) of ``kind``."""
    from msgspec import inspect

    info = inspect.type_info(kind)
    for part in re.findall(r"\.(\w+)|\[\d+\]", path):
        info = _unwrap(info)
        if part and isinstance(info, inspect.StructType):
            info = next((f.type for f in info.fields if f.encode_name == part), None)
        elif not part and isinstance(info, inspect.ListType):
            info = info.item_type
        else:
            return []
        if info is None:
            return []
    info = _unwrap(info)
    if isinstance(info, inspect.LiteralType):
        return [str(v) for v in info.values]
    return []


def _unwrap(info: Any) -> Any:
    """Strip Optional (a union with None) and Meta wrappers from a msgspec type info."""
    from msgspec import inspect

    while True:
        if isinstance(info, inspect.UnionType):
            rest = [t for t in info.types if not isinstance(t, inspect.NoneType)]
            if len(rest) != 1:
                return info
            info = rest[0]
        elif isinstance(info, inspect.Metadata):
            info = info.type
        else:
            return info
