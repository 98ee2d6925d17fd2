"""Hostile-driver fuzzing of the virtio core: ``python -m embervm.testing.fuzz --examples N``.

Two targets, each a function of one byte string (so hypothesis, a random generator or a
coverage-guided fuzzer can drive them):

* :func:`embervm.testing.rings.fuzz_queue_once`: arbitrary ring layouts, descriptor tables and
  indices against the split/packed queues;
* :func:`fuzz_transport_once`: arbitrary register accesses of any width against the MMIO
  transport of a real device (virtio-rng and an echo device), with the guest scribbling over its
  rings between accesses; half of the inputs start from a correct Linux probe so the deep states
  (DRIVER_OK, live queues, QueueReset) are reached.

The only acceptable outcome of guest input is a state change, an error status or
DEVICE_NEEDS_RESET: any exception that escapes is a bug and stops the run with the input that
caused it.
"""

from __future__ import annotations

import argparse
import logging
import random
import struct
import sys
import time

from ..devices.virtio import spec
from ..devices.virtio.device import VirtioDevice
from ..devices.virtio.mmio import MmioTransport
from ..devices.virtio.queue import DescriptorChain, Virtqueue
from ..devices.virtio.rng import Rng
from ..memory import GuestMemory
from .driver import MmioDriver
from .rings import GuestAllocator, fuzz_queue_once

_MEM_SIZE = 0x10000
_REGS = (
    spec.DEVICE_FEATURES_SEL, spec.DRIVER_FEATURES, spec.DRIVER_FEATURES_SEL, spec.QUEUE_SEL,
    spec.QUEUE_NUM, spec.QUEUE_READY, spec.QUEUE_NOTIFY, spec.INTERRUPT_ACK, spec.STATUS,
    spec.QUEUE_DESC_LOW, spec.QUEUE_DESC_HIGH, spec.QUEUE_DRIVER_LOW, spec.QUEUE_DRIVER_HIGH,
    spec.QUEUE_DEVICE_LOW, spec.QUEUE_DEVICE_HIGH, spec.QUEUE_RESET, spec.SHM_SEL,
    spec.GUEST_PAGE_SIZE, spec.QUEUE_ALIGN, spec.QUEUE_PFN, spec.CONFIG, spec.CONFIG + 4,
)
_OP = struct.Struct("<BBI")


class _Echo(VirtioDevice):
    device_type = 0x7F
    name = "fuzz-echo"
    queue_max_sizes = (8, 4)

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        self.drain(queue, self._echo)

    def _echo(self, chain: DescriptorChain) -> int:
        return chain.writer().write(chain.reader().read(4096))


_mem: GuestMemory | None = None
_ZERO = bytes(_MEM_SIZE)


def fuzz_transport_once(data: bytes) -> None:
    """Drive one transport with register accesses decoded from ``data`` (6 bytes each)."""
    global _mem
    if len(data) < 2:
        return
    if _mem is None:
        _mem = GuestMemory([(0, _MEM_SIZE)])
    mem = _mem
    mem.regions[0].view[:] = _ZERO
    sel = data[0]
    device: VirtioDevice = Rng(source=lambda n: b"\xa5" * n) if sel & 1 else _Echo()
    t = MmioTransport(device, mem, legacy=bool(sel & 2), packed=bool(sel & 4),
                      notification_data=bool(sel & 8))
    if sel & 0x10:
        # Start from a correct probe so that the live states are fuzzed too.
        drv = MmioDriver(t, mem, GuestAllocator(mem, 0x1000, _MEM_SIZE))
        drv.probe()
        drv.log.clear()
        for i in range(len(drv.rings)):
            drv.submit(i, [b"x" * (sel >> 5)], [16], kick=False)
    pos = 1
    n = 0
    while pos + _OP.size <= len(data) and n < 256:
        kind, widx, value = _OP.unpack_from(data, pos)
        pos += _OP.size
        n += 1
        width = (1, 2, 4, 8, 4, 4, 3, 4)[widx & 7]
        if kind < 200:
            offset = _REGS[kind % len(_REGS)] if kind < 180 else (value >> 20) & 0xFFF
            if widx & 0x80:
                t.read(offset, width)
            else:
                t.write(offset, width, value)
        else:
            # The guest scribbles on its own memory (rings, descriptors, buffers) meanwhile.
            mem.write_u32((value % (_MEM_SIZE - 4)) & ~3, value ^ (kind << 24))


def _run(target: str, examples: int, seed: int, max_len: int) -> int:
    rng = random.Random(seed)
    fns = {"queue": fuzz_queue_once, "transport": fuzz_transport_once}
    names = list(fns) if target == "all" else [target]
    done = 0
    t0 = time.monotonic()
    last = t0
    for i in range(examples):
        name = names[i % len(names)]
        data = rng.randbytes(rng.randint(1, max_len))
        try:
            fns[name](data)
        except Exception:
            print(f"fuzz: {name} failed on example {i} (seed {seed}); input: {data.hex()}",
                  file=sys.stderr)
            raise
        done += 1
        now = time.monotonic()
        if now - last > 30:
            print(f"fuzz: {done} examples, {done / (now - t0):.0f}/s", file=sys.stderr)
            last = now
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m embervm.testing.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--target", choices=("all", "queue", "transport"), default="all")
    ap.add_argument("--max-len", type=int, default=1024)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    # Hostile input logs warnings by design; the rate limiter bounds them, the run hides them.
    logging.disable(logging.CRITICAL)
    t0 = time.monotonic()
    done = _run(args.target, args.examples, seed, args.max_len)
    dt = time.monotonic() - t0
    print(f"fuzz: ran {done} examples (target {args.target}, seed {seed}) in {dt:.1f} s, "
          f"no escaping exception")
    return 0


if __name__ == "__main__":
    sys.exit(main())
