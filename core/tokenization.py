"""Text -> model inputs, with the fast tokenizer from tokenizer.json.

Training, export and serving all tokenize through this one class, so the ids a request gets are
exactly the ids the model was trained and calibrated on. `tokenize` gives each text its own row,
unpadded; `pad` is the one place rows become a padded batch (the server pads once, when it forms
a batch; training and evaluation pad a whole split through `encode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, normalizers


class TokenizerError(ValueError):
    """tokenizer.json cannot be read; the message names the file."""


@dataclass(frozen=True)
class TokenRow:
    """One text (or text pair) as token ids, unpadded."""

    ids: np.ndarray  # (length,) int64
    type_ids: np.ndarray  # (length,) int64
    truncated: bool  # the text was longer than max_length tokens

    def __len__(self) -> int:
        return len(self.ids)


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


@dataclass(frozen=True)
class LengthBatches:
    """A split's rows in batches of similar length, and the way back to the split's order.

    Evaluation (PyTorch) and export (ONNX Runtime) both run a model over a whole split: sorted by
    length, each batch pads little; the answers must still line up with the split's labels.
    """

    batches: list[Encoded]
    order: np.ndarray  # the split positions of the batches' rows, batch after batch

    @classmethod
    def of(cls, encoded: Encoded, batch_size: int) -> LengthBatches:
        order = np.argsort(encoded.lengths, kind="stable")
        return cls([encoded.rows(order[i : i + batch_size]) for i in range(0, len(order), batch_size)], order)

    def in_split_order(self, per_batch: Iterable[np.ndarray]) -> np.ndarray:
        """One result per batch, rows along axis 1 (exit logits: (L, B, C)), joined in split order."""
        joined = np.concatenate(list(per_batch), axis=1)
        out = np.empty_like(joined)
        out[:, self.order] = joined
        return out


def pad(rows: Sequence[TokenRow], pad_id: int = 0) -> Encoded:
    """Rows -> one batch as wide as its longest row. Padded positions carry mask 0, so no real
    token attends to them and no exit reads them: the pad id changes no output."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    width = int(lengths.max()) if len(rows) else 0
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    types = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row.ids
        types[i, : len(row)] = row.type_ids
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    truncated = np.fromiter((r.truncated for r in rows), dtype=bool, count=len(rows))
    return Encoded(ids, mask, types, truncated, lengths)


def _printable_ascii(text: str | None) -> bool:
    return text is None or (text.isascii() and text.isprintable())


def _ascii_twin(tokenizer: Tokenizer) -> Tokenizer | None:
    """`tokenizer` with a normalizer that gives printable ASCII text the ids `tokenizer` gives it,
    for less work; None unless its normalizer is BERT's.

    BertNormalizer drops control characters, spaces out CJK characters, strips accents (Unicode
    decomposition, offsets tracked character by character) and lowercases: on printable ASCII
    only the lowercasing changes anything, yet the rest took a quarter of the encoder's time on
    short English texts (docs/results.md, "Tokenizing printable ASCII"). Special tokens are
    matched before normalizing, and pre-tokenizer, model, truncation and template are the same
    objects' copies, so the ids are too (tests/test_tokenization.py checks it by property)."""
    normalizer = tokenizer.normalizer
    if not isinstance(normalizer, normalizers.BertNormalizer):
        return None
    twin = Tokenizer.from_str(tokenizer.to_str())
    twin.normalizer = normalizers.Lowercase() if normalizer.lowercase else normalizers.Sequence([])
    return twin


class TextEncoder:
    def __init__(self, tokenizer_file: str | Path, max_length: int):
        self.max_length = max_length
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the tokenizers library raises its own Exception type
            raise TokenizerError(f"{tokenizer_file}: not a readable tokenizer.json ({err})") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_length)
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.ascii_tokenizer = _ascii_twin(self.tokenizer) or self.tokenizer  # for inputs that are printable ASCII

    def _tokenizer_for(self, *texts: str | None) -> Tokenizer:
        return self.ascii_tokenizer if all(map(_printable_ascii, texts)) else self.tokenizer

    def tokenize(self, texts: list[str], text_pairs: list[str] | None = None, parallel: bool = True) -> list[TokenRow]:
        """One row per text. encode_batch (`parallel`) releases the GIL, so a thread may call this
        while the event loop goes on serving. `parallel=False` for the event loop's own short
        inputs: encode_batch hands the texts to the tokenizer's thread pool and waits, and on a
        loaded CPU that wait (for pool threads the scheduler has not run) stalled the event loop for
        seconds; `encode`, one text at a time, keeps the GIL throughout."""
        pairs = text_pairs or [None] * len(texts)
        if parallel:
            inputs = list(zip(texts, text_pairs)) if text_pairs is not None else texts
            encodings = self._tokenizer_for(*texts, *pairs).encode_batch(inputs)
        else:
            encodings = [self._tokenizer_for(text, pair).encode(text, pair) for text, pair in zip(texts, pairs)]
        return [TokenRow(np.array(e.ids, dtype=np.int64), np.array(e.type_ids, dtype=np.int64), bool(e.overflowing))
                for e in encodings]

    def encode(self, texts: list[str], text_pairs: list[str] | None = None) -> Encoded:
        return pad(self.tokenize(texts, text_pairs), self.pad_id)
