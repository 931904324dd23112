"""The texts a load test sends: from a file (text, CSV or JSONL) or from a built-in dataset's test split.

Real review texts matter: exit depth depends on the input, so a load test on "hello world" would
measure a server that never runs its deeper layers.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


class TextsError(ValueError):
    """Unusable texts source; the message names the file (and line when there is one)."""


@dataclass(frozen=True)
class TextItem:
    text: str
    text_pair: str | None = None


def load_texts(path: Path | None, dataset: str | None) -> list[TextItem]:
    """Texts from `path` when given, else the test split of `dataset` (via core.data, no torch)."""
    items = _from_file(path) if path is not None else _from_dataset(dataset or "rotten_tomatoes")
    if not items:
        raise TextsError(f"{path or dataset}: no texts")
    if len({item.text_pair is None for item in items}) > 1:
        raise TextsError(f"{path or dataset}: either every row has a text_pair or none does")
    return items


def _from_dataset(name: str) -> list[TextItem]:
    # Imported here so that a load test from a file never needs the training package's data files.
    from romebert.core.data import DataError, load_task

    try:
        task = load_task(name)
    except DataError as err:
        raise TextsError(str(err)) from None
    return [TextItem(e.text, e.text_pair) for e in task.test]


def _from_file(path: Path) -> list[TextItem]:
    if not path.is_file():
        raise TextsError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _from_csv(path)
    if suffix in (".jsonl", ".json"):
        return _from_jsonl(path)
    return [TextItem(line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _from_csv(path: Path) -> list[TextItem]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "text" not in (reader.fieldnames or []):
            raise TextsError(f"{path}:1: no 'text' column (columns: {', '.join(reader.fieldnames or [])})")
        return [TextItem(row["text"], row.get("text_pair") or None) for row in reader if (row["text"] or "").strip()]


def _from_jsonl(path: Path) -> list[TextItem]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TextsError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TextsError(f"{path}:{number}: expected an object with a string 'text'")
        pair = record.get("text_pair")
        items.append(TextItem(record["text"], pair if isinstance(pair, str) else None))
    return items
