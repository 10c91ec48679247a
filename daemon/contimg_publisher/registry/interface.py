"""The registry's contract: what the rest of the program calls on a registry, whichever
backend keeps it (sqlite.py, the embedded default; postgres.py, for several nodes).

The contract is operations.Operations: every operation is written there once, and each
backend gives it a session (statements, transactions, the clock) and a dialect (the SQL
that differs). Every backend raises the errors of model.py: RegistryUnavailable (and
RegistryBusy) for "cannot be used now, nothing was recorded", a state the daemon waits
out; RegistryGone when the records went away under it; RegistryError for a registry that
cannot be used at all.

Owner-checked writes (those after a claim) also take the claim's token
(Product.claim_token): a backend that issues tokens makes such a write change nothing once
another claim took the row, even one by the same owner.
"""

from __future__ import annotations

from contimg_publisher.registry.operations import Operations

RegistryBackend = Operations
