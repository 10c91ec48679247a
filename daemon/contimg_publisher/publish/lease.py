"""The lease keeper: a batch's claims stay this process's while it works through them.

With a shared registry (several daemons or nodes), a claim whose lease runs out can be
taken by another daemon; the keeper renews the lease of the product in hand (before each
product, and about once a second during a long read), renews the rest of the batch once
half a lease has gone by, and stops the batch (`Cancelled`) once the claims can no longer
be known to hold.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from contimg_publisher.publish.context import Context
from contimg_publisher.registry import Product, RegistryError
from contimg_publisher.transfer import Cancelled


class LeaseKeeper:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        # When the claims in hand were last known to hold (claimed, or a lease renewed):
        # with a shared registry, a batch stops once that is a lease ago (keep).
        self.renewed_at = time.monotonic()
        self._batch: list[Product] = []  # the rows of the batch in hand (_renew_rest)
        self._rest_renewed_at = time.monotonic()

    def start(self, products: list[Product]) -> None:
        """A batch was just claimed: its claims hold as of now."""
        self.renewed_at = self._rest_renewed_at = time.monotonic()
        self._batch = list(products)

    def keep(self, product: Product) -> None:
        """Before each product of a batch, with a shared registry: the lease is renewed once
        half of it has gone by, and the batch stops when it cannot be for a whole lease."""
        if not self.ctx.registry.shared or \
                time.monotonic() - self.renewed_at < self.ctx.config.lease_seconds / 2:
            return
        with contextlib.suppress(RegistryError):  # tried again before the next product
            self.renew(product)

    def renewer(self, product: Product) -> Callable[[], None]:
        """The lease renewal a long read runs about once a second."""
        warned: list[str] = []

        def renew() -> None:
            # A registry that cannot be written for a while (another process holding the
            # write lock, a full disk) does not stop the copy: under the single-writer lock
            # nobody else can take the claim, and the commit checks it anyway.
            try:
                self.renew(product)
            except RegistryError as exc:
                if not warned:
                    warned.append(str(exc))
                    self.ctx.warn("lease_not_renewed", data_id=product.data_id,
                                  stage_path=product.stage_path, error=str(exc),
                                  reason="the copy goes on; the commit checks the claim")
        return renew

    def renew(self, product: Product) -> None:
        """Renew the lease of the batch (through the product in hand). With a shared
        registry, a claim that is no longer this one (taken by another claim, or resolved
        as dead) and a lease not renewed for a whole lease are a lost lease: another node
        may hold the rows by now."""
        registry, config = self.ctx.registry, self.ctx.config
        try:
            renewed = registry.renew_lease(product.data_id, self.ctx.owner,
                                           config.lease_seconds, token=product.claim_token)
        except RegistryError as exc:
            if registry.shared and time.monotonic() - self.renewed_at >= config.lease_seconds:
                self._lost(product, f"the lease could not be renewed for "
                           f"{config.lease_seconds:g} s", str(exc))
            raise
        if renewed:
            self.renewed_at = time.monotonic()
            self._renew_rest(product)
        elif registry.shared:
            self._lost(product, "the claim is no longer this process's: the row was "
                       "claimed again or resolved as an abandoned publish")

    def _renew_rest(self, product: Product) -> None:
        """With a shared registry, the batch's other rows keep their lease too, once half
        of it has gone by (one transaction): a row further down a batch that outlasts the
        lease would otherwise expire, and another daemon of this node would claim it again
        and copy it for nothing (its writes are fenced, the copy is wasted). Rows already
        done are no longer this claim's and are left as they are."""
        registry, config = self.ctx.registry, self.ctx.config
        if not registry.shared or \
                time.monotonic() - self._rest_renewed_at < config.lease_seconds / 2:
            return
        with contextlib.suppress(RegistryError), registry.write():
            for other in self._batch:
                if other.data_id != product.data_id:
                    registry.renew_lease(other.data_id, self.ctx.owner, config.lease_seconds,
                                         token=other.claim_token)
            self._rest_renewed_at = time.monotonic()

    def _lost(self, product: Product, reason: str, error: str | None = None) -> None:
        """The claims in hand no longer hold: said once (`lease_lost`, naming the product in
        hand) and Cancelled, so the product is not placed nor committed and its staged
        file stays; the rest of the batch is given back (protocol.place)."""
        self.ctx.warn("lease_lost", data_id=product.data_id, data_type=product.data_type,
                      stage_path=product.stage_path, reason=reason, error=error,
                      lease_seconds=self.ctx.config.lease_seconds,
                      seconds_since_renewal=round(time.monotonic() - self.renewed_at, 1),
                      action="the product stays in staging; the rest of the batch goes back "
                             "to waiting once the registry can be written")
        raise Cancelled(f"lease lost: {reason}")
