"""What an emulator contributes to ``gateway demo`` beyond its ``providers:`` entries.

The demo's core names no provider: each ``Sandbox`` says which Open API its demo providers call
through the relay (``Sandbox.demo_api_calls``), and the demo builds its relay routes and its relay
page from that; and which of its providers the tour shows, with what (``Sandbox.demo_tour``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote


@dataclass(frozen=True)
class DemoApiCall:
    """One Open API call the demo's relay page makes for a provider, through
    ``<prefix>/api/<provider>/<path>`` with ``gateway.fetch``.

    ``path`` is the provider's path as relayed, with its query; ``{user}`` stands for the signed-in
    user's id (the identity's ``user``). ``route`` is the ``relay.routes`` entry that lets it
    through (``provider`` is added). ``scope`` is what the page's switch makes the emulator's user
    not have granted. ``in_client_consent``: the client has a JSAPI that asks for more scopes, so a
    missing scope is a ``403 consent_required`` that ``gateway.fetch`` resolves in the page.
    ``consent_note`` tells the page's reader how consent goes for this provider (outside the
    client; or, without an in-client consent, what the provider answers and what the user does).
    """

    provider: str
    title: str  # what the call reads, for people: "the user's calendars"
    path: str
    scope: str
    route: dict[str, Any] = field(default_factory=dict)
    in_client_consent: bool = True
    consent_note: str = ""
    #: A key of the answer's JSON that shows the call worked (the page and its test look for it).
    shows: str = ""

    def relay_route(self) -> dict[str, Any]:
        return {"provider": self.provider, **self.route}

    def url_path(self, user: str) -> str:
        return self.path.replace("{user}", quote(user, safe=""))


@dataclass(frozen=True)
class TourEntry:
    """One provider on ``gateway demo``'s tour page (``/demo/``), as its emulator declares it in
    ``Sandbox.demo_tour``. The page shows one card per entry: open the app with it (in a browser,
    in the simulated client), the switches, and what the provider answers to each situation.

    ``provider`` is a key of the emulator's ``demo_providers`` (the name in URLs and
    ``X-Auth-Provider``); ``next_path`` where the app opens after the sign-in (a third-party app's
    homepage URL may carry its organisation). ``settings`` are added to that provider's demo
    settings for the tour (e.g. a sign-in that yields a refresh token, so "expire" can show one).

    ``deny_help``/``deny_answers``: what refusing looks like for a user of this provider and the
    provider's answers (shown as codes) when the emulator's user refuses. ``approval_help``:
    what the "an administrator must approve" switch does, or why the provider has no such step;
    ``approval_answers`` the provider's answers while the approval waits, None when there is no
    approval step (the switch is then disabled). ``admin_can_refuse``: the administrator can also
    refuse, not only approve (a second button). ``forget_storage``: prefixes of browser
    ``localStorage`` keys the page removes when the approval switch goes on (what a client-side
    bridge remembers of an earlier grant, which a user never granted must not have).
    """

    provider: str
    title: str
    deny_help: str
    deny_answers: tuple[str, ...]
    approval_help: str
    approval_answers: tuple[str, ...] | None = None
    admin_can_refuse: bool = False
    next_path: str = "/"
    settings: dict[str, Any] = field(default_factory=dict)
    forget_storage: tuple[str, ...] = ()

    @property
    def has_approval(self) -> bool:
        return self.approval_answers is not None
