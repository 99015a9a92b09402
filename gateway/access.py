"""Access rules: which paths are public, which tenants may use the app."""

from __future__ import annotations

import posixpath
import re
from fnmatch import translate
from urllib.parse import unquote

from gateway.config import Access


def normalize_path(path: str) -> str:
    """The path an upstream would resolve: ``//`` collapsed, dot segments removed.

    ``path`` is already percent-decoded once, as ASGI's ``scope["path"]`` is; it is not decoded
    again (the upstream will not decode it twice either).
    """
    if path[:1] == "/" and "//" not in path and "/." not in path:
        return path  # nothing to collapse or resolve: already what normpath would give (the hot path)
    decoded = path
    normalized = posixpath.normpath("/" + decoded.lstrip("/"))
    if normalized.startswith("//"):  # normpath keeps a leading "//" (POSIX allows it)
        normalized = "/" + normalized.lstrip("/")
    if decoded.endswith("/") and normalized != "/":
        normalized += "/"
    return normalized


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

    def is_public_uri(self, original_uri: str) -> bool:
        """``is_public`` for a request URI as forward-auth receives it (``X-Original-URI``: raw,
        query included), decoded once as a server decodes ``scope["path"]``."""
        return self.is_public(unquote(original_uri.split("?", 1)[0]))

    def tenant_allowed(self, tenant: str) -> bool:
        tenants = self.allowed_tenants
        return not tenants or tenant in tenants
