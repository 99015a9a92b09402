"""What the gateway writes to its log: one event per line, JSON or text, with the request's id.

``logging: {format: json | text | auto, level}``. A JSON line holds the fields of the common JSON
log schema, ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``, then the
request's ``request_id`` and the event's own fields; a text line holds the same, readable
(``2026-12-03T18:20:01.123Z INFO gateway.audit: login.succeeded provider=lark ...``). uvicorn's own
lines and its access log go through the same formatters (``uvicorn_log_config``).

**The request id** lives in a context variable set by ``AuthGateway`` for the whole request
(every coroutine the request runs, every log line it writes, the provider calls it makes and the
error page it answers read it from there); the client's address (``request_client_ip``) beside
it, for the audit events.

**Audit events** (``audit``) have their own names and take only the fields listed in
``AUDIT_FIELDS``: a token, a code, a cookie, a secret or ``state`` cannot be passed to one, so
none can reach the log through it (tests/test_log_secrets.py scans a full run for them anyway).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextvars import ContextVar
from typing import Any, Literal

#: The id of the request being served (None outside a request).
request_id: ContextVar[str | None] = ContextVar("gateway_request_id", default=None)
#: The client address of the request being served (``client_ip``: the trusted-proxy rule), bound
#: by ``AuthGateway`` once a request leaves its fast path (a session not in the cache, the
#: gateway's own endpoints: where audit events are written), so an event written deep inside the
#: request (a token refresh in gateway/tokens.py) carries it without every caller passing it
#: along. A task started by a request copies its context: a single-flight refresh started by
#: request X and awaited by Y logs X's address (the request that made the provider call).
request_client_ip: ContextVar[str | None] = ContextVar("gateway_request_client_ip", default=None)


def new_request_id() -> str:
    """A fresh id: 16 hex digits of os.urandom (unique across replicas without coordination, and
    a single cheap call on the hot path; docs/benchmarks.md)."""
    return os.urandom(8).hex()


#: What a request id from a trusted proxy may look like: printable ASCII, bounded. Anything else
#: is replaced (it is echoed into logs and error pages).
_MAX_REQUEST_ID = 128


def acceptable_request_id(value: bytes) -> str | None:
    """A proxy-sent ``X-Request-Id`` as the gateway uses it, or None when it is unfit (empty,
    too long, not printable ASCII: it would be written into every log line)."""
    if not value or len(value) > _MAX_REQUEST_ID or not all(0x21 <= byte <= 0x7E for byte in value):
        return None
    return value.decode("ascii")


AuditEvent = Literal["login.succeeded", "login.failed", "logout", "token.refreshed", "token.refresh_failed",
                     "consent.granted", "consent.denied", "consent.failed"]
#: The only fields an audit event carries: who, where, through what, the scopes a consent was
#: about (names, never a grant), and the outcome's code.
AUDIT_FIELDS = ("provider", "flow", "tenant", "user_id", "client_ip", "scopes", "error", "outcome")
FLOWS = {"client": "in-client", "browser": "browser"}

audit_log = logging.getLogger("gateway.audit")


def audit(
    event: AuditEvent,
    *,
    provider: str | None = None,
    flow: str | None = None,
    tenant: str | None = None,
    user_id: str | None = None,
    client_ip: str | None = None,
    scopes: str | None = None,
    error: str | None = None,
    outcome: Literal["transient", "definitive", "pending_admin"] | None = None,
) -> None:
    """Write one audit event (INFO, logger ``gateway.audit``; ``login.failed`` and
    ``token.refresh_failed``, ``consent.failed`` at WARNING). ``flow`` is ``client`` or ``browser`` (logged as
    ``in-client`` / ``browser``), ``error`` the stable error code. Only these fields exist: there
    is no way to hand it a token. ``client_ip`` defaults to the request's (``request_client_ip``)."""
    if not audit_log.isEnabledFor(logging.WARNING if event.endswith("failed") else logging.INFO):
        return
    if client_ip is None:
        client_ip = request_client_ip.get()
    values = (provider, FLOWS.get(flow, flow) if flow else None, tenant, user_id, client_ip, scopes, error, outcome)
    fields = {"event": event, **{name: value for name, value in zip(AUDIT_FIELDS, values, strict=True)
                                if value is not None}}
    audit_log.log(logging.WARNING if event.endswith("failed") else logging.INFO, event,
                  extra={"event_fields": fields})


# -- formatting -------------------------------------------------------------------------------------

def _time(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


# What every LogRecord has (and uvicorn's colour copy of its message): not event fields.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message", "asctime", "event_fields", "color_message", "taskName"}


def _fields(record: logging.LogRecord, *, access_parts: bool = True) -> dict[str, Any]:
    """The event's own fields: ``extra={"event_fields": {...}}``, the request id, uvicorn's
    access-log parts (a text line has them in its message already)."""
    fields: dict[str, Any] = {}
    rid = request_id.get()
    if rid is not None:
        fields["request_id"] = rid
    event_fields = getattr(record, "event_fields", None)
    if isinstance(event_fields, dict):
        fields.update(event_fields)
    for name, value in record.__dict__.items():  # other ``extra={...}`` values, as given
        if name not in _RECORD_ATTRIBUTES:
            fields.setdefault(name, value)
    args = record.args
    if access_parts and record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
        # (client_addr, method, full_path, http_version, status_code); the path is already
        # redacted by gateway.cli.RedactQuery, which runs before any formatter.
        fields.update(event="http.access", client=args[0], method=args[1], path=args[2],
                      http_version=args[3], status=args[4])
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the event's fields, then
    ``exception`` (the traceback as text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": _time(record), "level": record.levelname, "logger": record.name,
                                "message": record.getMessage()}
        for name, value in _fields(record).items():
            line.setdefault(name, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an odd value in an event field is written, never the reason a line is lost.
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``; a traceback follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record, access_parts=False)
        if fields.get("event") == record.msg:
            del fields["event"]  # an audit event's message is its name already
        pairs = "".join(f" {name}={_text_value(value)}" for name, value in fields.items())
        line = f"{_time(record)} {record.levelname} {record.name}: {record.getMessage()}{pairs}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if not text or any(c in text for c in ' "=\n') else text


def resolve_format(format: str, stream: Any = None) -> Literal["json", "text"]:
    """``auto``: text when the stream (stderr) is a terminal, JSON otherwise."""
    if format == "auto":
        stream = sys.stderr if stream is None else stream
        isatty = getattr(stream, "isatty", None)
        return "text" if isatty is not None and isatty() else "json"
    return "text" if format == "text" else "json"


def formatter_for(format: str) -> logging.Formatter:
    return TextFormatter() if resolve_format(format) == "text" else JsonFormatter()


# Loggers kept at WARNING whatever the level: httpx logs every provider call's URL at INFO, query
# included (DingTalk's ``access_token=...``), and httpcore's DEBUG lines describe connections.
QUIET_LOGGERS = ("httpx", "httpcore")


def configure(format: str = "auto", level: str = "INFO") -> None:
    """Send every log line of this process to stderr in ``format`` from ``level`` up (the CLI's
    setup; an app using the middleware keeps its own and may call this or use the formatters)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(format))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


def uvicorn_log_config(format: str = "auto", level: str = "INFO") -> dict[str, Any]:
    """uvicorn's ``log_config``: its loggers (``uvicorn.error``, ``uvicorn.access``) on the
    gateway's formatter, one stderr handler; ``RedactQuery`` is added by gateway.cli."""
    formatter = "gateway.logs.TextFormatter" if resolve_format(format) == "text" else "gateway.logs.JsonFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": formatter}, "access": {"()": formatter}},
        "handlers": {
            "default": {"formatter": "default", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
            "access": {"formatter": "access", "class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


def client_ip(scope: Any, trusted: Any) -> str | None:
    """The client's address for an audit event: the TCP peer, or, when the peer is a trusted
    proxy (``trusted``: ``gateway.edge.TrustedProxies``), the right-most X-Forwarded-For hop that
    is not one (the same rule as the rate limiter's ``client_key``, without its IPv6 /64)."""
    client = scope.get("client")
    peer: str | None = client[0] if client else None
    if peer and peer in trusted:
        forwarded = [value.decode("latin-1") for name, value in scope["headers"] if name == b"x-forwarded-for"]
        for hop in reversed(",".join(forwarded).split(",")):
            hop = hop.strip()
            if hop and hop not in trusted:
                return hop[:64]  # written into a log line: bounded
    return peer
