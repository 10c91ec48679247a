"""URLs as they may be shown: without the secrets they carry.

A webhook URL or a PostgreSQL URI may hold a password (`user:password@host`) or a token in
its query (`?token=...`, `?sig=...`). Whatever shows a URL (check-config, logs, `status`,
the status page, events) shows it through `url` (one URL) or `text` (every URL inside a
text, such as an error message); `deep` does the same to every string of a JSON-like value.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

HIDDEN = "***"
# A query or fragment key holding one of these (case-insensitive) has its value hidden:
# token, access_token, api_key, apikey, key, secret, client_secret, password, passwd,
# sslpassword, pwd, sig, signature, X-Amz-Signature, X-Amz-Credential, auth, session...
SECRET_KEY_PARTS = ("token", "key", "secret", "pass", "pwd", "sig", "auth", "cred", "session",
                    "code")
# A URL inside free text: a scheme, "://", then everything up to a space, quote or bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>`]+")


def secret_key(key: str) -> bool:
    name = urllib.parse.unquote_plus(key).lower()
    return any(part in name for part in SECRET_KEY_PARTS)


def _pairs(query: str) -> str:
    """`a=1&token=x` -> `a=1&token=***`, separators and order kept."""
    out = []
    for piece in re.split(r"([&;])", query):
        if piece in ("&", ";"):
            out.append(piece)
            continue
        key, sep, value = piece.partition("=")
        out.append(f"{key}={HIDDEN}" if sep and value and secret_key(key) else piece)
    return "".join(out)


def _userinfo(netloc: str) -> str:
    """`user:password@host` -> `user:***@host`."""
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return netloc
    user, colon, password = userinfo.partition(":")
    return f"{user}:{HIDDEN}@{host}" if colon and password else netloc


def url(value: str) -> str:
    """One URL with its password and secret-looking query or fragment values hidden."""
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:  # e.g. an unbalanced [ in the host: hide what may be a password
        return re.sub(r"(//[^@]*?:)[^@]*@", rf"\1{HIDDEN}@", value)
    if not parts.scheme or not (parts.netloc or parts.query or parts.fragment):
        return value
    shown = f"{parts.scheme}://{_userinfo(parts.netloc)}{parts.path}"
    if parts.query or value.endswith("?"):
        shown += "?" + _pairs(parts.query)
    if parts.fragment:
        shown += "#" + _pairs(parts.fragment)
    return shown


def text(value: str) -> str:
    """Every URL inside a text redacted (cheap when there is none)."""
    if "://" not in value:
        return value
    return _URL_IN_TEXT.sub(_one_in_text, value)


def _one_in_text(match: re.Match[str]) -> str:
    """A URL found in text, less the punctuation that ends its sentence: `(see URL).`"""
    found = match.group(0)
    body = found.rstrip(").,;:!?]}")
    return url(body) + found[len(body):]


def deep(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings, numbers) with `text`
    applied to every string, keys included; walked with a stack, not recursion (the work
    is bounded by the value's own size)."""
    root: list[Any] = [value]
    stack: list[tuple[Any, Any, Any]] = [(root, 0, value)]  # (parent, key, item)
    while stack:
        parent, key, item = stack.pop()
        if isinstance(item, str):
            parent[key] = text(item)
        elif isinstance(item, dict):
            copy: dict[Any, Any] = {}
            parent[key] = copy
            for k, v in item.items():
                shown_key = text(k) if isinstance(k, str) else k
                copy[shown_key] = v
                stack.append((copy, shown_key, v))
        elif isinstance(item, list | tuple):
            items = list(item)
            parent[key] = items
            stack.extend((items, i, v) for i, v in enumerate(items))
    return root[0]
