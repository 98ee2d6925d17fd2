"""The Python API on a real guest, one boot for every assertion: a user-written virtio device
(examples/xorshift_rng.py) serves the guest's /dev/hwrng, pause stops the guest (a counter loop
does not advance for 5 s) and resume continues it, a drive swapped on the running VM shows the
guest its new size and data, and Ctrl-Alt-Del on the i8042 keyboard makes Linux reboot, which
ends the VM with status 0."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from e2e_helpers import ConsoleLog, Record, StepFailed, script_disk

from embervm import Machine
from embervm.config import DiskConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.xorshift_rng import XorshiftRng, stream  # noqa: E402

SEED = 0x1234_5678_9ABC_DEF1
SCRIPT = r"""
echo "HWRNG $(cat /sys/class/misc/hw_random/rng_current) \
$(head -c 64 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
size0=$(cat /sys/block/vdb/size)
echo "DATA0 $size0 $(dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | head -c 16)"
i=0
while :; do
    i=$((i+1))
    echo "tick $i"
    s=$(cat /sys/block/vdb/size)
    if [ "$s" != "$size0" ]; then
        echo "DATA1 $s $(dd if=/dev/vdb bs=512 count=1 iflag=direct 2>/dev/null | head -c 16)"
        size0=$s
    fi
    sleep 0.2
done
"""


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, kernel_full, initrd_busybox) -> Record:
    tmp = tmp_path_factory.mktemp("machine")
    rec = Record()
    console = ConsoleLog()
    old = tmp / "old.img"
    old.write_bytes(b"OLD-IMAGE-DATA!!".ljust(1 << 20, b"\0"))
    new = tmp / "new.img"
    new.write_bytes(b"NEW-IMAGE-DATA!!".ljust(2 << 20, b"\0"))
    vm = Machine(kernel_full, initrd=initrd_busybox, mem_mib=128, serial_out=console.write,
                 append="guest.script=/dev/vda")
    vm.add_drive(DiskConfig(script_disk(tmp / "script.img", SCRIPT), id="script",
                            read_only=True))
    vm.add_drive(DiskConfig(old, id="data"))
    vm.add_device(XorshiftRng(seed=SEED))
    try:
        rec.step = "boot"
        vm.start()
        rec.values["cmdline"] = " ".join(vm.vmm.cmdline.split())
        m = console.wait_for(r"HWRNG (\S+) ([0-9a-f]{128})", 120)
        rec.values["hwrng"] = (m.group(1), bytes.fromhex(m.group(2)))
        m = console.wait_for(r"DATA0 (\d+) (\S*)\r?\n", 30)
        rec.values["data0"] = (int(m.group(1)), m.group(2))
        console.wait_for(r"tick 3\r?\n", 60)

        rec.step = "pause"
        vm.pause()
        rec.values["paused_state"] = vm.state
        before = len(console.data)
        time.sleep(5)
        rec.values["bytes_while_paused"] = len(console.data) - before
        last = int(re.findall(r"tick (\d+)\r?\n", console.text())[-1])
        rec.values["tick_at_pause"] = last

        rec.step = "resume"
        vm.resume()
        rec.values["resumed_state"] = vm.state
        console.wait_for(rf"tick {last + 2}\r?\n", 30)
        rec.values["resumed"] = True

        rec.step = "drive swap"
        vm.update_drive("data", path=new)
        m = console.wait_for(r"DATA1 (\d+) (\S*)\r?\n", 30)
        rec.values["data1"] = (int(m.group(1)), m.group(2))

        rec.step = "ctrl-alt-del"
        t0 = time.monotonic()
        vm.ctrl_alt_del()
        rec.exit_status = vm.wait(timeout=60)
        rec.values["exit_status"] = rec.exit_status
        rec.values["exit_seconds"] = time.monotonic() - t0
        rec.values["exit_reason"] = vm.exit_reason
    except StepFailed as e:
        rec.failure = str(e)
    finally:
        vm.close()
        rec.console = console.text().splitlines()
    return rec


def test_user_written_device_serves_the_guests_hwrng(scenario):
    name, data = scenario.get("hwrng")
    assert name == "virtio_rng.0"
    # Linux's hwrng core reads some bytes itself when the device registers (early
    # randomness): what the shell read is a later stretch of the device's stream.
    assert data in stream(SEED, 1 << 16)


def test_pause_stops_the_guest_and_resume_continues_it(scenario):
    assert scenario.get("paused_state") == "Paused"
    assert scenario.get("bytes_while_paused") == 0
    assert scenario.get("resumed_state") == "Running"
    assert scenario.get("resumed")


def test_drive_swap_shows_the_guest_the_new_size_and_data(scenario):
    assert scenario.get("data0") == ((1 << 20) >> 9, "OLD-IMAGE-DATA!!"), scenario.tail()
    assert scenario.get("data1") == ((2 << 20) >> 9, "NEW-IMAGE-DATA!!"), scenario.tail()


def test_ctrl_alt_del_reboots_the_guest_and_ends_the_vm_with_status_0(scenario):
    assert scenario.get("exit_status") == 0, scenario.get("exit_reason")
    assert "i8042" in scenario.get("exit_reason")


def test_host_profile_words_only_on_a_pvm_host(scenario):
    from embervm.host import host_profile

    cmdline = scenario.get("cmdline")
    assert ("noxsave" in cmdline) == (host_profile().name == "pvm")
