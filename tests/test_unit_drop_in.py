"""`check-config --unit-drop-in`: the drop-in that lets the shipped unit reach a remote
registry and webhook, allowing exactly their addresses.

The command runs in namespaces of its own (root): a mount namespace where /etc/hosts is
the test's, and an empty network namespace, so a name not in that file fails at once and
no lookup leaves the machine. The addresses are documentation ones (RFC 5737, 3849):
nothing connects to them here. The booted-systemd test (test_systemd_network) shows the
drop-in doing its job.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from contimg_publisher import unitnet
from contimg_publisher.config import from_mapping, load
from tests.helpers import PYTHON, REPO, need_root, write_config

UNIT = REPO / "systemd" / "contimg-publisher.service"
HOSTS = """127.0.0.1 localhost
192.0.2.10 dbhost.contimg.test
192.0.2.11 hooks.contimg.test
2001:db8::11 hooks.contimg.test
"""


def _config(tmp_path: Path, registry: str, url: str | None = None,
            command: list[str] | None = None) -> Path:
    tables: dict = {"paths": {"stage_root": str(tmp_path / "stage"),
                              "products_root": str(tmp_path / "products"),
                              "registry": registry}}
    if url or command:
        tables["notify"] = {k: v for k, v in (("url", url), ("command", command)) if v}
    return write_config(tmp_path / "config.toml", tables)


def _drop_in_with_hosts(tmp_path: Path, config: Path, unshare: str
                        ) -> subprocess.CompletedProcess[str]:
    """The command, run where /etc/hosts is the test's and there is no network."""
    need_root("binding a hosts file over /etc/hosts (mount and network namespaces)")
    hosts = tmp_path / "hosts"
    hosts.write_text(HOSTS)
    script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
    env = dict(os.environ, PYTHONPATH=str(REPO / "daemon"))
    return subprocess.run([unshare, "--mount", "--net", "--propagation", "private",
                           "sh", "-c", script, "sh", str(hosts), PYTHON, "-m",
                           "contimg_publisher", "--config", str(config), "check-config",
                           "--unit-drop-in"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO)


def _allowed(text: str) -> list[tuple[str, str]]:
    """(comment naming the host, addresses) for each IPAddressAllow= line."""
    lines = text.splitlines()
    return [(lines[i - 1], line.split("=", 1)[1]) for i, line in enumerate(lines)
            if line.startswith("IPAddressAllow=")]


@pytest.mark.root("binding a hosts file over /etc/hosts (mount and network namespaces)")
def test_drop_in_allows_exactly_the_registry_and_webhook_addresses(tmp_path: Path,
                                                                  unshare: str) -> None:
    config = _config(tmp_path, "postgresql://contimg:DB-PW@dbhost.contimg.test/contimg",
                     url="https://hooks.contimg.test:8443/in?token=T0KEN")
    out = _drop_in_with_hosts(tmp_path, config, unshare)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "[Service]" in text
    assert re.search(r"^RestrictAddressFamilies=AF_INET AF_INET6$", text, flags=re.M)
    assert _allowed(text) == [
        ("# registry, host dbhost.contimg.test: "
         "postgresql://contimg:***@dbhost.contimg.test/contimg", "192.0.2.10"),
        ("# webhook ([notify] url), host hooks.contimg.test: "
         "https://hooks.contimg.test:8443/in?token=***", "192.0.2.11 2001:db8::11")]
    assert "DB-PW" not in text and "T0KEN" not in text
    assert "whenever one of these hosts changes address" in text


@pytest.mark.root("binding a hosts file over /etc/hosts (mount and network namespaces)")
def test_drop_in_for_literal_addresses_and_several_hosts(tmp_path: Path, unshare: str) -> None:
    registry = ("postgresql://contimg@192.0.2.20:5432,[2001:db8::20]:5433,dbhost.contimg.test"
                "/contimg?host=/run/postgresql")
    config = _config(tmp_path, registry, url="http://198.51.100.7/hook")
    out = _drop_in_with_hosts(tmp_path, config, unshare)
    assert out.returncode == 0, out.stderr
    assert [a for _, a in _allowed(out.stdout)] == ["192.0.2.20", "2001:db8::20", "192.0.2.10",
                                                     "198.51.100.7"]
    # The socket folder is not a TCP host: nothing for it.
    assert "host /run/postgresql" not in out.stdout


def test_generated_drop_in_is_accepted_by_systemd(tmp_path: Path,
                                                   systemd_analyze: str) -> None:
    config = _config(tmp_path, "postgresql://contimg@192.0.2.20/contimg",
                     url="http://[2001:db8::7]:8080/hook")
    units = tmp_path / "units"
    (units / "contimg-publisher.service.d").mkdir(parents=True)
    (units / UNIT.name).write_text(re.sub(r"^ExecStart=.*$", "ExecStart=/bin/true",
                                          UNIT.read_text(), flags=re.M))
    text = unitnet.drop_in(load(config))
    (units / "contimg-publisher.service.d" / "network.conf").write_text(text)
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{units}:")
    out = subprocess.run([systemd_analyze, "verify", "--man=no", str(units / UNIT.name)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
    shown = subprocess.run([systemd_analyze, "security", "--offline=yes", str(units / UNIT.name)],
                           capture_output=True, text=True, env=env).stdout
    # The drop-in took: the unit now may open Internet sockets, to non-local addresses.
    assert "Service defines IP address allow list with non-localhost entries" in shown, shown
    assert re.search("\u2717 RestrictAddressFamilies=~AF_\\(INET\\|INET6\\)", shown), shown


def test_postgres_hosts_of_libpq_uris() -> None:
    hosts = unitnet.postgres_hosts
    assert hosts("postgresql://contimg@dbhost/contimg") == ["dbhost"]
    assert hosts("postgresql://u:p@h1:5432,[::1]:5433,h3/db") == ["h1", "::1", "h3"]
    assert hosts("postgresql:///contimg?host=/run/postgresql") == []
    assert hosts("postgresql:///contimg?host=%2Fvar%2Frun%2Fpostgresql") == []
    assert hosts("postgresql://%2Frun%2Fpostgresql/contimg") == []
    assert hosts("postgresql:///db?host=a,b&hostaddr=192.0.2.1,192.0.2.2") == \
        ["192.0.2.1", "192.0.2.2"]


def test_nothing_to_add_and_a_name_that_does_not_resolve(tmp_path: Path, unshare: str) -> None:
    cfg = from_mapping({"paths": {"registry": str(tmp_path / "r.sqlite3")},
                        "notify": {"command": ["/usr/local/bin/tell"]}})
    text = unitnet.drop_in(cfg)
    assert "[Service]" not in text and "Nothing to add" in text
    assert "[notify] command" in text  # what the operator must add by hand

    def nowhere(host: str) -> list[str]:
        raise unitnet.DropInError(f"{host!r} does not resolve: Name or service not known")
    cfg = from_mapping({"paths": {"registry": "postgresql://contimg@nohost.invalid/contimg"}})
    with pytest.raises(unitnet.DropInError, match="nohost.invalid"):
        unitnet.drop_in(cfg, resolver=nowhere)
    config = _config(tmp_path, "postgresql://contimg@nohost.contimg.test/contimg")
    out = _drop_in_with_hosts(tmp_path, config, unshare)
    assert out.returncode == 1 and out.stdout == ""
    assert "nohost.contimg.test" in out.stderr and "no drop-in printed" in out.stderr
