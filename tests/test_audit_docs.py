"""docs/deployment.md's audit events table, held to the code: every ``AuditEvent`` listed once,
at the level ``audit`` writes it, with only fields an audit event can carry."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import get_args

import pytest

from gateway.logs import AUDIT_FIELDS, AuditEvent, audit

DEPLOYMENT = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"


def documented_audit_events() -> dict[str, tuple[str, set[str]]]:
    """The table's rows: event -> (level, the fields named in its fields column). A field is a
    backquoted name outside parentheses (inside them: its values, e.g. ``state_invalid``)."""
    text = DEPLOYMENT.read_text()
    table = text[text.index("**Audit events**"):].split("\n\n")[1]
    rows: dict[str, tuple[str, set[str]]] = {}
    for line in table.splitlines()[2:]:  # after the header and its rule
        event, level, fields = (cell.strip() for cell in line.strip("|").split("|"))
        while (unwrapped := re.sub(r"\([^()]*\)", "", fields)) != fields:
            fields = unwrapped
        name = event.strip("`")
        assert name not in rows, f"{name} is listed twice"
        rows[name] = (level, set(re.findall(r"`([a-z_]+)`", fields)))
    return rows


def test_the_table_lists_every_audit_event() -> None:
    assert set(documented_audit_events()) == set(get_args(AuditEvent))


@pytest.mark.parametrize("event", get_args(AuditEvent))
def test_each_event_is_documented_at_the_level_it_is_written(event: AuditEvent,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="gateway.audit"):
        audit(event, provider="lark")
    [record] = caplog.records
    assert documented_audit_events()[event][0] == record.levelname


def test_the_table_names_only_fields_an_audit_event_carries() -> None:
    for event, (_, fields) in documented_audit_events().items():
        assert fields and fields <= set(AUDIT_FIELDS), (event, fields - set(AUDIT_FIELDS))
