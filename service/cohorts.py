"""Cohorts: rows at the same depth that share one hidden-state batch, formed, merged and shrunk.

Rows are grouped by token length so that padding stays small: a group grows only while its
padded size is at most PAD_SLACK times its real tokens, or it is no wider than SMALL_WIDTH (below
that width a separate engine call costs more than the padding it saves). A cohort is padded once,
when it is formed; merging cohorts pads hidden states along the sequence axis, which is exact for
BERT (see Engine.merge).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from romebert.core.engine import HiddenBatch
from romebert.core.tokenization import Encoded, pad
from romebert.service.tickets import Row

PAD_SLACK = 1.5
SMALL_WIDTH = 16


class EngineLike(Protocol):
    num_layers: int

    def embed(self, batch: Encoded) -> HiddenBatch: ...
    def layer(self, i: int, state: HiddenBatch) -> tuple[HiddenBatch, np.ndarray]: ...
    def keep(self, state: HiddenBatch, rows: np.ndarray) -> HiddenBatch: ...
    def merge(self, states: list[HiddenBatch]) -> HiddenBatch: ...


@dataclass(eq=False)
class Cohort:
    rows: list[Row]
    state: HiddenBatch
    order: int  # formation order, to break ties oldest first
    depth: int = 0  # layers run so far
    logits: np.ndarray | None = None  # (rows, C) of exit `depth`

    @property
    def width(self) -> int:
        return self.state.attention_mask.shape[1]

    @property
    def deadline(self) -> float:
        """The earliest deadline of its rows (inf when none has a budget)."""
        return min(row.deadline for row in self.rows)

    @property
    def thresholds(self) -> np.ndarray:
        return np.fromiter((row.threshold for row in self.rows), dtype=np.float64, count=len(self.rows))

    def keep(self, engine: EngineLike, stay: np.ndarray) -> None:
        """Only the rows flagged in `stay` go on."""
        index = np.flatnonzero(stay)
        self.rows = [self.rows[i] for i in index]
        if len(index):
            self.state = engine.keep(self.state, index)
            if self.logits is not None:
                self.logits = self.logits[index]


def _fits(rows: int, width: int, tokens: int) -> bool:
    return width <= SMALL_WIDTH or rows * width <= PAD_SLACK * tokens


def length_groups(rows: list[Row]) -> list[list[Row]]:
    """Rows in groups of similar length (see PAD_SLACK)."""
    groups: list[list[Row]] = []
    tokens = 0
    for row in sorted(rows, key=len):
        if groups and _fits(len(groups[-1]) + 1, len(row), tokens + len(row)):
            groups[-1].append(row)
            tokens += len(row)
        else:
            groups.append([row])
            tokens = len(row)
    return groups


def oldest_group(rows: list[Row], max_rows: int) -> list[Row]:
    """The length group of the oldest row (rows come oldest first), its `max_rows` oldest rows."""
    group = set(next(g for g in length_groups(rows) if rows[0] in g))  # rows compare by identity
    return [row for row in rows if row in group][:max_rows]


def form(rows: list[Row], engine: EngineLike, order: itertools.count) -> list[Cohort]:
    """Fresh cohorts at depth 0: grouped by length, padded once, embedded."""
    return [Cohort(group, engine.embed(pad([row.tokens for row in group])), next(order)) for group in length_groups(rows)]


def merge_same_depth(cohorts: list[Cohort], engine: EngineLike, max_batch: int) -> list[Cohort]:
    """Merge cohorts at the same depth while the result stays within max_batch rows and PAD_SLACK."""
    out: list[Cohort] = []
    for _, same_depth in itertools.groupby(sorted(cohorts, key=lambda c: (c.depth, c.width)), key=lambda c: c.depth):
        runs: list[list[Cohort]] = []
        for cohort in same_depth:
            run = runs[-1] if runs else []
            rows = sum(len(c.rows) for c in run) + len(cohort.rows)
            tokens = sum(len(row) for c in run + [cohort] for row in c.rows)
            if run and rows <= max_batch and _fits(rows, cohort.width, tokens):
                run.append(cohort)
            else:
                runs.append([cohort])
        out += [run[0] if len(run) == 1 else _merge(run, engine) for run in runs]
    return out


def _merge(run: list[Cohort], engine: EngineLike) -> Cohort:
    logits = None if run[0].logits is None else np.concatenate([c.logits for c in run])
    rows = [row for c in run for row in c.rows]
    return Cohort(rows, engine.merge([c.state for c in run]), min(c.order for c in run), run[0].depth, logits)


def has_budget(cohort: Cohort) -> bool:
    return cohort.deadline < math.inf
