"""One claimed product on its way through a batch: what each step learned, as a record of
its own, filled in once by that step."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from contimg_publisher import kinds
from contimg_publisher.config import ProductRule
from contimg_publisher.publish.naming import Sidecar
from contimg_publisher.publish.outcome import Result
from contimg_publisher.registry import Identity, Product
from contimg_publisher.states import Attempt


@dataclass(frozen=True)
class Opened:
    """What OPEN_SOURCE found: the staged source, open and checked, and both folders."""

    rule: ProductRule
    kind: kinds.ProductKind
    parts: tuple[bytes, ...]       # the staged path's components under stage_root
    folder: tuple[bytes, ...]      # the destination folder under products_root
    name: bytes                    # the name it publishes under, before any version
    src_parent: int                # borrowed from the batch's Folders
    src_fd: int                    # owned by the batch: closed when it ends
    dest_fd: int                   # borrowed from the batch's Folders
    stat: os.stat_result
    ident: Identity

    @property
    def staged_name(self) -> bytes:
        return self.parts[-1]


@dataclass(frozen=True)
class Plan:
    """What CHOOSE_NAME decided (RECORD_PLAN records it in the row)."""

    final: bytes
    published_path: str
    identical: bool                # the final name already holds these bytes
    same_fs: bool                  # published by a rename of the staged inode
    temp: bytes | None             # the copy's temporary name (None: no copy)
    temp_shown: str | None
    token: str                     # of this attempt's temporary names
    sidecars: list[Sidecar]


@dataclass
class Job:
    """A claimed product in a batch; `product` is replaced once its pending digest is
    recorded, `reserved` cleared once the reserved name goes back."""

    product: Product
    mode: str
    result: Result
    cancel: threading.Event | None = None
    started: float = field(default_factory=time.monotonic)
    opened: Opened | None = None
    plan: Plan | None = None
    reserved: str | None = None    # the final name reserved in the registry (a folder)

    def steps_done(self) -> tuple[Opened, Plan]:
        """The records of the first two steps, which every later step needs."""
        assert self.opened is not None and self.plan is not None
        return self.opened, self.plan

    def lose(self, why: str) -> None:
        self.result.status, self.result.error = Attempt.LOST, why
        self.finish()

    def finish(self) -> None:
        self.result.seconds = time.monotonic() - self.started
