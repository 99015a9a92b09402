"""Configuration: pydantic-settings models, YAML loading, ``${VAR}`` interpolation, env overrides.

Precedence, lowest first: the models' defaults, the YAML file (after ``${VAR}`` /
``${VAR:-default}`` interpolation), then ``GATEWAY_<SECTION>__<KEY>`` environment variables.

Each provider's own keys are validated by its plugin's settings model, so an error in
``providers.lark.app_id`` is reported with exactly that path.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import to_jsonable_python
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigError
from gateway.providers import ProviderSettings, load_plugin


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Listen(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # One log line per request cost the sidecar 16% of its CPU (docs/benchmarks.md): off by default.
    access_log: bool = False


class Logging(_Section):
    # One event per line. json: one JSON object per line (time, level, logger, message, then the
    # event's fields), for a log shipper; text: one readable line; auto: text when stderr is a
    # terminal, JSON otherwise (under systemd, Docker or Kubernetes stderr is not a terminal).
    format: Literal["json", "text", "auto"] = "auto"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value  # ``level: debug`` as Python spells it


class Upstream(_Section):
    url: str = "http://127.0.0.1:9000"
    timeout_s: float = Field(30.0, gt=0)
    # Connections kept open to the upstream (the sidecar's pool).
    max_connections: int = Field(100, ge=1)
    # The app sees the Host the browser used (as oauth2-proxy's pass_host_header): apps that compare
    # Origin with Host (Tornado/Jupyter WebSockets, Django, Grafana, Rails) need it. false sends the
    # upstream's own Host instead (X-Forwarded-Host still carries the browser's): docs/deployment.md.
    preserve_host: bool = True
    # readyz also opens a connection to the upstream (503 upstream_unavailable when it cannot).
    check_ready: bool = False
    # Longest wait for a free pooled connection; then 503 upstream_busy with Retry-After.
    pool_timeout_s: float = Field(10.0, gt=0)
    # Longest silence in the middle of a client's request body; then 408 request_timeout (slot freed).
    body_timeout_s: float = Field(30.0, gt=0)
    # A pooled connection idle longer than this is not reused: keep it below the upstream's own
    # keep-alive (uvicorn and Node: 5 s). A response's Keep-Alive: timeout=N lowers it per connection.
    keepalive_s: float = Field(4.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:9000")
        return value.rstrip("/")


# A lower bound, not a measure: the bits a secret's character frequencies could hold at most
# (Shannon). It rejects placeholders ("x" * 40, a word repeated) and cannot tell a phrase from a
# random string. A random 32-character hex secret (128 bits) scores over 90, token_urlsafe(32) over 180.
MIN_SECRET_BITS = 80


def estimated_bits(secret: str) -> float:
    """Length times the Shannon entropy of the secret's own character frequencies."""
    counts = Counter(secret)
    return -sum(count * math.log2(count / len(secret)) for count in counts.values())


def _secret_long_enough(secret: SecretStr) -> SecretStr:
    # Checked per item, so the error carries the item's path (session.secrets[1]).
    value = secret.get_secret_value()
    if len(value) < 32:
        raise ValueError("a session secret must be at least 32 characters long")
    if estimated_bits(value) < MIN_SECRET_BITS:
        # The estimate is not printed: it would say something about the secret.
        raise ValueError("this session secret is too predictable (repeated characters or words); generate "
                         "one, e.g. python3 -c 'import secrets;print(secrets.token_urlsafe(32))'")
    return secret


_COOKIE_PREFIXES = ("__host-", "__secure-")  # compared in lower case, as browsers do


class Session(_Section):
    # validate_default: a session section without secrets is an error now, not a crash in serve.
    secrets: list[Annotated[SecretStr, AfterValidator(_secret_long_enough)]] = Field(
        default_factory=list, validate_default=True)
    # Over HTTPS prefer __Host-gw_session: the browser then refuses the cookie unless it is Secure,
    # host-only and Path=/, so a sibling subdomain or a plain-HTTP page cannot plant or shadow it.
    cookie_name: str = "gw_session"
    max_age_s: int = Field(604800, gt=0)
    secure: bool = True
    same_site: Literal["lax", "strict", "none"] = "lax"
    # How long a verified session stays cached in-process (no store round trip on the hot path).
    cache_ttl_s: float = Field(10.0, ge=0)

    @field_validator("secrets")
    @classmethod
    def _at_least_one(cls, secrets: list[SecretStr]) -> list[SecretStr]:
        if not secrets:
            raise ValueError("at least one session secret is required (the first signs, all verify): set "
                             "secrets: [\"${GATEWAY_SECRET}\"] and GATEWAY_SECRET=$(python3 -c "
                             "'import secrets;print(secrets.token_urlsafe(32))')")
        return secrets

    @field_validator("cookie_name")
    @classmethod
    def _token_chars(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_\-]{1,64}", value):
            raise ValueError("use letters, digits, '_' and '-' only")
        return value

    @model_validator(mode="after")
    def _prefix_needs_secure(self) -> Session:
        # Browsers drop a __Host- / __Secure- cookie set without Secure: every sign-in would fail.
        # (__Host- also needs Path=/ and no Domain, which the session cookie always has.)
        if self.cookie_name.lower().startswith(_COOKIE_PREFIXES) and not self.secure:
            raise ValueError(f"cookie_name {self.cookie_name!r}: a __Host- or __Secure- cookie needs secure: true")
        return self

    @property
    def binding_cookie_name(self) -> str:
        """The login-binding cookie, ``<cookie_name>_login`` with ``Path=<path_prefix>``: a
        ``__Host-`` cookie must have ``Path=/``, so it becomes ``__Secure-`` there (still Secure,
        still host-only as the gateway sets no Domain)."""
        name = f"{self.cookie_name}_login"
        # Browsers match the prefixes case-insensitively.
        return "__Secure-" + name[len("__Host-"):] if name.lower().startswith("__host-") else name


def _redis_url_problem(value: str, mode: str | None) -> str | None:
    """Why ``value`` cannot name a Redis node for ``mode``; None when it can."""
    parts = urlsplit(value)
    schemes = ("redis", "rediss") if mode == "cluster" else ("redis", "rediss", "unix")
    if parts.scheme not in schemes:
        return f"must be a {' or '.join(s + '://' for s in schemes)} URL"
    if parts.scheme != "unix" and mode != "sentinel" and not parts.hostname:
        return "the URL needs a host, e.g. redis://127.0.0.1:6379/0"
    if parts.scheme != "unix" and not re.fullmatch(r"/?\d*", parts.path):
        return "the path is the database number, e.g. redis://127.0.0.1:6379/0"
    if mode == "cluster" and parts.path.strip("/") not in ("", "0"):
        return "a Redis Cluster has only database 0"
    try:
        _ = parts.port
    except ValueError:
        return "the port is not a number"
    return None


class StoreConfig(_Section):
    backend: Literal["memory", "redis"] = "memory"
    # How to reach Redis (backend: redis): one server (standalone), a master found through
    # Sentinel, or a Cluster.
    mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    # standalone: redis://[user:password@]host:port/db (rediss:// for TLS, unix:///path?db=0);
    # cluster: the URL of one node (or ``urls``); sentinel: optional, only the master's
    # credentials, db and scheme (its host is ignored: the Sentinels name the master).
    url: SecretStr | None = Field(None, validate_default=True)
    # cluster: the seed nodes, each a redis:// URL; any one that answers tells the client the
    # whole topology, so a dead seed node no longer stops a (re)starting gateway.
    urls: list[SecretStr] = Field(default_factory=list, validate_default=True)
    sentinels: list[str] = Field(default_factory=list, validate_default=True)  # host:port of each Sentinel
    sentinel_master: str = "mymaster"  # the service name the Sentinels monitor
    sentinel_password: SecretStr | None = None  # AUTH for the Sentinels themselves, if they need one
    key_prefix: str = "gw:"
    max_entries: int = Field(200_000, ge=100)
    max_connections: int = Field(50, ge=1)  # Redis connections per replica (commands queue beyond it)
    connect_timeout_s: float = Field(2.0, gt=0)  # an unreachable Redis fails requests this fast (503)
    command_timeout_s: float = Field(2.0, gt=0)
    # Fleet-wide single flight (token refresh, app tokens): the lock's lease, renewed every third
    # of it while the holder works; a replica that dies holding it blocks the others this long at most.
    lock_lease_s: float = Field(10.0, gt=0)
    # How long a request waits for another replica's refresh before answering 503.
    lock_wait_s: float = Field(30.0, gt=0)
    # A refresh lock and a rotated token record must reach this many Redis replicas (WAIT) before
    # the gateway relies on them: a failover promotes a replica, and a write it never received
    # is gone (with a rotated refresh token, that is a logout). None: 1 in mode sentinel (while
    # the Sentinels know a healthy replica), else 0 (no wait).
    replica_acks: int | None = Field(None, ge=0)
    # How long the write of a rotated refresh token is retried (through a failover's errors, and
    # until a replica acknowledges it: a just-promoted master has none until Sentinel reconfigures
    # the old one, ~10 s) before it is given up with an ERROR. Requests of that user wait meanwhile.
    durable_write_window_s: float = Field(15.0, ge=0)

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        backend, mode = info.data.get("backend"), info.data.get("mode")
        if value is None:
            if backend == "redis" and mode == "standalone":
                raise ValueError("backend redis needs a url such as redis://127.0.0.1:6379/0")
            return value
        problem = _redis_url_problem(value.get_secret_value(), mode)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("urls")
    @classmethod
    def _seed_urls(cls, values: list[SecretStr], info: ValidationInfo) -> list[SecretStr]:
        backend, mode = info.data.get("backend"), info.data.get("mode")
        if values and mode != "cluster":
            raise ValueError("urls lists a Redis Cluster's seed nodes: it needs mode cluster (else use url)")
        if backend == "redis" and mode == "cluster" and not values and info.data.get("url") is None \
                and "url" in info.data:
            raise ValueError("mode cluster needs url or urls, e.g. [redis://10.0.0.1:6379, redis://10.0.0.2:6379]")
        for index, value in enumerate(values):
            problem = _redis_url_problem(value.get_secret_value(), mode)
            if problem is not None:
                raise ValueError(f"item {index + 1}: {problem}")
        return values

    @field_validator("sentinels")
    @classmethod
    def _sentinel_nodes(cls, values: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("backend") == "redis" and info.data.get("mode") == "sentinel" and not values:
            raise ValueError("mode sentinel needs the Sentinels' addresses, e.g. [10.0.0.1:26379]")
        for value in values:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r} is not host:port")
        return values

    def seed_urls(self) -> list[str]:
        """The cluster's seed nodes: ``url`` (if set) first, then ``urls``."""
        seeds = [self.url] if self.url is not None else []
        return [seed.get_secret_value() for seed in [*seeds, *self.urls]]

    def acks_needed(self) -> int:
        """Replicas a refresh lock and a rotated token must reach (``replica_acks`` resolved)."""
        if self.replica_acks is not None:
            return self.replica_acks
        return 1 if self.mode == "sentinel" else 0


class Tokens(_Section):
    refresh_margin_s: float = Field(300, ge=0)


class IdentityHeaders(_Section):
    user: str = "X-Auth-User"
    provider: str = "X-Auth-Provider"
    tenant: str = "X-Auth-Tenant"
    name: str = "X-Auth-Name"
    jwt: str = "X-Auth-Identity"
    access_token: str = "X-Auth-Access-Token"

    @field_validator("*")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9\-]{1,64}", value):
            raise ValueError("a header name uses letters, digits and '-' only")
        return value


class Identity(_Section):
    headers: IdentityHeaders = Field(default_factory=IdentityHeaders)
    pass_access_token: bool = False
    jwt_audience: str = "upstream"
    jwt_ttl_s: int = Field(60, ge=5)
    signing_key_file: Path | None = None
    # More keys the JWKS lists but that never sign (PEM files, private or public Ed25519 keys): the
    # next key before it signs, the previous one after, so a key-file rotation works like a
    # secret's (docs/upstream.md, "Rotating the identity key").
    published_key_files: list[Path] = Field(default_factory=list)


class Access(_Section):
    public_paths: list[str] = Field(default_factory=list)
    allow_tenants: list[str] = Field(default_factory=list)
    trusted_proxies: list[str] = Field(default_factory=list)
    # CSP frame-ancestors of every gateway page: who may frame them (clickjacking). The in-client
    # webviews load the pages top-level, so nobody by default.
    frame_ancestors: list[str] = Field(default_factory=lambda: ["'none'"])

    @field_validator("frame_ancestors")
    @classmethod
    def _csp_sources(cls, values: list[str]) -> list[str]:
        for value in values:
            if not re.fullmatch(r"'none'|'self'|[A-Za-z][A-Za-z0-9+.-]*:(//[^\s;,']+)?|\*?[^\s;,':]+(:\d+)?", value):
                raise ValueError(f"{value!r} is not a CSP source such as 'self' or https://portal.example.com")
        if "'none'" in values and len(values) > 1:
            raise ValueError("'none' cannot be combined with other sources")
        return values
    # Forward-auth: the one request header that carries the original request URI, believed only
    # from a trusted proxy (nginx's recipe sets X-Original-URI; Traefik and Caddy X-Forwarded-Uri).
    forward_auth_uri_header: str = Field("X-Original-URI", pattern=r"^[A-Za-z0-9-]+$")
    # Origins allowed to open an authenticated WebSocket; empty: only public_url's own origin.
    websocket_origins: list[str] = Field(default_factory=list)

    @field_validator("websocket_origins")
    @classmethod
    def _origins(cls, values: list[str]) -> list[str]:
        for value in values:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
                raise ValueError(f"{value!r} is not an origin such as https://app.example.com")
        return [value.rstrip("/").lower() for value in values]

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address or CIDR") from None
        return values


class Limits(_Section):
    """Bounds on what anonymous clients can make the gateway's own endpoints do."""

    # Per client address on <prefix>/login, /exchange and /callback: a token bucket in each
    # replica, rate_per_min a minute and up to burst at once (each sign-in takes two); 0: no limit.
    login_rate_per_min: float = Field(30, ge=0)
    login_burst: int = Field(60, ge=1)
    # Bodies the gateway reads itself (/exchange, a plugin's event callback); JSON nesting depth.
    max_body_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_json_depth: int = Field(32, ge=4, le=1000)


class Metrics(_Section):
    # GET <prefix>/metrics in the Prometheus text format; counts only, no user or path in it.
    # The endpoint is on the app's public origin, so it answers only a scrape that proves itself:
    # the bearer token, or a peer listed in allow_from. Anything else gets 403 metrics_forbidden.
    enabled: bool = True
    # When set, a scrape may send ``Authorization: Bearer <token>``.
    bearer_token: SecretStr | None = None
    # Peers (IPs or CIDRs) served without the token, e.g. [127.0.0.1/32] for a Prometheus on the
    # same host. Never list a reverse proxy's address: it relays everyone's requests (a local
    # nginx makes every visitor a 127.0.0.1 peer).
    allow_from: list[IPvAnyNetwork] = Field(default_factory=list)

    def allows_peer(self, host: str | None) -> bool:
        """Whether the TCP peer ``host`` (the ASGI ``client``) is in ``allow_from``."""
        if not self.allow_from or host is None:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:  # a Unix socket or a test client's made-up name
            return False
        return any(address in network for network in self.allow_from)

    @field_validator("bearer_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        token = value.get_secret_value()
        if len(token) < 16:
            raise ValueError("use at least 16 characters (or null for no token)")
        if not re.fullmatch(r"[\x21-\x7e]+", token):
            raise ValueError("use printable ASCII without spaces (it travels in an HTTP header)")
        return value


RelayMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


def _get_only() -> list[RelayMethod]:
    return ["GET"]


class RelayRoute(_Section):
    """One provider Open API path reachable through ``<prefix>/api/<provider>/<path>`` (docs/relay.md)."""

    provider: str  # a name under providers:
    # A glob over <path> (``*`` also crosses ``/``), e.g. "open-apis/calendar/v4/*"; no leading "/".
    path: str = Field(min_length=1, max_length=512)
    methods: list[RelayMethod] = Field(default_factory=_get_only)
    token: Literal["user", "app"] = "user"
    # Scopes the user's grant must hold before the call; consent is asked first when one is missing.
    scopes: list[str] = Field(default_factory=list)

    @field_validator("path")
    @classmethod
    def _relative_glob(cls, value: str) -> str:
        if value.startswith("/") or "://" in value or any(c in value for c in ("\\", ";", "%", "..", "@")):
            raise ValueError("write the provider's path without a leading '/', e.g. open-apis/calendar/v4/*")
        return value

    @field_validator("scopes")
    @classmethod
    def _scope_names(cls, scopes: list[str]) -> list[str]:
        for scope in scopes:
            if not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,128}", scope):
                raise ValueError(f"{scope!r} is not a scope name")
        return scopes


class Relay(_Section):
    """Provider Open APIs through the gateway: nothing is reachable unless a route lists it."""

    routes: list[RelayRoute] = Field(default_factory=list)
    # Request bodies larger than this are refused (413 body_too_large) before anything is sent.
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    # Bodies up to this size are kept so the call can be made again after a token refresh; a
    # larger one streams straight through, and an expired-token answer to it is passed on as is.
    replay_body_bytes: int = Field(256 * 1024, ge=0)
    # Extra scopes /consent may ask for beyond the routes' own (scopes=... nothing else accepts).
    consent_scopes: list[str] = Field(default_factory=list)
    # A provider silent this long (connecting, or between two reads of its answer): 503
    # provider_unavailable. At most this many connections per provider host; a call waits at most
    # timeout_s for one of them.
    timeout_s: float = Field(10.0, gt=0)
    max_connections: int = Field(100, ge=1)


class GatewayConfig(BaseSettings):
    """The whole configuration. Build it with ``load_config`` (YAML) or directly in code."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    public_url: str = "http://127.0.0.1:8080"
    path_prefix: str = "/_gateway"
    listen: Listen = Field(default_factory=Listen)
    upstream: Upstream = Field(default_factory=Upstream)
    session: Session
    store: StoreConfig = Field(default_factory=StoreConfig)
    tokens: Tokens = Field(default_factory=Tokens)
    identity: Identity = Field(default_factory=Identity)
    access: Access = Field(default_factory=Access)
    metrics: Metrics = Field(default_factory=Metrics)
    logging: Logging = Field(default_factory=Logging)
    limits: Limits = Field(default_factory=Limits)
    relay: Relay = Field(default_factory=Relay)
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)

    _provider_settings: dict[str, ProviderSettings] = PrivateAttr(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # GATEWAY_<SECTION>__<KEY>_FILE is read like a <key>_file key of the YAML (read_secret_files).
        return (_FileKeysFromEnv(settings_cls, env_settings), init_settings)

    @field_validator("public_url")
    @classmethod
    def _origin(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be the external origin, e.g. https://app.example.com")
        return value.rstrip("/")

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9_\-.]+)+", value):
            raise ValueError("must look like /_gateway (no trailing slash)")
        return value

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, providers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, settings in providers.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,31}", name):
                raise ValueError(f"provider name {name!r}: use lower-case letters, digits, '_' and '-'")
            if not isinstance(settings, Mapping) or "plugin" not in settings:
                raise ValueError(f"provider {name!r} needs a 'plugin' key")
        return providers

    @model_validator(mode="after")
    def _validate_provider_settings(self) -> GatewayConfig:
        # Not a ValueError on purpose: the plugin's own error paths must survive intact.
        settings, errors = validate_providers(self.providers)
        if errors:
            raise ConfigFileError(errors)
        self._provider_settings = settings
        return self

    @model_validator(mode="after")
    def _relay_providers(self) -> GatewayConfig:
        # Not a ValueError, as above: the error names the route's own YAML path.
        errors = [(f"relay.routes[{index}].provider", f"{route.provider!r} is not a name under providers")
                  for index, route in enumerate(self.relay.routes) if route.provider not in self.providers]
        if errors:
            raise ConfigFileError(errors)
        return self

    def provider_settings(self) -> dict[str, ProviderSettings]:
        """Each provider's settings, validated by its plugin's model."""
        return dict(self._provider_settings)

    @property
    def origin(self) -> str:
        parts = urlsplit(self.public_url)
        return f"{parts.scheme}://{parts.netloc}"

    def redirect_uri(self, provider: str) -> str:
        return f"{self.public_url}{self.path_prefix}/callback/{provider}"


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigFileError(Exception):
    """The file cannot be used; ``errors`` lists each problem as ``(yaml path, message)``."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message in errors))
        self.errors = errors


def interpolate(value: Any, environ: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string of a YAML document; every unset
    variable of the document is reported at once (``ConfigFileError``)."""
    missing: list[tuple[str, str]] = []
    result = _interpolate(value, environ, path, missing)
    if missing:
        raise ConfigFileError(missing)
    return result


def _interpolate(value: Any, environ: Mapping[str, str], path: str, missing: list[tuple[str, str]]) -> Any:
    """``interpolate`` that appends ``(path, message)`` for each unset variable and goes on (an
    unset variable becomes ""), so the caller can still validate the rest of the file."""
    if isinstance(value, str):
        unset: list[str] = []

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            unset.append(name)
            return ""

        result = _VAR.sub(substitute, value)
        for name in dict.fromkeys(unset):
            missing.append((path or "<root>", f"environment variable {name} is not set "
                                              f"(or write ${{{name}:-default}} for a default)"))
        return result
    if isinstance(value, dict):
        return {key: _interpolate(item, environ, f"{path}.{key}" if path else str(key), missing)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, environ, f"{path}[{index}]", missing) for index, item in enumerate(value)]
    return value


def _error_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path or "<root>"


def _model_at(model: type[BaseModel] | None, location: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The section model found by following ``location`` (field names) down from ``model``."""
    for part in location:
        if model is None or isinstance(part, int):
            return None
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _where(parent: str) -> str:
    return f"under {parent}" if parent else "at the top level"


def _human_message(error: Any, location: tuple[int | str, ...], prefix: str, model: type[BaseModel] | None) -> str:
    """pydantic's message as a person would write it: what is wrong, and the likely fix."""
    kind, message = error["type"], str(error["msg"])
    parent = ".".join(part for part in (prefix, _error_path(location[:-1]) if location[:-1] else "") if part)
    if kind == "extra_forbidden" and location:
        key = str(location[-1])
        section = _model_at(model, location[:-1])
        known = list(section.model_fields) if section is not None else []
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" — did you mean `{close[0]}`?" if close else (f" (known keys: {', '.join(known)})" if known else "")
        return f"unknown key `{key}` {_where(parent)}{hint}"
    if kind == "missing" and location:
        return f"`{location[-1]}` is required {_where(parent)}"
    for noise in ("Value error, ", "Assertion failed, "):
        if message.startswith(noise):
            return message[len(noise):]
    return message


def validation_errors(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> list[tuple[str, str]]:
    """``(yaml path, human message)`` for each error of ``exc``; ``model`` (the validated model)
    lets an unknown key be matched with the keys its section has (a typo's likely fix)."""
    errors = []
    for error in exc.errors():
        location = tuple(part for part in error["loc"] if part not in ("function-after",))
        path = _error_path(location)
        errors.append((f"{prefix}.{path}" if prefix else path, _human_message(error, location, prefix, model)))
    return errors


def validate_providers(
    providers: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, ProviderSettings], list[tuple[str, str]]]:
    """Validate each provider's keys with its plugin's model; errors carry their YAML path."""
    settings: dict[str, ProviderSettings] = {}
    errors: list[tuple[str, str]] = []
    for name, raw in providers.items():
        if not isinstance(raw, Mapping) or "plugin" not in raw:
            continue  # reported by the field validator
        try:
            model = load_plugin(str(raw["plugin"])).settings_model
        except ConfigError as exc:
            errors.append((f"providers.{name}.plugin", exc.message))
            continue
        try:
            settings[name] = model.model_validate(raw)
        except ValidationError as exc:
            errors.extend(validation_errors(exc, prefix=f"providers.{name}", model=model))
    return settings, errors


FILE_SUFFIX = "_file"


def _section_fields(name: str, section: Mapping[str, Any], parent: str) -> Mapping[str, Any] | None:
    """The fields of the model that validates ``section`` (a top-level section, or a provider's
    keys: its plugin's settings model); None when unknown (left to validation to report)."""
    if parent == "providers":
        try:
            return load_plugin(str(section.get("plugin"))).settings_model.model_fields
        except ConfigError:
            return None
    model = _model_at(GatewayConfig, (name,)) if not parent else None
    return model.model_fields if model is not None else None


def _is_list(field: Any) -> bool:
    return getattr(field.annotation, "__origin__", None) is list


def read_secret_files(
    data: Mapping[str, Any], base_dir: Path | None = None
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``<key>_file: PATH`` in any section whose model has a field ``<key>`` (and none named
    ``<key>_file``, as ``identity.signing_key_file``) becomes ``<key>: <the file's content>``:
    secrets mounted as files (Kubernetes, Docker secrets, systemd credentials) instead of written
    in the YAML or the environment, e.g. ``session.secrets_file``, ``metrics.bearer_token_file``,
    ``store.url_file``, ``providers.lark.app_secret_file``. The trailing newline is dropped; for a
    list (``session.secrets_file``) each non-empty line is an item. A relative path is relative to
    ``base_dir`` (the config file's directory). Returns the data and the ``(yaml path, message)``
    of each file that cannot be used; the secret itself never appears in a message."""
    result = dict(data)
    errors: list[tuple[str, str]] = []

    def resolve(section: Mapping[str, Any], name: str, parent: str) -> dict[str, Any]:
        fields = _section_fields(name, section, parent)
        where = f"{parent}.{name}" if parent else name
        resolved = dict(section)
        for key, value in section.items():
            if not isinstance(key, str) or not key.endswith(FILE_SUFFIX) or fields is None:
                continue
            target = key[: -len(FILE_SUFFIX)]
            if key in fields or target not in fields:
                continue
            del resolved[key]
            if target in section:
                errors.append((f"{where}.{key}", f"set {target} or {key}, not both"))
                continue
            if not isinstance(value, str) or not value:
                errors.append((f"{where}.{key}", "must be the path of a file"))
                continue
            path = Path(value) if base_dir is None or Path(value).is_absolute() else base_dir / value
            try:
                content = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
                errors.append((f"{where}.{key}", f"cannot read {path}: {reason}"))
                continue
            items = [line.strip() for line in content.splitlines() if line.strip()]
            if not items:
                errors.append((f"{where}.{key}", f"{path} is empty"))
                continue
            resolved[target] = items if _is_list(fields[target]) else content.rstrip("\r\n")
        return resolved

    for name, section in data.items():
        if name == "providers" and isinstance(section, Mapping):
            result[name] = {provider: resolve(settings, provider, "providers") if isinstance(settings, Mapping)
                            else settings for provider, settings in section.items()}
        elif isinstance(section, Mapping):
            result[name] = resolve(section, str(name), "")
    return result, errors


class _FileKeysFromEnv(PydanticBaseSettingsSource):
    """The ``GATEWAY_*`` environment source, with its ``<key>_file`` values read from their files
    (``GATEWAY_SESSION__SECRETS_FILE=/run/secrets/gateway``, the Docker images' ``*_FILE``
    convention); a file that cannot be used is an error named by its variable."""

    def __init__(self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._inner = inner

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._inner.get_field_value(field, field_name)

    def __call__(self) -> dict[str, Any]:
        resolved, errors = read_secret_files(self._inner())
        if errors:
            raise ConfigFileError([("GATEWAY_" + where.upper().replace(".", "__"), message)
                                   for where, message in errors])
        return resolved


def build_config(data: Mapping[str, Any], *, base_dir: Path | None = None) -> GatewayConfig:
    """Validate a config mapping (already interpolated; ``*_file`` keys are read here, see
    ``read_secret_files``); env overrides apply on top."""
    data, file_errors = read_secret_files(data, base_dir)
    unreadable = {where[: -len(FILE_SUFFIX)] for where, _ in file_errors}
    try:
        config = GatewayConfig(**data)
    except ValidationError as exc:
        errors = validation_errors(exc, model=GatewayConfig)
        providers = data.get("providers")
        if isinstance(providers, Mapping):
            errors.extend(validate_providers(providers)[1])
        # A value whose file cannot be read is reported once, as such (not also as missing).
        raise ConfigFileError(file_errors + [e for e in errors if not _within(e[0], unreadable)]) from None
    except ConfigFileError as exc:  # a provider's own errors
        raise ConfigFileError(file_errors + [e for e in exc.errors if not _within(e[0], unreadable)]) from None
    if file_errors:
        raise ConfigFileError(file_errors)
    return config


def _within(path: str, roots: set[str]) -> bool:
    return any(path == root or path.startswith((root + ".", root + "[")) for root in roots)


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, interpolate and validate a YAML config file; every error of the file in one
    ``ConfigFileError`` (unset variables and invalid keys alike)."""
    environ = os.environ if environ is None else environ
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError([("<file>", f"cannot read {path}: {exc.strerror}")]) from None
    try:
        document = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<file>"
        raise ConfigFileError([(where, f"invalid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if not isinstance(document, dict):
        raise ConfigFileError([("<root>", "the file must hold a mapping of sections")])
    missing: list[tuple[str, str]] = []
    data = _interpolate(document, environ, "", missing)
    try:
        config = build_config(data, base_dir=Path(path).parent)
    except ConfigFileError as exc:
        # A value whose variable is unset is reported once, as unset (not also as "too short").
        unset = {where for where, _ in missing}
        raise ConfigFileError(missing + [e for e in exc.errors if not _within(e[0], unset)]) from None
    if missing:
        raise ConfigFileError(missing)
    return config


def masked_dict(config: GatewayConfig) -> dict[str, Any]:
    """The effective configuration as plain data, with every secret replaced by ``***``."""

    def mask(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return "***" if value.get_secret_value() else ""
        if isinstance(value, BaseModel):
            return {key: mask(getattr(value, key)) for key in type(value).model_fields}
        if isinstance(value, dict):
            return {key: mask(item) for key, item in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [mask(item) for item in value]
        if isinstance(value, Path):
            return str(value)
        if value is None or type(value) in (str, int, float, bool):
            return value
        # Anything else a plugin's model may hold (enums, URLs, dates) as plain data, so it prints.
        return to_jsonable_python(value)

    data: dict[str, Any] = mask(config)
    data["providers"] = {name: mask(settings) for name, settings in config.provider_settings().items()}
    return data
