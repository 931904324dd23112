"""The Locust user that POSTs /classify, for Locust's distributed mode (loadtest/locustfile.py).

`romebert loadtest` itself drives load with driver.py; this user lets many machines add theirs,
with the same workload flags, while Locust aggregates the latency percentiles.
"""

from __future__ import annotations

import itertools
import random
from typing import ClassVar

from locust import FastHttpUser, constant, task

from romebert.loadtest.workload import Workload


class ClassifyUser(FastHttpUser):
    """POSTs /classify back to back; a subclass sets the workload (and its pacing)."""

    abstract = True
    wait_time = constant(0)
    workload: ClassVar[Workload]
    _ids: ClassVar[itertools.count] = itertools.count()

    def on_start(self) -> None:
        # Distinct per user and per Locust worker, reproducible from the seed.
        worker = getattr(self.environment.runner, "worker_index", 0)
        self.rng = random.Random(f"{self.workload.seed}:{worker}:{next(self._ids)}")

    @task
    def classify(self) -> None:
        request = self.workload.draw(self.rng)
        self.client.post("/classify", json=request.body, name=f"/classify [{request.profile}]")
