"""Cohorts: rows at the same depth that share one hidden-state batch, formed, merged and shrunk.

Rows are grouped by token length so that padding stays small: a group grows only while its
padded size is at most the limit's `pad_slack` times its real tokens, or it is no wider than
SMALL_WIDTH (below that width a separate engine call costs more than the padding it saves). A
cohort is padded once, when it is formed; merging cohorts pads hidden states along the sequence
axis, which is exact for BERT (see Engine.merge).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from romebert.core.engine import HiddenBatch
from romebert.core.exits import can_leave_early
from romebert.core.tokenization import Encoded, pad
from romebert.service.tickets import Row

PAD_SLACK = 1.25  # the default (was 1.5): the padding it saves outweighs its smaller batches (docs/results.md, "Padding slack")
SMALL_WIDTH = 16


class EngineLike(Protocol):
    num_layers: int

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]: ...
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
    # Each row's own threshold, and whether any lets a row leave before the last exit: read at
    # every layer, so worked out when the rows change, not per step.
    thresholds: np.ndarray = field(init=False)
    may_leave_early: bool = field(init=False)

    def __post_init__(self) -> None:
        self._set_thresholds(np.fromiter((row.threshold for row in self.rows), dtype=np.float64, count=len(self.rows)))

    def _set_thresholds(self, thresholds: np.ndarray) -> None:
        self.thresholds = thresholds
        self.may_leave_early = can_leave_early(thresholds)

    @property
    def width(self) -> int:
        return self.state.attention_mask.shape[1]

    @property
    def deadline(self) -> float:
        """The earliest deadline of its rows (inf when none has a budget)."""
        return min(row.deadline for row in self.rows)

    def keep(self, engine: EngineLike, stay: np.ndarray) -> None:
        """Only the rows flagged in `stay` go on."""
        index = np.flatnonzero(stay)
        self.rows = [self.rows[i] for i in index]
        if len(index):
            self.state = engine.keep(self.state, index)
            self._set_thresholds(self.thresholds[index])
            if self.logits is not None:
                self.logits = self.logits[index]


class BatchLimit:
    """How many rows one batch may hold: at most `max_rows`, and, as the engine pads it, at most
    `max_tokens` rows x tokens, so that wide rows come in smaller batches. The engine's largest
    shape, and with it the memory OpenVINO keeps for it, follows from `max_tokens` rather than
    from `max_rows` x the bundle's max length. One row of any width always fits. Rows of
    different lengths share a batch only while its padded size stays within `pad_slack` times
    their real tokens (or it is at most SMALL_WIDTH wide)."""

    def __init__(self, max_rows: int, max_tokens: float, padded_shape: Callable[[int, int], tuple[int, int]],
                 pad_slack: float = PAD_SLACK):
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.pad_slack = pad_slack
        self.padded_shape = padded_shape  # the engine's: the shape it runs a batch at
        self._rows_at: dict[int, int] = {}

    def rows_at(self, width: int) -> int:
        """The most rows a batch `width` tokens wide may hold."""
        if self.max_tokens == math.inf:
            return self.max_rows
        if width not in self._rows_at:
            fits = lambda n: math.prod(self.padded_shape(n, width)) <= self.max_tokens  # noqa: E731
            self._rows_at[width] = next((n for n in range(self.max_rows, 1, -1) if fits(n)), 1)
        return self._rows_at[width]


def _fits(rows: int, width: int, tokens: int, limit: BatchLimit) -> bool:
    return rows <= limit.rows_at(width) and (width <= SMALL_WIDTH or rows * width <= limit.pad_slack * tokens)


def length_groups(rows: list[Row], limit: BatchLimit) -> list[list[Row]]:
    """Rows in groups of similar length (see BatchLimit's pad_slack), each within the batch limit."""
    groups: list[list[Row]] = []
    tokens = 0
    for n, row in sorted(((len(row), row) for row in rows), key=lambda pair: pair[0]):
        if groups and _fits(len(groups[-1]) + 1, n, tokens + n, limit):
            groups[-1].append(row)
            tokens += n
        else:
            groups.append([row])
            tokens = n
    return groups


def oldest_group(rows: list[Row], limit: BatchLimit) -> list[Row]:
    """The length group of the oldest row (rows come oldest first): its oldest rows, as many as
    the batch limit lets a batch of the group's width hold."""
    unlimited = BatchLimit(len(rows), math.inf, limit.padded_shape, limit.pad_slack)  # grouped by length alone, then cut by age
    group = set(next(g for g in length_groups(rows, unlimited) if rows[0] in g))  # rows compare by identity
    return [row for row in rows if row in group][: limit.rows_at(max(len(row) for row in group))]


def form(rows: list[Row], engine: EngineLike, order: itertools.count, limit: BatchLimit) -> list[Cohort]:
    """Fresh cohorts at depth 0: grouped by length, padded once, embedded."""
    return [Cohort(group, engine.embed(pad([row.tokens for row in group])), next(order)) for group in length_groups(rows, limit)]


def merge_same_depth(cohorts: list[Cohort], engine: EngineLike, limit: BatchLimit) -> list[Cohort]:
    """Merge cohorts at the same depth while the result stays within the batch limit and its padding slack."""
    out: list[Cohort] = []
    for _, same_depth in itertools.groupby(sorted(cohorts, key=lambda c: (c.depth, c.width)), key=lambda c: c.depth):
        runs: list[list[Cohort]] = []
        for cohort in same_depth:
            run = runs[-1] if runs else []
            rows = sum(len(c.rows) for c in run) + len(cohort.rows)
            tokens = sum(len(row) for c in run + [cohort] for row in c.rows)
            if run and _fits(rows, cohort.width, tokens, limit):
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
