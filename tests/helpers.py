"""Shared test helpers: sandboxes with real folders, real FITS files, the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
import pytest
from astropy.io import fits

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def write_config(path: Path, tables: dict[str, dict[str, Any]],
                 products: list[dict[str, Any]] | None = None) -> Path:
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    for rule in products or []:
        lines.append("[[products]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in rule.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


class Sandbox:
    """A staging area, a products area and a registry in a temporary folder."""

    def __init__(self, root: Path, products_root: Path | None = None, **overrides: Any) -> None:
        self.root = root
        self.stage = root / "stage"
        self.products = products_root or root / "products"
        self.registry = root / "state" / "registry.sqlite3"
        self.mosaics = self.stage / "mosaics"
        self.mosaics.mkdir(parents=True, exist_ok=True)
        self.products.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "config.toml"
        self.tables: dict[str, dict[str, Any]] = {
            "paths": {"stage_root": str(self.stage), "products_root": str(self.products),
                      "registry": str(self.registry)},
            "detect": {"settle_seconds": 0.3, "rescan_seconds": 300},
            "publish": {"backoff_initial_seconds": 1, "backoff_max_seconds": 10,
                        "lock_wait_seconds": 30,
                        # test disks are small tmpfs mounts: no margin beyond each copy
                        "min_free_bytes": 0},
            "log": {"format": "json", "level": "debug"},
            # a port of its own: two test runs (or a daemon of `.ci/dev run`) never collide
            "metrics": {"listen": "127.0.0.1:0"},
        }
        self.products_rules: list[dict[str, Any]] | None = None
        self.update(**overrides)

    def update(self, products: list[dict[str, Any]] | None = None, **tables: dict[str, Any]
               ) -> None:
        for table, values in tables.items():
            self.tables.setdefault(table, {}).update(values)
        if products is not None:
            self.products_rules = products
        write_config(self.config_path, self.tables, self.products_rules)

    def config(self):  # noqa: ANN201 - the Config type, imported lazily
        from contimg_publisher import config
        return config.load(self.config_path)

    def cli(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        return run_cli(self.config_path, *args, timeout=timeout, env=env, check=check)

    def registry_rows(self) -> list[dict[str, Any]]:
        out = self.cli("list", "--json", "--limit", "0", check=True)
        return json.loads(out.stdout)

    def row(self, data_id: str) -> dict[str, Any] | None:
        out = self.cli("show", data_id, "--json")
        return json.loads(out.stdout) if out.returncode == 0 else None


# The `tmpfs` fixture (tests/conftest.py): tmpfs(path, size) mounts one there, returns path.
MountTmpfs = Callable[[Path, str], Path]
# The `loop_ext4` fixture: loop_ext4(path, image, size_mb=64, options="") mounts an ext4.
MountExt4 = Callable[..., Path]


class MakeSandbox(Protocol):
    """The `make_sandbox` fixture (tests/conftest.py): a Sandbox in the test's folder, or in
    `folder` under it, with the given config tables over the Sandbox's defaults."""

    def __call__(self, folder: str = "", products_root: Path | None = None,
                 **tables: Any) -> Sandbox: ...


def run_cli(config_path: Path, *args: str, timeout: float = 120,
            env: dict[str, str] | None = None, check: bool = False
            ) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.pop("NOTIFY_SOCKET", None)
    full_env.pop("WATCHDOG_USEC", None)
    full_env.update(env or {})
    proc = subprocess.run([PYTHON, "-m", "contimg_publisher", "--config", str(config_path),
                           *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"contimg-publisher {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def mosaic_hdu(pixels: int = 64, seed: int = 0) -> fits.PrimaryHDU:
    rng = np.random.default_rng(seed)
    hdu = fits.PrimaryHDU(rng.normal(0, 1e-4, size=(pixels, pixels)).astype(np.float32))
    hdu.header["OBJECT"] = f"MOSAIC{seed}"
    hdu.header["BUNIT"] = "Jy/beam"
    hdu.header["NIMAGES"] = 10
    hdu.header["MEDRMS"] = 1e-4
    hdu.header["CRVAL1"] = 180.0
    hdu.header["CRVAL2"] = 37.0
    return hdu


def write_fits(path: Path, pixels: int = 64, seed: int = 0, checksum: bool = True) -> bytes:
    """A valid mosaic written in place, as the pipeline does; returns its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mosaic_hdu(pixels, seed).writeto(path, overwrite=True, checksum=checksum)
    return path.read_bytes()


def fits_bytes(pixels: int = 64, seed: int = 0, checksum: bool = True) -> bytes:
    import io
    buf = io.BytesIO()
    mosaic_hdu(pixels, seed).writeto(buf, checksum=checksum)
    return buf.getvalue()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now (the OS picked it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def is_root() -> bool:
    return os.geteuid() == 0


def skip_with(reason: str) -> NoReturn:
    """Skip the test, printing the reason too: it stands in the test's captured output
    beside the skip summary, so a skipped check is never mistaken for a passed one."""
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def need_root(why: str) -> None:
    if not is_root():
        skip_with(f"needs root: {why}")


def find_tool(name: str) -> str | None:
    """A command on PATH, or in /usr/bin or /usr/sbin (root's PATH may lack them)."""
    return shutil.which(name) or next(
        (path for path in (f"/usr/bin/{name}", f"/usr/sbin/{name}")
         if os.access(path, os.X_OK)), None)


def need_tool(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        skip_with(f"{name} is not installed (Debian package {package})")
    return path


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True)


def mount_ext4(path: Path, image: Path, size_mb: int = 64, options: str = "") -> None:
    """A small ext4 filesystem on a loop device at `path` (root): unlike a tmpfs it has the
    immutable and append-only flags, and ext4's own reaction to errors."""
    subprocess.run(["truncate", "-s", f"{size_mb}M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", ",".join(filter(None, ["loop", options])), str(image),
                    str(path)], check=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


def start_daemon(sandbox: Sandbox, notify_path: Path | None = None,
                 watchdog_usec: int | None = None, extra_env: dict[str, str] | None = None,
                 prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """`run` as a real process, its log (JSON lines) appended to daemon.log in the sandbox."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    if notify_path is not None:
        env["NOTIFY_SOCKET"] = str(notify_path)
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    env.update(extra_env or {})
    log = open(sandbox.root / "daemon.log", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([*prefix, PYTHON, "-m", "contimg_publisher", "--config",
                             str(sandbox.config_path), "run"], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen[Any]) -> int:
    """SIGTERM, then the exit status (SIGKILL after 30 s)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def log_events(sandbox: Sandbox) -> list[dict[str, Any]]:
    """The daemon's JSON log lines; other lines (tracebacks) are skipped."""
    events = []
    for line in (sandbox.root / "daemon.log").read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events
