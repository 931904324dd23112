"""What each method trains with on each dataset, beyond TrainConfig's defaults: one table, read by
the training benchmark (bench/train.py), the recipe search's seeds, and `make serve`'s default model,
so that the model a newcomer serves is trained the way the benchmark measured.

Why each entry is there, with its numbers: docs/training.md (recipe search) and docs/results.md.
"""

from __future__ import annotations

SHIPPED_METHOD = "romebert"  # the method of `make serve`'s default model and of the benchmark's headline

# Per dataset: what every method trains with. IMDB: 128 tokens (twice rotten_tomatoes'; 89% of the
# reviews are longer and are cut) and 600 training reviews, sized so that the whole benchmark fits
# a 2-core CPU in about two hours (one with AMX, training bf16; docs/results.md has the times).
DATASETS: dict[str, dict] = {
    "rotten_tomatoes": dict(max_length=64, epochs=3, batch_size=32),
    "imdb": dict(max_length=128, epochs=2, batch_size=16, train_limit=600, dev_limit=1000),
}
# Per (dataset, method): what that method's recipe search on dev changed from DATASETS.
# IMDB's 600 reviews: RomeBERT's one stage needs more passes than DeeBERT's 2 + 2 to lift its early
# exits; 6 epochs won on dev (bench/results/recipe_search_imdb.json). rotten_tomatoes: the early
# exits' losses weighted 0.25 against the final exit's CE (recipe search round 6, screened on seeds
# 1-5 and confirmed on fresh seeds 6-10, dev only).
METHOD_SETTINGS: dict[tuple[str, str], dict] = {
    ("imdb", SHIPPED_METHOD): dict(epochs=6),
    ("rotten_tomatoes", SHIPPED_METHOD): dict(exit_weight=0.25),
}


def settings_of(dataset: str, method: str) -> dict:
    """The TrainConfig fields `method` trains with on `dataset`, beyond the defaults."""
    return DATASETS[dataset] | METHOD_SETTINGS.get((dataset, method), {})
