"""Bad user input: one line saying what to fix, exit status 2, no traceback."""

from __future__ import annotations

import subprocess

import pytest
from e2e_helpers import embervm_cmd


def embervm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(embervm_cmd(*args), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--kernel", "/nonexistent/vmlinux"], "no such file"),
        (["run", "--initrd", "/"], "is a directory"),
        (["run", "--mem", "0"], "--mem"),
        (["run", "--mem", "lots"], "lots"),
        (["run", "--vcpus", "0"], "--vcpus"),
        (["run", "--vcpus", "99"], "--vcpus"),
        (["run", "--disk", "/nonexistent.img"], "no such file"),
        (["run", "--disk", "/etc/hostname,bogus"], "unknown option"),
        (["run", "--serial", "tcp:1"], "--serial"),
        (["run", "--kernel", "/etc/hostname"], "kernel"),
        (["run", "--disk", "/nonexistent.ext4,root"], "no such file"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        ([], "expected a command"),
    ],
)
def test_bad_input_gives_one_line_error_and_status_2(args, needle):
    p = embervm(*args)
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("embervm: error: ") and p.stderr.count("\n") == 1, p.stderr


def test_help_and_version():
    p = embervm("run", "--help")
    assert p.returncode == 0 and "Boot a VM" in p.stdout and "PATH[,ro][,root][,id=ID]" in p.stdout
    p = embervm("--version")
    assert p.returncode == 0 and p.stdout.startswith("embervm, version ")
