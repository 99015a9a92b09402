"""Secrets from files (``*_file`` keys) and the insecure-setting warnings of ``gateway check-config``."""

from __future__ import annotations

import contextlib
import logging
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import ConfigFileError, load_config
from gateway.config_checks import config_warnings
from gateway.middleware import AuthGateway
from tests.conftest import echo_app

REPO = Path(__file__).resolve().parent.parent
SECRET = secrets.token_urlsafe(32)
OTHER = secrets.token_urlsafe(32)


def write(tmp_path: Path, data: dict[str, Any], name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def lark(**overrides: Any) -> dict[str, Any]:
    return {"plugin": "lark", "app_id": "cli_a1b2c3d4e5f6", "app_secret": "s" * 8 + OTHER[:24], **overrides}


def test_secrets_come_from_files_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "secrets").write_text(f"{SECRET}\n\n{OTHER}\n")  # one per line, blank lines skipped
    token = secrets.token_urlsafe(24)
    (tmp_path / "run" / "metrics_token").write_text(token + "\n")  # the trailing newline is dropped
    (tmp_path / "redis_url").write_text("redis://:pw@127.0.0.1:6379/0\n")
    (tmp_path / "lark_secret").write_text("lark-app-secret-value\n")
    path = write(tmp_path, {
        "session": {"secrets_file": "run/secrets"},
        "metrics": {"bearer_token_file": str(tmp_path / "run" / "metrics_token")},  # absolute works too
        "store": {"backend": "redis", "url_file": "redis_url"},
        "providers": {"lark": {**lark(), "app_secret": None, "app_secret_file": "lark_secret"}},
    })
    data = yaml.safe_load(path.read_text())
    del data["providers"]["lark"]["app_secret"]
    path.write_text(yaml.safe_dump(data))
    config = load_config(path, environ={})
    assert [s.get_secret_value() for s in config.session.secrets] == [SECRET, OTHER]
    assert config.metrics.bearer_token is not None and config.metrics.bearer_token.get_secret_value() == token
    assert config.store.url is not None and config.store.url.get_secret_value() == "redis://:pw@127.0.0.1:6379/0"
    assert config.provider_settings()["lark"].app_secret.get_secret_value() == "lark-app-secret-value"  # type: ignore[attr-defined]


def test_a_path_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "s").write_text(SECRET)
    path = write(tmp_path, {"session": {"secrets_file": "${SECRETS_PATH}"}})
    config = load_config(path, environ={"SECRETS_PATH": str(tmp_path / "s")})
    assert config.session.secrets[0].get_secret_value() == SECRET


def test_a_file_named_by_a_gateway_variable_overrides_the_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``GATEWAY_<SECTION>__<KEY>_FILE``: the Docker images' ``*_FILE`` convention."""
    (tmp_path / "s").write_text(f"{OTHER}\n{SECRET}\n")
    path = write(tmp_path, {"session": {"secrets": [SECRET]}})
    monkeypatch.setenv("GATEWAY_SESSION__SECRETS_FILE", str(tmp_path / "s"))
    config = load_config(path, environ={})
    assert [s.get_secret_value() for s in config.session.secrets] == [OTHER, SECRET]
    monkeypatch.setenv("GATEWAY_SESSION__SECRETS_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigFileError) as caught:
        load_config(path, environ={})
    assert caught.value.errors == [("GATEWAY_SESSION__SECRETS_FILE",
                                    f"cannot read {tmp_path}/missing: No such file or directory")]


@pytest.mark.parametrize(("section", "expected"), [
    ({"secrets_file": "missing"}, ("session.secrets_file", "cannot read {dir}/missing: No such file or directory")),
    ({"secrets_file": "empty"}, ("session.secrets_file", "{dir}/empty is empty")),
    ({"secrets_file": "empty", "secrets": [SECRET]}, ("session.secrets_file", "set secrets or secrets_file, not both")),
    ({"secrets_file": 3}, ("session.secrets_file", "must be the path of a file")),
])
def test_a_file_that_cannot_be_used_is_one_error_with_its_path(
    tmp_path: Path, section: dict[str, Any], expected: tuple[str, str]
) -> None:
    (tmp_path / "empty").write_text("\n \n")
    path = write(tmp_path, {"session": section})
    with pytest.raises(ConfigFileError) as caught:
        load_config(path, environ={})
    # Reported once, as the file's problem (not also as "at least one session secret is required").
    assert caught.value.errors == [(expected[0], expected[1].format(dir=tmp_path))]


def test_a_key_that_is_a_field_is_not_read_as_a_file(tmp_path: Path) -> None:
    """``identity.signing_key_file`` is a path the gateway itself loads (or creates): not a secret file."""
    path = write(tmp_path, {"session": {"secrets": [SECRET]}, "identity": {"signing_key_file": "id.pem"}})
    assert load_config(path, environ={}).identity.signing_key_file == Path("id.pem")
    # And a made-up *_file key is still an unknown key, reported as one.
    path = write(tmp_path, {"session": {"secrets": [SECRET], "colour_file": "x"}})
    with pytest.raises(ConfigFileError, match="unknown key `colour_file` under session"):
        load_config(path, environ={})


def test_a_secret_read_from_a_file_is_still_validated_and_never_printed(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("x" * 40)
    path = write(tmp_path, {"session": {"secrets_file": "s"}})
    with pytest.raises(ConfigFileError) as caught:
        load_config(path, environ={})
    [(where, message)] = caught.value.errors
    assert where == "session.secrets[0]" and "too predictable" in message and "x" * 40 not in message


# -- check-config warnings ----------------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_check_config_warns_about_each_insecure_setting_with_its_path(tmp_path: Path) -> None:
    weak = "Tr0ub4dor&3-Tr0ub4dor&3-Tr0ub4dor&3-x"  # accepted (over 80 bits by the estimate), yet weak
    assert len(weak) >= 32
    path = write(tmp_path, {
        "public_url": "https://app.example.com/portal",
        "session": {"secrets": [SECRET, "my-gateway-secret-" + OTHER[:20], weak], "secure": False},
        "metrics": {"bearer_token": SECRET},
        "providers": {"lark": lark()},
    })
    answer = check_config(path)
    assert answer.returncode == 0, answer.stderr
    assert yaml.safe_load(answer.stdout)["session"]["secrets"] == ["***", "***", "***"]
    warnings = [line.removeprefix(f"{path}: warning: ") for line in answer.stderr.splitlines()
                if line.startswith(f"{path}: warning: ")]
    paths = [line.split(":", 1)[0] for line in warnings]
    assert paths == ["session.secure", "public_url", "session.secrets[1]", "session.secrets[2]",
                     "metrics.bearer_token"], answer.stderr
    assert "plain HTTP" in warnings[0]
    assert "(/portal)" in warnings[1] and "https://app.example.com)" in warnings[1]
    assert "placeholder" in warnings[2]
    assert "looks weak" in warnings[3]
    assert "the same value as session.secrets[0]" in warnings[4]
    for value in (SECRET, weak, OTHER[:20]):
        assert value not in answer.stderr and value not in answer.stdout


def test_a_sound_config_has_no_warning(tmp_path: Path) -> None:
    path = write(tmp_path, {"public_url": "https://app.example.com",
                            "session": {"secrets": [SECRET, OTHER]},
                            "metrics": {"bearer_token": secrets.token_urlsafe(24)},
                            "providers": {"lark": lark()}})
    config = load_config(path, environ={})
    assert config_warnings(config) == []
    answer = check_config(path)
    assert answer.returncode == 0 and "warning" not in answer.stderr, answer.stderr


def test_a_provider_secret_reused_as_the_redis_password_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, {"session": {"secrets": [SECRET]},
                            "store": {"backend": "redis", "url": f"redis://:{OTHER}@127.0.0.1:6379/0"},
                            "providers": {"lark": lark(app_secret=OTHER)}})
    warnings = config_warnings(load_config(path, environ={}))
    assert warnings == [("providers.lark.app_secret", "the same value as store.url: a secret reused for two "
                                                      "purposes leaks both when one leaks; generate one per use")]


# -- the runtime warning: X-Forwarded-For from an untrusted peer --------------------------------
# Through httpx's ASGI transport with a made-up peer address: the test servers (uvicorn's defaults)
# would themselves rewrite the peer from X-Forwarded-For on loopback, as ``gateway serve`` does not.


@contextlib.asynccontextmanager
async def gateway_client(make_config: Any, **sections: Any) -> AsyncIterator[httpx.AsyncClient]:
    gateway = AuthGateway(echo_app(), make_config(**sections))
    transport = httpx.ASGITransport(app=gateway, client=("192.0.2.10", 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield client
    finally:
        await gateway.aclose()


async def test_forwarded_for_without_trusted_proxies_is_logged_once(
    make_config: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.edge")
    async with gateway_client(make_config) as client:
        await client.get("/", headers={"x-real-ip": "203.0.113.9"})  # not the header the warning is about
        assert not [r for r in caplog.records if r.name == "gateway.edge"]
        await client.get("/", headers={"x-forwarded-for": "203.0.113.7"})
        await client.get("/", headers={"X-Forwarded-For": "203.0.113.8"})
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.edge"]
    assert len(lines) == 1, lines
    assert "a request from 192.0.2.10 carried X-Forwarded-For while access.trusted_proxies is empty" in lines[0]
    assert "203.0.113" not in lines[0]  # the claimed address is not what is reported


async def test_no_warning_when_the_proxy_is_trusted(make_config: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.edge")
    async with gateway_client(make_config, access={"trusted_proxies": ["192.0.2.0/24"]}) as client:
        await client.get("/", headers={"x-forwarded-for": "203.0.113.7"})
    assert not [r for r in caplog.records if r.name == "gateway.edge"]
