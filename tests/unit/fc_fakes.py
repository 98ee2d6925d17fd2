"""Shared helpers of the Firecracker API tests: a fake Machine for the states a unit test
cannot reach without booting a guest, and a client that validates every request and response
against the v1.16.1 swagger (tests/unit/fc_swagger.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from fc_swagger import operation_exists, validate_request, validate_response

from embervm.config import SerialConfig, VmConfig
from embervm.errors import ConfigError, StateError


class FakeMachine:
    """The Machine interface, recording what the API asked; ``start()`` only flips the state
    (no guest), so post-boot rules can be tested in a unit test."""

    def __init__(self, id: str = "anonymous-instance") -> None:
        self.id = id
        self.state = "Not started"
        self.config = VmConfig(mem_mib=128, vcpus=1)
        self.boot_source_set = False
        self.smt = False
        self.track_dirty_pages = False
        self.huge_pages: str | None = None
        self.calls: list[tuple] = []
        self.mmds = None
        self.metrics_path: Path | None = None
        self.stats = {"target_pages": 0, "actual_pages": 0, "target_mib": 0, "actual_mib": 0}
        self.fail_with: Exception | None = None  # raised by the next call that records

    @property
    def started(self) -> bool:
        return self.state != "Not started"

    def _record(self, *call: Any) -> None:
        self.calls.append(call)
        if self.fail_with is not None:
            e, self.fail_with = self.fail_with, None
            raise e

    def _pre(self, what: str) -> None:
        if self.started:
            raise StateError(f"{what}: only before the VM is started")

    def _post(self, what: str) -> None:
        if not self.started:
            raise StateError(f"{what}: the VM has not been started")

    def set_mmds(self, store: Any) -> None:
        self.mmds = store

    def set_boot_source(self, kernel, initrd=None, boot_args=None) -> None:
        self._pre("boot source")
        self._record("set_boot_source", kernel, initrd, boot_args)
        self.config.kernel, self.config.initrd, self.config.cmdline = kernel, initrd, boot_args
        self.boot_source_set = True

    def set_machine_config(self, vcpus, mem_mib, smt=False, track_dirty_pages=False,
                           huge_pages=None) -> None:
        self._pre("machine configuration")
        self._record("set_machine_config", vcpus, mem_mib, smt, track_dirty_pages, huge_pages)
        self.config.vcpus, self.config.mem_mib = vcpus, mem_mib
        self.smt, self.track_dirty_pages, self.huge_pages = smt, track_dirty_pages, huge_pages

    def update_machine_config(self, **fields) -> None:
        cur = {"vcpus": self.config.vcpus, "mem_mib": self.config.mem_mib, "smt": self.smt,
               "track_dirty_pages": self.track_dirty_pages, "huge_pages": self.huge_pages}
        cur.update(fields)
        self.set_machine_config(**cur)

    def add_drive(self, cfg) -> None:
        self._pre("adding a drive")
        self._record("add_drive", cfg)
        disks = self.config.disks
        index = next((i for i, d in enumerate(disks) if d.id == cfg.id), None)
        if index is None:
            disks.append(cfg)
        else:
            disks[index] = cfg

    def update_drive(self, drive_id, path=None, rate_limiter=None) -> None:
        self._post("updating a drive")
        self._record("update_drive", drive_id, path, rate_limiter)
        if not any(d.id == drive_id for d in self.config.disks):
            raise ConfigError(f"no drive with id {drive_id!r}")

    def add_net(self, cfg) -> None:
        self._pre("adding a network interface")
        self._record("add_net", cfg)
        nets = self.config.nets
        index = next((i for i, n in enumerate(nets) if n.id == cfg.id), None)
        if index is None:
            nets.append(cfg)
        else:
            nets[index] = cfg

    def update_net(self, iface_id, rx_rate_limiter=None, tx_rate_limiter=None) -> None:
        self._post("updating a network interface")
        self._record("update_net", iface_id, rx_rate_limiter, tx_rate_limiter)

    def set_vsock(self, cfg) -> None:
        self._pre("vsock")
        self._record("set_vsock", cfg)
        self.config.vsock = cfg

    def set_entropy(self, rate_limiter=None) -> None:
        self._pre("entropy device")
        self._record("set_entropy", rate_limiter)
        self.config.rng, self.config.rng_rate_limiter = True, rate_limiter

    def set_balloon(self, cfg) -> None:
        self._pre("balloon")
        self._record("set_balloon", cfg)
        self.config.balloon = cfg

    def update_balloon(self, amount_mib) -> None:
        self._post("updating the balloon")
        self._record("update_balloon", amount_mib)
        self.config.balloon.target_mib = amount_mib

    def balloon_config(self):
        if self.config.balloon is None:
            raise ConfigError("no balloon device is configured")
        return replace(self.config.balloon)

    def balloon_stats(self) -> dict:
        self._record("balloon_stats")
        return dict(self.stats)

    def update_balloon_stats(self, interval_s) -> None:
        self._post("updating balloon statistics")
        self._record("update_balloon_stats", interval_s)

    def set_serial(self, out_path) -> None:
        self._pre("serial")
        self._record("set_serial", out_path)
        self.config.serial = SerialConfig("stdio") if out_path is None else SerialConfig(
            "file", out_path)

    def set_metrics(self, path) -> None:
        self._record("set_metrics", path)
        self.metrics_path = path

    def flush_metrics(self) -> None:
        self._record("flush_metrics")
        if self.metrics_path is None:
            raise ConfigError("metrics are not configured: set a metrics path first")

    def start(self) -> None:
        self._pre("start")
        self._record("start")
        self.state = "Running"

    def pause(self) -> None:
        self._post("pause")
        self._record("pause")
        self.state = "Paused"

    def resume(self) -> None:
        self._post("resume")
        self._record("resume")
        self.state = "Running"

    def ctrl_alt_del(self) -> None:
        self._post("Ctrl-Alt-Del")
        self._record("ctrl_alt_del")


class Client:
    """Calls ``api.handle`` with a JSON body and checks both sides against the swagger:
    ``valid=True`` (the default) asserts the request body is valid per the swagger; every
    answer of a swagger operation must conform (and every error be ``{"fault_message"}``)."""

    def __init__(self, api: Any) -> None:
        self.api = api

    def __call__(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                 valid: bool = True):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        in_spec = operation_exists(method, path)
        if valid and body is not None and in_spec and method != "GET":
            validate_request(method, path, body)
        r = self.api.handle(method, path, data)
        parsed = None if r.body is None else json.loads(r.body)
        if in_spec:
            validate_response(method, path, r.status, parsed)
        elif r.status >= 400:
            assert isinstance(parsed, dict) and isinstance(parsed["fault_message"], str)
        assert r.status in (200, 204, 400, 413), r.status
        assert (r.body is None) == (r.status == 204)
        return r.status, parsed, dict(r.headers)
