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
  broadcasts of ``publish`` (a logout drops the session from every replica's cache);
- ``count:<counted prefix>`` (``COUNTED_PREFIXES``: ``count:sess:``) is a sorted set of the keys
  under that prefix scored by their expiry (Redis's clock, ``TIME``), so ``count`` is a
  ``ZCOUNT`` of the scores still ahead, O(log n), whatever the number of sessions: no scan. A
  write adds its key before writing and a delete removes it after deleting, so an outage in
  between overcounts one key until its expiry, never undercounts; each index write and count also
  drops a bounded number of expired members, so the set holds little more than the live keys.

Every failure of Redis (refused, timed out, read-only replica after a failover, a Cluster without
a reachable seed node or with slots uncovered...) becomes ``StoreUnavailable``: requests that need
the store answer 503 with Retry-After, ``/readyz`` fails, and the next command reconnects by itself
once Redis is back. The reason is logged once when the store goes down and once when it has
answered again for a second, never shown to users (``_Health``).

Failovers (docs/redis.md):

- Sentinel: a task subscribes to the Sentinels' ``+switch-master`` and moves every connection to
  the new master at once (the old one stays writable until Sentinel reconfigures it, ~10 s: what
  is written there meanwhile is discarded). The refresh lock and a rotated token record are
  written with ``WAIT`` (``store.replica_acks``): the gateway relies on them only once a replica,
  the node a failover would promote, has them.
- Cluster: the seed nodes are a list (``store.urls``); the notification subscription sits on any
  node that answers (a classic ``PUBLISH`` reaches every node) and moves to another one within a
  second when its node fails, with a WARNING.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.config import StoreConfig
from gateway.errors import StoreUnavailable
from gateway.stores import COUNTED_PREFIXES, LockAttempt, Store, Versioned

log = logging.getLogger("gateway.stores.redis")

_UNAVAILABLE = "The session store is unavailable; please try again shortly."

# What redis-py raises when Redis cannot serve a command. RedisClusterException is not a
# RedisError (no reachable seed node, slots not covered, "no targets"): it is an outage all the same.
_FAILURES = (RedisError, RedisClusterException, OSError)

# A recovery is logged once the store has answered for this long without a failure: in a Cluster
# with one master dead, commands to the other masters succeed between the failures, and the
# commands that need the dead master's slots can be seconds apart (a refresh lock waits for its
# back-off): a second was shorter than a failover (cluster-node-timeout and the election), so a
# recovery was logged, then the same outage again.
_SETTLE_S = 5.0
_SWITCH_MASTER = "+switch-master"
_ALONE_S = 5.0  # how long "this master has no replica" is believed without asking again

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


# Redis's clock in milliseconds, in a script: every replica's index scores and counts use the
# same clock as the keys' PX expiry. Effects replication (the default since Redis 5) lets a
# script write after reading TIME; older servers are asked for it.
_NOW_MS = """
if redis.replicate_commands then redis.replicate_commands() end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local function drop_expired(limit)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, limit)
  if #expired > 0 then redis.call('ZREM', KEYS[1], unpack(expired)) end
end
"""

# KEYS[1] index; ARGV[1] member (the key), ARGV[2] its TTL ms, ARGV[3] expired members to drop at most.
_INDEX = _NOW_MS + """
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
drop_expired(tonumber(ARGV[3]))
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS[1] index; ARGV[1] expired members to drop at most. Answers the members whose expiry is ahead.
_COUNT = _NOW_MS + """
drop_expired(tonumber(ARGV[1]))
return redis.call('ZCOUNT', KEYS[1], '(' .. now_ms, '+inf')
"""

# Expired index members dropped per index write and per count: bounded work per call (a scrape
# after a mass expiry does not block Redis), enough to keep up (each new session drops up to 16).
_DROP_ON_WRITE = 16
_DROP_ON_COUNT = 1000


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


class _Health:
    """Whether Redis answers, with one log line per outage and one per recovery.

    Down at the first failure; up again only after ``_SETTLE_S`` without one. Declaring recovery
    at the first success would log a pair of lines per request while one Cluster master is dead
    (the other masters keep answering)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.reason: str | None = None  # while down: why
        self._last_failure = 0.0

    def failed(self, reason: str) -> None:
        self._last_failure = time.monotonic()
        if self.reason is None:
            log.error("%s is unreachable (%s); requests that need it answer 503", self.description, reason)
        self.reason = reason

    def answered(self) -> None:
        if self.reason is not None and time.monotonic() - self._last_failure >= _SETTLE_S:
            log.warning("%s is reachable again", self.description)
            self.reason = None


def _credentials(url: str) -> dict[str, Any]:
    """The user, password and TLS of a node's URL (every node of a Cluster shares the first's)."""
    parts = urlsplit(url)
    auth: dict[str, Any] = {}
    if parts.username:
        auth["username"] = unquote(parts.username)
    if parts.password:
        auth["password"] = unquote(parts.password)
    if parts.scheme == "rediss":
        auth["ssl"] = True
    return auth


def _cluster_client(config: StoreConfig, common: dict[str, Any]) -> RedisCluster:
    """A Cluster client knowing every seed node: whichever answers first tells it the topology."""
    seeds = config.seed_urls()
    nodes = [ClusterNode(urlsplit(seed).hostname or "127.0.0.1", urlsplit(seed).port or 6379) for seed in seeds]
    return RedisCluster(startup_nodes=nodes, **common, **_credentials(seeds[0]))


def _replicating(replica: dict[str, Any]) -> bool:
    """A replica as a Sentinel reports it is replicating (up, and says it is a replica)."""
    flags = set(str(replica.get("flags", "")).split(","))
    return not flags & {"s_down", "o_down", "disconnected"} and replica.get("role-reported") == "slave" \
        and replica.get("master-link-status") == "ok"


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
        sentinel_master: str = "mymaster",
        replica_acks: int = 0,
        ack_timeout_s: float = 0.5,
        durable_write_window_s: float = 0.6,
        node_kwargs: dict[str, Any] | None = None,
        seeds: list[str] | None = None,
    ) -> None:
        self._client = client
        # Cluster: how to connect to one node (the notification subscription's own connection).
        self._node_kwargs = node_kwargs or {}
        self._seeds = seeds or []  # "host:port" of the Cluster's seed nodes
        # redis-py's pools raise when exhausted; a burst of requests queues here instead.
        self._slots = asyncio.Semaphore(max_connections)
        self._sentinel = sentinel
        self._sentinel_master = sentinel_master
        self._acks = 0 if isinstance(client, RedisCluster) else replica_acks  # see set_versioned_replicated
        self._ack_timeout_ms = _ms(ack_timeout_s)
        self.durable_write_window_s = durable_write_window_s
        self.prefix = key_prefix
        self.description = description
        self._health = _Health(description)
        self._connect_timeout_s = connect_timeout_s
        self._channel = f"{key_prefix}events"
        self._instance = secrets.token_hex(8)  # tells this store's own notifications apart
        self._set = client.register_script(_SET)
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._index_script = client.register_script(_INDEX)
        self._count_script = client.register_script(_COUNT)
        self._listener: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None  # Sentinel's +switch-master
        self._subscribed = asyncio.Event()
        self._closed = False
        self._generation = 0  # Sentinel switches followed
        self._alone: tuple[tuple[str, int] | None, int] | None = None  # a master known to have no replica
        self._alone_until = 0.0

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
        node_kwargs: dict[str, Any] = {}
        seeds = [urlsplit(seed) for seed in config.seed_urls()] if config.mode == "cluster" else []
        if config.mode == "cluster":
            client = _cluster_client(config, common)
            node_kwargs = {**common, **_credentials(config.seed_urls()[0]), "max_connections": 2,
                           "health_check_interval": 2}  # a silent dead node noticed within seconds
            where = "cluster via " + ", ".join(f"{seed.hostname}:{seed.port or 6379}" for seed in seeds)
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
        failover = config.mode != "standalone"
        return cls(
            client, key_prefix=config.key_prefix, connect_timeout_s=config.connect_timeout_s,
            max_connections=config.max_connections, description=f"redis {where}", sentinel=sentinel,
            sentinel_master=config.sentinel_master, replica_acks=config.acks_needed(),
            # WAIT must answer before the socket times out.
            ack_timeout_s=min(0.5, config.command_timeout_s / 2),
            durable_write_window_s=config.durable_write_window_s if failover else min(
                config.durable_write_window_s, 0.6),
            node_kwargs=node_kwargs, seeds=[f"{seed.hostname}:{seed.port or 6379}" for seed in seeds],
        )

    # -- plumbing ---------------------------------------------------------------------------------

    def _k(self, key: str) -> str:
        return self.prefix + key

    def _index_of(self, key: str) -> str | None:
        """The index (sorted set) that counts ``key``, if its prefix is counted."""
        for prefix in COUNTED_PREFIXES:
            if key.startswith(prefix):
                return f"{self.prefix}count:{prefix}"
        return None

    async def _index(self, key: str, ttl_s: float) -> None:
        """Before a write: ``key`` counted until the write's expiry."""
        index = self._index_of(key)
        if index is not None:
            args: list[str | int] = [key, _ms(ttl_s), _DROP_ON_WRITE]
            await self._run("index", lambda: self._index_script(keys=[index], args=args))

    async def _unindex(self, key: str) -> None:
        """After a delete: ``key`` no longer counted."""
        index = self._index_of(key)
        if index is not None:
            await self._run("index", lambda: cast(Awaitable[Any], self._client.zrem(index, key)))

    def _lock_keys(self, name: str) -> list[str]:
        tag = hashlib.sha256(name.encode()).hexdigest()[:20]
        return [f"{self.prefix}lock:{{{tag}}}", f"{self.prefix}fence:{{{tag}}}"]

    async def _run(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Make one Redis call; any Redis failure becomes ``StoreUnavailable``."""
        self._start_listener()
        try:
            async with self._slots:
                result = await call()
        except _FAILURES as exc:
            self._health.failed(f"{what}: {type(exc).__name__}: {exc}")
            raise StoreUnavailable(_UNAVAILABLE) from exc
        self._health.answered()
        return result

    @property
    def last_error(self) -> str | None:
        """Why Redis is unreachable (for logs and ``check-config``); None while it answers."""
        return self._health.reason

    async def _run_acked(self, what: str, script: Any, keys: list[str], args: list[Any]) -> tuple[Any, bool]:
        """Run a write script, then ``WAIT`` on the same connection for ``replica_acks`` replicas:
        (its answer, whether they acknowledged it or there is certainly none that could)."""
        master, generation = self._master_address(), self._generation
        if not self._acks or (self._alone == (master, generation) and time.monotonic() < self._alone_until):
            return await self._run(what, lambda: script(keys=keys, args=args)), True
        client = cast(Redis, self._client)
        replication = await self._run(what, lambda: cast(Awaitable[Any], client.info("replication")))
        if int(replication.get("connected_slaves", 0)) >= self._acks:
            async def call() -> list[Any]:
                pipe = client.pipeline(transaction=False)  # one connection for both
                await script(keys=keys, args=args, client=pipe)
                pipe.execute_command("WAIT", self._acks, self._ack_timeout_ms)
                return await pipe.execute()

            result, acknowledged = await self._run(what, call)
            if int(acknowledged) >= self._acks:
                return result, True
        else:  # WAIT would only spend its timeout: no replica is connected to acknowledge
            result = await self._run(what, lambda: script(keys=keys, args=args))
        # No address before: this call opened the first connection, to the one it names now.
        master = master or self._master_address()
        if not await self._no_replica_could(master, generation):
            return result, False
        # A master without replicas: not asked again for a few seconds, unless a switch is
        # followed (a replica added meanwhile is waited for from then on).
        self._alone, self._alone_until = (master, generation), time.monotonic() + _ALONE_S
        return result, True

    def _master_address(self) -> tuple[str, int] | None:
        pool = getattr(self._client, "connection_pool", None)  # a Cluster has none
        return pool.master_address if isinstance(pool, SentinelConnectionPool) else None

    async def _no_replica_could(self, master: tuple[str, int] | None, generation: int) -> bool:
        """No replica acknowledged a write: whether there is none that could have (then the write
        stands, as on a master whose replica died). Only when the write certainly went to the
        master the Sentinels name now (no switch followed meanwhile), no failover is in progress,
        and they know no replica of it that is replicating: a replica killed, or the old master
        not reconfigured yet (it still says it is a master). Unsure: False, the caller waits."""
        if self._sentinel is None or master is None:
            return False  # replica_acks set on a standalone Redis: the operator wants the wait
        if self._master_address() != master or self._generation != generation:
            return False
        for node in self._sentinel.sentinels:
            try:
                state = cast(dict[str, Any], await node.sentinel_master(self._sentinel_master))
                replicas = await node.sentinel_slaves(self._sentinel_master)
            except _FAILURES:
                continue  # the next Sentinel
            flags = set(str(state.get("flags", "")).split(","))
            if (str(state.get("ip")), int(state.get("port") or 0)) != master or \
                    flags & {"failover_in_progress", "promoted", "s_down", "o_down"}:
                return False
            return not any(_replicating(replica) for replica in replicas)
        return False

    # -- Store ------------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        found = await self.get_versioned(key)
        return found.value if found is not None else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._index(key, ttl_s)
        await self._run("set", lambda: self._set(keys=[self._k(key)], args=[value, _ms(ttl_s), ""]))

    async def delete(self, key: str) -> None:
        await self._run("delete", lambda: cast(Awaitable[Any], self._client.delete(self._k(key))))
        await self._unindex(key)

    async def pop(self, key: str) -> bytes | None:
        data = await self._run("pop", lambda: cast(Awaitable[Any], self._client.getdel(self._k(key))))
        await self._unindex(key)
        found = _unpack(data)
        return found.value if found is not None else None

    async def get_versioned(self, key: str) -> Versioned | None:
        return _unpack(await self._run("get", lambda: cast(Awaitable[Any], self._client.get(self._k(key)))))

    async def set_versioned(
        self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
    ) -> int | None:
        expected = "" if expected_version is None else str(expected_version)
        await self._index(key, ttl_s)  # a refused compare-and-set overcounts the key until this TTL at most
        version = await self._run("set", lambda: self._set(keys=[self._k(key)], args=[value, _ms(ttl_s), expected]))
        return None if version is None else int(version)

    async def set_versioned_replicated(
        self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
    ) -> tuple[int | None, bool]:
        # Cluster: not waited for (WAIT would need the key's node's connection, which redis-py's
        # cluster client does not lend); its manual failover hands over with the replica in sync,
        # and a master killed outright loses only what was on the wire (docs/redis.md).
        expected = "" if expected_version is None else str(expected_version)
        await self._index(key, ttl_s)
        version, acknowledged = await self._run_acked("set", self._set, [self._k(key)],
                                                      [value, _ms(ttl_s), expected])
        return (None if version is None else int(version)), acknowledged

    async def count(self, prefix: str) -> int | None:
        """The keys under ``prefix`` whose expiry is ahead, from its index (every replica's
        writes); None for a prefix that is not indexed. Keys written before the index existed
        (a gateway upgraded with sessions live) are not in it until they are written again."""
        if prefix not in COUNTED_PREFIXES:
            return None
        index = f"{self.prefix}count:{prefix}"
        return int(await self._run("count", lambda: self._count_script(keys=[index], args=[_DROP_ON_COUNT])))

    async def ping(self) -> None:
        if isinstance(self._client, RedisCluster):
            # Every master: the store is usable only when every slot is.
            cluster = self._client
            await self._run("ping", lambda: cast(Awaitable[Any], cluster.ping(target_nodes=RedisCluster.PRIMARIES)))
        else:
            await self._run("ping", lambda: cast(Awaitable[Any], self._client.ping()))

    async def aclose(self) -> None:
        self._closed = True
        for task in (self._listener, self._watcher):
            if task is not None:
                # The tasks also stop by themselves within a second (they check ``_closed``):
                # redis-py's cluster pub/sub can swallow a cancellation during its read timeout.
                task.cancel()
                await asyncio.wait({task}, timeout=2.0)
        self._listener = self._watcher = None
        with contextlib.suppress(*_FAILURES):
            await self._client.aclose()
        if self._sentinel is not None:
            for node in self._sentinel.sentinels:
                with contextlib.suppress(*_FAILURES):
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
        if self._closed or (self._listener is not None and (self._watcher is not None or self._sentinel is None)):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet (built at start-up): the first command starts it
        if self._listener is None:
            self._listener = loop.create_task(self._listen(), name="gateway-store-listener")
        if self._sentinel is not None and self._watcher is None:
            self._watcher = loop.create_task(self._watch_sentinels(), name="gateway-store-sentinel-watch")

    def _restart_listener(self) -> None:
        """Subscribe again from scratch (its connection sits on a node that is no longer the one)."""
        if self._listener is not None:
            self._listener.cancel()  # its ``finally`` closes the old subscription
            self._listener = None
        self._subscribed.clear()
        self._start_listener()

    async def _listening(self) -> None:
        """Wait (briefly) until the notification channel is subscribed."""
        self._start_listener()
        if not self._subscribed.is_set() and self._health.reason is None:  # down: fail fast instead
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._subscribed.wait(), self._connect_timeout_s)

    async def _subscription(self, avoid: str | None) -> tuple[PubSub, str, Redis | None]:
        """A pub/sub connection for the events channel, where it is (a Cluster node's name), and
        the client to close with it. On a Cluster: its own connection to any node that answers (a classic PUBLISH
        reaches every node), the one that just failed last; not one of the command client's
        connections, which it drops whenever it reloads the topology."""
        if not isinstance(self._client, RedisCluster):
            pubsub = self._client.pubsub()
            await pubsub.subscribe(self._channel)
            return pubsub, self.description, None
        await self._client.initialize()  # the first topology (a no-op once known)
        if avoid is not None:
            await self._client.nodes_manager.initialize()  # afresh: the failed node may be gone
        # The seed nodes first, in their order (an operator knows where the subscriptions are),
        # then the others; the node that just failed last.
        rank = {name: index for index, name in enumerate(self._seeds)}
        nodes = sorted(self._client.get_nodes(),
                       key=lambda node: (node.name == avoid, rank.get(node.name, len(rank))))
        problem: BaseException | None = None
        for node in nodes:
            client = Redis(host=node.host, port=int(node.port), **self._node_kwargs)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                return pubsub, node.name, client
            except _FAILURES as exc:
                problem = exc
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
        raise RedisClusterException(f"no node accepted the subscription ({problem})")

    async def _listen(self) -> None:
        """Keep one subscription to the events channel, reconnecting for as long as we run.

        A lost subscription is a WARNING when it happens and when it is back: broadcasts sent in
        between (a logout) are missed, and caches keep such sessions for ``session.cache_ttl_s``."""
        delay = 0.05
        lost_at: float | None = None
        where: str | None = None
        while not self._closed:
            pubsub: PubSub | None = None
            owner: Redis | None = None
            try:
                pubsub, where, owner = await self._subscription(avoid=where if lost_at is not None else None)
                while not self._closed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._subscribed.set()
                        delay = 0.05
                        if lost_at is not None:
                            log.warning("store notifications resubscribed on %s after %.1f s", where,
                                        time.monotonic() - lost_at)
                            lost_at = None
                    elif message["type"] == "message":
                        self._dispatch(message["data"])
            except asyncio.CancelledError:
                raise
            except _FAILURES as exc:
                self._subscribed.clear()
                if lost_at is None:
                    lost_at = time.monotonic()
                    log.warning("store notifications lost (%s: %s: %s); resubscribing: broadcasts sent "
                                "meanwhile are missed", where or self.description, type(exc).__name__, exc)
            except Exception:
                self._subscribed.clear()
                lost_at = lost_at or time.monotonic()
                log.exception("store notifications failed")
            finally:
                with contextlib.suppress(Exception):
                    if pubsub is not None:
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
                    if owner is not None:
                        await owner.aclose()
            # Missed notifications only cost time: lock waiters wake when the lease would end,
            # session caches expire after session.cache_ttl_s.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

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

    # -- Sentinel failovers ---------------------------------------------------------------------

    async def _watch_sentinels(self) -> None:
        """Follow ``+switch-master`` as the Sentinels announce it, from one Sentinel at a time
        (the next one when it fails). redis-py alone asks the Sentinels only when it opens a
        connection: its pooled connections would keep writing to the old master, which stays
        writable until Sentinel reconfigures it, and whatever they write there is discarded."""
        assert self._sentinel is not None
        sentinels = list(self._sentinel.sentinels)
        turn, delay = 0, 0.05
        while not self._closed:
            pubsub = sentinels[turn % len(sentinels)].pubsub()
            try:
                await pubsub.subscribe(_SWITCH_MASTER)
                # A switch while nobody listened: the address the Sentinels name now.
                with contextlib.suppress(*_FAILURES):
                    address = await self._sentinel.discover_master(self._sentinel_master)
                    await self._follow_master(address)
                delay = 0.05
                while not self._closed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message["type"] != "message":
                        continue
                    data = message["data"]
                    fields = (data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)).split()
                    # "<name> <old ip> <old port> <new ip> <new port>"
                    if len(fields) == 5 and fields[0] == self._sentinel_master and fields[4].isdigit():
                        await self._follow_master((fields[3], int(fields[4])))
            except asyncio.CancelledError:
                raise
            except _FAILURES as exc:
                log.debug("Sentinel watch interrupted: %s", exc)
                turn += 1
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _follow_master(self, address: tuple[str, int]) -> None:
        """Send every command from now on to the master at ``address``."""
        pool = cast(SentinelConnectionPool, cast(Redis, self._client).connection_pool)
        old = pool.master_address
        if old == address:
            return
        pool.master_address = address
        self._generation += 1
        if old is None:
            return  # nothing connected yet
        # Connections in use are closed when they come back; idle ones now: the next command
        # opens one, and redis-py asks the Sentinels where the master is.
        await pool.update_active_connections_for_reconnect()  # type: ignore[no-untyped-call]
        with contextlib.suppress(*_FAILURES):
            await pool.disconnect(inuse_connections=False)
        log.warning("Sentinel moved master %r from %s:%s to %s:%s; following", self._sentinel_master,
                    old[0], old[1], address[0], address[1])
        self._restart_listener()  # the subscription sat on the old master

    # -- lock primitives -------------------------------------------------------------------------

    async def _try_lock(self, name: str, owner: str, lease_s: float) -> LockAttempt:
        await self._listening()  # subscribed before trying, so a release cannot slip past a waiter
        keys, args = self._lock_keys(name), [owner, str(_ms(lease_s))]
        (fence, pttl), acknowledged = await self._run_acked("lock", self._acquire, keys, args)
        if int(fence) and not acknowledged:
            # Taken on a master no replica heard from: a failover under way would lose it, and
            # another replica could then refresh with the same refresh token. Give it back and
            # try again shortly (the next connection follows the Sentinels to the new master).
            with contextlib.suppress(StoreUnavailable):
                await self._release_lock(name, int(fence), owner)
            return LockAttempt(0, 0.2)
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
