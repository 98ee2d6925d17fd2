"""CLI option parsing (argparse: every option reaches the VmConfig, usage errors are one line
and exit 2) and VmConfig validation: bad input → ConfigError with what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from embervm import __version__
from embervm.cli import (
    build_parser,
    config_from_args,
    main,
    parse_balloon,
    parse_console,
    parse_disk,
    parse_net,
    parse_serial,
    parse_vsock,
    run_command,
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


def test_disk_root_option_combines_with_ro_and_id():
    assert parse_disk("/r.ext4,root") == DiskConfig(Path("/r.ext4"), is_root_device=True)
    assert parse_disk("/r.ext4,ro,root,id=rootfs") == DiskConfig(
        Path("/r.ext4"), read_only=True, id="rootfs", is_root_device=True)
    assert parse_disk("/r.ext4,id=x,root").is_root_device
    assert not parse_disk("/d.img,ro").is_root_device
    with pytest.raises(ConfigError, match="use ro, root or id=ID"):
        parse_disk("/r.ext4,rootfs")


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


# -- the argparse command line ------------------------------------------------------------------


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_every_run_option_reaches_the_config():
    args = parse(
        "run", "--kernel", "/k", "--initrd", "/i", "--cmdline", "console=ttyS0",
        "--append", "a=1", "--mem", "512", "--vcpus", "2", "--disk", "/r,root",
        "--disk", "/d,ro,id=data", "--serial", "file:/tmp/s.log", "--rng",
        "--net", "tap=t0", "--net", "tap=t1,mac=52:54:00:00:00:01", "--console", "stdio",
        "--vsock", "cid=3,uds=/tmp/v.sock", "--balloon", "64,deflate-on-oom",
        "--control", "/tmp/c.sock", "--shell", "-vv")
    assert args.func is run_command and args.verbose == 2
    cfg = config_from_args(args)
    assert cfg == VmConfig(
        kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0", append="a=1 guest.shell",
        mem_mib=512, vcpus=2,
        disks=[DiskConfig(Path("/r"), is_root_device=True),
               DiskConfig(Path("/d"), read_only=True, id="data")],
        serial=parse_serial("file:/tmp/s.log"), rng=True,
        nets=[NetConfig("t0"), NetConfig("t1", "52:54:00:00:00:01")],
        console=parse_console("stdio"), vsock=VsockConfig(3, Path("/tmp/v.sock")),
        balloon=BalloonConfig(64, True), control=Path("/tmp/c.sock"))


def test_run_defaults_match_vmconfig_defaults():
    args = parse("run")
    assert args.verbose == 0
    assert config_from_args(args) == VmConfig()


def test_two_root_disks_are_refused():
    with pytest.raises(ConfigError, match="only one disk can be the root device"):
        config_from_args(parse("run", "--disk", "/a,root", "--disk", "/b,ro,root"))


def test_demo_parses_its_vcpus():
    assert parse("demo").vcpus == 2
    assert parse("demo", "--vcpus", "1").vcpus == 1


def exit_of(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize(
    "argv, needle",
    [
        ((), "expected a command: run or demo (see embervm --help)"),
        (("bogus",), "invalid choice: 'bogus'"),
        (("run", "--mem", "lots"), "argument --mem: invalid int value: 'lots' "
                                   "(see embervm run --help)"),
        (("run", "--disk"), "argument --disk: expected one argument"),
        (("run", "--bogus", "x"), "unrecognized arguments: --bogus x (see embervm run --help)"),
        (("run", "--kern", "/k"), "unrecognized arguments: --kern"),  # no abbreviations
        (("--vers",), "unrecognized arguments: --vers"),
        (("demo", "--vcpus", "two"), "(see embervm demo --help)"),
        (("-x",), "unrecognized arguments: -x (see embervm --help)"),
    ],
)
def test_usage_errors_are_one_line_with_status_2(capsys, argv, needle):
    code, out, err = exit_of(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("embervm: error: ") and err.endswith("\n") and err.count("\n") == 1
    assert needle in err


def test_bad_values_exit_2_with_the_config_error(capsys):
    code, _, err = exit_of(capsys, "run", "--kernel", "/nonexistent/vmlinux")
    assert (code, err) == (2, "embervm: error: --kernel /nonexistent/vmlinux: no such file\n")
    code, _, err = exit_of(capsys, "run", "--serial", "tcp:1")
    assert code == 2 and err.count("\n") == 1 and "--serial 'tcp:1'" in err


def test_run_command_returns_2_for_an_invalid_config(capsys):
    # Vmm validates before it opens /dev/kvm: no KVM needed.
    assert run_command(parse("run", "--mem", "8")) == 2
    err = capsys.readouterr().err
    assert err.startswith("embervm: error: --mem 8:") and err.count("\n") == 1


def test_version(capsys):
    assert exit_of(capsys, "--version") == (0, f"embervm, version {__version__}\n", "")


RUN_FLAGS = ("--kernel PATH", "--initrd PATH", "--cmdline TEXT", "--append TEXT", "--mem MIB",
             "--vcpus N", "--disk PATH[,ro][,root][,id=ID]", "--serial stdio|file:PATH|null",
             "--rng", "--net tap=NAME[,mac=MAC]", "--console stdio|socket:PATH",
             "--vsock cid=N,uds=PATH", "--balloon MIB[,deflate-on-oom][,stats=S]",
             "--control PATH", "--shell", "-v, --verbose", "-h, --help")


@pytest.mark.parametrize("columns", ["200", "40"])
def test_help_lists_every_option_at_any_width(capsys, monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    monkeypatch.setattr("embervm.cli._width", None)
    code, out, err = exit_of(capsys, "run", "--help")
    assert (code, err) == (0, "")
    assert out.startswith("usage: embervm run [OPTIONS]")
    words = " ".join(out.split())
    assert "Boot a VM and serve it until the guest exits." in words
    for flag in RUN_FLAGS:  # an option's own line is never wrapped
        assert flag in out, flag
    assert "(default: 256)" in words and "(default: stdio)" in words
    if columns == "200":  # the help is not wrapped at argparse's fallback of 80 columns
        assert any(len(line) > 80 for line in out.splitlines())
    code, out, _ = exit_of(capsys, "-h")
    assert code == 0 and "run" in out and "demo" in out and "--version" in out
    code, out, _ = exit_of(capsys, "demo", "--help")
    assert code == 0 and "--vcpus N" in out and "(default: 2)" in out
