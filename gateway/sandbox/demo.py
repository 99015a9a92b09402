"""What an emulator contributes to ``gateway demo`` beyond its ``providers:`` entries.

The demo's core names no provider: each ``Sandbox`` says which Open API its demo providers call
through the relay (``Sandbox.demo_api_calls``), and the demo builds its relay routes and its relay
page from that.
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
