"""The gateway's pages and error answers in the request's language, over real sockets (the Lark
emulator, AuthGateway around the echo app on a real port); and a ``public_url`` whose host is not
the browser's, said as such instead of "started in another browser"."""

from __future__ import annotations

import json
import logging
import re
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import FEISHU_UA, HTML, GatewayStarter, RunningGateway, ServedLark

ZH_CLIENT = {"accept-language": "zh-Hans-CN"}  # what DingTalk and Tencent Meeting send
ZH_CHROMIUM = {"accept-language": "zh-CN,zh;q=0.9"}
EN_BROWSER = {"accept-language": "en-US,en;q=0.9"}


def html_lang(answer: httpx.Response) -> str:
    found = re.match(r"<!doctype html><html lang=([A-Za-z-]+)>", answer.text)
    assert found, answer.text[:80]
    return found.group(1)


def assert_language(answer: httpx.Response, locale: str) -> None:
    assert answer.headers["content-language"] == locale
    assert "accept-language" in answer.headers["vary"].lower()


async def test_an_error_page_in_chinese_and_in_english(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        zh = await client.get("/_gateway/login?provider=nope", headers={**HTML, **ZH_CLIENT})
        en = await client.get("/_gateway/login?provider=nope", headers={**HTML, **EN_BROWSER})
    for answer in (zh, en):
        assert answer.status_code == 404 and answer.headers["content-type"].startswith("text/html")
        assert "unknown_provider" in answer.text  # the stable code, as a labelled detail
    assert html_lang(zh) == "zh-Hans" and html_lang(en) == "en"
    assert_language(zh, "zh-Hans")
    assert_language(en, "en")
    assert "<title>找不到页面</title>" in zh.text and "没有配置这种登录方式。" in zh.text
    assert "错误代码：<code>unknown_provider</code>" in zh.text
    # The English sentence names the provider: kept as the folded detail of the Chinese page.
    assert ("<details><summary>详细信息（英文）</summary>"
            "<p>No provider named &#x27;nope&#x27; is configured.</p>") in zh.text
    assert "Error code: <code>unknown_provider</code>" in en.text
    assert "<title>Not found</title>" in en.text and "No provider named &#x27;nope&#x27; is configured." in en.text
    assert "<details>" not in en.text and "找不到" not in en.text


async def test_json_errors_keep_their_code_and_speak_the_language(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        answers = {
            name: await client.post("/_gateway/exchange/lark", content=b"{}",
                                    headers={"content-type": "text/plain", **headers})
            for name, headers in (("zh", ZH_CLIENT), ("en", EN_BROWSER), ("none", {}))
        }
    for answer in answers.values():
        assert answer.status_code == 415 and answer.json()["error"] == "unsupported_media_type"
    assert answers["zh"].json()["message"] == "请以 JSON 格式发送登录码。"
    assert answers["en"].json()["message"] == answers["none"].json()["message"] == "Send the code as JSON."
    assert_language(answers["zh"], "zh-Hans")
    assert_language(answers["none"], "en")


async def test_the_sign_in_required_answer_and_its_button(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        page = await client.post("/inbox", headers={**HTML, **ZH_CHROMIUM})
        api = await client.get("/_gateway/me", headers=ZH_CHROMIUM)
    assert page.status_code == 401 and html_lang(page) == "zh-Hans"
    assert "<title>请登录</title>" in page.text and "你尚未登录。" in page.text
    assert re.search(r'<a class="button" href="/_gateway/login\?next=%2Finbox">登录</a>', page.text)
    assert api.status_code == 401 and api.json()["error"] == "login_required"
    assert api.json()["message"] == "你尚未登录。"


async def test_the_handshake_page_in_chinese(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client(user_agent=FEISHU_UA) as client:
        zh = await client.get("/_gateway/login?next=/inbox", headers={**HTML, **ZH_CHROMIUM})
        en = await client.get("/_gateway/login?next=/inbox", headers={**HTML, **EN_BROWSER})
    assert zh.status_code == en.status_code == 200
    assert html_lang(zh) == "zh-Hans" and html_lang(en) == "en"
    assert_language(zh, "zh-Hans")
    assert '<h1 id="gw-title">正在通过飞书登录</h1>' in zh.text
    assert '<h1 id="gw-title">Signing in with Feishu</h1>' in en.text
    zh_config, en_config = (json.loads(re.search(r'<script id="gw-config" type="application/json">(.*?)</script>',
                                                 answer.text).group(1)) for answer in (zh, en))  # type: ignore[union-attr]
    assert zh_config["lang"] == "zh-Hans" and en_config["lang"] == "en"
    assert zh_config["messages"]["tryAgain"] == "重试" and en_config["messages"]["tryAgain"] == "Try again"
    assert zh_config["messages"]["connectingTo"] == "正在连接飞书…"
    assert set(zh_config["messages"]) == set(en_config["messages"])
    # The same policy in both languages: no inline script, the style allowed by its hash only.
    assert zh.headers["content-security-policy"] == en.headers["content-security-policy"]
    assert "unsafe-inline" not in zh.headers["content-security-policy"]


@pytest.mark.parametrize(("header", "locale"), [("zh-TW", "zh-Hans"), ("zh-TW,en;q=0.8", "en"),
                                                ("en;q=0.3,zh-CN;q=0.7", "zh-Hans"), ("ja", "en")])
async def test_which_language_a_page_gets(start_gateway: GatewayStarter, header: str, locale: str) -> None:
    async with start_gateway() as running, running.client() as client:
        answer = await client.get("/_gateway/callback/lark?error=approval_pending",
                                  headers={**HTML, "accept-language": header})
    assert answer.status_code == 403 and html_lang(answer) == locale
    assert_language(answer, locale)
    assert ("等待管理员审批" in answer.text) == (locale == "zh-Hans")


async def test_the_signed_out_page_in_chinese(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        answer = await client.post("/_gateway/logout", headers={**HTML, **ZH_CLIENT, "origin": running.url})
    assert answer.status_code == 200 and html_lang(answer) == "zh-Hans"
    assert "你已退出登录。" in answer.text and ">重新登录</a>" in answer.text


# -- public_url and the address the browser uses ------------------------------------------------


def other_address(running: RunningGateway) -> str:
    """The gateway's own socket, named as a user might type it: localhost, not public_url's 127.0.0.1."""
    return running.url.replace("127.0.0.1", "localhost")


async def test_a_login_started_at_another_host_is_explained_at_the_callback(
    start_gateway: GatewayStarter, lark: ServedLark, caplog: pytest.LogCaptureFixture
) -> None:
    async with start_gateway() as running:
        port = urlsplit(running.url).port
        # The browser is at localhost: its login cookie belongs to localhost. The provider sends it
        # back to public_url (127.0.0.1), where that cookie is not sent.
        async with running.client() as at_localhost, running.client() as at_public_url:
            with caplog.at_level(logging.WARNING, logger="gateway.handshake"):
                for _ in range(2):
                    login = await at_localhost.get("/_gateway/login?next=/inbox",
                                                   headers={**HTML, **ZH_CHROMIUM, "host": f"localhost:{port}"})
                    assert login.status_code == 302 and login.cookies  # the login cookie, for "localhost"
                    consent = await at_public_url.get(login.headers["location"], headers=HTML)
                    callback = consent.headers["location"]
                    assert callback.startswith(f"{running.url}/_gateway/callback/lark?")
                    answer = await at_public_url.get(callback, headers={**HTML, **ZH_CHROMIUM})
                    assert answer.status_code == 400, answer.text
                    assert "public_url_mismatch" in answer.text and "started in another browser" not in answer.text
                    said = f"此应用配置的地址是 {running.url}，但此页面是通过 http://localhost:{port} 打开的"
                    assert said in answer.text
                    # The way on: the same sign-in at the configured address.
                    assert re.search(rf'<a class="button" href="{re.escape(running.url)}/_gateway/login\?next=%2Finbox'
                                     rf'&amp;provider=lark">打开 {re.escape(running.url)}</a>', answer.text)
    warnings = [record.getMessage() for record in caplog.records if record.name == "gateway.handshake"]
    assert len(warnings) == 1, warnings  # once in the log, not once per sign-in
    assert f"public_url is {running.url} but a browser reached the gateway at http://localhost:{port}" in warnings[0]


async def test_an_exchange_from_a_page_at_another_host_is_explained(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        port = urlsplit(running.url).port
        mismatch = await client.post("/_gateway/exchange/lark", json={"code": "c", "state": "s"},
                                     headers={"origin": f"http://localhost:{port}", "host": f"localhost:{port}"})
        foreign = await client.post("/_gateway/exchange/lark", json={"code": "c", "state": "s"},
                                    headers={"origin": "https://evil.example"})
    assert mismatch.status_code == 400 and mismatch.json()["error"] == "public_url_mismatch"
    assert f"configured for {running.url}, but this page was opened at http://localhost:{port}" in (
        mismatch.json()["message"])
    # Another site's page is still just refused.
    assert foreign.status_code == 403 and foreign.json()["error"] == "cross_origin"


async def test_a_login_at_public_urls_own_host_is_unchanged(start_gateway: GatewayStarter) -> None:
    # Without a login cookie, at public_url's host: the message it always was.
    async with start_gateway() as running, running.client() as starts, running.client() as elsewhere:
        login = await starts.get("/_gateway/login?next=/inbox", headers=HTML)
        consent = await elsewhere.get(login.headers["location"], headers=HTML)
        answer = await elsewhere.get(consent.headers["location"], headers=HTML)
    assert answer.status_code == 400 and "state_mismatch" in answer.text
    assert "started in another browser" in answer.text


@pytest.mark.parametrize(("trusted", "expected"), [(["127.0.0.1/32"], "state_mismatch"), ([], "public_url_mismatch")])
async def test_the_browsers_host_behind_a_proxy(
    start_gateway: GatewayStarter, trusted: list[str], expected: str
) -> None:
    # A proxy that rewrites Host says the browser's in X-Forwarded-Host: believed from a trusted
    # proxy only (the edge drops it otherwise), so a login there is not mistaken for a mismatch.
    async with start_gateway(access={"trusted_proxies": trusted}) as running, \
            running.client() as starts, running.client() as elsewhere:
        public_host = urlsplit(running.url).netloc
        login = await starts.get("/_gateway/login?next=/inbox",
                                 headers={**HTML, "host": "internal:9999", "x-forwarded-host": public_host})
        consent = await elsewhere.get(login.headers["location"], headers=HTML)
        answer = await elsewhere.get(consent.headers["location"], headers=HTML)
    assert answer.status_code == 400 and f"<code>{expected}</code>" in answer.text


async def test_the_chooser_in_chinese(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    both = {"feishu": lark.settings(), "lark": lark.settings(brand="lark")}
    async with start_gateway(providers=both) as running, running.client() as client:
        zh = await client.get("/_gateway/login?next=/inbox", headers={**HTML, **ZH_CLIENT})
        en = await client.get("/_gateway/login?next=/inbox", headers={**HTML, **EN_BROWSER})
    assert zh.status_code == en.status_code == 200
    assert html_lang(zh) == "zh-Hans" and "<h1>登录</h1><p>请选择登录方式。</p>" in zh.text
    assert sorted(re.findall(r'<a class="button" href="[^"]+">([^<]+)</a>', zh.text)) == ["Lark", "飞书"]
    assert "<h1>Sign in</h1><p>Choose how to sign in.</p>" in en.text
    assert sorted(re.findall(r'<a class="button" href="[^"]+">([^<]+)</a>', en.text)) == ["Feishu", "Lark"]


async def test_the_rate_limit_page_names_the_wait_in_chinese(start_gateway: GatewayStarter) -> None:
    async with start_gateway(limits={"login_rate_per_min": 1, "login_burst": 1}) as running, \
            running.client() as client:
        first = await client.get("/_gateway/login?next=/", headers={**HTML, **ZH_CLIENT})
        limited = await client.get("/_gateway/login?next=/", headers={**HTML, **ZH_CLIENT})
    assert first.status_code == 302 and limited.status_code == 429
    wait_s = int(limited.headers["retry-after"])
    assert f"你所在的网络登录尝试过于频繁，请等待 {wait_s} 秒后再试。" in limited.text
    assert "<title>尝试次数过多</title>" in limited.text and "<details>" not in limited.text
