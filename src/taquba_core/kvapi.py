"""Validation of the caller KV namespace (keys are stored under ``usr:``)."""

from __future__ import annotations

from collections.abc import Mapping

from .errors import InvalidArgument, KvValueTooLarge

MAX_KV_VALUE_SIZE = 256 * 1024
"""Largest caller KV value, in bytes (256 KiB)."""


def check_kv_key(key: object) -> bytes:
    """Return ``key`` when it is bytes (any bytes, the empty key included)."""
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    if not isinstance(key, bytes):
        raise InvalidArgument(f"KV key must be bytes, got {type(key).__name__} {key!r:.60}")
    return key


def check_kv_value(key: bytes, value: object) -> bytes:
    """Return ``value`` when it is bytes of at most ``MAX_KV_VALUE_SIZE`` bytes.

    Raises:
        InvalidArgument: not bytes.
        KvValueTooLarge: naming the key and the size.
    """
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if not isinstance(value, bytes):
        raise InvalidArgument(f"KV value for key {key!r} must be bytes, got {type(value).__name__}")
    if len(value) > MAX_KV_VALUE_SIZE:
        raise KvValueTooLarge(
            f"KV value for key {key!r} is {len(value)} bytes; the limit is {MAX_KV_VALUE_SIZE} bytes"
        )
    return value


def check_kv_writes(writes: Mapping[bytes, bytes | None] | None) -> dict[bytes, bytes | None]:
    """Validate a mapping of caller KV writes (a ``None`` value deletes the key)."""
    if writes is None:
        return {}
    if not isinstance(writes, Mapping):
        raise InvalidArgument(f"kv_writes must be a mapping of bytes to bytes or None, got {writes!r:.60}")
    out: dict[bytes, bytes | None] = {}
    for key, value in writes.items():
        k = check_kv_key(key)
        out[k] = None if value is None else check_kv_value(k, value)
    return out
