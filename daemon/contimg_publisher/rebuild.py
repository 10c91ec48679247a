"""Rebuild from the archive: rows for archived products that no row records.

A registry that was lost leaves the products area as the only record of what was
published. Each rule's destination folder is walked (no link followed); a name there that is
a product of the rule, as its staged counterpart would be (the destination's sub-path put
back below the glob's fixed prefix), and that no row or logged publish records, gets a row:
`published`, publish_mode 'rebuilt', its size and checksum computed from its bytes now, its
FITS header metadata, the sidecars beside it, and the data_id detection would give it.
A name detection would reject (a newline, an escape, bytes that are not UTF-8, ...) gets no
row: it is skipped and listed with the reason, as is content detection would reject.
Existing rows are never changed, and nothing on disk is.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from contimg_publisher import content, fits, paths, rules, treewalk
from contimg_publisher.config import Config, ProductRule
from contimg_publisher.registry import RebuildOutcome, Rebuilt, RegistryBackend
from contimg_publisher.states import Kind

_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_VERSION = re.compile(r"^(.*)\.v([2-9]|[1-9][0-9]+)$")


@dataclass
class Report:
    created: list[Rebuilt] = field(default_factory=list)
    recorded: int = 0                                             # already had a row
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)


def _unversioned(name: str, rule: ProductRule) -> str:
    """nightly.v2.fits -> nightly.fits: the staged name a later version was published
    from (publish.versioned, reversed)."""
    stem = rules.stem_of(name, rule)
    m = _VERSION.match(stem)
    return name if m is None else m.group(1) + name[len(stem):]


def describe(dir_fd: int, name: bytes, kind: str, algorithm: str
             ) -> tuple[int, str, dict[str, object]]:
    """(size, checksum, metadata) of an archived product, from one read of its bytes.
    content.Rejected or fits.FitsError when it is not a product detection would take."""
    if kind == Kind.DIRECTORY:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            total, checksum, _newest = content.tree_digest(fd, algorithm)
            return total, checksum, {"files": content.tree_digest_quick(fd)[1]}
        finally:
            os.close(fd)
    fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise content.Rejected(f"is {paths.type_name(st.st_mode)}, not a regular file")
        if fits.is_fits_signature(os.pread(fd, 80, 0)):
            report = fits.scan_fits(fd, algorithm=algorithm)
            metadata = dict(report.metadata)
            metadata["fits_checksums"] = report.fits_checksums
            metadata["hdus"] = report.hdus
            return report.size, report.checksum, metadata
        if os.fsdecode(name).lower().endswith(content.FITS_SUFFIXES):
            raise content.Rejected("not a FITS file: it does not start with the card "
                                  "'SIMPLE  ='")
        size, checksum = fits.hash_fd(fd, algorithm)
        return size, checksum, {}
    finally:
        os.close(fd)


def rebuild(config: Config, registry: RegistryBackend,
            progress: Callable[[Report], None] | None = None) -> Report:
    """Create the missing rows; see the module's docstring. The caller holds the lock."""
    report = Report()
    root = os.fsencode(str(config.products_root))
    stage_root = os.fsencode(str(config.stage_root))
    try:
        root_fd = paths.open_root(root)
    except FileNotFoundError:
        return report
    try:
        for rule in config.products:
            dest = tuple(os.fsencode(p) for p in rule.destination.split("/") if p)
            try:
                dest_fd = paths.open_dir_under(root_fd, dest)
            except (FileNotFoundError, paths.UnsafePath):
                dest_fd = -1
            if dest_fd < 0:
                continue
            try:
                _walk_rule(config, registry, rule, root, stage_root, dest, dest_fd, report,
                           progress)
            finally:
                os.close(dest_fd)
    finally:
        os.close(root_fd)
    return report


def _walk_rule(config: Config, registry: RegistryBackend, rule: ProductRule, root: bytes,
               stage_root: bytes, dest: tuple[bytes, ...], dest_fd: int, report: Report,
               progress: Callable[[Report], None] | None) -> None:
    base = tuple(os.fsencode(p) for p in rule.base.parts)
    top = os.path.join(root, *dest)

    def unwalked(exc: paths.TreeProblem) -> None:
        report.skipped.append((exc.path, f"not looked into: {exc.reason}"))

    for folder in treewalk.walk(dest_fd, on_problem=unwalked, top=top):
        dirs, dfd, rel_parts = folder.dirs, folder.fd, folder.parts
        for raw in sorted(dirs + folder.files):
            name = os.fsdecode(raw)
            is_dir = raw in dirs
            if paths.parse_temp_name(raw) is not None:
                if is_dir:
                    dirs.remove(raw)
                continue
            staged = base + rel_parts + (raw,)
            found = rules.match(config, staged)
            if found is None or found.rule != rule or found.parts != staged:
                continue  # a sidecar, a file inside a folder product, or no product
            if is_dir:
                dirs.remove(raw)  # a folder product is one product
            published = paths.display(os.path.join(root, *dest, *rel_parts, raw))
            if registry.is_recorded(published):
                report.recorded += 1
                continue
            stage_parts = base + rel_parts + (os.fsencode(_unversioned(name, rule)),)
            problem = rules.name_problem(stage_parts, config.max_name_bytes)
            if problem is not None:
                report.skipped.append((published, f"not a product detection would take: "
                                                  f"{problem}"))
                continue
            try:
                st = os.stat(raw, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise content.Rejected("is a symbolic link; not followed")
                size, checksum, metadata = describe(dfd, raw, rule.kind,
                                                    config.checksum_algorithm)
            except (content.Rejected, fits.FitsError) as exc:
                report.skipped.append((published, f"not a product detection would take: "
                                                  f"{exc}"))
                continue
            except paths.TreeProblem as exc:
                report.skipped.append((published, f"not a product detection would take: "
                                                  f"{exc.path} inside it {exc.reason}"))
                continue
            except OSError as exc:
                report.skipped.append((published, f"cannot be read: {exc.strerror or exc}"))
                continue
            sidecars: list[str] = []
            if rule.kind == Kind.FILE:
                for sidecar in rules.sidecar_names(name, rule):
                    try:
                        sst = os.stat(os.fsencode(sidecar), dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(sst.st_mode):
                        sidecars.append(sidecar)
            stage_bytes = os.path.join(stage_root, *stage_parts)
            item = Rebuilt(
                data_id=rules.data_id_for(rule, staged), data_type=rule.type,
                base_path=paths.display(stage_root), stage_path=paths.display(stage_bytes),
                stage_path_bytes=stage_bytes, published_path=published,
                published_at=st.st_mtime, size_bytes=size, checksum=checksum,
                metadata=metadata, sidecars=tuple(sidecars))
            outcome = registry.insert_rebuilt(item)
            if outcome == RebuildOutcome.CREATED:
                report.created.append(item)
            elif outcome == RebuildOutcome.RECORDED:
                report.recorded += 1
            else:
                holder = registry.get(item.data_id)
                where = "?" if holder is None else \
                    f"{holder.status}, {holder.published_path or holder.stage_path}"
                report.skipped.append((published, f"its data_id {item.data_id!r} belongs to "
                                                  f"another row ({where}), which is left as "
                                                  "it is"))
            if progress is not None:
                progress(report)
