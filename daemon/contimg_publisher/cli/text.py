"""How the commands lay text out: tables, one-line excerpts, times."""

from __future__ import annotations

from contimg_publisher import redact
from contimg_publisher.statuspage import format_age as age
from contimg_publisher.statuspage import format_rate as rate
from contimg_publisher.statuspage import format_when as when

__all__ = ["age", "one_line", "plural", "rate", "table", "when"]


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def one_line(text: str | None, limit: int = 80) -> str:
    """A message on one line, secrets replaced, cut at `limit` characters."""
    if not text:
        return "-"
    text = redact.text(text).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plural(count: int) -> str:
    """The 's' of an English plural."""
    return "s" if count != 1 else ""
