"""``<prefix>/metrics``: the Prometheus exposition, what each counter counts, who may read it."""

from __future__ import annotations

import asyncio
import re

import pytest

from gateway.metrics import Metrics
from tests.conftest import HTML, GatewayStarter, ServedLark, browser_login

SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")
LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def _canonical(key: str) -> str:
    """``name{labels}`` with its labels in name order: the format leaves their order free."""
    name, brace, labels = key.partition("{")
    if not brace:
        return key
    pairs = LABEL.findall(labels)
    assert ",".join(f'{k}="{v}"' for k, v in pairs) == labels.rstrip("}"), key
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(pairs)) + "}"


class Samples(dict[str, float]):
    """Looked up in any label order."""

    def __getitem__(self, key: str) -> float:
        return super().__getitem__(_canonical(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(_canonical(key))


def samples(text: str) -> Samples:
    """``{'name{labels}': value}`` of an exposition; every line is a comment or a valid sample."""
    found = Samples()
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ \S", line), line
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        dict.__setitem__(found, _canonical(match.group(1) + (match.group(2) or "")), float(match.group(3)))
    return found


def test_every_metric_is_declared_with_help_and_type_even_before_anything_happened() -> None:
    metrics = Metrics()
    text = metrics.render()
    for name in ("gateway_requests_total", "gateway_forward_auth_total", "gateway_logins_total",
                 "gateway_token_refreshes_total", "gateway_logouts_total"):
        assert f"# HELP {name} " in text and f"# TYPE {name} counter" in text
    assert samples(text)['gateway_requests_total{result="authenticated"}'] == 0


def test_each_gateway_has_a_registry_of_its_own() -> None:
    first, second = Metrics(), Metrics()  # the library's default registry would refuse the second
    first.inc("gateway_logouts_total")
    first.observe("gateway_upstream_duration_seconds", 0.2, "2xx")
    assert samples(first.render())["gateway_logouts_total"] == 1
    assert samples(first.render())['gateway_upstream_duration_seconds_count{status_class="2xx"}'] == 1
    assert samples(second.render())["gateway_logouts_total"] == 0
    assert "gateway_upstream_duration_seconds_count" not in second.render()


def test_label_values_are_escaped_and_counts_add_up() -> None:
    metrics = Metrics()
    metrics.inc("gateway_logins_total", 'we"ird\\name', "client", "ok")
    metrics.inc("gateway_logins_total", 'we"ird\\name', "client", "ok", amount=2)
    metrics.inc("gateway_logouts_total")
    metrics.gauge("gateway_store_entries", lambda: 7)
    metrics.gauge("gateway_session_cache_entries", lambda: None)  # None: not exposed
    found = samples(metrics.render())
    assert found['gateway_logins_total{provider="we\\"ird\\\\name",flow="client",result="ok"}'] == 3
    assert found["gateway_logouts_total"] == 1
    assert found["gateway_store_entries"] == 7
    assert "gateway_session_cache_entries" not in found


async def test_the_counters_follow_what_the_gateway_did(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    lark.sandbox.access_ttl_s = 4  # a refresh is due 2 s after the login
    async with start_gateway(access={"public_paths": ["/public/*"]}, metrics={"allow_from": ["127.0.0.1"]}
                             ) as running, running.client() as client:
        assert (await client.get("/x", headers=HTML)).status_code == 302  # no session yet
        await browser_login(client, "/x")  # the redirect to the login, then the app: authenticated
        await client.get("/public/logo.png")
        await client.get("/_gateway/callback/lark?code=forged&state=nope")  # a login that fails
        auth = await client.get("/_gateway/auth", headers={"x-original-uri": "/y"})
        assert auth.status_code == 200
        await asyncio.sleep(2.2)
        assert (await client.get("/after-refresh")).status_code == 200
        logout = await client.post("/_gateway/logout", headers={"origin": running.url})
        assert logout.status_code == 200
        anonymous = await client.get("/_gateway/auth", headers={"x-original-uri": "/y"})
        assert anonymous.status_code == 401
        again = await client.post("/_gateway/logout", headers={"origin": running.url})  # nothing to end
        assert again.status_code == 200
        scrape = await client.get("/_gateway/metrics")
    assert scrape.status_code == 200
    assert scrape.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(scrape.text)
    assert found['gateway_requests_total{result="login_required"}'] == 2  # /x before and during the login
    assert found['gateway_requests_total{result="authenticated"}'] == 2  # /x after it, /after-refresh
    assert found['gateway_requests_total{result="public"}'] == 1
    assert found['gateway_logins_total{provider="lark",flow="browser",result="ok"}'] == 1
    assert found['gateway_logins_total{provider="lark",flow="browser",result="state_invalid"}'] == 1
    assert found['gateway_forward_auth_total{result="authenticated"}'] == 1
    assert found['gateway_forward_auth_total{result="login_required"}'] == 1
    assert found['gateway_token_refreshes_total{provider="lark",result="ok"}'] == 1
    assert found["gateway_logouts_total"] == 1
    assert found["gateway_store_entries"] >= 1
    assert "gateway_session_cache_entries" in found
    # The histograms: one code exchange and one refresh reached Lark; the forged callback did not.
    provider = "gateway_provider_request_duration_seconds"
    assert found[f'{provider}_count{{provider="lark",operation="redeem",outcome="ok"}}'] == 1
    assert found[f'{provider}_count{{provider="lark",operation="refresh",outcome="ok"}}'] == 1
    assert found[f'{provider}_bucket{{provider="lark",operation="refresh",outcome="ok",le="+Inf"}}'] == 1
    store = "gateway_store_operation_duration_seconds"
    assert found[f'{store}_count{{backend="memory",operation="set_versioned",outcome="ok"}}'] >= 2  # login, refresh
    assert found[f'{store}_count{{backend="memory",operation="delete",outcome="ok"}}'] >= 1  # the session logged out
    assert found['gateway_refresh_lock_wait_seconds_count{lock="refresh",outcome="acquired"}'] == 1
    assert found["gateway_sessions_active"] == 0  # the one session was logged out
    for line in scrape.text.splitlines():  # counts only: no user, cookie or token in it
        assert "ou_" not in line and "gw_session" not in line


async def test_failed_refreshes_are_counted_by_result_and_timed_by_outcome(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    """Two users, two failed refreshes as a scrape shows them: a transient one (Lark 20050, a
    system error: retried later, the user keeps the old token meanwhile) and a definitive one
    (the grant revoked: signed out, the session record ended)."""
    lark.sandbox.access_ttl_s = 4  # a refresh is due 2 s after each token
    first, second = list(lark.sandbox.users)[:2]
    async with start_gateway(metrics={"allow_from": ["127.0.0.1"]}) as running, \
            running.client() as transient, running.client() as definitive:
        lark.sandbox.set_current_user(first)
        await browser_login(transient, "/x")
        lark.sandbox.set_current_user(second)
        await browser_login(definitive, "/x")
        await asyncio.sleep(2.2)
        lark.sandbox.inject_fault("token:refresh_token", 20050, times=1)
        kept = await transient.get("/x")
        lark.sandbox.revoke(second)
        ended = await definitive.get("/x", headers={"accept": "application/json"})
        scrape = await transient.get("/_gateway/metrics")
    assert kept.status_code == 200  # the old token still runs ~2 s
    assert ended.status_code == 401 and ended.json()["error"] == "login_required"
    found = samples(scrape.text)
    refreshes = 'gateway_token_refreshes_total{provider="lark",result="%s"}'
    assert found[refreshes % "unavailable"] == 1 and found[refreshes % "reauth_required"] == 1
    assert refreshes % "ok" not in found or found[refreshes % "ok"] == 0
    provider = 'gateway_provider_request_duration_seconds_count{provider="lark",operation="refresh",outcome="%s"}'
    assert found[provider % "provider_unavailable"] == 1 and found[provider % "reauth_required"] == 1
    assert provider % "ok" not in found
    assert found['gateway_requests_total{result="authenticated"}'] == 3  # both logins' /x, then the kept one
    assert found["gateway_sessions_active"] == 1  # the revoked user's session was ended


async def test_a_bearer_token_guards_the_metrics(start_gateway: GatewayStarter) -> None:
    token = "s3cret-metrics-token-0123456789"
    async with start_gateway(metrics={"bearer_token": token}) as running, running.client() as client:
        missing = await client.get("/_gateway/metrics", headers={"accept": "application/json"})
        wrong = await client.get("/_gateway/metrics", headers={"authorization": "Bearer nope"})
        right = await client.get("/_gateway/metrics", headers={"authorization": f"Bearer {token}"})
        lower_scheme = await client.get("/_gateway/metrics", headers={"authorization": f"bearer {token}"})
        not_ascii = await client.get("/_gateway/metrics",
                                     headers={"authorization": "Bearer s3cret-métrics".encode()})
    assert missing.status_code == 401 and missing.json()["error"] == "metrics_unauthorized"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert token not in missing.text
    assert wrong.status_code == 401
    assert right.status_code == 200 and "# TYPE gateway_requests_total counter" in right.text
    assert lower_scheme.status_code == 200  # the scheme is case-insensitive (RFC 9110)
    assert not_ascii.status_code == 401  # a non-ASCII header is refused, not a 500


async def test_metrics_can_be_switched_off(start_gateway: GatewayStarter) -> None:
    async with start_gateway(metrics={"enabled": False}) as running, running.client() as client:
        answer = await client.get("/_gateway/metrics", headers={"accept": "application/json"})
    assert answer.status_code == 404 and answer.json()["error"] == "not_found"


def test_a_short_bearer_token_is_a_config_error(make_config: object) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at least 16 characters"):
        make_config(metrics={"bearer_token": "short"})  # type: ignore[operator]
    with pytest.raises(ValidationError, match="printable ASCII"):
        make_config(metrics={"bearer_token": "long enough but with spaces"})  # type: ignore[operator]


def test_the_histograms_keep_the_librarys_layout() -> None:
    """``BucketHistogram`` (plain lists bumped on the request path) writes what the library's
    ``Histogram`` wrote for the same observations: names, buckets, ``le`` spelling, cumulative
    counts, sum, created; a value on a bound falls in that bound's bucket."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from gateway.metrics import _FAST_BUCKETS, METRICS

    name = "gateway_store_operation_duration_seconds"
    ours = Metrics()
    registry = CollectorRegistry()
    library = Histogram(name, METRICS[name][1], METRICS[name][2], registry=registry, buckets=_FAST_BUCKETS)
    for labels, value in [(("redis", "get", "ok"), 0.0003), (("redis", "get", "ok"), 0.001),
                          (("redis", "get", "ok"), 7.5), (("memory", "set", "error"), 0.02)]:
        ours.observe(name, value, *labels)
        library.labels(*labels).observe(value)

    def lines(text: str) -> list[str]:
        kept = [line for line in text.splitlines() if line.startswith(("# ", name)) and "_created" not in line]
        return [line for line in kept if name in line]

    expected = lines(generate_latest(registry).decode())
    assert lines(ours.render()) == expected and len(expected) > 20
    found = samples(ours.render())
    assert found[f'{name}_bucket{{backend="redis",operation="get",outcome="ok",le="0.001"}}'] == 2
    assert found[f'{name}_bucket{{backend="redis",operation="get",outcome="ok",le="+Inf"}}'] == 3
    assert f'{name}_created{{backend="memory",operation="set",outcome="error"}}' in found


async def test_an_async_gauge_is_read_at_each_scrape_and_left_out_when_the_store_is_down() -> None:
    from gateway.errors import StoreUnavailable

    metrics = Metrics()
    answers: list[object] = [3, StoreUnavailable("down"), None, 5]

    async def read() -> float | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    metrics.gauge_async("gateway_sessions_active", read)
    assert "gateway_sessions_active" not in samples(metrics.render())  # not read before a scrape
    assert samples(await metrics.scrape())["gateway_sessions_active"] == 3
    assert samples(metrics.render())["gateway_sessions_active"] == 3  # render alone: the last value
    for _ in range(2):  # an outage, then a store that cannot tell: no sample, never a failed scrape
        text = await metrics.scrape()
        assert "# TYPE gateway_sessions_active gauge" in text and "gateway_sessions_active" not in samples(text)
    assert samples(await metrics.scrape())["gateway_sessions_active"] == 5
