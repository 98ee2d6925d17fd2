"""The Firecracker API layer (embervm.fc.api, models, embervm.mmds) driven through
``FirecrackerApi.handle``: routing and fixed texts, path ids, body decoding, pre/post-boot
rules, the Machine calls each route makes, deprecation headers, errors, MMDS, and the config
file round trip.  Every request and answer is checked against the v1.16.1 swagger (Client).
Pre-boot tests use the real Machine; post-boot states use FakeMachine (no guest boots)."""

from __future__ import annotations

import json
import logging

import pytest
from fc_fakes import Client, FakeMachine

from embervm.config import BucketConfig, RateLimitConfig
from embervm.errors import ConfigError, StateError
from embervm.fc.api import NOT_SUPPORTED_POST_BOOT, NOT_SUPPORTED_PRE_BOOT, FirecrackerApi
from embervm.machine import Machine
from embervm.mmds import MmdsStore, merge_patch


@pytest.fixture
def files(tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF" + b"\0" * 60)
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"\0" * 4096)
    scratch = tmp_path / "scratch.ext4"
    scratch.write_bytes(b"\0" * 4096)
    return {"kernel": str(kernel), "rootfs": str(rootfs), "scratch": str(scratch),
            "dir": tmp_path}


@pytest.fixture
def real():
    machine = Machine(id="test-vm")
    api = FirecrackerApi(machine)
    yield Client(api)
    machine.close()


@pytest.fixture
def fake():
    machine = FakeMachine("fake-vm")
    return Client(FirecrackerApi(machine))


def boot(client, files):
    """Configure the minimum and InstanceStart (FakeMachine: no guest)."""
    assert client("PUT", "/boot-source", {"kernel_image_path": files["kernel"]})[0] == 204
    assert client("PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204


def fault(result):
    status, body, _ = result
    assert status == 400, result
    return body["fault_message"]


# -- instance, version, routing texts -------------------------------------------------------------


def test_instance_info_and_version(real):
    status, body, _ = real("GET", "/")
    assert status == 200
    assert body == {"id": "test-vm", "state": "Not started", "vmm_version": "1.16.1",
                    "app_name": "Firecracker"}
    assert real("GET", "/version")[:2] == (200, {"firecracker_version": "1.16.1"})


def test_fixed_error_texts(real):
    assert fault(real("PUT", "/x", {"a": 1})) == "Invalid request method and/or path: PUT x."
    assert fault(real("POST", "/actions", {})) == (
        "Invalid request method and/or path: POST actions.")
    assert fault(real("PATCH", "/boot-source", {"kernel_image_path": "k"}, valid=False)) == (
        "Invalid request method and/or path: PATCH boot-source.")
    assert fault(real("GET", "/version", raw=b"{}")) == "GET request cannot have a body."
    assert fault(real("PUT", "/boot-source")) == "Empty PUT request."
    assert fault(real("PUT", "/nothing")) == "Empty PUT request."
    assert fault(real("PATCH", "/machine-config")) == "Empty PATCH request."
    assert fault(real("PATCH", "/machine-config", {})) == "Empty PATCH request."
    assert fault(real("PATCH", "/balloon")) == "Empty PATCH request."
    assert fault(real("GET", "/vm")) == "Invalid request method and/or path: GET vm."
    assert fault(real("GET", "/balloon/foo")) == "Unrecognized GET request path `foo`."
    assert fault(real("PUT", "/mmds/foo", {})) == "Unrecognized PUT request path `foo`."
    assert fault(real("PUT", "/snapshot", {})) == "Missing snapshot operation type."
    assert fault(real("DELETE", "/drives/a", raw=b"{}")) == "Empty Delete request."


def test_query_string_and_trailing_slash_are_ignored(real):
    assert real("GET", "/version/")[0] == 200
    assert real("GET", "/machine-config?x=1")[0] == 200


def test_path_ids(real, files):
    drive = {"drive_id": "a", "is_root_device": False, "path_on_host": files["rootfs"]}
    assert fault(real("PUT", "/drives/b", drive)) == (
        "The id from the path does not match the id from the body!")
    assert fault(real("PUT", "/drives/a-b", dict(drive, drive_id="a-b"))) == (
        "API Resource IDs can only contain alphanumeric characters and underscores.")
    assert fault(real("PUT", "/drives", drive, valid=False)) == "The ID cannot be empty."
    net = {"iface_id": "eth0", "host_dev_name": "tap0"}
    assert fault(real("PUT", "/network-interfaces/eth1", net)) == (
        "The id from the path [eth1] does not match the id from the body [eth0]!")
    assert real("PUT", "/drives/a_1", dict(drive, drive_id="a_1"))[0] == 204


def test_bodies_are_strict(real):
    msg = fault(real("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "x": 1},
                     valid=False))
    assert msg == ("An error occurred when deserializing the json body of a request: "
                   "unknown field `x`.")
    msg = fault(real("PUT", "/machine-config", {"mem_size_mib": 128}, valid=False))
    assert "missing field `vcpu_count`" in msg
    msg = fault(real("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 128},
                     valid=False))
    assert msg.startswith("An error occurred when deserializing the json body of a request:")
    msg = fault(real("PUT", "/mmds/config", {"network_interfaces": ["1"], "version": "foo"},
                     valid=False))
    assert "unknown variant `foo`, expected `V1` or `V2`" in msg
    assert fault(real("PATCH", "/vm", raw=b"{not json")).startswith("An error occurred")
    msg = fault(real("PUT", "/machine-config",
                     raw=b'{"vcpu_count": 1, "mem_size_mib": 18446744073709551616}'))
    assert "expected u64" in msg
    # a TokenBucket ignores unknown fields, like Firecracker's (no deny_unknown_fields there)
    assert real("PUT", "/entropy", {"rate_limiter": {"ops": {"size": 1, "refill_time": 100,
                                                             "other": 1}}}, valid=False)[0] == 204


# -- pre-/post-boot rules --------------------------------------------------------------------------


@pytest.mark.parametrize("method,path,body", [
    ("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "x"}),
    ("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}),
    ("PATCH", "/vm", {"state": "Paused"}),
    ("PATCH", "/balloon", {"amount_mib": 1}),
    ("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 1}),
    ("GET", "/balloon/statistics", None),
    ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
    ("PUT", "/actions", {"action_type": "FlushMetrics"}),
    ("PUT", "/snapshot/create", {"mem_file_path": "m", "snapshot_path": "s"}),
])
def test_runtime_calls_refused_before_boot(real, method, path, body):
    assert fault(real(method, path, body)) == NOT_SUPPORTED_PRE_BOOT


@pytest.mark.parametrize("method,path,body", [
    ("PUT", "/boot-source", {"kernel_image_path": "/k"}),
    ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}),
    ("PATCH", "/machine-config", {"vcpu_count": 2}),
    ("PUT", "/drives/d", {"drive_id": "d", "is_root_device": False, "path_on_host": "/x"}),
    ("PUT", "/network-interfaces/e", {"iface_id": "e", "host_dev_name": "tap9"}),
    ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"}),
    ("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": True}),
    ("PUT", "/entropy", {}),
    ("PUT", "/serial", {"serial_out_path": "/tmp/s"}),
    ("PUT", "/logger", {"level": "Info"}),
    ("PUT", "/metrics", {"metrics_path": "/tmp/m"}),
    ("PUT", "/mmds/config", {"network_interfaces": ["e"], "version": "V2"}),
    ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ("PUT", "/snapshot/load", {"snapshot_path": "s", "mem_backend": {
        "backend_type": "File", "backend_path": "m"}}),
])
def test_boot_calls_refused_after_boot(fake, files, method, path, body):
    boot(fake, files)
    calls = len(fake.api.machine.calls)
    assert fault(fake(method, path, body)) == NOT_SUPPORTED_POST_BOOT
    assert len(fake.api.machine.calls) == calls  # the Machine was not asked


def test_body_errors_come_before_state_errors(fake, files):
    boot(fake, files)
    msg = fault(fake("PUT", "/boot-source", {"kernel_image_path": "/k", "bad": 1}, valid=False))
    assert "unknown field `bad`" in msg


def test_actions_drive_the_machine(fake, files):
    machine = fake.api.machine
    assert fault(fake("PUT", "/actions", {"action_type": "InstanceStart"})) == (
        "Start microvm error: Cannot start microvm without kernel configuration.")
    assert machine.state == "Not started"
    boot(fake, files)
    assert fake("GET", "/")[1]["state"] == "Running"
    assert fake("PATCH", "/vm", {"state": "Paused"})[0] == 204
    assert fake("GET", "/")[1]["state"] == "Paused"
    assert fake("PATCH", "/vm", {"state": "Resumed"})[0] == 204
    assert fake("PUT", "/actions", {"action_type": "SendCtrlAltDel"})[0] == 204
    assert [c[0] for c in machine.calls][-4:] == ["start", "pause", "resume", "ctrl_alt_del"]
    # FlushMetrics with no metrics configured writes nothing and succeeds (Firecracker)
    assert fake("PUT", "/actions", {"action_type": "FlushMetrics"})[0] == 204
    machine.metrics_path = files["dir"] / "m"
    assert fake("PUT", "/actions", {"action_type": "FlushMetrics"})[0] == 204
    assert machine.calls[-1] == ("flush_metrics",)


def test_machine_errors_become_400_with_category(fake, files):
    machine = fake.api.machine
    boot(fake, files)
    machine.fail_with = StateError("pause: the VM is exited")
    assert fault(fake("PATCH", "/vm", {"state": "Paused"})) == (
        "Internal VMM error: pause: the VM is exited")
    machine.fail_with = RuntimeError("boom")
    msg = fault(fake("PUT", "/actions", {"action_type": "SendCtrlAltDel"}))
    assert "RuntimeError: boom" in msg and "Traceback" not in msg


def test_unexpected_exception_is_logged(fake, files, caplog):
    boot(fake, files)
    fake.api.machine.fail_with = KeyError("k")
    with caplog.at_level(logging.ERROR, logger="embervm.fc.api"):
        status, _, _ = fake("PATCH", "/vm", {"state": "Paused"})
    assert status == 400
    assert any(r.exc_info for r in caplog.records)


# -- deprecation -----------------------------------------------------------------------------------


def test_deprecation_header(real):
    _, _, headers = real("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256,
                                                    "cpu_template": "None"})
    assert headers.get("Deprecation") == "true"
    _, _, headers = real("PATCH", "/machine-config", {"cpu_template": "None"})
    assert headers.get("Deprecation") == "true"
    status, _, headers = real("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock",
                                                "vsock_id": "v"})
    assert status == 204 and headers.get("Deprecation") == "true"
    _, _, headers = real("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/tmp/v.sock"})
    assert "Deprecation" not in headers
    _, _, headers = real("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
    assert "Deprecation" not in headers


# -- machine configuration -------------------------------------------------------------------------


def test_machine_config_put_get_patch(real):
    assert real("GET", "/machine-config")[1] == {
        "vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False,
        "huge_pages": "None"}
    assert real("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256,
                                           "track_dirty_pages": True})[0] == 204
    assert real("PATCH", "/machine-config", {"mem_size_mib": 512})[0] == 204
    assert real("GET", "/machine-config")[1] == {
        "vcpu_count": 2, "mem_size_mib": 512, "smt": False, "track_dirty_pages": True,
        "huge_pages": "None"}
    # PUT resets what it does not name
    assert real("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})[0] == 204
    assert real("GET", "/machine-config")[1]["track_dirty_pages"] is False


@pytest.mark.parametrize("body,text", [
    ({"vcpu_count": 0, "mem_size_mib": 128}, "The number of vCPUs must be greater than 0"),
    ({"vcpu_count": 33, "mem_size_mib": 128}, "less than 32"),
    ({"vcpu_count": 3, "mem_size_mib": 128, "smt": True}, "1 or an even number if SMT"),
    ({"vcpu_count": 1, "mem_size_mib": 0}, "The memory size (MiB) is either 0"),
    ({"vcpu_count": 1, "mem_size_mib": 129, "huge_pages": "2M"}, "multiple of the configured"),
    ({"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "C3"}, "not supported by embervm"),
])
def test_machine_config_negatives(real, body, text):
    msg = fault(real("PUT", "/machine-config", body, valid=False))
    assert text in msg
    assert real("GET", "/machine-config")[1]["mem_size_mib"] == 128  # unchanged


def test_memory_below_balloon_target_refused(real):
    assert real("PUT", "/balloon", {"amount_mib": 100, "deflate_on_oom": False})[0] == 204
    assert "smaller than the previously set balloon device target size" in fault(
        real("PATCH", "/machine-config", {"mem_size_mib": 64}))


def test_embervm_limits_answer_400(real):
    msg = fault(real("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 8}))
    assert msg.startswith("Machine config error: ")


# -- boot source, drives, network, vsock, entropy, serial --------------------------------------


def test_boot_source(real, files):
    msg = fault(real("PUT", "/boot-source", {"kernel_image_path": "/nonexistent/k"}))
    assert msg == ("Boot source error: The kernel file cannot be opened: No such file or "
                   "directory (os error 2)")
    msg = fault(real("PUT", "/boot-source", {"kernel_image_path": files["kernel"],
                                             "initrd_path": "/nonexistent/i"}))
    assert "The initrd file cannot be opened" in msg
    assert real("PUT", "/boot-source", {"kernel_image_path": files["kernel"],
                                        "boot_args": "console=ttyS0"})[0] == 204
    assert real("GET", "/vm/config")[1]["boot-source"] == {
        "kernel_image_path": files["kernel"], "initrd_path": None, "boot_args": "console=ttyS0"}


def test_drives(real, files):
    root = {"drive_id": "rootfs", "is_root_device": True, "path_on_host": files["rootfs"],
            "is_read_only": False}
    assert real("PUT", "/drives/rootfs", root)[0] == 204
    second_root = {"drive_id": "scratch", "is_root_device": True,
                   "path_on_host": files["scratch"]}
    assert fault(real("PUT", "/drives/scratch", second_root)) == (
        "Drive config error: A root block device already exists!")
    missing = dict(second_root, is_root_device=False, path_on_host="/nonexistent/x")
    assert "No such file or directory" in fault(real("PUT", "/drives/scratch", missing))
    scratch = {"drive_id": "scratch", "is_root_device": False, "path_on_host": files["scratch"],
               "is_read_only": True, "cache_type": "Writeback", "io_engine": "Async",
               "rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100},
                                "ops": {"size": 0, "refill_time": 100}}}
    assert real("PUT", "/drives/scratch", scratch)[0] == 204
    disk = real.api.machine.config.disks[1]
    assert (disk.read_only, disk.cache_type, disk.io_engine) == (True, "Writeback", "Async")
    # a zero-sized bucket is no bucket (Firecracker's TokenBucket::new gives None)
    assert disk.rate_limiter == RateLimitConfig(bandwidth=BucketConfig(1000000, 100, 0), ops=None)
    # replacing the root drive by itself is allowed
    assert real("PUT", "/drives/rootfs", dict(root, is_read_only=True))[0] == 204
    assert "vhost-user" in fault(real("PUT", "/drives/v", {"drive_id": "v",
                                                           "is_root_device": False,
                                                           "socket": "/tmp/s"}))


def test_drive_patch_after_boot(fake, files):
    body = {"drive_id": "scratch", "is_root_device": False, "path_on_host": files["scratch"]}
    assert fake("PUT", "/drives/scratch", body)[0] == 204
    boot(fake, files)
    assert fake("PATCH", "/drives/scratch", {
        "drive_id": "scratch", "path_on_host": files["rootfs"],
        "rate_limiter": {"ops": {"size": 10, "refill_time": 1000, "one_time_burst": 5}}})[0] == 204
    call = fake.api.machine.calls[-1]
    assert call[0] == "update_drive" and call[1] == "scratch" and str(call[2]) == files["rootfs"]
    assert call[3] == RateLimitConfig(bandwidth=None, ops=BucketConfig(10, 1000, 5))
    msg = fault(fake("PATCH", "/drives/nope", {"drive_id": "nope", "path_on_host": "x"}))
    assert msg.startswith("Drive config error: Unable to patch the block device: ")


def test_network_interfaces(real, fake, files):
    body = {"iface_id": "1", "host_dev_name": "tap1", "guest_mac": "06:00:00:00:00:01",
            "tx_rate_limiter": {"bandwidth": {"size": 1000000, "refill_time": 100}}}
    assert real("PUT", "/network-interfaces/1", body)[0] == 204
    other = {"iface_id": "2", "host_dev_name": "tap2", "guest_mac": "06:00:00:00:00:01"}
    assert fault(real("PUT", "/network-interfaces/2", other)) == (
        "Network config error: The MAC address is already in use: 06:00:00:00:00:01")
    other["guest_mac"] = "08:00:00:00:00:01"
    assert real("PUT", "/network-interfaces/2", other)[0] == 204
    assert "mtu" in fault(real("PUT", "/network-interfaces/3", {
        "iface_id": "3", "host_dev_name": "tap3", "mtu": 9000}))
    assert "invalid MAC address" in fault(real("PUT", "/network-interfaces/3", {
        "iface_id": "3", "host_dev_name": "tap3", "guest_mac": "zz"}))
    nets = real("GET", "/vm/config")[1]["network-interfaces"]
    assert nets[0]["tx_rate_limiter"] == {
        "bandwidth": {"size": 1000000, "one_time_burst": None, "refill_time": 100}, "ops": None}
    # PATCH after boot maps both limiters
    boot(fake, files)
    assert fake("PATCH", "/network-interfaces/1", {
        "iface_id": "1", "rx_rate_limiter": {"ops": {"size": 5, "refill_time": 10}}})[0] == 204
    assert fake.api.machine.calls[-1] == (
        "update_net", "1", RateLimitConfig(ops=BucketConfig(5, 10, 0)), None)


def test_vsock_entropy_serial(real, files):
    sock = str(files["dir"] / "v.sock")
    assert real("PUT", "/vsock", {"guest_cid": 15, "uds_path": sock})[0] == 204
    assert real("PUT", "/vsock", {"guest_cid": 166, "uds_path": sock})[0] == 204
    assert real("GET", "/vm/config")[1]["vsock"] == {"guest_cid": 166, "uds_path": sock}
    assert fault(real("PUT", "/vsock", {"guest_cid": 2, "uds_path": sock},
                      valid=False)).startswith(
        "Vsock config error: ")
    assert real("PUT", "/entropy", {"rate_limiter": {"ops": {"size": 1,
                                                             "refill_time": 100}}})[0] == 204
    assert real("GET", "/vm/config")[1]["entropy"] == {"rate_limiter": {
        "bandwidth": None, "ops": {"size": 1, "one_time_burst": None, "refill_time": 100}}}
    out = files["dir"] / "serial.out"
    assert real("PUT", "/serial", {"serial_out_path": str(out)})[0] == 204
    assert real.api.machine.config.serial.path == out
    assert "rate_limiter" in fault(real("PUT", "/serial", {"rate_limiter": {
        "size": 1, "refill_time": 1}}))


# -- balloon ---------------------------------------------------------------------------------------


def test_balloon(real):
    assert fault(real("GET", "/balloon")) == "Balloon config error: No balloon device found."
    assert real("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": True})[0] == 204
    assert real("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False,
                                    "stats_polling_interval_s": 5})[0] == 204
    assert real("GET", "/balloon")[1] == {"amount_mib": 0, "deflate_on_oom": False,
                                          "stats_polling_interval_s": 5,
                                          "free_page_hinting": False,
                                          "free_page_reporting": False}
    assert fault(real("PUT", "/balloon", {"amount_mib": 1024, "deflate_on_oom": False})) == (
        "Balloon config error: Amount of pages requested is too large.")
    assert "free_page_hinting" in fault(real("PUT", "/balloon", {
        "amount_mib": 1, "deflate_on_oom": False, "free_page_hinting": True}))


def test_balloon_after_boot(fake, files):
    assert fake("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": True,
                                    "stats_polling_interval_s": 1})[0] == 204
    boot(fake, files)
    assert fake("PATCH", "/balloon", {"amount_mib": 4})[0] == 204
    assert fake("GET", "/balloon")[1]["amount_mib"] == 4
    assert fake("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 5})[0] == 204
    fake.api.machine.stats["actual_mib"] = 3
    status, stats, _ = fake("GET", "/balloon/statistics")
    assert status == 200 and stats["actual_mib"] == 3
    fake.api.machine.fail_with = ConfigError("target too large")
    assert fault(fake("PATCH", "/balloon", {"amount_mib": 300})) == (
        "Balloon update error: target too large")
    # PATCH /balloon/<anything> with a body is a balloon update, as in Firecracker
    assert fake("PATCH", "/balloon/other", {"amount_mib": 2}, valid=False)[0] == 204


# -- not supported by embervm --------------------------------------------------------------------


@pytest.mark.parametrize("method,path,body", [
    ("PUT", "/cpu-config", {"kvm_capabilities": []}),
    ("PUT", "/pmem/p", {"id": "p", "path_on_host": "/x"}),
    ("PUT", "/hotplug/memory", {"total_size_mib": 1024}),
    ("PUT", "/snapshot/load", {"snapshot_path": "s", "mem_file_path": "m"}),
])
def test_not_supported_by_embervm(real, method, path, body):
    assert "not supported by embervm yet" in fault(real(method, path, body))


def test_not_supported_after_boot(fake, files):
    boot(fake, files)
    for method, path, body in [
            ("PUT", "/snapshot/create", {"mem_file_path": "m", "snapshot_path": "s"}),
            ("PATCH", "/balloon/hinting/start", {}), ("PATCH", "/balloon/hinting/stop", None),
            ("GET", "/balloon/hinting/status", None), ("GET", "/hotplug/memory", None),
            ("PATCH", "/pmem/p", {"id": "p"}), ("DELETE", "/drives/rootfs", None)]:
        assert "not supported by embervm yet" in fault(fake(method, path, body)), path


def test_mmds_config_says_metadata_service_missing(real):
    msg = fault(real("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"}))
    assert "in-guest metadata service" in msg and "not implemented" in msg


def test_snapshot_load_deprecation(real):
    _, _, headers = real("PUT", "/snapshot/load", {"snapshot_path": "s", "mem_file_path": "m"})
    assert headers.get("Deprecation") == "true"
    msg = fault(real("PUT", "/snapshot/load", {"snapshot_path": "s"}, valid=False))
    assert "either `mem_backend` or `mem_file_path` is required" in msg


# -- logger and metrics ----------------------------------------------------------------------------


def test_logger_callback():
    seen = []
    machine = FakeMachine()
    client = Client(FirecrackerApi(machine, logger_setup=seen.append))
    assert client("PUT", "/logger", {"level": "warning", "show_level": True},
                  valid=False)[0] == 204  # the code is case-insensitive, the swagger is not
    assert seen[0].level == "Warn" and seen[0].show_level is True
    assert "Invalid LevelFilter" in fault(client("PUT", "/logger", {"level": "loud"},
                                                 valid=False))

    def failing(cfg):
        raise PermissionError(13, "Permission denied")
    client = Client(FirecrackerApi(FakeMachine(), logger_setup=failing))
    assert fault(client("PUT", "/logger", {"log_path": "/x"})) == (
        "Logger error: Permission denied (os error 13)")


def test_default_logger_writes_to_the_file(fake, files):
    path = files["dir"] / "fc.log"
    root = logging.getLogger("embervm")
    try:
        assert fake("PUT", "/logger", {"log_path": str(path), "level": "Debug",
                                       "show_level": True})[0] == 204
        logging.getLogger("embervm.test").debug("hello from the test")
        assert "DEBUG" in path.read_text() and "hello from the test" in path.read_text()
    finally:
        for h in [h for h in root.handlers if getattr(h, "_embervm_fc_logger", False)]:
            root.removeHandler(h)
            h.close()
        root.setLevel(logging.NOTSET)


def test_metrics(fake, files):
    # the FakeMachine: embervm.metrics (the writer behind Machine.set_metrics) is another
    # engineer's module
    path = files["dir"] / "metrics.json"
    assert fake("PUT", "/metrics", {"metrics_path": str(path)})[0] == 204
    assert fake.api.machine.calls[-1] == ("set_metrics", path)
    fake.api.machine.fail_with = ConfigError("metrics are already configured")
    msg = fault(fake("PUT", "/metrics", {"metrics_path": str(path)}))
    assert msg == ("Metrics error: Cannot initialize the metrics system due to bad user "
                   "input: metrics are already configured")


# -- MMDS ------------------------------------------------------------------------------------------


def test_mmds_store_through_the_api(real):
    assert real("GET", "/mmds")[:2] == (200, {})
    assert fault(real("PATCH", "/mmds", {"a": 1})) == (
        "MMDS error: The MMDS data store is not initialized.")
    doc = {"latest": {"meta-data": {"ami-id": "ami-1", "reservation-id": "r-1"}}}
    assert real("PUT", "/mmds", doc)[0] == 204
    assert real("PATCH", "/mmds", {"latest": {"meta-data": {"ami-id": "ami-2",
                                                            "reservation-id": None}}})[0] == 204
    assert real("GET", "/mmds")[1] == {"latest": {"meta-data": {"ami-id": "ami-2"}}}
    assert real.api.machine.mmds is real.api.mmds
    # GET /mmds/<anything> is GET /mmds, as Firecracker's router ignores the rest
    assert real("GET", "/mmds/latest")[1] == {"latest": {"meta-data": {"ami-id": "ami-2"}}}


def test_mmds_limit_is_413_and_keeps_the_store():
    client = Client(FirecrackerApi(FakeMachine(), mmds_size_limit=64))
    assert client("PUT", "/mmds", {"k": "v" * 40})[0] == 204
    status, body, _ = client("PUT", "/mmds", {"k": "v" * 80})
    assert status == 413 and body["fault_message"] == (
        "MMDS limit exceeded error: The MMDS patch request doesn't fit.")
    status, _, _ = client("PATCH", "/mmds", {"other": "x" * 40})
    assert status == 413
    assert client("GET", "/mmds")[1] == {"k": "v" * 40}


def test_mmds_limit_counts_compact_json():
    store = MmdsStore(limit_bytes=len(b'{"a":[1,2]}'))
    store.put({"a": [1, 2]})
    with pytest.raises(ConfigError):
        store.put({"a": [1, 22]})


@pytest.mark.parametrize("target,patch,result", [  # RFC 7396 appendix A
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
])
def test_merge_patch_rfc7396(target, patch, result):
    before = json.dumps(target)
    assert merge_patch(target, patch) == result
    assert json.dumps(target) == before  # the target is not modified


# -- config file -----------------------------------------------------------------------------------


def full_config(files):
    return {
        "boot-source": {"kernel_image_path": files["kernel"], "boot_args": "console=ttyS0",
                        "initrd_path": None},
        "drives": [
            {"drive_id": "scratch", "partuuid": None, "is_root_device": False,
             "cache_type": "Writeback", "is_read_only": True, "path_on_host": files["scratch"],
             "io_engine": "Async", "rate_limiter": {
                 "bandwidth": {"size": 1000, "refill_time": 100, "one_time_burst": 10},
                 "ops": None}, "socket": None},
            {"drive_id": "rootfs", "partuuid": None, "is_root_device": True,
             "cache_type": "Unsafe", "is_read_only": False, "path_on_host": files["rootfs"],
             "io_engine": "Sync", "rate_limiter": None, "socket": None},
        ],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": False,
                           "track_dirty_pages": True, "huge_pages": "None"},
        "cpu-config": None,
        "balloon": {"amount_mib": 16, "deflate_on_oom": True, "stats_polling_interval_s": 1},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                "guest_mac": "06:00:00:00:00:01", "rx_rate_limiter": {
                                    "ops": {"size": 10, "refill_time": 100}}}],
        "vsock": {"guest_cid": 3, "uds_path": str(files["dir"] / "v.sock")},
        "logger": None,
        "metrics": None,
        "mmds-config": None,
        "entropy": {"rate_limiter": None},
        "pmem": [],
        "memory-hotplug": None,
    }


def test_config_file_round_trip(files):
    first = Machine(id="one")
    second = Machine(id="two")
    try:
        api = FirecrackerApi(first)
        api.apply_config(full_config(files))
        exported = api.vm_config()
        assert [d["drive_id"] for d in exported["drives"]] == ["rootfs", "scratch"]
        assert exported["machine-config"]["track_dirty_pages"] is True
        assert exported["balloon"]["amount_mib"] == 16
        again = FirecrackerApi(second)
        again.apply_config(json.loads(json.dumps(exported)))
        assert again.vm_config() == exported
        Client(again)("GET", "/vm/config")  # conforms to FullVmConfiguration
    finally:
        first.close()
        second.close()


def test_config_file_ignores_unknown_top_level_keys_with_a_warning(files, caplog):
    # Firecracker's VmmConfig ignores them (and skips `serial` on purpose): a file written for
    # Firecracker must work unchanged.
    api = FirecrackerApi(FakeMachine())
    api.apply_config(dict(full_config(files), serial={}, bogus=1))
    assert "ignoring unknown key(s) bogus, serial" in caplog.text


def test_config_file_errors(files):
    api = FirecrackerApi(FakeMachine())
    doc = full_config(files)
    del doc["drives"]
    with pytest.raises(ConfigError, match="missing field `drives`"):
        api.apply_config(doc)
    doc = full_config(files)
    doc["machine-config"]["vcpu_count"] = 0
    with pytest.raises(ConfigError, match="config file: machine-config: Machine config error"):
        api.apply_config(doc)
    doc = full_config(files)
    doc["drives"][1]["bogus"] = 1
    with pytest.raises(ConfigError, match="drives: .*unknown field `bogus`"):
        api.apply_config(doc)
    doc = full_config(files)
    doc["mmds-config"] = {"network_interfaces": ["eth0"]}
    with pytest.raises(ConfigError, match="in-guest metadata service"):
        api.apply_config(doc)
    with pytest.raises(ConfigError, match="JSON object"):
        api.apply_config([])


def test_config_file_order_machine_config_before_balloon(files):
    # The balloon (16 MiB) fits only because machine-config (256 MiB) is applied first, and
    # boot-source comes before drives: both follow Firecracker's order, not the file's.
    machine = FakeMachine()
    api = FirecrackerApi(machine)
    doc = full_config(files)
    doc["balloon"]["amount_mib"] = 200
    api.apply_config(dict(reversed(list(doc.items()))))
    order = [c[0] for c in machine.calls]
    assert order.index("set_machine_config") < order.index("set_boot_source") < order.index(
        "add_drive") < order.index("add_net") < order.index("set_vsock") < order.index(
        "set_balloon") < order.index("set_entropy")
