"""gateway.i18n: which language a request gets, and a catalogue that covers every error code."""

from __future__ import annotations

import ast
import string
from pathlib import Path

import pytest

import plugins.dingtalk.provider
import plugins.lark.provider
import plugins.wemeet.provider  # noqa: F401  (each registers its messages on import)
from gateway import i18n
from gateway.i18n import EN, MESSAGES, ZH, error_message, error_title, negotiate, register, text

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, EN),
        ("", EN),
        ("zh-Hans-CN", ZH),  # DingTalk, Tencent Meeting
        ("zh-CN,zh;q=0.9", ZH),  # Feishu, Chromium in Chinese
        ("zh", ZH),
        ("zh-SG", ZH),
        ("ZH-hans", ZH),
        ("en-US,en;q=0.9", EN),
        ("en-GB", EN),
        ("fr-FR,fr;q=0.9", EN),  # nothing of ours: English
        ("*", EN),
        # q-values, not the order, decide; equal weights keep the listed order.
        ("en;q=0.5,zh-CN;q=0.9", ZH),
        ("zh-CN;q=0.4,en;q=0.8", EN),
        ("fr,zh-CN;q=0.8,en;q=0.7", ZH),
        ("en,zh-CN", EN),
        ("zh-CN,en", ZH),
        ("zh-CN;q=0,en;q=0.1", EN),  # q=0: not this one
        ("en;q=0,fr", EN),  # nothing acceptable of ours: the default all the same
        ("zh-CN;q=abc,en;q=0.5", EN),  # a malformed weight counts as 0
        ("zh-CN;q=7,en;q=0.5", EN),  # so does one out of range
        # Traditional Chinese: the reader's next listed language of ours, else Simplified.
        ("zh-TW", ZH),
        ("zh-Hant-HK", ZH),
        ("zh-TW,en;q=0.8", EN),
        ("zh-TW,zh;q=0.9,en;q=0.8", ZH),
        ("zh-HK,fr;q=0.5", ZH),
    ],
)
def test_negotiate(header: str | None, expected: str) -> None:
    assert negotiate(header) == expected


def test_locale_of_reads_the_request_header() -> None:
    assert i18n.locale_of({"type": "http", "headers": [(b"accept-language", b"zh-Hans-CN")]}) == ZH
    assert i18n.locale_of({"type": "http", "headers": [(b"accept", b"text/html")]}) == EN


def _codes() -> dict[str, str]:
    """Every stable error code the gateway and the plugins can answer with, found in their source
    (``code="..."`` arguments, ``code = "..."`` class attributes and assignments, the code argument
    of ``error_response``/``_refuse`` and of the plugins' error rules): code -> where."""
    found: dict[str, str] = {}
    files = sorted([*ROOT.joinpath("gateway").rglob("*.py"), *ROOT.joinpath("plugins").glob("*/provider.py")])
    for path in files:
        if "sandbox" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            candidates: list[ast.expr] = []
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                candidates += [kw.value for kw in node.keywords if kw.arg == "code"]
                position = {"error_response": 2, "_refuse": 4, "reauth": 1, "transient": 1, "denied": 1}.get(name)
                if position is not None and len(node.args) > position:
                    candidates.append(node.args[position])
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id == "code":
                        candidates.append(node.value)
                    elif isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        names = [getattr(element, "id", None) for element in target.elts]
                        if "code" in names:
                            candidates.append(node.value.elts[names.index("code")])
            for candidate in candidates:
                if isinstance(candidate, ast.Constant) and isinstance(candidate.value, str):
                    found.setdefault(candidate.value, f"{path.relative_to(ROOT)}:{candidate.lineno}")
    return found


def test_the_scan_finds_the_codes_it_should() -> None:
    # The scan is what the coverage test below relies on: it must see each kind of source.
    codes = _codes()
    for code in ("state_mismatch", "rate_limited", "access_denied", "upstream_busy", "upstream_refused",
                 "code_used", "user_not_member", "bad_path", "public_url_mismatch", "login_required"):
        assert code in codes, code
    assert len(codes) > 40


def test_every_error_code_has_a_chinese_and_an_english_sentence() -> None:
    missing = {code: where for code, where in _codes().items()
               if not (i18n.has(f"error.{code}", ZH) and i18n.has(f"error.{code}", EN))}
    assert missing == {}


def test_every_message_has_both_languages_and_the_same_blanks() -> None:
    def blanks(template: str) -> set[str]:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name}

    for message_id, texts in MESSAGES.items():
        assert set(texts) == {EN, ZH}, message_id
        assert blanks(texts[EN]) == blanks(texts[ZH]), message_id
        assert texts[ZH] != "" and texts[EN] != "", message_id


def test_chinese_texts_are_chinese() -> None:
    # A forgotten translation (the English copied) would show English on a Chinese page.
    untranslated = [message_id for message_id, texts in MESSAGES.items()
                    if texts[ZH] == texts[EN] and not message_id.startswith("name.")]
    assert untranslated == []


def test_error_message_english_keeps_the_raisers_sentence() -> None:
    assert error_message("code_used", "Feishu says the code was used (20065).", EN) == (
        "Feishu says the code was used (20065).", None)


def test_error_message_chinese_uses_the_code_and_keeps_a_specific_detail() -> None:
    generic = text("error.code_used", EN)
    assert error_message("code_used", generic, ZH) == ("登录码已被使用，请重新登录。", None)
    sentence, detail = error_message("code_used", "The Feishu login code was already used (20065).", ZH)
    assert sentence == "登录码已被使用，请重新登录。" and detail == "The Feishu login code was already used (20065)."
    # A code without a sentence: a generic Chinese one, the English kept as the detail.
    assert error_message("no_such_code_anywhere", "Something odd.", ZH) == ("出了点问题。", "Something odd.")
    # A more precise id, with its blanks filled.
    assert error_message("rate_limited", "Wait 7 s.", ZH, message_id="error.rate_limited_login", seconds=7)[0] == (
        "你所在的网络登录尝试过于频繁，请等待 7 秒后再试。")


def test_titles_by_code_then_status() -> None:
    assert error_title("approval_pending", 403, ZH) == "等待管理员审批"
    assert error_title("cross_origin", 403, ZH) == "无权访问"
    assert error_title("cross_origin", 403, EN) == "Access denied"
    assert error_title("whatever", 418, EN) == "Something went wrong"


def test_plugins_add_words_but_do_not_reword_the_core() -> None:
    before = dict(MESSAGES["error.access_denied"])
    register({"error.access_denied": {EN: "reworded", ZH: "改写"}, "error.test_only_code": {EN: "a", ZH: "甲"}})
    try:
        assert MESSAGES["error.access_denied"] == before
        assert text("error.test_only_code", ZH) == "甲"
    finally:
        MESSAGES.pop("error.test_only_code")


def test_provider_names_in_chinese() -> None:
    assert i18n.display_name("Feishu", ZH) == "飞书" and i18n.display_name("Feishu", EN) == "Feishu"
    assert i18n.display_name("DingTalk", ZH) == "钉钉"
    assert i18n.display_name("Tencent Meeting", ZH) == "腾讯会议"
    assert i18n.display_name("Acme SSO", ZH) == "Acme SSO"
