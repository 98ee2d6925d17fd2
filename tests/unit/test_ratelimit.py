"""embervm.ratelimit: Firecracker's token-bucket arithmetic, driven by a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embervm.config import BucketConfig, RateLimitConfig
from embervm.ratelimit import BucketReduction, RateLimiter, TokenBucket, TokenType

MS = 1_000_000  # ns


class FakeClock:
    """Seconds as a float, stepped in exact integer nanoseconds."""

    def __init__(self) -> None:
        self.ns = 1_000_000 * 10**9  # far from zero, like a real monotonic clock

    def __call__(self) -> float:
        return self.ns / 1e9

    def step(self, ns: int) -> None:
        self.ns += ns


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def limiter(clock, bandwidth=None, ops=None) -> RateLimiter:
    return RateLimiter(RateLimitConfig(bandwidth=bandwidth, ops=ops), clock=clock)


# -- TokenBucket ---------------------------------------------------------------------------------


def test_bucket_starts_full_and_refuses_past_budget(clock):
    b = TokenBucket(1000, 1000, clock=clock)
    assert b.reduce(600) == BucketReduction.Success
    assert b.budget == 400
    assert b.reduce(401) == BucketReduction.Failure
    assert b.budget == 400  # a refusal takes nothing
    assert b.reduce(400) == BucketReduction.Success
    assert b.budget == 0


def test_refill_is_proportional_to_elapsed_time(clock):
    b = TokenBucket(1000, 1000, clock=clock)
    b.reduce(1000)
    clock.step(250 * MS)
    assert b.reduce(251) == BucketReduction.Failure  # 250 earned, not 251
    assert b.budget == 250
    assert b.reduce(250) == BucketReduction.Success
    assert b.budget == 0


def test_partial_refill_never_overfills(clock):
    b = TokenBucket(100, 1000, clock=clock)
    b.reduce(10)
    clock.step(500 * MS)
    assert b.reduce(95) == BucketReduction.Success  # 90 + 50 earned, capped at 100
    assert b.budget == 5


def test_fraction_of_a_token_is_carried_over(clock):
    # 2 tokens per 10 ms: 7.5 ms earn 1.5 tokens, 1 is credited and the half carried over,
    # so at 10 ms the second token is there (it would not be if the clock were reset to "now").
    b = TokenBucket(2, 10, clock=clock)
    b.reduce(2)
    clock.step(7_500_000)
    assert b.reduce(1) == BucketReduction.Success
    clock.step(2_500_000)
    assert b.reduce(1) == BucketReduction.Success
    assert b.reduce(1) == BucketReduction.Failure


def test_no_fraction_of_a_nanosecond_is_used_twice(clock):
    # 3.000001 tokens per ns: each 1 ns step earns 3 whole tokens and must use up the whole
    # nanosecond (the time charged is rounded up), or the same time would pay again next step.
    size = 3_000_001
    b = TokenBucket(size, 1, clock=clock)
    b.reduce(size)
    got = 0
    for _ in range(100):
        clock.step(1)
        for n in (6, 3):
            if b.reduce(n) == BucketReduction.Success:
                got += n
                break
    assert got <= 100 * size // MS
    assert b.reduce(1) == BucketReduction.Failure


def test_a_whole_refill_period_fills_the_bucket_and_no_more(clock):
    b = TokenBucket(100, 10, clock=clock)
    b.reduce(100)
    clock.step(10_000 * MS)
    assert b.reduce(100) == BucketReduction.Success
    assert b.reduce(1) == BucketReduction.Failure


def test_idle_full_bucket_keeps_earning_until_it_is_short(clock):
    # Firecracker's passive refill: the time a full bucket sat idle is credited at the first
    # request that finds it short, so right after a long idle period two sizes can be taken.
    b = TokenBucket(100, 1000, clock=clock)
    clock.step(5000 * MS)
    assert b.reduce(100) == BucketReduction.Success  # the full budget, no refill needed
    assert b.reduce(100) == BucketReduction.Success  # short: the idle time refills it
    assert b.reduce(1) == BucketReduction.Failure


def test_one_time_burst_is_spent_first_and_never_refilled(clock):
    b = TokenBucket(100, 100, 50, clock=clock)
    assert b.reduce(30) == BucketReduction.Success
    assert (b.one_time_burst, b.budget) == (20, 100)
    assert b.reduce(40) == BucketReduction.Success  # 20 from the burst, 20 from the budget
    assert (b.one_time_burst, b.budget) == (0, 80)
    clock.step(10_000 * MS)
    b.reduce(1)
    assert b.one_time_burst == 0
    assert b.initial_one_time_burst == 50


def test_a_request_paid_by_the_burst_restarts_the_refill_clock(clock):
    # Firecracker: while the burst pays, the time before it is not credited to the budget.
    b = TokenBucket(100, 1000, 50, clock=clock)
    clock.step(1000 * MS)
    assert b.reduce(50) == BucketReduction.Success  # all from the burst
    assert b.reduce(100) == BucketReduction.Success  # the full budget
    assert b.reduce(1) == BucketReduction.Failure  # the idle second before was not kept


def test_failure_after_a_partial_burst_keeps_the_burst_spent(clock):
    # Firecracker's behaviour: the burst taken towards a refused request is not given back.
    b = TokenBucket(10, 1000, 5, clock=clock)
    assert b.reduce(10) == BucketReduction.Success  # 5 burst + 5 budget
    assert b.reduce(8) == BucketReduction.Failure
    assert (b.one_time_burst, b.budget) == (0, 5)


def test_over_consumption_empties_the_bucket_and_reports_the_ratio(clock):
    b = TokenBucket(100, 1000, clock=clock)
    b.reduce(40)
    r = b.reduce(210)  # 60 in the bucket: 150 more than it held = 1.5 sizes
    assert r == BucketReduction.OverConsumption(1.5)
    assert r.granted
    assert b.budget == 0


def test_force_replenish_refills_burst_then_budget_within_limits(clock):
    b = TokenBucket(100, 1000, 10, clock=clock)
    b.reduce(5)
    b.force_replenish(50)
    assert (b.one_time_burst, b.budget) == (10, 100)  # capped at the initial burst
    b.reduce(10 + 70)
    b.force_replenish(500)
    assert b.budget == 100  # capped at the size


@pytest.mark.parametrize("size,refill", [(0, 100), (100, 0), (0, 0), (1, 2**64)])
def test_zero_size_or_refill_is_unlimited(clock, size, refill):
    b = TokenBucket(size, refill, clock=clock)
    assert b.unlimited
    assert b.reduce(10**15) == BucketReduction.Success
    lim = limiter(clock, bandwidth=BucketConfig(size, refill), ops=BucketConfig(size, refill))
    assert lim.unlimited and lim.bandwidth is None and lim.ops is None
    assert lim.consume(10**15, TokenType.BYTES) and lim.consume(10**15, TokenType.OPS)
    assert not lim.is_blocked()


def test_negative_parameters_are_refused(clock):
    with pytest.raises(ValueError):
        TokenBucket(-1, 10, clock=clock)


def test_default_clock_is_real_monotonic_time():
    b = TokenBucket(10, 1)
    b.reduce(10)
    import time

    time.sleep(0.002)  # two refill periods of real time (test only; the code never sleeps)
    assert b.reduce(10) == BucketReduction.Success


# -- RateLimiter ---------------------------------------------------------------------------------


def test_no_config_limits_nothing(clock):
    lim = RateLimiter(None, clock=clock)
    assert lim.unlimited
    assert lim.consume(10**12, TokenType.BYTES)
    assert lim.to_config() is None


def test_refused_consume_blocks_for_100ms_and_takes_nothing(clock):
    lim = limiter(clock, bandwidth=BucketConfig(1000, 1000))
    assert lim.consume(900, TokenType.BYTES)
    assert not lim.consume(200, TokenType.BYTES)
    assert lim.bandwidth.budget == 100
    assert lim.is_blocked()
    assert lim.wait_time() == pytest.approx(0.1)
    clock.step(40 * MS)
    assert lim.wait_time() == pytest.approx(0.06)
    # blocked: everything is refused, an unlimited token type and a tiny request too
    assert not lim.consume(1, TokenType.OPS)
    assert not lim.consume(1, TokenType.BYTES)
    clock.step(60 * MS)
    assert lim.wait_time() == 0.0
    lim.unblock()
    assert not lim.is_blocked()
    assert lim.consume(200, TokenType.BYTES)  # 100 left + 100 earned in 100 ms


def test_over_consumption_is_granted_then_blocks_for_the_debt(clock):
    lim = limiter(clock, bandwidth=BucketConfig(100, 1000))
    assert lim.consume(250, TokenType.BYTES)  # granted: 150 over = 1.5 refills
    assert lim.is_blocked()
    assert lim.wait_time() == pytest.approx(1.5)
    assert not lim.consume(1, TokenType.BYTES)
    clock.step(1500 * MS)
    assert lim.wait_time() == 0.0
    lim.unblock()
    assert lim.consume(100, TokenType.BYTES)  # a full refill period has passed


def test_over_consumption_delay_is_truncated_to_whole_ms(clock):
    lim = limiter(clock, bandwidth=BucketConfig(3, 10))
    assert lim.consume(4, TokenType.BYTES)  # 1 over of 3 = 3.33 ms -> 3 ms
    assert lim.wait_time() == pytest.approx(0.003)


def test_unblock_when_not_blocked_is_harmless(clock):
    lim = limiter(clock, ops=BucketConfig(1, 1000))
    lim.unblock()
    assert lim.consume(1, TokenType.OPS)
    assert lim.wait_time() == 0.0


def test_manual_replenish_undoes_a_charge(clock):
    lim = limiter(clock, bandwidth=BucketConfig(100, 1000), ops=BucketConfig(10, 1000))
    assert lim.consume(1, TokenType.OPS)
    assert lim.consume(80, TokenType.BYTES)
    assert not lim.consume(30, TokenType.BYTES)
    lim.manual_replenish(1, TokenType.OPS)  # the device gives back the op it charged
    assert lim.ops.budget == 10
    lim.manual_replenish(5, TokenType.BYTES)
    assert lim.bandwidth.budget == 25


def test_update_keeps_replaces_or_removes_buckets(clock):
    lim = limiter(clock, bandwidth=BucketConfig(100, 1000), ops=BucketConfig(10, 1000, 5))
    lim.consume(60, TokenType.BYTES)
    lim.consume(8, TokenType.OPS)
    bw, ops = lim.bandwidth, lim.ops
    lim.update(None)  # nothing to update
    assert lim.bandwidth is bw and lim.ops is ops
    lim.update(RateLimitConfig(bandwidth=None, ops=BucketConfig(20, 500)))
    assert lim.bandwidth is bw and bw.budget == 40  # left out: kept with its state
    assert lim.ops is not ops
    assert (lim.ops.size, lim.ops.refill_time_ms, lim.ops.budget) == (20, 500, 20)  # full
    lim.update(RateLimitConfig(bandwidth=BucketConfig(0, 0)))
    assert lim.bandwidth is None  # size 0: removed
    assert lim.ops is not None
    lim.update(RateLimitConfig(ops=BucketConfig(5, 0)))
    assert lim.unlimited


def test_update_leaves_a_pending_block_to_the_retry_timer(clock):
    lim = limiter(clock, ops=BucketConfig(1, 1000))
    lim.consume(1, TokenType.OPS)
    assert not lim.consume(1, TokenType.OPS)
    lim.update(RateLimitConfig(ops=BucketConfig(100, 1000)))
    assert lim.is_blocked()  # the device's retry lifts it
    lim.unblock()
    assert lim.consume(50, TokenType.OPS)


def test_to_config_reports_the_buckets(clock):
    lim = limiter(clock, bandwidth=BucketConfig(100, 1000, 7))
    lim.consume(50, TokenType.BYTES)
    assert lim.to_config() == RateLimitConfig(bandwidth=BucketConfig(100, 1000, 7), ops=None)


# -- properties ----------------------------------------------------------------------------------

SIZE = st.integers(1, 10_000)
REFILL_MS = st.integers(1, 2_000)
BURST = st.integers(0, 20_000)


def _check_windows(grants, refill_ms, bound_at) -> None:
    """For every window [t_i, t_j] between two grants, tokens granted in it * refill_ns stay
    within ``bound_at(window_ns, over-consumptions in it)`` (integers only, no float error)."""
    refill_ns = refill_ms * MS
    for i, (ti, _, _) in enumerate(grants):
        total = over = 0
        for tj, n, was_over in grants[i:]:
            total += n
            over += was_over
            assert total * refill_ns <= bound_at(tj - ti, over), (i, tj - ti, total)


@settings(max_examples=300, deadline=None)
@given(size=SIZE, refill_ms=REFILL_MS, burst=BURST, data=st.data())
def test_granted_tokens_never_exceed_the_rate(size, refill_ms, burst, data):
    clock = FakeClock()
    lim = limiter(clock, bandwidth=BucketConfig(size, refill_ms, burst))
    grants = []
    ops = data.draw(st.lists(st.one_of(
        st.tuples(st.just("consume"), st.integers(1, size)),
        st.tuples(st.just("step"), st.integers(0, 3 * refill_ms * MS)),
        st.tuples(st.just("unblock"), st.just(0)),  # a driver that even unblocks too early
    ), max_size=60))
    for op, n in ops:
        if op == "consume":
            if lim.consume(n, TokenType.BYTES):
                grants.append((clock.ns, n, 0))
        elif op == "step":
            clock.step(n)
        else:
            lim.unblock()
    refill_ns = refill_ms * MS
    # size * window / refill + burst + 2 * size, scaled by refill_ns: a bucket that sat full
    # has also been earning (Firecracker refills only when a request finds it short), so at one
    # instant up to 2 * size can be taken (test_idle_full_bucket_... below)
    _check_windows(grants, refill_ms,
                   lambda window, over: (burst + 2 * size) * refill_ns + size * window)


@settings(max_examples=300, deadline=None)
@given(size=SIZE, refill_ms=REFILL_MS, burst=BURST, data=st.data())
def test_over_consumption_debt_is_enforced_by_the_block(size, refill_ms, burst, data):
    # Oversized requests are granted but block the limiter for their debt.  Firecracker's
    # bucket keeps refilling while blocked, so the long-run rate may reach twice the bucket
    # rate, never more; each over-consumption may also come up to 1 ms early (truncation).
    clock = FakeClock()
    lim = limiter(clock, bandwidth=BucketConfig(size, refill_ms, burst))
    max_request = 4 * size
    grants = []
    ops = data.draw(st.lists(st.one_of(
        st.tuples(st.just("consume"), st.integers(1, max_request)),
        st.tuples(st.just("step"), st.integers(0, 3 * refill_ms * MS)),
        st.tuples(st.just("retry"), st.just(0)),  # an honest device: unblock when due
    ), max_size=60))
    for op, n in ops:
        if op == "consume":
            was_blocked = lim.is_blocked()
            if lim.consume(n, TokenType.BYTES):
                assert not was_blocked
                grants.append((clock.ns, n, int(lim.is_blocked())))
            else:
                assert lim.is_blocked() and lim.wait_time() >= 0
        elif op == "step":
            clock.step(n)
        elif lim.wait_time() == 0:
            lim.unblock()
    refill_ns = refill_ms * MS
    _check_windows(grants, refill_ms, lambda window, over: (
        (burst + 2 * size + max_request) * refill_ns + 2 * size * window
        + over * (size * MS + refill_ns)))
