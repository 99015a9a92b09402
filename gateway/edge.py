"""The edge: one step that settles what a request *is*, before anything else reads it.

Every hole an auth gateway falls into sits between two readers of one request that read it
differently: the gateway and the app, the ASGI server and the upstream, nginx and the gateway. So
every mode (middleware, sidecar, forward-auth) passes each request through ``Edge`` first, and the
rest of the gateway only ever sees what the edge let through.

**Header names** are compared *folded*: lower case, with every ``-`` and ``_`` removed. CGI, WSGI,
PHP and Django turn ``X-Auth_User`` and ``X-Auth-User`` into the same ``HTTP_X_AUTH_USER``; other
stacks fold in other ways (a trailing ``_``, doubled separators). A name that folds onto one the
gateway controls is treated as that name, and only the standard spelling is ever passed on:

- identity headers (``identity.headers``): removed in every spelling, always;
- forwarding headers (``X-Forwarded-*``, ``Forwarded``, ``X-Real-IP``, ``X-Original-URI``, the
  client-IP headers CDNs use...): kept, in the standard spelling, only from a peer in
  ``access.trusted_proxies``; from anyone else removed (the gateway sets its own);
- ``Connection``: the headers it names are removed from the *client's* headers here, before the
  gateway adds its own; a token naming a header the gateway controls (identity, forwarding,
  framing, Host, Cookie) is an attack, not a hop-by-hop hint, and is ignored. What goes on lists
  only ``close``, ``keep-alive``, ``upgrade``, so no later hop can turn it against the gateway's
  headers (the CVE-2024-45410 class);
- body framing: at most one ``Content-Length`` value, never beside ``Transfer-Encoding``, which may
  only be ``chunked``. Anything else is refused (400, or 501 for a coding): the ASGI server has
  already framed the body one way, and an upstream reading the client's headers another way is
  request smuggling. The sidecar's proxy frames the body it forwards itself;
- ``Host``: exactly one, in the standard spelling.

**The path** (``normalize_target``): percent-escapes of unreserved characters decoded (RFC 3986:
the same URL), dot segments and empty segments resolved, and the request rewritten, ``path`` and
``raw_path`` both, so the app routes exactly the path the gateway judged, whether it routes on the
decoded path (Starlette, Django) or the raw one (Node). A path whose meaning depends on who decodes
it (``/admin/..%2fpublic``: a dot segment only once ``%2F`` is read as ``/``) is refused (400); one
with an encoded separator but no such ambiguity (``/projects/group%2Fname``) passes, but is never
public.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import string
from collections.abc import Iterable, Sequence
from typing import NamedTuple
from urllib.parse import quote, unquote

from gateway.errors import GatewayError

Headers = list[tuple[bytes, bytes]]

_LOWER = bytes.maketrans(string.ascii_uppercase.encode(), string.ascii_lowercase.encode())


def fold(name: bytes) -> bytes:
    """A header name as every upstream convention agrees on it: lower case, no ``-`` or ``_``."""
    return name.translate(_LOWER, b"-_")


class EdgeRejected(GatewayError):
    """A request the gateway refuses to judge, because its parts can be read more than one way."""

    status_code = 400
    code = "bad_request"


# What the gateway controls, by folded name (``Edge._special``).
_IDENTITY, _FORWARDING, _CONNECTION, _CONTENT_LENGTH, _TRANSFER_ENCODING, _HOST, _COOKIE, _DROP = range(8)
_UNSEEN = -1
_MAX_KNOWN_NAMES = 4096
#: Headers that tell an app who the client is or what it asked for, set by proxies: believed
#: only from a trusted one. Any name that folds to ``xforwarded...`` counts too.
FORWARDING_HEADERS = (
    "Forwarded", "X-Real-IP", "X-Original-URI", "X-Original-URL", "X-Rewrite-URL", "X-Client-IP",
    "Client-IP", "True-Client-IP", "X-Cluster-Client-IP", "CF-Connecting-IP", "Fastly-Client-IP",
    # The request id (gateway/logs.py): a client's own would let it write into our logs and the
    # app's under another request's name; only a trusted proxy's is kept.
    "X-Request-Id",
)
_FOLDED_FORWARDING_PREFIX = b"xforwarded"
# The one spelling of each that servers read.
_EXACT = {_CONNECTION: b"connection", _CONTENT_LENGTH: b"content-length", _TRANSFER_ENCODING: b"transfer-encoding",
          _HOST: b"host", _COOKIE: b"cookie"}
# The only Connection tokens passed on: none of them names a header.
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})
_COOKIE_SPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0"


def first_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def take_cookies(value: bytes, names: frozenset[bytes], found: dict[bytes, bytes]) -> bytes:
    """One Cookie header: the gateway's cookies go to ``found`` (the first of each name wins),
    the rest is returned joined (empty when nothing is left)."""
    kept = []
    for part in value.split(b";"):
        part = part.strip(_COOKIE_SPACE)
        if not part:
            continue
        name = part.partition(b"=")[0]
        if name in names:
            found.setdefault(name, part[len(name) + 1:])
        else:
            kept.append(part)
    return b"; ".join(kept)


class TrustedProxies:
    """``access.trusted_proxies``: whether a peer address is one of them (answers cached)."""

    def __init__(self, cidrs: Sequence[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)
        self._lookup = functools.lru_cache(maxsize=4096)(self._parse_and_match)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, peer: object) -> bool:
        return bool(self._networks) and isinstance(peer, str) and self._lookup(peer)

    def _parse_and_match(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)


class Edge:
    """The inbound rules for one gateway: build once, call ``headers`` on every request."""

    def __init__(self, *, identity_headers: Iterable[str], trusted_proxies: Sequence[str] = (),
                 gateway_cookies: Iterable[str] = (), session_cookie: str = "gw_session",
                 forwarding_headers: Iterable[str] = ()) -> None:
        forwarding = (*FORWARDING_HEADERS, *forwarding_headers)
        special: dict[bytes, int] = {fold(name.encode("latin-1")): _FORWARDING for name in forwarding}
        special.update({fold(name.encode("latin-1")): _IDENTITY for name in identity_headers})
        special.update({fold(name): kind for kind, name in _EXACT.items()})
        self._special = special
        self._forwarding = frozenset(name.lower().encode("latin-1") for name in forwarding)
        # What each header name (as the server spelled it) is to the gateway: learnt on first
        # sight, so a request costs one dict lookup per header. Bounded: names past the bound are
        # classified each time (only a client inventing names gets there).
        self._kinds: dict[bytes, int | None] = {}
        self.trusted = TrustedProxies(trusted_proxies)
        self._warned_forwarding = False  # the untrusted X-Forwarded-For warning: once per process
        self._cookie_names = frozenset(name.encode("latin-1") for name in gateway_cookies) | {
            session_cookie.encode("latin-1")}
        self._session_cookie = session_cookie.encode("latin-1")
        self._ticket_prefix = self._session_cookie + b"="
        # A Cookie header holding none of these substrings holds no gateway cookie: it is kept whole.
        self._cookie_markers = tuple(name for name in self._cookie_names
                                     if not any(other != name and other in name for other in self._cookie_names))

    def _warn_forwarding(self, key: bytes, peer: str | None) -> None:
        """X-Forwarded-For arriving while no proxy is trusted: most likely a proxy in front that
        is not listed, so every client seems to be that proxy (one rate-limit bucket for all, its
        address in the logs). Said once, with the peer's address; the header is dropped anyway."""
        if fold(key) != b"xforwardedfor":
            return
        self._warned_forwarding = True
        logging.getLogger("gateway.edge").warning(
            "a request from %s carried X-Forwarded-For while access.trusted_proxies is empty: the header is "
            "ignored and that peer's address is taken as the client's; if %s is your reverse proxy, list it in "
            "access.trusted_proxies (said once)", peer, peer)

    def controls(self, name: bytes) -> bool:
        """Whether a header name, in any spelling, is one the gateway decides about."""
        folded = fold(name)
        return folded in self._special or folded.startswith(_FOLDED_FORWARDING_PREFIX)

    def _classify(self, key: bytes) -> int | None:
        """None: an ordinary header, passed on. Otherwise what the gateway does with it."""
        folded = fold(key)
        kind = self._special.get(folded)
        if kind is None and folded.startswith(_FOLDED_FORWARDING_PREFIX):
            kind = _FORWARDING
        if kind is None:
            return None
        if kind == _IDENTITY or not _standard(key):
            return _DROP  # an identity claim, or a name spelled to be folded onto one we control
        if kind == _FORWARDING:
            return _FORWARDING if key in self._forwarding or key.startswith(b"x-forwarded-") else _DROP
        return kind if key == _EXACT[kind] else _DROP  # ``con-nection``: no server reads it as framing

    def headers(self, raw: Iterable[tuple[bytes, bytes]], peer: str | None, *,
                strip_cookies: bool = True) -> tuple[bytes | None, Headers]:
        """The client's headers as the gateway passes them on, and the session ticket (if any).

        ``peer`` is the client's address (``scope["client"][0]``); ``strip_cookies`` removes the
        gateway's cookies from Cookie (requests for the app) or keeps them (the gateway's own
        endpoints read them). Raises ``EdgeRejected`` for framing or Host that is not one thing.
        """
        kinds = self._kinds
        ticket: bytes | None = None
        result: Headers = []
        connection: list[bytes] | None = None
        lengths: list[bytes] | None = None
        codings: list[bytes] | None = None
        hosts = 0
        for item in raw:
            key = item[0]
            kind = kinds.get(key, _UNSEEN)
            if kind is _UNSEEN:
                kind = self._classify(key)
                if len(kinds) < _MAX_KNOWN_NAMES:
                    kinds[key] = kind
            if kind is None:
                result.append(item)
            elif kind == _COOKIE:
                ticket = self._cookie(item, result, ticket, strip_cookies)
            elif kind == _HOST:
                hosts += 1
                result.append(item)
            elif kind == _DROP:
                continue
            elif kind == _FORWARDING:
                if peer in self.trusted:
                    result.append(item)
                elif not self._warned_forwarding and not self.trusted:
                    self._warn_forwarding(key, peer)
            elif kind == _CONNECTION:
                connection = (connection or []) + [token.strip().lower() for token in item[1].split(b",")]
            elif kind == _CONTENT_LENGTH:
                lengths = (lengths or []) + [value.strip() for value in item[1].split(b",")]
                result.append(item)
            elif kind == _TRANSFER_ENCODING:
                codings = (codings or []) + [value.strip().lower() for value in item[1].split(b",")]
                result.append(item)
        if hosts > 1:
            raise EdgeRejected("The request has more than one Host header.", code="bad_host")
        if lengths is not None or codings is not None:
            _check_framing(lengths, codings)
        if connection is not None:
            result = self._apply_connection(connection, result)
        return ticket, result

    def _cookie(self, item: tuple[bytes, bytes], result: Headers, ticket: bytes | None,
                strip: bool) -> bytes | None:
        value = item[1]
        # (``59 in value`` and ``value.find``: a bytes needle with ``in`` costs ~8x more.)
        if value.startswith(self._ticket_prefix) and 59 not in value:  # 59: b";"
            # The usual case: the session cookie alone in the header.
            if strip:
                return ticket if ticket is not None else value[len(self._ticket_prefix):].strip(_COOKIE_SPACE)
            result.append(item)
            return ticket if ticket is not None else value[len(self._ticket_prefix):].strip(_COOKIE_SPACE)
        for marker in self._cookie_markers:
            if value.find(marker) >= 0:
                break
        else:
            result.append(item)  # none of ours: kept whole
            return ticket
        found: dict[bytes, bytes] = {}
        kept = take_cookies(value, self._cookie_names, found)
        if not strip:
            result.append(item)
        elif kept:
            result.append((b"cookie", kept))
        return ticket if ticket is not None else found.get(self._session_cookie)

    def _apply_connection(self, tokens: list[bytes], headers: Headers) -> Headers:
        """Remove what the client's Connection header names, then pass on its harmless options."""
        named = set()
        for token in tokens:
            if token and token not in _CONNECTION_OPTIONS and not self.controls(token):
                named.add(fold(token))
        if named:
            headers = [item for item in headers if fold(item[0]) not in named]
        options = [token for token in dict.fromkeys(tokens) if token in _CONNECTION_OPTIONS]
        if options:
            headers.append((b"connection", b", ".join(options)))
        return headers


def _standard(name: bytes) -> bool:
    """A header name in its standard spelling: lower case (as ASGI servers give it), single ``-``
    between words only."""
    return 95 not in name and name.lower() == name and name[-1:] != b"-" and b"--" not in name  # 95: b"_"


def _check_framing(lengths: list[bytes] | None, codings: list[bytes] | None) -> None:
    if codings is not None:
        if lengths is not None:
            raise EdgeRejected("The request has both Content-Length and Transfer-Encoding.", code="bad_framing")
        if codings != [b"chunked"]:
            raise EdgeRejected("Only Transfer-Encoding: chunked is supported for request bodies.",
                               code="unsupported_transfer_encoding", status_code=501)
        return
    assert lengths is not None
    if not all(value.isdigit() and len(value) <= 18 for value in lengths) or len(set(map(int, lengths))) != 1:
        raise EdgeRejected("The request's Content-Length is not one valid number.", code="bad_framing")


# -- the path ----------------------------------------------------------------------------------

_UNRESERVED = frozenset((string.ascii_letters + string.digits + "-._~").encode())
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_ENCODED_SEPARATORS = (b"%2F", b"%5C")


class Target(NamedTuple):
    """A request path as the gateway judged it and as the app will receive it."""

    path: str  # decoded once, as ASGI's ``scope["path"]``
    raw_path: bytes
    #: An encoded ``/`` or ``\\`` is in the path: the app may split it where the gateway did not.
    encoded_separator: bool
    #: Dot or empty segments were resolved: what the client sent was not what is judged.
    rewritten: bool
    #: The escapes are not UTF-8 (``%c0%ae``, an overlong ``.``): servers disagree on what they
    #: mean (some decoders read a dot), while ``path`` holds U+FFFD for each.
    undecodable: bool = False

    @property
    def never_public(self) -> bool:
        """The app may route this path differently from the gateway: it is never public."""
        return self.encoded_separator or self.undecodable


def normalize_path(path: str) -> str:
    """A decoded path as an upstream would resolve it: ``//`` collapsed, dot segments removed.

    ``path`` is already percent-decoded once, as ASGI's ``scope["path"]`` is; it is not decoded
    again (the upstream will not decode it twice either).
    """
    if path[:1] == "/" and "//" not in path and "/." not in path:
        return path  # nothing to collapse or resolve (the hot path)
    return _resolve(path.split("/")[1:] if path[:1] == "/" else path.split("/"))


def _resolve(segments: list[str]) -> str:
    """Dot segments removed (RFC 3986 5.2.4, never above the root) and empty ones collapsed."""
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment not in (".", ""):
            out.append(segment)
    trailing = bool(out) and segments[-1] in ("", ".", "..")
    return "/" + "/".join(out) + ("/" if trailing else "")


def _unescape_unreserved(match: re.Match[bytes]) -> bytes:
    byte = int(match[1], 16)
    if byte < 0x20 or byte == 0x7F:
        raise EdgeRejected("The request path holds a control character.", code="bad_path")
    return bytes((byte,)) if byte in _UNRESERVED else b"%" + match[1].upper()


def normalize_target(path: str, raw_path: bytes | None) -> Target:
    """The path the app must receive, for a request whose path needs a second look.

    Works on the raw path (what the client sent), because that is what the upstream of a proxy
    routes on; ``path`` (decoded) only stands in when the server gave no ``raw_path``.
    """
    raw = raw_path if raw_path else quote(path, safe="/!$&'()*+,;=:@~").encode("ascii")
    if raw[:1] != b"/":
        raise EdgeRejected("The request path must start with '/'.", code="bad_path")
    if any(byte < 0x20 or byte == 0x7F for byte in raw):
        raise EdgeRejected("The request path holds a control character.", code="bad_path")
    if raw.count(b"%") != len(_ESCAPE.findall(raw)):
        raise EdgeRejected("The request path has a malformed percent-escape.", code="bad_path")
    raw = _ESCAPE.sub(_unescape_unreserved, raw)
    text = raw.decode("latin-1")
    segments = text.split("/")[1:]
    resolved = _resolve(segments)
    rewritten = resolved != text
    encoded_separator = any(separator in raw for separator in _ENCODED_SEPARATORS)
    try:
        decoded, undecodable = unquote(resolved, errors="strict"), False
    except UnicodeDecodeError:
        decoded, undecodable = unquote(resolved), True
    slashed = decoded.replace("\\", "/")
    if encoded_separator and normalize_path(slashed) != slashed:
        # Read with %2F (or \\) as a separator the path has dot or empty segments; read without, none.
        raise EdgeRejected("The request path means different things to different servers.", code="bad_path")
    return Target(decoded, resolved.encode("latin-1"), encoded_separator, rewritten, undecodable)
