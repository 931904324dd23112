"""Cut a MultiExitBert into ONNX segments: embeddings, then one graph per encoder layer + its exit.

A layer segment takes (hidden_states, attention_mask) and returns (next_hidden_states, logits), so
one call per layer both advances the rows and tells the server whether they may leave.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from romebert.training.model import MultiExitBert

OPSET = 17
_BATCH, _SEQ = "batch", "sequence"


class EmbeddingsSegment(torch.nn.Module):
    def __init__(self, model: MultiExitBert):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids, token_type_ids)


class LayerSegment(torch.nn.Module):
    def __init__(self, model: MultiExitBert, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.layer(self.index, hidden_states, attention_mask)


class FullDepthModel(torch.nn.Module):
    """The monolithic baseline: every layer, final exit only, one graph."""

    def __init__(self, model: MultiExitBert):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embed(input_ids, token_type_ids)
        for i in range(self.model.num_layers - 1):
            hidden, _ = self.model.layer(i, hidden, attention_mask)
        return self.model.layer(self.model.num_layers - 1, hidden, attention_mask)[1]


SIGNATURES = {
    "embeddings": (["input_ids", "token_type_ids"], ["hidden_states"]),
    "layer": (["hidden_states", "attention_mask"], ["next_hidden_states", "logits"]),
    "full": (["input_ids", "attention_mask", "token_type_ids"], ["logits"]),
}


def _export(module: torch.nn.Module, args: tuple, kind: str, path: Path) -> None:
    inputs, outputs = SIGNATURES[kind]
    dynamic = {name: {0: _BATCH, 1: _SEQ} for name in inputs + outputs}
    if "logits" in dynamic:
        dynamic["logits"] = {0: _BATCH}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: its graph is the one onnxruntime's transformer optimizer fuses.
        torch.onnx.export(
            module, args, str(path), input_names=inputs, output_names=outputs,
            dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
        )
    module.eval()  # torch.onnx.export leaves the module in training mode


def _sample_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows, one padded: (input_ids, attention_mask, token_type_ids) to trace the graphs with."""
    ids = torch.tensor([[101, 2023, 2003, 102, 0, 0], [101, 2204, 3185, 2003, 2307, 102]])
    return ids, (ids > 0).long(), torch.zeros_like(ids)


def export_segments(model: MultiExitBert, out_dir: Path, attention: str = "classic") -> list[dict]:
    """Write embeddings.onnx and layer_XX.onnx (fp32, unoptimised); return their manifest rows.

    attention "classic" is the form onnxruntime fuses; "eager" (unfused) exists to measure the gain.
    """
    model.eval()
    model.set_attention(attention)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids, mask, types = _sample_inputs()
    rows = []
    path = out_dir / "embeddings.onnx"
    _export(EmbeddingsSegment(model), (ids, types), "embeddings", path)
    rows.append({"name": "embeddings", "file": path.name, "inputs": SIGNATURES["embeddings"][0], "outputs": SIGNATURES["embeddings"][1], "exit": None})
    with torch.no_grad():
        hidden = model.embed(ids, types)
    for i in range(model.num_layers):
        path = out_dir / f"layer_{i + 1:02d}.onnx"
        _export(LayerSegment(model, i), (hidden, mask), "layer", path)
        rows.append({"name": f"layer_{i + 1}", "file": path.name, "inputs": SIGNATURES["layer"][0], "outputs": SIGNATURES["layer"][1], "exit": i + 1})
        with torch.no_grad():
            hidden, _ = model.layer(i, hidden, mask)
    return rows


def export_full_depth(model: MultiExitBert, path: Path, attention: str = "classic") -> None:
    model.eval()
    model.set_attention(attention)
    _export(FullDepthModel(model), _sample_inputs(), "full", path)


def write_select_rows(path: Path) -> None:
    """A one-node graph that keeps the surviving rows of the hidden states on the GPU (IO binding)."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["hidden_states", "rows"], ["selected"], axis=0)],
        "select_rows",
        [helper.make_tensor_value_info("hidden_states", TensorProto.FLOAT, [_BATCH, _SEQ, "hidden"]),
         helper.make_tensor_value_info("rows", TensorProto.INT64, ["kept"])],
        [helper.make_tensor_value_info("selected", TensorProto.FLOAT, ["kept", _SEQ, "hidden"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
