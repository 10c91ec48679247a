"""A product's sidecars: found beside the staged product, and taken to their final names
before the product takes its own, so that a product never appears without them."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable

from contimg_publisher import paths, rules, transfer
from contimg_publisher.config import ProductRule
from contimg_publisher.publish.context import Context
from contimg_publisher.publish.naming import Sidecar, temp_token
from contimg_publisher.publish.sources import no_writer
from contimg_publisher.registry import Product
from contimg_publisher.states import FailureKind
from contimg_publisher.transfer import PublishFailure


def staged_sidecars(ctx: Context, src_parent: int, staged_name: bytes, rule: ProductRule
           ) -> list[Sidecar]:
    """Sidecars present beside the staged product (regular files only)."""
    out = []
    for sidecar in rules.sidecar_names(os.fsdecode(staged_name), rule):
        raw = os.fsencode(sidecar)
        try:
            st = os.stat(raw, dir_fd=src_parent, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            out.append(Sidecar(raw))
        else:
            ctx.warn("sidecar_skipped", sidecar=paths.display(raw),
                     reason=f"is {paths.type_name(st.st_mode)}, not a regular file")
    return out


def move_sidecar(ctx: Context, src_parent: int, dest_fd: int, staging_folder: bytes, sc: Sidecar,
         product: Product) -> None:
    """One sidecar on one filesystem: renamed when it has no other name, else copied."""
    fd = os.open(sc.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                 dir_fd=src_parent)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PublishFailure(
                FailureKind.SOURCE_CHANGED, f"sidecar {paths.display(sc.name)}: "
                "is no longer a regular file")
        if st.st_nlink != 1:
            copy_sidecar(ctx, dest_fd, sc, fd, product, "sha256", None)
            return
        no_writer(ctx.gate, fd, os.path.join(staging_folder, sc.name), paths.display(sc.name))
        try:
            transfer.rename_checked(src_parent, sc.name, fd, dest_fd, sc.dest_name,
                                    paths.display(sc.name))
        except FileExistsError:
            # The same bytes are there already (choose_name made sure); the staged
            # copy goes with the source.
            return
        os.fchmod(fd, ctx.config.file_mode)
        sc.placed = True
    finally:
        os.close(fd)


def copy_sidecar(ctx: Context, dest_fd: int, sc: Sidecar, fd: int, product: Product, algorithm: str,
         cancel: threading.Event | None) -> None:
    """One sidecar copied on its own, its temporary name removed if the copy fails."""
    temps: list[bytes] = []
    try:
        copy_sidecar_to(ctx, fd, dest_fd, sc, product, algorithm, temps, cancel, lambda: None,
                        temp_token(ctx.config, product))
    finally:
        for temp in temps:
            with contextlib.suppress(OSError):
                paths.remove_tree_under(dest_fd, temp)


def copy_sidecar_to(ctx: Context, fd: int, dest_fd: int, sc: Sidecar, product: Product,
            algorithm: str, temps: list[bytes], cancel: threading.Event | None,
            tick: Callable[[], None], token: str) -> None:
    """A sidecar through a temporary name to its final name, never replacing one; its
    temporary name carries the attempt's token (that of the product's own temporary
    name, which the row records), so that a sweep by another daemon of this node
    knows it for a live publish's. The caller removes what is left in `temps`."""
    sc_temp = paths.temp_name(sc.dest_name, token)
    temps.append(sc_temp)
    transfer.copy_file(fd, dest_fd, sc_temp, algorithm, ctx.config.file_mode, cancel, tick)
    no_writer(ctx.gate, fd, os.path.join(os.path.dirname(product.stage_bytes), sc.name),
              paths.display(sc.name))
    try:
        paths.rename_noreplace(dest_fd, sc_temp, dest_fd, sc.dest_name)
    except FileExistsError:
        # Left by an interrupted attempt of this same product: keep the copy that
        # is already there when it holds the same bytes.
        if not transfer.files_equal(dest_fd, sc_temp, sc.dest_name, algorithm):
            raise PublishFailure(FailureKind.OTHER, f"sidecar {paths.display(sc.dest_name)} "
                                 "exists with other content") from None
        paths.remove_tree_under(dest_fd, sc_temp)
    temps.remove(sc_temp)
