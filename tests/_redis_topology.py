"""Real Redis topologies for the failover tests, on free loopback ports, and the traffic they carry.

- ``SentinelSite``: a master, one replica and three Sentinels (quorum 2, a master is down after
  1 s), started with Debian's ``redis-server --sentinel``;
- ``ClusterSite``: three masters, each with a replica (``cluster-node-timeout`` 1 s), joined with
  ``redis-cli --cluster create``;
- ``Traffic``: a bounded request loop with one signed-in session spread over the gateway
  replicas, and a sign-in every second, recording every answer for the test to assert on.

Timings are shortened for the tests only (docs/redis.md gives the production settings).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import BROWSER_UA, HTML, RedisProcess, browser_login, free_port

MASTER = "mymaster"
COOKIE = "gw_session"
TOKEN_HEADER = "x-auth-access-token"


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=2)


def wait_until(what: str, check: Any, timeout_s: float = 20, logs: list[Path] | None = None) -> Any:
    """Poll ``check()`` (errors count as "not yet") until it answers something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            answer = check()
            if answer:
                return answer
        if time.monotonic() > deadline:
            shown = "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs or ()
                              if log.exists())
            pytest.fail(f"timed out waiting for {what}\n{shown}")
        time.sleep(0.05)


@dataclass
class SentinelSite:
    workdir: Path
    master: RedisProcess
    replica: RedisProcess
    sentinel_ports: list[int]
    sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def start(cls, workdir: Path) -> SentinelSite:
        master = RedisProcess(workdir).start()
        replica = RedisProcess(workdir, None, "--replicaof", "127.0.0.1", str(master.port)).start()
        site = cls(workdir, master, replica, [free_port() for _ in range(3)])
        try:
            site._start_sentinels()
        except BaseException:  # pytest.fail included: nothing left running behind a failed start
            site.stop()
            raise
        return site

    def _start_sentinels(self) -> None:
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                            f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                            f"sentinel down-after-milliseconds {MASTER} 1000\n"
                            f"sentinel failover-timeout {MASTER} 10000\n")
            with (self.workdir / f"sentinel-{port}.log").open("ab") as log:
                self.sentinels.append(subprocess.Popen([self.master.binary, str(conf), "--sentinel"], stdout=log,
                                                       stderr=subprocess.STDOUT))
        wait_until("the replica to sync", lambda: _client(self.replica.port).info("replication").get(
            "master_link_status") == "up", logs=self.logs())
        for port in self.sentinel_ports:  # each knows the replica and the two other Sentinels
            sentinel = _client(port)
            wait_until(f"Sentinel {port} to see the replica and its peers", lambda s=sentinel: (
                s.execute_command("SENTINEL", "REPLICAS", MASTER)
                and len(s.execute_command("SENTINEL", "SENTINELS", MASTER)) == 2), logs=self.logs())

    def logs(self) -> list[Path]:
        return sorted(self.workdir.glob("*.log"))

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def master_port(self) -> int:
        _host, port = _client(self.sentinel_ports[0]).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
        return int(port)

    def node(self, port: int) -> RedisProcess:
        return self.master if self.master.port == port else self.replica

    def force_failover(self) -> None:
        _client(self.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", MASTER)

    def wait_master_moved(self, old_port: int, timeout_s: float = 30) -> int:
        """Every Sentinel names another master than ``old_port``: its port."""
        def moved() -> int | None:
            ports = {int(_client(p).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)[1])
                     for p in self.sentinel_ports}
            return ports.pop() if len(ports) == 1 and old_port not in ports else None
        return int(wait_until("the Sentinels to switch the master", moved, timeout_s, self.logs()))

    def wait_replica_of(self, port: int, master_port: int, timeout_s: float = 30) -> None:
        wait_until(f"{port} to replicate {master_port}", lambda: (
            (info := _client(port).info("replication")).get("master_port") == master_port
            and info.get("master_link_status") == "up"), timeout_s, self.logs())

    def stop(self) -> None:
        for process in self.sentinels:
            process.terminate()
        for process in self.sentinels:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.master.stop()
        self.replica.stop()


@dataclass
class ClusterSite:
    workdir: Path
    nodes: list[RedisProcess]

    @classmethod
    def start(cls, workdir: Path, *extra: str) -> ClusterSite:
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        if not os.access(cli, os.X_OK):
            pytest.fail("redis-cli is needed to create the test Cluster: install it (apt-get install redis-tools)")
        nodes = []
        for _ in range(6):
            port = free_port()
            nodes.append(RedisProcess(workdir, port, "--cluster-enabled", "yes", "--cluster-config-file",
                                      f"nodes-{port}.conf", "--cluster-node-timeout", "1000",
                                      "--appenddirname", f"appendonly-{port}",
                                      # An idle test cluster's replicas count as stale after a few
                                      # seconds (node timeout 1 s) and would refuse to take over.
                                      "--cluster-replica-validity-factor", "0",
                                      "--repl-diskless-sync-delay", "0",
                                      "--cluster-port", str(free_port()), *extra).start())
        site = cls(workdir, nodes)
        try:
            site._create(cli)
        except BaseException:  # pytest.fail included: nothing left running behind a failed start
            site.stop()
            raise
        return site

    def _create(self, cli: str) -> None:
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes), "--cluster-replicas", "1",
             "--cluster-yes"], capture_output=True, text=True, timeout=60, check=False)
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
        self.wait_ok()
        for node in self.nodes:  # every replica holds its master's data before the tests write any
            wait_until(f"the replica {node.port} to sync", lambda node=node: (
                (info := _client(node.port).info("replication"))["role"] == "master"
                or info.get("master_link_status") == "up"), logs=self.logs())

    def logs(self) -> list[Path]:
        return sorted(self.workdir.glob("*.log"))

    def alive(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Every live node says the cluster is ok, and every slot is served by a live master."""
        def ok() -> bool:
            live = {f"127.0.0.1:{node.port}" for node in self.alive()}
            for node in self.alive():
                client = _client(node.port)
                if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                    return False
                listed = client.execute_command("CLUSTER", "NODES")
                text = listed.decode() if isinstance(listed, bytes) else str(listed)
                for line in text.splitlines():
                    fields = line.split()
                    serving = "master" in fields[2] and len(fields) > 8
                    if serving and (fields[1].split("@")[0] not in live or "fail" in fields[2]):
                        return False
            return True
        wait_until("the cluster to be ok", ok, timeout_s, self.logs())

    def masters(self) -> list[RedisProcess]:
        return [node for node in self.alive() if _client(node.port).info("replication")["role"] == "master"]

    def urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{node.port}" for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# -- traffic --------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """One session's requests (every ``interval_s``, round-robin over ``urls``) and a sign-in
    every ``signin_every_s``, until ``stop()``; bounded by ``max_s`` whatever happens."""

    urls: list[str]
    ticket: str
    interval_s: float = 0.05
    signin_every_s: float = 1.0
    max_s: float = 60.0
    answers: list[tuple[float, int, str]] = field(default_factory=list)  # (when, status, detail)
    signins: list[tuple[float, int]] = field(default_factory=list)
    tokens: Counter[str] = field(default_factory=Counter)
    longest_s: float = 0.0  # the longest a session request took
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _answered: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Traffic:
        self.started_at = time.monotonic()
        self._tasks = [asyncio.create_task(self._session()), asyncio.create_task(self._signins())]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _session(self) -> None:
        async with httpx.AsyncClient(timeout=40, headers={"user-agent": BROWSER_UA}) as client:
            i = 0
            while not self._stop.is_set() and time.monotonic() - self.started_at < self.max_s:
                url = self.urls[i % len(self.urls)]
                i += 1
                sent = time.monotonic()
                try:
                    answer = await client.get(f"{url}/probe/{i}", headers={"cookie": f"{COOKIE}={self.ticket}"})
                except httpx.HTTPError as exc:
                    self.answers.append((time.monotonic(), 0, f"{type(exc).__name__}: {exc}"))
                else:
                    detail = answer.text[:200]
                    if answer.status_code == 200:
                        token = dict(answer.json()["headers"]).get(TOKEN_HEADER, "<none>")
                        self.tokens[token] += 1
                        detail = ""
                    self.answers.append((time.monotonic(), answer.status_code, detail))
                self.longest_s = max(self.longest_s, time.monotonic() - sent)
                self._answered.set()
                await asyncio.sleep(self.interval_s)

    async def _signins(self) -> None:
        i = 0
        while not self._stop.is_set() and time.monotonic() - self.started_at < self.max_s:
            url = self.urls[i % len(self.urls)]
            i += 1
            async with httpx.AsyncClient(base_url=url, timeout=40, headers={"user-agent": BROWSER_UA}) as client:
                try:
                    answer = await browser_login(client, f"/signin/{i}")
                    self.signins.append((time.monotonic(), answer.status_code))
                except httpx.HTTPError:
                    self.signins.append((time.monotonic(), 0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.signin_every_s)

    async def until_refreshed_and_served(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until the session was served with a second token and its
        last request succeeded."""
        deadline = time.monotonic() + timeout_s
        while not (self.answers and self.answers[-1][1] == 200 and len(self.tokens) >= 2):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._answered.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), left)
        return True

    def statuses(self) -> Counter[int]:
        return Counter(status for _, status, _ in self.answers)

    def signin_statuses(self) -> Counter[int]:
        return Counter(status for _, status in self.signins)

    def failures(self) -> list[tuple[float, int, str]]:
        return [answer for answer in self.answers if answer[1] != 200]

    def served_again_after(self, moment: float) -> float | None:
        """Seconds from ``moment`` to the first 200 after the last failure (None: none since)."""
        failures = [when for when, status, _ in self.answers if status != 200 and when >= moment]
        last = max(failures, default=moment)
        after = [when for when, status, _ in self.answers if status == 200 and when >= last]
        return (min(after) - moment) if after else None


def sign_ins_as_another_user(sandbox: Any) -> None:
    """From now on the emulator signs in another user: the traffic's sign-ins must not replace
    the session user's token record (a new code exchange would stand in for the refresh)."""
    others = [open_id for open_id in sandbox.users if open_id != sandbox.current_user]
    sandbox.set_current_user(others[0])


async def login(url: str) -> str:
    """The browser flow through ``url``: the session cookie."""
    async with httpx.AsyncClient(base_url=url, headers={"user-agent": BROWSER_UA}, timeout=20) as client:
        answer = await browser_login(client, "/hello")
        assert answer.status_code == 200, answer.text
        ticket = client.cookies.get(COOKIE)
    assert ticket
    return ticket


async def logout_reaches(urls: list[str], ticket: str, bound_s: float) -> float:
    """Log the session out through ``urls[0]``: seconds until every other replica refuses it
    (fails the test beyond ``bound_s``)."""
    async with httpx.AsyncClient(timeout=10, headers={"user-agent": BROWSER_UA}) as client:
        cookie = {"cookie": f"{COOKIE}={ticket}"}
        for url in urls[1:]:  # cached there
            assert (await client.get(f"{url}/cached", headers=cookie)).status_code == 200
        answer = await client.post(f"{urls[0]}/_gateway/logout", headers={**cookie, "origin": urls[0]})
        assert answer.status_code == 200, answer.text
        started = time.monotonic()
        pending = set(urls[1:])
        while pending and time.monotonic() - started < bound_s:
            for url in list(pending):
                page = await client.get(f"{url}/after-logout", headers={**cookie, **HTML})
                if page.status_code == 302 and "/_gateway/login" in page.headers["location"]:
                    pending.discard(url)
            await asyncio.sleep(0.02)
        assert not pending, f"still serving the logged-out session after {bound_s} s: {pending}"
        return time.monotonic() - started
