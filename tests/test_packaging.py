"""The package as a user installs it: wheel and sdist built, the wheel installed in a fresh venv.

``python -m build`` builds both from a copy of the working tree (tracked and new files, nothing
ignored), so the build leaves nothing in the repository. Then:

- every file under gateway/ and plugins/ that is not Python (static JS/CSS, the bridges, py.typed)
  is in the wheel and in the sdist: a file missing from the package data fails here, by name;
- a venv without the system's site-packages gets the wheel and its dependencies from the index;
- from a directory outside the repository (so nothing is imported from the source tree), the
  installed ``gateway`` runs ``--version``, ``check-config config.example.yaml``, and ``demo``
  until its tour page answers 200 and its scripts are served (they are read from the installed
  package).

It needs the network to the package index; it takes about a minute (figures printed with -s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
import venv
import zipfile
from pathlib import Path

import httpx
import pytest

from gateway import __version__
from tests.conftest import free_port_block

REPO = Path(__file__).resolve().parent.parent
DEMO_START_S = 90  # a loaded machine starts the demo (8 servers) in seconds; the bound is generous


def report(line: str) -> None:
    print(f"[packaging] {line}", file=sys.stderr)


def source_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [name for name in listed if (REPO / name).is_file()]


def package_data() -> list[str]:
    """What the package must ship besides Python modules (tests excluded: they are no package)."""
    return sorted(name for name in source_files()
                  if name.startswith(("gateway/", "plugins/")) and not name.endswith(".py"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tree = tmp_path_factory.mktemp("tree")
    for name in source_files():
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    out = tmp_path_factory.mktemp("dist")
    started = time.monotonic()
    answer = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(tree)],
                            capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stdout[-3000:] + answer.stderr[-3000:]
    report(f"python -m build: {time.monotonic() - started:.1f} s")
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_the_wheel_and_the_sdist_hold_every_package_file(built: dict[str, Path]) -> None:
    expected = package_data()
    assert "gateway/py.typed" in expected and "plugins/lark/bridge.js" in expected
    assert any(name.startswith("gateway/static/") for name in expected)
    with zipfile.ZipFile(built["wheel"]) as wheel:
        in_wheel = set(wheel.namelist())
        metadata = next(name for name in in_wheel if name.endswith(".dist-info/METADATA"))
        assert f"Version: {__version__}" in wheel.read(metadata).decode()
        entry_points = wheel.read(next(name for name in in_wheel if name.endswith("entry_points.txt"))).decode()
    assert not [name for name in expected if name not in in_wheel], "missing from the wheel"
    assert "gateway = gateway.cli:main" in entry_points and "lark = plugins.lark.provider:LarkProvider" in entry_points
    assert not [name for name in in_wheel if name.startswith("tests/")]
    with tarfile.open(built["sdist"]) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert not [name for name in [*expected, "README.md", "pyproject.toml"] if name not in in_sdist], \
        "missing from the sdist"


def test_the_installed_wheel_checks_the_example_config_and_runs_the_demo(
    built: dict[str, Path], tmp_path: Path
) -> None:
    environment = tmp_path / "venv"
    started = time.monotonic()
    venv.create(environment, with_pip=True, system_site_packages=False, symlinks=True)
    python = environment / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              str(built["wheel"])], capture_output=True, text=True, timeout=400)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    report(f"fresh venv + pip install of the wheel: {time.monotonic() - started:.1f} s")
    gateway = environment / "bin" / "gateway"
    outside = tmp_path / "elsewhere"  # nothing importable from here but the installed package
    outside.mkdir()
    shutil.copy(REPO / "config.example.yaml", outside / "config.example.yaml")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # The variables config.example.yaml reads (values only valid in shape).
    env.update(GATEWAY_SECRET="Yq3nV8rT2mK6pL0xW4zB7cD1fG9hJ5sA", LARK_APP_SECRET="lark-app-secret",
               DINGTALK_SECRET="dingtalk-client-secret", WEMEET_SECRET="wemeet-secret",
               GATEWAY_METRICS_TOKEN="metrics-token-8Hq2Lw5Zp", REDIS_PASSWORD="redis-password")
    where = subprocess.run([str(python), "-c", "import gateway, sys; print(gateway.__file__)"], cwd=outside,
                           capture_output=True, text=True, env=env, timeout=60)
    assert where.stdout.startswith(str(environment)), where.stdout + where.stderr

    version = subprocess.run([str(gateway), "--version"], cwd=outside, capture_output=True, text=True, env=env,
                             timeout=60)
    assert version.stdout.strip() == f"gateway {__version__}", version.stdout + version.stderr
    check = subprocess.run([str(gateway), "check-config", "config.example.yaml"], cwd=outside,
                           capture_output=True, text=True, env=env, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "public_url: https://app.example.com" in check.stdout

    port = free_port_block(8)
    demo = subprocess.Popen([str(gateway), "demo", "--port", str(port)], cwd=outside, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + DEMO_START_S
        first: httpx.Response | None = None
        while time.monotonic() < deadline and demo.poll() is None:
            try:
                first = httpx.get(f"{base}/demo/", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert first is not None, f"the demo did not answer (exit {demo.poll()})"
        assert first.status_code == 200, first.text[:500]
        report(f"first 200 from the installed demo {time.monotonic() - started:.1f} s after the venv was started")
        # The files read from the installed package: the tour's own, the handshake's, each bridge.
        for path in ("/demo/static/demo.js", "/demo/static/demo.css", "/_gateway/static/handshake.js",
                     "/_gateway/static/bridge/lark.js", "/_gateway/static/bridge/dingtalk.js",
                     "/_gateway/static/bridge/wemeet.js"):
            answer = httpx.get(base + path, timeout=10)
            assert answer.status_code == 200 and len(answer.content) > 100, (path, answer.status_code)
    finally:
        demo.terminate()
        try:
            output, _ = demo.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            demo.kill()
            output, _ = demo.communicate()
    assert "Traceback" not in output, output[-3000:]
