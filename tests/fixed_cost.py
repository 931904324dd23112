"""A cost model stub for the scheduler's tests: fixed layer costs, so budgets are decided by the test."""


class FixedCost:
    """Predicts `seconds[layer]` whatever the batch, and learns nothing."""

    def __init__(self, seconds: list[float]):
        self.seconds = seconds

    def predict(self, layer: int, rows: int, width: int) -> float:
        return self.seconds[layer]

    def observe(self, layer: int, rows: int, width: int, seconds: float) -> None:
        pass
