"""Latency budgets, kept by prediction, as deadlines across cohorts.

Layer 1 always runs: a budgeted row gets at least exit 1's answer. After it, before every step,
each row whose remaining budget will not cover its next layer (plus, for rows outside the cohort
about to run, that step) is answered from the deepest exit reached, flagged budget_exhausted. A
queued row with a budget that would run out waiting for the work in flight is let in at the next
layer boundary, ahead of it (see Scheduler._admit).
"""

from __future__ import annotations

import numpy as np

from romebert.service.cohorts import Cohort, has_budget
from romebert.service.cost_model import CostModel


def busy_time(cohorts: list[Cohort], cost: CostModel, num_layers: int) -> float:
    """Predicted seconds until the cohorts in flight are done, as if no row left early."""
    return sum(cost.predict(d, len(c.rows), c.width) for c in cohorts for d in range(c.depth, num_layers))


def late_rows(cohorts: list[Cohort], chosen: Cohort, cost: CostModel, now: float) -> list[tuple[Cohort, np.ndarray]]:
    """(cohort, mask of rows to answer now) for every cohort past layer 1 with rows whose budget
    will not cover their next layer: for the chosen cohort that layer comes next, for the others
    only after the chosen cohort's step."""
    cuts = []
    remaining = len(chosen.rows)
    if chosen.depth > 0 and has_budget(chosen):
        mask = _short_of(chosen, now, cost.predict(chosen.depth, remaining, chosen.width))
        cuts.append((chosen, mask))
        remaining -= int(mask.sum())
    others = [c for c in cohorts if c is not chosen and c.depth > 0 and has_budget(c)]
    if not remaining or not others:
        return cuts
    step = cost.predict(chosen.depth, remaining, chosen.width)
    return cuts + [(c, _short_of(c, now, step + cost.predict(c.depth, len(c.rows), c.width))) for c in others]


def _short_of(cohort: Cohort, now: float, needed: float) -> np.ndarray:
    return np.fromiter((row.deadline - now < needed for row in cohort.rows), dtype=bool, count=len(cohort.rows))
