"""The store several replicas share: Redis through redis-py asyncio (standalone, Sentinel, Cluster).

Layout (every key starts with ``store.key_prefix``):

- a value is one string ``<version>:<payload>``: the version travels with the bytes, so a plain
  ``set`` bumps it too (in a Lua script, atomically) and compare-and-set sees every write;
- TTLs are milliseconds (``PX``), so sub-second lifetimes behave as they do in memory;
- ``pop`` is ``GETDEL``: of two concurrent consumers exactly one gets the value;
- a lock is ``lock:{<hash of its name>}`` holding ``<fence>:<owner>`` with a ``PX`` lease, and its
  fence counter ``fence:{<same hash>}`` (one hash slot, so Cluster runs the scripts); the owner is
  ``host:pid:random``, so ``redis-cli GET`` tells an operator who holds a lock;
- one pub/sub channel ``<prefix>events`` carries lock releases (waiters are woken at once) and the
  broadcasts of ``publish`` (a logout drops the session from every replica's cache).

Every failure of Redis (refused, timed out, read-only replica after a failover...) becomes
``StoreUnavailable``: requests that need the store answer 503 with Retry-After, ``/readyz`` fails,
and the next command reconnects by itself once Redis is back. The reason is logged once when the
store goes down and once when it comes back, never shown to users.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from gateway.config import StoreConfig
from gateway.errors import StoreUnavailable
from gateway.stores import LockAttempt, Store, Versioned

log = logging.getLogger("gateway.stores.redis")

_UNAVAILABLE = "The session store is unavailable; please try again shortly."

# KEYS[1] key; ARGV[1] payload, ARGV[2] ttl ms, ARGV[3] expected version ('' for none).
# Answers the new version, or nil when the expected version does not match.
_SET = """
local old = redis.call('GET', KEYS[1])
local version = 0
if old then version = tonumber(string.match(old, '^(%d+):')) or 0 end
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= version then return false end
version = version + 1
redis.call('SET', KEYS[1], string.format('%d:', version) .. ARGV[1], 'PX', ARGV[2])
return version
"""

# KEYS[1] lock, KEYS[2] fence counter; ARGV[1] owner, ARGV[2] lease ms.
# Answers {fence, 0} when taken (again, for the same owner: a retried call), else {0, pttl}.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then
  local sep = string.find(held, ':', 1, true)
  if sep and string.sub(held, sep + 1) == ARGV[1] then
    return {tonumber(string.sub(held, 1, sep - 1)), 0}
  end
  return {0, redis.call('PTTL', KEYS[1])}
end
local fence = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], 604800000)
redis.call('SET', KEYS[1], string.format('%d:', fence) .. ARGV[1], 'PX', ARGV[2])
return {fence, 0}
"""

# KEYS[1] lock; ARGV[1] '<fence>:<owner>', ARGV[2] lease ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] lock; ARGV[1] '<fence>:<owner>', ARGV[2] channel, ARGV[3] release notification.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _unpack(data: bytes | None) -> Versioned | None:
    if data is None:
        return None
    version, sep, payload = data.partition(b":")
    if not sep or not version.isdigit():
        raise StoreUnavailable("The session store holds a value this gateway cannot read.")
    return Versioned(int(version), payload)


def _host_port(value: str, default_port: int) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host.strip("[]"), int(port)) if host else (value, default_port)


class RedisStore(Store):
    """``Store`` on Redis. Build it with ``RedisStore.from_config`` or around a redis-py client."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        key_prefix: str = "gw:",
        connect_timeout_s: float = 2.0,
        max_connections: int = 50,
        description: str = "redis",
        sentinel: Sentinel | None = None,
    ) -> None:
        self._client = client
        # redis-py's pools raise when exhausted; a burst of requests queues here instead.
        self._slots = asyncio.Semaphore(max_connections)
        self._sentinel = sentinel
        self.prefix = key_prefix
        self.description = description
        self._connect_timeout_s = connect_timeout_s
        self._channel = f"{key_prefix}events"
        self._instance = secrets.token_hex(8)  # tells this store's own notifications apart
        self._set = client.register_script(_SET)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._closed = False
        self._down_since: str | None = None  # the reason, while Redis is unreachable

    @classmethod
    def from_config(cls, config: StoreConfig) -> RedisStore:
        """The client ``store.mode`` describes, with timeouts that make an outage fail fast."""
        url = config.url.get_secret_value() if config.url is not None else ""
        common: dict[str, Any] = {
            "socket_connect_timeout": config.connect_timeout_s,
            "socket_timeout": config.command_timeout_s,
            "socket_keepalive": True,
            "health_check_interval": 15,
            # One quick retry covers a pooled connection that died with a Redis restart; more
            # would only delay the 503 of a real outage.
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
            "max_connections": config.max_connections + 4,  # + the notification subscription
        }
        client: Redis | RedisCluster
        sentinel: Sentinel | None = None
        if config.mode == "cluster":
            client = RedisCluster.from_url(url, **common)
            where = f"cluster via {urlsplit(url).hostname}:{urlsplit(url).port or 6379}"
        elif config.mode == "sentinel":
            master: dict[str, Any] = {}
            if url:
                parts = urlsplit(url)
                if parts.username:
                    master["username"] = unquote(parts.username)
                if parts.password:
                    master["password"] = unquote(parts.password)
                db = parts.path.strip("/") or parse_qs(parts.query).get("db", ["0"])[0]
                master["db"] = int(db or 0)
                if parts.scheme == "rediss":
                    master["ssl"] = True
            sentinel_kwargs: dict[str, Any] = {
                "socket_connect_timeout": config.connect_timeout_s,
                "socket_timeout": config.command_timeout_s,
                "retry": common["retry"],
            }
            if config.sentinel_password is not None:
                sentinel_kwargs["password"] = config.sentinel_password.get_secret_value()
            sentinel = Sentinel(  # type: ignore[no-untyped-call]
                [_host_port(node, 26379) for node in config.sentinels], sentinel_kwargs=sentinel_kwargs,
                **common, **master,
            )
            client = sentinel.master_for(config.sentinel_master)
            where = f"sentinel master {config.sentinel_master!r}"
        else:
            client = Redis.from_url(url, **common)
            parts = urlsplit(url)
            where = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
        return cls(
            client, key_prefix=config.key_prefix, connect_timeout_s=config.connect_timeout_s,
            max_connections=config.max_connections, description=f"redis {where}", sentinel=sentinel,
        )

    # -- plumbing ---------------------------------------------------------------------------------

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _lock_keys(self, name: str) -> list[str]:
        tag = hashlib.sha256(name.encode()).hexdigest()[:20]
        return [f"{self.prefix}lock:{{{tag}}}", f"{self.prefix}fence:{{{tag}}}"]

    async def _run(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Make one Redis call; any Redis failure becomes ``StoreUnavailable``."""
        self._start_listener()
        try:
            async with self._slots:
                result = await call()
        except (RedisError, OSError) as exc:
            self._went_down(f"{what}: {type(exc).__name__}: {exc}")
            raise StoreUnavailable(_UNAVAILABLE) from exc
        if self._down_since is not None:
            log.warning("%s is reachable again", self.description)
            self._down_since = None
        return result

    @property
    def last_error(self) -> str | None:
        """Why Redis is unreachable (for logs and ``check-config``); None while it answers."""
        return self._down_since

    def _went_down(self, reason: str) -> None:
        if self._down_since is None:
            log.error("%s is unreachable (%s); requests that need it answer 503", self.description, reason)
        self._down_since = reason

    # -- Store ------------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        found = await self.get_versioned(key)
        return found.value if found is not None else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._run("set", lambda: self._set(keys=[self._k(key)], args=[value, _ms(ttl_s), ""]))

    async def delete(self, key: str) -> None:
        await self._run("delete", lambda: cast(Awaitable[Any], self._client.delete(self._k(key))))

    async def pop(self, key: str) -> bytes | None:
        data = await self._run("pop", lambda: cast(Awaitable[Any], self._client.getdel(self._k(key))))
        found = _unpack(data)
        return found.value if found is not None else None

    async def get_versioned(self, key: str) -> Versioned | None:
        return _unpack(await self._run("get", lambda: cast(Awaitable[Any], self._client.get(self._k(key)))))

    async def set_versioned(
        self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
    ) -> int | None:
        expected = "" if expected_version is None else str(expected_version)
        version = await self._run("set", lambda: self._set(keys=[self._k(key)], args=[value, _ms(ttl_s), expected]))
        return None if version is None else int(version)

    async def ping(self) -> None:
        await self._run("ping", lambda: cast(Awaitable[Any], self._client.ping()))

    async def aclose(self) -> None:
        self._closed = True
        if self._listener is not None:
            # The listener also stops by itself within a second (it checks ``_closed``): redis-py's
            # cluster pub/sub can swallow a cancellation that lands during its read timeout.
            self._listener.cancel()
            await asyncio.wait({self._listener}, timeout=2.0)
            self._listener = None
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()
        if self._sentinel is not None:
            for node in self._sentinel.sentinels:
                with contextlib.suppress(RedisError, OSError):
                    await node.aclose()

    # -- broadcast and lock notifications -----------------------------------------------------

    async def publish(self, topic: str, message: str) -> None:
        self._deliver(topic, message)  # this process at once; the others through Redis
        notification = f"M{self._instance}\n{topic}\n{message}"
        await self._run("publish", lambda: cast(Awaitable[Any], self._client.publish(self._channel, notification)))

    def subscribe(self, topic: str, callback: Callable[[str], None]) -> None:
        super().subscribe(topic, callback)
        self._start_listener()

    def _start_listener(self) -> None:
        if self._listener is None and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop yet (built at start-up): the first command starts it
            self._listener = loop.create_task(self._listen(), name="gateway-store-listener")

    async def _listening(self) -> None:
        """Wait (briefly) until the notification channel is subscribed."""
        self._start_listener()
        if not self._subscribed.is_set() and self._down_since is None:  # down: fail fast instead
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), self._connect_timeout_s)

    async def _listen(self) -> None:
        """Keep one subscription to the events channel, reconnecting for as long as we run."""
        delay = 0.05
        while not self._closed:
            if isinstance(self._client, RedisCluster):
                try:
                    await self._client.initialize()  # its pub/sub needs the slot map
                except (RedisError, OSError) as exc:
                    log.debug("store notifications waiting for the cluster: %s", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                while not self._closed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._subscribed.set()
                        delay = 0.05
                    elif message["type"] == "message":
                        self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._subscribed.clear()
                log.debug("store notifications interrupted: %s", exc)
            except Exception:
                self._subscribed.clear()
                log.exception("store notifications failed")
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            # Missed notifications only cost time: lock waiters wake when the lease would end,
            # session caches expire after session.cache_ttl_s.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _dispatch(self, data: bytes | str) -> None:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        kind, rest = text[:1], text[1:]
        instance, _, body = rest.partition("\n")
        if instance == self._instance:
            return  # ours: already delivered in this process
        if kind == "L":
            self._lock_released(body)
        elif kind == "M":
            topic, _, message = body.partition("\n")
            self._deliver(topic, message)

    # -- lock primitives -------------------------------------------------------------------------

    async def _try_lock(self, name: str, owner: str, lease_s: float) -> LockAttempt:
        await self._listening()  # subscribed before trying, so a release cannot slip past a waiter
        keys, args = self._lock_keys(name), [owner, str(_ms(lease_s))]
        fence, pttl = await self._run("lock", lambda: self._acquire(keys=keys, args=args))
        if int(fence):
            return LockAttempt(int(fence), 0.0)
        # PTTL -1 (no expiry) cannot happen with these scripts; -2: released in between.
        return LockAttempt(0, max(int(pttl), 0) / 1000 if int(pttl) != -1 else lease_s)

    async def _renew_lock(self, name: str, fence: int, owner: str, lease_s: float) -> bool:
        keys, args = self._lock_keys(name)[:1], [f"{fence}:{owner}", str(_ms(lease_s))]
        return bool(await self._run("lock renew", lambda: self._renew(keys=keys, args=args)))

    async def _release_lock(self, name: str, fence: int, owner: str) -> None:
        keys = self._lock_keys(name)[:1]
        notification = f"L{self._instance}\n{name}"
        args = [f"{fence}:{owner}", self._channel, notification]
        await self._run("lock release", lambda: self._release(keys=keys, args=args))
        self._lock_released(name)
