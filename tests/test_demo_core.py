"""The demo's core knows no provider: each emulator brings its tour cards (``Sandbox.demo_tour``).

The tour's pages, script and actions are built from the ``TourEntry`` values the emulators
declare, and every provider's part of an action sits behind the admin endpoints each emulator
implements (``tour/approval``, ``tour/answer``: the plugins' sandbox tests drive those).
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

from gateway.demo_pages import tour_page
from gateway.demo_tour import TourProvider, tour_providers
from gateway.sandbox import Sandbox, TourEntry, available_sandboxes

ROOT = Path(__file__).parents[1]
CORE = sorted([*ROOT.glob("gateway/demo*.py"), ROOT / "gateway" / "static" / "demo.js",
               ROOT / "gateway" / "sandbox" / "demo.py"])


def test_the_core_demo_modules_name_no_provider() -> None:
    sandboxes = {name: cls() for name, cls in available_sandboxes().items()}
    names = {"lark", "dingtalk", "wemeet", "feishu", "tencent"}
    names |= {entry.name for entry in entry_points(group="gateway.providers")}  # a new plugin too
    names |= {sandbox.title for sandbox in sandboxes.values() if sandbox.title}
    names |= {entry.title for sandbox in sandboxes.values() for entry in sandbox.demo_tour()}
    pattern = re.compile("|".join(re.escape(name) for name in sorted(names)), re.IGNORECASE)
    assert len(CORE) >= 5, CORE
    found = {str(path.relative_to(ROOT)): sorted({match.group(0) for match in pattern.finditer(path.read_text())})
             for path in CORE}
    assert {path: words for path, words in found.items() if words} == {}


def test_the_tour_shows_the_emulators_entries_in_their_order() -> None:
    sandboxes = {name: cls() for name, cls in sorted(available_sandboxes().items())}
    cards = tour_providers(sandboxes)
    assert [card.name for card in cards] == ["lark", "dingtalk", "dingtalk-isv", "wemeet"]
    assert {card.name: card.shared_with for card in cards} == {"lark": 1, "dingtalk": 2, "dingtalk-isv": 2,
                                                               "wemeet": 1}
    assert [card.emulator for card in cards] == ["lark", "dingtalk", "dingtalk", "wemeet"]


class _Quiet(Sandbox):
    """An emulator that adds nothing to the tour (the base class's default)."""

    plugin = "quiet"


class _Several(Sandbox):
    plugin = "several"
    title = "Several"
    tour_position = 1

    def demo_tour(self) -> list[TourEntry]:
        return [TourEntry(f"several-{n}", f"Several {n}", deny_help="Refused.", deny_answers=("no",),
                          approval_help="No approval step here.") for n in range(3)]


def test_an_emulator_without_tour_entries_is_absent_and_several_entries_share_one_note() -> None:
    assert _Quiet().demo_tour() == []
    cards = tour_providers({"quiet": _Quiet(), "several": _Several()})
    assert [card.name for card in cards] == ["several-0", "several-1", "several-2"]
    page = tour_page(cards, {}, "/_gateway").body.decode()
    assert page.count("All 3 Several apps share one emulator: a switch applies to all of them.") == 3
    assert page.count('data-switch="approval" disabled') == 3 and 'data-action="approve"' not in page


def test_two_entries_of_one_emulator_say_both() -> None:
    entry = TourEntry("x", "X", deny_help="", deny_answers=(), approval_help="", approval_answers=("wait",))
    page = tour_page([TourProvider(entry, "e", "Emulated", shared_with=2)], {}, "/_gateway").body.decode()
    assert "Both Emulated apps share one emulator: a switch applies to both." in page
    assert 'data-action="approve"' in page and 'data-action="reject"' not in page
