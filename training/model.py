"""The multi-exit BERT: transformers' own embeddings and layers, an exit head after every layer.

Names follow the RomeBERT / DeeBERT papers: exit i (1-based) reads the hidden states after
encoder layer i; exit L is the final classifier. The module is deliberately flat (embeddings,
layers, exits) so that export can cut it into per-layer segments without reaching into internals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AttentionInterface, BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertPooler

WEIGHTS_NAME = "model.safetensors"

EXIT_POOLINGS = ("auto", "cls", "mean")  # what an exit head reads: auto = the backbone's own pooling


def masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens' hidden states, (B, S, H) -> (B, H); padding never counts."""
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ExitHead(nn.Module):
    """pooler (Linear H->H + tanh) -> dropout -> Linear(H, C), as in DeeBERT's highways.

    The pooler reads the [CLS] hidden state (BERT's own pooling, the paper's choice) or, with
    exit_pooling "mean", the mean of the real tokens' hidden states. Backbones trained with mean
    pooling (sentence-transformers models such as all-MiniLM-L6-v2) carry an almost constant [CLS]
    state in their early layers, on which early exits cannot learn (measured: chance accuracy).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.mean_pooling = getattr(config, "exit_pooling", "cls") == "mean"
        self.pooler = BertPooler(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(hidden_states, attention_mask) if self.mean_pooling else hidden_states[:, 0]
        return self.classifier(self.dropout(self.pooler.activation(self.pooler.dense(pooled))))


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient times `scale` backward (gradient equilibrium)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def extended_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) 1/0 mask -> (B, 1, 1, S) additive mask that BertLayer adds to attention scores.

    -10000 (classic BERT) rather than the dtype's minimum: exp() is 0 either way in fp32, it is
    safe in fp16, and it is the pattern onnxruntime's attention fusion recognises.
    """
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * -10000.0


def classic_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention written as BERT's original graph (scores / sqrt(d), + mask, softmax).

    Numerically the same as transformers' eager attention; exported, it matches the subgraph that
    onnxruntime's transformer optimizer fuses into one Attention operator (the eager version,
    which multiplies by a scaling constant, does not fuse).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.size(-1))
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register("classic", classic_attention)


class MultiExitBert(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        if config.num_labels < 2:
            raise ValueError("a multi-exit classifier needs num_labels >= 2")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config, layer_idx=i) for i in range(config.num_hidden_layers))
        self.exits = nn.ModuleList(ExitHead(config) for _ in range(config.num_hidden_layers))
        self.gradient_equilibrium = bool(getattr(config, "gradient_equilibrium", False))
        self.apply(self._init_weights)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def set_attention(self, implementation: str) -> None:
        """'sdpa' to train, 'classic' to export (see classic_attention), 'eager' for reference."""
        self.config._attn_implementation = implementation

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def layer(self, i: int, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder layer i (0-based) and its exit: (next hidden states, exit logits).

        `attention_mask` is the plain (B, S) mask; this is exactly what one exported segment does.
        """
        hidden_states = self.layers[i](hidden_states, extended_attention_mask(attention_mask, hidden_states.dtype))
        return hidden_states, self.exits[i](hidden_states, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        num_layers: int | None = None,
    ) -> torch.Tensor:
        """Logits of every exit, shape (L, B, C); `num_layers` stops after that many layers."""
        hidden_states = self.embed(input_ids, token_type_ids)
        mask = extended_attention_mask(attention_mask, hidden_states.dtype)
        logits = []
        for i in range(num_layers or self.num_layers):
            hidden_states = self.layers[i](hidden_states, mask)
            z = self.exits[i](hidden_states, attention_mask)
            if self.gradient_equilibrium and i < self.num_layers - 1:
                z = _ScaleGradient.apply(z, 1.0 / (self.num_layers - 1 - i))
            logits.append(z)
        return torch.stack(logits)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_backbone(
        cls, path: str | Path, labels: list[str], attn_implementation: str = "sdpa", exit_pooling: str = "auto"
    ) -> MultiExitBert:
        """A fresh multi-exit model on a local BERT checkpoint folder (config.json + model.safetensors).

        Every exit's pooler starts as a copy of the backbone's pooler when the checkpoint has one.
        exit_pooling "auto" follows the backbone's own pooling (see backbone_pooling).
        """
        path = Path(path)
        config = load_bert_config(path)
        if exit_pooling not in EXIT_POOLINGS:
            raise ValueError(f"exit_pooling must be one of {', '.join(EXIT_POOLINGS)}, not {exit_pooling!r}")
        config.exit_pooling = backbone_pooling(path) if exit_pooling == "auto" else exit_pooling
        config.num_labels = len(labels)
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        config._attn_implementation = attn_implementation
        model = cls(config)
        state = _backbone_state_dict(path)
        pooler = {k.removeprefix("pooler."): v for k, v in state.items() if k.startswith("pooler.")}
        body = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        missing, _ = model.load_state_dict(body, strict=False)
        missing_body = [k for k in missing if not k.startswith("exits.")]
        if missing_body:
            raise ValueError(f"{path}: backbone checkpoint lacks {len(missing_body)} weights, e.g. {missing_body[:3]}")
        if pooler:
            for head in model.exits:
                head.pooler.load_state_dict(pooler)
        return model

    @classmethod
    def from_checkpoint(cls, path: str | Path, attn_implementation: str = "sdpa") -> MultiExitBert:
        """Load a multi-exit checkpoint written by training.checkpoint.save_checkpoint."""
        path = Path(path)
        config = load_bert_config(path)
        if not getattr(config, "multi_exit", False):
            raise ValueError(f"{path}: config.json is not a multi-exit checkpoint (no 'multi_exit' key)")
        config._attn_implementation = attn_implementation
        model = cls(config)
        model.eval()
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
        model.load_state_dict(load_file(str(weights)), strict=True)
        return model


def backbone_pooling(path: Path) -> str:
    """"mean" when the folder is a sentence-transformers model pooled by mean, else BERT's "cls"."""
    pooling = path / "1_Pooling" / "config.json"
    if pooling.is_file() and json.loads(pooling.read_text()).get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


def load_bert_config(path: Path) -> BertConfig:
    config_file = path / "config.json"
    if not config_file.is_file():
        hint = ": it is a model bundle, which `romebert serve` takes" if (path / "manifest.json").is_file() else ""
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json){hint}")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    if raw.get("model_type") != "bert":
        raise ValueError(f"{path}: unsupported architecture {raw.get('model_type')!r}; only BERT checkpoints are supported")
    return BertConfig.from_pretrained(str(path))


def _backbone_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Backbone weights renamed to this module's names, whatever head the checkpoint was saved with."""
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} (pickle checkpoints are not loaded, convert to safetensors)")
    renamed = {}
    for key, value in load_file(str(weights)).items():
        key = key.removeprefix("bert.")
        if key.startswith("encoder.layer."):
            key = "layers." + key.removeprefix("encoder.layer.")
        if key.startswith(("embeddings.", "layers.", "pooler.")) and not key.endswith("position_ids"):
            renamed[key] = value
    return renamed
