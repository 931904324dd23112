"""`romebert export`: checkpoint folder (Contract 1) -> model bundle (Contract 2).

Everything is written into a temporary folder beside the output and renamed into place at the
end, so a failed export (bad checkpoint, parity mismatch, Ctrl-C) leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from tqdm.auto import tqdm

from romebert.model_export import backends
from romebert.model_export.calibrate import calibrate, exit_logits_onnx
from romebert.model_export.optimize import AUTO, AUTO_CANDIDATES, PRECISIONS, optimize_segment
from romebert.model_export.parity import check_parity
from romebert.model_export.segments import export_full_depth, export_segments, write_select_rows
from romebert.core.bundle import FORMAT_VERSION, load_bundle, seal
from romebert.core.engine import Engine
from romebert.core.tokenization import LengthBatches, TextEncoder
from romebert.training.checkpoint import read_record, task_of, weights_digest
from romebert.core.data import encode_examples
from romebert.core.files import publish_dir
from romebert.training.evaluate import exit_logits
from romebert.training.model import MultiExitBert


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    precision: str = "fp32",
    data: str | None = None,
    force: bool = False,
    max_drop_points: float = 1.0,
    parity_examples: int = 256,
    limit: int | None = None,
    log=print,
    attention: str = "classic",
    monolithic: bool = False,
) -> Path:
    """Export, check parity, calibrate and measure the backends; publish one bundle.

    precision "auto" builds an fp32 and an int8 bundle side by side and publishes the one whose
    backend the measurement chose (see model_export/backends.py): int8 on onnxruntime's CPU provider
    where it is the fastest that keeps accuracy and exits, OpenVINO bf16 on the fp32 files on AMX
    CPUs, fp32 otherwise.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if precision not in (*PRECISIONS, AUTO):
        raise ValueError(f"--precision must be one of {(*PRECISIONS, AUTO)}, not {precision!r}")
    if not max_drop_points >= 0:  # no threshold can be more accurate than full depth by a margin
        raise ValueError(f"--max-accuracy-drop must be >= 0 (accuracy points given up for speed), not {max_drop_points}")
    if parity_examples < 1:  # the bundle is published only once it is shown to compute what the checkpoint does
        raise ValueError(f"--parity-examples must be >= 1, not {parity_examples}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: checkpoint folder not found")
    try:
        model = MultiExitBert.from_checkpoint(checkpoint, attn_implementation="classic")
    except (ValueError, FileNotFoundError):
        raise
    except Exception as err:  # safetensors' and torch's own errors on a corrupt file
        raise ValueError(f"{checkpoint}: cannot load the checkpoint ({err})") from None
    record = read_record(checkpoint)
    task = task_of(checkpoint, record, data, limit)
    max_length = int(getattr(model.config, "max_seq_length", 128))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        started = time.perf_counter()
        raw = tmp / "raw"
        log(f"exporting {model.num_layers + 1} segments of {checkpoint} ...")
        segments = export_segments(model, raw, attention)
        if monolithic:  # the one-graph baseline the benchmarks compare against; the server never loads it
            export_full_depth(model, raw / "full.onnx", attention)
        model.set_attention("eager")
        encoder = TextEncoder(checkpoint / "tokenizer.json", max_length)
        dev, labels = encode_examples(encoder, task.dev)
        dev_batches = LengthBatches.of(dev, 64)
        parity_rows = np.sort(np.random.default_rng(0).permutation(len(labels))[:parity_examples])
        parity_batches = LengthBatches.of(dev.rows(parity_rows), 32).batches
        built, manifests = {}, {}
        for p in AUTO_CANDIDATES if precision == AUTO else (precision,):
            built[p] = folder = tmp / p
            manifests[p] = manifest = _write_bundle(folder, raw, segments, p, model, checkpoint, record, task, max_length, attention, monolithic)
            log(f"{p}: parity on {len(parity_rows)} dev examples, calibration on {len(labels)} ...")
            engine = Engine(load_bundle(folder), device="cpu")
            manifest["parity"] = check_parity(model, engine, parity_batches, strict=p == "fp32")
            table, default = calibrate(exit_logits_onnx(engine, dev_batches), labels, max_drop_points)
            manifest["calibration"] = table
            manifest["default_threshold"] = default["threshold"]
            manifest["threshold_rule"] = default | {"max_accuracy_drop_points": max_drop_points, "split": "dev", "examples": int(len(labels))}
            seal(folder, manifest)
        shutil.rmtree(raw)

        log("measuring the backends on dev ...")
        reference = exit_logits(model, dev, 64)  # the fp32 PyTorch model: what every backend is held to
        rows, choice = backends.measure_in_fresh_process(list(built.values()), dev_batches, labels, reference, log=log)
        chosen, manifest = built[choice["files"]], manifests[choice["files"]]
        manifest["backends"], manifest["backend"] = rows, choice
        manifest["export_seconds"] = round(time.perf_counter() - started, 1)
        seal(chosen, manifest)
        load_bundle(chosen)  # the published bundle must pass the very check the server makes
        publish_dir(chosen, out, force=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_bundle(folder: Path, raw: Path, segments: list[dict], precision: str, model: MultiExitBert, checkpoint: Path, record: dict,
                  task, max_length: int, attention: str, monolithic: bool) -> dict:
    """Optimized segments in `precision`, the tokenizer and a sealed manifest (not yet calibrated)."""
    config = model.config
    seg_dir = folder / "segments"
    seg_dir.mkdir(parents=True)
    graphs = segments + ([{"name": "full", "file": "full.onnx"}] if monolithic else [])
    fused = {}
    for row in tqdm(graphs, desc=f"optimizing ({precision})", unit="segment"):
        fused[row["name"]] = optimize_segment(raw / row["file"], seg_dir / row["file"], precision, config.num_attention_heads, config.hidden_size)
    write_select_rows(seg_dir / "select_rows.onnx")
    shutil.copy2(checkpoint / "tokenizer.json", folder / "tokenizer.json")
    extras = ["select_rows"] + (["full"] if monolithic else [])
    manifest = {
        "format_version": FORMAT_VERSION,
        "model_name": checkpoint.name,
        "labels": [config.id2label[i] for i in range(config.num_labels)],
        "num_layers": model.num_layers,
        "hidden_size": config.hidden_size,
        "max_length": max_length,
        "pair_input": task.is_pair,
        "precision": precision,
        "optimization": {"transformer_optimizer": True, "opt_level": 0, "attention_export": attention, "fused_operators": fused,
                         "quantization": "dynamic int8, per-channel" if precision == "int8" else None},
        "segments": [row | {"file": f"segments/{row['file']}"} for row in segments],
        "tokenizer": {"file": "tokenizer.json"},
        "extras": {name: {"file": f"segments/{name}.onnx"} for name in extras},
        "default_threshold": 0.0,
        "calibration": [],
        # The weights' digest says which training run a bundle holds, whatever happened to the
        # checkpoint's folder since (a retrained checkpoint at the same path makes a stale bundle).
        "source": {"checkpoint": str(checkpoint), "weights_sha256": weights_digest(checkpoint), "method": record.get("method"),
                   "data": task.name, "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}},
    }
    seal(folder, manifest)
    return manifest
