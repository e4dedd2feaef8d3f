"""URLs as they may be shown: no password or token in a message, a logged param or a model card."""

from __future__ import annotations

import re
from typing import Mapping

HIDDEN = "***"
# scheme://userinfo@ as URL parsers read it: the authority ends at the first / ? or #.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def redact_url(url: str) -> str:
    """`url` with its `user:password@` and every query value replaced by ***; a bare query item (a
    token on its own) is hidden whole."""
    url = _USERINFO.sub(rf"\1{HIDDEN}@", url)
    head, question, rest = url.partition("?")
    if not question:
        return url
    query, hash_, fragment = rest.partition("#")
    items = [_hide_value(item) for item in query.split("&")]
    return f"{head}?{'&'.join(items)}{hash_}{fragment}"


def _hide_value(item: str) -> str:
    key, equals, _ = item.partition("=")
    return f"{key}={HIDDEN}" if equals else (HIDDEN if item else item)


def without_credentials(url: str) -> str:
    """`url` without its `user:password@`, for a link or a request that must not carry them."""
    return _USERINFO.sub(r"\1", url)


def redact_params(params: Mapping[str, object]) -> dict[str, object]:
    """`params` with every value that is a URL redacted (a --mirror with a token, say)."""
    return {key: redact_url(value) if _is_url(value) else value for key, value in params.items()}


def _is_url(value: object) -> bool:
    return isinstance(value, str) and bool(_URL.match(value))
