"""``gateway demo`` as a newcomer starts it: what it prints, a busy port, ``--help``."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import httpx

from tests.conftest import free_port_block


def run(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout_s)


def test_help_explains_the_port_block() -> None:
    shown = run("demo", "--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "--port PORT" in text and "consecutive ports" in text and "emulators' hosts" in text
    assert "default: 8000" in text


def test_a_busy_port_is_one_line_saying_which() -> None:
    first = free_port_block(8)
    busy = first + 3  # one of the emulators' hosts
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        answer = run("demo", "--port", str(first))
    assert answer.returncode == 2
    assert answer.stdout == ""
    lines = answer.stderr.strip().splitlines()
    assert len(lines) == 1, answer.stderr
    assert f"port {busy} is busy" in lines[0] and "emulator" in lines[0] and "--port" in lines[0]
    assert "Traceback" not in answer.stderr


def test_start_up_prints_which_emulator_is_on_which_port() -> None:
    first = free_port_block(8)
    process = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(first)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while not any("Demo ready" in line for line in lines):
            line = process.stdout.readline()
            assert line and time.monotonic() < deadline, f"gateway demo stopped before it was ready: {lines}"
            lines.append(line.strip())
        printed = {line.split(" emulator")[0]: line for line in lines if " emulator " in line}
        assert set(printed) == {"Feishu/Lark", "DingTalk", "Tencent Meeting"}
        assert not [line for line in lines if line and not line.startswith(("Demo", "DingTalk", "Feishu", "Tencent"))]
        ports = sorted(int(port) for line in lines for port in re.findall(r":(\d+)\b", line)
                       if "Demo ready" not in line)
        assert ports == list(range(first, first + 8))  # the gateway, then every emulator host
        for role in ("open", "accounts", "api", "oapi", "login", "web"):
            assert any(f"{role} http://127.0.0.1:" in line for line in printed.values()), role
        assert httpx.get(f"http://127.0.0.1:{first}/demo/", timeout=5).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
