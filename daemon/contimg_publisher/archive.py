"""Find a product's published copy in the products area, and prove it is the product.

The pipeline's own code re-registers a product with INSERT OR REPLACE, which gives its row
a new id and resets every other column: the row says `staging` again, without the
published path, size or checksum this program recorded, while its staged file is long gone
into the archive. The record of each publish this program keeps apart (publish_log) still
names the copy and its checksum; the copy is hashed again before the row is described from
it, so a row is only ever called published on the word of the bytes on disk.
"""

from __future__ import annotations

import contextlib
import os

from contimg_publisher import kinds, paths, rules
from contimg_publisher.config import Config, ProductRule
from contimg_publisher.registry import Product, PublishRecord, RegistryBackend


def find_published(config: Config, registry: RegistryBackend, row: Product) -> PublishRecord | None:
    """The newest publish of this product (by its id or its staged path) whose copy is in
    the archive with the recorded bytes; None when there is none."""
    rule = rules.owner_rule(config, row.data_type, row.stage_bytes)
    if rule is None:
        return None
    for record in registry.publish_records(row.data_id, row.stage_path):
        if record.data_type == row.data_type and record.stage_path == row.stage_path and \
                verified(config, rule, record):
            return record
    return None


def verified(config: Config, rule: ProductRule, record: PublishRecord) -> bool:
    """Whether the recorded copy is under products_root, reached without following links,
    and holds exactly the recorded bytes."""
    if record.checksum is None:
        return False
    root = os.fsencode(str(config.products_root))
    try:
        parts = paths.relative_components(root, paths.undisplay(record.published_path))
    except paths.UnsafePath:
        return False
    if not parts:
        return False
    root_fd = folder_fd = -1
    try:
        root_fd = paths.open_root(root)
        folder_fd = paths.open_dir_under(root_fd, parts[:-1])
        return kinds.of(rule).same_content(folder_fd, parts[-1], record.size_bytes,
                                           record.checksum)
    except (OSError, paths.UnsafePath):
        return False
    finally:
        for fd in (folder_fd, root_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
