"""Where the configured roots are, and which rows lie under which root.

A row registered under a staging root the configuration no longer names is never looked at
by the daemon (its folder is not watched, and nothing there may be moved away): such a row
must stay in an operator's state, with the reason, rather than wait silently.
"""

from __future__ import annotations

import os

from contimg_publisher import paths
from contimg_publisher.config import Config
from contimg_publisher.registry import Product


def registered_elsewhere(config: Config, row: Product) -> str | None:
    """Why `retry` leaves this row as it is: a product of one of this configuration's types,
    described by this program on this node, whose staged file is not under
    `[paths] stage_root` (the root changed since it was registered). None: it may wait."""
    if row.data_type not in {rule.type for rule in config.products}:
        return None  # another writer's row: the daemon never looks at it anyway
    if row.identity is None:
        return None  # registered by another program, which finds it where it left it
    if row.node is not None and row.node != config.node_name:
        return None  # another node's staging area, whose daemon looks at it
    try:
        paths.relative_components(os.fsencode(str(config.stage_root)), row.stage_bytes)
        return None
    except paths.UnsafePath:
        pass
    was = row.base_path or os.path.dirname(row.stage_path)
    return (f"registered under {was} ({row.stage_path}), but [paths] stage_root is "
            f"{config.stage_root}: if it waited again nothing would ever look at it. Move the "
            f"file under {config.stage_root} (it is found and published again), or set "
            f"[paths] stage_root back to {was} and run retry again; it stays {row.status}")
