"""virtio-rng, the entropy device (virtio 1.2 §5.4, device ID 4).

One request queue, no device features, no config space.  The driver posts writable buffers;
the device fills them from the host kernel's CSPRNG (``os.getrandom``) and reports the count.
"""

from __future__ import annotations

import os

from . import spec
from .device import VirtioDevice
from .queue import DescriptorChain, Virtqueue

# Linux posts one buffer at a time (up to 64 bytes for hwrng reads, larger for /dev/hwrng
# reads); bound a single fill so a huge hostile buffer cannot stall the event loop.
MAX_FILL = 1 << 20


class Rng(VirtioDevice):
    device_type = spec.VIRTIO_ID_RNG
    name = "rng"
    queue_max_sizes = (256,)

    def __init__(self, source=os.getrandom) -> None:
        super().__init__()
        self._source = source
        self.metrics["bytes"] = 0

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        self.drain(queue, self._fill)

    def _fill(self, chain: DescriptorChain) -> int:
        writer = chain.writer()
        n = min(writer.remaining, MAX_FILL)
        if n:
            writer.write(self._source(n))
        self.metrics["bytes"] += n
        return n
