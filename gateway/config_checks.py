"""Settings that are valid but insecure: what ``gateway check-config`` warns about (exit 0).

A warning is ``(yaml path, sentence)``: the sentence says what can go wrong and the fix, never the
secret itself. The file is still accepted: each of these has a legitimate use (plain-HTTP
development, a test fixture), so refusing it would only push operators to work around the check.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, SecretStr

from gateway.config import GatewayConfig, estimated_bits

# Below this a secret is accepted but warned about: a random token_urlsafe(32) scores over 180 and
# 32 random hex digits 92 at the least in 2,000 draws (gateway.config.MIN_SECRET_BITS refuses < 80).
WEAK_SECRET_BITS = 88
# The character-frequency estimate cannot see a phrase repeated ("Tr0ub4dor&3-" three times scores
# 130 bits): a secret whose 3-character substrings are mostly repeats looks weak too. Random
# secrets of 32+ characters have nearly all of theirs distinct (over 0.9).
MIN_DISTINCT_TRIGRAMS = 0.75
PLACEHOLDER_WORDS = ("changeme", "change-me", "change_me", "password", "example", "secret", "default", "dummy")

Warning_ = tuple[str, str]


def config_warnings(config: GatewayConfig) -> list[Warning_]:
    """Every warning for ``config``, in the order of the file's sections."""
    warnings: list[Warning_] = []
    public = urlsplit(config.public_url)
    if public.scheme == "https" and not config.session.secure:
        warnings.append(("session.secure", "false while public_url is https: browsers then also send the session "
                                           "cookie over plain HTTP, where anyone on the network can copy it; set "
                                           "secure: true"))
    if public.path not in ("", "/"):
        warnings.append(("public_url", f"has a path ({public.path}): the redirect URIs and the identity JWT's iss "
                                       "include it, but the gateway serves its endpoints at the root of the origin, "
                                       "so sign-ins work only if a proxy strips the path; give the origin alone "
                                       f"({public.scheme}://{public.netloc})"))
    seen: dict[str, str] = {}
    for where, value in _secrets(config):
        if not value:
            continue
        if value in seen:
            warnings.append((where, f"the same value as {seen[value]}: a secret reused for two purposes leaks "
                                    "both when one leaks; generate one per use"))
            continue
        seen[value] = where
        if where.startswith(("session.secrets", "metrics.bearer_token")):
            warnings.extend((where, problem) for problem in _weakness(value))
    return warnings


def _weakness(value: str) -> Iterator[str]:
    lowered = value.lower()
    if any(word in lowered for word in PLACEHOLDER_WORDS):
        yield "looks like a placeholder (it contains a word such as 'secret' or 'example'); generate one: " \
              "python3 -c 'import secrets;print(secrets.token_urlsafe(32))'"
    elif estimated_bits(value) < WEAK_SECRET_BITS or _distinct_trigrams(value) < MIN_DISTINCT_TRIGRAMS:
        yield "looks weak (few distinct characters, or a part repeated); generate one: " \
              "python3 -c 'import secrets;print(secrets.token_urlsafe(32))'"


def _distinct_trigrams(value: str) -> float:
    """Distinct 3-character substrings of the secret per substring (1.0: no substring repeats)."""
    trigrams = [value[index:index + 3] for index in range(len(value) - 2)]
    return len(set(trigrams)) / len(trigrams) if trigrams else 0.0


def _secrets(config: GatewayConfig) -> Iterator[tuple[str, str]]:
    """``(yaml path, value)`` of every secret in the configuration (``SecretStr`` fields, the
    passwords in Redis URLs), sections first, then each provider's."""
    yield from _walk(config, "")
    for name, settings in config.provider_settings().items():
        yield from _walk(settings, f"providers.{name}")


def _walk(value: Any, where: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        if where.startswith("store.url"):  # a Redis URL: only its password is a secret
            password = urlsplit(secret).password
            if password:
                yield where, password
        else:
            yield where, secret
    elif isinstance(value, BaseModel):
        for key in type(value).model_fields:
            if key != "providers":
                yield from _walk(getattr(value, key), f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}[{index}]")
