"""The unit drop-in that lets the daemon reach its registry server and webhook over TCP.

The shipped unit allows the daemon local sockets only (RestrictAddressFamilies=AF_UNIX)
and loopback addresses only (IPAddressDeny=any, IPAddressAllow=localhost). A PostgreSQL
registry or a webhook on another host needs Internet sockets and its addresses: this
module names the hosts the config reaches, resolves them now, and writes the drop-in that
allows exactly those addresses, each under a comment naming its host. Addresses are fixed
when it is made, so it must be made again when one changes.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from contimg_publisher import redact
from contimg_publisher.config import Config

DROP_IN_PATH = "/etc/systemd/system/contimg-publisher.service.d/network.conf"
MAX_HOSTS = 64  # a libpq URI lists its hosts; more than this is a mistake, not a cluster

Resolver = Callable[[str], Iterable[str]]


class DropInError(Exception):
    """A host of the config cannot be turned into addresses (named, with the reason)."""


@dataclass(frozen=True)
class Target:
    """One host the daemon connects to over TCP, and what for."""

    what: str    # "registry" or "webhook ([notify] url)"
    shown: str   # the URL, without secrets
    host: str    # a name or a literal address, as configured


def _split_hosts(netloc: str) -> list[str]:
    """The hosts of a libpq URI's authority (user@h1:5432,[::1]:5433,h3), ports dropped."""
    hosts = []
    for part in netloc.rpartition("@")[2].split(","):
        if part.startswith("["):
            hosts.append(part[1:part.find("]")] if "]" in part else part[1:])
        else:
            hosts.append(part.partition(":")[0])
    return [urllib.parse.unquote(h) for h in hosts]


def postgres_hosts(uri: str) -> list[str]:
    """The TCP hosts a libpq connection URI names: `hostaddr=` when given (libpq connects
    there), else the authority's hosts and `host=`; socket folders (a leading /) and an
    empty host (the default local socket) are not TCP and are left out."""
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qs(parts.query)
    listed = [h for value in query.get("hostaddr", []) for h in value.split(",")]
    if not listed:
        listed = _split_hosts(parts.netloc) + [
            h for value in query.get("host", []) for h in value.split(",")]
    hosts = [h.strip() for h in listed if h.strip() and not h.strip().startswith("/")
             and not h.strip().startswith("@")]
    if len(hosts) > MAX_HOSTS:
        raise DropInError(f"the registry URI names {len(hosts)} hosts; at most {MAX_HOSTS}")
    return list(dict.fromkeys(hosts))


def targets(cfg: Config) -> list[Target]:
    out = []
    if isinstance(cfg.registry, str):
        out += [Target("registry", cfg.registry_shown, h) for h in postgres_hosts(cfg.registry)]
    if cfg.notify_url:
        host = urllib.parse.urlsplit(cfg.notify_url).hostname
        if host:
            out.append(Target("webhook ([notify] url)", redact.url(cfg.notify_url), host))
    return out


def resolve(host: str) -> list[str]:
    """Every address `host` has now (a literal address is itself), without scope ids."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DropInError(f"{host!r} does not resolve: {exc.strerror}") from None
    return [str(info[4][0]).partition("%")[0] for info in infos]


def _sorted(addresses: Iterable[str]) -> list[str]:
    found = {ipaddress.ip_address(a) for a in addresses}
    return [str(a) for a in sorted(found, key=lambda a: (a.version, a))]


def drop_in(cfg: Config, resolver: Resolver = resolve, now: float | None = None) -> str:
    """The drop-in's text; DropInError when a host does not resolve."""
    now = time.time() if now is None else now
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    lines = ["# contimg-publisher.service drop-in, printed by `contimg-publisher check-config "
             "--unit-drop-in`",
             f"# from {cfg.source} at {when}. The addresses below were resolved then: print",
             "# it again, then `systemctl daemon-reload` and `systemctl restart "
             "contimg-publisher`,",
             "# whenever one of these hosts changes address.",
             f"# Install it as {DROP_IN_PATH}"]
    found = targets(cfg)
    notes = []
    if cfg.notify_command:
        notes.append("# [notify] command: the hosts a command reaches are not known here; it "
                     "runs under this unit,")
        notes.append("# so add IPAddressAllow= lines for them (and the AF_INET line) by hand.")
    if not found:
        return "\n".join([*lines, "# Nothing to add: the registry and the webhook need no "
                          "Internet socket (an SQLite file,", "# a PostgreSQL socket folder, "
                          "no [notify] url).", *notes]) + "\n"
    lines += ["[Service]",
              "# TCP for the hosts below; the unit alone allows local sockets only.",
              "RestrictAddressFamilies=AF_INET AF_INET6"]
    for target in found:
        addresses = _sorted(resolver(target.host))
        if not addresses:
            raise DropInError(f"{target.host!r} ({target.what}) has no address")
        remote = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
        local = [a for a in addresses if ipaddress.ip_address(a).is_loopback]
        lines.append(f"# {target.what}, host {target.host}: {target.shown}")
        if remote:
            lines.append("IPAddressAllow=" + " ".join(remote))
        if local:
            lines.append(f"# ({' '.join(local)}: loopback, which the unit already allows)")
    return "\n".join([*lines, *notes]) + "\n"
