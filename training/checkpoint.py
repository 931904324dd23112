"""Contract 1: the multi-exit checkpoint folder, and the training state that makes --resume exact.

The checkpoint is what `transformers` tooling recognises (config.json with model_type "bert",
model.safetensors, tokenizer files) plus training_record.json. The training state (optimizer,
scheduler, RNG, data position) is separate and only lives while a run is unfinished.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from romebert.core.data import TaskData, load_task
from romebert.core.bundle import sha256_file
from romebert.core.files import atomic_write, publish_dir, write_json
from romebert.training.model import WEIGHTS_NAME, MultiExitBert

RECORD_NAME = "training_record.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def save_checkpoint(
    model: MultiExitBert, tokenizer_dir: Path, out: Path, record: dict[str, Any], force: bool = True
) -> None:
    """Write the checkpoint into a temporary folder beside `out`, then move it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = model.config
        config.multi_exit = True
        config.exit_head = f"pooler({config.exit_pooling})-tanh-dropout-linear"
        config.gradient_equilibrium = model.gradient_equilibrium
        config.architectures = ["MultiExitBert"]
        config.save_pretrained(str(tmp))
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        if not (tmp / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer.json (a fast tokenizer file is required)")
        write_json(tmp / RECORD_NAME, record)
        publish_dir(tmp, out, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def weights_digest(checkpoint: Path) -> str:
    """The sha256 of the checkpoint's weights: names one training run, whatever its folder is called."""
    return sha256_file(Path(checkpoint) / WEIGHTS_NAME)


def read_record(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's training record; {} for a checkpoint trained elsewhere, which has none."""
    path = checkpoint / RECORD_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def split_seed(record: dict[str, Any]) -> int:
    """The seed the checkpoint's run split its data with (42, the default, when it records none)."""
    return record.get("config", {}).get("seed", 42)


def task_of(checkpoint: Path, record: dict[str, Any], data: str | None, limit: int | None = None) -> TaskData:
    """The task to score a checkpoint on: `data` when given, else the dataset it was trained on,
    split with its run's seed, so that its dev and test rows are ones it never trained on."""
    source = data or record.get("config", {}).get("data")
    if not source:
        raise ValueError(f"{checkpoint}: no --data given and the checkpoint does not record its dataset")
    return load_task(source, seed=split_seed(record), limit=limit)


def state_path(output: Path) -> Path:
    """Where an unfinished run keeps its training state: beside the checkpoint, not inside it."""
    output = Path(output)
    return output.with_name(output.name + ".state") / "state.pt"


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
