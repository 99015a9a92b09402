"""The words people read: every page and error message in Simplified Chinese and English.

The users of these pages sit inside a Chinese super-app (Feishu, DingTalk, Tencent Meeting), most
of them on a phone; the clients send ``Accept-Language: zh-Hans-CN`` or ``zh-CN``. ``negotiate``
picks one of ``LOCALES`` from that header:

- q-values are honoured (``q=0`` means "not this one"); among equal weights the first listed wins;
- ``zh``, ``zh-CN``, ``zh-SG``, ``zh-Hans``, ``zh-Hans-CN``... get Simplified Chinese (``zh-Hans``);
- ``en`` and every ``en-*`` get English;
- Traditional Chinese (``zh-TW``, ``zh-HK``, ``zh-MO``, ``zh-Hant``...) is not offered: the reader's
  next listed language is used when it is one of ours, and Simplified Chinese when none is (a
  Chinese reader reads it more easily than English);
- no header, ``*``, or only languages we do not have: English (API clients, scripts, curl).

The catalogue maps message ids to both texts. An error's id is ``error.<code>`` (its stable code);
titles are ``title.<code>`` / ``title.<status>``; labels ``action.*``; the handshake page's own
strings ``page.*``. English pages and English JSON ``message`` keep the sentence the raising code
wrote (it may carry details such as a provider's hint); Chinese ones use the catalogue's sentence
for the code, and a page shows the English detail below it when the code has no sentence of its
own. JSON error bodies keep the stable ``error`` code in every language; their ``message`` follows
``Accept-Language`` like the pages (the handshake page shows the ``/exchange`` answer's message).

Plugins contribute the messages of their own codes with ``register`` at import time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from starlette.types import Scope

Locale = Literal["zh-Hans", "en"]
LOCALES: tuple[Locale, ...] = ("zh-Hans", "en")
DEFAULT_LOCALE: Locale = "en"
ZH: Locale = "zh-Hans"
EN: Locale = "en"

_TRADITIONAL = ("zh-tw", "zh-hk", "zh-mo", "zh-hant")


def _weighted(header: str) -> list[tuple[str, float]]:
    """``(tag in lower case, q)`` of each language range, malformed q-values read as 0."""
    ranges = []
    for part in header.split(","):
        tag, *params = (piece.strip() for piece in part.split(";"))
        if not tag:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = q if 0 <= q <= 1 else 0.0
        ranges.append((tag.lower(), q))
    return ranges


def _ours(tag: str) -> Locale | None:
    if tag == "*":
        return DEFAULT_LOCALE
    if tag == "en" or tag.startswith("en-"):
        return EN
    if tag == "zh" or tag.startswith("zh-"):
        return None if tag.startswith(_TRADITIONAL) else ZH
    return None


def negotiate(accept_language: str | None) -> Locale:
    """The locale to answer in, from an ``Accept-Language`` header (see the module docstring)."""
    if not accept_language:
        return DEFAULT_LOCALE
    ranges = sorted(_weighted(accept_language[:1024]), key=lambda item: -item[1])  # stable: order kept
    wanted = [(tag, q) for tag, q in ranges if q > 0]
    for tag, _ in wanted:
        found = _ours(tag)
        if found is not None:
            return found
    if any(tag.startswith(_TRADITIONAL) for tag, _ in wanted):
        return ZH
    return DEFAULT_LOCALE


def locale_of(scope: Scope) -> Locale:
    """The locale of the request in ``scope`` (its ``Accept-Language``)."""
    for name, value in scope.get("headers", ()):
        if name == b"accept-language":
            return negotiate(value.decode("latin-1"))
    return DEFAULT_LOCALE


def language_headers(locale: Locale) -> dict[str, str]:
    """The headers of a response whose words depend on ``Accept-Language``."""
    return {"content-language": locale, "vary": "Accept-Language"}


# id -> {locale: text}. Texts may hold {name} fields, filled by ``text(..., name=value)``.
MESSAGES: dict[str, dict[Locale, str]] = {
    # -- page titles: by error code first (what happened), else by status ---------------------
    "title.approval_pending": {EN: "Waiting for your administrator", ZH: "等待管理员审批"},
    "title.access_denied": {EN: "Sign-in was declined", ZH: "登录未获授权"},
    "title.tenant_not_allowed": {EN: "Your organisation cannot use this app", ZH: "你所在的组织无法使用此应用"},
    "title.login_required": {EN: "Please sign in", ZH: "请登录"},
    "title.public_url_mismatch": {EN: "Open the app at its own address", ZH: "请通过应用的正式地址打开"},
    "title.400": {EN: "This request could not be used", ZH: "无法处理此请求"},
    "title.401": {EN: "Please sign in again", ZH: "请重新登录"},
    "title.403": {EN: "Access denied", ZH: "无权访问"},
    "title.404": {EN: "Not found", ZH: "找不到页面"},
    "title.405": {EN: "Method not allowed", ZH: "不支持的请求方式"},
    "title.408": {EN: "The request took too long", ZH: "请求超时"},
    "title.413": {EN: "This request is too large", ZH: "请求内容过大"},
    "title.415": {EN: "This request could not be used", ZH: "无法处理此请求"},
    "title.429": {EN: "Too many attempts", ZH: "尝试次数过多"},
    "title.501": {EN: "This request could not be used", ZH: "无法处理此请求"},
    "title.502": {EN: "The service behind this page is unavailable", ZH: "此页面背后的服务暂不可用"},
    "title.503": {EN: "Temporarily unavailable", ZH: "暂时无法使用"},
    "title.504": {EN: "The service behind this page did not answer in time", ZH: "此页面背后的服务响应超时"},
    "title.default": {EN: "Something went wrong", ZH: "出了点问题"},
    "title.sign_in": {EN: "Sign in", ZH: "登录"},
    "title.signed_out": {EN: "Signed out", ZH: "已退出登录"},
    # -- labels ---------------------------------------------------------------------------------
    "action.try_again": {EN: "Try again", ZH: "重试"},
    "action.sign_in": {EN: "Sign in", ZH: "登录"},
    "action.sign_in_again": {EN: "Sign in again", ZH: "重新登录"},
    "action.sign_in_in_browser": {EN: "Sign in in the browser", ZH: "在浏览器中登录"},
    "action.continue": {EN: "Continue", ZH: "继续"},
    "action.open_app": {EN: "Open {url}", ZH: "打开 {url}"},
    "label.code": {EN: "Error code: ", ZH: "错误代码："},  # the code follows, in <code>
    "label.request_id": {EN: "Request ID: ", ZH: "请求编号："},  # the id follows, in <code>
    "label.details": {EN: "Details", ZH: "详细信息（英文）"},
    # -- the chooser, the handshake page and its script ------------------------------------------
    "page.choose": {EN: "Choose how to sign in.", ZH: "请选择登录方式。"},
    "page.signing_in_with": {EN: "Signing in with {name}", ZH: "正在通过{name}登录"},
    "page.connecting": {EN: "Connecting…", ZH: "正在连接…"},
    "page.connecting_to": {EN: "Connecting to {name}…", ZH: "正在连接{name}…"},
    "page.continuing_with": {EN: "Continuing with {name}…", ZH: "正在转到{name}…"},
    "page.browser_sign_in": {EN: "Continuing with the browser sign-in…", ZH: "正在转到浏览器登录…"},
    "page.signing_you_in": {EN: "Signing you in…", ZH: "正在登录…"},
    "page.not_completed": {EN: "Sign-in did not complete", ZH: "登录未完成"},
    "page.not_completed_denied": {EN: "Sign-in was not completed", ZH: "登录未完成"},
    "page.exchange_failed": {EN: "The gateway could not complete the sign-in.", ZH: "网关未能完成登录。"},
    "page.code_unusable": {EN: "The sign-in code could not be used.", ZH: "登录码无法使用。"},
    "page.access_was_denied": {EN: "Access was denied.", ZH: "访问被拒绝。"},
    "page.pending": {
        EN: "Your request was sent to an administrator for approval. You can come back once it is approved.",
        ZH: "你的申请已发送给管理员审批。审批通过后，请重新打开此应用。",
    },
    "page.declined": {EN: "The authorization was declined.", ZH: "授权未获同意，因此没有登录。"},
    "page.signed_out": {EN: "You are signed out.", ZH: "你已退出登录。"},
    "page.network_failed": {EN: "the network request failed", ZH: "网络请求失败，请检查网络后重试。"},
    "page.gateway_timeout": {EN: "the gateway did not answer in time", ZH: "网关未能及时响应，请重试。"},
    # -- errors, by stable code ---------------------------------------------------------------------
    "error.bad_request": {EN: "This request could not be used.", ZH: "无法处理此请求。"},
    "error.bad_host": {EN: "The request has more than one Host header.", ZH: "请求包含多个 Host 头，无法处理。"},
    "error.bad_framing": {EN: "The request's framing is ambiguous.", ZH: "请求的长度信息有歧义，无法处理。"},
    "error.bad_path": {EN: "The request path cannot be used.", ZH: "请求路径无法使用。"},
    "error.unsupported_transfer_encoding": {
        EN: "The request uses a transfer coding the gateway does not accept.",
        ZH: "请求使用了网关不接受的传输编码。"},
    "error.body_incomplete": {EN: "The request body did not arrive.", ZH: "请求内容没有完整送达，请重试。"},
    "error.body_too_large": {EN: "The request body is too large.", ZH: "请求内容过大。"},
    "error.body_length_mismatch": {
        EN: "The request body did not match its declared length.", ZH: "请求内容与声明的长度不符。"},
    "error.request_timeout": {EN: "The request body arrived too slowly.", ZH: "请求内容传输过慢，已停止等待。"},
    "error.invalid_json": {EN: "The request is not valid JSON.", ZH: "请求内容不是有效的 JSON。"},
    "error.unsupported_media_type": {EN: "Send the code as JSON.", ZH: "请以 JSON 格式发送登录码。"},
    "error.login_required": {EN: "You are not signed in.", ZH: "你尚未登录。"},
    "error.not_found": {EN: "There is no such gateway endpoint.", ZH: "没有这个地址。"},
    "error.method_not_allowed": {EN: "This endpoint does not take this method.", ZH: "此地址不支持该请求方式。"},
    "error.unknown_provider": {EN: "No such sign-in provider is configured.", ZH: "没有配置这种登录方式。"},
    "error.no_providers": {EN: "No identity provider is configured.", ZH: "尚未配置任何登录方式。"},
    # The relay and consent (gateway/relay.py, consent.py) and the upstream helper (gateway/verify.py).
    "error.client_disconnected": {EN: "The request was closed before it was complete.", ZH: "请求在完成之前已被关闭。"},
    "error.consent_required": {
        EN: "This needs your permission for more of your data; please grant it and try again.",
        ZH: "此操作需要你授予更多权限，请授权后重试。"},
    "error.scope_not_allowed": {EN: "These permissions cannot be requested here.", ZH: "此处无法申请这些权限。"},
    "error.relay_forbidden": {EN: "This provider API is not open through the gateway.", ZH: "此接口未通过网关开放。"},
    "error.relay_misconfigured": {
        EN: "This provider API route is not configured correctly.", ZH: "此接口的转发配置有误。"},
    "error.identity_missing": {EN: "The request carries no signed identity.", ZH: "请求中没有身份凭证。"},
    "error.identity_invalid": {EN: "The signed identity is not valid.", ZH: "身份凭证无效。"},
    "error.identity_expired": {
        EN: "The signed identity has expired; please sign in again.", ZH: "身份凭证已过期，请重新登录。"},
    "error.jwks_unavailable": {
        EN: "The gateway's signing keys cannot be fetched right now; please try again.",
        ZH: "暂时无法获取网关的签名密钥，请稍后重试。"},
    "error.state_invalid": {
        EN: "This sign-in link is not valid, has expired or was already used; please start again.",
        ZH: "此登录链接无效、已过期或已被使用，请重新登录。"},
    "error.state_mismatch": {
        EN: "This sign-in was started in another browser, or long ago; please start again here.",
        ZH: "此次登录是在另一个浏览器中发起的，或已过去太久，请在这里重新登录。"},
    "error.public_url_mismatch": {
        EN: "This app is configured for {expected}, but this page was opened at {actual}. Open the app at "
            "{expected}, or ask its operator to set public_url to the address people use.",
        ZH: "此应用配置的地址是 {expected}，但此页面是通过 {actual} 打开的。请改用 {expected} 打开应用，"
            "或请运维人员把 public_url 设为大家实际使用的地址。"},
    "error.code_missing": {EN: "No usable sign-in code arrived.", ZH: "没有收到可用的登录码，请重新登录。"},
    "error.code_invalid": {
        EN: "The sign-in code is invalid or was already used; please sign in again.",
        ZH: "登录码无效或已被使用，请重新登录。"},
    "error.code_expired": {EN: "The sign-in code has expired; please sign in again.", ZH: "登录码已过期，请重新登录。"},
    "error.code_used": {
        EN: "The sign-in code was already used; please sign in again.", ZH: "登录码已被使用，请重新登录。"},
    "error.cross_origin": {
        EN: "This request must come from the app's own pages.", ZH: "此请求必须来自本应用自己的页面。"},
    "error.rate_limited": {EN: "Too many attempts; please wait and try again.", ZH: "请求过于频繁，请稍后再试。"},
    "error.rate_limited_login": {
        EN: "Too many sign-in attempts from your network. Please wait {seconds} seconds and try again.",
        ZH: "你所在的网络登录尝试过于频繁，请等待 {seconds} 秒后再试。"},
    "error.internal_error": {
        EN: "Something went wrong in the sign-in gateway. Please try again.", ZH: "登录网关出现内部错误，请重试。"},
    "error.config_error": {EN: "The gateway's configuration is invalid.", ZH: "网关的配置有误。"},
    "error.metrics_forbidden": {
        EN: "The metrics are served only with metrics.bearer_token or to a peer listed in metrics.allow_from.",
        ZH: "指标只提供给携带 metrics.bearer_token 的请求，或 metrics.allow_from 中列出的地址。"},
    "error.metrics_unauthorized": {
        EN: "The metrics need the bearer token set in metrics.bearer_token.",
        ZH: "获取指标需要 metrics.bearer_token 中配置的令牌。"},
    "error.tenant_not_allowed": {
        EN: "Your organisation is not allowed to use this app.", ZH: "你所在的组织无权使用此应用。"},
    "error.access_denied": {
        EN: "The authorization was declined, so you are not signed in.", ZH: "授权未获同意，因此没有登录。"},
    "error.approval_pending": {
        EN: "Your authorization is waiting for an administrator's approval. "
            "Come back and sign in again once it is approved.",
        ZH: "你的授权正在等待管理员审批。审批通过后，请回来重新登录。"},
    "error.user_inactive": {
        EN: "The provider says this account is not active.", ZH: "登录服务显示此账号不存在、已停用或未激活。"},
    "error.user_not_allowed": {
        EN: "You may not use this app; ask your organisation's administrator to add you.",
        ZH: "你没有使用此应用的权限，请联系组织管理员把你加入应用的可用范围。"},
    "error.session_ended": {EN: "Your sign-in has ended; please sign in again.", ZH: "你的登录已结束，请重新登录。"},
    "error.reauth_required": {EN: "A new sign-in is needed.", ZH: "需要重新登录。"},
    "error.provider_error": {
        EN: "Sign-in did not complete: the provider reported an error.", ZH: "登录未完成：登录服务报告了错误。"},
    "error.provider_unavailable": {
        EN: "The sign-in provider is unavailable; please try again shortly.", ZH: "登录服务暂时不可用，请稍后再试。"},
    "error.provider_slow": {
        EN: "The sign-in provider is slow to answer; please try again shortly.", ZH: "登录服务响应缓慢，请稍后再试。"},
    "error.provider_timeout": {
        EN: "The sign-in provider did not answer in time.", ZH: "登录服务未能及时响应，请稍后再试。"},
    "error.provider_unreachable": {
        EN: "The sign-in provider could not be reached.", ZH: "无法连接登录服务，请稍后再试。"},
    "error.provider_misconfigured": {
        EN: "The app's sign-in is misconfigured; only its administrator can fix it.",
        ZH: "此应用的登录配置有误，只有应用管理员能修复，请联系管理员。"},
    "error.store_unavailable": {
        EN: "The session store is unavailable; please try again shortly.", ZH: "会话存储暂时不可用，请稍后再试。"},
    "error.upstream_unavailable": {
        EN: "The upstream service is unavailable right now. Please try again in a moment.",
        ZH: "应用服务暂时不可用，请稍后再试。"},
    "error.upstream_timeout": {
        EN: "The upstream service did not answer in time. Please try again in a moment.",
        ZH: "应用服务未能及时响应，请稍后再试。"},
    "error.upstream_invalid": {
        EN: "The upstream service sent an answer the gateway cannot pass on safely.",
        ZH: "应用服务返回了网关无法安全转发的响应。"},
    "error.upstream_busy": {
        EN: "The upstream service is busy right now. Please try again in a moment.", ZH: "应用服务繁忙，请稍后再试。"},
    "error.upstream_refused": {
        EN: "The upstream service refused the WebSocket connection.", ZH: "应用服务拒绝了 WebSocket 连接。"},
    "error.signed_out": {EN: "You are signed out.", ZH: "你已退出登录。"},
}


def register(messages: Mapping[str, Mapping[Locale, str]]) -> None:
    """Add a plugin's messages (ids such as ``error.<its code>``). An id already in the
    catalogue keeps its texts: a plugin adds words, it does not reword the core's."""
    for message_id, texts in messages.items():
        if message_id not in MESSAGES:
            MESSAGES[message_id] = dict(texts)


def has(message_id: str, locale: Locale) -> bool:
    return locale in MESSAGES.get(message_id, {})


def text(message_id: str, locale: Locale, **fields: object) -> str:
    """The text of ``message_id`` in ``locale`` (English when that locale lacks it), fields filled."""
    texts = MESSAGES.get(message_id)
    if texts is None:
        return message_id
    template = texts.get(locale) or texts[EN]
    return template.format(**fields) if fields else template


def error_title(code: str, status_code: int, locale: Locale) -> str:
    """A page title: by error code first (what happened), else by status."""
    for message_id in (f"title.{code}", f"title.{status_code}"):
        if message_id in MESSAGES:
            return text(message_id, locale)
    return text("title.default", locale)


def error_message(
    code: str, message: str, locale: Locale, *, message_id: str | None = None, **fields: object
) -> tuple[str, str | None]:
    """``(sentence, detail)`` for an error. In English: the raising code's own ``message``, no
    detail. In Chinese: the catalogue's sentence for ``code``, and ``message`` as the (English)
    detail when it says more than the catalogue's English for that code (a provider's hint), so
    nothing specific is lost; a code without a Chinese sentence gets a generic one. ``message_id``
    names a more precise sentence than the code's own (``error.rate_limited_login``)."""
    if locale == EN:
        return message, None
    message_id = message_id if message_id in MESSAGES else f"error.{code}"
    if not has(message_id, locale):
        return text("title.default", locale) + "。", message
    detail = None if message == text(message_id, EN, **fields) else message
    return text(message_id, locale, **fields), detail


def display_name(name: str, locale: Locale) -> str:
    """A provider's name as readers of ``locale`` know it (飞书, 钉钉, 腾讯会议), from the
    ``name.<display name>`` messages the plugins register; else ``name`` itself."""
    message_id = f"name.{name}"
    return text(message_id, locale) if message_id in MESSAGES else name
