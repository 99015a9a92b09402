"""Issue 13, logs: ``logging: {format, level}``, one event per line in the common JSON schema
(time, level, logger, message, then the event's fields), the same in text, uvicorn's own lines
and its access log in the same format."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.config import GatewayConfig, Logging
from gateway.logs import (
    AUDIT_FIELDS,
    JsonFormatter,
    TextFormatter,
    audit,
    new_request_id,
    request_id,
    resolve_format,
)
from tests.conftest import BROWSER_UA, free_port
from tests.test_cli import running


def _record(logger: str, level: int, message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.getLogger(logger).makeRecord(logger, level, __file__, 1, message, args, None, extra=extra)
    return record


def test_the_logging_section_defaults_and_validation() -> None:
    settings = GatewayConfig(session={"secrets": [secrets.token_urlsafe(32)]})
    assert settings.logging == Logging(format="auto", level="INFO")
    assert Logging(level="debug").level == "DEBUG"  # Python's spelling, case aside
    with pytest.raises(ValueError, match="format"):
        Logging(format="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        Logging(level="LOUD")  # type: ignore[arg-type]


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Terminal()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", Terminal()) == "json" and resolve_format("text", io.StringIO()) == "text"


def test_a_json_line_has_the_schema_fields_then_the_request_id_and_event_fields() -> None:
    token = request_id.set("rid-123")
    try:
        line = JsonFormatter().format(_record("gateway.x", logging.WARNING, "hello %s", "world",
                                              event_fields={"event": "thing.done", "provider": "lark"}))
    finally:
        request_id.reset(token)
    assert "\n" not in line
    fields = json.loads(line)
    assert list(fields)[:4] == ["time", "level", "logger", "message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", fields["time"])
    assert fields["level"] == "WARNING" and fields["logger"] == "gateway.x" and fields["message"] == "hello world"
    assert fields["request_id"] == "rid-123" and fields["event"] == "thing.done" and fields["provider"] == "lark"
    outside = json.loads(JsonFormatter().format(_record("gateway.x", logging.INFO, "no request")))
    assert "request_id" not in outside


def test_an_exception_stays_on_one_json_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("gateway.x").makeRecord(
            "gateway.x", logging.ERROR, __file__, 1, "failed", (), exc_info=__import__("sys").exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


def test_a_text_line_reads_as_a_sentence_with_its_fields() -> None:
    token = request_id.set("rid-9")
    try:
        line = TextFormatter().format(_record("gateway.audit", logging.INFO, "login.succeeded",
                                              event_fields={"event": "login.succeeded", "tenant": "t 1"}))
    finally:
        request_id.reset(token)
    assert re.fullmatch(r"\S+Z INFO gateway\.audit: login\.succeeded request_id=rid-9 tenant=\"t 1\"", line), line


def test_audit_takes_only_the_allowed_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        audit("login.failed", provider="lark", flow="client", error="code_invalid", client_ip="10.0.0.7")
        with pytest.raises(TypeError):
            audit("login.succeeded", access_token="at-1")  # type: ignore[call-arg]
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.getMessage() == "login.failed"
    fields = record.event_fields  # type: ignore[attr-defined]
    assert fields == {"event": "login.failed", "provider": "lark", "flow": "in-client", "client_ip": "10.0.0.7",
                      "error": "code_invalid"}
    assert set(fields) - {"event"} <= set(AUDIT_FIELDS)


def test_request_ids_are_fresh() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(r"[0-9a-f]{16}", value) for value in ids)


@pytest.mark.parametrize("format", ["json", "text"])
def test_gateway_serve_writes_uvicorn_and_access_lines_in_the_configured_format(tmp_path: Path, format: str) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "public_url": f"http://127.0.0.1:{port}",
        "listen": {"host": "127.0.0.1", "port": port, "access_log": True},
        "session": {"secrets": [secrets.token_urlsafe(32)], "secure": False},
        "logging": {"format": format, "level": "info"},
    }))
    base = f"http://127.0.0.1:{port}"
    with running("serve", "--config", str(config), ready=f"{base}/_gateway/healthz") as process, \
            httpx.Client(base_url=base, headers={"user-agent": BROWSER_UA}, timeout=10) as client:
        client.get("/_gateway/callback/lark?code=SECRETCODE1&state=SECRETSTATE1")
        process.terminate()
        output = process.communicate(timeout=10)[0]
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, output
    assert "SECRETCODE1" not in output and "SECRETSTATE1" not in output
    if format == "json":
        parsed = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all({"time", "level", "logger", "message"} <= set(item) for item in parsed)
        assert any(item["logger"] == "uvicorn.error" and "Uvicorn running" in item["message"] for item in parsed)
        [access] = [item for item in parsed if item["logger"] == "uvicorn.access" and "callback" in item["message"]]
        assert access["event"] == "http.access" and access["method"] == "GET" and access["status"] >= 400
        assert access["path"] == "/_gateway/callback/lark?code=***&state=***"
        assert re.fullmatch(r"[0-9a-f]{16}", access["request_id"])  # the access line knows its request
    else:
        assert not any(line.startswith("{") for line in lines)
        assert any(re.match(r"\S+Z INFO uvicorn\.error: Uvicorn running", line) for line in lines), output
        access_lines = [line for line in lines if "uvicorn.access" in line and "callback" in line]
        assert access_lines and "request_id=" in access_lines[0] and "code=***" in access_lines[0]
