"""The QA gate: which values of the legacy QA columns keep a product from being published
automatically.

The pipeline's own code publishes a mosaic only once `validation_status = 'validated'` and
`qa_status = 'passed'`, but not every site's pipeline fills these columns. So by default
only an explicit verdict against a product holds it (`qa_status = 'failed'`,
`validation_status = 'invalid'`): a site whose pipeline never writes them still publishes
everything (the columns stay NULL), and a site whose pipeline does never archives a product
its QA rejected. A rule's `require` makes a positive verdict necessary, which is what the
legacy code did; a product then waits, held, until its pipeline records that verdict. The
legacy `check_auto_publish_criteria` also waits for `photometry_status = 'completed'`:
`require = { photometry_status = "completed" }` says the same.

The gate is evaluated by the registry inside the claim's own transaction (registry.py turns
these conditions into SQL), so a verdict committed by the pipeline before the claim always
counts. A rule's `[products.record]` (Record) adds the verdicts of the pipeline's own
record of the product, a row of a table of its own, to the same gate. A manual
`publish --override-qa REASON` passes it, and the reason is logged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from contimg_publisher.config import ProductRule, RecordRule

# Explicit verdicts against a product (the legacy values: qa_status passed, failed, warning or
# pending; validation_status validated, invalid or pending).
BLOCKING: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qa_status", ("failed",)),
    ("validation_status", ("invalid",)),
)


@dataclass(frozen=True)
class Condition:
    """One test on one legacy column of the rows of one type. `required`: the column must
    hold one of `values`; otherwise it must hold none of them."""

    data_type: str
    column: str
    values: tuple[str, ...]
    required: bool


def conditions(rules: Iterable[ProductRule]) -> tuple[Condition, ...]:
    """The gate of every rule, explicit failures first (they name the stronger reason)."""
    out: list[Condition] = []
    rules = tuple(rules)
    for rule in rules:
        out += [Condition(rule.type, column, values, False) for column, values in BLOCKING]
    for rule in rules:
        out += [Condition(rule.type, column, values, True) for column, values in rule.require]
    return tuple(out)


@dataclass(frozen=True)
class Record:
    """The `[products.record]` of the rule of one type (config.RecordRule), for the
    registry: its gate and the publish's update (registry/records.py writes the SQL)."""

    data_type: str
    table: str
    path_column: str
    require: tuple[tuple[str, tuple[str, ...]], ...]
    hold: tuple[tuple[str, tuple[str, ...]], ...]
    missing: str

    @classmethod
    def of(cls, data_type: str, rule: RecordRule) -> Record:
        return cls(data_type, rule.table, rule.path_column, rule.require, rule.hold,
                   rule.missing)

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.path_column, *dict.fromkeys(c for c, _v in self.require + self.hold))


def records(rules: Iterable[ProductRule]) -> tuple[Record, ...]:
    """The record of every rule that names one."""
    return tuple(Record.of(rule.type, rule.record) for rule in rules if rule.record)
