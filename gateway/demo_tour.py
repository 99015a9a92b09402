"""The demo tour's state and actions: switches that drive the emulators, and the timeline.

The tour (``gateway demo``'s ``/demo/`` page) lets a newcomer make each provider behave as it does
for real users: the user refuses, an administrator must approve first, the access token expires,
the user signs in again on a second device. Every switch goes through an emulator's admin API
under ``/_sandbox/`` (over HTTP, as any client of ``gateway sandbox`` would drive it); the
emulators stay strict and answer what the provider documents for that situation.

The core knows no provider: each emulator declares its cards (``Sandbox.demo_tour``, one
``TourEntry`` per provider) and does the provider's part of each action behind the admin
endpoints every emulator has (``user_consent``, ``tokens/expire``, ``user_grant``,
``tour/approval``, ``tour/answer``).

The timeline merges what the emulators record (``GET /_sandbox/events``: JSAPI calls, codes,
exchanges, tokens issued or killed, identity lookups) with what the demo app itself sees (the
identity it received), in one sequence the page polls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import httpx

from gateway.errors import GatewayError
from gateway.sandbox import DemoApiCall, Sandbox, TourEntry
from gateway.tokens import token_key

log = logging.getLogger("gateway.demo")

Switch = Literal["deny", "approval"]
#: How many timeline entries the demo keeps (the oldest go first).
TIMELINE_SIZE = 400
#: The parallel requests the page sends after "expire the access token now".
BURST = 5


@dataclass(frozen=True)
class TourProvider:
    """One card of the tour: an emulator's ``TourEntry`` and that emulator. ``shared_with``: how
    many entries the emulator has in all (its switches apply to every one of them)."""

    entry: TourEntry
    emulator: str  # the Sandbox's plugin name
    emulator_title: str
    shared_with: int = 1

    @property
    def name(self) -> str:  # the key under providers: (URLs, X-Auth-Provider)
        return self.entry.provider

    @property
    def title(self) -> str:
        return self.entry.title

    @property
    def next_path(self) -> str:
        return self.entry.next_path

    @property
    def approval(self) -> bool:
        return self.entry.has_approval


def emulator_title(sandbox: Sandbox) -> str:
    return sandbox.title or sandbox.plugin


def tour_providers(sandboxes: Mapping[str, Sandbox]) -> list[TourProvider]:
    """Every emulator's tour entries, in the order of the page: by ``tour_position``, then plugin
    name, then each emulator's own order."""
    cards: list[TourProvider] = []
    for name, sandbox in sorted(sandboxes.items(), key=lambda item: (item[1].tour_position, item[0])):
        entries = sandbox.demo_tour()
        cards.extend(TourProvider(entry, name, emulator_title(sandbox), len(entries)) for entry in entries)
    return cards


class TourError(Exception):
    """An action that cannot be done now; ``status`` and a sentence for the page."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Tour:
    """What the tour page drives. ``admin_urls``: one base URL per emulator (any of its hosts
    serves the admin API); ``providers``: the cards (``tour_providers``), those of an emulator
    without a URL left out; ``titles``: each emulator's name for people; ``runtime``: the demo
    gateway's (for the token record that "expire the access token now" moves, and the provider a
    second device's old refresh token is tried with)."""

    def __init__(self, admin_urls: Mapping[str, str], public_url: str, path_prefix: str,
                 api_calls: Mapping[str, DemoApiCall] | None = None, *, providers: Iterable[TourProvider] = (),
                 titles: Mapping[str, str] | None = None, origins: Sequence[str] = ()) -> None:
        self.admin_urls = dict(admin_urls)
        self.titles = {emulator: (titles or {}).get(emulator) or emulator for emulator in self.admin_urls}
        #: Every emulator host (the relay page loads their fake JSSDKs, which call them).
        self.origins = list(origins)
        #: The relay page's call per provider name (what each emulator contributed).
        self.api_calls = dict(api_calls or {})
        self.public_url = public_url
        self.path_prefix = path_prefix
        self.providers = {provider.name: provider for provider in providers if provider.emulator in self.admin_urls}
        self.switches: dict[tuple[str, Switch], bool] = {}
        self.runtime: Any = None  # gateway.runtime.Runtime, set once the gateway is built
        self.http = httpx.AsyncClient(timeout=10)
        self._timeline: list[dict[str, Any]] = []
        #: The demo's notes since the last poll, and emulator events newer than that poll's start.
        self._unsorted: list[dict[str, Any]] = []
        self._seq = 0
        self._cursors = dict.fromkeys(self.admin_urls, 0)
        self._pulling = asyncio.Lock()

    async def aclose(self) -> None:
        await self.http.aclose()

    # -- the timeline ---------------------------------------------------------------------------

    def note(self, kind: str, text: str, source: str = "demo app") -> None:
        """Add one step seen by the demo itself (numbered with the emulators' on the next poll)."""
        self._unsorted.append({"at": time.time(), "kind": kind, "text": text, "source": source})

    async def timeline(self, after: int) -> dict[str, Any]:
        """The entries after ``after``. Each poll pulls the emulators' new events and numbers them
        with the demo's own notes since the last poll in the order they happened: what happened
        before a poll is all in by then, so the sequence is the order of time."""
        async with self._pulling:  # two polls at once must not pull the same events twice
            # Everything that happened up to now is in after this poll's fetches; what happens while
            # they run waits for the next poll, so a later note cannot land before an earlier event.
            cutoff = time.time()
            batch, self._unsorted = self._unsorted, []
            for emulator, url in self.admin_urls.items():
                try:
                    answer = await self.http.get(f"{url}/_sandbox/events", params={"after": self._cursors[emulator]})
                    events = answer.json()["events"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue  # an emulator that does not answer now is asked again on the next poll
                for event in events:
                    self._cursors[emulator] = max(self._cursors[emulator], int(event["seq"]))
                    batch.append({"at": event["at"], "kind": event["kind"], "text": event["text"],
                                  "source": f"{self.titles[emulator]} emulator"})
            batch.extend(self._unsorted)  # notes taken while the emulators were asked
            self._unsorted = [event for event in batch if float(event["at"]) > cutoff]
            for event in sorted((event for event in batch if float(event["at"]) <= cutoff),
                                key=lambda entry: float(entry["at"])):
                self._seq += 1
                self._timeline.append({**event, "seq": self._seq})
            del self._timeline[:-TIMELINE_SIZE]
        return {"events": [event for event in self._timeline if event["seq"] > after], "last": self._seq}

    # -- switches -------------------------------------------------------------------------------

    def provider(self, name: str) -> TourProvider:
        provider = self.providers.get(name)
        if provider is None:
            raise TourError(404, "unknown_provider", f"The demo has no provider named {name!r}.")
        return provider

    async def _admin(self, emulator: str, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        try:
            answer = await self.http.request(method, f"{self.admin_urls[emulator]}/_sandbox/{path}", json=body)
        except httpx.HTTPError as exc:
            raise TourError(502, "emulator_unavailable",
                            f"The {self.titles[emulator]} emulator did not answer ({type(exc).__name__}).") from None
        if answer.status_code >= 400:
            raise TourError(502, "emulator_refused", f"The {self.titles[emulator]} emulator refused: {answer.text}")
        return answer.json() if answer.content else None

    def _emulator_names(self, emulator: str) -> list[str]:
        """The providers that share an emulator: a switch on one applies to all of them."""
        return [name for name, provider in self.providers.items() if provider.emulator == emulator]

    async def set_switch(self, name: str, switch: Switch, on: bool) -> None:
        provider = self.provider(name)
        emulator = provider.emulator
        if switch == "deny":
            await self._admin(emulator, "POST", "user_consent", {"mode": "deny" if on else "allow"})
        elif provider.approval:  # the emulator makes the sign-in wait as its provider does
            await self._admin(emulator, "POST", "tour/approval", {"on": on})
        else:
            raise TourError(409, "not_applicable", f"{provider.title} has no administrator approval step: an "
                                                   "administrator makes the app available in the console.")
        for shared in self._emulator_names(emulator):
            self.switches[(shared, switch)] = on
        what = {"deny": "the user refuses", "approval": "an administrator must approve"}[switch]
        self.note("switch", f"{self.titles[emulator]}: {what} — {'on' if on else 'off'}")

    def api_call(self, name: str) -> DemoApiCall:
        call = self.api_calls.get(name)
        if call is None:
            raise TourError(404, "no_api_call", f"The demo calls no API of {self.provider(name).title}.")
        return call

    async def set_user_grant(self, name: str, granted: bool) -> dict[str, Any]:
        """The relay page's button: the emulator's current user has (not) granted the call's scope
        (an action, not a state the tour keeps: a consent grants it again)."""
        call = self.api_call(name)
        emulator = self.provider(name).emulator
        await self._admin(emulator, "POST", "user_grant", {"scope": call.scope, "granted": granted})
        self.note("switch", f"{self.titles[emulator]}: the user has {'granted' if granted else 'not granted'} "
                            f"{call.scope}")
        return {"provider": name, "scope": call.scope, "granted": granted}

    async def answer_approval(self, name: str, answer: Literal["approved", "rejected"]) -> None:
        """The administrator answers what waits (some providers' administrators approve only:
        their entries have no ``admin_can_refuse``)."""
        provider = self.provider(name)
        if not provider.approval or (answer == "rejected" and not provider.entry.admin_can_refuse):
            raise TourError(409, "not_applicable", f"{provider.title} has no such administrator answer.")
        await self._admin(provider.emulator, "POST", "tour/answer", {"answer": answer})

    async def state(self) -> dict[str, Any]:
        """Each provider's switches, and what its administrator has answered so far."""
        providers = []
        statuses: dict[str, str] = {}  # per emulator: the entries of one share its administrator
        for name, provider in self.providers.items():
            approval = ""
            if provider.approval:
                if provider.emulator not in statuses:
                    answer = await self._admin(provider.emulator, "GET", "tour/approval")
                    statuses[provider.emulator] = str(answer.get("status", "")) if isinstance(answer, dict) else ""
                approval = statuses[provider.emulator]
            providers.append({
                "name": name, "title": provider.title,
                "deny": self.switches.get((name, "deny"), False),
                "approval": self.switches.get((name, "approval"), False) if provider.approval else None,
                "approval_status": approval,
            })
        return {"providers": providers}

    # -- actions on the signed-in user ----------------------------------------------------------

    def _record_key(self, claims: Mapping[str, Any]) -> tuple[str, str, str]:
        return str(claims.get("provider", "")), str(claims.get("tenant") or ""), str(claims.get("user", ""))

    async def expire_access_token(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        """The access token expires now, at the emulator and in the gateway's record (as if its
        lifetime had passed): the next requests make the gateway refresh, once."""
        provider_name, tenant, user = self._record_key(claims)
        provider = self.provider(provider_name)
        key = token_key(provider_name, tenant, user)
        tokens = await self.runtime.tokens.load(key)
        if tokens is None:
            raise TourError(409, "not_signed_in", "The gateway holds no tokens for this sign-in: sign in again first.")
        await self._admin(provider.emulator, "POST", "tokens/expire")
        await self.runtime.tokens.save(provider_name, tenant, user, replace(tokens, expires_at=time.time()))
        await self.runtime.authenticator.tokens_replaced(key)  # the cached session must look again
        if tokens.refresh_token:
            self.note("demo", f"the gateway's copy of the {provider.title} access token now expires too: the next "
                              f"{BURST} requests arrive at once and share one refresh")
        else:
            self.note("demo", f"this {provider.title} sign-in has no refresh token (a free-login code): the gateway "
                              "ends the session and the handshake runs again")
        return {"burst": BURST, "refreshable": bool(tokens.refresh_token)}

    async def second_device(self, claims: Mapping[str, Any]) -> dict[str, Any]:
        """The same user signs in again elsewhere (a browser OAuth walked by the demo with its own
        cookies). The provider issues new tokens (some providers kill the previous ones at once);
        the gateway replaces the user's one token record, which this browser's session shares.
        Then the first device's old refresh token is tried once, to show what the provider says."""
        provider_name, tenant, user = self._record_key(claims)
        provider = self.provider(provider_name)
        key = token_key(provider_name, tenant, user)
        old = await self.runtime.tokens.load(key)
        self.note("demo", f"a second device signs in to {provider.title} (the browser OAuth, its own cookies)")
        login = f"{self.public_url}{self.path_prefix}/login"
        try:
            async with httpx.AsyncClient(timeout=15, follow_redirects=True, headers={
                    "user-agent": "Mozilla/5.0 (second device) Chrome/131.0 Safari/537.36", "accept": "text/html"},
            ) as device:
                answer = await device.get(login, params={"provider": provider_name, "next": "/whoami"})
        except httpx.HTTPError as exc:
            self.note("demo", f"the second device did not get in ({type(exc).__name__})")
            return {"signed_in": False}
        if answer.status_code != 200 or answer.headers.get("content-type", "").split(";")[0] != "application/json":
            self.note("demo", f"the second device did not get in (HTTP {answer.status_code})")
            return {"signed_in": False}
        second = answer.json().get("claims", {})
        same = self._record_key(second) == (provider_name, tenant, user)
        self.note("demo", f"the second device is signed in as {second.get('name') or second.get('user')}; "
                          + ("the gateway replaced this user's token record (one per user): this browser's "
                             "session goes on with the new tokens" if same else "another user: nothing shared"))
        result: dict[str, Any] = {"signed_in": True, "same_user": same}
        if same and old is not None and old.refresh_token:
            result["old_refresh"] = await self._try_old_refresh(provider_name, provider.title, old)
        return result

    async def _try_old_refresh(self, provider_name: str, title: str, old: Any) -> str:
        self.note("demo", "the demo tries the first device's old refresh token once, as a gateway holding it would")
        try:
            await self.runtime.providers[provider_name].refresh(old)
        except GatewayError as exc:
            self.note("refused", f"{title} refused the old refresh token: {exc.message} (error code: {exc.code})")
            return "refused"
        self.note("demo", f"{title} still accepted the old refresh token: a new login does not end the earlier "
                          "grant there (the gateway keeps only the newest tokens anyway)")
        return "accepted"
