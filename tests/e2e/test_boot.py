"""Boot the real Linux guest under embervm and check what it sees (issue: KVM VMM + virtio-blk).

Boots are shared: each fixture boots once and several tests assert on its result.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import termios
import time
from pathlib import Path

import pytest
from e2e_helpers import SHARED_PREBUILT, Run, embervm_cmd, fnv1a64, run_embervm, script_disk

READY = "GUEST-READY"


# -- boot 1: vmlinux (PVH) + tinyinit, 1 vCPU, an 8 MiB random disk read with O_DIRECT ---------

@pytest.fixture(scope="module")
def disk8(tmp_path_factory) -> tuple[Path, bytes]:
    data = os.urandom(8 << 20)
    p = tmp_path_factory.mktemp("d") / "random8.img"
    p.write_bytes(data)
    return p, data


@pytest.fixture(scope="module")
def tiny_boot(kernel_base, initrd_tiny, disk8) -> Run:
    return run_embervm("run", "--kernel", str(kernel_base), "--initrd", str(initrd_tiny),
                       "--mem", "128", "--disk", f"{disk8[0]},ro", "--serial", "stdio")


def test_vmlinux_boots_to_ready_marker(tiny_boot):
    assert READY in tiny_boot.console, tiny_boot.tail()


def test_guest_reads_8mib_disk_with_host_checksum(tiny_boot, disk8):
    _, data = disk8
    m = re.search(r"tinyinit: vda bytes=(\d+) fnv1a64=([0-9a-f]{16})", tiny_boot.console)
    assert m, tiny_boot.tail()
    assert int(m.group(1)) == len(data)
    assert int(m.group(2), 16) == fnv1a64(data), tiny_boot.tail()


def test_guest_reboot_exits_with_status_0(tiny_boot):
    assert tiny_boot.status == 0, tiny_boot.tail()


# -- boot 2: the embedded default guest (the demo path), 2 vCPUs, three disks -------------------

PATTERN = b"".join(b"EMBERVM-PATTERN-%06d\n" % i for i in range(4096))[: 64 << 10]

GUEST_SCRIPT = """
echo "cpus=$(grep -c ^processor /proc/cpuinfo)"
printf 'EMBERVM-PATTERN-%06d\\n' $(seq 0 4095) | head -c 65536 > /tmp/pattern
dd if=/tmp/pattern of=/dev/vdb bs=65536 count=1 conv=fsync 2>/dev/null
echo "rw-write-status=$?"
dd if=/tmp/pattern of=/dev/vdc bs=65536 count=1 conv=fsync 2>/dev/null
echo "ro-write-status=$?"
echo "ro-flag=$(cat /sys/block/vdc/ro)"
echo "vdc-head=$(head -c 16 /dev/vdc)"
echo "disks=$(ls /sys/block | tr '\\n' ' ')"
dev=$(basename $(readlink /sys/block/vdc/device))
echo $dev > /sys/bus/virtio/drivers/virtio_blk/unbind
echo "after-unbind=$(ls /sys/block | tr '\\n' ' ')"
echo $dev > /sys/bus/virtio/drivers/virtio_blk/bind
sleep 1
echo "rebound-head=$(head -c 16 /dev/$(ls /sys/bus/virtio/devices/$dev/block))"
"""


@pytest.fixture(scope="module")
def default_boot(tmp_path_factory) -> tuple[Run, Path, Path, bytes]:
    d = tmp_path_factory.mktemp("disks")
    script = script_disk(d / "script.img", GUEST_SCRIPT)
    rw = d / "rw.img"
    rw.write_bytes(b"\0" * (1 << 20))
    ro = d / "ro.img"
    ro_data = b"READONLY-CONTENT" * (65536 // 16)
    ro.write_bytes(ro_data)
    run = run_embervm("run", "--vcpus", "2", "--disk", f"{script},ro",
                      "--disk", f"{rw},id=rwdisk", "--disk", f"{ro},ro",
                      "--append", "guest.script=/dev/vda")
    return run, rw, ro, ro_data


def test_default_guest_boots_with_two_vcpus(default_boot):
    run = default_boot[0]
    assert READY in run.console, run.tail()
    assert "cpus=2" in run.console, run.tail()
    assert run.status == 0, run.tail()


def test_guest_written_pattern_is_on_the_host_disk(default_boot):
    run, rw, _, _ = default_boot
    assert "rw-write-status=0" in run.console, run.tail()
    assert rw.read_bytes()[: len(PATTERN)] == PATTERN, run.tail()


def test_read_only_disk_rejects_writes_and_file_is_unchanged(default_boot):
    run, _, ro, ro_data = default_boot
    assert "ro-flag=1" in run.console, run.tail()
    assert re.search(r"ro-write-status=[1-9]", run.console), run.tail()
    assert "vdc-head=READONLY-CONTENT" in run.console, run.tail()
    assert ro.read_bytes() == ro_data


def test_disk_unbind_and_rebind_in_the_live_guest(default_boot):
    """Reset and re-probe of a live virtio-blk device through sysfs keeps it working."""
    run = default_boot[0]
    m = re.search(r"after-unbind=(.*)", run.console)
    assert m and "vdc" not in m.group(1).split(), run.tail()
    assert "rebound-head=READONLY-CONTENT" in run.console, run.tail()


def test_all_disks_appear_in_the_guest(default_boot):
    run = default_boot[0]
    m = re.search(r"disks=(.*)", run.console)
    assert m, run.tail()
    assert {"vda", "vdb", "vdc"} <= set(m.group(1).split()), run.tail()


# -- boot 3: bzImage through the 64-bit boot protocol ------------------------------------------

@pytest.mark.skipif(not (SHARED_PREBUILT / "bzImage-base").exists(),
                    reason="the guest kit's bzImage-base is not beside this checkout")
def test_bzimage_boots_to_ready_marker(initrd_tiny):
    run = run_embervm("run", "--kernel", str(SHARED_PREBUILT / "bzImage-base"),
                      "--initrd", str(initrd_tiny), "--mem", "128", timeout=300)
    assert READY in run.console, run.tail()
    assert run.status == 0, run.tail()


# -- boot 4: SIGTERM while the guest runs, on a terminal ----------------------------------------

def test_sigterm_stops_cleanly_and_restores_the_terminal(kernel_base, initrd_tiny):
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        embervm_cmd("run", "--kernel", str(kernel_base), "--initrd", str(initrd_tiny),
                    "--mem", "128", "--append", "tinyinit.hang tinyinit.noblk"),
        stdin=slave, stdout=slave, stderr=subprocess.PIPE, close_fds=True,
    )
    out = b""
    try:
        deadline = time.monotonic() + 180
        while READY.encode() not in out and time.monotonic() < deadline:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            out += chunk
        assert READY.encode() in out, out.decode(errors="replace")[-2000:]
        raw = termios.tcgetattr(slave)
        assert not raw[3] & termios.ICANON  # embervm put the terminal in raw mode
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 128 + signal.SIGTERM, proc.stderr.read().decode(errors="replace")
    assert termios.tcgetattr(slave) == before
    os.close(master)
    os.close(slave)
