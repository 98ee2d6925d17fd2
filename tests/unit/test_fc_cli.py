"""The firecracker command line (embervm.fc.cli) in-process: Firecracker's argument parser and
its error texts, exit codes 153/152/1, --version and --help, and the socket file removed on
the error paths.  Nothing here boots a guest."""

from __future__ import annotations

import json
import os

import pytest

from embervm.fc import cli


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.run(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--foo"], "Found argument 'foo' which wasn't expected"),
    (["api-sock", "x"], "Found argument 'api-sock' which wasn't expected"),
    (["--api-sock"], "The argument 'api-sock' requires a value, but none was supplied."),
    (["--api-sock", "--id", "x"], "The argument 'api-sock' requires a value"),
    (["--id", "a", "--id", "b"], "The argument 'id' was provided more than once."),
    (["--no-api"], "Argument 'config-file' required, but not found."),
    (["--api-sock=x"], "Found argument 'api-sock=x' which wasn't expected"),
    (["--no-seccomp", "--seccomp-filter", "f"],
     "Argument 'seccomp-filter' cannot be used together with argument 'no-seccomp'."),
    (["--show-level", "--show-level"], "The argument 'show-level' was provided more than once."),
])
def test_bad_command_lines_exit_153_with_firecrackers_message(capsys, tmp_path, argv, message):
    if "--api-sock" not in argv:  # were the parser to accept it, never touch /run
        argv = [*argv, "--api-sock", str(tmp_path / "s")]
    status, out, err = run(capsys, *argv)
    assert status == 153
    assert err.startswith("Error: Arguments parsing error: ")
    assert message in err
    assert "For more information try --help." in err
    assert out == ""


def test_parse_fills_defaults_and_ignores_words_after_double_dash():
    args = cli.parse_args(["--id", "vm-1", "--no-seccomp", "--", "--bogus", "x"])
    assert args["id"] == "vm-1"
    assert args["no-seccomp"] is True
    assert args["api-sock"] == "/run/firecracker.socket"
    assert args["http-api-max-payload-size"] == "51200"
    assert "bogus" not in args and "config-file" not in args


def test_help_and_version_win_over_anything_else():
    assert cli.parse_args(["--bogus", "--help"]) == {"help": True}
    assert cli.parse_args(["--id", "x", "-h"]) == {"help": True}
    assert cli.parse_args(["--id", "--version"]) == {"version": True}


def test_version_is_exactly_firecrackers(capsys):
    status, out, err = run(capsys, "--version")
    assert (status, out, err) == (0, "Firecracker v1.16.1\n\n", "")


def test_help_lists_every_flag_and_says_what_is_not_implemented(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert out.startswith("Firecracker v1.16.1\n")
    assert "embervm" in out
    for name, (takes_value, _, _) in cli.FLAGS.items():
        assert (f"--{name} <{name}>" if takes_value else f"--{name}") in out
    seccomp_lines = [ln for ln in out.splitlines()
                     if ln.strip().startswith(("--seccomp", "--no-seccomp"))]
    assert len(seccomp_lines) == 2
    assert all(cli.SECCOMP_NOTE in ln for ln in seccomp_lines)


def test_main_exits_with_the_status(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--bogus"])
    assert e.value.code == 153
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0


# -- values and configuration ---------------------------------------------------------------


@pytest.mark.parametrize("argv, status, message", [
    (["--level", "Verbose"], 152, "Invalid value for logger level"),
    (["--id", "bad_id"], 153, "Invalid char (_) at position 3"),
    (["--id", "x" * 65], 153, "Invalid len (65)"),
    (["--http-api-max-payload-size", "big"], 153, "'http-api-max-payload-size' parameter"),
    (["--mmds-size-limit", "-1"], 153, "'mmds-size-limit' parameter"),
    (["--start-time-us", "soon"], 153, "'start-time-us' parameter expected to be of 'u64'"),
    (["--enable-pci"], 1, "PCI is not implemented"),
    (["--snapshot-version"], 1, "snapshots are not implemented"),
    (["--describe-snapshot", "state.snap"], 1, "snapshots are not implemented"),
    (["--seccomp-filter", "/nonexistent/filter.bpf"], 1, "Seccomp error"),
])
def test_bad_values_exit_with_firecrackers_category(capsys, tmp_path, argv, status, message):
    sock = str(tmp_path / "api.sock")
    got, _, err = run(capsys, "--api-sock", sock, *argv)
    assert got == status
    assert message in err
    assert not os.path.exists(sock)


def test_level_names_are_case_insensitive_like_firecrackers():
    assert cli.LEVELS["warning"] == cli.LEVELS["warn"] == "Warn"
    assert all(cli.LEVELS[k.lower()] == k for k in ("Off", "Trace", "Debug", "Info", "Error"))


def test_existing_socket_path_exits_1_and_is_left_alone(capsys, tmp_path):
    sock = tmp_path / "api.sock"
    sock.write_text("someone else's")
    status, _, err = run(capsys, "--api-sock", str(sock))
    assert status == 1
    assert "Failed to open the API socket" in err and "already used" in err
    assert sock.read_text() == "someone else's"


def test_logger_that_cannot_open_its_file_exits_1_and_removes_the_socket(capsys, tmp_path):
    sock = str(tmp_path / "api.sock")
    status, _, err = run(capsys, "--api-sock", sock, "--log-path",
                         str(tmp_path / "no-such-dir" / "fc.log"))
    assert status == 1
    assert "Could not initialize logger" in err
    assert not os.path.exists(sock)


def test_unreadable_config_file_exits_152_and_removes_the_socket(capsys, tmp_path):
    sock = str(tmp_path / "api.sock")
    status, _, err = run(capsys, "--api-sock", sock, "--config-file",
                         str(tmp_path / "missing.json"))
    assert status == 152
    assert "Unable to open or read from the configuration file" in err
    assert not os.path.exists(sock)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"drives": []}), "missing field `boot-source`"),
    (json.dumps({"machine-config": {"vcpu_count": 0, "mem_size_mib": 128},
                 "boot-source": {"kernel_image_path": "/k"}, "drives": []}),
     "machine-config"),
    (json.dumps({"boot-source": {"kernel_image_path": "/nonexistent/vmlinux"},
                 "drives": []}), "boot-source"),
])
def test_invalid_config_file_exits_152(capsys, tmp_path, content, message):
    cfg = tmp_path / "vm.json"
    cfg.write_text(content)
    sock = str(tmp_path / "api.sock")
    status, _, err = run(capsys, "--api-sock", sock, "--config-file", str(cfg))
    assert status == 152
    assert message in err
    assert not os.path.exists(sock)


def test_no_api_with_invalid_config_exits_152_without_a_socket(capsys, tmp_path):
    cfg = tmp_path / "vm.json"
    cfg.write_text("[]")
    status, _, err = run(capsys, "--no-api", "--config-file", str(cfg),
                         "--api-sock", str(tmp_path / "s"))
    assert status == 152
    assert "top level" in err
    assert not os.path.exists(tmp_path / "s")


def test_invalid_metadata_file_exits_152(capsys, tmp_path):
    md = tmp_path / "md.json"
    md.write_text("{oops")
    sock = str(tmp_path / "api.sock")
    status, _, err = run(capsys, "--api-sock", sock, "--metadata", str(md))
    assert status == 152 and "mmds content file" in err
    assert not os.path.exists(sock)


# -- the embervm entry point's dispatch -----------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["/usr/bin/firecracker", "--api-sock", "s"], True),
    (["/tmp/x/firecracker"], True),
    (["./firecracker-v1.16.1-x86_64", "--version"], True),
    (["/venv/bin/embervm", "--api-sock", "s"], True),
    (["/venv/bin/embervm", "--no-api", "--config-file", "c"], True),
    (["/src/embervm/__main__.py", "--api-sock", "s"], True),
    (["/venv/bin/embervm", "--help"], False),
    (["/venv/bin/embervm", "--version"], False),
    (["/venv/bin/embervm", "run", "--kernel", "k"], False),
    (["/venv/bin/embervm"], False),
    (["/venv/bin/pytest", "--timeout", "5"], False),
    (["/lib/pytest/__main__.py", "--api-sock", "s"], False),
    ([], False),
])
def test_embervm_dispatches_firecracker_invocations_only(argv, expected):
    from embervm.cli import _firecracker_invocation

    assert _firecracker_invocation(argv) is expected
