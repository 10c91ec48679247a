"""Where a product publishes: its destination folder and final name (a versioned one when
the name is taken), its sidecars' names beside it, and the reservation of a folder
product's name in the registry."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass

from contimg_publisher import kinds, paths, rules, transfer
from contimg_publisher.config import Config, ProductRule
from contimg_publisher.registry import Product, RegistryBackend
from contimg_publisher.states import FailureKind
from contimg_publisher.transfer import PublishFailure


def rule_for(config: Config, data_type: str) -> ProductRule | None:
    return next((r for r in config.products if r.type == data_type), None)


def destination(config: Config, rule: ProductRule, parts: tuple[bytes, ...]
                ) -> tuple[tuple[bytes, ...], bytes]:
    """(folder components under products_root, name) where a staged product publishes."""
    base = len(rule.base.parts)
    sub = parts[base:] if len(parts) > base else parts[-1:]
    folder = tuple(os.fsencode(p) for p in rule.destination.split("/") if p) + tuple(sub[:-1])
    return folder, sub[-1]


def versioned(name: bytes, rule: ProductRule, version: int) -> bytes:
    """nightly.fits -> nightly.v2.fits (the suffix the rule's glob names is kept)."""
    if version <= 1:
        return name
    text = os.fsdecode(name)
    stem = rules.stem_of(text, rule)
    return os.fsencode(f"{stem}.v{version}{text[len(stem):]}")


def sidecar_destination(sidecar: bytes, staged_name: bytes, final_name: bytes,
                        rule: ProductRule) -> bytes:
    """The published name of a sidecar: the product's staged stem in it becomes the stem of
    the name the product publishes under (a.png -> a.v2.png beside a.v2.fits)."""
    staged_stem = rules.stem_of(os.fsdecode(staged_name), rule)
    final_stem = rules.stem_of(os.fsdecode(final_name), rule)
    return os.fsencode(os.fsdecode(sidecar).replace(staged_stem, final_stem, 1))


def joined_path(root: bytes, folder: tuple[bytes, ...], name: bytes) -> bytes:
    """The path of `name` in `folder` (its parts below `root`), as bytes."""
    return os.path.join(root, *folder, name)


def temp_token(config: Config, product: Product) -> str:
    """The token of this node's temporary names for a product's publish: the product's own
    temporary name and its sidecars' carry it, so a sweep knows them for a live publish's."""
    return paths.temp_token(config.node_name, product.id)


@dataclass
class Sidecar:
    """A sidecar's staged name and the name it publishes under. `placed`: already at that
    name (an interrupted attempt, or this one's rename, moved it there): the one field a
    publish changes."""

    name: bytes
    dest_name: bytes = b""
    placed: bool = False


class Reservation:
    """The final names one folder product's publish reserves in the registry while it
    chooses its name (RegistryBackend.reserve_name): the one it got, and those that other
    products' publishes held."""

    def __init__(self, registry: RegistryBackend, owner: str, product: Product, root: bytes,
                 folder: tuple[bytes, ...]) -> None:
        self.registry, self.owner, self.product = registry, owner, product
        self.root, self.folder = root, folder
        self.mine: str | None = None
        self.refused: list[tuple[str, str]] = []  # (published path, the holder's data_id)

    def take(self, name: bytes) -> bool:
        path = paths.display(joined_path(self.root, self.folder, name))
        holder = self.registry.reserve_name(path, self.product.data_id, self.owner,
                                            token=self.product.claim_token)
        if holder is None:
            self.mine = path
            return True
        self.refused.append((path, holder))
        return False


def choose_name(src_parent: int, dest_fd: int, name: bytes, rule: ProductRule,
                product: Product, sidecars: list[Sidecar], taken: Collection[bytes] = (),
                reservation: Reservation | None = None) -> tuple[bytes, int, bool]:
    """(final name, its version, whether it already holds these bytes): the first of name,
    name.v2, ... that is free or already holds these bytes.

    A name is free when neither it nor its sidecars' names exist, or when the sidecars
    there hold exactly the staged sidecars' bytes: an interrupted attempt of this same
    product moved them first (they go before the product, so that a product never
    appears without them). With a reservation (a folder product), a free name must also
    be reserved in the registry for this product: one that another product's publish
    reserved first is taken, though nothing is there yet."""
    for version in range(1, 10_000):
        candidate = versioned(name, rule, version)
        if candidate in taken:
            continue
        if not transfer.exists(dest_fd, candidate):
            if all(transfer.files_equal_across(src_parent, s.name, dest_fd,
                                               sidecar_destination(s.name, name, candidate,
                                                                   rule))
                   for s in sidecars
                   if transfer.exists(dest_fd,
                                      sidecar_destination(s.name, name, candidate, rule))):
                if reservation is not None and not reservation.take(candidate):
                    continue
                return candidate, version, False
            continue
        if kinds.of(rule).same_content(dest_fd, candidate, product.size_bytes,
                                       product.checksum):
            return candidate, version, True
    raise PublishFailure(
        FailureKind.OTHER, f"{paths.display(name)}: 10,000 versions already exist")


def already_placed(dest_fd: int, src_parent: int, staged_name: bytes, final: bytes,
                   rule: ProductRule, product: Product, staged: list[Sidecar]
                   ) -> list[Sidecar]:
    """Sidecars that the row's last plan named and an interrupted rename already moved to
    the destination (gone from staging, there under this final name's stem)."""
    have = {s.dest_name for s in staged}
    out = []
    for planned in product.sidecars:
        dest = os.fsencode(planned)
        if dest in have or os.sep.encode() in dest:
            continue
        original = sidecar_destination(dest, final, staged_name, rule)
        if sidecar_destination(original, staged_name, final, rule) != dest or \
                transfer.exists(src_parent, original):
            continue
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISREG(os.stat(dest, dir_fd=dest_fd, follow_symlinks=False).st_mode):
                out.append(Sidecar(original, dest, placed=True))
    return out


def name_lost(published_path: str | None) -> PublishFailure:
    """The final name was free when chosen and taken when renamed to: another node's (or
    process's) publish of another product took it in between, and the no-replace rename
    kept it. Nothing about this product failed: an `interrupted` attempt, not counted and
    due again at once, whose next try chooses the name again (a later version)."""
    return PublishFailure(FailureKind.INTERRUPTED,
                          f"{published_path}: taken by another publish just before "
                          "this one's rename; the name is chosen again")
