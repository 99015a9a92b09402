"""Everything one gateway instance holds, built once from the config.

The middleware, the handshake endpoints and the CLI share one ``Runtime``: the store, the
providers (instantiated from their plugins), sessions, token records, the identity signer and the
hot-path authenticator.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from gateway.access import AccessRules
from gateway.auth import Authenticator
from gateway.config import GatewayConfig
from gateway.errors import ConfigError, GatewayError
from gateway.http1 import Pools
from gateway.identity import signer_for, spoofable_names
from gateway.logs import request_id
from gateway.metrics import Metrics
from gateway.providers import Provider, ProviderContext, load_plugin
from gateway.sealing import Sealer
from gateway.sessions import CookieCodec, SessionStore
from gateway.stores import SESSION_PREFIX, Store
from gateway.stores.instrumented import InstrumentedStore
from gateway.stores.memory import MemoryStore
from gateway.tokens import AppTokenCache, TokenManager


def make_store(config: GatewayConfig) -> Store:
    """The configured store; nothing connects yet (Redis connects on first use and reconnects
    by itself, so a gateway starts while Redis is down and becomes ready once it is up)."""
    if config.store.backend == "memory":
        return MemoryStore(max_entries=config.store.max_entries)
    try:
        from gateway.stores.redis import RedisStore
    except ImportError:
        raise ConfigError(
            "store.backend 'redis' needs the redis package: pip install 'inclient-sso-gateway[redis]'."
        ) from None
    return RedisStore.from_config(config.store)


class Runtime:
    """The gateway's state: build it from a config, close it with ``aclose``."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        store: Store | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.config = config
        self.metrics = Metrics()  # a registry of its own: several gateways in a process never collide
        backend = store if store is not None else make_store(config)
        # Every component reaches the backend through this timed wrapper (gateway/stores/instrumented.py).
        self.store: Store = InstrumentedStore(backend, self.metrics, config.store.backend)
        self._owns_http = http_client is None
        self.http = http_client or httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, connect=5.0), event_hooks={"request": [_send_request_id]})
        # Relayed provider-API calls (gateway/relay.py) go over the gateway's own HTTP/1.1 client:
        # on httpx the relay ran at a tenth of a direct call's throughput (docs/benchmarks.md).
        self.relay_http = Pools(limit=config.relay.max_connections, timeout_s=config.relay.timeout_s,
                                pool_timeout_s=config.relay.timeout_s)
        store_config = config.store
        secrets = [secret.get_secret_value() for secret in config.session.secrets]
        sealer = Sealer(secrets)  # provider tokens are sealed at rest (gateway/sealing.py)
        self.app_tokens = AppTokenCache(
            self.store, lock_lease_s=store_config.lock_lease_s, lock_wait_s=store_config.lock_wait_s, sealer=sealer
        )
        self.providers: dict[str, Provider] = {}
        for name, settings in config.provider_settings().items():
            context = ProviderContext(
                name=name,
                redirect_uri=config.redirect_uri(name),
                http=self.http,
                store=self.store,
                path_prefix=config.path_prefix,
                app_tokens=self.app_tokens,
            )
            self.providers[name] = load_plugin(settings.plugin)(settings, context)
            _time_provider_calls(self.providers[name], self.metrics)
        self.sessions = SessionStore(self.store, CookieCodec(secrets), max_age_s=config.session.max_age_s)
        self.tokens = TokenManager(
            self.store, self.providers, refresh_margin_s=config.tokens.refresh_margin_s,
            lock_lease_s=store_config.lock_lease_s, lock_wait_s=store_config.lock_wait_s, metrics=self.metrics,
            sealer=sealer,
        )
        self.signer = signer_for(config)  # its JWKS lists every key a replica may sign with
        self.authenticator = Authenticator(config, self.sessions, self.tokens, self.signer)
        self.metrics.gauge("gateway_session_cache_entries", lambda: self.authenticator.cache_size)
        if isinstance(backend, MemoryStore):
            memory_store = backend
            self.metrics.gauge("gateway_store_entries", lambda: len(memory_store))
        # Asked of the store at each scrape (Redis: its index of session keys, every replica's).
        self.metrics.gauge_async("gateway_sessions_active", lambda: self.store.count(SESSION_PREFIX))
        self.spoofable = spoofable_names(config.identity.headers)
        self.access = AccessRules(config.access)

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()
        if self._owns_http:
            await self.http.aclose()
        self.relay_http.close()
        await self.store.aclose()


async def _send_request_id(request: httpx.Request) -> None:
    """Provider calls carry the id of the request that made them (the provider's support can
    find them; our log lines carry the same id)."""
    current = request_id.get()
    if current is not None:
        request.headers["x-request-id"] = current


#: The provider methods timed into ``gateway_provider_request_duration_seconds`` (operation label):
#: the code exchange with its user lookups, the token refresh, an app token fetch.
TIMED_PROVIDER_CALLS = ("redeem", "refresh", "relay_app_token")


def _time_provider_calls(provider: Provider, metrics: Metrics) -> None:
    """Wrap the provider's calls on this instance: the plugins stay free of metrics code."""
    for operation in TIMED_PROVIDER_CALLS:
        method = getattr(provider, operation, None)
        if method is not None:
            setattr(provider, operation, _timed(method, metrics, provider.name, operation))


def _timed(method: Callable[..., Awaitable[Any]], metrics: Metrics, provider: str,
           operation: str) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await method(*args, **kwargs)
            outcome = "ok"
            return result
        except GatewayError as exc:
            outcome = exc.code  # a stable code: a bounded label
            raise
        finally:
            metrics.observe("gateway_provider_request_duration_seconds", time.perf_counter() - started,
                            provider, operation, outcome)

    return timed
