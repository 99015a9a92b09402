"""gateway.config and ``gateway check-config``: YAML, ${VAR}, env overrides, errors with paths, masking."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field, HttpUrl, SecretStr

from gateway import providers as providers_module
from gateway.cli import main
from gateway.config import ConfigFileError, GatewayConfig, build_config, interpolate, load_config, masked_dict
from gateway.providers import Provider, ProviderSettings, register_plugin

SECRET_A = "session-secret-AAAAAAAAAAAAAAAAAAAAAAAAAAAA"
SECRET_B = "session-secret-BBBBBBBBBBBBBBBBBBBBBBBBBBBB"
PROVIDER_SECRET = "acme-client-secret-zzzz-9f8e7d"
NESTED_SECRET = "acme-nested-secret-qqqq-1a2b3c"
LISTED_SECRET = "acme-listed-secret-wwww-4d5e6f"
REDIS_PASSWORD = "redis-pass-kkkk-7g8h9i"
ALL_SECRETS = [SECRET_A, SECRET_B, PROVIDER_SECRET, NESTED_SECRET, LISTED_SECRET, REDIS_PASSWORD]


class _Signing(BaseModel):
    key_id: str = "k1"
    key: SecretStr = SecretStr("")


class Region(StrEnum):
    CN = "cn"
    INTL = "intl"


class AcmeSettings(ProviderSettings):
    client_id: str
    client_secret: SecretStr
    signing: _Signing = _Signing()
    old_secrets: list[SecretStr] = Field(default_factory=list)
    base_url: str = "https://acme.example.com"
    # Types a plugin may reasonably use, which must still print as plain YAML.
    api_url: HttpUrl = HttpUrl("https://api.acme.example.com/")
    region: Region = Region.CN
    scopes: tuple[str, ...] = ("openid", "profile")


class AcmeProvider(Provider):
    settings_model = AcmeSettings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(name)


@pytest.fixture
def acme() -> Iterator[str]:
    register_plugin("unit-acme", AcmeProvider)
    yield "unit-acme"
    providers_module._registered.pop("unit-acme", None)


def _write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _errors(exc: pytest.ExceptionInfo[ConfigFileError]) -> dict[str, str]:
    return dict(exc.value.errors)


# -- loading and interpolation -------------------------------------------------------------------


def test_minimal_file_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, f"session: {{secrets: ['{SECRET_A}']}}\n"), environ={})
    assert config.public_url == "http://127.0.0.1:8080"
    assert config.path_prefix == "/_gateway"
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    assert config.upstream.url == "http://127.0.0.1:9000" and config.upstream.timeout_s == 30
    assert config.session.cookie_name == "gw_session" and config.session.max_age_s == 604800
    assert config.session.secure is True and config.session.same_site == "lax"
    assert config.store.backend == "memory"
    assert config.tokens.refresh_margin_s == 300
    assert config.identity.headers.user == "X-Auth-User" and config.identity.jwt_audience == "upstream"
    assert config.identity.jwt_ttl_s == 60 and config.identity.pass_access_token is False
    assert config.access.public_paths == [] and config.access.trusted_proxies == []
    assert config.providers == {}


def test_interpolation_with_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        public_url: ${PUBLIC_URL:-https://default.example.com}
        path_prefix: ${PREFIX:-/_gw}
        upstream: {url: "http://${UP_HOST}:${UP_PORT:-9000}"}
        session:
          secrets: ["${SECRET_A}", "${SECRET_B:-unused-default-unused-default-xx}"]
          cookie_name: "${COOKIE:-}gw"
        """,
    )
    environ = {"SECRET_A": SECRET_A, "SECRET_B": SECRET_B, "UP_HOST": "10.0.0.5", "PREFIX": "/auth"}
    config = load_config(path, environ=environ)
    assert config.public_url == "https://default.example.com"  # default used
    assert config.path_prefix == "/auth"  # the variable beats its default
    assert config.upstream.url == "http://10.0.0.5:9000"
    assert [s.get_secret_value() for s in config.session.secrets] == [SECRET_A, SECRET_B]
    assert config.session.cookie_name == "gw"  # empty default


def test_interpolate_leaves_other_values_alone() -> None:
    document = {"a": [1, True, None, "$VAR", "${VAR", "${1X}"], "b": {"c": 2.5}}
    assert interpolate(document, {"VAR": "x"}) == document


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("session: {secrets: ['${NOT_SET_ANYWHERE}']}\n", "session.secrets[0]"),
        (f"public_url: ${{NOT_SET_ANYWHERE}}\nsession: {{secrets: ['{SECRET_A}']}}\n", "public_url"),
        (f"session: {{secrets: ['{SECRET_A}']}}\n"
         "providers:\n  lark: {plugin: lark, app_id: cli_1, app_secret: '${NOT_SET_ANYWHERE}'}\n",
         "providers.lark.app_secret"),
    ],
)
def test_missing_variable_reported_with_its_path(tmp_path: Path, text: str, path: str) -> None:
    with pytest.raises(ConfigFileError) as exc:
        load_config(_write(tmp_path, text), environ={})
    assert len(exc.value.errors) == 1
    where, message = exc.value.errors[0]
    assert where == path and "NOT_SET_ANYWHERE" in message


def test_unset_variables_and_key_errors_are_reported_in_one_run(tmp_path: Path) -> None:
    # Each unset variable once (as unset, not also as the "" it stands for), and the rest of the
    # file's errors beside them: a user fixes the whole file in one pass.
    path = _write(tmp_path, """
        public_url: ${FIRST_UNSET}
        session: {secrets: ["${SECOND_UNSET}", "short"], secrue: false}
        listen: {port: "${THIRD_UNSET}${THIRD_UNSET}"}
        upstream: {url: "not a url"}
        """)
    with pytest.raises(ConfigFileError) as exc:
        load_config(path, environ={})
    errors = exc.value.errors
    wheres = [where for where, _ in errors]
    assert wheres.count("public_url") == 1 and "FIRST_UNSET" in dict(errors)["public_url"]
    assert wheres.count("session.secrets[0]") == 1 and "SECOND_UNSET" in dict(errors)["session.secrets[0]"]
    assert wheres.count("listen.port") == 1 and "THIRD_UNSET" in dict(errors)["listen.port"]
    assert "32 characters" in dict(errors)["session.secrets[1]"]
    assert "upstream.url" in wheres and "session.secrue" in wheres


def test_interpolate_reports_every_unset_variable() -> None:
    with pytest.raises(ConfigFileError) as exc:
        interpolate({"a": "${ONE}", "b": ["${TWO}-${ONE}"], "c": "${SET}"}, {"SET": "x"})
    assert [(where, message.split()[2]) for where, message in exc.value.errors] == [
        ("a", "ONE"), ("b[0]", "TWO"), ("b[0]", "ONE")]


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("session: {secrue: false}", "session.secrue",
         "unknown key `secrue` under session — did you mean `secure`?"),
        ("publc_url: https://app.example.com", "publc_url",
         "unknown key `publc_url` at the top level — did you mean `public_url`?"),
        ("identity: {headers: {usr: X-User}}", "identity.headers.usr",
         "unknown key `usr` under identity.headers — did you mean `user`?"),
        ("limits: {zzz: 1}", "limits.zzz", "unknown key `zzz` under limits (known keys: login_rate_per_min, "
         "login_burst, max_body_bytes, max_json_depth)"),
        ("providers: {lark: {plugin: lark, app_id: a, app_secret: b, brnd: feishu}}", "providers.lark.brnd",
         "unknown key `brnd` under providers.lark — did you mean `brand`?"),
        ("listen: {port: 99999}", "listen.port", "Input should be less than or equal to 65535"),
        ("upstream: {url: ftp://x}", "upstream.url", "must be an http(s) URL such as http://127.0.0.1:9000"),
    ],
)
def test_errors_read_as_a_person_would_write_them(tmp_path: Path, text: str, where: str, message: str) -> None:
    path = _write(tmp_path, f"session: {{secrets: ['{SECRET_A}']}}\n{text}\n"
                  if not text.startswith("session") else f"{text[:-1]}, secrets: ['{SECRET_A}']}}\n")
    with pytest.raises(ConfigFileError) as exc:
        load_config(path, environ={})
    assert dict(exc.value.errors) == {where: message}


@pytest.mark.parametrize("text", ["session: {secure: false}\n", "session: {}\n",
                                  "session: {secrets: ['${GATEWAY_SECRET:-}']}\n"])
def test_a_session_without_secrets_is_an_error(tmp_path: Path, text: str) -> None:
    # It used to pass (secrets: []) and then crash `gateway serve` with a traceback.
    with pytest.raises(ConfigFileError) as exc:
        load_config(_write(tmp_path, text), environ={})
    (where, message), = exc.value.errors
    assert where.startswith("session.secrets")
    assert "secret" in message and ("required" in message or "32 characters" in message)


def test_env_overrides_beat_yaml_and_keep_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(
        tmp_path,
        f"""
        public_url: https://yaml.example.com
        session: {{secrets: ['{SECRET_A}'], cookie_name: from_yaml, max_age_s: 100}}
        upstream: {{url: http://yaml:1}}
        """,
    )
    monkeypatch.setenv("GATEWAY_SESSION__COOKIE_NAME", "from_env")
    monkeypatch.setenv("GATEWAY_UPSTREAM__TIMEOUT_S", "2.5")
    monkeypatch.setenv("GATEWAY_PUBLIC_URL", "https://env.example.com")
    config = load_config(path)
    assert config.session.cookie_name == "from_env"
    assert config.session.max_age_s == 100  # the rest of the section still comes from YAML
    assert [s.get_secret_value() for s in config.session.secrets] == [SECRET_A]
    assert config.upstream.url == "http://yaml:1" and config.upstream.timeout_s == 2.5
    assert config.public_url == "https://env.example.com"


def test_env_override_reaches_provider_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, acme: str) -> None:
    path = _write(
        tmp_path,
        f"""
        session: {{secrets: ['{SECRET_A}']}}
        providers:
          acme: {{plugin: {acme}, client_id: from_yaml, client_secret: from-yaml}}
        """,
    )
    monkeypatch.setenv("GATEWAY_PROVIDERS__ACME__CLIENT_SECRET", PROVIDER_SECRET)
    settings = load_config(path).provider_settings()["acme"]
    assert isinstance(settings, AcmeSettings)
    assert settings.client_id == "from_yaml"
    assert settings.client_secret.get_secret_value() == PROVIDER_SECRET


def test_invalid_env_override_is_reported_with_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_LISTEN__PORT", "99999")
    with pytest.raises(ConfigFileError) as exc:
        load_config(_write(tmp_path, f"session: {{secrets: ['{SECRET_A}']}}\n"))
    assert list(_errors(exc)) == ["listen.port"]


# -- validation errors -------------------------------------------------------------------------------


def test_every_error_reported_at_once_with_its_path(tmp_path: Path, acme: str) -> None:
    path = _write(
        tmp_path,
        f"""
        public_url: not-a-url
        path_prefix: /trailing/
        listen: {{port: 70000}}
        upstream: {{url: ftp://example.com}}
        session:
          secrets: ['{SECRET_A}', 'too-short']
          same_site: sometimes
          cookie_name: "bad name"
        identity: {{headers: {{user: "X Auth"}}}}
        access: {{trusted_proxies: [not-an-ip]}}
        unknown_section: 1
        providers:
          x: {{plugin: no-such-plugin}}
          acme: {{plugin: {acme}, client_secret: s, typo: 1}}
          Bad_Name: {{plugin: {acme}}}
        """,
    )
    with pytest.raises(ConfigFileError) as exc:
        load_config(path, environ={})
    errors = _errors(exc)
    for where in [
        "public_url",
        "path_prefix",
        "listen.port",
        "upstream.url",
        "session.secrets[1]",
        "session.same_site",
        "session.cookie_name",
        "identity.headers.user",
        "access.trusted_proxies",
        "unknown_section",
        "providers",  # the invalid provider name
        "providers.x.plugin",
        "providers.acme.client_id",
        "providers.acme.typo",
    ]:
        assert where in errors, (where, errors)
    assert "session.secrets[0]" not in errors
    assert "32" in errors["session.secrets[1]"]
    assert "no-such-plugin" in errors["providers.x.plugin"]
    assert "Bad_Name" in errors["providers"]
    assert all(secret not in str(exc.value.errors) for secret in ALL_SECRETS)


def test_provider_errors_alone_keep_their_paths(tmp_path: Path, acme: str) -> None:
    path = _write(
        tmp_path,
        f"""
        session: {{secrets: ['{SECRET_A}']}}
        providers:
          x: {{plugin: no-such-plugin}}
          acme: {{plugin: {acme}, client_id: 5}}
          noplugin: {{client_id: a}}
        """,
    )
    with pytest.raises(ConfigFileError) as exc:
        load_config(path, environ={})
    errors = _errors(exc)
    assert "providers" in errors and "noplugin" in errors["providers"]
    assert "no-such-plugin" in errors["providers.x.plugin"]
    assert {"providers.acme.client_id", "providers.acme.client_secret"} <= set(errors)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("session: {secrets: []}\n", "session.secrets"),
        ("listen: {port: 1}\n", "session"),
        ("- a\n- b\n", "<root>"),
        ("session: {secrets: [a\n", "line"),
    ],
)
def test_structural_errors(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigFileError) as exc:
        load_config(_write(tmp_path, text), environ={})
    assert any(path.startswith(where) for path, _ in exc.value.errors), exc.value.errors


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError) as exc:
        load_config(tmp_path / "missing.yaml", environ={})
    assert exc.value.errors[0][0] == "<file>"


def test_build_config_in_code() -> None:
    config = build_config({"session": {"secrets": [SECRET_A]}, "public_url": "https://app.example.com/"})
    assert isinstance(config, GatewayConfig)
    assert config.public_url == "https://app.example.com"
    assert config.redirect_uri("lark") == "https://app.example.com/_gateway/callback/lark"
    assert config.origin == "https://app.example.com"


# -- masking ---------------------------------------------------------------------------------------


def _secret_config(tmp_path: Path, acme: str) -> Path:
    return _write(
        tmp_path,
        f"""
        public_url: https://app.example.com
        session: {{secrets: ["${{SECRET_A}}", "{SECRET_B}"]}}
        store: {{backend: redis, url: "redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"}}
        providers:
          acme:
            plugin: {acme}
            client_id: cli_123
            client_secret: ${{ACME_SECRET}}
            signing: {{key_id: k9, key: {NESTED_SECRET}}}
            old_secrets: [{LISTED_SECRET}]
            region: intl
        """,
    )


def _walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def test_masked_dict_hides_every_secret(tmp_path: Path, acme: str) -> None:
    config = load_config(_secret_config(tmp_path, acme), environ={"SECRET_A": SECRET_A, "ACME_SECRET": PROVIDER_SECRET})
    settings = config.provider_settings()["acme"]
    assert isinstance(settings, AcmeSettings) and settings.client_secret.get_secret_value() == PROVIDER_SECRET
    data = masked_dict(config)
    assert data["session"]["secrets"] == ["***", "***"]
    assert data["store"]["url"] == "***"
    acme_data = data["providers"]["acme"]
    assert acme_data["client_secret"] == "***"
    assert acme_data["signing"] == {"key_id": "k9", "key": "***"}
    assert acme_data["old_secrets"] == ["***"]
    assert acme_data["client_id"] == "cli_123" and acme_data["plugin"] == acme
    assert acme_data["api_url"] == "https://api.acme.example.com/"
    assert acme_data["region"] == "intl" and type(acme_data["region"]) is str
    assert acme_data["scopes"] == ["openid", "profile"]
    assert data["public_url"] == "https://app.example.com"
    dumped = yaml.safe_dump(data)
    for secret in ALL_SECRETS:
        assert secret not in dumped and secret not in repr(data)
    assert not any(isinstance(value, SecretStr) for value in _walk(data))


# -- gateway check-config -------------------------------------------------------------------------------


def _bad_config(tmp_path: Path) -> Path:
    return _write(
        tmp_path,
        f"""
        upstream: {{url: "not a url"}}
        session: {{secrets: ["short", "{SECRET_B}"]}}
        store: {{backend: redis, url: "redis://:{REDIS_PASSWORD}@h/0"}}
        providers:
          x: {{plugin: no-such-plugin}}
        """,
        name="bad.yaml",
    )


def test_check_config_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], acme: str
) -> None:
    monkeypatch.setenv("SECRET_A", SECRET_A)
    monkeypatch.setenv("ACME_SECRET", PROVIDER_SECRET)
    path = _secret_config(tmp_path, acme)
    assert main(["check-config", "--no-connect", str(path)]) == 0
    out, err = capsys.readouterr()
    printed = yaml.safe_load(out)
    assert printed == masked_dict(load_config(path))
    assert printed["providers"]["acme"]["client_secret"] == "***"
    for secret in ALL_SECRETS:
        assert secret not in out and secret not in err


def test_check_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(_bad_config(tmp_path))]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "upstream.url: " in err
    assert "session.secrets[0]: " in err
    assert "providers.x.plugin: " in err and "no-such-plugin" in err
    assert "session.secrets[1]" not in err
    for secret in ALL_SECRETS:
        assert secret not in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 2
    assert "<file>: " in capsys.readouterr().err


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
        check=False,
    )


def test_check_config_subprocess(tmp_path: Path) -> None:
    good = _write(
        tmp_path,
        f"""
        session: {{secrets: ["${{SECRET_A}}", "{SECRET_B}"], cookie_name: "${{COOKIE:-sso}}"}}
        store: {{backend: redis, url: "redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0"}}
        """,
    )
    result = _run("check-config", "--no-connect", str(good),
                  env={"SECRET_A": SECRET_A, "GATEWAY_LISTEN__PORT": "8181"})
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["session"]["secrets"] == ["***", "***"] and printed["store"]["url"] == "***"
    assert printed["session"]["cookie_name"] == "sso" and printed["listen"]["port"] == 8181
    for secret in ALL_SECRETS:
        assert secret not in result.stdout and secret not in result.stderr

    bad = _run("check-config", str(_bad_config(tmp_path)), env={})
    assert bad.returncode == 2
    assert bad.stdout == ""
    for where in ("upstream.url: ", "session.secrets[0]: ", "providers.x.plugin: "):
        assert where in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    for secret in ALL_SECRETS:
        assert secret not in bad.stderr
