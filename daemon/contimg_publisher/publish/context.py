"""What every step of a publish works with: the configuration, the registry, whose claims
these are, where warnings go, and the writer check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contimg_publisher import writers
from contimg_publisher.config import Config
from contimg_publisher.registry import RegistryBackend


@dataclass(frozen=True)
class Context:
    config: Config
    registry: RegistryBackend
    owner: str
    log: Any = None
    gate: writers.WriterGate = field(default_factory=writers.WriterGate)

    def warn(self, event: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.warning(event, **fields)
