"""Text -> model inputs, with the fast tokenizer from tokenizer.json.

Training, export and serving all tokenize through this one class, so the ids a request gets are
exactly the ids the model was trained and calibrated on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


@dataclass
class Encoded:
    input_ids: np.ndarray  # (B, S) int64
    attention_mask: np.ndarray  # (B, S) int64
    token_type_ids: np.ndarray  # (B, S) int64
    truncated: np.ndarray  # (B,) bool: the text was longer than max_length tokens
    lengths: np.ndarray  # (B,) int64: real tokens per row

    def rows(self, index: np.ndarray | list[int]) -> Encoded:
        """A sub-batch, trimmed to its own longest row so padding stays small."""
        index = np.asarray(index)
        width = int(self.lengths[index].max()) if len(index) else 0
        return Encoded(
            self.input_ids[index, :width],
            self.attention_mask[index, :width],
            self.token_type_ids[index, :width],
            self.truncated[index],
            self.lengths[index],
        )


class TextEncoder:
    def __init__(self, tokenizer_file: str | Path, max_length: int):
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)
        pad = self.tokenizer.padding or {}
        self.pad_id = pad.get("pad_id", self.tokenizer.token_to_id("[PAD]") or 0)

    def encode(self, texts: list[str], text_pairs: list[str] | None = None) -> Encoded:
        inputs = list(zip(texts, text_pairs)) if text_pairs is not None else texts
        encodings = self.tokenizer.encode_batch(inputs)
        lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
        width = int(lengths.max()) if len(encodings) else 0
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            types[row, : len(e.ids)] = e.type_ids
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        truncated = np.array([bool(e.overflowing) for e in encodings], dtype=bool)
        return Encoded(ids, mask, types, truncated, lengths)
