"""Shared fixtures: a tiny random BERT backbone, a checkpoint trained on it, and its bundle.

Tiny (3 layers, hidden 32) so the whole suite runs in minutes on two cores; the tokenizer is
the real all-MiniLM-L6-v2 one, so texts tokenize as in production.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import settings

from tiny_backbone import make_tiny_backbone, tiny_train_config

# No per-example deadline: on shared, busy cores one example can wait past hypothesis' 200 ms for
# reasons of the machine, not the code (seen with a benchmark training beside the suite); speed is
# the benchmarks' to judge, not the unit tests'.
settings.register_profile("no_deadline", deadline=None)
settings.load_profile("no_deadline")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_backbone, tmp_path_factory) -> Path:
    from romebert.training.train import train

    return train(tiny_train_config(tiny_backbone, tmp_path_factory.mktemp("ckpt") / "tiny-romebert", epochs=2))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """A real exported bundle: 3 layer segments, labels ["negative", "positive"], max_length 32."""
    from romebert.model_export.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "tiny-bundle", limit=64, log=lambda *_: None)
