"""gateway.bodies (issue 10, finding 9): bodies bounded in bytes, JSON bounded in depth; and the
endpoints that read a body (``/exchange``, DingTalk's event callback) answer 413/400, never 500."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import FEISHU_UA, GatewayStarter

DEEP = b"[" * 100_000 + b"]" * 100_000


def page_state(html: str) -> str:
    match = re.search(r'<script id="gw-config" type="application/json">(.*?)</script>', html, re.S)
    assert match
    return str(json.loads(match.group(1))["state"])


# -- the helper on its own -----------------------------------------------------------------------


def test_parse_json_refuses_deep_nesting_without_recursing() -> None:
    from gateway.bodies import InvalidJson, json_depth_exceeds, parse_json

    assert parse_json(b'{"a": [1, {"b": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}]}', max_depth=3) == {
        "a": [1, {"b": "[" * 36}]}  # brackets inside strings do not count
    assert parse_json(b'"\\"[[["', max_depth=1) == '"[[['
    for data in (DEEP, b'{"a":' * 50_000 + b"1" + b"}" * 50_000, b"[" * 33 + b"]" * 33):
        with pytest.raises(InvalidJson) as caught:
            parse_json(data, max_depth=32)
        assert caught.value.status_code == 400 and caught.value.code == "invalid_json"
    assert parse_json(b"[" * 32 + b"]" * 32, max_depth=32) is not None
    for bad in (b"{not json", b"\xff\xfe\x00", b""):
        with pytest.raises(InvalidJson):
            parse_json(bad)
    assert not json_depth_exceeds(b"[]" * 10_000, 1)


@pytest.fixture
async def echo_json() -> AsyncIterator[httpx.AsyncClient]:
    from gateway.bodies import read_json
    from gateway.errors import GatewayError

    async def endpoint(request: Request) -> JSONResponse:
        try:
            return JSONResponse({"body": await read_json(request, limit=1024)})
        except GatewayError as exc:
            return JSONResponse({"error": exc.code}, status_code=exc.status_code)

    app = Starlette(routes=[Route("/", endpoint, methods=["POST"])])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        yield http


async def test_read_body_stops_at_the_limit(echo_json: httpx.AsyncClient) -> None:
    assert (await echo_json.post("/", content=b'{"a": 1}')).json() == {"body": {"a": 1}}
    announced = await echo_json.post("/", content=b"x" * 2000)
    assert announced.status_code == 413 and announced.json()["error"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(100):
            yield b" " * 100

    streamed = await echo_json.post("/", content=chunks())
    assert streamed.status_code == 413 and streamed.json()["error"] == "body_too_large"
    exact = await echo_json.post("/", content=b'"' + b"x" * 1022 + b'"')
    assert exact.status_code == 200


# -- the endpoints -------------------------------------------------------------------------------


async def test_deep_json_on_exchange_is_a_400_not_a_500(
    start_gateway: GatewayStarter, caplog: pytest.LogCaptureFixture
) -> None:
    async with start_gateway() as running, running.client(FEISHU_UA) as client:
        origin = {"origin": running.url, "content-type": "application/json"}
        with caplog.at_level(logging.ERROR):
            deep = await client.post("/_gateway/exchange/lark", content=b"[" * 20_000 + b"]" * 20_000, headers=origin)
        assert deep.status_code == 400 and deep.json()["error"] == "invalid_json" and deep.json()["message"]
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]

        state = page_state((await client.get("/_gateway/login", headers={"accept": "text/html"})).text)
        nested = {"code": "x", "state": state, "context": {}}
        for _ in range(40):
            nested = {"code": "x", "state": state, "context": {}, "x": nested}
        assert (await client.post("/_gateway/exchange/lark", json=nested, headers=origin)).json()["error"] == \
            "invalid_json"


async def test_a_large_body_on_exchange_is_a_413(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client(FEISHU_UA) as client:
        origin = {"origin": running.url, "content-type": "application/json"}
        big = json.dumps({"code": "x", "state": "s", "pad": "p" * (1 << 20)}).encode()
        answer = await client.post("/_gateway/exchange/lark", content=big, headers=origin)
        assert answer.status_code == 413 and answer.json()["error"] == "body_too_large"


async def test_the_dingtalk_event_callback_bounds_its_body(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from starlette.routing import Mount

    from plugins.dingtalk.sandbox import DingTalkSandbox
    from tests.test_dingtalk_provider import BASE_URLS, make_provider

    sandbox = DingTalkSandbox()
    async with httpx.AsyncClient(transport=sandbox.transport(BASE_URLS)) as client:
        isv = make_provider(sandbox, client, isv=True, suite_ticket=sandbox.suite_ticket)
        app = Starlette(routes=[Mount("/_gateway/providers/dingtalk", routes=list(isv.routes()))])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://gw.test") as http:
            url = "/_gateway/providers/dingtalk/events?signature=x&timestamp=1&nonce=n"
            with caplog.at_level(logging.ERROR):
                deep = await http.post(url, content=DEEP[:20_000] + DEEP[-20_000:])
            assert deep.status_code == 400 and deep.json()["error"] == "invalid_json"
            big = await http.post(url, content=b'{"encrypt": "' + b"A" * (1 << 20) + b'"}')
            assert big.status_code == 413 and big.json()["error"] == "body_too_large"
            assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
