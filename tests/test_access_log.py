"""Issue 10, finding 16: the optional access log (``listen.access_log``) never records query
values: an OAuth callback's ``code`` and ``state``, DingTalk's ``authCode``, WeMeet's ``auth_code``,
or a token an app puts in a URL. ``gateway serve`` runs as users run it, and its output is read."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import BROWSER_UA, free_port
from tests.test_cli import running

CODE, STATE, TICKET, TOKEN = "CODEfa11ab1e", "STATEc0ffee42", "TICKETbadc0de9", "TOKENdeadbeef7"


def test_the_access_log_of_gateway_serve_shows_no_query_value(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "public_url": f"http://127.0.0.1:{port}",
        "listen": {"host": "127.0.0.1", "port": port, "access_log": True},
        "session": {"secrets": [secrets.token_urlsafe(32)], "secure": False},
    }))
    base = f"http://127.0.0.1:{port}"
    with running("serve", "--config", str(config), ready=f"{base}/_gateway/healthz") as process, \
            httpx.Client(base_url=base, headers={"user-agent": BROWSER_UA}, timeout=10) as client:
        client.get(f"/_gateway/callback/lark?code={CODE}&state={STATE}")
        client.get(f"/_gateway/callback/dingtalk?authCode={CODE}&state={STATE}")
        client.get(f"/_gateway/callback/wemeet?auth_code={CODE}")
        client.get(f"/files?access_token={TOKEN}&ticket={TICKET}")
        client.get(f"/odd?{CODE}")  # a part without '=' is a value too
        client.get("/plain/path")
        process.terminate()
        output = process.communicate(timeout=10)[0]
    assert "/plain/path" in output, output  # the log is on...
    for value in (CODE, STATE, TICKET, TOKEN):
        assert value not in output, output
    assert "/_gateway/callback/lark?code=***&state=***" in output  # ...and keeps the names


@pytest.mark.parametrize(("target", "logged"), [
    ("/x", "/x"),
    ("/x?", "/x?***"),
    ("/cb?code=a&state=b", "/cb?code=***&state=***"),
    ("/cb?authCode=a&flag&empty=", "/cb?authCode=***&***&empty=***"),
    ("/p%3Fq?x=%3D=", "/p%3Fq?x=***"),
])
def test_redact_query(target: str, logged: str) -> None:
    from gateway.cli import redact_query

    assert redact_query(target) == logged


def test_the_filter_rewrites_uvicorns_access_record() -> None:
    from gateway.cli import RedactQuery

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", f"/cb?code={CODE}", "1.1", 302), None)
    assert RedactQuery().filter(record)
    assert record.getMessage() == '127.0.0.1:5000 - "GET /cb?code=*** HTTP/1.1" 302'
