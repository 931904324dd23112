"""Proof that the bundle computes what the PyTorch model computes, through the serving engine.

Checked on real inputs with padding: each segment alone (same inputs to both), the chained
pipeline's logits at every exit, and the exit each example takes at every threshold of the grid.
"""

from __future__ import annotations

import numpy as np
import torch

from romebert.core.engine import Engine, HiddenBatch
from romebert.core.exits import THRESHOLD_GRID, exit_layers
from romebert.core.tokenization import Encoded
from romebert.training.model import MultiExitBert

FP32_LOGIT_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    pass


@torch.no_grad()
def check_parity(model: MultiExitBert, engine: Engine, batches: list[Encoded], strict: bool) -> dict:
    """Max abs errors per segment and for the chain; raise ParityError when strict and they differ."""
    model.eval()
    segment_err = [0.0] * (engine.num_layers + 1)
    chain_err, exit_mismatches, rows = 0.0, 0, 0
    for batch in batches:
        ids, types = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.token_type_ids)
        mask = torch.from_numpy(batch.attention_mask)
        hidden = model.embed(ids, types)
        state = engine.embed(batch)
        segment_err[0] = max(segment_err[0], _masked_err(state.hidden, hidden.numpy(), batch.attention_mask))
        torch_logits = []
        for i in range(engine.num_layers):
            onnx_state, onnx_logits = engine.layer(i, HiddenBatch(hidden.numpy(), batch.attention_mask))
            hidden, logits = model.layer(i, hidden, mask)
            torch_logits.append(logits.numpy())
            err = max(_masked_err(onnx_state.hidden, hidden.numpy(), batch.attention_mask), float(np.abs(onnx_logits - logits.numpy()).max()))
            segment_err[i + 1] = max(segment_err[i + 1], err)
        reference = np.stack(torch_logits)
        chained = engine.all_exit_logits(batch)
        chain_err = max(chain_err, float(np.abs(chained - reference).max()))
        for t in THRESHOLD_GRID:
            exit_mismatches += int((exit_layers(chained, t) != exit_layers(reference, t)).sum())
        rows += len(batch.lengths)
    report = {
        "examples": rows,
        "max_abs_error_per_segment": segment_err,
        "max_abs_logit_error_chained": chain_err,
        "exit_layer_mismatches": exit_mismatches,
        "tolerance": FP32_LOGIT_TOLERANCE if strict else None,
    }
    if strict and (chain_err > FP32_LOGIT_TOLERANCE or exit_mismatches):
        raise ParityError(
            f"ONNX and PyTorch disagree: chained logits differ by up to {chain_err:.2e} "
            f"(tolerance {FP32_LOGIT_TOLERANCE:.0e}), {exit_mismatches} exit-layer decisions differ over "
            f"{rows} examples x {len(THRESHOLD_GRID)} thresholds; per-segment max errors {segment_err}"
        )
    return report


def _masked_err(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Hidden-state error on real tokens only: padded positions carry no meaning."""
    keep = mask.astype(bool)
    return float(np.abs(a[keep] - b[keep]).max()) if keep.any() else 0.0
