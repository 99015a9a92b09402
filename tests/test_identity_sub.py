"""Issue 10, finding 15: the JWT ``sub`` is globally unique (``provider:tenant:user``, each part
percent-encoded), the provider-scoped id travels as its own ``user`` claim, ``X-Auth-User`` is
unchanged. A user id alone repeats across organisations (DingTalk userids are chosen by each
organisation's admin), so an upstream keying on it could be handed another organisation's user."""

from __future__ import annotations

from urllib.parse import unquote

import jwt
import pytest

from gateway.config import IdentityHeaders
from gateway.identity import Identity, IdentitySigner, derive_signing_key, identity_headers

SECRET = "Xq3v9LrT0pWm2ZsK8yBn4HcJ6dFa1GeQ7uRt5Yk"


def _claims(identity: Identity) -> dict[str, object]:
    signer = IdentitySigner(derive_signing_key(SECRET), issuer="https://app.example.com", audience="upstream",
                            ttl_s=60)
    token, _ = signer.sign(identity)
    return jwt.decode(token, signer.public_key, algorithms=["EdDSA"], audience="upstream")


def _split(sub: str) -> tuple[str, ...]:
    """What the docs tell upstreams: split on ':' and percent-decode each part."""
    return tuple(unquote(part) for part in sub.split(":"))


def test_the_same_userid_in_two_organisations_gets_two_subjects() -> None:
    alice_at_a = _claims(Identity(provider="dingtalk", user="manager", tenant="corp-a", name="Alice"))
    bob_at_b = _claims(Identity(provider="dingtalk", user="manager", tenant="corp-b", name="Bob"))
    assert alice_at_a["user"] == bob_at_b["user"] == "manager"
    assert alice_at_a["sub"] != bob_at_b["sub"]
    assert alice_at_a["sub"] == "dingtalk:corp-a:manager"
    # And the same user id and tenant under two providers (a Feishu and a Lark app side by side).
    assert _claims(Identity("feishu", "ou_1", "t", ""))["sub"] != _claims(Identity("lark", "ou_1", "t", ""))["sub"]


def test_the_claims_are_those_of_the_contract() -> None:
    claims = _claims(Identity(provider="lark", user="ou_1", tenant="t-1", name="张三"))
    assert {"iss", "aud", "sub", "user", "provider", "tenant", "name", "iat", "exp"} <= claims.keys()
    assert (claims["user"], claims["provider"], claims["tenant"], claims["name"]) == ("ou_1", "lark", "t-1", "张三")


@pytest.mark.parametrize(("provider", "tenant", "user"), [
    ("lark", "a:b", "c"),       # a ':' inside a part cannot shift the boundaries...
    ("lark", "a", "b:c"),       # ...so these two are different subjects
    ("lark", "", "u"),          # no tenant known: an empty part
    ("dd", "100%", "%3A"),      # '%' is encoded too, so decoding is exact
    ("wemeet", "corp", "张 三/x"),
])
def test_the_subject_decodes_back_to_its_triple(provider: str, tenant: str, user: str) -> None:
    sub = str(_claims(Identity(provider=provider, user=user, tenant=tenant, name=""))["sub"])
    assert sub.count(":") == 2
    assert _split(sub) == (provider, tenant, user)


def test_colons_inside_parts_never_collide() -> None:
    first = _claims(Identity("lark", "c", "a:b", ""))["sub"]
    second = _claims(Identity("lark", "a:b", "c", ""))["sub"]
    third = _claims(Identity("lark:a", "b", "c", ""))["sub"]
    assert len({first, second, third}) == 3


def test_x_auth_user_stays_the_provider_scoped_id() -> None:
    headers = dict(identity_headers(Identity("dingtalk", "manager", "corp-a", ""), IdentityHeaders(), token="t"))
    assert headers[b"x-auth-user"] == b"manager"
    assert headers[b"x-auth-tenant"] == b"corp-a" and headers[b"x-auth-provider"] == b"dingtalk"
