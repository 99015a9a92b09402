"""Access rules: which paths are public, which tenants may use the app."""

from __future__ import annotations

import posixpath
import re
from fnmatch import translate
from urllib.parse import unquote

from gateway.config import Access


def normalize_path(path: str) -> str:
    """The path an upstream would resolve: percent-decoded, ``//`` collapsed, dot segments removed."""
    decoded = unquote(path)
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
        self._tenants = frozenset(access.allow_tenants)

    def is_public(self, path: str) -> bool:
        """Matched after normalization, so ``/public/../private`` is not public."""
        return self._public is not None and self._public.match(normalize_path(path)) is not None

    def tenant_allowed(self, tenant: str) -> bool:
        return not self._tenants or tenant in self._tenants
