"""Per-segment optimisation: onnxruntime's transformer optimizer, fp16 for GPU, dynamic int8 for CPU."""

from __future__ import annotations

import logging
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model

PRECISIONS = ("fp32", "fp16", "int8")
AUTO = "auto"  # export: fp32 and int8 both built and measured on this CPU (model_export/backends.py), one published
AUTO_CANDIDATES = ("fp32", "int8")


def optimize_segment(src: Path, dst: Path, precision: str, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Write the optimised segment to dst; return the counts of fused operators it contains.

    int8 is quantized before optimizing: the optimizer's fused nodes (Attention, SkipLayerNorm)
    would otherwise hide the MatMul weights from the quantizer. opt_level 0 runs the Python fusions
    only: the saved graph stays portable (onnxruntime applies its own graph optimisations when the
    server loads it), and no onnxruntime session is created here, which would clash with the
    process-wide thread pool an engine may already have set up.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    source = src
    if precision == "int8":
        source = dst.with_suffix(".q.onnx")
        quantize_dynamic(str(src), str(source), weight_type=QuantType.QInt8, per_channel=True)
    model = optimize_model(str(source), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0)
    if precision == "fp16":
        model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))
    if source != src:
        source.unlink()
    return {op: n for op, n in model.get_fused_operator_statistics().items() if n}
