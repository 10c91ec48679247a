"""Fixtures shared by several test modules, and the test tiers.

Tiers are markers (declared in pyproject.toml): `root` (mounts, other users, sysctls),
`postgres` (a real PostgreSQL server), `systemd` (journald, systemd-analyze, systemd as
PID 1 in a container), `slow` (more than about 5 s). `./.ci/dev test -m "not slow"` is
the quick round; `./.ci/dev test` and CI run everything. A `root` test is skipped, with
its reason, where the tests do not run as root."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Sandbox, is_root, mount_tmpfs, umount

# Fixtures that start PostgreSQL (tests/pg.py), and modules that drive systemd's own tools.
POSTGRES_FIXTURES = {"pg_server", "pg_template"}
SYSTEMD_MODULES = {"test_systemd_boot", "test_systemd_unit", "test_journald", "test_package"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The postgres and systemd tiers follow from what a test uses, so that a new test
    that starts PostgreSQL, or drives systemd, is in its tier without being told."""
    for item in items:
        if POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in \
                SYSTEMD_MODULES:
            item.add_marker(pytest.mark.systemd)


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("root")
    if marker is not None and not is_root():
        why = marker.args[0] if marker.args else "it changes the machine"
        pytest.skip(f"needs root: {why}")


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    """A staging area, a products area and a registry in the test's folder; the status
    server off, a 0.5 s settle time."""
    return Sandbox(tmp_path, detect={"settle_seconds": 0.5, "rescan_seconds": 300},
                   metrics={"enabled": False})


@pytest.fixture(params=["same_fs", "across"])
def sandbox_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox whose products area is on the staging area's filesystem, or on a tmpfs of
    its own (the test then runs once each way)."""
    if request.param == "same_fs":
        yield Sandbox(tmp_path)
        return
    if not is_root():
        pytest.skip("mounting a tmpfs for the products area needs root")
    products = tmp_path / "products"
    mount_tmpfs(products, "256m")
    try:
        yield Sandbox(tmp_path, products_root=products)
    finally:
        umount(products)
