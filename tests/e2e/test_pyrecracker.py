"""A real Firecracker client from PyPI, unchanged, drives embervm: pyrecracker 0.6.4 execs
`sudo firecracker --api-sock S` from PATH, creates and addresses a TAP with `ip`, configures the
machine, boot source, a root drive and a network interface, starts the VM, pauses and resumes
it, and stops it with SendCtrlAltDel.

What the client needs from the host is provided here, without changing the client: a
`firecracker` on PATH (a symlink to embervm), a `sudo` that runs its arguments (we are root),
and a private network namespace (``ip netns``) for its TAP.  The guest boots the kit's busybox
userland from an ext4 root filesystem (``make rootfs``) on /dev/vda.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DRIVER = textwrap.dedent(r"""
    import json, os, re, sys, time
    sys.path.insert(0, sys.argv[5])
    from fc_client import Api, wait_for_socket
    from pyrecracker.vm import VMManager

    sock, kernel, rootfs, log = sys.argv[1:5]
    result = {}
    vm = VMManager(sock, kernel, firecracker_logs_path=log)
    proc = vm._VMManager__host_env._HostEnvironment__process_stack[0]  # to read its status
    wait_for_socket(sock, proc)  # the client itself does not wait for the socket
    vm.boot_args = "console=ttyS0 reboot=k panic=1 pci=off guest.nopoweroff"
    vm.path_on_host = rootfs
    vm.host_dev_name = "tap-pyre0"
    vm.guest_mac = "06:00:ac:10:00:02"
    vm.host_ip = "10.0.3.1"
    vm.guest_ip = "10.0.3.2"
    vm.host_env_cleanup_pause = 5
    vm.configure()
    vm.start()
    api = Api(sock)
    result["state_started"] = api.ok("GET", "/")["state"]
    deadline = time.monotonic() + 180
    while b"GUEST-READY" not in open(log, "rb").read():
        if time.monotonic() > deadline or proc.poll() is not None:
            result["log"] = open(log, "rb").read().decode(errors="replace")[-3000:]
            print(json.dumps(result)); sys.exit(1)
        time.sleep(0.2)
    result["booted"] = True
    vm.pause()
    result["state_paused"] = api.ok("GET", "/")["state"]
    vm.resume()
    result["state_resumed"] = api.ok("GET", "/")["state"]
    result["vm_config"] = api.ok("GET", "/vm/config")
    vm.stop()  # SendCtrlAltDel, a pause, then SIGTERM to whatever is left, rm the socket
    result["exit_status"] = proc.wait(timeout=30)
    result["log"] = open(log, "rb").read().decode(errors="replace")[-3000:]
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory) -> Path:
    from embervm.testing.rootfs import build_rootfs

    return build_rootfs(tmp_path_factory.mktemp("rootfs") / "rootfs.ext4")


@pytest.fixture(scope="module")
def run(tmp_path_factory, kernel_full, rootfs) -> dict:
    pytest.importorskip("pyrecracker")
    tmp = tmp_path_factory.mktemp("pyrecracker")
    bindir = tmp / "bin"
    bindir.mkdir()
    (bindir / "firecracker").symlink_to(Path(sys.executable).parent / "embervm")
    sudo = bindir / "sudo"
    sudo.write_text('#!/bin/sh\nexec "$@"\n')
    sudo.chmod(0o755)
    driver = tmp / "driver.py"
    driver.write_text(DRIVER)
    ns = f"embervm-pyre-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
        p = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, str(driver), str(tmp / "fc.sock"),
             str(kernel_full), str(rootfs), str(tmp / "firecracker.log"),
             str(Path(__file__).parent)],
            env=env, capture_output=True, timeout=400, cwd=tmp)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)
    lines = p.stdout.decode(errors="replace").strip().splitlines()
    assert lines, p.stderr.decode(errors="replace")[-3000:]
    try:
        result = json.loads(lines[-1])
    except ValueError:
        pytest.fail(p.stdout.decode()[-2000:] + p.stderr.decode(errors="replace")[-3000:])
    result["driver_status"] = p.returncode
    result["stderr"] = p.stderr.decode(errors="replace")[-3000:]
    return result


def test_pyrecracker_configures_and_boots_a_root_drive(run):
    assert run["driver_status"] == 0, run
    assert run["state_started"] == "Running"
    assert run["booted"], run.get("log")
    drives = run["vm_config"]["drives"]
    assert drives[0]["drive_id"] == "rootfs" and drives[0]["is_root_device"] is True
    assert run["vm_config"]["network-interfaces"][0]["host_dev_name"] == "tap-pyre0"


def test_pyrecracker_pauses_and_resumes(run):
    assert run["state_paused"] == "Paused"
    assert run["state_resumed"] == "Running"


def test_pyrecracker_stop_is_a_clean_guest_reboot(run):
    assert run["exit_status"] == 0, run["log"]
    assert "reboot: Restarting system" in run["log"] or "Restarting" in run["log"]
