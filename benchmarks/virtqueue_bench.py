"""Per-chain cost of the device-side virtqueue hot path.

Measures, per descriptor chain, what every device does per request:

* ``pop``   - ``Virtqueue.pop()`` alone (ring read, chain walk, validation);
* ``full``  - ``pop()`` + ChainReader/ChainWriter work + ``add_used()`` + ``needs_interrupt()``.

Chain shapes: ``1 desc`` = one 64-byte writable buffer (virtio-rng), ``3 desc`` = 16-byte
readable header + 512-byte writable data + 1-byte writable status (a virtio-blk read), and the
same three buffers through one indirect table.  The driver side (``embervm.testing.rings``)
fills the ring between timed batches and is not counted.

Run: ``python benchmarks/virtqueue_bench.py`` (about 10 s).  Numbers are the median over
batches of one ring's worth of chains each, in microseconds per chain.
"""

from __future__ import annotations

import platform
import statistics
import struct
import sys
import time
from pathlib import Path

try:
    import embervm  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from embervm.devices.virtio.queue import make_queue
from embervm.memory import GuestMemory
from embervm.testing.rings import DriverPackedRing, DriverSplitRing, GuestAllocator, queue_config
from embervm.testing.rings import ring_features as features_for

RING_SIZE = 256
BATCHES = 400
HDR = struct.Struct("<IIQ")  # virtio-blk request header
DATA = bytes(range(256)) * 2  # 512 bytes
RNG = bytes(64)

SHAPES = {
    "1 desc": ([], [64], False),
    "3 desc": ([HDR.pack(0, 0, 8)], [512, 1], False),
    "3 desc indirect": ([HDR.pack(0, 0, 8)], [512, 1], True),
}


def _work(chain) -> int:
    """What a device does with a chain: parse the header, fill the writable part."""
    if chain.readable_len:
        chain.reader().read_struct(HDR)
        w = chain.writer()
        w.write(DATA)
        w.write(b"\0")
        return w.written
    w = chain.writer()
    w.write(RNG)
    return w.written


def bench(packed: bool, shape: str) -> tuple[float, float]:
    readable, writable, indirect = SHAPES[shape]
    mem = GuestMemory([(0, 16 << 20)])
    alloc = GuestAllocator(mem, 0x1000, 16 << 20)
    ring_cls = DriverPackedRing if packed else DriverSplitRing
    ring = ring_cls(mem, alloc, RING_SIZE)
    feats = features_for(packed=packed, indirect=indirect)
    q = make_queue(0, queue_config(ring), mem, feats)
    per_batch = RING_SIZE if indirect or shape == "1 desc" else RING_SIZE // 3
    pop_only: list[float] = []
    full: list[float] = []
    perf = time.perf_counter_ns
    for b in range(BATCHES):
        for _ in range(per_batch):
            ring.add(readable, writable, indirect=indirect)
        if b % 2:
            # pop() alone, then return the chains untimed.
            t0 = perf()
            chains = [q.pop() for _ in range(per_batch)]
            t1 = perf()
            for c in chains:
                q.add_used(c, 0)
            q.needs_interrupt()
            pop_only.append((t1 - t0) / per_batch / 1000)
        else:
            pop, add_used, needs_interrupt = q.pop, q.add_used, q.needs_interrupt
            t0 = perf()
            for _ in range(per_batch):
                chain = pop()
                add_used(chain, _work(chain))
                needs_interrupt()
            t1 = perf()
            full.append((t1 - t0) / per_batch / 1000)
        assert q.pop() is None
        ring.get_used()
    return statistics.median(pop_only), statistics.median(full)


def main() -> None:
    start = time.perf_counter()
    print(f"embervm virtqueue hot path, Python {platform.python_version()} ({sys.platform})")
    print(f"ring size {RING_SIZE}, {BATCHES} batches per row, median µs per chain\n")
    print(f"{'ring':8} {'chain':18} {'pop':>8} {'full':>8}")
    print("-" * 45)
    for packed in (False, True):
        for shape in SHAPES:
            pop_us, full_us = bench(packed, shape)
            name = "packed" if packed else "split"
            print(f"{name:8} {shape:18} {pop_us:8.2f} {full_us:8.2f}")
    print(f"\n(took {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
