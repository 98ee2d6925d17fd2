"""The public Python API before a boot: configuration accumulates, is validated as it arrives,
and the state machine refuses what the state does not allow.  (Booting it is tests/e2e.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from embervm.config import BalloonConfig, DiskConfig, NetConfig, VsockConfig
from embervm.errors import ConfigError, StateError
from embervm.machine import Machine


@pytest.fixture
def vm():
    m = Machine()
    yield m
    m.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(b"\0" * 4096)
    return p


def test_defaults_are_firecrackers(vm):
    assert vm.state == "Not started" and not vm.started
    assert vm.config.vcpus == 1 and vm.config.mem_mib == 128
    assert vm.id == "anonymous-instance"
    assert not vm.boot_source_set


def test_boot_source_checks_paths(vm, tmp_path, image):
    with pytest.raises(ConfigError, match="no such file"):
        vm.set_boot_source(tmp_path / "missing")
    with pytest.raises(ConfigError, match="is a directory"):
        vm.set_boot_source(tmp_path)
    vm.set_boot_source(image, boot_args="console=ttyS0")
    assert vm.boot_source_set and vm.config.cmdline == "console=ttyS0"


@pytest.mark.parametrize("vcpus,mem", [(0, 128), (10_000, 128), (1, 1), (1, 10**9), (True, 128)])
def test_machine_config_bounds(vm, vcpus, mem):
    with pytest.raises(ConfigError):
        vm.set_machine_config(vcpus=vcpus, mem_mib=mem)
    assert vm.config.vcpus == 1 and vm.config.mem_mib == 128  # unchanged


def test_machine_config_patch_changes_only_what_is_given(vm):
    vm.set_machine_config(vcpus=2, mem_mib=256)
    vm.update_machine_config(mem_mib=512)
    assert (vm.config.vcpus, vm.config.mem_mib) == (2, 512)
    with pytest.raises(ConfigError, match="unknown"):
        vm.update_machine_config(cores=3)
    with pytest.raises(ConfigError, match="smt"):
        vm.update_machine_config(smt=True)


def test_drives_insert_replace_and_one_root(vm, image, tmp_path):
    vm.add_drive(DiskConfig(image, id="a"))
    vm.add_drive(DiskConfig(image, id="a", read_only=True))
    assert len(vm.config.disks) == 1 and vm.config.disks[0].read_only
    vm.add_drive(image, root=True)
    with pytest.raises(ConfigError, match="root"):
        vm.add_drive(DiskConfig(image, id="b", is_root_device=True))
    with pytest.raises(ConfigError, match="no such file"):
        vm.add_drive(DiskConfig(tmp_path / "nope", id="c"))
    with pytest.raises(ConfigError, match="cache_type"):
        vm.add_drive(DiskConfig(image, id="d", cache_type="Fast"))
    assert [d.id for d in vm.config.disks] == ["a", "rootfs"]


def test_nets_vsock_balloon_are_validated(vm, tmp_path):
    with pytest.raises(ConfigError, match="TAP name"):
        vm.add_net(NetConfig("x" * 16, id="eth0"))
    vm.add_net(NetConfig("tap0", id="eth0"))
    with pytest.raises(ConfigError, match="already used"):
        vm.add_net(NetConfig("tap0", id="eth1"))
    with pytest.raises(ConfigError, match="cid"):
        vm.set_vsock(VsockConfig(2, tmp_path / "v.sock"))
    assert vm.config.vsock is None
    with pytest.raises(ConfigError, match="below the guest memory"):
        vm.set_balloon(BalloonConfig(target_mib=4096))
    assert vm.config.balloon is None


def test_runtime_calls_are_refused_before_start(vm):
    for call in (vm.pause, vm.resume, vm.ctrl_alt_del, lambda: vm.update_balloon(1),
                 lambda: vm.update_drive("a", path="/x")):
        with pytest.raises(StateError, match="not been started"):
            call()


def test_add_device_takes_only_virtio_devices(vm):
    with pytest.raises(ConfigError, match="VirtioDevice"):
        vm.add_device(object())


def test_shutdown_before_start_ends_serve(vm):
    vm.shutdown(0)
    assert vm.serve() == 0
    assert vm.state == "Exited"
    with pytest.raises(StateError):
        vm.set_machine_config(vcpus=1, mem_mib=128)
