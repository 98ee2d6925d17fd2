"""CLI option parsing and VmConfig validation: bad input → ConfigError with what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from embervm.cli import (
    parse_balloon,
    parse_console,
    parse_disk,
    parse_net,
    parse_serial,
    parse_vsock,
)
from embervm.config import BalloonConfig, DiskConfig, NetConfig, VmConfig, VsockConfig
from embervm.errors import ConfigError


def test_disk_spec_with_options():
    d = parse_disk("/x.img,ro,id=data")
    assert d == DiskConfig(Path("/x.img"), read_only=True, id="data")
    with pytest.raises(ConfigError, match="unknown option"):
        parse_disk("/x.img,rw")
    with pytest.raises(ConfigError, match="PATH"):
        parse_disk(",ro")


def test_net_console_vsock_balloon_serial_specs():
    assert parse_net("tap=tap0,mac=52:54:00:12:34:56") == NetConfig("tap0", "52:54:00:12:34:56")
    assert parse_net("tap=t1").mac is None
    for bad in ("mac=52:54:00:12:34:56", "tap", "tap=t,foo=1"):
        with pytest.raises(ConfigError, match="--net"):
            parse_net(bad)
    assert parse_console("socket:/tmp/c.sock").path == Path("/tmp/c.sock")
    assert parse_console("stdio").kind == "stdio"
    with pytest.raises(ConfigError, match="--console"):
        parse_console("tcp:1")
    assert parse_vsock("cid=3,uds=/tmp/v.sock") == VsockConfig(3, Path("/tmp/v.sock"))
    with pytest.raises(ConfigError, match="not a number"):
        parse_vsock("cid=x,uds=/tmp/v")
    with pytest.raises(ConfigError, match="cid=N,uds=PATH"):
        parse_vsock("cid=3")
    assert parse_balloon("64,deflate-on-oom,stats=2") == BalloonConfig(64, True, 2)
    with pytest.raises(ConfigError, match="unknown option"):
        parse_balloon("64,fast")
    with pytest.raises(ConfigError, match="MIB"):
        parse_balloon("lots")
    assert parse_serial("file:/tmp/s.log").path == Path("/tmp/s.log")
    assert parse_serial("null").kind == "null"
    with pytest.raises(ConfigError, match="--serial"):
        parse_serial("file:")


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(mem_mib=8), "--mem"),
        (dict(vcpus=9), "--vcpus"),
        (dict(kernel=Path("/nonexistent")), "no such file"),
        (dict(initrd=Path("/")), "directory"),
        (dict(nets=[NetConfig("a-very-long-tap-name")]), "1 to 15 bytes"),
        (dict(nets=[NetConfig("tap0", "52:54:00")]), "six hex bytes"),
        (dict(vsock=VsockConfig(2, Path("/tmp/v.sock"))), "reserved"),
        (dict(vsock=VsockConfig(3, Path("/nonexistent/v.sock"))), "not a directory"),
        (dict(balloon=BalloonConfig(512)), "below the guest memory"),
        (dict(disks=[DiskConfig(Path("/etc/hostname"), id="x" * 21)]), "20 bytes"),
    ],
)
def test_config_validation_names_the_problem(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        VmConfig(**kw).validate()


def test_duplicate_disk_ids_rejected(tmp_path):
    a = tmp_path / "a.img"
    a.write_bytes(b"\0" * 512)
    cfg = VmConfig(disks=[DiskConfig(a, id="d"), DiskConfig(a, read_only=True, id="d")])
    with pytest.raises(ConfigError, match="used twice"):
        cfg.validate()
