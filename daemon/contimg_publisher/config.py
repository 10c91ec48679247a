"""Load and validate the TOML configuration into an immutable object.

A typo in a key must not pass silently, so every table is checked against the
keys it may hold, and every error names the file, the key and the reason.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import tomllib
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from contimg_publisher import aliases, redact
from contimg_publisher.states import Sink

DEFAULT_PATH = "/etc/contimg-publisher/config.toml"
ENV_VAR = "CONTIMG_PUBLISHER_CONFIG"

DEFAULT_IGNORE = (".*", "*.tmp", "*.part", "*~", ".nfs*")

# `[paths] registry` given as one of these is a PostgreSQL server, not an SQLite file.
SERVER_SCHEMES = ("postgresql://", "postgres://")
# With a server registry, the single-writer lock (one daemon per staging area on this host)
# has no registry file to sit beside: this is its default place.
SERVER_LOCK_DEFAULT = Path("/var/lib/contimg-publisher/publisher.lock")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Never handed to a sink's command: the registry's credentials and settings (libpq's PG*)
# and systemd's protocol with the daemon (a child using them would speak for it).
_ENV_WITHHELD = re.compile(r"PG.*|NOTIFY_SOCKET|WATCHDOG_.*|LISTEN_.*|CONTIMG_.*")


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one line naming file, key and reason."""

    def __init__(self, path: str | os.PathLike[str] | None, key: str, reason: str) -> None:
        self.path = str(path) if path is not None else "<defaults>"
        self.key = key
        self.reason = redact.text(reason)  # a bad URL is quoted: without its secrets
        super().__init__(f"{self.path}: {key}: {self.reason}")


# A table or column name in the registry database a `[products.record]` names: an SQL
# identifier (quoted wherever it is used), short enough for PostgreSQL (63 bytes).
SQL_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
RECORD_MISSING = ("wait", "publish")


@dataclass(frozen=True)
class RecordRule:
    """The pipeline's own record of each product of a rule (`[products.record]`): a row of
    `table` whose `path_column` holds the product's staged path (absolute). Its `require`
    columns must hold one of their values before the product is published automatically,
    a `hold` value holds it, and `missing` says what a product without a row does ("wait"
    or "publish"). At the publish, the row's path_column becomes the published path."""

    table: str
    path_column: str
    require: tuple[tuple[str, tuple[str, ...]], ...] = ()
    hold: tuple[tuple[str, tuple[str, ...]], ...] = ()
    missing: str = "wait"

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "path_column": self.path_column,
                "require": {c: list(v) for c, v in self.require},
                "hold": {c: list(v) for c, v in self.hold}, "missing": self.missing}


@dataclass(frozen=True)
class ProductRule:
    """Which staged paths are products of one type, and where they publish to."""

    type: str
    glob: str
    destination: str
    kind: str = "file"  # "file" or "directory"
    sidecars: tuple[str, ...] = ()
    required: tuple[str, ...] = ()  # files a directory product must hold to count as complete
    # Legacy QA fields that must hold one of the values before a product is published
    # automatically: ((field, (value, ...)), ...), e.g. (("qa_status", ("passed",)),).
    require: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # The pipeline's own record of each product ([products.record]); None: none is read.
    record: RecordRule | None = None

    @functools.cached_property
    def base(self) -> PurePosixPath:
        """The part of the glob before its first wildcard: sub-paths below it are kept.
        (Cached: every path the detector and the publisher look at asks for it.)"""
        parts = []
        for part in PurePosixPath(self.glob).parts[:-1]:
            if any(ch in part for ch in "*?["):
                break
            parts.append(part)
        return PurePosixPath(*parts)


DEFAULT_RULES = (
    ProductRule(type="mosaic", glob="mosaics/**/*.fits", destination="mosaics",
                sidecars=("{stem}.weights.fits", "{stem}.thumb.png", "{stem}.png",
                          "{name}.png")),
)


@dataclass(frozen=True)
class Config:
    """Everything the daemon and the CLI need, resolved to absolute paths."""

    source: str | None
    # [paths]
    stage_root: Path = Path("/stage/dsa110-contimg")
    products_root: Path = Path("/data/dsa110-contimg/products")
    # An SQLite file, or a PostgreSQL URI (a str, kept as written: see registry_is_server)
    registry: Path | str = Path("/var/lib/contimg-publisher/registry.sqlite3")
    lock_file: Path | None = None  # default: beside the registry
    # [node]
    node_name: str = field(default_factory=socket.gethostname)
    # [registry]
    busy_timeout_seconds: float = 10.0
    # [detect]
    settle_seconds: float = 2.0
    rescan_seconds: float = 300.0
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    max_name_bytes: int = 240
    unclaimed_after_seconds: float = 3600.0
    # [publish]
    max_attempts: int = 3
    backoff_initial_seconds: float = 60.0
    backoff_max_seconds: float = 3600.0
    error_max_chars: int = 500
    # Free space kept on the products filesystem beyond a copy; None: 1 GiB or 1 %, the larger.
    min_free_bytes: int | None = None
    checksum_algorithm: str = "sha256"
    file_mode: int = 0o644
    dir_mode: int = 0o755
    lease_seconds: float = 120.0
    reconcile_seconds: float = 600.0
    legacy_quiet_seconds: float = 600.0
    lock_wait_seconds: float = 30.0
    # [service]
    stop_timeout_seconds: float = 60.0
    # [metrics]
    metrics_enabled: bool = True
    metrics_listen: str = "127.0.0.1:9465"
    # [notify]
    notify_url: str | None = None
    notify_command: tuple[str, ...] = ()
    # Variables of the daemon's environment passed on to the command (besides PATH, LANG,
    # LC_ALL, HOME and the event's CONTIMG_*): nothing else of the daemon's reaches it.
    notify_command_environment: tuple[str, ...] = ()
    notify_connect_timeout_seconds: float = 5.0
    notify_read_timeout_seconds: float = 30.0
    notify_command_timeout_seconds: float = 60.0
    notify_retry_initial_seconds: float = 1.0
    notify_retry_max_seconds: float = 300.0
    notify_max_attempts: int = 0  # 0: never give up on an event (it blocks those after it)
    # [status]
    status_max_waiting_age_seconds: float = 3600.0
    status_max_undelivered_age_seconds: float = 900.0
    # [audit]
    audit_interval_seconds: float = 86400.0  # a full pass this often; 0: no background audit
    audit_bytes_per_second: float = 50.0 * (1 << 20)  # read-back rate; 0: unlimited
    # [hygiene]
    hygiene_report_after_seconds: float = 7 * 86400.0
    quarantine_dir: Path | None = None  # None: nothing is ever moved out of staging
    # [log]
    log_level: str = "info"
    log_format: str = "auto"
    # [[products]]
    products: tuple[ProductRule, ...] = field(default=DEFAULT_RULES)

    @property
    def notify_sinks(self) -> tuple[Sink, ...]:
        """The outbox sinks configured ([notify] url, command), in delivery order."""
        return (((Sink.WEBHOOK,) if self.notify_url else ())
                + ((Sink.COMMAND,) if self.notify_command else ()))

    @property
    def registry_is_server(self) -> bool:
        """Whether the registry is a PostgreSQL server (a URI) rather than an SQLite file."""
        return isinstance(self.registry, str)

    @property
    def registry_shown(self) -> str:
        """The registry as logs and `check-config` show it: a URI without its password."""
        return redact.url(self.registry) if isinstance(self.registry, str) \
            else str(self.registry)

    @property
    def sink_targets(self) -> dict[str, str]:
        """Where each configured sink sends events, as it may be shown (redact)."""
        shown: dict[str, str] = {}
        if self.notify_url:
            shown[Sink.WEBHOOK] = redact.url(self.notify_url)
        if self.notify_command:
            shown[Sink.COMMAND] = redact.text(" ".join(self.notify_command))
        return shown

    @property
    def lock_path(self) -> Path:
        if self.lock_file is not None:
            return self.lock_file
        if isinstance(self.registry, str):
            return SERVER_LOCK_DEFAULT
        return self.registry.with_name(self.registry.name + ".lock")

    def as_dict(self) -> dict[str, Any]:
        """Effective values, for `check-config` and logs."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif f.name in ("file_mode", "dir_mode"):
                value = f"{value:04o}"
            elif f.name == "products":
                value = [
                    {"type": r.type, "glob": r.glob, "destination": r.destination,
                     "kind": r.kind, "sidecars": list(r.sidecars), "required": list(r.required),
                     "require": {f: list(v) for f, v in r.require},
                     **({"record": r.record.as_dict()} if r.record else {})}
                    for r in value
                ]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["registry"] = self.registry_shown
        out["lock_file"] = str(self.lock_path)
        shown: dict[str, Any] = redact.deep(out)  # a URL in any value: without its secrets
        return shown


# (table, key) -> (Config field, kind). Kinds: path, registry (a path or a URI), node,
# posfloat, nonnegfloat, posint, nonnegint, str, mode, strlist, level, format, url, command,
# envnames.
_SCHEMA: dict[str, dict[str, tuple[str, str]]] = {
    "paths": {
        "stage_root": ("stage_root", "path"),
        "products_root": ("products_root", "path"),
        "registry": ("registry", "registry"),
        "lock_file": ("lock_file", "path"),
    },
    "node": {"name": ("node_name", "node")},
    "registry": {"busy_timeout_seconds": ("busy_timeout_seconds", "nonnegfloat")},
    "detect": {
        "settle_seconds": ("settle_seconds", "nonnegfloat"),
        "rescan_seconds": ("rescan_seconds", "posfloat"),
        "ignore": ("ignore", "strlist"),
        "max_name_bytes": ("max_name_bytes", "posint"),
        "unclaimed_after_seconds": ("unclaimed_after_seconds", "nonnegfloat"),
    },
    "publish": {
        "max_attempts": ("max_attempts", "posint"),
        "backoff_initial_seconds": ("backoff_initial_seconds", "nonnegfloat"),
        "backoff_max_seconds": ("backoff_max_seconds", "nonnegfloat"),
        "error_max_chars": ("error_max_chars", "posint"),
        "min_free_bytes": ("min_free_bytes", "nonnegint"),
        "checksum_algorithm": ("checksum_algorithm", "algorithm"),
        "file_mode": ("file_mode", "mode"),
        "dir_mode": ("dir_mode", "mode"),
        "lease_seconds": ("lease_seconds", "posfloat"),
        "reconcile_seconds": ("reconcile_seconds", "posfloat"),
        "legacy_quiet_seconds": ("legacy_quiet_seconds", "nonnegfloat"),
        "lock_wait_seconds": ("lock_wait_seconds", "nonnegfloat"),
    },
    "service": {"stop_timeout_seconds": ("stop_timeout_seconds", "nonnegfloat")},
    "metrics": {"enabled": ("metrics_enabled", "bool"), "listen": ("metrics_listen", "listen")},
    "notify": {
        "url": ("notify_url", "url"),
        "command": ("notify_command", "command"),
        "command_environment": ("notify_command_environment", "envnames"),
        "connect_timeout_seconds": ("notify_connect_timeout_seconds", "posfloat"),
        "read_timeout_seconds": ("notify_read_timeout_seconds", "posfloat"),
        "command_timeout_seconds": ("notify_command_timeout_seconds", "posfloat"),
        "retry_initial_seconds": ("notify_retry_initial_seconds", "posfloat"),
        "retry_max_seconds": ("notify_retry_max_seconds", "posfloat"),
        "max_attempts": ("notify_max_attempts", "nonnegint"),
    },
    "status": {
        "max_waiting_age_seconds": ("status_max_waiting_age_seconds", "posfloat"),
        "max_undelivered_age_seconds": ("status_max_undelivered_age_seconds", "posfloat"),
    },
    "audit": {"interval_seconds": ("audit_interval_seconds", "nonnegfloat"),
              "bytes_per_second": ("audit_bytes_per_second", "nonnegfloat")},
    "hygiene": {"report_after_seconds": ("hygiene_report_after_seconds", "posfloat"),
                "quarantine_dir": ("quarantine_dir", "path")},
    "log": {"level": ("log_level", "level"), "format": ("log_format", "format")},
}
_PRODUCT_KEYS = {"type", "glob", "destination", "kind", "sidecars", "required", "require",
                 "record"}
_RECORD_KEYS = {"table", "path_column", "require", "hold", "missing"}
# The legacy verdict columns a rule's `require` may name (see qa.py): every column the legacy
# code gates publishing on (finalize_data, check_auto_publish_criteria).
QA_FIELDS = ("qa_status", "validation_status", "finalization_status", "photometry_status")
_LEVELS = ("debug", "info", "warning", "error", "critical")
_FORMATS = ("auto", "console", "json", "journal")
_ALGORITHMS = ("sha256", "sha512", "blake2b", "sha1")


def default_path() -> str:
    return os.environ.get(ENV_VAR) or DEFAULT_PATH


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a config file; ConfigError on any problem."""
    path = Path(path if path is not None else default_path())
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "-", "file not found") from None
    except PermissionError:
        raise ConfigError(path, "-", "permission denied") from None
    except IsADirectoryError:
        raise ConfigError(path, "-", "is a directory, not a file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "-", f"not valid TOML: {exc}") from None
    return from_mapping(data, source=path)


def from_mapping(data: dict[str, Any], source: Path | None = None) -> Config:
    """Validate a parsed TOML document; relative paths resolve against the file's folder."""
    base = source.resolve().parent if source is not None else Path.cwd()
    values: dict[str, Any] = {}
    for table, content in data.items():
        if table == "products":
            values["products"] = _parse_products(content, source)
            continue
        if table not in _SCHEMA:
            raise ConfigError(source, table, f"unknown table; known: {', '.join(sorted(_SCHEMA))}, "
                                             "products")
        if not isinstance(content, dict):
            raise ConfigError(source, table, "must be a table")
        for key, value in content.items():
            dotted = f"{table}.{key}"
            if key not in _SCHEMA[table]:
                known = ", ".join(sorted(_SCHEMA[table]))
                raise ConfigError(source, dotted, f"unknown key; known keys here: {known}")
            field_name, kind = _SCHEMA[table][key]
            values[field_name] = _convert(value, kind, dotted, source, base)
    config = Config(source=str(source) if source else None, **values)
    _check_relations(config, source)
    return config


def _convert(value: Any, kind: str, key: str, source: Path | None, base: Path) -> Any:
    def fail(reason: str) -> ConfigError:
        return ConfigError(source, key, reason)

    if kind == "path":
        if not isinstance(value, str) or not value:
            raise fail(f"must be a non-empty string path, got {value!r}")
        p = Path(value).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else base / p))
    if kind == "registry":
        if isinstance(value, str) and value.startswith(SERVER_SCHEMES):
            parsed = urllib.parse.urlsplit(value)
            if not parsed.path.strip("/") and "dbname=" not in parsed.query:
                raise fail("a PostgreSQL URI must name its database (postgresql://[user@]host"
                           f"[:port]/DBNAME), got {hide_password(value)!r}")
            return value
        return _convert(value, "path", key, source, base)
    if kind == "node":
        if not isinstance(value, str) or not _NODE_NAME.fullmatch(value):
            raise fail("must be 1 to 63 letters, digits, '.', '-' or '_', starting with a letter "
                       f"or digit, got {value!r}")
        return value
    if kind in ("posfloat", "nonnegfloat"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail(f"must be a number, got {type(value).__name__} {value!r}")
        if value < 0 or (kind == "posfloat" and value == 0):
            raise fail(f"must be {'> 0' if kind == 'posfloat' else '>= 0'}, got {value}")
        if value != value or value in (float("inf"), float("-inf")):
            raise fail(f"must be finite, got {value}")
        return float(value)
    if kind in ("posint", "nonnegint"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"must be an integer, got {type(value).__name__} {value!r}")
        if value < 0 or (kind == "posint" and value == 0):
            raise fail(f"must be {'> 0' if kind == 'posint' else '>= 0'}, got {value}")
        return value
    if kind == "url":
        if not isinstance(value, str):
            raise fail(f"must be a string URL, got {type(value).__name__} {value!r}")
        try:
            check_url(value)
        except ValueError as exc:
            raise fail(str(exc)) from None
        return value
    if kind == "command":
        if not isinstance(value, list) or not value or not all(
                isinstance(v, str) and v and "\0" not in v for v in value):
            raise fail("must be a non-empty list of non-empty strings, the program then its "
                       f"arguments (e.g. [\"/usr/local/bin/on-publish\", \"--queue\"]), got "
                       f"{value!r}")
        return tuple(value)
    if kind == "envnames":
        if not isinstance(value, list) or not all(
                isinstance(v, str) and _ENV_NAME.fullmatch(v) for v in value):
            raise fail("must be a list of environment variable names (letters, digits, '_'), "
                       f"got {value!r}")
        withheld = [v for v in value if _ENV_WITHHELD.fullmatch(v)]
        if withheld:
            raise fail(f"{', '.join(withheld)} cannot be passed to the command: PG* hold the "
                       "registry's credentials, NOTIFY_SOCKET, WATCHDOG_* and LISTEN_* are "
                       "systemd's to the daemon, CONTIMG_* are set by the daemon")
        return tuple(dict.fromkeys(value))
    if kind == "mode":
        if isinstance(value, str):
            try:
                value = int(value, 8)
            except ValueError:
                raise fail(f"must be an octal string like \"0644\", got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
            raise fail(f"must be a file mode like \"0644\", got {value!r}")
        return value
    if kind == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail("must be a list of strings")
        return tuple(value)
    if kind == "level":
        if value not in _LEVELS:
            raise fail(f"must be one of {', '.join(_LEVELS)}, got {value!r}")
        return value
    if kind == "format":
        if value not in _FORMATS:
            raise fail(f"must be one of {', '.join(_FORMATS)}, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise fail(f"must be true or false, got {value!r}")
        return value
    if kind == "listen":
        if not isinstance(value, str):
            raise fail(f"must be a string \"host:port\", got {value!r}")
        try:
            split_listen(value)
        except ValueError as exc:
            raise fail(str(exc)) from None
        return value
    if kind == "algorithm":
        if value not in _ALGORITHMS:
            raise fail(f"must be one of {', '.join(_ALGORITHMS)}, got {value!r}")
        return value
    raise AssertionError(kind)


def check_url(value: str) -> None:
    """ValueError naming what is wrong, unless an http:// or https:// URL with a host."""
    if not value or any(not c.isprintable() or c.isspace() for c in value):
        raise ValueError(f"must be a URL without spaces or control characters, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"must start with https:// or http://, got {value!r}")
    if not parts.hostname:
        raise ValueError(f"must name a host, got {value!r}")
    if parts.fragment:
        raise ValueError(f"must not carry a #fragment, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a port out of range
    except ValueError:
        raise ValueError(f"has a bad port, got {value!r}") from None
# The older name of redact.url, kept for callers of this module.
hide_password = redact.url


def split_listen(value: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ValueError naming what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be \"host:port\" (e.g. \"127.0.0.1:9465\"), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets (\"[::1]:9465\"), got {value!r}")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be \"host:port\" with a port 0-65535, got {value!r}")
    return host, int(port)


def _parse_products(content: Any, source: Path | None) -> tuple[ProductRule, ...]:
    if not isinstance(content, list) or not content:
        raise ConfigError(source, "products", "must be a non-empty array of tables [[products]]")
    rules: list[ProductRule] = []
    seen_types: set[str] = set()
    for i, item in enumerate(content):
        where = f"products[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(source, where, "must be a table")
        for key in item:
            if key not in _PRODUCT_KEYS:
                known = ", ".join(sorted(_PRODUCT_KEYS))
                raise ConfigError(source, f"{where}.{key}",
                                  f"unknown key; known keys here: {known}")
        for key in ("type", "glob", "destination"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ConfigError(source, f"{where}.{key}", "required, a non-empty string")
        kind = item.get("kind", "file")
        if kind not in ("file", "directory"):
            raise ConfigError(source, f"{where}.kind",
                              f"must be \"file\" or \"directory\", got {kind!r}")
        for key in ("sidecars", "required"):
            value = item.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(source, f"{where}.{key}", "must be a list of non-empty strings")
        for pattern in item.get("sidecars", []):
            try:
                pattern.format(stem="x", name="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(source, f"{where}.sidecars",
                                  f"pattern {pattern!r} may use only {{stem}} and {{name}} ({exc})"
                                  ) from None
            if "/" in pattern:
                raise ConfigError(source, f"{where}.sidecars",
                                  f"pattern {pattern!r} must name a file beside the product")
        for key in ("glob", "destination"):
            value = item[key]
            parts = PurePosixPath(value).parts
            if value.startswith("/") or ".." in parts:
                raise ConfigError(source, f"{where}.{key}",
                                  f"must be a relative path inside its root, got {value!r}")
        if item["type"] in seen_types:
            raise ConfigError(source, f"{where}.type", f"type {item['type']!r} is defined twice")
        seen_types.add(item["type"])
        required = item.get("required")
        if required is None and kind == "directory" and item["glob"].endswith(".image"):
            required = ["table.dat"]
        rules.append(ProductRule(type=item["type"], glob=item["glob"],
                                 destination=item["destination"], kind=kind,
                                 sidecars=tuple(item.get("sidecars", [])),
                                 required=tuple(required or []),
                                 require=_parse_require(item.get("require", {}), source,
                                                        f"{where}.require"),
                                 record=None if "record" not in item else _parse_record(
                                     item["record"], source, f"{where}.record")))
    return tuple(rules)


def _parse_record(value: Any, source: Path | None, where: str) -> RecordRule:
    """`[products.record]`: names that must be SQL identifiers and values that must be
    non-empty, checked here without the database (the registry checks that the table and
    its columns exist when it opens)."""
    if not isinstance(value, dict):
        raise ConfigError(source, where, "must be a table ([products.record])")
    for key in value:
        if key not in _RECORD_KEYS:
            raise ConfigError(source, f"{where}.{key}",
                              f"unknown key; known keys here: {', '.join(sorted(_RECORD_KEYS))}")
    names = {}
    for key in ("table", "path_column"):
        name = value.get(key)
        if not isinstance(name, str) or not SQL_IDENTIFIER.fullmatch(name):
            raise ConfigError(source, f"{where}.{key}",
                              "required, an SQL identifier (letters, digits and _, not "
                              f"starting with a digit, at most 63), got {name!r}")
        names[key] = name
    missing = value.get("missing", "wait")
    if missing not in RECORD_MISSING:
        raise ConfigError(source, f"{where}.missing",
                          f"must be \"wait\" or \"publish\", got {missing!r}")
    tests = {key: _parse_values(value.get(key, {}), source, f"{where}.{key}")
             for key in ("require", "hold")}
    for key, pairs in tests.items():
        for column, _values in pairs:
            if column == names["path_column"]:
                raise ConfigError(source, f"{where}.{key}.{column}",
                                  "is the path_column, which the publish rewrites")
    required, held = dict(tests["require"]), dict(tests["hold"])
    for column in required.keys() & held.keys():
        both = set(required[column]) & set(held[column])
        if both:
            raise ConfigError(source, f"{where}.hold.{column}",
                              f"{sorted(both)} also in require: a value cannot both let a "
                              "product go and hold it")
    return RecordRule(table=names["table"], path_column=names["path_column"],
                      require=tests["require"], hold=tests["hold"], missing=missing)


def _parse_values(value: Any, source: Path | None, where: str
                  ) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`{ qa_status = ["PASS", "WARN"] }`: each column (an SQL identifier) with the value or
    the non-empty list of values it is tested against."""
    if not isinstance(value, dict):
        raise ConfigError(source, where, 'must be a table of columns, e.g. '
                                         '{ qa_status = ["PASS", "WARN"] }')
    out = []
    for column, wanted in value.items():
        if not SQL_IDENTIFIER.fullmatch(column):
            raise ConfigError(source, f"{where}.{column}",
                              "a column name must be an SQL identifier (letters, digits and "
                              "_, not starting with a digit, at most 63)")
        values = [wanted] if isinstance(wanted, str) else wanted
        if not isinstance(values, list) or not values or not all(
                isinstance(v, str) and v and v.isprintable() for v in values):
            raise ConfigError(source, f"{where}.{column}",
                              f"must be a value or a non-empty list of values, got {wanted!r}")
        out.append((column, tuple(values)))
    return tuple(out)


def _parse_require(value: Any, source: Path | None, where: str
                   ) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`require = { qa_status = "passed", validation_status = ["validated"] }`: each legacy
    QA field with the value (or any of the values) it must hold."""
    if not isinstance(value, dict):
        raise ConfigError(source, where, "must be a table of QA fields, e.g. "
                                         '{ qa_status = "passed" }')
    out = []
    for name, wanted in value.items():
        if name not in QA_FIELDS:
            raise ConfigError(source, f"{where}.{name}",
                              f"unknown QA field; known: {', '.join(QA_FIELDS)}")
        values = [wanted] if isinstance(wanted, str) else wanted
        if not isinstance(values, list) or not values or not all(
                isinstance(v, str) and v and v.isprintable() for v in values):
            raise ConfigError(source, f"{where}.{name}",
                              f"must be a value or a non-empty list of values, got {wanted!r}")
        out.append((name, tuple(values)))
    return tuple(out)


def _inside(child: Path, parent: Path) -> bool:
    """As spelled, and as the folders they are (a symbolic link can alias one as the other)."""
    real_child, real_parent = Path(os.path.realpath(child)), Path(os.path.realpath(parent))
    return any(c == p or p in c.parents
               for c, p in ((child, parent), (real_child, real_parent)))


def _check_identities(config: Config, source: Path | None) -> None:
    """The roots compared by what they are (aliases.py): a bind mount or another alias of
    one root inside another is refused as the spelled overlap is, naming both."""
    table = aliases.current_table()
    stage, products = config.stage_root, config.products_root
    how = aliases.overlap(products, stage, table)
    if how is not None:
        raise ConfigError(source, "paths.products_root",
                          f"{products} {how} stage_root {stage} by device and inode (a bind "
                          "mount or another alias); they must be separate folders")
    pairs: list[tuple[str, Path, bool]] = []
    if isinstance(config.registry, Path):
        pairs.append(("paths.registry", config.registry.parent, False))
    if config.quarantine_dir is not None:
        pairs.append(("hygiene.quarantine_dir", config.quarantine_dir, True))
    for key, folder, both_ways in pairs:
        for root, name in ((stage, "stage_root"), (products, "products_root")):
            if aliases.inside(folder, root, table):
                how = "is the same folder as" if aliases.inside(root, folder, table) else \
                    "lies inside"
            elif both_ways and aliases.inside(root, folder, table):
                how = "contains"
            else:
                continue
            raise ConfigError(source, key, f"{folder} {how} {name} {root} by device and inode "
                                           "(a bind mount or another alias); they must be "
                                           "separate folders")


def _check_relations(config: Config, source: Path | None) -> None:
    stage, products = config.stage_root, config.products_root
    if stage == products or os.path.realpath(stage) == os.path.realpath(products):
        raise ConfigError(source, "paths.products_root",
                          f"is the same folder as stage_root ({stage})")
    if _inside(products, stage):
        raise ConfigError(source, "paths.products_root",
                          f"{products} is inside stage_root {stage}; they must be separate")
    if _inside(stage, products):
        raise ConfigError(source, "paths.stage_root",
                          f"{stage} is inside products_root {products}; they must be separate")
    if isinstance(config.registry, Path) and _inside(config.registry, stage):
        raise ConfigError(source, "paths.registry",
                          f"{config.registry} is inside stage_root {stage}")
    if isinstance(config.registry, Path) and _inside(config.registry, products):
        raise ConfigError(source, "paths.registry",
                          f"{config.registry} is inside products_root {products}")
    if config.notify_retry_max_seconds < config.notify_retry_initial_seconds:
        raise ConfigError(source, "notify.retry_max_seconds",
                          f"({config.notify_retry_max_seconds}) is less than "
                          f"retry_initial_seconds ({config.notify_retry_initial_seconds})")
    quarantine = config.quarantine_dir
    if quarantine is not None:
        for root, name in ((stage, "stage_root"), (products, "products_root")):
            if _inside(quarantine, root) or _inside(root, quarantine):
                raise ConfigError(source, "hygiene.quarantine_dir",
                                  f"{quarantine} overlaps {name} {root}; quarantined files "
                                  "must leave the staging area and stay out of the archive")
    _check_identities(config, source)
    if config.backoff_max_seconds < config.backoff_initial_seconds:
        raise ConfigError(source, "publish.backoff_max_seconds",
                          f"({config.backoff_max_seconds}) is less than backoff_initial_seconds "
                          f"({config.backoff_initial_seconds})")


# --- the reference: docs/config.md is generated from what follows (contimg_publisher.reference)

# What each key is for, as docs/config.md shows it beside the key's type and default. Kept here,
# beside the schema, so a new key and its description land together: tests/test_docs.py fails
# on a key without one.
DESCRIPTIONS: dict[str, dict[str, str]] = {
    "paths": {
        "stage_root": "Where the pipeline writes finished products (the SSD staging area).",
        "products_root": "Where products are published (the HDD archive). Must not overlap "
                         "stage_root.",
        "registry": "The SQLite registry file (shared with older pipeline tools that read "
                    "`data_registry`), or a PostgreSQL URI such as "
                    "`postgresql://contimg@dbhost/contimg` for several nodes sharing one "
                    "registry (password from `~/.pgpass` or `PGPASSWORD`).",
        "lock_file": "The single-writer lock. Unset: the registry's path plus `.lock`; with a "
                     "PostgreSQL registry `/var/lib/contimg-publisher/publisher.lock`.",
    },
    "node": {
        "name": "This node's name in a shared (PostgreSQL) registry: a product belongs to the "
                "node whose staging area holds it, and only that node publishes it. Two "
                "daemons with their own staging areas need two names.",
    },
    "registry": {
        "busy_timeout_seconds": "How long a registry write waits for another process's "
                                "transaction.",
    },
    "detect": {
        "settle_seconds": "Quiet time after the last write before a file counts as finished.",
        "rescan_seconds": "Full rescan, to catch events the kernel dropped and files written "
                          "while the daemon was down.",
        "ignore": "Names (any path component) that are never products.",
        "max_name_bytes": "Longest accepted name component, in bytes (leaves room for `.vN` "
                          "under the filesystem's 255-byte limit).",
        "unclaimed_after_seconds": "A file in a product folder that no product owns is listed "
                                   "(`status`, status page, metric) once it has not changed "
                                   "for this long. Nothing is deleted.",
    },
    "publish": {
        "max_attempts": "Failed attempts before a product waits for an operator (`retry`).",
        "backoff_initial_seconds": "Backoff between attempts: initial * 2^(attempt-1), at most "
                                   "backoff_max_seconds.",
        "backoff_max_seconds": "The longest backoff between attempts.",
        "error_max_chars": "Error text kept per failure, in characters.",
        "min_free_bytes": "Free space the products filesystem must keep beyond a copy onto it; "
                          "otherwise the product waits, without counting an attempt. Unset: "
                          "1 GiB or 1 % of the filesystem, the larger.",
        "checksum_algorithm": "Checksum recorded for each product.",
        "file_mode": "Mode of published files.",
        "dir_mode": "Mode of published folders.",
        "lease_seconds": "A claimed product's lease; renewed while a long copy runs.",
        "reconcile_seconds": "How often interrupted publishes and leftover temporary files are "
                             "reconciled.",
        "legacy_quiet_seconds": "A row the pipeline's own code left in `publishing` is judged "
                                "only once its copy and staged file have not changed for this "
                                "long and nobody has the copy open for writing.",
        "lock_wait_seconds": "How long `publish` and `scan` wait for the single-writer lock.",
    },
    "service": {
        "stop_timeout_seconds": "On SIGTERM, how long the copy in flight may run before it is "
                                "aborted cleanly. Keep it below the unit's TimeoutStopSec.",
    },
    "metrics": {
        "enabled": "Serve Prometheus metrics at /metrics and the status page at /.",
        "listen": "Address of the metrics port; a non-loopback address is logged as a warning. "
                  "Under systemd the socket unit decides.",
    },
    "notify": {
        "url": "A webhook: each outbox event is POSTed as JSON with `Idempotency-Key: "
               "<event_id>`; any 2xx answer is delivery. Unset: no webhook.",
        "command": "A program and its arguments (no shell), run once per event with the "
                   "event's JSON on standard input; exit status 0 is delivery. Unset: no "
                   "command.",
        "command_environment": "Variables of the daemon's environment passed on to the command, "
                               "besides PATH, LANG, LC_ALL, HOME and the event's CONTIMG_* "
                               "(never PG*, NOTIFY_SOCKET, WATCHDOG_*, LISTEN_*).",
        "connect_timeout_seconds": "Time for the webhook's connect (TCP and TLS).",
        "read_timeout_seconds": "Time to send the event and read the whole answer (one "
                                "deadline).",
        "command_timeout_seconds": "A command still running after this long is killed with its "
                                   "process group: a failed attempt.",
        "retry_initial_seconds": "Backoff after a failed delivery: initial * 2^(attempt-1), at "
                                 "most retry_max_seconds.",
        "retry_max_seconds": "The longest backoff between deliveries; also caps Retry-After.",
        "max_attempts": "Failed attempts after which an event is given up on for that sink "
                        "(`dead`). 0: never give up; a failing event holds back every later "
                        "one.",
    },
    "status": {
        "max_waiting_age_seconds": "`status` exits 1 when a product (held ones excepted) has "
                                   "waited longer than this.",
        "max_undelivered_age_seconds": "`status` exits 1 when an event has waited longer than "
                                       "this for a sink.",
    },
    "audit": {
        "interval_seconds": "A full background audit pass of the products area this often; 0: "
                            "no background audit (`audit` still runs one by hand).",
        "bytes_per_second": "The background audit's read-back rate, on average; 0: unlimited.",
    },
    "hygiene": {
        "report_after_seconds": "Rejected products and unclaimed files in staging unchanged "
                                "for this long are listed by `status` as stale.",
        "quarantine_dir": "Where `quarantine` moves stale files, under the same sub-path, each "
                          "with a record. Unset: nothing is ever moved out of staging.",
    },
    "log": {
        "level": "The lowest level logged.",
        "format": "`auto`: journald under systemd, console otherwise.",
    },
    "products": {
        "type": "The products' `data_type`; one rule per type.",
        "glob": "Paths under stage_root that are products of this type.",
        "destination": "Folder under products_root they publish to, keeping their sub-path "
                       "below the glob's fixed prefix.",
        "kind": "`directory` for folder products such as CASA images.",
        "sidecars": "Files that travel with their product; `{stem}` is the name without its "
                    "last suffix, `{name}` the full name.",
        "required": "Files a folder product must hold to count as complete (a `*.image` glob "
                    "defaults to `[\"table.dat\"]`).",
        "require": "Legacy QA columns (qa_status, validation_status, finalization_status, "
                   "photometry_status) that must hold one of the values before the product "
                   "is published automatically.",
        "record": "The pipeline's own record of each product: see [products.record].",
    },
    "products.record": {
        "table": "A table in the registry's database holding one row per product.",
        "path_column": "Its column holding the product's staged path (absolute); the publish "
                       "sets it to the published path.",
        "require": "Columns that must hold one of the values before the product is published "
                   "automatically.",
        "hold": "Column values that hold the product, with the reason.",
        "missing": "What a staged product without a row does: `wait` or `publish`.",
    },
}

# How each kind of value is written, as docs/config.md shows it in the type column.
KIND_TEXT: dict[str, str] = {
    "path": "path",
    "registry": "path or PostgreSQL URI",
    "node": "name (letters, digits, `.`, `-`, `_`; at most 63)",
    "posfloat": "number > 0",
    "nonnegfloat": "number >= 0",
    "posint": "integer > 0",
    "nonnegint": "integer >= 0",
    "mode": "octal string",
    "strlist": "list of strings",
    "level": "one of " + ", ".join(_LEVELS),
    "format": "one of " + ", ".join(_FORMATS),
    "bool": "boolean",
    "listen": "\"host:port\"",
    "url": "http(s) URL",
    "command": "list of strings: program, arguments",
    "envnames": "list of variable names",
    "algorithm": "one of " + ", ".join(_ALGORITHMS),
}


def schema() -> dict[str, dict[str, tuple[str, str]]]:
    """Every table a file may hold, each key with (its field, its kind); the keys of
    [[products]] and [products.record], which are checked by hand, with (the ProductRule or
    RecordRule field, "rule"). What the generated reference walks."""
    tables = {table: dict(keys) for table, keys in _SCHEMA.items()}
    tables["products"] = {key: (key, "rule") for key in sorted(_PRODUCT_KEYS)}
    tables["products.record"] = {key: (key, "rule") for key in sorted(_RECORD_KEYS)}
    return tables
