"""The config file through the real command: a bad file is refused with exit 2 and one line
that names the file, the key and the reason, so an operator can fix it without reading code.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from contimg_publisher import config as config_mod
from contimg_publisher.config import Config, ConfigError
from tests.helpers import REPO, run_cli, write_config

SHIPPED = REPO / "etc" / "contimg-publisher" / "config.toml"


def _tables(root: Path) -> dict[str, dict[str, Any]]:
    return {"paths": {"stage_root": str(root / "stage"), "products_root": str(root / "products"),
                      "registry": str(root / "state" / "registry.sqlite3")}}


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]
           ) -> dict[str, dict[str, Any]]:
    out = {t: dict(v) for t, v in base.items()}
    for table, values in extra.items():
        out.setdefault(table, {}).update(values)
    return out


RULE = {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics"}

# (id, extra tables, products, expected key, words of the reason)
BAD: list[tuple[str, dict[str, dict[str, Any]], list[dict[str, Any]] | None, str, str]] = [
    *[(f"unknown-key-{table}", {table: {"settle_secnds": 1}}, None, f"{table}.settle_secnds",
       "unknown key") for table in config_mod._SCHEMA],
    ("unknown-key-products", {}, [{**RULE, "destinaton": "x"}], "products[0].destinaton",
     "unknown key"),
    ("unknown-table", {"publsh": {"max_attempts": 3}}, None, "publsh", "unknown table"),
    ("type-float-as-string", {"detect": {"settle_seconds": "2"}}, None, "detect.settle_seconds",
     "must be a number"),
    ("type-int-as-float", {"publish": {"max_attempts": 2.5}}, None, "publish.max_attempts",
     "must be an integer"),
    ("type-int-as-bool", {"publish": {"max_attempts": True}}, None, "publish.max_attempts",
     "must be an integer"),
    ("type-float-as-bool", {"registry": {"busy_timeout_seconds": True}}, None,
     "registry.busy_timeout_seconds", "must be a number"),
    ("type-bool-as-string", {"metrics": {"enabled": "yes"}}, None, "metrics.enabled",
     "true or false"),
    ("type-list-as-string", {"detect": {"ignore": "*.tmp"}}, None, "detect.ignore",
     "list of strings"),
    ("type-path-as-int", {"paths": {"registry": 5}}, None, "paths.registry",
     "non-empty string path"),
    ("type-path-empty", {"paths": {"stage_root": ""}}, None, "paths.stage_root",
     "non-empty string path"),
    ("type-mode", {"publish": {"file_mode": "rw-r--r--"}}, None, "publish.file_mode", "octal"),
    ("type-level", {"log": {"level": "loud"}}, None, "log.level", "must be one of"),
    ("type-format", {"log": {"format": "xml"}}, None, "log.format", "must be one of"),
    ("type-algorithm", {"publish": {"checksum_algorithm": "md5"}}, None,
     "publish.checksum_algorithm", "must be one of"),
    ("type-listen", {"metrics": {"listen": "9465"}}, None, "metrics.listen", "host:port"),
    ("type-table-as-value", {}, None, "detect", "must be a table"),
    ("products-missing-glob", {}, [{"type": "mosaic", "destination": "m"}], "products[0].glob",
     "required"),
    ("products-absolute-destination", {}, [{**RULE, "destination": "/data"}],
     "products[0].destination", "relative path"),
    ("products-duplicate-type", {}, [RULE, RULE], "products[1].type", "defined twice"),
    ("products-bad-kind", {}, [{**RULE, "kind": "tarball"}], "products[0].kind",
     "\"file\" or \"directory\""),
    *[(f"negative-{table}.{key}", {table: {key: -1}}, None, f"{table}.{key}", "must be >")
      for table, key in [("registry", "busy_timeout_seconds"), ("detect", "settle_seconds"),
                         ("detect", "rescan_seconds"), ("detect", "max_name_bytes"),
                         ("publish", "max_attempts"), ("publish", "backoff_initial_seconds"),
                         ("publish", "backoff_max_seconds"), ("publish", "error_max_chars"),
                         ("publish", "lease_seconds"), ("publish", "reconcile_seconds"),
                         ("publish", "legacy_quiet_seconds"),
                         ("publish", "lock_wait_seconds"), ("service", "stop_timeout_seconds"),
                         ("status", "max_waiting_age_seconds"),
                         ("audit", "interval_seconds"), ("audit", "bytes_per_second"),
                         ("hygiene", "report_after_seconds")]],
    ("zero-report-after", {"hygiene": {"report_after_seconds": 0}}, None,
     "hygiene.report_after_seconds", "must be > 0"),
    ("type-audit-rate", {"audit": {"bytes_per_second": "50M"}}, None, "audit.bytes_per_second",
     "must be a number"),
    ("negative-fraction", {"detect": {"settle_seconds": -0.5}}, None, "detect.settle_seconds",
     "must be >= 0"),
    ("not-finite-nan", {"detect": {"settle_seconds": float("nan")}}, None,
     "detect.settle_seconds", "must be finite"),
    ("not-finite-inf", {"publish": {"lease_seconds": float("inf")}}, None,
     "publish.lease_seconds", "must be finite"),
    ("zero-attempts", {"publish": {"max_attempts": 0}}, None, "publish.max_attempts",
     "must be > 0"),
    ("zero-error-chars", {"publish": {"error_max_chars": 0}}, None, "publish.error_max_chars",
     "must be > 0"),
    ("require-not-a-table", {}, [{**RULE, "require": "passed"}], "products[0].require",
     "must be a table of QA fields"),
    ("require-unknown-field", {}, [{**RULE, "require": {"qa_stauts": "passed"}}],
     "products[0].require.qa_stauts", "unknown QA field"),
    ("require-number", {}, [{**RULE, "require": {"qa_status": 1}}],
     "products[0].require.qa_status", "must be a value or a non-empty list"),
    ("require-empty-list", {}, [{**RULE, "require": {"validation_status": []}}],
     "products[0].require.validation_status", "must be a value or a non-empty list"),
    ("require-empty-value", {}, [{**RULE, "require": {"qa_status": ""}}],
     "products[0].require.qa_status", "must be a value or a non-empty list"),
    ("backoff-max-below-initial", {"publish": {"backoff_initial_seconds": 60,
                                               "backoff_max_seconds": 30}}, None,
     "publish.backoff_max_seconds", "less than backoff_initial_seconds"),
    ("node-name-empty", {"node": {"name": ""}}, None, "node.name", "must be 1 to 63"),
    ("node-name-slash", {"node": {"name": "a/b"}}, None, "node.name", "must be 1 to 63"),
    ("node-name-number", {"node": {"name": 7}}, None, "node.name", "must be 1 to 63"),
    ("registry-uri-without-database", {"paths": {"registry": "postgresql://u:secret@db:5432"}},
     None, "paths.registry", "must name its database"),
]

# Relations between paths, written relative to the sandbox root "R".
PATHS_BAD = [
    ("stage-equals-products", {"stage_root": "R/a", "products_root": "R/a"},
     "paths.products_root", "same folder"),
    ("stage-equals-products-spelled-differently", {"stage_root": "R/a",
                                                   "products_root": "R/b/../a/."},
     "paths.products_root", "same folder"),
    ("products-inside-stage", {"stage_root": "R/a", "products_root": "R/a/products"},
     "paths.products_root", "inside stage_root"),
    ("stage-inside-products", {"stage_root": "R/p/stage", "products_root": "R/p"},
     "paths.stage_root", "inside products_root"),
    ("registry-inside-stage", {"stage_root": "R/a", "products_root": "R/b",
                               "registry": "R/a/state/registry.sqlite3"},
     "paths.registry", "inside stage_root"),
    ("registry-inside-products", {"stage_root": "R/a", "products_root": "R/b",
                                  "registry": "R/b/registry.sqlite3"},
     "paths.registry", "inside products_root"),
]
QUARANTINE_BAD = [
    ("quarantine-inside-stage", "R/a/quarantine", "overlaps stage_root"),
    ("quarantine-inside-products", "R/b/quarantine", "overlaps products_root"),
    ("quarantine-holds-products", "R", "overlaps stage_root"),
]


def _assert_refused(cfg: Path, key: str, reason: str) -> str:
    out = run_cli(cfg, "check-config")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    line = lines[0]
    assert str(cfg) in line
    assert f": {key}: " in line, line
    assert reason in line, line
    return line


@pytest.mark.parametrize(("extra", "products", "key", "reason"),
                         [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_value_is_refused_naming_file_key_and_reason(tmp_path, extra, products, key,
                                                         reason):
    tables = _merge(_tables(tmp_path), extra)
    cfg = write_config(tmp_path / "config.toml", tables, products)
    if key == "detect" and reason == "must be a table":
        cfg.write_text("detect = 5\n" + cfg.read_text())
    _assert_refused(cfg, key, reason)
    with pytest.raises(ConfigError) as info:
        config_mod.load(cfg)
    assert (info.value.key, reason in info.value.reason) == (key, True)


@pytest.mark.parametrize(("paths", "key", "reason"), [c[1:] for c in PATHS_BAD],
                         ids=[c[0] for c in PATHS_BAD])
def test_overlapping_paths_are_refused(tmp_path, paths, key, reason):
    """Publishing into the staging area (or the reverse) would delete products."""
    tables = _tables(tmp_path)
    tables["paths"].update({k: v.replace("R", str(tmp_path), 1) for k, v in paths.items()})
    cfg = write_config(tmp_path / "config.toml", tables)
    _assert_refused(cfg, key, reason)


@pytest.mark.parametrize(("where", "reason"), [c[1:] for c in QUARANTINE_BAD],
                         ids=[c[0] for c in QUARANTINE_BAD])
def test_quarantine_overlapping_a_root_is_refused(tmp_path, where, reason):
    """Quarantined files must leave the staging area, and never become dark data."""
    tables = _tables(tmp_path)
    tables["paths"].update({"stage_root": str(tmp_path / "a"),
                            "products_root": str(tmp_path / "b")})
    tables["hygiene"] = {"quarantine_dir": where.replace("R", str(tmp_path), 1)}
    cfg = write_config(tmp_path / "config.toml", tables)
    _assert_refused(cfg, "hygiene.quarantine_dir", reason)


def test_audit_and_hygiene_values_are_converted(tmp_path):
    tables = _merge(_tables(tmp_path), {
        "audit": {"interval_seconds": 0, "bytes_per_second": 1048576},
        "hygiene": {"report_after_seconds": 60, "quarantine_dir": "q"}})
    values = _effective(write_config(tmp_path / "config.toml", tables))
    assert values["audit_interval_seconds"] == 0.0
    assert values["audit_bytes_per_second"] == 1048576.0
    assert values["hygiene_report_after_seconds"] == 60.0
    assert values["quarantine_dir"] == str(tmp_path / "q")


def test_relative_overlap_is_seen_after_resolving(tmp_path):
    """Relative spellings are resolved against the file's folder before comparing."""
    (tmp_path / "etc").mkdir()
    cfg = write_config(tmp_path / "etc" / "config.toml",
                       {"paths": {"stage_root": "../data", "products_root": "../data/products",
                                  "registry": "registry.sqlite3"}})
    line = _assert_refused(cfg, "paths.products_root", "inside stage_root")
    assert str(tmp_path / "data" / "products") in line


def test_stage_and_products_aliased_through_a_symlink_are_refused(tmp_path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "stage")
    cfg = write_config(tmp_path / "config.toml",
                       {"paths": {"stage_root": str(tmp_path / "stage"),
                                  "products_root": str(tmp_path / "alias"),
                                  "registry": str(tmp_path / "registry.sqlite3")}})
    _assert_refused(cfg, "paths.products_root", "same folder")


def test_unparsable_toml_is_refused(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[paths]\nstage_root = \"/a\"\nproducts_root = /b\n")
    line = _assert_refused(cfg, "-", "not valid TOML")
    assert "line 3" in line


def test_duplicate_key_is_refused(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text("[publish]\nmax_attempts = 3\nmax_attempts = 4\n")
    _assert_refused(cfg, "-", "not valid TOML")


def test_missing_file_is_refused(tmp_path):
    _assert_refused(tmp_path / "nowhere.toml", "-", "file not found")


def test_directory_instead_of_file_is_refused(tmp_path):
    _assert_refused(tmp_path, "-", "is a directory")


def _effective(cfg: Path) -> dict[str, Any]:
    out = run_cli(cfg, "check-config")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"# {cfg}: valid"
    values = {}
    for line in lines[1:]:
        key, _, value = line.partition(" = ")
        values[key] = json.loads(value)
    return values


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    """The command runs from another folder (the checkout); the file's folder decides."""
    folder = tmp_path / "site" / "etc"
    folder.mkdir(parents=True)
    cfg = write_config(folder / "config.toml",
                       {"paths": {"stage_root": "stage", "products_root": "../products",
                                  "registry": "./state/../state/registry.sqlite3",
                                  "lock_file": "run/publisher.lock"}})
    values = _effective(cfg)
    assert values["stage_root"] == str(folder / "stage")
    assert values["products_root"] == str(tmp_path / "site" / "products")
    assert values["registry"] == str(folder / "state" / "registry.sqlite3")
    assert values["lock_file"] == str(folder / "run" / "publisher.lock")
    loaded = config_mod.load(cfg)
    assert loaded.stage_root == folder / "stage"
    assert loaded.lock_path == folder / "run" / "publisher.lock"


def test_valid_values_are_converted(tmp_path):
    tables = _merge(_tables(tmp_path), {
        "publish": {"file_mode": "0640", "max_attempts": 5, "backoff_initial_seconds": 2},
        "detect": {"settle_seconds": 0, "ignore": ["*.lock"]},
        "metrics": {"enabled": False, "listen": "[::1]:9000"}})
    values = _effective(write_config(tmp_path / "config.toml", tables))
    assert values["file_mode"] == "0640" and values["max_attempts"] == 5
    assert values["backoff_initial_seconds"] == 2.0 and values["settle_seconds"] == 0.0
    assert values["ignore"] == ["*.lock"]
    assert values["metrics_enabled"] is False and values["metrics_listen"] == "[::1]:9000"
    assert values["lock_file"] == str(tmp_path / "state" / "registry.sqlite3.lock")


def test_qa_requirements_are_converted(tmp_path):
    """A value or a list of values per legacy QA field; shown by check-config."""
    rule = {**RULE, "require": {"qa_status": ["passed", "warning"],
                                "validation_status": "validated"}}
    cfg = write_config(tmp_path / "config.toml", _tables(tmp_path), [rule])
    loaded = config_mod.load(cfg)
    assert loaded.products[0].require == (("qa_status", ("passed", "warning")),
                                          ("validation_status", ("validated",)))
    values = _effective(cfg)
    assert values["products"][0]["require"] == {"qa_status": ["passed", "warning"],
                                                "validation_status": ["validated"]}
    assert config_mod.load(write_config(tmp_path / "plain.toml", _tables(tmp_path),
                                        [RULE])).products[0].require == ()


def test_default_rule_takes_the_pipeline_thumbnail():
    """The pipeline's API writes `<stem>.thumb.png` beside a mosaic."""
    assert "{stem}.thumb.png" in Config(source=None).products[0].sidecars


def test_shipped_config_equals_built_in_defaults():
    """The shipped file documents the defaults; it must not drift from the code."""
    shipped = config_mod.load(SHIPPED)
    defaults = Config(source=str(SHIPPED))
    assert shipped == defaults
    assert shipped.as_dict() == defaults.as_dict()
    values = _effective(SHIPPED)
    expected = defaults.as_dict()
    expected.pop("source")
    assert values == json.loads(json.dumps(expected))


def test_shipped_config_mentions_every_key():
    """Every key the program accepts is shown (set or commented out) in the shipped file."""
    text = SHIPPED.read_text()
    for table, keys in config_mod._SCHEMA.items():
        assert re.search(rf"^\[{table}\]$", text, re.M), table
        for key in keys:
            assert re.search(rf"^#? ?{key} = ", text, re.M), f"{table}.{key}"
    for key in config_mod._PRODUCT_KEYS:
        assert re.search(rf"^#? ?{key} = ", text, re.M), f"products.{key}"


def test_every_config_field_is_reachable_from_toml():
    """A Config field without a TOML key could never be set by an operator."""
    reachable = {f for keys in config_mod._SCHEMA.values() for f, _ in keys.values()}
    assert {f.name for f in fields(Config)} - reachable == {"source", "products"}


def test_local_sandbox_config_resolves_inside_the_checkout():
    local = config_mod.load(REPO / "etc" / "contimg-publisher" / "local.toml")
    assert local.stage_root == REPO / "var" / "stage"
    assert local.products_root == REPO / "var" / "products"
    assert local.registry == REPO / "var" / "registry.sqlite3"


def test_config_path_from_the_environment(tmp_path):
    """Without --config the file named by $CONTIMG_PUBLISHER_CONFIG is the one checked."""
    cfg = write_config(tmp_path / "env.toml", _merge(_tables(tmp_path),
                                                     {"publish": {"max_attempts": -2}}))
    env = {k: v for k, v in os.environ.items() if k != config_mod.ENV_VAR}
    env[config_mod.ENV_VAR] = str(cfg)
    out = subprocess.run([sys.executable, "-m", "contimg_publisher", "check-config"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"contimg-publisher: bad config: {cfg}: publish.max_attempts: "
                                  "must be > 0, got -2")


def test_node_name_defaults_to_the_host_name_and_can_be_set(tmp_path):
    import socket
    cfg = config_mod.from_mapping(_tables(tmp_path))
    assert cfg.node_name == socket.gethostname()
    cfg = config_mod.from_mapping(_merge(_tables(tmp_path), {"node": {"name": "dsa-node-2"}}))
    assert cfg.node_name == "dsa-node-2"
    assert cfg.as_dict()["node_name"] == "dsa-node-2"


def test_registry_uri_is_kept_as_written_and_shown_without_its_password(tmp_path):
    uri = "postgresql://contimg:s3cret@db.example:5433/contimg?sslmode=disable"
    cfg = config_mod.from_mapping(_merge(_tables(tmp_path), {"paths": {"registry": uri}}))
    assert cfg.registry == uri and cfg.registry_is_server
    assert cfg.registry_shown == "postgresql://contimg:***@db.example:5433/contimg?sslmode=disable"
    assert "s3cret" not in json.dumps(cfg.as_dict())
    assert cfg.lock_path == config_mod.SERVER_LOCK_DEFAULT
    with_lock = config_mod.from_mapping(_merge(_tables(tmp_path), {
        "paths": {"registry": uri, "lock_file": str(tmp_path / "l.lock")}}))
    assert with_lock.lock_path == tmp_path / "l.lock"
    file_cfg = config_mod.from_mapping(_tables(tmp_path))
    assert not file_cfg.registry_is_server
    assert file_cfg.registry == tmp_path / "state" / "registry.sqlite3"
    assert config_mod.hide_password("postgresql:///x?host=/tmp&password=pw&user=u") == \
        "postgresql:///x?host=/tmp&password=***&user=u"


def test_a_rule_may_require_the_photometry_of_the_legacy_gate(tmp_path):
    """check_auto_publish_criteria waits for photometry_status = 'completed'."""
    path = write_config(tmp_path / "c.toml", {}, [
        {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics",
         "require": {"photometry_status": "completed"}}])
    (rule,) = config_mod.load(path).products
    assert rule.require == (("photometry_status", ("completed",)),)


def _record_rule(tmp_path: Path, **record: Any) -> Path:
    return write_config(tmp_path / "c.toml", {}, [
        {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics",
         "record": {"table": "mosaics", "path_column": "path", **record}}])


def test_a_products_record_is_read_and_shown_by_check_config(tmp_path):
    path = _record_rule(tmp_path, require={"qa_status": ["PASS", "WARN"]},
                        hold={"qa_status": "FAIL"})
    (rule,) = config_mod.load(path).products
    assert rule.record is not None
    assert (rule.record.table, rule.record.path_column, rule.record.require,
            rule.record.hold, rule.record.missing) == (
        "mosaics", "path", (("qa_status", ("PASS", "WARN")),), (("qa_status", ("FAIL",)),),
        "wait")
    out = run_cli(path, "check-config")
    assert out.returncode == 0, out.stderr
    assert '"record": {"table": "mosaics", "path_column": "path", "require": {"qa_status": ' \
        '["PASS", "WARN"]}, "hold": {"qa_status": ["FAIL"]}, "missing": "wait"}' in out.stdout


@pytest.mark.parametrize(("record", "key", "reason"), [
    ({"table": "mosaics; DROP TABLE x"}, "record.table", "an SQL identifier"),
    ({"path_column": "1path"}, "record.path_column", "an SQL identifier"),
    ({"path_column": None}, "record.path_column", "required"),
    ({"require": {"qa-status": "PASS"}}, "record.require.qa-status", "SQL identifier"),
    ({"require": {"qa_status": ""}}, "record.require.qa_status", "non-empty"),
    ({"hold": {"qa_status": []}}, "record.hold.qa_status", "non-empty"),
    ({"missing": "skip"}, "record.missing", '"wait" or "publish"'),
    ({"colour": "red"}, "record.colour", "unknown key"),
    ({"require": {"path": "x"}}, "record.require.path", "is the path_column"),
    ({"require": {"qa_status": ["PASS"]}, "hold": {"qa_status": ["PASS", "FAIL"]}},
     "record.hold.qa_status", "also in require"),
])
def test_a_bad_products_record_names_the_key_without_the_database(tmp_path, record, key,
                                                                   reason):
    record = {k: v for k, v in record.items() if v is not None}
    if "path_column" in record or key.endswith("path_column"):
        path = write_config(tmp_path / "c.toml", {}, [
            {"type": "mosaic", "glob": "mosaics/**/*.fits", "destination": "mosaics",
             "record": {"table": "mosaics", **record}}])
    else:
        path = _record_rule(tmp_path, **record)
    out = run_cli(path, "check-config")
    assert out.returncode == 2
    assert f"products[0].{key}" in out.stderr and reason in out.stderr, out.stderr
