#!/usr/bin/python3
"""Split requirements.lock into what the package's virtual environment needs.

requirements.lock pins the runtime, the test tools (pytest, ruff, mypy) and the build
tools (.ci/build.in: pip, setuptools), each with its hashes. The package ships only the
runtime: the project's [project].dependencies and everything the lock says they pull
in ("# via" lines, written by uv), found by walking those lines to a fixed point.
Writes OUT_DIR/build-tools.lock (installed first: systemd-python is built from its
source without build isolation, with the locked setuptools) and OUT_DIR/runtime.lock,
each entry with the lock's own hashes. Standard library only (Debian's python3).

usage: runtime-lock.py requirements.lock pyproject.toml .ci/build.in OUT_DIR
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = NAME.match(spec.strip())
    if match is None:
        raise SystemExit(f"runtime-lock: cannot read a package name from {spec!r}")
    return norm(match.group(1))


def parse_lock(text: str) -> dict[str, tuple[list[str], set[str]]]:
    """name -> (the entry's requirement lines, the names it is pulled in by)."""
    entries: dict[str, tuple[list[str], set[str]]] = {}
    current: str | None = None
    in_via = False
    for line in text.splitlines():
        if NAME.match(line):
            current = requirement_name(line)
            entries[current] = ([line], set())
            in_via = False
            continue
        if current is None:
            continue
        stripped = line.strip()
        if stripped.startswith("--hash="):
            entries[current][0].append(line)
            continue
        via = re.match(r"^#\s+via\s*(.*)$", stripped)
        if via:
            in_via = True
            if via.group(1):
                entries[current][1].add(via.group(1).strip())
            continue
        more = re.match(r"^#\s{2,}(\S.*)$", stripped)
        if more and in_via:
            entries[current][1].add(more.group(1).strip())
            continue
        in_via = False
    return entries


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    lock, pyproject, build_in, out = (Path(a) for a in argv[1:])
    entries = parse_lock(lock.read_text())
    roots = {requirement_name(d) for d in
             tomllib.loads(pyproject.read_text())["project"]["dependencies"]}
    tools = {requirement_name(line) for line in build_in.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")}
    missing = sorted((roots | tools) - entries.keys())
    if missing:
        print(f"runtime-lock: {lock} pins nothing for {', '.join(missing)}; run .ci/dev lock",
              file=sys.stderr)
        return 1
    needed = set(roots)
    while True:
        more = {name for name, (_, via) in entries.items()
                if name not in needed and any(norm(v) in needed for v in via)}
        if not more:
            break
        needed |= more
    out.mkdir(parents=True, exist_ok=True)
    header = f"# Generated from {lock.name} by runtime-lock.py; hashes as locked.\n--require-hashes\n"
    for path, names in ((out / "build-tools.lock", tools), (out / "runtime.lock", needed - tools)):
        body = "".join("\n".join(entries[n][0]) + "\n" for n in sorted(names))
        path.write_text(header + body)
        print(f"runtime-lock: {path}: {', '.join(sorted(names))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
