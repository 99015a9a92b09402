"""A ``Store`` that times every operation of another one into the gateway's histograms.

``Runtime`` wraps whatever backend is configured in it, so the metrics are the same for every
backend and no backend carries metrics code: ``gateway_store_operation_duration_seconds``
(backend, operation, outcome) for each operation, ``gateway_refresh_lock_wait_seconds`` (lock,
outcome) for the time a lock took to be acquired (the single flight of a token refresh across
replicas waits there).

Everything else (``len``, a backend's own attributes) is the wrapped store's, so code and tests
that look at the backend itself keep working.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from gateway.errors import StoreUnavailable
from gateway.metrics import Metrics
from gateway.stores import Lease, LockTimeout, Store, Versioned

STORE_HISTOGRAM = "gateway_store_operation_duration_seconds"
LOCK_HISTOGRAM = "gateway_refresh_lock_wait_seconds"


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, StoreUnavailable):
        return "unavailable"
    if isinstance(exc, LockTimeout):
        return "timeout"
    return "error"


class InstrumentedStore(Store):
    """``inner``, timed. ``backend`` is the label value (``store.backend``: memory or redis)."""

    def __init__(self, inner: Store, metrics: Metrics, backend: str) -> None:
        self.inner = inner
        self.backend = backend
        self.durable_write_window_s = inner.durable_write_window_s
        histogram = metrics._histograms[STORE_HISTOGRAM]
        # Children bound once per (operation, outcome) actually seen: a label lookup is a lock.
        self._children: dict[tuple[str, str], Any] = {}
        self._histogram = histogram
        self._lock_histogram = metrics._histograms[LOCK_HISTOGRAM]

    def _observe(self, operation: str, outcome: str, started: float) -> None:
        key = (operation, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._histogram.labels(self.backend, operation, outcome)
        child.observe(time.perf_counter() - started)

    async def _timed(self, operation: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            result = await call()
        except BaseException as exc:
            self._observe(operation, _outcome(exc), started)
            raise
        self._observe(operation, "ok", started)
        return result

    # ``self.inner.get`` is looked up at each call (not bound once): a test may replace a
    # backend's method on the instance and still see every call.
    async def get(self, key: str) -> bytes | None:
        return await self._timed("get", lambda: self.inner.get(key))  # type: ignore[no-any-return]

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._timed("set", lambda: self.inner.set(key, value, ttl_s))

    async def delete(self, key: str) -> None:
        await self._timed("delete", lambda: self.inner.delete(key))

    async def pop(self, key: str) -> bytes | None:
        return await self._timed("pop", lambda: self.inner.pop(key))  # type: ignore[no-any-return]

    async def get_versioned(self, key: str) -> Versioned | None:
        return await self._timed("get_versioned", lambda: self.inner.get_versioned(key))  # type: ignore[no-any-return]

    async def set_versioned(
        self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
    ) -> int | None:
        return await self._timed(  # type: ignore[no-any-return]
            "set_versioned", lambda: self.inner.set_versioned(key, value, ttl_s, expected_version=expected_version))

    async def set_versioned_replicated(
        self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
    ) -> tuple[int | None, bool]:
        return await self._timed(  # type: ignore[no-any-return]
            "set_versioned_replicated",
            lambda: self.inner.set_versioned_replicated(key, value, ttl_s, expected_version=expected_version))

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping)

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def count(self, prefix: str) -> int | None:
        return await self._timed("count", lambda: self.inner.count(prefix))  # type: ignore[no-any-return]

    # Broadcast and locks are the inner store's own (its renewal and notification machinery).

    def subscribe(self, topic: str, callback: Callable[[str], None]) -> None:
        self.inner.subscribe(topic, callback)

    async def publish(self, topic: str, message: str) -> None:
        await self._timed("publish", lambda: self.inner.publish(topic, message))

    @contextlib.asynccontextmanager
    async def lock(self, name: str, *, lease_s: float, wait_s: float) -> AsyncIterator[Lease]:
        started = time.perf_counter()
        kind = name.partition(":")[0] or "other"  # "refresh:<key>", "app:<key>": the key stays out
        acquired = False
        try:
            async with self.inner.lock(name, lease_s=lease_s, wait_s=wait_s) as lease:
                acquired = True
                self._lock_histogram.labels(kind, "acquired").observe(time.perf_counter() - started)
                yield lease
        except BaseException as exc:
            if not acquired:
                self._lock_histogram.labels(kind, _outcome(exc)).observe(time.perf_counter() - started)
            raise

    async def acquire(self, name: str, *, lease_s: float, wait_s: float) -> Lease:
        started = time.perf_counter()
        kind = name.partition(":")[0] or "other"
        try:
            lease = await self.inner.acquire(name, lease_s=lease_s, wait_s=wait_s)
        except BaseException as exc:
            self._lock_histogram.labels(kind, _outcome(exc)).observe(time.perf_counter() - started)
            raise
        self._lock_histogram.labels(kind, "acquired").observe(time.perf_counter() - started)
        return lease

    async def renew(self, lease: Lease) -> bool:
        return await self.inner.renew(lease)

    async def release(self, lease: Lease) -> None:
        await self.inner.release(lease)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class does not define: the backend's own attributes.
        return getattr(self.inner, name)
