"""Rate-limited logging for guest-triggered paths.

A guest can hit a bad register or post a malformed request millions of times; the host log must
not grow with it (seed audit #13).  :class:`RateLimitedLog` logs the first occurrence of each
cause, then only every power-of-two occurrence with the running count.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable


class RateLimitedLog:
    """Log each cause once, then at counts 2, 4, 8, ... (with the count)."""

    __slots__ = ("_logger", "_counts", "_lock", "max_causes")

    def __init__(self, logger: logging.Logger, max_causes: int = 1024) -> None:
        self._logger = logger
        self._counts: dict[Hashable, int] = {}
        self._lock = threading.Lock()
        self.max_causes = max_causes

    def log(self, level: int, cause: Hashable, msg: str, *args: object) -> bool:
        """Count ``cause``; emit ``msg`` when the count is a power of two. True if emitted."""
        with self._lock:
            n = self._counts.get(cause, 0) + 1
            if n == 1 and len(self._counts) >= self.max_causes:
                cause = ("<other causes>",)
                n = self._counts.get(cause, 0) + 1
            self._counts[cause] = n
        if n & (n - 1):
            return False
        if n > 1:
            msg = msg + " (seen %d times)"
            args = (*args, n)
        self._logger.log(level, msg, *args)
        return True

    def warning(self, cause: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, cause, msg, *args)

    def debug(self, cause: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.DEBUG, cause, msg, *args)

    def count(self, cause: Hashable) -> int:
        return self._counts.get(cause, 0)
