"""The `romebert` command as a user runs it: sub-commands, outputs, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tiny_backbone import tiny_train_config


def romebert(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "romebert.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_stage():
    done = romebert("--help")
    assert done.returncode == 0
    for command in ("train", "evaluate", "export", "serve", "quickstart", "loadtest"):
        assert command in done.stdout


def test_unknown_command_is_an_error():
    done = romebert("frobnicate")
    assert done.returncode == 2 and "unknown command" in done.stderr


@pytest.mark.parametrize("serve_options,error", [
    (["--prot", "9000"], "romebert serve: error: unrecognized arguments: --prot 9000"),
    (["--port", "70000"], "romebert quickstart: error: port must be at most 65535, not 70000"),
])
def test_quickstart_checks_the_server_options_before_it_builds_anything(tmp_path, serve_options, error):
    done = romebert("quickstart", "--home", str(tmp_path / "home"), *serve_options)
    assert done.returncode == 2 and error in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "home").exists()  # no training started


def test_train_then_evaluate_writes_a_checkpoint_a_report_and_plots(tiny_backbone, tmp_path):
    cfg = tiny_train_config(tiny_backbone, tmp_path / "ckpt")
    done = romebert("train", "--backbone", cfg.backbone, "--output", cfg.output, "--limit", "32", "--epochs", "1",
                    "--batch-size", "16", "--max-length", "32", "--method", "deebert", "--no-gradient-regularization")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1" in done.stdout + done.stderr
    other = tmp_path / "other"
    done = romebert("train", "--backbone", cfg.backbone, "--output", str(other), "--limit", "32", "--epochs", "1",
                    "--batch-size", "16", "--max-length", "32", "--method", "finetune")
    assert done.returncode == 0, done.stderr[-2000:]
    reseeded = tmp_path / "reseeded"  # another seed splits the data differently: its dev rows are other examples
    done = romebert("train", "--backbone", cfg.backbone, "--output", str(reseeded), "--limit", "32", "--epochs", "1",
                    "--batch-size", "16", "--max-length", "32", "--method", "finetune", "--seed", "7")
    assert done.returncode == 0, done.stderr[-2000:]
    done = romebert("evaluate", cfg.output, str(other), str(reseeded), "--limit", "32", "--out", str(tmp_path / "eval"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "threshold" in done.stdout and "speed-up" in done.stdout and "95% interval" in done.stdout
    assert "finetune minus deebert, same examples" in done.stdout
    assert "reseeded and deebert are not compared pairwise: their runs' seeds (7, 42) split the data differently" in done.stdout
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["deebert"]["split"] == "dev"  # choices are made on dev; test is read when asked for by name
    assert len(report["deebert"]["per_exit"]) == 3 and len(report["deebert"]["sweep"]) == 13
    for row in report["deebert"]["per_exit"] + report["deebert"]["sweep"]:
        assert row["lo"] <= row["accuracy"] <= row["hi"]
    assert "paired_with_deebert" not in report["reseeded"]
    paired = report["finetune"]["paired_with_deebert"]
    assert paired["full_depth"]["lo"] <= paired["full_depth"]["difference"] <= paired["full_depth"]["hi"]
    assert len(paired["per_exit"]) == 3 and len(paired["sweep"]) == 13
    assert (tmp_path / "eval" / "per_exit_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "eval" / "accuracy_vs_speedup.png").stat().st_size > 1000


def test_train_with_recipe_trains_the_projects_settings_for_the_data_and_method_but_explicit_options_win(tiny_backbone, tmp_path):
    from romebert.training.recipes import settings_of

    out = tmp_path / "ckpt"
    done = romebert("train", "--recipe", "--data", "rotten_tomatoes", "--method", "romebert", "--backbone", str(tiny_backbone),
                    "--output", str(out), "--limit", "32", "--epochs", "1", "--precision", "fp32")
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((out / "training_record.json").read_text())["config"]
    recipe = settings_of("rotten_tomatoes", "romebert")
    assert recipe["exit_weight"] != 1.0 and recipe["max_length"] != 128  # differs from TrainConfig's defaults
    assert config["exit_weight"] == recipe["exit_weight"] and config["max_length"] == recipe["max_length"]
    assert config["batch_size"] == recipe["batch_size"]
    assert config["epochs"] == 1  # given on the command line


def test_a_recipes_subset_is_lifted_by_all_and_a_bad_cap_is_one_clear_line(tiny_backbone, tmp_path):
    from romebert.training.cli import _train_config
    from romebert.training.recipes import settings_of

    recipe = settings_of("imdb", "romebert")
    assert recipe["train_limit"] is not None and recipe["dev_limit"] is not None
    kept = _train_config(["--recipe", "--data", "imdb", "--method", "romebert"])
    assert (kept.train_limit, kept.dev_limit) == (recipe["train_limit"], recipe["dev_limit"])
    lifted = _train_config(["--recipe", "--data", "imdb", "--method", "romebert", "--train-limit", "all", "--dev-limit", "all"])
    assert (lifted.train_limit, lifted.dev_limit, lifted.epochs) == (None, None, recipe["epochs"])
    assert _train_config(["--limit", "all"]).limit is None and _train_config(["--limit", "7"]).limit == 7
    for bad in ("0", "-3", "many"):
        done = romebert("train", "--train-limit", bad, "--backbone", str(tiny_backbone), "--output", str(tmp_path / "out"))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert "positive number of examples or all" in done.stderr
    assert not (tmp_path / "out").exists()


def test_recipe_for_data_without_one_is_one_clear_line(tiny_backbone, tmp_path):
    data = tmp_path / "mine.csv"
    data.write_text("text,label\nfine,1\nbad,0\n")
    done = romebert("train", "--recipe", "--data", str(data), "--backbone", str(tiny_backbone), "--output", str(tmp_path / "out"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no recipe for" in done.stderr and "rotten_tomatoes" in done.stderr
    assert not (tmp_path / "out").exists()


def test_bad_data_is_one_clear_line_and_no_checkpoint(tiny_backbone, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,1\n,0\n")
    done = romebert("train", "--backbone", str(tiny_backbone), "--data", str(bad), "--output", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "bad.csv:3" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_refused(tiny_backbone, tmp_path):
    done = romebert("train", "--method", "magic", "--backbone", str(tiny_backbone), "--output", str(tmp_path / "o"))
    assert done.returncode == 2 and "method must be one of romebert, deebert, finetune, not 'magic'" in done.stderr


def test_evaluate_refuses_a_batch_size_below_one_before_it_loads_anything(tiny_checkpoint, tmp_path):
    done = romebert("evaluate", str(tiny_checkpoint), "--batch-size", "0", "--out", str(tmp_path / "eval"))
    assert done.returncode == 2 and "argument --batch-size: expected a positive whole number, not '0'" in done.stderr
    assert not (tmp_path / "eval").exists()


def test_evaluate_checks_every_folder_before_it_scores_any(tiny_checkpoint, tiny_bundle, tmp_path):
    done = romebert("evaluate", str(tiny_checkpoint), str(tiny_bundle), "--data", "rotten_tomatoes", "--out", str(tmp_path / "eval"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{tiny_bundle}: not a checkpoint folder (no config.json): it is a model bundle, which `romebert serve` takes" in done.stderr
    assert not (tmp_path / "eval").exists()  # nothing written, and no table printed for the first one
    assert "threshold" not in done.stdout
