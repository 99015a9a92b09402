"""Access rules: which paths are public, which tenants may use the app."""

from __future__ import annotations

import re
from fnmatch import translate

from gateway.config import Access
from gateway.edge import EdgeRejected, normalize_path, normalize_target

__all__ = ["AccessRules", "normalize_path"]


class AccessRules:
    """``access.public_paths`` (glob patterns, ``*`` also crosses ``/``) and ``access.allow_tenants``."""

    def __init__(self, access: Access) -> None:
        patterns = [translate(pattern) for pattern in access.public_paths]
        self._public = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        #: ``access.allow_tenants``; empty: every tenant is allowed.
        self.allowed_tenants = frozenset(access.allow_tenants)
        #: False when no path is public: the middleware skips ``is_public`` altogether.
        self.has_public_paths = self._public is not None

    def is_public(self, path: str) -> bool:
        """Whether a (once percent-decoded) path is public, matched after normalization.

        ``/public/../private`` is not public. Neither is any path with ``;``, ``\\`` or a ``%`` left
        after decoding: some servers read ``/public/..;/x``, ``/public\\..\\x`` or a double-encoded
        ``%2e%2e`` as a way out of ``/public``, and the gateway cannot know the upstream's rules.
        """
        if self._public is None or ";" in path or "\\" in path or "%" in path:
            return False
        return self._public.match(normalize_path(path)) is not None

    def is_public_uri(self, original_uri: str | None) -> bool:
        """``is_public`` for a request URI as forward-auth receives it (``X-Original-URI``: raw,
        query included). The app behind the proxy receives that URI as it is, so one the edge
        would have to rewrite (dot or empty segments), refuse, or that is ``never_public`` (an
        encoded separator, escapes that are not UTF-8) is never public: the gateway cannot make
        the app route what it judged."""
        if not original_uri or not self.has_public_paths:
            return False
        raw = original_uri.split("?", 1)[0].encode("latin-1", "replace")
        try:
            target = normalize_target("", raw)
        except EdgeRejected:
            return False
        return not target.rewritten and not target.never_public and self.is_public(target.path)

    def tenant_allowed(self, tenant: str) -> bool:
        tenants = self.allowed_tenants
        return not tenants or tenant in tenants
