"""virtio-rng end to end (``--rng``): the real guest uses embervm's entropy device as its hwrng.

One boot serves every assertion: the guest script reports what ``/sys/class/misc/hw_random``
shows, reads 1 MiB from ``/dev/hwrng`` and summarises it (two half checksums, gzip size, count of
non-zero bytes), then unbinds and re-binds ``virtio_rng`` through sysfs and reads again.  The
host only parses the summary lines from the serial console.
"""

from __future__ import annotations

import re

import pytest
from e2e_helpers import Run, run_embervm

from embervm.testing.initramfs import extend_initramfs

MIB = 1 << 20
AGAIN = 64 << 10

GUEST_SCRIPT = rf"""
hw=/sys/class/misc/hw_random
drv=/sys/bus/virtio/drivers/virtio_rng
echo "RNG-CURRENT [$(cat $hw/rng_current)] available [$(cat $hw/rng_available)]"
t0=$(cut -d' ' -f1 /proc/uptime)
head -c {MIB} /dev/hwrng > /tmp/r
echo "RNG-READ bytes=$(wc -c < /tmp/r) t0=$t0 t1=$(cut -d' ' -f1 /proc/uptime)"
echo "RNG-HALF1 $(head -c {MIB // 2} /tmp/r | sha256sum | cut -c1-64)"
echo "RNG-HALF2 $(tail -c {MIB // 2} /tmp/r | sha256sum | cut -c1-64)"
echo "RNG-GZIP $(gzip -c /tmp/r | wc -c)"
echo "RNG-NONZERO $(tr -d '\000' < /tmp/r | wc -c)"
dev=$(ls $drv | grep '^virtio')
echo "RNG-DEVICE [$dev]"
echo $dev > $drv/unbind
echo "RNG-UNBOUND status=$? current [$(cat $hw/rng_current)]"
echo $dev > $drv/bind
echo "RNG-REBOUND status=$? current [$(cat $hw/rng_current)]"
head -c {AGAIN} /dev/hwrng > /tmp/r2
echo "RNG-AGAIN bytes=$(wc -c < /tmp/r2) nonzero=$(tr -d '\000' < /tmp/r2 | wc -c)"
first=$(head -c {AGAIN} /tmp/r | sha256sum | cut -c1-64)
echo "RNG-AGAIN-SHA $(sha256sum < /tmp/r2 | cut -c1-64) first $first"
"""


@pytest.fixture(scope="module")
def rng_boot(kernel_full, initrd_busybox, tmp_path_factory) -> Run:
    d = tmp_path_factory.mktemp("rng")
    initrd = extend_initramfs(initrd_busybox, {"rng-test.sh": GUEST_SCRIPT.encode()},
                              d / "initrd.cpio")
    return run_embervm("run", "--kernel", str(kernel_full), "--initrd", str(initrd),
                       "--mem", "128", "--rng", "--serial", "stdio",
                       "--append", "guest.script=/rng-test.sh", timeout=600)


def _field(run: Run, pattern: str) -> re.Match[str]:
    m = re.search(pattern, run.console)
    assert m, f"no line matching {pattern!r}" + run.tail()
    return m


def test_guest_hwrng_is_the_virtio_device(rng_boot):
    m = _field(rng_boot, r"RNG-CURRENT \[(\S*)\] available \[([^\]]*)\]")
    assert re.fullmatch(r"virtio_rng\.\d+", m.group(1)), rng_boot.tail()
    assert m.group(1) in m.group(2).split(), rng_boot.tail()


def test_guest_reads_1mib_from_hwrng(rng_boot):
    m = _field(rng_boot, r"RNG-READ bytes=(\d+) t0=([\d.]+) t1=([\d.]+)")
    assert int(m.group(1)) == MIB, rng_boot.tail()
    print(f"guest read 1 MiB from /dev/hwrng in {float(m.group(3)) - float(m.group(2)):.1f} s")


def test_hwrng_data_is_not_zero_and_does_not_repeat(rng_boot):
    h1 = _field(rng_boot, r"RNG-HALF1 ([0-9a-f]{64})").group(1)
    h2 = _field(rng_boot, r"RNG-HALF2 ([0-9a-f]{64})").group(1)
    assert h1 != h2, "the two 512 KiB halves are identical" + rng_boot.tail()
    nonzero = int(_field(rng_boot, r"RNG-NONZERO (\d+)").group(1))
    # Uniform bytes: 1/256 of them are zero (4096 expected, sigma ~64).
    assert MIB * 255 // 256 - 1024 < nonzero < MIB, rng_boot.tail()


def test_hwrng_data_does_not_compress(rng_boot):
    gz = int(_field(rng_boot, r"RNG-GZIP (\d+)").group(1))
    assert gz >= MIB, f"gzip shrank 1 MiB of entropy to {gz} bytes" + rng_boot.tail()


def test_hwrng_works_after_unbind_and_bind(rng_boot):
    dev = _field(rng_boot, r"RNG-DEVICE \[(virtio\d+)\]").group(1)
    assert dev, rng_boot.tail()
    unbound = _field(rng_boot, r"RNG-UNBOUND status=(\d+) current \[(\S*)\]")
    assert unbound.group(1) == "0", rng_boot.tail()
    assert not unbound.group(2).startswith("virtio_rng"), rng_boot.tail()
    rebound = _field(rng_boot, r"RNG-REBOUND status=(\d+) current \[(\S*)\]")
    assert rebound.group(1) == "0", rng_boot.tail()
    assert re.fullmatch(r"virtio_rng\.\d+", rebound.group(2)), rng_boot.tail()
    again = _field(rng_boot, r"RNG-AGAIN bytes=(\d+) nonzero=(\d+)")
    assert int(again.group(1)) == AGAIN, rng_boot.tail()
    assert int(again.group(2)) > AGAIN * 255 // 256 - 512, rng_boot.tail()
    sha = _field(rng_boot, r"RNG-AGAIN-SHA ([0-9a-f]{64}) first ([0-9a-f]{64})")
    assert sha.group(1) != sha.group(2), "the re-bound device repeated earlier output" + (
        rng_boot.tail())


def test_guest_exits_cleanly(rng_boot):
    assert "guest: script exit status 0" in rng_boot.console, rng_boot.tail()
    assert rng_boot.status == 0, rng_boot.tail()
