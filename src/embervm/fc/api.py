"""Firecracker v1.16.1's API rules on top of :class:`embervm.machine.Machine`.

:meth:`FirecrackerApi.handle` takes one HTTP request (method, path, body) and returns a
:class:`Response`; the HTTP server (:mod:`embervm.fc.http`) only moves bytes.  The rules are
read from Firecracker's code, which wins where it and the swagger differ:

* routing follows ``parsed_request.rs``: the first path segment selects the resource, the
  next one is an id or a sub-resource, and further segments are ignored (as Firecracker does);
  an unknown method/path answers 400 ``Invalid request method and/or path: PUT x.`` (the
  first segment, without its slash, as Firecracker's message has it);
* a body is decoded (:mod:`embervm.fc.models`) before anything else is checked, then the
  state rules of ``rpc_interface.rs`` apply (``... not supported before/after starting the
  microVM.``), then the Machine is called;
* success is 204 without a body or 200 with JSON; every error is 400
  ``{"fault_message": ...}`` except MMDS over its size limit (413);
* a deprecated field is accepted and the answer carries ``Deprecation: true``.

Errors raised by the Machine (:class:`~embervm.errors.ConfigError`,
:class:`~embervm.errors.StateError`) become 400s whose message starts with Firecracker's
category (``Drive config error: ``...); any other exception is logged with its traceback and
answered 400 with a one-line message, never a 500.

Resources embervm does not implement yet (snapshots, CPU templates, pmem, memory hotplug,
free page hinting, device hot-unplug, the in-guest MMDS network stack) answer 400 with a
message that says so.

The same handlers configure a VM from a Firecracker config file (:meth:`apply_config`), and
:meth:`vm_config` returns that file's shape (``GET /vm/config``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ..config import (
    BalloonConfig,
    BucketConfig,
    DiskConfig,
    NetConfig,
    RateLimitConfig,
    VsockConfig,
)
from ..errors import ConfigError, EmbervmError
from ..mmds import MmdsLimitExceeded, MmdsStore
from . import models as m

log = logging.getLogger(__name__)

NOT_SUPPORTED_PRE_BOOT = "The requested operation is not supported before starting the microVM."
NOT_SUPPORTED_POST_BOOT = "The requested operation is not supported after starting the microVM."
MAX_SUPPORTED_VCPUS = 32

#: the keys of a Firecracker config file (``VmmConfig`` in resources.rs)
CONFIG_FILE_KEYS = ("balloon", "drives", "boot-source", "cpu-config", "logger", "machine-config",
                    "metrics", "mmds-config", "network-interfaces", "vsock", "entropy", "pmem",
                    "memory-hotplug")


@dataclass
class Response:
    """One API answer: the status, a JSON body (or None) and extra headers."""

    status: int
    body: bytes | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> Any:
        """The decoded body (for tests and in-process callers)."""
        return None if self.body is None else msgspec.json.decode(self.body)


class ApiError(Exception):
    """A request refused with ``fault_message`` = ``str(self)``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def not_supported(what: str) -> ApiError:
    """The answer for a Firecracker feature that embervm does not implement yet."""
    return ApiError(f"The requested operation is not supported: {what} is not supported by "
                    "embervm yet.")


def _io_error(e: OSError) -> str:
    """An OSError in Rust's io::Error words: ``No such file or directory (os error 2)``."""
    return f"{e.strerror or e} (os error {e.errno})" if e.errno else str(e)


def checked_id(token: str | None) -> str:
    """A path id: not empty, alphanumeric or ``_`` (Firecracker's ``checked_id``)."""
    if not token:
        raise ApiError("The ID cannot be empty.")
    if not all(c == "_" or c.isalnum() for c in token):
        raise ApiError("API Resource IDs can only contain alphanumeric characters and "
                       "underscores.")
    return token


def _rate_limiter(cfg: m.RateLimiter | None) -> RateLimitConfig | None:
    """A body's rate limiter as embervm's config.  A bucket with size or refill_time 0 is no
    bucket (Firecracker's TokenBucket::new gives None), and a limiter without buckets is none
    at all (``rate_limiter: {}`` is the same as leaving it out)."""
    if cfg is None:
        return None
    bandwidth, ops = _bucket(cfg.bandwidth), _bucket(cfg.ops)
    if bandwidth is None and ops is None:
        return None
    return RateLimitConfig(bandwidth=bandwidth, ops=ops)


def _bucket(cfg: m.TokenBucket | None) -> BucketConfig | None:
    if cfg is None or cfg.size == 0 or cfg.refill_time == 0:
        return None
    return BucketConfig(size=cfg.size, refill_time_ms=cfg.refill_time,
                        one_time_burst=cfg.one_time_burst or 0)


def _rate_limiter_json(cfg: RateLimitConfig | None) -> dict | None:
    """embervm's rate limiter in Firecracker's JSON (what GET /vm/config shows)."""
    if cfg is None or (cfg.bandwidth is None and cfg.ops is None):
        return None
    return {"bandwidth": _bucket_json(cfg.bandwidth), "ops": _bucket_json(cfg.ops)}


def _bucket_json(b: BucketConfig | None) -> dict | None:
    if b is None:
        return None
    return {"size": b.size, "one_time_burst": b.one_time_burst or None,
            "refill_time": b.refill_time_ms}


_LEVELS = {"Off": logging.CRITICAL + 10, "Trace": logging.DEBUG, "Debug": logging.DEBUG,
           "Info": logging.INFO, "Warn": logging.WARNING, "Error": logging.ERROR}


def default_logger_setup(cfg: m.LoggerConfig) -> None:
    """PUT /logger without a callback from the embedder: send the ``embervm`` loggers to
    ``log_path`` (opened like Firecracker does: created if missing, non-blocking, so a FIFO
    works) at ``level``, with the level and origin in each line if asked."""
    root = logging.getLogger("embervm")
    if cfg.log_path is not None:
        fd = os.open(cfg.log_path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_APPEND, 0o644)
        stream = os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="replace")
        handler = logging.StreamHandler(stream)
        parts = ["%(asctime)s"]
        if cfg.show_level:
            parts.append(":%(levelname)s")
        if cfg.show_log_origin:
            parts.append(":%(name)s:%(lineno)d")
        handler.setFormatter(logging.Formatter("".join(parts) + " %(message)s"))
        if cfg.module:
            handler.addFilter(logging.Filter(cfg.module))
        for old in [h for h in root.handlers if getattr(h, "_embervm_fc_logger", False)]:
            root.removeHandler(old)
            old.close()
        handler._embervm_fc_logger = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(_LEVELS[cfg.level or "Info"])


class FirecrackerApi:
    """Firecracker's API over one :class:`~embervm.machine.Machine` (see the module
    docstring).  Call :meth:`handle` on the thread that runs the machine's event loop (or any
    thread: every Machine method may be called from any thread)."""

    def __init__(self, machine: Any, *, mmds_size_limit: int = 51200, version: str = "1.16.1",
                 logger_setup: Callable[[m.LoggerConfig], None] | None = None) -> None:
        self.machine = machine
        self.version = version
        self.logger_setup = logger_setup or default_logger_setup
        self.mmds = MmdsStore(mmds_size_limit)
        machine.set_mmds(self.mmds)

    # -- entry points ------------------------------------------------------------------------

    def handle(self, method: str, path: str, body: bytes | None) -> Response:
        """Answer one request; never raises."""
        method = method.upper()
        if not body:
            body = None
        deprecations: list[str] = []
        try:
            response = self._route(method, path.split("?", 1)[0], body, deprecations)
        except ApiError as e:
            log.info("API %s %s refused (%d): %s", method, path, e.status, e)
            response = self._fault(str(e), e.status)
        except m.BodyError as e:
            log.info("API %s %s refused: %s", method, path, e)
            response = self._fault(str(e))
        except EmbervmError as e:
            log.info("API %s %s refused: %s", method, path, e)
            response = self._fault(str(e))
        except Exception as e:
            log.exception("API %s %s failed", method, path)
            response = self._fault(f"Internal error while handling {method} {path}: "
                                   f"{type(e).__name__}: {e}")
        for message in deprecations:
            log.warning("%s", message)
        if deprecations:
            response.headers.append(("Deprecation", "true"))
        return response

    def apply_config(self, doc: dict) -> None:
        """Configure the machine from a Firecracker config file (already parsed JSON) through
        the same code as the PUT requests, in Firecracker's order (resources.rs ``from_json``):
        logger, metrics, machine-config, cpu-config, boot-source, drives, network-interfaces,
        vsock, balloon, mmds-config, entropy, pmem, memory-hotplug.  Raises ConfigError with
        the section's name and the API's message.  Unknown top-level keys are ignored, as
        Firecracker's ``VmmConfig`` does (it has no ``deny_unknown_fields``; ``serial`` is even
        skipped on purpose), so a file written for Firecracker works here; each is named in a
        warning, since a misspelt key is otherwise silently lost.  Inside a section, bodies are
        as strict as the API's."""
        if not isinstance(doc, dict):
            raise ConfigError("config file: expected a JSON object at the top level")
        unknown = sorted(set(doc) - set(CONFIG_FILE_KEYS))
        if unknown:
            log.warning("config file: ignoring unknown key(s) %s (known: %s)",
                        ", ".join(unknown), ", ".join(CONFIG_FILE_KEYS))
        for required in ("boot-source", "drives"):
            if required not in doc:
                raise ConfigError(f"config file: missing field `{required}`")
        single = {
            "logger": (m.LoggerConfig, self._logger),
            "metrics": (m.Metrics, self._metrics),
            "machine-config": (m.MachineConfiguration, self._put_machine_config),
            "cpu-config": (m.CpuConfig, self._cpu_config),
            "boot-source": (m.BootSource, self._boot_source),
            "vsock": (m.Vsock, self._vsock),
            "balloon": (m.Balloon, self._put_balloon),
            "mmds-config": (m.MmdsConfig, self._mmds_config),
            "entropy": (m.EntropyDevice, self._entropy),
            "memory-hotplug": (m.MemoryHotplugConfig, self._put_memory_hotplug),
        }
        lists = {
            "drives": (m.Drive, self._put_drive),
            "network-interfaces": (m.NetworkInterface, self._put_net),
            "pmem": (m.Pmem, self._put_pmem),
        }
        order = ("logger", "metrics", "machine-config", "cpu-config", "boot-source", "drives",
                 "network-interfaces", "vsock", "balloon", "mmds-config", "entropy", "pmem",
                 "memory-hotplug")
        for key in order:
            if key not in doc:
                continue
            section = doc[key]
            try:
                if key in lists:
                    kind, handler = lists[key]
                    if not isinstance(section, list):
                        raise ApiError(f"expected a list, got {type(section).__name__}")
                    for item in section:
                        handler(self._section(item, kind), [])
                elif section is not None:
                    kind, handler = single[key]
                    handler(self._section(section, kind), [])
            except (ApiError, m.BodyError, ConfigError) as e:
                raise ConfigError(f"config file: {key}: {e}") from None

    def vm_config(self) -> dict:
        """The whole configuration in the config-file shape (``GET /vm/config``; Firecracker's
        ``VmmConfig``): logger, metrics and cpu-config are always null, as in Firecracker."""
        mc = self.machine
        cfg = mc.config
        drives = sorted(cfg.disks, key=lambda d: not d.is_root_device)
        balloon = None
        if cfg.balloon is not None:
            balloon = self._balloon_json(cfg.balloon)
        return {
            "balloon": balloon,
            "drives": [{
                "drive_id": d.id,
                "partuuid": d.partuuid,
                "is_root_device": d.is_root_device,
                "cache_type": d.cache_type,
                "is_read_only": d.read_only,
                "path_on_host": str(d.path),
                "rate_limiter": _rate_limiter_json(d.rate_limiter),
                "io_engine": d.io_engine,
                "socket": None,
            } for d in drives],
            "boot-source": {
                "kernel_image_path": str(cfg.kernel) if mc.boot_source_set else "",
                "initrd_path": str(cfg.initrd) if mc.boot_source_set and cfg.initrd else None,
                "boot_args": cfg.cmdline if mc.boot_source_set else None,
            },
            "cpu-config": None,
            "logger": None,
            "machine-config": self._machine_config_json(),
            "metrics": None,
            "mmds-config": None,
            "network-interfaces": [{
                "iface_id": n.id,
                "host_dev_name": n.tap,
                "guest_mac": n.mac,
                "mtu": None,
                "rx_rate_limiter": _rate_limiter_json(n.rx_rate_limiter),
                "tx_rate_limiter": _rate_limiter_json(n.tx_rate_limiter),
            } for n in cfg.nets],
            "vsock": (None if cfg.vsock is None else
                      {"guest_cid": cfg.vsock.cid, "uds_path": str(cfg.vsock.uds)}),
            "entropy": ({"rate_limiter": _rate_limiter_json(cfg.rng_rate_limiter)}
                        if cfg.rng else None),
            "pmem": [],
            "memory-hotplug": None,
        }

    # -- routing (parsed_request.rs) ---------------------------------------------------------

    def _route(self, method: str, path: str, body: bytes | None,
               dep: list[str]) -> Response:
        tokens = path.lstrip("/").split("/")
        if tokens and tokens[-1] == "":
            tokens.pop()  # Rust's split_terminator: no empty last token
        first = tokens[0] if tokens else ""
        second = tokens[1] if len(tokens) > 1 else None
        third = tokens[2] if len(tokens) > 2 else None

        if method == "GET" and body is None:
            if first == "":
                return self._ok({"id": self.machine.id, "state": self.machine.state,
                                 "vmm_version": self.version, "app_name": "Firecracker"})
            if first == "balloon":
                return self._get_balloon(second, third)
            if first == "version":
                return self._ok({"firecracker_version": self.version})
            if first == "vm" and second == "config":
                return self._ok(self.vm_config())
            if first == "machine-config":
                return self._ok(self._machine_config_json())
            if first == "mmds":
                return self._ok(self.mmds.get())
            if first == "hotplug" and second == "memory":
                self._post_boot_only()
                raise not_supported("memory hotplug (virtio-mem)")
        elif method == "GET":
            raise ApiError("GET request cannot have a body.")
        elif method == "PUT" and body is not None:
            puts: dict[str, tuple[type, Callable[[Any, list[str]], Response | None]]] = {
                "actions": (m.InstanceActionInfo, self._action),
                "balloon": (m.Balloon, self._put_balloon),
                "boot-source": (m.BootSource, self._boot_source),
                "cpu-config": (m.CpuConfig, self._cpu_config),
                "logger": (m.LoggerConfig, self._logger),
                "serial": (m.SerialDevice, self._serial),
                "machine-config": (m.MachineConfiguration, self._put_machine_config),
                "metrics": (m.Metrics, self._metrics),
                "vsock": (m.Vsock, self._vsock),
                "entropy": (m.EntropyDevice, self._entropy),
            }
            if first in puts:
                kind, handler = puts[first]
                return self._done(handler(m.decode(body, kind), dep))
            if first == "drives":
                ident = checked_id(second)
                cfg = m.decode(body, m.Drive)
                if cfg.drive_id != ident:
                    raise ApiError("The id from the path does not match the id from the body!")
                return self._done(self._put_drive(cfg, dep))
            if first == "network-interfaces":
                ident = checked_id(second)
                cfg = m.decode(body, m.NetworkInterface)
                self._same_iface(ident, cfg.iface_id)
                return self._done(self._put_net(cfg, dep))
            if first == "pmem":
                ident = checked_id(second)
                cfg = m.decode(body, m.Pmem)
                if cfg.id != ident:
                    raise ApiError("The id from the path does not match the id from the body!")
                return self._done(self._put_pmem(cfg, dep))
            if first == "mmds":
                if second is None:
                    return self._done(self._put_mmds(m.decode_any(body)))
                if second == "config":
                    return self._done(self._mmds_config(m.decode(body, m.MmdsConfig), dep))
                raise ApiError(f"Unrecognized PUT request path `{second}`.")
            if first == "snapshot":
                if second is None:
                    raise ApiError("Missing snapshot operation type.")
                if second == "create":
                    m.decode(body, m.SnapshotCreateParams)
                    self._post_boot_only()
                    raise not_supported("PUT /snapshot/create (snapshots)")
                if second == "load":
                    load = m.decode(body, m.SnapshotLoadParams)
                    if load.mem_file_path is not None or load.enable_diff_snapshots:
                        dep.append("PUT /snapshot/load: mem_file_path and enable_diff_snapshots "
                                   "fields are deprecated.")
                    self._pre_boot_only()
                    raise not_supported("PUT /snapshot/load (snapshots)")
                raise ApiError(f"Invalid request method and/or path: PUT /snapshot/{second}.")
            if first == "hotplug" and second == "memory":
                return self._done(self._put_memory_hotplug(
                    m.decode(body, m.MemoryHotplugConfig), dep))
        elif method == "PUT":
            raise ApiError("Empty PUT request.")
        elif method == "PATCH" and first == "balloon":
            return self._patch_balloon(second, third, body)
        elif method == "PATCH" and body is not None:
            if first == "drives":
                ident = checked_id(second)
                upd = m.decode(body, m.PartialDrive)
                if upd.drive_id != ident:
                    raise ApiError("The id from the path does not match the id from the body!")
                return self._done(self._patch_drive(upd))
            if first == "machine-config":
                upd = m.decode(body, m.MachineConfigurationUpdate)
                if upd.is_empty():
                    raise ApiError("Empty PATCH request.")
                return self._done(self._patch_machine_config(upd, dep))
            if first == "mmds":
                return self._done(self._patch_mmds(m.decode_any(body)))
            if first == "network-interfaces":
                ident = checked_id(second)
                upd = m.decode(body, m.PartialNetworkInterface)
                self._same_iface(ident, upd.iface_id)
                return self._done(self._patch_net(upd))
            if first == "pmem":
                ident = checked_id(second)
                upd = m.decode(body, m.PartialPmem)
                if upd.id != ident:
                    raise ApiError("The id from the path does not match the id from the body!")
                self._post_boot_only()
                raise not_supported("pmem (virtio-pmem)")
            if first == "vm":
                return self._done(self._patch_vm(m.decode(body, m.Vm)))
            if first == "hotplug" and second == "memory":
                m.decode(body, m.MemoryHotplugSizeUpdate)
                self._post_boot_only()
                raise not_supported("memory hotplug (virtio-mem)")
        elif method == "PATCH":
            raise ApiError("Empty PATCH request.")
        elif method == "DELETE" and body is None:
            if first in ("drives", "pmem", "network-interfaces"):
                checked_id(second)
                self._post_boot_only()
                raise not_supported(f"DELETE /{first} (device hot-unplug)")
        elif method == "DELETE":
            raise ApiError("Empty Delete request.")
        raise ApiError(f"Invalid request method and/or path: {method} {first}.")

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _ok(value: Any) -> Response:
        return Response(200, msgspec.json.encode(value), [("Content-Type", "application/json")])

    @staticmethod
    def _done(result: Response | None) -> Response:
        return result if result is not None else Response(204)

    @staticmethod
    def _fault(message: str, status: int = 400) -> Response:
        return Response(status, msgspec.json.encode({"fault_message": message}),
                        [("Content-Type", "application/json")])

    @staticmethod
    def _section(value: Any, kind: type) -> Any:
        """A config-file section decoded exactly as the request body would be."""
        return m.decode(msgspec.json.encode(value), kind)

    @staticmethod
    def _same_iface(path_id: str, body_id: str) -> None:
        if path_id != body_id:
            raise ApiError(f"The id from the path [{path_id}] does not match the id from the "
                           f"body [{body_id}]!")

    def _pre_boot_only(self) -> None:
        if self.machine.started:
            raise ApiError(NOT_SUPPORTED_POST_BOOT)

    def _post_boot_only(self) -> None:
        if not self.machine.started:
            raise ApiError(NOT_SUPPORTED_PRE_BOOT)

    @staticmethod
    def _call(prefix: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call the Machine; its ConfigError/StateError become an ApiError under Firecracker's
        category ``prefix``."""
        try:
            return fn(*args, **kwargs)
        except EmbervmError as e:
            raise ApiError(f"{prefix}{e}") from None

    # -- actions and state -------------------------------------------------------------------

    def _action(self, body: m.InstanceActionInfo, dep: list[str]) -> None:
        if body.action_type == "InstanceStart":
            self._pre_boot_only()
            if not self.machine.boot_source_set:
                raise ApiError("Start microvm error: Cannot start microvm without kernel "
                               "configuration.")
            self._call("Start microvm error: ", self.machine.start)
        elif body.action_type == "SendCtrlAltDel":
            self._post_boot_only()
            self._call("Internal VMM error: ", self.machine.ctrl_alt_del)
        else:  # FlushMetrics
            self._post_boot_only()
            try:
                self.machine.flush_metrics()
            except ConfigError:
                # Firecracker: with no metrics configured, a flush writes nothing and succeeds.
                log.debug("FlushMetrics without a metrics destination: nothing written")
            except OSError as e:
                raise ApiError(
                    f"Internal VMM error: Error writing metrics: {_io_error(e)}") from None

    def _patch_vm(self, body: m.Vm) -> None:
        self._post_boot_only()
        if body.state == "Paused":
            self._call("Internal VMM error: ", self.machine.pause)
        else:
            self._call("Internal VMM error: ", self.machine.resume)

    # -- boot source, machine configuration --------------------------------------------------

    def _boot_source(self, body: m.BootSource, dep: list[str]) -> None:
        self._pre_boot_only()
        try:
            with open(body.kernel_image_path, "rb"):
                pass
        except OSError as e:
            raise ApiError(f"Boot source error: The kernel file cannot be opened: "
                           f"{_io_error(e)}") from None
        if body.initrd_path is not None:
            try:
                with open(body.initrd_path, "rb"):
                    pass
            except OSError as e:
                raise ApiError("Boot source error: The initrd file cannot be opened due to "
                               f"invalid path or invalid permissions. {_io_error(e)}") from None
        self._call("Boot source error: ", self.machine.set_boot_source,
                   Path(body.kernel_image_path),
                   None if body.initrd_path is None else Path(body.initrd_path),
                   body.boot_args)

    def _machine_config_json(self) -> dict:
        mc = self.machine
        return {"vcpu_count": mc.config.vcpus, "mem_size_mib": mc.config.mem_mib,
                "smt": bool(mc.smt), "track_dirty_pages": bool(mc.track_dirty_pages),
                "huge_pages": "2M" if mc.huge_pages == "2M" else "None"}

    def _check_machine(self, vcpus: int, mem: int, smt: bool, huge: str,
                       template: str | None) -> None:
        """Firecracker's MachineConfig::update checks (and its balloon-size check), with its
        messages, before embervm's own limits are applied by the Machine."""
        if vcpus == 0 or vcpus > MAX_SUPPORTED_VCPUS or (smt and vcpus > 1 and vcpus % 2):
            raise ApiError("Machine config error: The number of vCPUs must be greater than 0, "
                           f"less than {MAX_SUPPORTED_VCPUS} and must be 1 or an even number "
                           "if SMT is enabled.")
        if mem == 0 or (huge == "2M" and mem % 2):
            raise ApiError("Machine config error: The memory size (MiB) is either 0, or not a "
                           "multiple of the configured page size.")
        balloon = self.machine.config.balloon
        if balloon is not None and mem < balloon.target_mib:
            raise ApiError("Machine config error: The memory size (MiB) is smaller than the "
                           "previously set balloon device target size.")
        if template not in (None, "None"):
            raise not_supported(f"cpu_template {template} (static CPU templates)")

    def _put_machine_config(self, body: m.MachineConfiguration, dep: list[str]) -> None:
        if body.cpu_template is not None:
            dep.append("PUT /machine-config: cpu_template field is deprecated.")
        self._pre_boot_only()
        self._check_machine(body.vcpu_count, body.mem_size_mib, body.smt, body.huge_pages,
                            body.cpu_template)
        self._call("Machine config error: ", self.machine.set_machine_config,
                   vcpus=body.vcpu_count, mem_mib=body.mem_size_mib, smt=body.smt,
                   track_dirty_pages=body.track_dirty_pages,
                   huge_pages=None if body.huge_pages == "None" else body.huge_pages)

    def _patch_machine_config(self, body: m.MachineConfigurationUpdate,
                              dep: list[str]) -> None:
        if body.cpu_template is not None:
            dep.append("PATCH /machine-config: cpu_template field is deprecated.")
        self._pre_boot_only()
        cur = self._machine_config_json()
        vcpus = cur["vcpu_count"] if body.vcpu_count is None else body.vcpu_count
        mem = cur["mem_size_mib"] if body.mem_size_mib is None else body.mem_size_mib
        smt = cur["smt"] if body.smt is None else body.smt
        huge = cur["huge_pages"] if body.huge_pages is None else body.huge_pages
        self._check_machine(vcpus, mem, smt, huge, body.cpu_template)
        fields: dict[str, Any] = {}
        if body.vcpu_count is not None:
            fields["vcpus"] = body.vcpu_count
        if body.mem_size_mib is not None:
            fields["mem_mib"] = body.mem_size_mib
        if body.smt is not None:
            fields["smt"] = body.smt
        if body.track_dirty_pages is not None:
            fields["track_dirty_pages"] = body.track_dirty_pages
        if body.huge_pages is not None:
            fields["huge_pages"] = None if body.huge_pages == "None" else body.huge_pages
        if fields:
            self._call("Machine config error: ", self.machine.update_machine_config, **fields)

    def _cpu_config(self, body: m.CpuConfig, dep: list[str]) -> None:
        self._pre_boot_only()
        raise not_supported("PUT /cpu-config (custom CPU templates)")

    # -- block, net, vsock, entropy, serial ----------------------------------------------------

    def _put_drive(self, body: m.Drive, dep: list[str]) -> None:
        self._pre_boot_only()
        if body.socket is not None:
            raise not_supported("socket (vhost-user-block drives)")
        if body.path_on_host is None:
            raise ApiError(f"Drive config error: drive {body.drive_id}: path_on_host is "
                           "required for a virtio-block drive.")
        if body.is_root_device and any(d.is_root_device and d.id != body.drive_id
                                       for d in self.machine.config.disks):
            raise ApiError("Drive config error: A root block device already exists!")
        try:
            with open(body.path_on_host, "rb" if body.is_read_only else "r+b"):
                pass
        except OSError as e:
            raise ApiError("Drive config error: Unable to create the virtio block device: "
                           f"Error manipulating the backing file: {_io_error(e)} "
                           f"{body.path_on_host}") from None
        cfg = DiskConfig(path=Path(body.path_on_host), read_only=bool(body.is_read_only),
                         id=body.drive_id, is_root_device=body.is_root_device,
                         partuuid=body.partuuid, cache_type=body.cache_type,
                         io_engine=body.io_engine or "Sync",
                         rate_limiter=_rate_limiter(body.rate_limiter))
        self._call("Drive config error: ", self.machine.add_drive, cfg)

    def _patch_drive(self, body: m.PartialDrive) -> None:
        self._post_boot_only()
        self._call("Drive config error: Unable to patch the block device: ",
                   self.machine.update_drive, body.drive_id,
                   None if body.path_on_host is None else Path(body.path_on_host),
                   _rate_limiter(body.rate_limiter) if body.rate_limiter is not None else None)

    def _put_net(self, body: m.NetworkInterface, dep: list[str]) -> None:
        self._pre_boot_only()
        if body.mtu is not None:
            raise not_supported("mtu (VIRTIO_NET_F_MTU)")
        if body.guest_mac is not None:
            for n in self.machine.config.nets:
                if (n.id != body.iface_id and n.mac is not None
                        and n.mac.lower() == body.guest_mac.lower()):
                    raise ApiError("Network config error: The MAC address is already in use: "
                                   f"{body.guest_mac}")
        cfg = NetConfig(tap=body.host_dev_name, mac=body.guest_mac, id=body.iface_id,
                        rx_rate_limiter=_rate_limiter(body.rx_rate_limiter),
                        tx_rate_limiter=_rate_limiter(body.tx_rate_limiter))
        self._call("Network config error: Could not create the network device: ",
                   self.machine.add_net, cfg)

    def _patch_net(self, body: m.PartialNetworkInterface) -> None:
        self._post_boot_only()
        self._call("Network config error: Unable to update the net device: ",
                   self.machine.update_net, body.iface_id,
                   rx_rate_limiter=_rate_limiter(body.rx_rate_limiter),
                   tx_rate_limiter=_rate_limiter(body.tx_rate_limiter))

    def _put_pmem(self, body: m.Pmem, dep: list[str]) -> None:
        self._pre_boot_only()
        raise not_supported("pmem (virtio-pmem)")

    def _put_memory_hotplug(self, body: m.MemoryHotplugConfig, dep: list[str]) -> None:
        self._pre_boot_only()
        raise not_supported("memory hotplug (virtio-mem)")

    def _vsock(self, body: m.Vsock, dep: list[str]) -> None:
        if body.vsock_id is not None:
            dep.append("PUT /vsock: vsock_id field is deprecated.")
        self._pre_boot_only()
        self._call("Vsock config error: ", self.machine.set_vsock,
                   VsockConfig(cid=body.guest_cid, uds=Path(body.uds_path), id=body.vsock_id))

    def _entropy(self, body: m.EntropyDevice, dep: list[str]) -> None:
        self._pre_boot_only()
        self._call("Entropy config error: ", self.machine.set_entropy,
                   _rate_limiter(body.rate_limiter))

    def _serial(self, body: m.SerialDevice, dep: list[str]) -> None:
        self._pre_boot_only()
        if body.rate_limiter is not None:
            raise not_supported("rate_limiter on the serial console")
        self._call("Serial config error: ", self.machine.set_serial,
                   None if body.serial_out_path is None else Path(body.serial_out_path))

    # -- balloon -------------------------------------------------------------------------------

    @staticmethod
    def _balloon_json(b: BalloonConfig) -> dict:
        return {"amount_mib": b.target_mib, "deflate_on_oom": b.deflate_on_oom,
                "stats_polling_interval_s": b.stats_seconds, "free_page_hinting": False,
                "free_page_reporting": False}

    def _put_balloon(self, body: m.Balloon, dep: list[str]) -> None:
        self._pre_boot_only()
        if body.free_page_hinting:
            raise not_supported("free_page_hinting")
        if body.free_page_reporting:
            raise not_supported("free_page_reporting")
        if body.amount_mib > self.machine.config.mem_mib:
            raise ApiError("Balloon config error: Amount of pages requested is too large.")
        self._call("Balloon config error: ", self.machine.set_balloon,
                   BalloonConfig(target_mib=body.amount_mib, deflate_on_oom=body.deflate_on_oom,
                                 stats_seconds=body.stats_polling_interval_s))

    def _get_balloon(self, second: str | None, third: str | None) -> Response:
        if second is None:
            if self.machine.config.balloon is None:
                raise ApiError("Balloon config error: No balloon device found.")
            cfg = self._call("Balloon config error: ", self.machine.balloon_config)
            return self._ok(self._balloon_json(cfg))
        if second == "statistics":
            self._post_boot_only()
            if self.machine.config.balloon is None:
                raise ApiError("Balloon config error: No balloon device found.")
            return self._ok(self._call("Internal VMM error: ", self.machine.balloon_stats))
        if second == "hinting":
            if third == "status":
                self._post_boot_only()
                raise not_supported("free page hinting")
            raise ApiError(f"Unrecognized GET request path `/hinting/{third or ''}`.")
        raise ApiError(f"Unrecognized GET request path `{second}`.")

    def _patch_balloon(self, second: str | None, third: str | None,
                       body: bytes | None) -> Response:
        if second == "statistics" and body is not None:
            upd = m.decode(body, m.BalloonStatsUpdate)
            self._post_boot_only()
            self._call("Balloon update error: ", self.machine.update_balloon_stats,
                       upd.stats_polling_interval_s)
            return Response(204)
        if second == "hinting":
            if third == "start":
                if body is not None:
                    m.decode(body, m.BalloonStartCmd)
            elif third != "stop":
                raise ApiError(f"Unrecognized PATCH request path `/hinting/{third or ''}`.")
            self._post_boot_only()
            raise not_supported("free page hinting")
        if body is None:
            raise ApiError("Empty PATCH request.")
        upd = m.decode(body, m.BalloonUpdate)
        self._post_boot_only()
        self._call("Balloon update error: ", self.machine.update_balloon, upd.amount_mib)
        return Response(204)

    # -- logger, metrics, MMDS -------------------------------------------------------------------

    def _logger(self, body: m.LoggerConfig, dep: list[str]) -> None:
        self._pre_boot_only()
        try:
            self.logger_setup(body)
        except OSError as e:
            raise ApiError(f"Logger error: {_io_error(e)}") from None
        except EmbervmError as e:
            raise ApiError(f"Logger error: {e}") from None

    def _metrics(self, body: m.Metrics, dep: list[str]) -> None:
        self._pre_boot_only()
        self._call("Metrics error: Cannot initialize the metrics system due to bad user input: ",
                   self.machine.set_metrics, Path(body.metrics_path))

    def _put_mmds(self, value: Any) -> None:
        try:
            self.mmds.put(value)
        except MmdsLimitExceeded as e:
            raise ApiError(f"MMDS limit exceeded error: {e}", 413) from None

    def _patch_mmds(self, value: Any) -> None:
        try:
            self.mmds.patch(value)
        except MmdsLimitExceeded as e:
            raise ApiError(f"MMDS limit exceeded error: {e}", 413) from None
        except ConfigError as e:
            raise ApiError(f"MMDS error: {e}") from None

    def _mmds_config(self, body: m.MmdsConfig, dep: list[str]) -> None:
        if body.version == "V1":
            dep.append("PUT /mmds/config: V1 is deprecated. Use V2 instead.")
        self._pre_boot_only()
        raise ApiError("The requested operation is not supported: PUT /mmds/config: the "
                       "in-guest metadata service (the MMDS network stack on the guest's "
                       "network interfaces) is not implemented by embervm yet; /mmds works "
                       "as a data store only.")
