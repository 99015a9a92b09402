"""Request bodies the gateway reads itself: bounded in bytes, and JSON bounded in depth.

Every body the gateway's own endpoints read (``/exchange``, a plugin's callback such as DingTalk's
event push) comes from anyone on the internet. ``read_body`` stops at ``limit`` bytes while the
body streams in (413 ``body_too_large``; the announced ``Content-Length`` is refused before
anything is read), and ``parse_json`` refuses nesting deeper than ``max_depth`` before the parser
sees it (400 ``invalid_json``): a deeply nested document would otherwise end in a
``RecursionError``, a 500 with a traceback.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import ClientDisconnect, Request

from gateway.errors import GatewayError

#: What the gateway's own endpoints accept by default: their bodies are a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32

# A JSON string (skipped whole, so brackets inside it do not count) or a bracket.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class BodyTooLarge(GatewayError):
    status_code = 413
    code = "body_too_large"


class InvalidJson(GatewayError):
    status_code = 400
    code = "invalid_json"


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, at most ``limit`` bytes; more is a ``BodyTooLarge`` (nothing buffered
    beyond the limit)."""
    too_large = BodyTooLarge(f"The request body is larger than {limit} bytes.")
    announced = request.headers.get("content-length")
    if announced is not None and announced.strip().isdigit() and int(announced) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise GatewayError("The request body did not arrive.", code="body_incomplete") from None
    return b"".join(chunks)


def json_depth_exceeds(data: bytes, max_depth: int) -> bool:
    """Whether ``data`` nests arrays/objects deeper than ``max_depth`` (scanned, not parsed)."""
    depth = 0
    for match in _TOKENS.finditer(data):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def parse_json(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``data`` parsed as JSON, or ``InvalidJson`` (malformed, not UTF-8, or nested too deep)."""
    if json_depth_exceeds(data, max_depth):
        raise InvalidJson(f"The JSON body is nested deeper than {max_depth} levels.")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: belt and braces, the scan prevents it
        raise InvalidJson("The request body is not valid JSON.") from None


async def read_json(request: Request, *, limit: int = MAX_BODY_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``read_body`` then ``parse_json``: the one way a gateway endpoint reads a JSON body."""
    return parse_json(await read_body(request, limit), max_depth)
