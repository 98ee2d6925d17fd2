"""A virtio device of your own, in one file: an entropy source (virtio-rng, device ID 4) that
serves a xorshift64 stream from a seed you choose.  Deterministic "entropy" is useless for
security and perfect for tests: the host knows every byte the guest will read.

    from embervm import Machine
    from examples.xorshift_rng import XorshiftRng

    vm = Machine()
    vm.add_device(XorshiftRng(seed=42))      # the guest sees /dev/hwrng (virtio_rng)
    vm.start()

What a device needs: its virtio type, its queues' sizes, and ``process_queue``: pop each chain
the driver made available, write into it, and return it with the byte count.  ``drain`` does the
popping, the used-ring update and the interrupt, following the virtio rules.
"""

from __future__ import annotations

from embervm.devices.virtio.device import VirtioDevice
from embervm.devices.virtio.queue import DescriptorChain, Virtqueue

VIRTIO_ID_RNG = 4
MASK64 = (1 << 64) - 1


def xorshift64(state: int) -> int:
    state ^= state << 13 & MASK64
    state ^= state >> 7
    state ^= state << 17 & MASK64
    return state


def stream(seed: int, n: int) -> bytes:
    """The first ``n`` bytes a device seeded with ``seed`` serves (8 little-endian bytes per
    step)."""
    out = bytearray()
    state = seed
    while len(out) < n:
        state = xorshift64(state)
        out += state.to_bytes(8, "little")
    return bytes(out[:n])


class XorshiftRng(VirtioDevice):
    device_type = VIRTIO_ID_RNG
    name = "xorshift-rng"
    queue_max_sizes = (64,)

    def __init__(self, seed: int = 1) -> None:
        super().__init__()
        if not 0 < seed <= MASK64:
            raise ValueError("the seed must be a non-zero 64-bit number")
        self._state = seed
        self._spare = b""  # bytes of the last step not served yet

    def process_queue(self, index: int, queue: Virtqueue) -> None:
        self.drain(queue, self._fill)

    def _fill(self, chain: DescriptorChain) -> int:
        writer = chain.writer()
        want = min(writer.remaining, 4096)  # a bounded amount of work per request
        data = bytearray(self._spare)
        while len(data) < want:
            self._state = xorshift64(self._state)
            data += self._state.to_bytes(8, "little")
        self._spare = bytes(data[want:])
        writer.write(bytes(data[:want]))
        return writer.written
