"""What the gateway counts, served in the Prometheus text format at ``<prefix>/metrics``.

The exposition is ``prometheus-client``'s, on a registry of this gateway's own (one per
``Runtime``, never the process-wide default one: several gateways in one process, as in the
tests or an app mounting two, each count their own). Every metric is declared in ``METRICS`` with
its help text and label names, so the exposition is the same whether or not anything has
happened yet. Values live in this process (each replica is scraped on its own; sum them in
Prometheus).

What a request may touch is plain Python updated with a few operations and turned into the
library's samples by a collector at scrape time: the two per-request counters
(``gateway_requests_total``, ``gateway_forward_auth_total``) are dict increments, and every
histogram is a ``BucketHistogram`` (per label set, a list of bucket counts bumped at
``bisect_left`` of the bounds, and a sum). A library counter's ``inc`` (a lock, two calls) costs
~4,400 instructions against ~840, a library ``Histogram.observe`` (two locks and a walk of the
bounds) ~9,400 against ~2,400 for a bucket bump (counted with callgrind): more than the 2% of the
middleware's budget the counters on the request path may take (docs/benchmarks.md). Lock-free is
safe because the gateway updates its metrics on its event loop's thread only. The other counters
(sign-ins, refreshes, logouts) are the library's own.

Gauges are read at scrape time: from a callback (``gauge``), or, for what only the store can
tell (``gateway_sessions_active``: Redis is asked), from a coroutine awaited by ``scrape`` before
the exposition is written (``gauge_async``).

Label values are bounded sets (results, error codes, configured provider names, ``client`` or
``browser``, method names, status classes, upstream failure causes), never a user, a path or a
token.
"""

from __future__ import annotations

import logging
import math
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import StoreUnavailable

log = logging.getLogger("gateway.metrics")

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
        "gauge", "Live sessions in the store: this process's (memory), or every replica's (redis: each replica "
        "answers the same count, take max, not sum, across them).", ()),
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
        self._async_gauges: dict[str, Callable[[], Awaitable[float | None]]] = {}
        self._async_values: dict[str, float | None] = {}
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, BucketHistogram] = {}
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
                histogram = BucketHistogram(name, help_text, label_names, _BUCKETS.get(name, _SLOW_BUCKETS))
                self._histograms[name] = histogram
                self.registry.register(histogram)
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

    def gauge_async(self, name: str, read: Callable[[], Awaitable[float | None]]) -> None:
        """Read ``name`` from ``await read()`` at each ``scrape`` (None, or the store unavailable:
        not exposed in that scrape). ``render`` alone shows the last scrape's value."""
        self._async_gauges[name] = read
        self._gauges[name] = lambda: self._async_values.get(name)

    async def scrape(self) -> str:
        """The exposition, with the async gauges read first (what ``<prefix>/metrics`` answers)."""
        for name, read in self._async_gauges.items():
            value: float | None = None
            try:
                value = await read()
            except StoreUnavailable:
                pass  # the store logs its outage once; the gauge is left out meanwhile
            except Exception:
                log.exception("reading the gauge %s failed", name)
            self._async_values[name] = value
        return self.render()

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


class BucketHistogram:
    """A histogram family counted in plain lists, exposed as the library's histogram samples
    (``_bucket`` cumulative with ``le``, ``_count``, ``_sum``, ``_created``: the library's layout).
    ``labels(*values)`` gives the series to ``observe`` into, as the library's histograms do."""

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self._name, self._help, self._label_names = name, help_text, label_names
        self.bounds = tuple(float(bound) for bound in buckets if bound != math.inf)
        # The library's spelling of ``le`` (its floatToGoString for these bounds): 0.005, 1.0, +Inf.
        self._le = [repr(bound) for bound in self.bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], HistogramSeries] = {}

    def labels(self, *values: str) -> HistogramSeries:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self._label_names):
                raise ValueError(f"{self._name} takes the labels {self._label_names}, not {values}")
            series = self._series[values] = HistogramSeries(self.bounds)
        return series

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self._name, self._help, "histogram")
        for values, series in list(self._series.items()):
            labels = dict(zip(self._label_names, values, strict=True))
            total = 0
            for le, count in zip(self._le, list(series.counts), strict=True):
                total += count
                metric.add_sample(self._name + "_bucket", {**labels, "le": le}, float(total))
            metric.add_sample(self._name + "_count", labels, float(total))
            metric.add_sample(self._name + "_sum", labels, series.sum)
            metric.add_sample(self._name + "_created", labels, series.created)
        yield metric


class HistogramSeries:
    """One label set of a ``BucketHistogram``: ``counts[i]`` observations in bucket i (not
    cumulative; the last one is +Inf), and their sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, the bucket ``le`` that value belongs to.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class TimedUpstream:
    """Sidecar: ``gateway_upstream_duration_seconds`` around the upstream proxy, from the call to
    the response head, labelled by its status class. WebSockets pass untimed (a connection's
    lifetime is no latency).

    A wrapper (the proxy stays free of metrics code): the per-request work is a timer read, a
    ``send`` wrapped in a closure and, at the response head, a dict lookup by status and a bucket
    bump. A hook in the proxy (``on_response_head(status)`` called where it sends
    ``http.response.start``) would save the closure and the extra ``send`` frame per message."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self._histogram = metrics._histograms["gateway_upstream_duration_seconds"]
        self._bounds = self._histogram.bounds
        self._by_status: dict[int, HistogramSeries] = {}  # at most the 500 valid statuses and "other"

    def _series(self, status: int) -> HistogramSeries:
        series = self._histogram.labels(status_class(status))
        if 100 <= status < 600:
            self._by_status[status] = series
        return series

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        by_status, bounds = self._by_status, self._bounds

        # A plain function handing back send's own awaitable: no coroutine of its own per message.
        def send_timed(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":  # once per response (ASGI)
                status = message["status"]
                series = by_status.get(status) or self._series(status)
                elapsed = time.perf_counter() - started
                series.counts[bisect_left(bounds, elapsed)] += 1  # HistogramSeries.observe, inlined
                series.sum += elapsed
            return send(message)

        await self.app(scope, receive, send_timed)

    def __getattr__(self, name: str) -> object:
        return getattr(self.app, name)  # the proxy's own attributes (health, ready_problem...)
