"""gateway.sealing: provider tokens are sealed at rest; what a store reader sees and what opens."""

from __future__ import annotations

import json

import pytest

from gateway.errors import ReauthRequired
from gateway.providers import TokenSet
from gateway.sealing import Sealer
from gateway.stores.memory import MemoryStore
from gateway.tokens import AppTokenCache, TokenManager, token_key
from tests.conftest import HTML, GatewayStarter, ServedLark, browser_login, headers_of

OLD = "old-secret-0123456789-0123456789-0123456789"
NEW = "new-secret-0123456789-0123456789-0123456789"
KEY = token_key("lark", "t1", "ou_1")


def _tokens() -> TokenSet:
    return TokenSet(access_token="u-ACCESS-visible", refresh_token="ur-REFRESH-visible", expires_at=4e9)


def test_a_sealed_value_opens_only_under_its_store_key_and_untouched() -> None:
    sealer = Sealer([NEW])
    sealed = sealer.seal(KEY, b"secret payload")
    assert b"secret payload" not in sealed and Sealer.is_sealed(sealed)
    assert len(sealed) == len(b"secret payload") + 33
    assert sealer.open(KEY, sealed) == b"secret payload"
    assert sealer.open(token_key("lark", "t1", "ou_2"), sealed) is None  # copied under another user
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert sealer.open(KEY, tampered) is None
    assert sealer.open(KEY, b'{"provider":"lark"}') is None  # not sealed at all
    assert sealer.seal(KEY, b"x") != sealer.seal(KEY, b"x")  # a fresh nonce each time


def test_the_first_secret_seals_and_every_secret_opens() -> None:
    sealed_by_old = Sealer([OLD]).seal(KEY, b"v")
    rotating = Sealer([NEW, OLD])
    assert rotating.open(KEY, sealed_by_old) == b"v"
    assert Sealer([OLD]).open(KEY, rotating.seal(KEY, b"w")) is None  # sealed with NEW
    assert Sealer([NEW]).open(KEY, sealed_by_old) is None  # OLD removed: reads as absent


async def test_token_records_reach_the_store_sealed() -> None:
    store = MemoryStore()
    manager = TokenManager(store, {}, refresh_margin_s=300, sealer=Sealer([NEW]))
    key = await manager.save("lark", "t1", "ou_1", _tokens())
    raw = await store.get(key)
    assert raw is not None and b"visible" not in raw
    loaded = await manager.load(key)
    assert loaded is not None and loaded.refresh_token == "ur-REFRESH-visible"


async def test_a_record_written_before_sealing_still_loads_and_is_sealed_when_written_again() -> None:
    store = MemoryStore()
    legacy = json.dumps({"provider": "lark", "tokens": _tokens().to_dict()}).encode()
    await store.set(KEY, legacy, 3600)
    manager = TokenManager(store, {}, refresh_margin_s=300, sealer=Sealer([NEW]))
    loaded = await manager.load(KEY)
    assert loaded is not None and loaded.access_token == "u-ACCESS-visible"
    await manager.save("lark", "t1", "ou_1", TokenSet(access_token="u-2", refresh_token="ur-2", expires_at=4e9))
    raw = await store.get(KEY)
    assert raw is not None and Sealer.is_sealed(raw)


async def test_a_record_sealed_with_a_removed_secret_ends_the_sign_in() -> None:
    store = MemoryStore()
    await TokenManager(store, {}, refresh_margin_s=300, sealer=Sealer([OLD])).save("lark", "t1", "ou_1", _tokens())
    rotated = TokenManager(store, {}, refresh_margin_s=300, sealer=Sealer([NEW]))
    assert await rotated.load(KEY) is None
    with pytest.raises(ReauthRequired):
        await rotated.current(KEY, "lark")


async def test_app_tokens_are_sealed_and_an_unreadable_one_is_fetched_again() -> None:
    store = MemoryStore()
    fetched: list[str] = []

    async def fetch() -> tuple[str, float]:
        fetched.append("t")
        return f"t-APP-visible-{len(fetched)}", 4e9

    cache = AppTokenCache(store, sealer=Sealer([NEW]))
    assert await cache.get("lark:cli_x", fetch) == "t-APP-visible-1"
    raw = await store.get("app:lark:cli_x")
    assert raw is not None and b"visible" not in raw
    assert await cache.get("lark:cli_x", fetch) == "t-APP-visible-1" and len(fetched) == 1
    assert await AppTokenCache(store, sealer=Sealer([OLD])).get("lark:cli_x", fetch) == "t-APP-visible-2"


async def test_the_gateway_stores_no_provider_token_in_the_clear(
    start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    async with start_gateway(identity={"pass_access_token": True}) as running, running.client() as client:
        answer = await browser_login(client, "/x")
        access_token = headers_of(answer)["x-auth-access-token"][0]
        store = running.gateway.runtime.store
        raw = [await store.get(key) for key in list(store._data)]  # every value the store holds
        assert (await client.get("/y", headers=HTML)).status_code == 200
    assert access_token and not any(value and access_token.encode() in value for value in raw)
    assert any(value and Sealer.is_sealed(value) for value in raw)


async def test_a_damaged_value_reads_as_absent_never_as_an_error() -> None:
    sealer = Sealer([NEW])
    assert sealer.open(KEY, sealer.seal(KEY, b"{}")[:9]) is None  # truncated inside the nonce
    assert sealer.open(KEY, b"\x01") is None
    store = MemoryStore()
    manager = TokenManager(store, {}, refresh_margin_s=300, sealer=sealer)
    for damaged in (sealer.seal(KEY, b"{}")[:20], b"not json", b"{}", sealer.seal(KEY, b"[1]")):
        await store.set(KEY, damaged, 3600)
        assert await manager.load(KEY) is None
        with pytest.raises(ReauthRequired):
            await manager.current(KEY, "lark")
    await manager.save("lark", "t1", "ou_1", _tokens())  # a new sign-in replaces it
    replaced = await manager.load(KEY)
    assert replaced is not None and replaced.refresh_token == "ur-REFRESH-visible"
    await store.set("app:lark:cli_x", b"\xff\xfe", 3600)
    cache = AppTokenCache(store, sealer=sealer)

    async def fetch() -> tuple[str, float]:
        return "t-fresh", 4e9

    assert await cache.get("lark:cli_x", fetch) == "t-fresh"
