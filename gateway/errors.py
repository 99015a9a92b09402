"""The gateway's errors: one small hierarchy, each with a stable code and a human sentence.

Every error that reaches a user is one of these. The middleware turns it into a JSON body
``{"error": code, "message": message}`` for API clients or a readable page for browsers; it never
shows a traceback, and a message never contains a secret or a token.

Providers raise the ``ProviderError`` subclasses; which one tells the core what to do next:

- ``ReauthRequired``: a definitive answer (code used or expired, refresh token revoked...). The
  token record ends and the user goes through the silent handshake again.
- ``ProviderUnavailable``: a transient answer (timeout, 5xx, rate limit). Nothing is ended; the
  request is retried later (503 with Retry-After when the old access token cannot be used).
- ``ProviderMisconfigured``: the provider says our configuration is wrong (bad secret, scope not
  enabled in the console, redirect URL not registered). Only an operator can fix it.
- ``LoginDenied``: the user (or their admin) said no, or is not allowed to use the app.
- ``LoginPending``: the user's authorization waits for an administrator's approval.
"""

from __future__ import annotations

from collections.abc import Mapping


class GatewayError(Exception):
    """Base class: ``code`` is stable (clients switch on it), ``message`` is for people."""

    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        fields: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        # The values a translated sentence of ``code`` names ({seconds}, {expected}...).
        self.fields: dict[str, object] = dict(fields or {})
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConfigError(GatewayError):
    """The gateway's own configuration is invalid (raised at start-up, not per request)."""

    status_code = 500
    code = "config_error"


class StoreUnavailable(GatewayError):
    """The session store cannot be reached; requests that need it fail closed."""

    status_code = 503
    code = "store_unavailable"
    retry_after_s = 5


class ProviderError(GatewayError):
    """Something the identity provider answered (or failed to answer).

    ``provider_code`` keeps the provider's own error code (e.g. Lark ``20064``) for the logs.
    """

    status_code = 502
    code = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        provider_code: str | int | None = None,
    ) -> None:
        super().__init__(message, code=code, status_code=status_code)
        self.provider_code = provider_code


class ReauthRequired(ProviderError):
    """Definitive: the grant is gone (code used/expired, refresh token revoked or reused)."""

    status_code = 401
    code = "reauth_required"


class ProviderUnavailable(ProviderError):
    """Transient: timeout, 5xx or rate limit. Keep every token; try again later."""

    status_code = 503
    code = "provider_unavailable"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        provider_code: str | int | None = None,
        retry_after_s: int = 5,
    ) -> None:
        super().__init__(message, code=code, provider_code=provider_code)
        self.retry_after_s = retry_after_s


class ProviderMisconfigured(ProviderError):
    """The provider rejected our configuration; only an operator can fix it."""

    status_code = 502
    code = "provider_misconfigured"


class LoginDenied(ProviderError):
    """The user refused consent, or is not allowed to use this app. ``tenant`` and ``user``: who
    the provider said signed in, when it said so before refusing (the ``login.failed`` audit
    event names them; never shown to the user)."""

    status_code = 403
    code = "access_denied"

    def __init__(self, message: str, *, code: str | None = None, status_code: int | None = None,
                 provider_code: str | int | None = None, tenant: str | None = None, user: str | None = None) -> None:
        super().__init__(message, code=code, status_code=status_code, provider_code=provider_code)
        self.tenant, self.user = tenant, user


class LoginPending(ProviderError):
    """The authorization waits for an administrator's approval."""

    status_code = 403
    code = "approval_pending"
