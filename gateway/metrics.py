"""What the gateway counts, served in the Prometheus text format at ``<prefix>/metrics``.

Counters only grow and live in this process (each replica is scraped on its own; sum them in
Prometheus). Every metric is declared once in ``METRICS`` with its help text and label names, so
the exposition is the same whether or not anything has happened yet. Counting is a dict update:
cheap enough for the per-request counters of the hot path.

Label values are bounded sets (results, error codes, configured provider names, ``client`` or
``browser``, upstream failure causes), never a user, a path or a token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
    "gateway_session_cache_entries": (
        "gauge", "Verified sessions cached in this process (session.cache_ttl_s).", ()),
    "gateway_store_entries": ("gauge", "Entries in the memory store (absent on Redis).", ()),
}

#: The results of ``gateway_requests_total`` and ``gateway_forward_auth_total``: ``denied`` is a
#: 4xx (tenant not allowed, session refused), ``error`` a 5xx (store or provider unreachable, a bug).
AUTHENTICATED, PUBLIC, LOGIN_REQUIRED, DENIED, ERROR = "authenticated", "public", "login_required", "denied", "error"


class Metrics:
    """The counters of one gateway (one ``Runtime``), and the gauges it reads when scraped."""

    def __init__(self) -> None:
        self._values: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in METRICS}
        self._gauges: dict[str, Callable[[], float | None]] = {}
        # The hot path's counters, bound once: ``requests[result] += 1``.
        self.requests: dict[tuple[str, ...], float] = self._values["gateway_requests_total"]
        self.forward_auth: dict[tuple[str, ...], float] = self._values["gateway_forward_auth_total"]
        for result in (AUTHENTICATED, PUBLIC, LOGIN_REQUIRED, DENIED, ERROR):
            self.requests[(result,)] = 0
            self.forward_auth[(result,)] = 0

    def inc(self, name: str, *labels: str, amount: float = 1) -> None:
        """Add ``amount`` to the counter ``name`` with these label values (in declared order)."""
        values = self._values[name]
        values[labels] = values.get(labels, 0) + amount

    @staticmethod
    def failure(status_code: int) -> tuple[str]:
        """The request-counter key of an answer that was not a success: ``denied`` or ``error``."""
        return (ERROR,) if status_code >= 500 else (DENIED,)

    def value(self, name: str, *labels: str) -> float:
        return self._values[name].get(labels, 0)

    def gauge(self, name: str, read: Callable[[], float | None]) -> None:
        """Read ``name`` from ``read()`` at each scrape (None: not exposed)."""
        self._gauges[name] = read

    def render(self) -> str:
        lines: list[str] = []
        for name, (kind, help_text, label_names) in METRICS.items():
            if kind == "gauge":
                read = self._gauges.get(name)
                value = read() if read is not None else None
                samples: Iterable[tuple[tuple[str, ...], float]] = [((), value)] if value is not None else []
            else:
                samples = sorted(self._values[name].items())
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, number in samples:
                lines.append(f"{name}{_labels(label_names, labels)} {_number(number)}")
        return "\n".join(lines) + "\n"


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{name}="{_escape(value)}"' for name, value in zip(names, values, strict=True))
    return "{" + pairs + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
