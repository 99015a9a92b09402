"""What the gateway counts, served in the Prometheus text format at ``<prefix>/metrics``.

The exposition is ``prometheus-client``'s, on a registry of this gateway's own (one per
``Runtime``, never the process-wide default one: several gateways in one process, as in the
tests or an app mounting two, each count their own). Every metric is declared in ``METRICS`` with
its help text and label names, so the exposition is the same whether or not anything has
happened yet. Values live in this process (each replica is scraped on its own; sum them in
Prometheus).

The two per-request counters (``gateway_requests_total``, ``gateway_forward_auth_total``) are
plain dict increments on the hot path, read by a collector at scrape time: a library counter's
``inc`` (a lock, two calls) costs more than the 2% of the middleware's budget they may take
(docs/benchmarks.md). Everything else uses the library's counters and histograms directly.

Label values are bounded sets (results, error codes, configured provider names, ``client`` or
``browser``, method names, status classes, upstream failure causes), never a user, a path or a
token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: name → (type, help, label names)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "gateway_requests_total": (
        "counter", "Requests for the app, by what the gateway did with them.", ("result",)),
    "gateway_forward_auth_total": (
        "counter", "Forward-auth checks (GET <prefix>/auth), by answer.", ("result",)),
    "gateway_logins_total": (
        "counter", "Sign-in attempts that reached the code exchange or the OAuth callback, by provider, "
        "flow and result (ok or the error code).",
        ("provider", "flow", "result")),
    "gateway_token_refreshes_total": (
        "counter", "User-token refreshes sent to the provider, by result.", ("provider", "result")),
    "gateway_logouts_total": ("counter", "Sessions ended by the user (POST <prefix>/logout).", ()),
    "gateway_upstream_failures_total": (
        "counter", "Sidecar: attempts to reach the upstream that failed (requests answered 502/504, WebSocket "
        "connects, readyz probes), by cause: refused, timeout, reset, unreachable, invalid.", ("cause",)),
    "gateway_provider_request_duration_seconds": (
        "histogram", "Calls to an identity provider (code exchange, token refresh, user info...), by provider, "
        "operation (the provider method) and outcome (ok or the error code).", ("provider", "operation", "outcome")),
    "gateway_store_operation_duration_seconds": (
        "histogram", "Store operations, by backend (memory, redis), operation and outcome (ok, unavailable, "
        "error).", ("backend", "operation", "outcome")),
    "gateway_refresh_lock_wait_seconds": (
        "histogram", "Time spent waiting for a store lock (a token refresh's single flight across replicas), by "
        "lock (refresh: a user's token, app: an app token) and outcome (acquired, timeout, unavailable).",
        ("lock", "outcome")),
    "gateway_upstream_duration_seconds": (
        "histogram", "Sidecar: time until the upstream's response head (or the failure), by status class "
        "(2xx, 3xx, 4xx, 5xx; 502/504 include the gateway's own answer when the upstream failed).",
        ("status_class",)),
    "gateway_sessions_active": (
        "gauge", "Sessions held in the memory store (absent on Redis: counting them there needs a scan).", ()),
    "gateway_session_cache_entries": (
        "gauge", "Verified sessions cached in this process (session.cache_ttl_s).", ()),
    "gateway_store_entries": ("gauge", "Entries in the memory store (absent on Redis).", ()),
}

#: The results of ``gateway_requests_total`` and ``gateway_forward_auth_total``: ``denied`` is a
#: 4xx (tenant not allowed, session refused), ``error`` a 5xx (store or provider unreachable, a bug).
AUTHENTICATED, PUBLIC, LOGIN_REQUIRED, DENIED, ERROR = "authenticated", "public", "login_required", "denied", "error"
_HOT = ("gateway_requests_total", "gateway_forward_auth_total")

# Provider calls and upstream answers take milliseconds to seconds; a store operation far less.
_SLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
_BUCKETS = {"gateway_store_operation_duration_seconds": _FAST_BUCKETS}


class Metrics:
    """The metrics of one gateway (one ``Runtime``), on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._gauges: dict[str, Callable[[], float | None]] = {}
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        # The hot path's counters, bound once: ``requests[(result,)] += 1``.
        self.requests: dict[tuple[str, ...], float] = {}
        self.forward_auth: dict[tuple[str, ...], float] = {}
        for result in (AUTHENTICATED, PUBLIC, LOGIN_REQUIRED, DENIED, ERROR):
            self.requests[(result,)] = 0
            self.forward_auth[(result,)] = 0
        self._hot = {"gateway_requests_total": self.requests, "gateway_forward_auth_total": self.forward_auth}
        # Registered in declaration order: the exposition keeps it.
        for name, (kind, help_text, label_names) in METRICS.items():
            if name in _HOT:
                self.registry.register(_DictCounters(name, help_text, label_names, self._hot[name]))
            elif kind == "counter":
                self._counters[name] = Counter(name, help_text, label_names, registry=self.registry)
            elif kind == "histogram":
                self._histograms[name] = Histogram(name, help_text, label_names, registry=self.registry,
                                                   buckets=_BUCKETS.get(name, _SLOW_BUCKETS))
            else:
                self.registry.register(_ReadGauge(name, help_text, self._gauges))

    def inc(self, name: str, *labels: str, amount: float = 1) -> None:
        """Add ``amount`` to the counter ``name`` with these label values (in declared order);
        ``amount=0`` declares the series (it is then exposed at 0)."""
        hot = self._hot.get(name)
        if hot is not None:
            hot[labels] = hot.get(labels, 0) + amount
            return
        counter = self._counters[name]
        (counter.labels(*labels) if labels else counter).inc(amount)

    def observe(self, name: str, seconds: float, *labels: str) -> None:
        """One observation of the histogram ``name``."""
        self._histograms[name].labels(*labels).observe(seconds)

    @staticmethod
    def failure(status_code: int) -> tuple[str]:
        """The request-counter key of an answer that was not a success: ``denied`` or ``error``."""
        return (ERROR,) if status_code >= 500 else (DENIED,)

    def value(self, name: str, *labels: str) -> float:
        hot = self._hot.get(name)
        if hot is not None:
            return hot.get(labels, 0)
        label_names = METRICS[name][2]
        sample = name if METRICS[name][0] != "histogram" else name + "_count"
        found = self.registry.get_sample_value(sample, dict(zip(label_names, labels, strict=True)))
        return found or 0

    def gauge(self, name: str, read: Callable[[], float | None]) -> None:
        """Read ``name`` from ``read()`` at each scrape (None: not exposed)."""
        self._gauges[name] = read

    def render(self) -> str:
        return generate_latest(self.registry).decode("utf-8")


class _DictCounters:
    """A counter family whose values a dict holds (the hot path's), exposed by the library."""

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...],
                 values: dict[tuple[str, ...], float]) -> None:
        self._name, self._help, self._labels, self._values = name, help_text, label_names, values

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._help, labels=self._labels)
        for labels, value in sorted(self._values.items()):
            family.add_metric(labels, value)
        yield family


class _ReadGauge:
    """A gauge read from a callback at scrape time; no sample when it answers None."""

    def __init__(self, name: str, help_text: str, reads: dict[str, Callable[[], float | None]]) -> None:
        self._name, self._help, self._reads = name, help_text, reads

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._help)
        read = self._reads.get(self._name)
        value = read() if read is not None else None
        if value is not None:
            family.add_metric([], value)
        yield family


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class TimedUpstream:
    """Sidecar: ``gateway_upstream_duration_seconds`` around the upstream proxy, from the call to
    the response head, labelled by its status class. WebSockets pass untimed (a connection's
    lifetime is no latency)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self._histogram = metrics._histograms["gateway_upstream_duration_seconds"]
        self._by_class = {f"{digit}xx": self._histogram.labels(f"{digit}xx") for digit in range(1, 6)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        timed = False

        async def send_timed(message: Message) -> None:
            nonlocal timed
            if not timed and message["type"] == "http.response.start":
                timed = True
                label = status_class(message["status"])
                child = self._by_class.get(label) or self._histogram.labels(label)
                child.observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, send_timed)

    def __getattr__(self, name: str) -> object:
        return getattr(self.app, name)  # the proxy's own attributes (health, ready_problem...)
