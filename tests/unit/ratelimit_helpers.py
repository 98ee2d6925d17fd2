"""Rate-limiter helpers shared by the device tests: bucket shorthands and a spying limiter."""

from __future__ import annotations

from embervm.config import BucketConfig, RateLimitConfig


class Spy:
    """A RateLimiter that records the token counts asked of ``consume``."""

    def __init__(self, limiter) -> None:
        self.limiter = limiter
        self.calls: list[int] = []

    def consume(self, tokens, kind) -> bool:
        self.calls.append(tokens)
        return self.limiter.consume(tokens, kind)

    def __getattr__(self, name):
        return getattr(self.limiter, name)


def ops(size: int, refill_ms: int) -> RateLimitConfig:
    return RateLimitConfig(ops=BucketConfig(size=size, refill_time_ms=refill_ms))


def bandwidth(size: int, refill_ms: int) -> RateLimitConfig:
    return RateLimitConfig(bandwidth=BucketConfig(size=size, refill_time_ms=refill_ms))
