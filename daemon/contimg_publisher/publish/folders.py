"""The folders a publish works in, opened safely: those of one batch (`Folders`) and those
of one published product's tidying (`StagedAndPublished`)."""

from __future__ import annotations

import os

from contimg_publisher import aliases, paths
from contimg_publisher.config import Config


def staged_in_archive(src_parent: int, products_root: bytes) -> bool:
    """Whether the staging folder `src_parent` is the products area or lies inside it, by
    device and inode along its parent chain (a bind mount of the archive into staging, or
    of a staging folder as the archive): then a rename or an unlink there would move or
    delete an archived file."""
    area = aliases.identity_of_path(products_root)
    return area is not None and aliases.lies_inside(src_parent, area)


class Folders:
    """The folders one batch works in, each opened once (from descriptors of the two roots,
    without following links; paths.DirCache, holding every folder until the batch ends)
    and all closed when the batch ends, so a folder renamed or replaced between batches is
    walked afresh."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stage_root = os.fsencode(str(config.stage_root))
        self.products_root = os.fsencode(str(config.products_root))
        self._roots: dict[bytes, int] = {}
        self._caches: dict[bytes, paths.DirCache] = {}
        self._same: dict[tuple[tuple[bytes, ...], tuple[bytes, ...]], bool] = {}
        self._taken: dict[tuple[bytes, ...], set[bytes]] = {}
        self._in_archive: dict[tuple[bytes, ...], bool] = {}

    def _cache(self, root: bytes, create_mode: int | None = None) -> paths.DirCache:
        cache = self._caches.get(root)
        if cache is None:
            fd = self._roots[root] = paths.open_root(root)
            cache = self._caches[root] = paths.DirCache(fd, limit=None,
                                                        create_mode=create_mode)
        return cache

    def source(self, folder: tuple[bytes, ...]) -> int:
        return self._cache(self.stage_root).folder(folder, verify=False)

    def source_in_archive(self, folder: tuple[bytes, ...]) -> bool:
        """Whether a staging folder lies inside the products area by device and inode (a
        bind mount or another alias made since the configuration was checked): nothing in
        it is ever renamed or removed."""
        if folder not in self._in_archive:
            self._in_archive[folder] = staged_in_archive(self.source(folder),
                                                         self.products_root)
        return self._in_archive[folder]

    def destination(self, folder: tuple[bytes, ...]) -> int:
        if self.products_root not in self._caches:
            os.makedirs(self.products_root, mode=self.config.dir_mode, exist_ok=True)
        return self._cache(self.products_root, self.config.dir_mode).folder(folder,
                                                                             verify=False)

    def same_filesystem(self, source: tuple[bytes, ...], destination: tuple[bytes, ...]
                        ) -> bool:
        key = (source, destination)
        if key not in self._same:
            self._same[key] = paths.same_filesystem(self.source(source),
                                                    self.destination(destination))
        return self._same[key]

    def taken(self, folder: tuple[bytes, ...]) -> set[bytes]:
        """Names in a destination folder that products of this batch are going to take."""
        return self._taken.setdefault(folder, set())

    def close(self) -> None:
        for cache in self._caches.values():
            cache.close()
        for fd in self._roots.values():
            os.close(fd)
        self._caches.clear()
        self._roots.clear()


class StagedAndPublished:
    """The staged product's folder and the published product's folder, opened safely for
    the tidying of one product; a missing one is -1."""

    def __init__(self, stage_root: bytes, parts: tuple[bytes, ...], published: bytes,
                 products_root: bytes) -> None:
        self.stage_fd = paths.open_root(stage_root)
        self.src_parent = self.dest_fd = -1
        try:
            self.src_parent = paths.open_dir_under(self.stage_fd, parts[:-1])
            if staged_in_archive(self.src_parent, products_root):
                os.close(self.src_parent)  # an alias of the archive: nothing is tidied there
                self.src_parent = -1
                return
            self.dest_fd = os.open(os.path.dirname(published),
                                   os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError, paths.UnsafePath):
            pass

    def __enter__(self) -> StagedAndPublished:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in (self.dest_fd, self.src_parent, self.stage_fd):
            if fd >= 0:
                os.close(fd)
