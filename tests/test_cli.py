"""The CLI as users run it: real subprocesses on loopback ports."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

from tests.conftest import BROWSER_UA, HTML, free_port_block

SECRET = secrets.token_urlsafe(32)  # a placeholder such as "s" * 40 is refused (session.secrets)


@contextlib.contextmanager
def running(*args: str, ready: str, env: dict[str, str] | None = None, timeout_s: float = 20
            ) -> Iterator[subprocess.Popen[str]]:
    """Run ``python -m gateway ARGS`` until ``ready`` (a URL answering 200) is up."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise AssertionError(f"gateway exited early: {process.stdout.read() if process.stdout else ''}")
            try:
                if httpx.get(ready, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{ready} did not come up")
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


def test_demo_walks_the_browser_flow_and_the_simulated_client() -> None:
    port = free_port_block()
    base = f"http://127.0.0.1:{port}"
    with running("demo", "--port", str(port), ready=f"{base}/demo/"), \
            httpx.Client(base_url=base, headers={"user-agent": BROWSER_UA}, timeout=10) as client:
        home = client.get("/demo/", headers=HTML)
        assert "/demo/client/lark?provider=lark" in home.text  # the tour: "Open in the simulated client"

        assert client.get("/", headers=HTML).headers["location"] == "/_gateway/login?next=%2F"
        app = client.get("/_gateway/login?provider=lark&next=/", headers=HTML, follow_redirects=True)
        assert app.status_code == 200 and "Hello, 张三" in app.text
        assert "verified with the gateway" in app.text

        client.post("/_gateway/logout", headers={"origin": base})
        # Every emulator's providers, DingTalk's ISV suite included (its suiteTicket was pushed to
        # the demo gateway's event callback at start-up, as DingTalk does).
        for provider in ("dingtalk", "dingtalk-isv", "wemeet"):
            signed_in = client.get(f"/_gateway/login?provider={provider}&next=/", headers=HTML,
                                   follow_redirects=True)
            assert signed_in.status_code == 200 and "Hello," in signed_in.text, provider
            assert f"<td>{provider}</td>" in signed_in.text
            client.post("/_gateway/logout", headers={"origin": base})
        client.get("/demo/client/lark")
        assert client.cookies.get("demo_client") == "lark"
        page = client.get("/_gateway/login?next=/", headers=HTML)
        assert page.status_code == 200 and "gw-config" in page.text
        assert re.search(r'"jssdkUrl": "http://127\.0\.0\.1:\d+/_sandbox/h5-js-sdk\.js"', page.text)


def test_sandbox_serves_one_port_per_host_and_prints_the_providers_yaml() -> None:
    port = free_port_block()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "sandbox", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        while True:  # the YAML is printed once every host is up, and ends with a blank line
            line = process.stdout.readline()
            assert line, "gateway sandbox exited before printing its providers section"
            if not line.strip() and any(not seen.startswith("#") for seen in lines):
                break
            lines.append(line)
        hosts = [line.split()[-1] for line in lines if line.startswith("#")]
        ports = sorted(int(url.rsplit(":", 1)[1]) for url in hosts)
        assert ports == list(range(port, port + len(ports)))  # one port per host, consecutive from --port
        providers = yaml.safe_load("".join(line for line in lines if not line.startswith("#")))["providers"]
        lark = providers["lark"]
        assert lark["open_base_url"] in hosts and lark["accounts_base_url"] in hosts
        # The printed section works as is: the v3 endpoint the official SDKs use is on the accounts host.
        answer = httpx.post(f"{lark['accounts_base_url']}/oauth/v3/token",
                            json={"grant_type": "authorization_code", "code": "nope",
                                  "client_id": lark["app_id"], "client_secret": lark["app_secret"]})
        assert answer.json()["code"] == 20003
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_check_config_accepts_the_example_file() -> None:
    example = Path(__file__).parent.parent / "config.example.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(example)], capture_output=True, text=True,
        env={**os.environ, "GATEWAY_SECRET": SECRET, "LARK_APP_SECRET": "lark-secret-value",
             "DINGTALK_SECRET": "dingtalk-secret-value", "WEMEET_SECRET": "wemeet-secret-value"}, check=False,
    )
    assert result.returncode == 0, result.stderr
    for secret in ("lark-secret-value", "dingtalk-secret-value", "wemeet-secret-value", SECRET):
        assert secret not in result.stdout
    effective = yaml.safe_load(result.stdout)
    assert effective["providers"]["lark"]["open_base_url"] == "https://open.feishu.cn"
    assert effective["providers"]["lark"]["app_secret"] == "***"
    assert effective["providers"]["dingtalk"]["client_secret"] == "***"
    assert effective["providers"]["wemeet"]["secret"] == "***"


def _gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=60, check=False)


def test_a_config_without_session_secrets_fails_check_config_and_serve(tmp_path: Path) -> None:
    # It used to pass check-config (printing secrets: []) and then crash serve with a traceback.
    config = tmp_path / "gateway.yaml"
    config.write_text("public_url: http://127.0.0.1:8080\nsession: {secure: false}\n", encoding="utf-8")
    for args in (("check-config", "--no-connect", str(config)), ("serve", "--config", str(config))):
        result = _gateway(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "session.secrets: at least one session secret is required" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "secrets: []" not in result.stdout


def test_check_config_reports_unset_variables_and_key_errors_together(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("session:\n  secrets: ['${GATEWAY_SECRET}']\n  secrue: false\n"
                      "upstream: {url: '${UPSTREAM_URL}'}\n", encoding="utf-8")
    result = _gateway("check-config", "--no-connect", str(config))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == f"{config}: the configuration is invalid:"
    assert sorted(lines[1:]) == sorted([
        "  session.secrets[0]: environment variable GATEWAY_SECRET is not set "
        "(or write ${GATEWAY_SECRET:-default} for a default)",
        "  upstream.url: environment variable UPSTREAM_URL is not set "
        "(or write ${UPSTREAM_URL:-default} for a default)",
        "  session.secrue: unknown key `secrue` under session — did you mean `secure`?",
    ])


def test_serve_says_in_one_line_what_stops_it_starting(tmp_path: Path) -> None:
    # A valid file the gateway still cannot start with: its identity key cannot be created there.
    config = tmp_path / "gateway.yaml"
    config.write_text(f"session: {{secrets: ['{SECRET}'], secure: false}}\n"
                      "identity: {signing_key_file: /proc/no-such-dir/identity.pem}\n", encoding="utf-8")
    result = _gateway("serve", "--config", str(config), "--port", str(free_port_block(1)))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines()[-1] == (
        f"{config}: the gateway cannot start: identity.signing_key_file: cannot create a key in "
        "/proc/no-such-dir: No such file or directory")
    assert "Traceback" not in result.stderr
