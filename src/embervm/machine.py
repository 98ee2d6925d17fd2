"""The public Python API: one :class:`Machine` is one microVM, configured, started, paused,
resumed and stopped from Python.  The Firecracker-compatible HTTP API (:mod:`embervm.fc`) is a
thin translation onto this object.

    from embervm import Machine

    with Machine(mem_mib=256, vcpus=2) as vm:        # the embedded kit kernel by default
        vm.add_drive("rootfs.ext4", root=True)
        vm.start()
        vm.pause(); vm.resume()
        vm.ctrl_alt_del()
        status = vm.wait(timeout=60)

States follow Firecracker's: ``"Not started"`` -> ``"Running"`` <-> ``"Paused"``, then
``"Exited"`` (embervm's own: the guest rebooted, crashed or was stopped; :attr:`exit_status`
says how).  Configuration accumulates before :meth:`start`; each call validates what it gets
and raises :class:`~embervm.errors.ConfigError` with a message that says what to fix.  A call
that the current state does not allow raises :class:`~embervm.errors.StateError`.

Threads: a Machine owns an :class:`~embervm.eventloop.EventLoop`.  Whoever calls
:meth:`serve` runs it (the ``firecracker`` front end does, on the main thread, with the API
socket on the same loop); otherwise :meth:`start` runs it on a background thread.  Every public
method may be called from any thread: off the loop thread it is carried out on the loop and
waited for.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import (
    CACHE_TYPES,
    IO_ENGINES,
    STOP_GRACE_SECONDS,
    BalloonConfig,
    DiskConfig,
    NetConfig,
    RateLimitConfig,
    SerialConfig,
    VmConfig,
    VsockConfig,
    check_readable_file,
    max_vcpus,
)
from .errors import ConfigError, StateError
from .eventloop import EventLoop

log = logging.getLogger(__name__)

NOT_STARTED = "Not started"
RUNNING = "Running"
PAUSED = "Paused"
EXITED = "Exited"



class Machine:
    """One microVM (see the module docstring)."""

    def __init__(self, kernel: str | os.PathLike[str] | None = None, *,
                 initrd: str | os.PathLike[str] | None = None, boot_args: str | None = None,
                 append: str = "", mem_mib: int = 128, vcpus: int = 1,
                 id: str = "anonymous-instance", serial: str = "stdio",
                 serial_out: Callable[[bytes], None] | None = None,
                 loop: EventLoop | None = None) -> None:
        """``serial_out``: a callable that gets the guest's serial console output (ttyS0)
        instead of ``serial`` ("stdio": this process's stdout and stdin, or "null")."""
        self.id = id
        self._state = NOT_STARTED
        self.config = VmConfig(mem_mib=mem_mib, vcpus=vcpus, append=append,
                               serial=SerialConfig(serial))
        if serial not in ("stdio", "null"):
            raise ConfigError(f"serial={serial!r}: expected 'stdio' or 'null' (or use "
                              "set_serial(path) for a file)")
        self._check_machine(vcpus, mem_mib)
        self.boot_source_set = False
        if kernel is not None:
            self.set_boot_source(kernel, initrd=initrd, boot_args=boot_args)
        elif initrd is not None or boot_args is not None:
            raise ConfigError("initrd and boot_args need a kernel")
        self.loop = loop if loop is not None else EventLoop()
        self._own_loop = loop is None
        self.vmm = None
        self._state = NOT_STARTED
        self.exit_status: int | None = None
        self.exit_reason = ""
        self._exited = threading.Event()
        self._extra: list[tuple[Any, str | None]] = []
        self._loop_thread: threading.Thread | None = None
        self._metrics = None  # embervm.metrics.MetricsWriter, once set_metrics() was called
        self.smt = False
        self.track_dirty_pages = False
        self.huge_pages: str | None = None
        self.entropy = False
        self._mmds = None
        self._serial_out = serial_out
        #: Firecracker's latencies_us group (store metrics: the last value, in µs)
        self._latencies: dict[str, int] = {}
        _install_kick_handler()

    @property
    def mmds(self):
        """The MMDS data store (:class:`embervm.mmds.MmdsStore`), created on first use."""
        if self._mmds is None:
            from .mmds import MmdsStore

            self._mmds = MmdsStore()
        return self._mmds

    def set_mmds(self, store) -> None:
        self._mmds = store

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def started(self) -> bool:
        return self._state != NOT_STARTED

    def _require(self, *states: str, what: str) -> None:
        if self._state not in states:
            if self._state == NOT_STARTED:
                raise StateError(f"{what}: the VM has not been started")
            if states == (NOT_STARTED,):
                raise StateError(f"{what}: only before the VM is started")
            raise StateError(f"{what}: the VM is {self._state.lower()}")

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the loop's thread (directly when already there or nobody runs the
        loop) and return its result or raise its exception."""
        if self.loop.in_loop_thread():
            return fn(*args, **kwargs)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:
                future.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return future.result()

    # -- configuration (before start) --------------------------------------------------------

    def set_boot_source(self, kernel: str | os.PathLike[str],
                        initrd: str | os.PathLike[str] | None = None,
                        boot_args: str | None = None) -> None:
        """The kernel (vmlinux or bzImage), an optional initramfs, and the command line
        (replacing embervm's defaults; embervm still adds its device and root words)."""
        self._require(NOT_STARTED, what="boot source")
        kernel = Path(kernel)
        check_readable_file(kernel, "kernel")
        initrd_path = None if initrd is None else Path(initrd)
        if initrd_path is not None:
            check_readable_file(initrd_path, "initrd")
        self.config.kernel = kernel
        self.config.initrd = initrd_path
        self.config.cmdline = boot_args
        self.boot_source_set = True

    def _check_machine(self, vcpus: int, mem_mib: int) -> None:
        from .config import MAX_MEM_MIB, MIN_MEM_MIB

        if isinstance(vcpus, bool) or not isinstance(vcpus, int):
            raise ConfigError(f"vcpus {vcpus!r}: expected an integer")
        limit = max_vcpus()
        if not 1 <= vcpus <= limit:
            raise ConfigError(f"vcpu count {vcpus}: must be between 1 and {limit} on this host")
        if not MIN_MEM_MIB <= mem_mib <= MAX_MEM_MIB:
            raise ConfigError(f"memory size {mem_mib} MiB: must be between {MIN_MEM_MIB} and "
                              f"{MAX_MEM_MIB} MiB")

    def set_machine_config(self, vcpus: int, mem_mib: int, smt: bool = False,
                           track_dirty_pages: bool = False, huge_pages: str | None = None) -> None:
        """vCPUs, memory and Firecracker's machine options (all replaced, as PUT)."""
        self._require(NOT_STARTED, what="machine configuration")
        self._check_machine(vcpus, mem_mib)
        if smt:
            raise ConfigError("smt: simultaneous multithreading is not supported by embervm "
                              "(each vCPU is one core)")
        if huge_pages not in (None, "None"):
            raise ConfigError(f"huge_pages {huge_pages!r}: huge pages are not supported by "
                              "embervm yet")
        self.config.vcpus, self.config.mem_mib = vcpus, mem_mib
        self.smt, self.track_dirty_pages = smt, track_dirty_pages
        self.huge_pages = None

    def update_machine_config(self, **fields: Any) -> None:
        """Change only the given machine options (as PATCH)."""
        unknown = set(fields) - {"vcpus", "mem_mib", "smt", "track_dirty_pages", "huge_pages"}
        if unknown:
            raise ConfigError(f"unknown machine option(s): {', '.join(sorted(unknown))}")
        current = {"vcpus": self.config.vcpus, "mem_mib": self.config.mem_mib, "smt": self.smt,
                   "track_dirty_pages": self.track_dirty_pages, "huge_pages": self.huge_pages}
        current.update({k: v for k, v in fields.items() if v is not None})
        self.set_machine_config(**current)

    def add_drive(self, cfg: DiskConfig | str | os.PathLike[str], *, root: bool = False,
                  read_only: bool = False, id: str | None = None) -> DiskConfig:
        """Attach a raw disk image (virtio-blk), or replace the one with the same id.  A path
        may be given instead of a DiskConfig (``root=True``: it is the root filesystem)."""
        self._require(NOT_STARTED, what="adding a drive")
        if not isinstance(cfg, DiskConfig):
            cfg = DiskConfig(Path(cfg), read_only=read_only, is_root_device=root,
                             id=id or ("rootfs" if root else f"drive{len(self.config.disks)}"))
        if cfg.id is None:
            raise ConfigError("a drive needs an id")
        if cfg.cache_type not in CACHE_TYPES:
            raise ConfigError(f"drive {cfg.id}: cache_type {cfg.cache_type!r}: expected one "
                              f"of {', '.join(CACHE_TYPES)}")
        if cfg.io_engine not in IO_ENGINES:
            raise ConfigError(f"drive {cfg.id}: io_engine {cfg.io_engine!r}: expected one of "
                              f"{', '.join(IO_ENGINES)}")
        check_readable_file(cfg.path, f"drive {cfg.id}: path_on_host")
        if not cfg.read_only and not os.access(cfg.path, os.W_OK):
            raise ConfigError(f"drive {cfg.id}: {cfg.path} is not writable; attach it "
                              "read-only")
        disks = [d for d in self.config.disks if d.id != cfg.id]
        if cfg.is_root_device and any(d.is_root_device for d in disks):
            raise ConfigError("a root block device already exists: only one drive may be the "
                              "root device")
        index = next((i for i, d in enumerate(self.config.disks) if d.id == cfg.id), None)
        if index is None:
            self.config.disks.append(cfg)
        else:
            self.config.disks[index] = cfg
        return cfg

    def update_drive(self, drive_id: str, path: str | os.PathLike[str] | None = None,
                     rate_limiter: RateLimitConfig | None = None) -> None:
        """Swap a running drive's image (the guest sees the new capacity) and/or its rate
        limiter."""
        self._require(RUNNING, PAUSED, what="updating a drive")
        self._call(self._update_drive, drive_id, path, rate_limiter)

    def _update_drive(self, drive_id: str, path: Any, rate_limiter: Any) -> None:
        cfg = self._disk(drive_id)
        device = self.vmm.devices.get(drive_id).device
        if path is not None:
            device.update_path(Path(path))
            cfg.path = Path(path)
        if rate_limiter is not None:
            device.update_rate_limiter(rate_limiter)
            cfg.rate_limiter = rate_limiter

    def _disk(self, drive_id: str) -> DiskConfig:
        for d in self.config.disks:
            if d.id == drive_id:
                return d
        raise ConfigError(f"no drive with id {drive_id!r}")

    def add_net(self, cfg: NetConfig) -> NetConfig:
        """Attach a virtio-net interface on a TAP, or replace the one with the same id."""
        self._require(NOT_STARTED, what="adding a network interface")
        if cfg.id is None:
            cfg.id = f"net{len(self.config.nets)}"
        if not cfg.tap or len(cfg.tap.encode()) > 15:
            raise ConfigError(f"network interface {cfg.id}: host_dev_name {cfg.tap!r}: a TAP "
                              "name is 1 to 15 bytes")
        for n in self.config.nets:
            if n.id != cfg.id and n.tap == cfg.tap:
                raise ConfigError(f"the TAP {cfg.tap} is already used by interface {n.id}")
            if n.id != cfg.id and cfg.mac is not None and n.mac == cfg.mac:
                raise ConfigError(f"the MAC address {cfg.mac} is already used by interface "
                                  f"{n.id}")
        index = next((i for i, n in enumerate(self.config.nets) if n.id == cfg.id), None)
        if index is None:
            self.config.nets.append(cfg)
        else:
            self.config.nets[index] = cfg
        self._validate()
        return cfg

    def update_net(self, iface_id: str, rx_rate_limiter: RateLimitConfig | None = None,
                   tx_rate_limiter: RateLimitConfig | None = None) -> None:
        self._require(RUNNING, PAUSED, what="updating a network interface")
        self._call(self._update_net, iface_id, rx_rate_limiter, tx_rate_limiter)

    def _update_net(self, iface_id: str, rx: Any, tx: Any) -> None:
        cfg = next((n for n in self.config.nets if n.id == iface_id), None)
        if cfg is None:
            raise ConfigError(f"no network interface with id {iface_id!r}")
        self.vmm.devices.get(iface_id).device.update_rate_limiters(rx=rx, tx=tx)
        if rx is not None:
            cfg.rx_rate_limiter = rx
        if tx is not None:
            cfg.tx_rate_limiter = tx

    def set_vsock(self, cfg: VsockConfig) -> None:
        self._require(NOT_STARTED, what="vsock")
        old, self.config.vsock = self.config.vsock, cfg
        try:
            self._validate()
        except ConfigError:
            self.config.vsock = old
            raise

    def set_entropy(self, rate_limiter: RateLimitConfig | None = None) -> None:
        """Attach a virtio-rng entropy device (with an optional rate limiter)."""
        self._require(NOT_STARTED, what="entropy device")
        self.config.rng = True
        self.config.rng_rate_limiter = rate_limiter

    def set_balloon(self, cfg: BalloonConfig) -> None:
        self._require(NOT_STARTED, what="balloon")
        old, self.config.balloon = self.config.balloon, cfg
        try:
            self._validate()
        except ConfigError:
            self.config.balloon = old
            raise

    def _balloon_device(self):
        if self.config.balloon is None:
            raise ConfigError("no balloon device is configured")
        if self.vmm is None:
            return None
        return self.vmm.devices.get("balloon").device

    def update_balloon(self, amount_mib: int) -> None:
        self._require(RUNNING, PAUSED, what="updating the balloon")
        self._call(self._update_balloon, amount_mib)

    def _update_balloon(self, amount_mib: int) -> None:
        device = self._balloon_device()
        try:
            device.set_target_mib(amount_mib)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.config.balloon.target_mib = amount_mib

    def balloon_config(self) -> BalloonConfig:
        self._balloon_device()
        return replace(self.config.balloon)

    def balloon_stats(self) -> dict:
        return self._call(self._balloon_stats)

    def _balloon_stats(self) -> dict:
        device = self._balloon_device()
        if device is None:
            raise StateError("balloon statistics: the VM has not been started")
        if not self.config.balloon.stats_seconds:
            raise ConfigError("Statistics for the balloon device are not enabled")
        return device.fc_stats()

    def update_balloon_stats(self, interval_s: int) -> None:
        self._require(RUNNING, PAUSED, what="updating balloon statistics")
        self._call(self._update_balloon_stats, interval_s)

    def _update_balloon_stats(self, interval_s: int) -> None:
        device = self._balloon_device()
        try:
            device.set_stats_interval(interval_s)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.config.balloon.stats_seconds = interval_s

    def set_serial(self, out_path: str | os.PathLike[str] | None) -> None:
        """Where the guest's serial console (ttyS0) goes: a file or FIFO, or None for this
        process's stdout."""
        self._require(NOT_STARTED, what="serial")
        if out_path is None:
            self.config.serial = SerialConfig("stdio")
            return
        path = Path(out_path)
        if not path.parent.is_dir():
            raise ConfigError(f"serial_out_path {path}: {path.parent} is not a directory")
        self.config.serial = SerialConfig("file", path)

    def set_console(self, cfg) -> None:
        self._require(NOT_STARTED, what="console")
        self.config.console = cfg
        self._validate()

    def set_control(self, path: str | os.PathLike[str]) -> None:
        """The line-protocol control socket (docs/control.md)."""
        self._require(NOT_STARTED, what="control socket")
        self.config.control = Path(path)

    def add_device(self, device, id: str | None = None) -> None:
        """Attach a virtio device of your own (a :class:`~embervm.devices.virtio.device.
        VirtioDevice` subclass) after the configured ones."""
        from .devices.virtio.device import VirtioDevice

        self._require(NOT_STARTED, what="adding a device")
        if not isinstance(device, VirtioDevice):
            raise ConfigError(f"{device!r} is not a VirtioDevice")
        self._extra.append((device, id))

    def _validate(self) -> None:
        saved_kernel = self.config.kernel
        try:
            self.config.validate()
        finally:
            self.config.kernel = saved_kernel

    # -- metrics -----------------------------------------------------------------------------

    def set_metrics(self, path: str | os.PathLike[str]) -> None:
        """Write Firecracker-style metrics (JSON lines) to ``path`` (a file or FIFO) every 60 s
        and on :meth:`flush_metrics`."""
        from .metrics import MetricsWriter

        if self._metrics is not None:
            raise ConfigError("metrics are already configured")
        try:
            self._metrics = MetricsWriter(path, self.metrics)
        except OSError as e:
            raise ConfigError(f"metrics_path {path}: {e.strerror}") from None
        self._metrics.start_periodic(self.loop)

    def flush_metrics(self) -> None:
        if self._metrics is None:
            raise ConfigError("metrics are not configured: set a metrics path first")
        self._call(self._metrics.write)

    def metrics(self) -> dict[str, dict[str, int]]:
        """Every counter, by Firecracker group (absolute values since start)."""
        groups: dict[str, dict[str, int]] = {}
        vmm = self.vmm
        if vmm is not None:
            from .devices.virtio.balloon import Balloon
            from .devices.virtio.block import Block
            from .devices.virtio.net import Net
            from .devices.virtio.rng import Rng
            from .devices.virtio.vsock import Vsock

            for slot in vmm.devices:
                dev = slot.device
                group = None
                if isinstance(dev, Block):
                    group = "block"
                elif isinstance(dev, Net):
                    group = "net"
                if group is not None:
                    groups[f"{group}_{slot.id}"] = dict(dev.metrics)
                    total = groups.setdefault(group, {})
                    for k, v in dev.metrics.items():
                        total[k] = total.get(k, 0) + v
                elif isinstance(dev, Vsock):
                    groups["vsock"] = dict(dev.metrics)
                elif isinstance(dev, Balloon):
                    groups["balloon"] = dict(dev.metrics)
                elif isinstance(dev, Rng):
                    groups["entropy"] = dict(dev.metrics)
            io_in = io_out = mmio_read = mmio_write = 0
            for vcpu in vmm.vcpus:
                a, b, c, d = vcpu.exit_counts
                io_in, io_out, mmio_read, mmio_write = (io_in + a, io_out + b, mmio_read + c,
                                                        mmio_write + d)
            groups["vcpu"] = {"exit_io_in": io_in, "exit_io_out": io_out,
                              "exit_mmio_read": mmio_read, "exit_mmio_write": mmio_write,
                              "failures": int(vmm.exit_status == 1)}
            s = vmm.serial.metrics
            # Firecracker's names where the counter means the same; embervm's own otherwise.
            groups["uart"] = {"write_count": s.tx_bytes, "error_count": s.callback_errors,
                              "host_rx_bytes": s.rx_bytes, "host_rx_dropped": s.rx_dropped,
                              "interrupts": s.interrupts}
        groups["vmm"] = {"panic_count": 0}
        groups["latencies_us"] = dict(self._latencies)
        groups.update(self._extra_metrics)
        return groups

    #: groups that the embedding layer (the API server) adds: name -> counters
    _extra_metrics: dict[str, dict[str, int]] = {}

    def add_metrics_group(self, name: str, counters: dict[str, int]) -> None:
        self._extra_metrics = {**self._extra_metrics, name: counters}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Build the VM and run it.  Without a thread serving the loop (:meth:`serve`), the
        loop is run on a background thread."""
        self._call(self._start)
        if self.loop.thread is None and self._loop_thread is None:
            self._loop_thread = threading.Thread(target=self._run_loop, name="embervm-loop",
                                                 daemon=True)
            self._loop_thread.start()

    def _start(self) -> None:
        from .vmm import Vmm

        self._require(NOT_STARTED, what="start")
        if not self.boot_source_set and self.config.kernel is None and not self._default_ok:
            raise ConfigError("no kernel: set a boot source first")
        self.vmm = Vmm(self.config, loop=self.loop, extra_devices=self._extra,
                       on_exit=self._on_vm_exit, console_out=self._serial_out)
        self.vmm.start()
        self._state = RUNNING

    #: with the Python API the embedded kit kernel is the default; the Firecracker front end
    #: sets this False, since Firecracker refuses to start without a boot source
    _default_ok = True

    def _run_loop(self) -> None:
        try:
            self.loop.run()
        except BaseException:
            log.exception("the event loop failed")
            self._finish(1, "event loop failure")

    def serve(self) -> int | None:
        """Run the event loop on this thread until the VM exits (or :meth:`shutdown` before a
        start); return the exit status.  If the loop already runs on a background thread,
        wait for the exit instead."""
        if self._loop_thread is not None:
            self._exited.wait()
            return self.exit_status
        self.loop.run()
        return self.exit_status

    def pause(self) -> None:
        self._call(self._pause)

    def _pause(self) -> None:
        self._require(RUNNING, PAUSED, what="pause")
        if self._state == RUNNING:
            t0 = time.monotonic()
            self.vmm.pause()
            self._latencies["pause_vm"] = self._latencies["vmm_pause_vm"] = int(
                (time.monotonic() - t0) * 1e6)
            self._state = PAUSED

    def resume(self) -> None:
        self._call(self._resume)

    def _resume(self) -> None:
        self._require(RUNNING, PAUSED, what="resume")
        if self._state == PAUSED:
            t0 = time.monotonic()
            self.vmm.resume()
            self._latencies["resume_vm"] = self._latencies["vmm_resume_vm"] = int(
                (time.monotonic() - t0) * 1e6)
            self._state = RUNNING

    def ctrl_alt_del(self) -> None:
        """Press Ctrl-Alt-Del on the guest's keyboard (a Linux guest reboots: exit 0)."""
        self._call(self._ctrl_alt_del)

    def _ctrl_alt_del(self) -> None:
        self._require(RUNNING, PAUSED, what="Ctrl-Alt-Del")
        self.vmm.ctrl_alt_del()

    def shutdown(self, status: int = 0, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop the VM (any thread): a running guest is first asked with Ctrl-Alt-Del and
        given ``grace`` seconds; then it is stopped.  The exit status is ``status`` either
        way.  Before a start, it just ends :meth:`serve`."""
        self.loop.call_soon_threadsafe(lambda: self._shutdown(status, grace))

    def _shutdown(self, status: int, grace: float) -> None:
        if self._state == EXITED:
            return
        if self._state == NOT_STARTED:
            self._finish(status, "shut down before start")
            return
        self.vmm.request_stop(status, "shutdown requested", grace)

    def kill(self, status: int = 1) -> None:
        """Stop the VM at once (no guest shutdown)."""
        def do() -> None:
            if self.vmm is not None:
                self.vmm.stop(status, "killed")
            else:
                self._finish(status, "killed before start")
        self.loop.call_soon_threadsafe(do)

    def _on_vm_exit(self) -> None:
        vmm = self.vmm
        status = vmm.exit_status
        vmm.teardown()
        self._finish(status if status is not None else 1, vmm.exit_reason)

    def _finish(self, status: int, reason: str) -> None:
        if self._state == EXITED:
            return
        self.exit_status = status
        self.exit_reason = reason
        self._state = EXITED
        if self._metrics is not None:
            try:
                self._metrics.write()
            except Exception:
                log.exception("writing the last metrics failed")
        self._exited.set()
        self.loop.stop()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait until the VM has exited; return its status (None on timeout)."""
        if self.loop.in_loop_thread() and self.loop.thread is not None:
            raise StateError("wait() on the event loop's thread would never return")
        self._exited.wait(timeout)
        return self.exit_status

    def close(self) -> None:
        """Stop the VM if it runs and release everything (the loop too, if it is ours)."""
        if self._state in (RUNNING, PAUSED):
            self.kill(1)
            self._exited.wait(10)
        elif self._state == NOT_STARTED:
            self._finish(0, "closed")
        if self._loop_thread is not None:
            self._loop_thread.join(5)
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._own_loop and self.loop.thread is None:
            try:
                self.loop.close()
            except OSError:
                pass

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Machine {self.id} {self._state}>"


def _install_kick_handler() -> None:
    """vCPU threads are kicked out of KVM_RUN with a signal that needs a Python handler, which
    only the main thread can install."""
    if threading.current_thread() is threading.main_thread():
        from .kvm.kvm import install_kick_handler

        install_kick_handler()
