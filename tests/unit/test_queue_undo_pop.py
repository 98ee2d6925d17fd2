"""Virtqueue.undo_pop: a popped chain put back (rate limiting), split and packed rings."""

from __future__ import annotations

import pytest

from embervm.devices.virtio.queue import ChainError, PackedQueue, SplitQueue
from embervm.devices.virtio.spec import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from embervm.memory import GuestMemory
from embervm.testing.rings import GuestAllocator, driver_and_queue

MEM_SIZE = 1 << 20


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory([(0, MEM_SIZE)])


@pytest.fixture
def alloc(mem: GuestMemory) -> GuestAllocator:
    return GuestAllocator(mem, 0x1000, MEM_SIZE)


def _same(a, b) -> bool:
    return (a.head, a.ndesc, a.readable, a.writable) == (b.head, b.ndesc, b.readable, b.writable)


def _state(q) -> int:
    return q.last_avail_idx if isinstance(q, SplitQueue) else q.next_avail


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_undo_pop_returns_the_same_chain_again(mem, alloc, packed, indirect):
    ring, q = driver_and_queue(mem, alloc, 16, packed=packed, indirect=indirect)
    tokens = [ring.add([b"hdr%d" % i], [16, 1], indirect=indirect) for i in range(3)]
    first = q.pop()
    before = _state(q)
    q.undo_pop(first)
    again = q.pop()
    assert _same(first, again)
    assert _state(q) == before
    assert again.reader().read() == b"hdr0"
    # The rest of the ring is untouched, and every chain completes exactly once.
    rest = [q.pop(), q.pop()]
    assert q.pop() is None
    for c in [again, *rest]:
        q.add_used(c, 0)
    assert [t for t, _n, _b in ring.get_used()] == tokens


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_undo_pop_of_the_last_chain_makes_the_ring_non_empty_again(mem, alloc, packed):
    ring, q = driver_and_queue(mem, alloc, 4, packed=packed)
    ring.add([b"x"], [1])
    chain = q.pop()
    assert not q.has_available()
    q.undo_pop(chain)
    assert q.has_available()
    assert _same(q.pop(), chain)


def test_split_undo_pop_across_ring_slot_and_index_wrap(mem, alloc):
    ring, q = driver_and_queue(mem, alloc, 4)
    assert isinstance(q, SplitQueue)
    buf = alloc.alloc(16)
    ring.claim(0)
    ring.write_desc(0, buf, 16, VIRTQ_DESC_F_WRITE)
    # Walk the free-running avail index up to 0xffff with the raw driver operations (the
    # same descriptor published over and over), so the next pop crosses 0xffff -> 0.
    for _ in range(0xFFFF):
        ring.publish(0)
        assert q.pop() is not None
    assert q.last_avail_idx == 0xFFFF
    ring.publish(0)
    chain = q.pop()
    assert q.last_avail_idx == 0
    q.undo_pop(chain)
    assert q.last_avail_idx == 0xFFFF
    assert q.has_available()
    assert _same(q.pop(), chain)
    assert q.last_avail_idx == 0


def test_packed_undo_pop_of_a_chain_that_straddles_the_ring_end(mem, alloc):
    ring, q = driver_and_queue(mem, alloc, 8, packed=True)
    assert isinstance(q, PackedQueue)
    for _ in range(6):  # slots 0..5 used: the next chain starts at slot 6, wrap 1
        ring.add([], [1])
        q.add_used(q.pop(), 0)
    ring.get_used()
    ring.add([b"h"], [8, 1])  # slots 6, 7 and 0: the wrap counter flips inside the chain
    assert q.next_avail == 6 | 1 << 15
    chain = q.pop()
    assert chain.ndesc == 3
    assert q.next_avail == 1 | 0 << 15
    q.undo_pop(chain)
    assert q.next_avail == 6 | 1 << 15
    again = q.pop()
    assert _same(again, chain)
    q.add_used(again, 1)
    assert len(ring.get_used()) == 1


def test_packed_undo_pop_of_a_chain_that_ends_exactly_at_the_ring_end(mem, alloc):
    ring, q = driver_and_queue(mem, alloc, 4, packed=True)
    for _ in range(2):
        ring.add([], [1])
        q.add_used(q.pop(), 0)
    ring.get_used()
    ring.add([b"h"], [1])  # slots 2, 3: ends at the end, next_avail is slot 0 of lap 0
    chain = q.pop()
    assert q.next_avail == 0
    q.undo_pop(chain)
    assert q.next_avail == 2 | 1 << 15
    assert _same(q.pop(), chain)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_undo_pop_twice_is_refused_and_changes_nothing(mem, alloc, packed):
    ring, q = driver_and_queue(mem, alloc, 8, packed=packed)
    ring.add([b"a"], [1])
    ring.add([b"b"], [1])
    chain = q.pop()
    q.undo_pop(chain)
    state = _state(q)
    with pytest.raises(ValueError):
        q.undo_pop(chain)
    assert _state(q) == state


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_undo_pop_of_an_older_chain_is_refused(mem, alloc, packed):
    ring, q = driver_and_queue(mem, alloc, 8, packed=packed)
    ring.add([b"a"], [1])
    ring.add([b"b"], [1])
    older = q.pop()
    q.pop()
    state = _state(q)
    with pytest.raises(ValueError):
        q.undo_pop(older)
    assert _state(q) == state


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_undo_pop_of_a_chain_from_another_queue_is_refused(mem, alloc, packed):
    # Both queues just popped their first chain, so the positions agree: only the guest
    # memory the chain belongs to tells them apart.
    ring_a, qa = driver_and_queue(mem, alloc, 8, packed=packed)
    ring_a.add([b"a"], [1])
    chain_a = qa.pop()
    other = GuestMemory([(0, MEM_SIZE)])
    ring_c, qc = driver_and_queue(other, GuestAllocator(other, 0x1000, MEM_SIZE), 8, packed=packed)
    ring_c.add([b"c"], [1])
    qc.pop()
    state = _state(qc)
    with pytest.raises(ValueError):
        qc.undo_pop(chain_a)
    assert _state(qc) == state


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_chain_error_stub_cannot_be_undone(mem, alloc, packed):
    ring, q = driver_and_queue(mem, alloc, 8, packed=packed)
    if packed:
        ring.add_raw([(MEM_SIZE * 4, 16, VIRTQ_DESC_F_WRITE)], ident=0)  # buffer outside RAM
    else:
        ring.claim(0, 1)
        ring.write_desc(0, 0x2000, 16, VIRTQ_DESC_F_NEXT, 1)
        ring.write_desc(1, MEM_SIZE * 4, 16, VIRTQ_DESC_F_WRITE)
        ring.publish(0)
    with pytest.raises(ChainError) as err:
        q.pop()
    state = _state(q)
    assert err.value.chain is not None
    with pytest.raises(ValueError):
        q.undo_pop(err.value.chain)
    assert _state(q) == state
    assert q.pop() is None  # the bad chain stays consumed
