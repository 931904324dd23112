"""Scheduler policies: which cohort runs its next layer, and whether new rows join mid-flight.

"complete" (the default): a batch runs to its end, still shedding confident rows after every
layer, before the next is formed from whatever queued meanwhile. "regroup": at every layer
boundary newly queued rows are admitted as fresh cohorts and cohorts at the same depth are
merged; the next step goes to a fresh cohort if there is one, else to the deepest. Fresh first
gives a newcomer its exit-1 chance without waiting out the stragglers of an earlier batch, which
cuts the median of easy requests at moderate load; but the long jobs pay in tail latency and the
extra steps and merges cost capacity, so on the measured CPU "complete" serves more and has the
better p99 (docs/serving.md). Under both, a fresh cohort with a budget goes first: its rows were
let in because they could not wait.
"""

from __future__ import annotations

from dataclasses import dataclass

from romebert.service.cohorts import Cohort, has_budget


@dataclass(frozen=True)
class Policy:
    name: str
    regroup: bool  # admit rows and merge cohorts at every layer boundary

    def next(self, cohorts: list[Cohort]) -> Cohort:
        """The cohort to run next; ties go to the oldest."""

        def rank(c: Cohort) -> tuple:
            fresh = c.depth == 0
            return (not (fresh and has_budget(c)), self.regroup and not fresh, -c.depth, c.order)

        return min(cohorts, key=rank)


POLICIES: dict[str, Policy] = {p.name: p for p in (Policy("complete", regroup=False), Policy("regroup", regroup=True))}
