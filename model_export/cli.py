"""`romebert export CHECKPOINT OUT`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from romebert.model_export.optimize import AUTO, PRECISIONS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="romebert export", description="Split a multi-exit checkpoint into per-layer ONNX segments (a model bundle).")
    p.add_argument("checkpoint", type=Path, help="a training checkpoint folder (what romebert train writes to --output)")
    p.add_argument("out", type=Path, help="bundle folder to create")
    p.add_argument("--precision", choices=(*PRECISIONS, AUTO), default="fp32",
                   help="fp32 (default), fp16 (GPU), int8 (dynamic, CPU), or auto: onnxruntime fp32 and int8, and OpenVINO bf16 and f32 where its plugin "
                        "offers a CPU device, measured on dev on this CPU; the fastest that keeps the exits is published (docs/export.md)")
    p.add_argument("--data", default=None, help="held-out data for parity and calibration (default: the checkpoint's dataset, dev split)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, help="default-threshold rule: largest speed-up within this many accuracy points of full depth (default 1.0)")
    p.add_argument("--parity-examples", type=int, default=256,
                   help="held-out examples whose every exit is compared between PyTorch and the exported segments (default 256)")
    p.add_argument("--monolithic", action="store_true", help="also write the whole model as one graph (extras.full), the baseline bench/engine.py compares with")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    return p


def main(command: str, argv: list[str]) -> int:
    from romebert.model_export.export import export_bundle
    from romebert.model_export.parity import ParityError
    from romebert.core.data import DataError

    args = _parser().parse_args(argv)
    try:
        out = export_bundle(args.checkpoint, args.out, args.precision, args.data, args.force, args.max_accuracy_drop, args.parity_examples,
                            monolithic=args.monolithic)
    except (FileNotFoundError, FileExistsError, ValueError, DataError, ParityError) as err:
        print(f"romebert export: error: {err}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"bundle written to {out} ({manifest['precision']}, default threshold {manifest['default_threshold']})")
    print(f"{'threshold':>9} {'dev acc':>8} {'avg layer':>9} {'speed-up':>8}")
    for r in manifest["calibration"]:
        print(f"{r['threshold']:9.3f} {100 * r['accuracy']:8.2f} {r['avg_exit_layer']:9.2f} {r['speedup']:7.2f}x")
    return 0
