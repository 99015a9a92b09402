"""The ``relay:`` config section: routes are checked where they are written (docs/relay.md)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigFileError, build_config

SECRET = "kP3vX9qL2mZ8rT5wY1nB6cF4hJ7dG0sA"
LARK = {"plugin": "lark", "app_id": "cli_test", "app_secret": "s3cr3t-value"}


def config(routes: list[dict[str, Any]]) -> Any:
    return build_config({"session": {"secrets": [SECRET]}, "providers": {"lark": LARK}, "relay": {"routes": routes}})


def test_defaults_reach_nothing() -> None:
    relay = build_config({"session": {"secrets": [SECRET]}}).relay
    assert relay.routes == []
    assert relay.replay_body_bytes < relay.max_body_bytes


def test_a_route_with_its_defaults() -> None:
    (route,) = config([{"provider": "lark", "path": "open-apis/calendar/v4/*"}]).relay.routes
    assert (route.methods, route.token, route.scopes) == (["GET"], "user", [])


@pytest.mark.parametrize("path", ["/open-apis/x", "https://evil.example/x", "open-apis/../x", "a;b", "a\\b",
                                  "open-apis/%2e%2e/x", "user@evil.example/x"])
def test_a_path_that_is_not_a_plain_relative_glob_is_refused(path: str) -> None:
    with pytest.raises(ConfigFileError) as caught:
        config([{"provider": "lark", "path": path}])
    assert caught.value.errors[0][0] == "relay.routes[0].path"


def test_an_unknown_provider_is_named_with_its_route() -> None:
    with pytest.raises(ConfigFileError) as caught:
        config([{"provider": "lark", "path": "x"}, {"provider": "feishu2", "path": "x"}])
    assert caught.value.errors == [("relay.routes[1].provider", "'feishu2' is not a name under providers")]


@pytest.mark.parametrize("field,value", [("token", "tenant"), ("methods", ["CONNECT"]), ("scopes", ["a b"])])
def test_bad_values_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ConfigFileError) as caught:
        config([{"provider": "lark", "path": "x", field: value}])
    assert caught.value.errors[0][0].startswith(f"relay.routes[0].{field}")
