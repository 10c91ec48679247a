"""Which product rule a path belongs to, and the names that follow from the rule.

A path below the staging root is a product of a rule (the file or folder its glob
matches), one of its sidecars, a file inside a folder product, or nothing; the product's
stem, its sidecars' names and its data_id follow from the rule alone. Detection, rebuild,
the audit, reconciliation and publishing all ask the same questions, so the answers live
here, apart from what any of them does with a path.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from contimg_publisher import paths
from contimg_publisher.config import Config, ProductRule
from contimg_publisher.registry import Product
from contimg_publisher.states import Kind

# Every walked path and every event is matched against every rule, so the globs, the ignore
# patterns and the sidecar patterns are parsed and compiled once per rule and per Config.

_Matcher = Callable[[str], "re.Match[str] | None"]


def _compile_glob(pattern: str) -> _Matcher:
    """fnmatch.fnmatchcase(name, pattern) as a compiled matcher (the same translation)."""
    return re.compile(fnmatch.translate(pattern)).match


def _match_compiled(pattern: tuple[_Matcher | None, ...], parts: tuple[str, ...]) -> bool:
    """Glob match on path components, each compiled (None stands for '**', which spans zero
    or more folders)."""
    if not pattern:
        return not parts
    head = pattern[0]
    if head is None:
        return any(_match_compiled(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and head(parts[0]) is not None and _match_compiled(pattern[1:],
                                                                           parts[1:])


class _Rule:
    """One product rule, parsed once."""

    __slots__ = ("rule", "pattern", "directory", "_compiled", "_head", "_tail", "_suffix",
                 "sidecars")

    def __init__(self, rule: ProductRule) -> None:
        self.rule = rule
        self.pattern = tuple(p for p in rule.glob.split("/") if p)
        self.directory = rule.kind == Kind.DIRECTORY
        self._compiled = tuple(None if p == "**" else _compile_glob(p) for p in self.pattern)
        stars = [i for i, p in enumerate(self._compiled) if p is None]
        # With at most one '**' (the usual 'folder/**/*.fits'), the components before it
        # match the path's first ones and those after it its last ones.
        self._head: tuple[_Matcher, ...] | None = None
        self._tail: tuple[_Matcher, ...] = ()
        if len(stars) <= 1:
            cut = stars[0] if stars else len(self._compiled)
            self._head = tuple(m for m in self._compiled[:cut] if m is not None)
            self._tail = tuple(m for m in self._compiled[cut + 1:] if m is not None)
        last = self.pattern[-1] if self.pattern else ""
        # The literal suffix of a last component like '*.fits'; "" when it has no such form.
        self._suffix = last[1:] if last.startswith("*") and not any(
            ch in last[1:] for ch in "*?[") else ""
        self.sidecars: list[tuple[str, str]] = []
        for pattern in rule.sidecars:
            for key in ("stem", "name"):
                token = "{" + key + "}"
                if pattern.startswith(token):
                    self.sidecars.append((key, pattern[len(token):]))
        # Longest suffix first: 'a.thumb.png' is the thumbnail of 'a.fits' ('{stem}.thumb.png'),
        # not the preview of a product 'a.thumb.fits' ('{stem}.png').
        self.sidecars.sort(key=lambda ks: len(ks[1]), reverse=True)

    def matches(self, names: tuple[str, ...]) -> bool:
        """Whether the decoded components `names` match the glob."""
        head, tail = self._head, self._tail
        if head is None:
            return _match_compiled(self._compiled, names)
        count = len(names)
        if len(head) == len(self._compiled):       # no '**': one component each
            if count != len(head):
                return False
        elif count < len(head) + len(tail):
            return False
        for matcher, name in zip(head, names, strict=False):
            if matcher(name) is None:
                return False
        return all(matcher(name) is not None
                   for matcher, name in zip(tail, names[count - len(tail):], strict=True))

    def is_sidecar(self, name: str) -> bool:
        """A weight map or preview that travels with its product is never a product itself."""
        for _key, suffix in self.sidecars:
            if suffix and name.endswith(suffix) and len(name) > len(suffix):
                return True
        return False

    def stem(self, name: str) -> str:
        """stem_of() for this rule."""
        suffix = self._suffix
        if suffix and name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
        root, _ext = os.path.splitext(name)
        return root if root else name


@functools.lru_cache(maxsize=256)
def _rule(rule: ProductRule) -> _Rule:
    """The parsed form of a rule (rules are frozen, so equal rules parse alike)."""
    return _Rule(rule)


class RuleSet:
    """A Config's ignore patterns and rules, parsed once."""

    def __init__(self, config: Config) -> None:
        self.config = config
        patterns = tuple(config.ignore)
        # One alternation of the translated patterns: each alternative is anchored at both
        # ends, so it matches exactly when one of the patterns does.
        self.ignore: _Matcher | None = re.compile(
            "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match \
            if patterns else None
        self.rules = tuple(_rule(r) for r in config.products)

    def ignored(self, names: Iterable[str]) -> bool:
        """Whether any of the names matches one of config.ignore."""
        ignore = self.ignore
        return ignore is not None and any(ignore(n) is not None for n in names)

    def match(self, parts: tuple[bytes, ...]) -> Match | None:
        """match() with the config already parsed."""
        names = tuple([os.fsdecode(p) for p in parts])
        if self.ignored(names):
            return None
        for rule in self.rules:
            if rule.directory:
                for end in range(1, len(names) + 1):
                    if rule.matches(names[:end]):
                        return Match(rule.rule, parts[:end])
                continue
            if rule.matches(names):
                if rule.is_sidecar(names[-1]):
                    return _owner(rule, parts, names[-1])
                return Match(rule.rule, parts)
            owner = _owner(rule, parts, names[-1])
            if owner is not None:
                return owner
        return None


_LAST_RULE_SET: list[RuleSet] = []


def rule_set(config: Config) -> RuleSet:
    """The parsed form of `config` for match(); the last one is kept (the Detector keeps
    its own)."""
    if _LAST_RULE_SET and _LAST_RULE_SET[0].config is config:
        return _LAST_RULE_SET[0]
    parsed = RuleSet(config)
    _LAST_RULE_SET[:] = [parsed]
    return parsed


def stem_of(name: str, rule: ProductRule) -> str:
    """The name without its product suffix: 'nightly_20261128.fits' -> 'nightly_20261128'."""
    return _rule(rule).stem(name)


def sidecar_names(name: str, rule: ProductRule) -> list[str]:
    stem = stem_of(name, rule)
    return [pattern.format(stem=stem, name=name) for pattern in rule.sidecars]


@dataclass(frozen=True)
class Match:
    rule: ProductRule
    parts: tuple[bytes, ...]    # the product's components under stage_root


def match(config: Config, parts: tuple[bytes, ...]) -> Match | None:
    """The product a staged path belongs to: itself (file rules), the folder product that
    contains it (directory rules), or the product whose sidecar it is."""
    return rule_set(config).match(parts)


def _owner(rule: _Rule, parts: tuple[bytes, ...], name: str) -> Match | None:
    """The product whose sidecar the path `parts` (last name `name`) is, if any."""
    for key, suffix in rule.sidecars:
        if not suffix or not name.endswith(suffix) or len(name) <= len(suffix):
            continue
        head = name[: -len(suffix)]
        last = rule.pattern[-1]
        guesses = [head] if key == "name" else [head + last[1:]] if last.startswith("*") else []
        for guess in guesses:
            owner_parts = parts[:-1] + (os.fsencode(guess),)
            owner_names = tuple(os.fsdecode(p) for p in owner_parts)
            if rule.matches(owner_names) and not rule.is_sidecar(guess):
                return Match(rule.rule, owner_parts)
    return None


def owner_rule(config: Config, data_type: str, stage_path: bytes | str) -> ProductRule | None:
    """The rule that owns a registry row, if any: its staged path is a product of that rule
    under stage_root (the product itself, not a sidecar or a file inside one) and its type
    is that rule's. The registry is shared with the pipeline's own code, whose other rows
    (`ms`, `calibrated_ms`, `image`, ...) the daemon never writes."""
    root = os.fsencode(str(config.stage_root))
    raw = stage_path if isinstance(stage_path, bytes) else paths.undisplay(stage_path)
    try:
        parts = paths.relative_components(root, raw)
    except paths.UnsafePath:
        return None
    if not parts:
        return None
    found = match(config, parts)
    if found is None or found.parts != parts or found.rule.type != data_type:
        return None
    return found.rule


def owns(config: Config, row: Product) -> bool:
    """Whether the daemon may write this row (see owner_rule)."""
    return owner_rule(config, row.data_type, row.stage_bytes) is not None


def name_problem(parts: tuple[bytes, ...], max_bytes: int) -> str | None:
    """Why detection rejects a product at these components below its root (a newline, an
    escape or another control character, bytes that are not UTF-8, a name too long, a
    temporary's prefix), or None. Rebuild and the audit apply it to the archive too."""
    for part in parts:
        problem = paths.name_problem(part, max_bytes)
        if problem:
            return f"name {paths.display(part)!s}: {problem}"
    return None


def data_id_for(rule: ProductRule, parts: tuple[bytes, ...]) -> str:
    """The product's id: its sub-path below the rule's fixed prefix, without its suffix."""
    base = len(rule.base.parts)
    sub = parts[base:] if len(parts) > base else parts[-1:]
    names = [paths.display(p) for p in sub]
    names[-1] = stem_of(names[-1], rule)
    return "/".join(names)
