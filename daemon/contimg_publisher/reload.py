"""A configuration reload (SIGHUP): the new file checked before the daemon uses any of it,
what only a restart can change kept, and the outcome said and counted.

A reload that fails leaves the daemon on its previous configuration: the journal says
why, STATUS= says so until the next reload that works.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from contimg_publisher import config as config_mod
from contimg_publisher import logs, metrics, qa
from contimg_publisher.config import Config, ConfigError
from contimg_publisher.registry import RegistryBackend, RegistryError


class Loaded(NamedTuple):
    config: Config
    kept: list[str]  # what takes effect only at a restart, said in reload_ok


@dataclass(frozen=True)
class Failed:
    why: str                # for STATUS=
    fields: dict[str, str]  # the reload_failed event's


def load(config_path: str, old: Config, registry: RegistryBackend) -> Loaded | Failed:
    """The new configuration, its QA gate already set on the registry; the registry and
    the lock stay the running ones (a restart changes them)."""
    try:
        new = config_mod.load(config_path)
        # A record's table without a column the new rules name: keep the old gate.
        registry.set_qa_gate(qa.conditions(new.products), qa.records(new.products))
    except ConfigError as exc:
        return Failed(f"{exc.key}: {exc.reason}",
                      {"config": exc.path, "key": exc.key, "error": exc.reason})
    except RegistryError as exc:
        return Failed(str(exc), {"config": config_path, "key": "products.record",
                                 "error": str(exc)})
    if new.registry != old.registry or new.lock_path != old.lock_path:
        return Loaded(replace(new, registry=old.registry, lock_file=old.lock_file),
                      ["paths.registry/lock_file (take effect at restart)"])
    return Loaded(new, [])


def logger(cfg: Config) -> Any:
    """The logger as the new configuration sets it up."""
    logs.configure(cfg.log_level, cfg.log_format, cfg.error_max_chars)
    return logs.get_logger()


def failed(failure: Failed, log: Any, observed: metrics.Metrics) -> str:
    """Said and counted; returns the note STATUS= carries until a reload works."""
    log.error("reload_failed", **failure.fields)
    observed.observe_reload(False)
    return f"reload failed ({failure.why}); running on the previous configuration"


def done(loaded: Loaded, old: Config, config_path: str, log: Any,
         observed: metrics.Metrics) -> None:
    new = loaded.config
    observed.observe_reload(True, new)
    log.info("reload_ok", config=config_path,
             changed=sorted(k for k, v in new.as_dict().items()
                            if old.as_dict().get(k) != v and k != "source"),
             kept=loaded.kept)
