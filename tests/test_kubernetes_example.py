"""The Kubernetes sidecar example (``deploy/kubernetes/gateway-sidecar.yaml``, shown in
docs/deployment.md): it parses, its probes, ports, mounts and Service point at what the gateway's
config (the ConfigMap's ``gateway.yaml``) really serves, and that config starts ``gateway serve``
against a real Redis with both probe paths answering (readyz turning 503 when the app is down)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from gateway.config import GatewayConfig, load_config
from gateway.sandbox import serve_apps
from tests.conftest import echo_app, free_port

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "gateway-sidecar.yaml"
SECRET_KEYS = ("session-secrets", "redis-url", "lark-app-secret", "metrics-token")


def _documents() -> dict[str, dict[str, Any]]:
    documents = [document for document in yaml.safe_load_all(MANIFEST.read_text()) if document]
    by_kind = {document["kind"]: document for document in documents}
    assert len(by_kind) == len(documents) == 3, [document["kind"] for document in documents]
    return by_kind


def _containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {container["name"]: container for container in deployment["spec"]["template"]["spec"]["containers"]}


def _mount_path(container: dict[str, Any], volume: str) -> str:
    return str(next(mount["mountPath"] for mount in container["volumeMounts"] if mount["name"] == volume))


def _gateway_yaml() -> str:
    return str(_documents()["ConfigMap"]["data"]["gateway.yaml"])


def _write_config(directory: Path, secrets_dir: str, values: dict[str, str], **overrides: Any) -> Path:
    """The ConfigMap's gateway.yaml with the Secret mounted at ``directory/secrets`` (each key a
    file, as Kubernetes mounts it), and ``overrides`` (section: {key: value}) applied."""
    mounted = directory / "secrets"
    mounted.mkdir()
    for key, value in values.items():
        (mounted / key).write_text(value + "\n")
    data = yaml.safe_load(_gateway_yaml().replace(secrets_dir, str(mounted)))
    for section, settings in overrides.items():
        data[section] = {**data.get(section, {}), **settings}
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _secret_values(redis_url: str = "redis://127.0.0.1:1/0") -> dict[str, str]:
    return {"session-secrets": secrets.token_urlsafe(32), "redis-url": redis_url,
            "lark-app-secret": secrets.token_urlsafe(24), "metrics-token": secrets.token_urlsafe(32)}


def test_the_probes_ports_and_mounts_match_the_gateway_config(tmp_path: Path) -> None:
    kinds = _documents()
    deployment, service, config_map = kinds["Deployment"], kinds["Service"], kinds["ConfigMap"]
    containers = _containers(deployment)
    gateway, app = containers["gateway"], containers["app"]
    secrets_dir = _mount_path(gateway, "secrets")
    config: GatewayConfig = load_config(_write_config(tmp_path, secrets_dir, _secret_values()))

    # The container runs the config the ConfigMap holds.
    config_dir = _mount_path(gateway, "config")
    assert gateway["args"] == ["serve", "--config", f"{config_dir}/gateway.yaml"]
    assert list(config_map["data"]) == ["gateway.yaml"]
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]

    # Probes: liveness and startup on healthz (the process alone), readiness on readyz (store and
    # upstream), each on the named port the gateway listens on, reachable from outside the pod.
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    probes = {kind: gateway[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["startupProbe"]["path"] == probes["livenessProbe"]["path"] == f"{config.path_prefix}/healthz"
    assert probes["readinessProbe"]["path"] == f"{config.path_prefix}/readyz"
    for probe in probes.values():
        assert ports[probe["port"]] == config.listen.port
    assert config.listen.host == "0.0.0.0"
    assert service["spec"]["ports"][0]["targetPort"] in ports  # the Service reaches the gateway only
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    # The app: on the pod's loopback, where the gateway's upstream points; readyz checks it.
    app_env = {item["name"]: item["value"] for item in app["env"]}
    upstream = urlsplit(config.upstream.url)
    assert (upstream.hostname, upstream.port) == (app_env["HOST"], int(app_env["PORT"])) == ("127.0.0.1", 9000)
    assert "ports" not in app and config.upstream.check_ready

    # Several replicas share one Redis; every secret comes from the mounted Secret, read-only.
    assert deployment["spec"]["replicas"] >= 2 and config.store.backend == "redis"
    file_keys = [line.split(":", 1)[1].strip().split()[0] for line in _gateway_yaml().splitlines()
                 if line.strip().split(":", 1)[0].endswith("_file")]
    assert sorted(Path(path).name for path in file_keys) == sorted(SECRET_KEYS)
    assert all(path.startswith(secrets_dir + "/") for path in file_keys), file_keys
    assert volumes["secrets"]["secret"]["secretName"] and all(
        mount["readOnly"] for mount in gateway["volumeMounts"])
    assert config.session.secrets[0].get_secret_value() and config.metrics.bearer_token is not None
    # The pod's group may read the secret files the non-root gateway opens.
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["fsGroup"] == gateway["securityContext"]["runAsUser"]
    assert volumes["secrets"]["secret"]["defaultMode"] & 0o040


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def _gateway_serve(config: Path, port: int, log: Path) -> AsyncIterator[str]:
    """``gateway serve`` as the container runs it (``--host``/``--port``: loopback and a free port
    here); its URL once healthz answers, within a bounded wait."""
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port), stdout=output, stderr=output, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # a loaded machine: bounded, not timed
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            while True:
                if process.returncode is not None or time.monotonic() > deadline:
                    pytest.fail(f"gateway serve did not start:\n{_text(log)}")
                try:
                    if (await client.get("/_gateway/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_the_example_config_serves_both_probes_on_redis(tmp_path: Path, redis_url: str) -> None:
    container = _containers(_documents()["Deployment"])["gateway"]
    secrets_dir = _mount_path(container, "secrets")
    live, ready = (container[probe]["httpGet"]["path"] for probe in ("livenessProbe", "readinessProbe"))
    app = echo_app()
    async with serve_apps({"app": app}) as urls:
        config = _write_config(tmp_path, secrets_dir, _secret_values(redis_url), upstream={"url": urls["app"]},
                               session={"secure": False})
        async with _gateway_serve(config, free_port(), tmp_path / "gateway.log") as url, \
                httpx.AsyncClient(base_url=url, timeout=10) as client:
            healthz = await client.get(live)
            readyz = await client.get(ready)
            assert (healthz.status_code, healthz.json()) == (200, {"status": "ok"})
            assert (readyz.status_code, readyz.json()) == (200, {"status": "ready"}), readyz.text
            # The metrics token came from its file: the scrape with it passes, one without is refused.
            token = _text(tmp_path / "secrets" / "metrics-token").strip()
            assert (await client.get("/_gateway/metrics")).status_code in (401, 403)
            assert (await client.get("/_gateway/metrics", headers={"authorization": f"Bearer {token}"})).status_code \
                == 200
    # The app is gone (its server stopped above): readyz says so, healthz does not (no restart).
    async with _gateway_serve(config, free_port(), tmp_path / "gateway-2.log") as url, \
            httpx.AsyncClient(base_url=url, timeout=10) as client:
        readyz = await client.get(ready)
        healthz = await client.get(live)
    assert readyz.status_code == 503 and readyz.json()["error"] == "upstream_unavailable", readyz.text
    assert healthz.status_code == 200


def test_the_docs_show_the_manifest_as_it_is() -> None:
    # docs/deployment.md ("Kubernetes") includes the manifest's objects verbatim: they cannot drift.
    manifest = MANIFEST.read_text()
    docs = (MANIFEST.parents[2] / "docs" / "deployment.md").read_text()
    assert "```yaml\n" + manifest[manifest.index("---\n"):] + "```\n" in docs
