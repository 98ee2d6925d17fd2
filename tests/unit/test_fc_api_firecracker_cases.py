"""Cases from Firecracker v1.16.1's tests/integration_tests/functional/test_api.py that need no
guest, rewritten for embervm: the same requests, driven through FirecrackerApi.handle, with
Firecracker's expected outcomes (and its message fragments where the test matches them).
Pre-boot cases use the real Machine; "after start" uses FakeMachine (no guest boots)."""

from __future__ import annotations

import re

import pytest
from fc_fakes import Client, FakeMachine

from embervm.fc.api import FirecrackerApi
from embervm.machine import Machine

NOT_SUPPORTED_BEFORE_START = (
    "The requested operation is not supported before starting the microVM.")
NOT_SUPPORTED_AFTER_START = "The requested operation is not supported after starting the microVM."


@pytest.fixture
def env(tmp_path):
    paths = {}
    for name in ("vmlinux", "rootfs", "scratch", "otherscratch"):
        p = tmp_path / name
        p.write_bytes(b"\0" * 4096)
        paths[name] = str(p)
    paths["dir"] = tmp_path
    return paths


@pytest.fixture
def vm():
    machine = Machine(id="fc-cases")
    yield Client(FirecrackerApi(machine))
    machine.close()


@pytest.fixture
def fake():
    return Client(FirecrackerApi(FakeMachine()))


def ok(result):
    assert result[0] == 204, result
    return result


def refused(result, pattern: str | None = None) -> str:
    status, body, _ = result
    assert status == 400, result
    if pattern is not None:
        assert re.search(pattern, body["fault_message"]), body["fault_message"]
    return body["fault_message"]


def basic_config(client, env, vcpus=2, mem=256):
    """Firecracker's Microvm.basic_config: machine config, boot source, a read-write root."""
    ok(client("PUT", "/machine-config", {"vcpu_count": vcpus, "mem_size_mib": mem}))
    ok(client("PUT", "/boot-source", {"kernel_image_path": env["vmlinux"],
                                      "boot_args": "console=ttyS0 reboot=k panic=1"}))
    ok(client("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": env["rootfs"],
                                        "is_root_device": True, "is_read_only": False}))


@pytest.mark.parametrize("io_engine", ["Sync", "Async"])
def test_api_put_update_pre_boot(vm, env, io_engine):
    basic_config(vm, env)
    ok(vm("PUT", "/drives/scratch", {"drive_id": "scratch", "path_on_host": env["scratch"],
                                     "is_root_device": False, "is_read_only": False,
                                     "io_engine": io_engine}))
    refused(vm("PUT", "/boot-source", {"kernel_image_path": "foo.bar"}), re.escape(
        "The kernel file cannot be opened: No such file or directory (os error 2)"))
    ok(vm("PUT", "/boot-source", {"kernel_image_path": env["vmlinux"]}))
    refused(vm("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "foo.bar",
                                         "is_read_only": True, "is_root_device": True,
                                         "io_engine": io_engine}), "No such file or directory")
    refused(vm("PUT", "/drives/scratch", {"drive_id": "scratch", "path_on_host": env["scratch"],
                                          "is_read_only": False, "is_root_device": True,
                                          "io_engine": io_engine}),
            "A root block device already exists")
    ok(vm("PUT", "/drives/scratch", {"drive_id": "scratch", "path_on_host": env["otherscratch"],
                                     "is_read_only": True, "is_root_device": False,
                                     "io_engine": io_engine}))
    # Firecracker's test also sets smt and cpu_template C3 on x86: embervm has neither
    ok(vm("PUT", "/machine-config", {"vcpu_count": 4, "mem_size_mib": 256,
                                     "track_dirty_pages": True}))
    cfg = vm("GET", "/machine-config")[1]
    assert (cfg["vcpu_count"], cfg["mem_size_mib"], cfg["track_dirty_pages"]) == (4, 256, True)


def test_net_api_put_update_pre_boot(vm):
    ok(vm("PUT", "/network-interfaces/1", {"iface_id": "1", "guest_mac": "06:00:00:00:00:01",
                                           "host_dev_name": "fctap1"}))
    ok(vm("PUT", "/network-interfaces/2", {"iface_id": "2", "guest_mac": "07:00:00:00:00:01",
                                           "host_dev_name": "fctap2"}))
    refused(vm("PUT", "/network-interfaces/2", {"iface_id": "2", "host_dev_name": "fctap2",
                                                "guest_mac": "06:00:00:00:00:01"}),
            "The MAC address is already in use: 06:00:00:00:00:01")
    ok(vm("PUT", "/network-interfaces/2", {"iface_id": "2", "host_dev_name": "fctap2",
                                           "guest_mac": "08:00:00:00:00:01"}))
    # an interface taking another's TAP name: Firecracker fails to open the TAP; embervm
    # refuses the name while configuring
    refused(vm("PUT", "/network-interfaces/1", {"iface_id": "1", "host_dev_name": "fctap2",
                                                "guest_mac": "06:00:00:00:00:01"}),
            "Could not create the network device")
    # Firecracker drops interface 1 when its update fails, so its MAC is free again; embervm
    # keeps the interface as it was, so the new interface takes another MAC
    ok(vm("PUT", "/network-interfaces/3", {"iface_id": "3", "host_dev_name": "fctap3",
                                           "guest_mac": "09:00:00:00:00:01"}))


def test_api_machine_config(vm, env):
    refused(vm("PUT", "/machine-config", {"vcpu_count": "-2"}, valid=False))
    refused(vm("PUT", "/machine-config", {"smt": "random_string"}, valid=False))
    refused(vm("PUT", "/machine-config", {"cpu_template": "random_string"}, valid=False))
    ok(vm("PATCH", "/machine-config", {"track_dirty_pages": True}))
    refused(vm("PUT", "/machine-config", {"mem_size_mib": 128}, valid=False),
            "missing field `vcpu_count`")
    refused(vm("PUT", "/machine-config", {"vcpu_count": 2}, valid=False),
            "missing field `mem_size_mib`")
    ok(vm("PUT", "/machine-config", {"mem_size_mib": 128, "vcpu_count": 1}))
    assert vm("GET", "/machine-config")[1]["smt"] is False
    refused(vm("PUT", "/machine-config", {"mem_size_mib": "-2"}, valid=False))
    refused(vm("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 1 << 64},
               valid=False), "error occurred when deserializing the json body of a request")
    basic_config(vm, env)
    refused(vm("PATCH", "/machine-config", {"mem_size_mib": 0}), re.escape(
        "The memory size (MiB) is either 0, or not a multiple of the configured page size."))
    ok(vm("PATCH", "/machine-config", {"mem_size_mib": 256}))
    ok(vm("PATCH", "/machine-config", {"cpu_template": "None"}))
    cfg = vm("GET", "/vm/config")[1]["machine-config"]
    assert (cfg["vcpu_count"], cfg["mem_size_mib"], cfg["smt"]) == (2, 256, False)


def test_negative_machine_config_api(vm):
    _, _, headers = ok(vm("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256,
                                                     "cpu_template": "None"}))
    assert headers["Deprecation"]
    _, _, headers = ok(vm("PATCH", "/machine-config", {"cpu_template": "None"}))
    assert headers["Deprecation"]


def test_api_put_update_post_boot(fake, env):
    basic_config(fake, env)
    ok(fake("PUT", "/network-interfaces/1", {"iface_id": "1", "host_dev_name": "fctap1",
                                             "guest_mac": "06:00:00:00:00:01"}))
    ok(fake("PUT", "/actions", {"action_type": "InstanceStart"}))
    refused(fake("PUT", "/boot-source", {"kernel_image_path": env["vmlinux"]}),
            NOT_SUPPORTED_AFTER_START)
    refused(fake("PATCH", "/machine-config", {"vcpu_count": 4}), NOT_SUPPORTED_AFTER_START)
    refused(fake("PUT", "/machine-config", {"vcpu_count": 4, "mem_size_mib": 128}),
            NOT_SUPPORTED_AFTER_START)
    refused(fake("PUT", "/mmds/config", {"version": "V2", "ipv4_address": "169.254.169.250",
                                         "network_interfaces": ["1"]}),
            NOT_SUPPORTED_AFTER_START)


@pytest.mark.parametrize("io_engine", ["Sync", "Async"])
def test_rate_limiters_api_config(vm, env, io_engine):
    for drive_id, limiter in [
            ("bw", {"bandwidth": {"size": 1000000, "refill_time": 100}}),
            ("ops", {"ops": {"size": 1, "refill_time": 100}}),
            ("bwops", {"bandwidth": {"size": 1000000, "refill_time": 100},
                       "ops": {"size": 1, "refill_time": 100}}),
            ("nada", {})]:
        path = env["dir"] / drive_id
        path.write_bytes(b"\0" * 4096)
        ok(vm("PUT", f"/drives/{drive_id}", {"drive_id": drive_id, "path_on_host": str(path),
                                             "is_read_only": False, "is_root_device": False,
                                             "rate_limiter": limiter, "io_engine": io_engine}))
    both = {"bandwidth": {"size": 1000000, "refill_time": 100},
            "ops": {"size": 1, "refill_time": 100}}
    ok(vm("PUT", "/network-interfaces/1", {"iface_id": "1", "guest_mac": "06:00:00:00:00:01",
                                           "host_dev_name": "fctap1", "tx_rate_limiter": {
                                               "bandwidth": {"size": 1000000,
                                                             "refill_time": 100}}}))
    ok(vm("PUT", "/network-interfaces/2", {"iface_id": "2", "guest_mac": "06:00:00:00:00:02",
                                           "host_dev_name": "fctap2", "rx_rate_limiter": {
                                               "bandwidth": {"size": 1000000,
                                                             "refill_time": 100}}}))
    ok(vm("PUT", "/network-interfaces/3", {"iface_id": "3", "guest_mac": "06:00:00:00:00:03",
                                           "host_dev_name": "fctap3", "rx_rate_limiter": both,
                                           "tx_rate_limiter": both}))
    ok(vm("PUT", "/entropy", {"rate_limiter": both}))
    drives = {d["drive_id"]: d for d in vm("GET", "/vm/config")[1]["drives"]}
    assert drives["nada"]["rate_limiter"] is None
    assert drives["ops"]["rate_limiter"]["ops"]["size"] == 1


@pytest.mark.parametrize("io_engine", ["Sync", "Async"])
def test_api_patch_pre_boot(vm, env, io_engine):
    basic_config(vm, env)
    ok(vm("PUT", "/drives/scratch", {"drive_id": "scratch", "path_on_host": env["scratch"],
                                     "is_root_device": False, "is_read_only": False,
                                     "io_engine": io_engine}))
    ok(vm("PUT", "/network-interfaces/1", {"iface_id": "1", "host_dev_name": "fctap1",
                                           "guest_mac": "06:00:00:00:00:01"}))
    refused(vm("PATCH", "/boot-source", {"kernel_image_path": "otherfile"}, valid=False),
            "Invalid request method")
    ok(vm("PATCH", "/machine-config", {"vcpu_count": 4}))
    assert vm("GET", "/machine-config")[1]["vcpu_count"] == 4
    refused(vm("PATCH", "/logger", {"level": "Error"}, valid=False), "Invalid request method")
    refused(vm("PATCH", "/drives/scratch", {"drive_id": "scratch", "path_on_host": "foo.bar"}),
            NOT_SUPPORTED_BEFORE_START)
    refused(vm("PATCH", "/network-interfaces/1", {"iface_id": "1"}), NOT_SUPPORTED_BEFORE_START)
    refused(vm("PATCH", "/pmem/nonexistent", {"id": "nonexistent", "rate_limiter": {
        "ops": {"size": 1, "refill_time": 100}}}), NOT_SUPPORTED_BEFORE_START)


def test_negative_api_patch_post_boot(fake, env):
    basic_config(fake, env)
    ok(fake("PUT", "/actions", {"action_type": "InstanceStart"}))
    refused(fake("PATCH", "/boot-source", {"kernel_image_path": "otherfile"}, valid=False),
            "Invalid request method")
    refused(fake("PATCH", "/machine-config", {"vcpu_count": 4}), NOT_SUPPORTED_AFTER_START)
    refused(fake("PATCH", "/logger", {"level": "Error"}, valid=False), "Invalid request method")


def test_drive_patch_before_boot(vm, env):
    basic_config(vm, env)
    refused(vm("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "foo.bar"}),
            NOT_SUPPORTED_BEFORE_START)


def test_api_version(fake, env):
    basic_config(fake, env)
    pre = fake("GET", "/version")[1]
    ok(fake("PUT", "/actions", {"action_type": "InstanceStart"}))
    post = fake("GET", "/version")[1]
    assert pre == post == {"firecracker_version": "1.16.1"}


def test_api_vsock(fake, env):
    sock = str(env["dir"] / "vsock.sock")
    ok(fake("PUT", "/vsock", {"guest_cid": 15, "uds_path": sock}))
    ok(fake("PUT", "/vsock", {"guest_cid": 166, "uds_path": sock}))
    _, _, headers = ok(fake("PUT", "/vsock", {"vsock_id": "vsock1", "guest_cid": 15,
                                              "uds_path": sock}))
    assert headers["Deprecation"]
    _, _, headers = ok(fake("PUT", "/vsock", {"vsock_id": "vsock1", "guest_cid": 166,
                                              "uds_path": sock}))
    assert headers["Deprecation"]
    basic_config(fake, env)
    ok(fake("PUT", "/actions", {"action_type": "InstanceStart"}))
    refused(fake("PUT", "/vsock", {"guest_cid": 17, "uds_path": sock}))


def test_api_entropy(fake, env):
    basic_config(fake, env)
    ok(fake("PUT", "/entropy", {}))
    ok(fake("PUT", "/entropy", {}))
    ok(fake("PUT", "/actions", {"action_type": "InstanceStart"}))
    refused(fake("PUT", "/entropy", {}))


def test_api_balloon(fake, env):
    refused(fake("PATCH", "/balloon", {"amount_mib": 0}))
    ok(fake("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": True}))
    ok(fake("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False,
                                "stats_polling_interval_s": 5}))
    cfg = fake("GET", "/balloon")[1]
    assert (cfg["amount_mib"], cfg["deflate_on_oom"], cfg["stats_polling_interval_s"]) == (
        0, False, 5)
    refused(fake("PATCH", "/balloon", {"amount_mib": 2}))
    refused(fake("PUT", "/balloon", {"amount_mib": 1024, "deflate_on_oom": False,
                                     "stats_polling_interval_s": 5}))
    basic_config(fake, env)
    ok(fake("PUT", "/actions", {"action_type": "InstanceStart"}))
    ok(fake("PATCH", "/balloon", {"amount_mib": 4}))
    ok(fake("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 5}))
    cfg = fake("GET", "/balloon")[1]
    assert (cfg["amount_mib"], cfg["deflate_on_oom"], cfg["stats_polling_interval_s"]) == (
        4, False, 5)
    # amount_mib beyond u32 is a decoding error
    refused(fake("PATCH", "/balloon", {"amount_mib": 1 << 32}))


def test_get_full_config(vm, env):
    ok(vm("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}))
    ok(vm("PUT", "/boot-source", {"kernel_image_path": env["vmlinux"], "boot_args": ""}))
    ok(vm("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": env["rootfs"],
                                    "is_root_device": True, "is_read_only": True,
                                    "io_engine": "Sync"}))
    ok(vm("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": True}))
    sock = str(env["dir"] / "vsock.sock")
    ok(vm("PUT", "/vsock", {"guest_cid": 15, "uds_path": sock}))
    tx_rl = {"bandwidth": {"size": 1000000, "refill_time": 100, "one_time_burst": None},
             "ops": None}
    ok(vm("PUT", "/network-interfaces/1", {"iface_id": "1", "guest_mac": "06:00:00:00:00:01",
                                           "host_dev_name": "fctap1", "tx_rate_limiter": tx_rl}))
    expected = {
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": False,
                           "track_dirty_pages": False, "huge_pages": "None"},
        "cpu-config": None,
        "boot-source": {"boot_args": "", "kernel_image_path": env["vmlinux"],
                        "initrd_path": None},
        "drives": [{"drive_id": "rootfs", "partuuid": None, "is_root_device": True,
                    "cache_type": "Unsafe", "is_read_only": True,
                    "path_on_host": env["rootfs"], "rate_limiter": None, "io_engine": "Sync",
                    "socket": None}],
        "pmem": [],
        "balloon": {"amount_mib": 1, "deflate_on_oom": True, "stats_polling_interval_s": 0,
                    "free_page_reporting": False, "free_page_hinting": False},
        "vsock": {"guest_cid": 15, "uds_path": sock},
        "memory-hotplug": None,
        "network-interfaces": [{"iface_id": "1", "host_dev_name": "fctap1",
                                "guest_mac": "06:00:00:00:00:01", "mtu": None,
                                "rx_rate_limiter": None, "tx_rate_limiter": tx_rl}],
        "logger": None,
        "metrics": None,
        "mmds-config": None,
        "entropy": None,
    }
    assert vm("GET", "/vm/config")[1] == expected
