"""The MMDS data store: the JSON document behind Firecracker's ``/mmds`` API (GET, PUT, PATCH).

It follows Firecracker's data store (``src/vmm/src/mmds/data_store.rs``):

* the store starts *uninitialised*: GET answers ``{}``, PATCH is refused until a PUT (or
  ``--metadata``) has stored something;
* PUT replaces the whole document, PATCH applies a JSON merge patch (RFC 7396);
* the size limit (``--mmds-size-limit``, 51200 bytes by default) is checked on the compact
  JSON serialisation of the *resulting* document; a refused update leaves the store unchanged
  and the API answers 413.

The in-guest metadata service (the MMDS network stack that answers the guest's HTTP requests
on 169.254.169.254) is not implemented yet; this module is only the store.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from .errors import ConfigError

#: Firecracker's default ``--mmds-size-limit`` (the same as its HTTP payload limit)
DEFAULT_LIMIT_BYTES = 51200


class MmdsError(ConfigError):
    """A refused MMDS update (bad input from the API user)."""


class MmdsLimitExceeded(MmdsError):
    """The update would make the document larger than the store's limit (HTTP 413)."""

    def __init__(self) -> None:
        super().__init__("The MMDS patch request doesn't fit.")


class MmdsNotInitialized(MmdsError):
    """PATCH before anything was PUT."""

    def __init__(self) -> None:
        super().__init__("The MMDS data store is not initialized.")


def merge_patch(target: Any, patch: Any) -> Any:
    """Return ``target`` with the JSON merge patch ``patch`` applied (RFC 7396 section 2).

    An object patch is merged key by key (a ``null`` value deletes the key, anything else is
    merged recursively); any other patch value replaces the target.  ``target`` is not
    modified: the result shares no mutable parts with the inputs that the caller could change.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def encoded_size(value: Any) -> int:
    """The length in bytes of ``value``'s compact JSON encoding (what the limit counts)."""
    import msgspec

    return len(msgspec.json.encode(value))


class MmdsStore:
    """One MMDS document with a size limit; safe to use from several threads."""

    def __init__(self, limit_bytes: int = DEFAULT_LIMIT_BYTES) -> None:
        if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int) or limit_bytes < 0:
            raise ConfigError(f"MMDS size limit {limit_bytes!r}: expected a byte count >= 0")
        self.limit_bytes = limit_bytes
        self._data: Any = None
        self._initialized = False
        self._lock = threading.Lock()

    @property
    def initialized(self) -> bool:
        """True once a PUT stored a document."""
        return self._initialized

    def get(self) -> Any:
        """A copy of the document; ``{}`` while uninitialised (Firecracker answers ``{}`` for
        its null document)."""
        with self._lock:
            if self._data is None:
                return {}
            return copy.deepcopy(self._data)

    def put(self, value: Any) -> None:
        """Replace the document (any JSON value, as Firecracker accepts).  Raises
        :class:`MmdsLimitExceeded` when it is larger than the limit."""
        if encoded_size(value) > self.limit_bytes:
            raise MmdsLimitExceeded()
        value = copy.deepcopy(value)
        with self._lock:
            self._data = value
            self._initialized = True

    def patch(self, patch: Any) -> None:
        """Apply a JSON merge patch.  Raises :class:`MmdsNotInitialized` before the first
        PUT and :class:`MmdsLimitExceeded` (store unchanged) when the result is too large."""
        with self._lock:
            if not self._initialized:
                raise MmdsNotInitialized()
            result = merge_patch(self._data, patch)
            if encoded_size(result) > self.limit_bytes:
                raise MmdsLimitExceeded()
            self._data = result
