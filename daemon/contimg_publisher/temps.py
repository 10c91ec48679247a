"""Which temporary names in the products area a live publish owns.

A publish records its temporary name (or, publishing by rename, its claim) in its row before
it creates the name, so a temporary name that no live claim owns is stray: left by a process
that died, or put there by hand under a name shaped like ours. The daemon's sweep
(reconcile.stray_temp_sweep) removes this node's; the audit reports any that is also older
than a lease.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from contimg_publisher import paths
from contimg_publisher.lock import owner_alive
from contimg_publisher.registry import RegistryBackend


@dataclass(frozen=True)
class LiveTemps:
    """The claims of every node's `publishing` rows whose process is not known to be gone."""

    recorded: frozenset[str]  # temporary paths recorded in those rows (display form)
    tokens: frozenset[str]    # their tokens (the sidecars' temporaries carry the same one)
    renames: frozenset[int]   # row ids publishing by rename (no temporary name recorded)

    def owns(self, shown_path: str, token: str) -> bool:
        """Whether the temporary at `shown_path`, of `token`, belongs to a live claim."""
        return shown_path in self.recorded or token in self.tokens or \
            paths.temp_row(token) in self.renames


def live(registry: RegistryBackend, owner: str | None = None) -> LiveTemps:
    """Every node's live claims (a products area several nodes share holds their copies in
    flight too). `owner`: this process's lease owner, whose claims are live whatever
    owner_alive says."""
    rows = [row for row in registry.publishing(every_node=True)
            if (owner is not None and row.lease_owner == owner) or
            owner_alive(row.lease_owner) is not False]
    recorded = frozenset(row.publish_temp for row in rows if row.publish_temp)
    tokens = frozenset(token for row in rows if row.publish_temp and (
        token := paths.parse_temp_name(os.path.basename(
            paths.undisplay(row.publish_temp)))) is not None)
    return LiveTemps(recorded, tokens, frozenset(row.id for row in rows if not row.publish_temp))
