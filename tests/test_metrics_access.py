"""Issue 10, finding 16: ``<prefix>/metrics`` is not public by default. It sits on the app's public
origin, so it answers only a scrape that proves itself: ``metrics.bearer_token``, or a TCP peer in
``metrics.allow_from`` (empty by default). A loopback peer alone proves nothing: behind a reverse
proxy on the same host every visitor is a 127.0.0.1 peer."""

from __future__ import annotations

import pytest

from gateway.config import ConfigFileError, Metrics, build_config
from tests.conftest import GatewayStarter

TOKEN = "metrics-token-4f1c9a7e2b"


async def test_without_configuration_nobody_reads_the_metrics(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        answer = await client.get("/_gateway/metrics", headers={"accept": "application/json"})
        forwarded = await client.get("/_gateway/metrics", headers={"x-forwarded-for": "127.0.0.1"})
    assert answer.status_code == 403 and answer.json()["error"] == "metrics_forbidden"
    assert "metrics.bearer_token" in answer.json()["message"]
    assert "gateway_requests_total" not in answer.text
    assert forwarded.status_code == 403


async def test_a_listed_peer_is_served_without_the_token(start_gateway: GatewayStarter) -> None:
    async with start_gateway(metrics={"allow_from": ["127.0.0.0/8"], "bearer_token": TOKEN}) as running, \
            running.client() as client:
        answer = await client.get("/_gateway/metrics")
    assert answer.status_code == 200 and "# TYPE gateway_requests_total counter" in answer.text


async def test_an_unlisted_peer_needs_the_token(start_gateway: GatewayStarter) -> None:
    async with start_gateway(metrics={"allow_from": ["10.0.0.0/8"], "bearer_token": TOKEN}) as running, \
            running.client() as client:
        missing = await client.get("/_gateway/metrics", headers={"accept": "application/json"})
        right = await client.get("/_gateway/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert missing.status_code == 401 and missing.json()["error"] == "metrics_unauthorized"
    assert right.status_code == 200


def test_allow_from_takes_addresses_and_networks_only() -> None:
    settings = Metrics(allow_from=["127.0.0.1", "::1", "10.1.0.0/16"])
    assert settings.allows_peer("127.0.0.1") and settings.allows_peer("::1") and settings.allows_peer("10.1.2.3")
    assert not settings.allows_peer("10.2.0.1") and not settings.allows_peer(None)
    assert not settings.allows_peer("testclient")  # not an address: never listed
    assert Metrics().allow_from == [] and not Metrics().allows_peer("127.0.0.1")
    with pytest.raises(ConfigFileError) as caught:
        build_config({"session": {"secrets": ["Kd83-vQz1LmX0pR7sTfW2yHc9BnE4aGj6uYo5iN"]},
                      "metrics": {"allow_from": ["localhost"]}})
    assert [path for path, _ in caught.value.errors] == ["metrics.allow_from[0]"]
