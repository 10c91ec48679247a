"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Sandbox, is_root, mount_tmpfs, umount


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
