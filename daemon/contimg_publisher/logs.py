"""structlog set-up: journald with fields under systemd, readable lines elsewhere."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import structlog

from contimg_publisher import redact
from contimg_publisher.registry import truncate

MESSAGE_IDS = {
    "published": "8f1c5a2e6b0d4e3f9a7c1b2d3e4f5a60",
    "publish_failed": "2b7d9e1f3a5c4b6d8e0f1a2b3c4d5e61",
    "max_attempts_reached": "c4e6a8b0d2f14e3a9b5c7d9e1f3a5b62",
    "rejected": "5d7f9b1d3f5a4c6e8a0b2c4d6e8f0a63",
    "reload_ok": "e1a3c5e7a9b04d2f8c6e4a2b0d8f6c64",
    "reload_failed": "7a9c1e3a5c7e4a0c8e2a4c6e8a0c2e65",
    "registry_gone": "3e5a7c9e1b3d4f6a8c0e2b4d6f8a0c66",
    "registry_unavailable": "9c2e4a6c8e0a4b2d9f1e3a5c7e9b1d67",
    "registry_still_unavailable": "4a6c8e0a2c4e4f6a8b0d2f4a6c8e0b68",
    "registry_available": "d0b2d4f6a8c04e2a9c4e6a8c0e2a4c69",
    "event_delivery_failed": "1108bcda48964455b78dc737a51e7750",
    "event_dead_lettered": "14be95682ac84e54a3ea4b92c014de64",
    "audit_finding": "8763e1849da747239e2b4229cb1cd98e",
    "audit_finding_resolved": "4baeb10b6e454292977f2a8bcf2336c4",
    "quarantined": "36219607c59e46bb84bfe48ccc942f6e",
}
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_error_max_chars = 500


def _under_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def _truncate_error(_logger: Any, _level: str, event: dict[str, Any]) -> dict[str, Any]:
    """Error texts can be long (a whole traceback from a library); every format gets the
    same bounded text the registry keeps."""
    error = event.get("error")
    if error is not None:
        event["error"] = truncate(error if isinstance(error, str) else str(error),
                                  _error_max_chars)
    return event


def _redact(_logger: Any, _level: str, event: dict[str, Any]) -> dict[str, Any]:
    """No log line carries a URL's password or token, whichever field holds it."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact.text(value)
        elif isinstance(value, dict | list | tuple):
            event[key] = redact.deep(value)
    return event


def _journal(_logger: Any, level: str, event: dict[str, Any]) -> str:
    from systemd import journal
    name = str(event.pop("event", ""))
    fields: dict[str, str] = {"EVENT": name, "PRIORITY": str(_PRIORITY.get(level, 6)),
                              "SYSLOG_IDENTIFIER": "contimg-publisher"}
    if name in MESSAGE_IDS:
        fields["MESSAGE_ID"] = MESSAGE_IDS[name]
    summary = [name]
    for key, value in event.items():
        if value is None or key in ("timestamp", "level"):
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        field = "".join(c if c.isalnum() else "_" for c in key.upper()).lstrip("_") or "FIELD"
        fields[field] = text
        summary.append(f"{key}={text}")
    journal.send(" ".join(summary).replace("\n", "\\n"), **fields)
    raise structlog.DropEvent


def configure(level: str = "info", fmt: str = "auto", error_max_chars: int = 500) -> str:
    """(Re)configure logging; returns the effective format."""
    global _error_max_chars
    _error_max_chars = error_max_chars
    if fmt == "auto":
        fmt = "journal" if _under_journal() else "console"
    processors: list[Any] = [structlog.processors.add_log_level,
                             structlog.processors.TimeStamper(fmt="iso", utc=True),
                             _truncate_error, _redact]
    if fmt == "journal":
        processors.append(_journal)
    elif fmt == "json":
        processors.append(structlog.processors.JSONRenderer(default=str))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, 20)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False)
    return fmt


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)
