"""Whether the sidecar's upstream answers: one log line when it stops, one when it answers again.

A down upstream turns every request into a 502/504 page; logging each of them would bury the
cause under thousands of identical lines. ``UpstreamHealth`` keeps one bit (``down``): the first
failure of a burst logs a WARNING with the upstream's address and the cause, the failures after it
are only counted (``gateway_upstream_failures_total{cause}``), and the first answer after a burst
logs one line with what the burst cost. The proxy calls ``failed`` and, on the hot path, tests
``down`` before calling ``answered`` (one attribute read per request while all is well).

Causes are a bounded set (``CAUSES``), never a path or a header: the label and the log say what
happened to the connection, not what was asked.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections import Counter

from gateway.metrics import Metrics

log = logging.getLogger("gateway.upstream")

#: cause label → how the log line says it.
CAUSES: dict[str, str] = {
    "refused": "connection refused",
    "timeout": "no answer in time",
    "reset": "connection reset or closed before the answer",
    "unreachable": "no route to it, or its name does not resolve",
    "invalid": "an answer the gateway cannot pass on safely",
}
FAILURES = "gateway_upstream_failures_total"


def os_error_cause(exc: BaseException) -> str:
    """The cause label of a failed connect, read, write or TLS handshake."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return "refused"
    if isinstance(exc, ConnectionError) or getattr(exc, "errno", None) in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    if isinstance(exc, socket.gaierror):
        return "unreachable"
    if isinstance(exc, ssl.SSLError):  # a TLS handshake that failed (certificate, protocol)
        return "invalid"
    # A name with several addresses (localhost: ::1 and 127.0.0.1), each refused: asyncio raises
    # one OSError("Multiple exceptions: [Errno 111] ...") without an errno of its own.
    if isinstance(exc, OSError) and f"[Errno {errno.ECONNREFUSED}]" in str(exc):
        return "refused"
    return "unreachable"


class UpstreamHealth:
    """The failure bursts of one upstream (its ``address``: host and port, never credentials)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.down = False
        self._metrics: Metrics | None = None
        self._burst: Counter[str] = Counter()
        self._since = 0.0

    def count_into(self, metrics: Metrics) -> None:
        """Count failures in ``metrics`` (every cause shown from the start, at 0)."""
        self._metrics = metrics
        for cause in CAUSES:
            metrics.inc(FAILURES, cause, amount=0)

    def failed(self, cause: str, detail: BaseException | str | None = None) -> None:
        if self._metrics is not None:
            self._metrics.inc(FAILURES, cause)
        self._burst[cause] += 1
        if self.down:
            return
        self.down, self._since = True, time.monotonic()
        reason = f" ({_short(detail)})" if detail else ""
        log.warning("upstream %s is failing: %s%s; requests for the app get 502/504 until it answers again",
                    self.address, CAUSES.get(cause, cause), reason)

    def answered(self) -> None:
        """The upstream answered: ends a burst (one line), nothing otherwise."""
        if not self.down:
            return
        failures = sum(self._burst.values())
        causes = ", ".join(f"{cause} {count}" for cause, count in self._burst.most_common())
        log.warning("upstream %s answers again, after %d failed attempt%s in %.1f s (%s)", self.address,
                    failures, "" if failures == 1 else "s", time.monotonic() - self._since, causes)
        self.down = False
        self._burst.clear()


def _short(detail: BaseException | str) -> str:
    text = str(detail) or type(detail).__name__
    return text if len(text) <= 200 else text[:197] + "..."
