"""gateway.access: public paths (matched after normalization) and tenant rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.access import AccessRules, normalize_path
from gateway.config import Access


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("", "/"),
        ("/", "/"),
        ("/a/b", "/a/b"),
        ("/a/b/", "/a/b/"),
        ("//public/x", "/public/x"),
        ("///public//x", "/public/x"),
        ("/public/../private", "/private"),
        ("/public/./x", "/public/x"),
        ("/a/b/..", "/a/"),  # RFC 3986 5.2.4: the last segment resolves to a directory
        ("/a/b/../", "/a/"),
        ("/../../etc/passwd", "/etc/passwd"),
        # Already decoded once (ASGI's scope["path"]): escapes left are not decoded again.
        ("/public/%2e%2e/private", "/public/%2e%2e/private"),
        ("/café", "/café"),
        ("/a b", "/a b"),
    ],
)
def test_normalize_path(raw: str, normalized: str) -> None:
    assert normalize_path(raw) == normalized


@given(st.text(alphabet="/.ab%2eEfF", max_size=40))
def test_normalize_path_property(raw: str) -> None:
    result = normalize_path(raw)
    assert result.startswith("/")
    assert not result.startswith("//") and "//" not in result
    segments = result.strip("/").split("/")
    assert "." not in segments and ".." not in segments


@given(st.text(alphabet="/.abc", max_size=40))
def test_normalize_path_is_idempotent_without_escapes(raw: str) -> None:
    once = normalize_path(raw)
    assert normalize_path(once) == once


@pytest.fixture
def rules() -> AccessRules:
    return AccessRules(Access(public_paths=["/public/*", "/healthz", "/static/*.css", "/api/v1.0/docs"]))


@pytest.mark.parametrize(
    "path",
    [
        "/public/x",
        "/public/",
        "/public/a/b/c",
        "//public/x",
        "///public/x",
        "/public/./x",
        "/private/../public/x",
        "/public/My File.css",  # decoded once by the server, as an upstream sees it
        "/healthz",
        "/static/a/b/site.css",  # '*' also crosses '/'
        "/api/v1.0/docs",
    ],
)
def test_public(rules: AccessRules, path: str) -> None:
    assert rules.is_public(path)


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/private",
        "/public",  # the pattern needs the slash
        "/publicity",
        "/PUBLIC/x",
        "/x/public/y",
        "/public/../private",
        "/public/x/../../private",
        "/public/%2e%2e/private",
        "/public/%2E%2E/private",
        "/public/.%2e/private",
        "/public/%2e%2e%2fprivate",
        "/public%2f..%2fprivate",
        "/private/%2e%2e/public/x",  # double-encoded: the upstream would not see a dot segment
        "/public/..;/private",
        "/public\\..\\private",
        "/public/..",
        "/healthz/",
        "/healthzz",
        "/healthz/../admin",
        "/static/site.css/../../admin",
        "/static/site.js",
        "/api/v1x0/docs",  # '.' in a pattern is literal
    ],
)
def test_not_public(rules: AccessRules, path: str) -> None:
    assert not rules.is_public(path)


def test_nothing_is_public_by_default() -> None:
    rules = AccessRules(Access())
    assert not rules.is_public("/")
    assert not rules.is_public("/public/x")


def test_tenants_any_by_default() -> None:
    rules = AccessRules(Access())
    assert rules.tenant_allowed("corp-1")
    assert rules.tenant_allowed("")


def test_tenant_allow_list() -> None:
    rules = AccessRules(Access(allow_tenants=["corp-1", "ding123"]))
    assert rules.tenant_allowed("corp-1")
    assert rules.tenant_allowed("ding123")
    assert not rules.tenant_allowed("corp-2")
    assert not rules.tenant_allowed("CORP-1")
    assert not rules.tenant_allowed("corp-1 ")
    assert not rules.tenant_allowed("")  # a user outside any organisation is not in the list
