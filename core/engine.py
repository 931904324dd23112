"""The engine: one session per bundle segment (onnxruntime's, or OpenVINO's behind the same
`run`), run one layer at a time.

The scheduler decides which rows go on after each layer; the engine only runs segments and keeps
hidden states where they live. On CPU every session shares one global thread pool by default
(chained per-session pools that spin ran 8x slower than one graph at batch 1); per-session pools
that sleep between calls are the other choice (set_pool_spinning). On CUDA the hidden states
stay on the device between segments through IO binding; only each exit's small logits come back.
Export's parity check and calibration run through this same class.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnxruntime as ort

from romebert.core.bundle import Bundle, BundleError
from romebert.core.exits import can_leave_early, confident, entropy
from romebert.core.tokenization import Encoded

log = logging.getLogger("romebert.engine")

_pool_lock = threading.Lock()
_pool: dict = {"spin": True, "threads": None}  # how this process's sessions get CPU threads; fixed by the first


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_pool_spinning(spin: bool) -> None:
    """Choose, before the process's first session, how its sessions' CPU threads wait between calls.

    spin (the default): every session shares onnxruntime's process-wide pool, whose threads
    spin-wait between calls; the quickest lone call, but the spinning takes cores that the event
    loop needs under load. Not spin: each session has a pool of its own whose threads sleep
    between calls (onnxruntime has no switch for the shared pool's spinning). onnxruntime cannot
    mix the two in one process, so once a session exists the choice is fixed."""
    with _pool_lock:
        if _pool["threads"] is not None and _pool["spin"] != spin:
            raise RuntimeError(f"this process's onnxruntime sessions already {'spin' if _pool['spin'] else 'sleep'} between calls; "
                               "the choice is made once, before the first session")
        _pool["spin"] = spin


def _give_threads(options: ort.SessionOptions, threads: int) -> None:
    """Set a session's CPU threads the one way this process uses (set_pool_spinning). The shared
    pool belongs to onnxruntime's environment, created with the first session: it is sized then,
    and later sizes are ignored, so the first engine of a process decides and the rest share it."""
    with _pool_lock:
        if _pool["threads"] is None:
            if _pool["spin"]:
                ort.capi._pybind_state.set_global_thread_pool_sizes(threads, 1)
            _pool["threads"] = threads
        spin = _pool["spin"]
    if spin:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")


class DeviceError(RuntimeError):
    """The sessions cannot run on the device asked for; the message carries onnxruntime's reason."""


@contextmanager
def _onnxruntime_messages() -> Iterator[list[str]]:
    """Collect what onnxruntime says while a session is created: its C++ log goes to file
    descriptor 2 (a provider library that fails to load is reported only there) and its Python
    layer warns (a provider it does not have). Both are the reason a session fell back to the CPU."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            if text:
                sys.stderr.write(text)  # still shown, as onnxruntime meant it
            plain = re.sub(r"\x1b\[[0-9;]*m", "", text)  # onnxruntime colours its log lines
            lines += [line.strip() for line in plain.splitlines() if line.strip()]
            lines += [str(w.message) for w in caught]


BACKENDS = ("onnxruntime", "openvino")
OPENVINO_PRECISIONS = ("bf16", "f32")
_openvino = None  # not looked for yet; False: looked for, none here; else the plugin's CPU device


def openvino_device():
    """The OpenVINO plugin's CPU device, the plugin registered once per process; None when the
    plugin (PyPI onnxruntime-ep-openvino) is not installed or offers no CPU device here. It offers
    Intel devices only: its factory skips every hardware device whose vendor is not Intel (seen on
    an AMD EPYC: the plugin loads and lists nothing), though OpenVINO's CPU plugin runs there."""
    global _openvino
    with _pool_lock:
        if _openvino is None:
            try:
                import onnxruntime_ep_openvino as plugin
            except ImportError:
                _openvino = False
                return None
            ort.register_execution_provider_library("openvino", plugin.get_library_path())
            _openvino = next((d for d in ort.get_ep_devices() if d.ep_name == plugin.get_ep_name() and d.ep_metadata.get("ov_device") == "CPU"),
                             False)
        return _openvino or None


@functools.cache
def _openvino_core():
    """The process's one core of OpenVINO's own runtime (PyPI openvino), or None when it is not
    installed or sees no CPU device."""
    try:
        import openvino
    except ImportError:
        return None
    core = openvino.Core()
    return core if "CPU" in core.available_devices else None


def openvino_available() -> bool:
    """Whether backend 'openvino' can run here: through onnxruntime's plugin where it offers the
    CPU (Intel), else through OpenVINO's own runtime (any x86 CPU it supports)."""
    return openvino_device() is not None or _openvino_core() is not None


class _Request:
    """An OpenVINO infer request and the input arrays it points at (kept alive until its next call)."""

    def __init__(self, request: Any):
        self.request = request
        self.inputs: dict[str, np.ndarray] = {}


class OpenVinoSession:
    """A model compiled by OpenVINO's own runtime, behind the part of onnxruntime's session the
    engine uses (`run`, `get_providers`). OpenVINO's requests are not thread-safe, so a call takes
    a request no other call holds, from a pool that grows only when every request is busy (so to
    as many as threads call at once); outputs are copies (the next call reuses the request's
    buffers). The pool, not one request per thread: a request grows its buffers with the shapes it
    runs, so the one the warm-up ran every shape on (in the loading thread) is the one the worker
    uses, and no second request grows a second set under load (15-20 MB past capacity:
    docs/results.md, "One request for the warm-up and the worker").

    Inputs are handed over in place, as tensors on the caller's arrays: copying them cost small
    calls most (docs/results.md, "OpenVINO's inputs in place"). Always in place, never
    copied: a copying call writes into the tensor the request already holds, which after an in-place
    call is the earlier caller's array (a larger shape raises, a smaller one overwrites it). The
    request keeps pointing at the arrays after the call, so they are kept alive with it until its
    next call."""

    def __init__(self, compiled: Any):
        from openvino import Tensor

        self._compiled = compiled
        self._outputs = list(compiled.outputs)  # in the graph's order, as onnxruntime's run(None, ...) returns them
        self._dtypes = {port.any_name: port.get_element_type().to_dtype() for port in compiled.inputs}
        self._tensor = Tensor
        self._idle: list[_Request] = []  # requests no call holds; list.pop and list.append are atomic, so no lock

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            held = self._idle.pop()  # the one used last: its buffers are the warm ones
        except IndexError:
            held = _Request(self._compiled.create_infer_request())
        try:
            request = held.request
            # OpenVINO shares only C-contiguous, writeable arrays of the graph's dtype; others are copied here, once
            held.inputs = {name: np.require(array, self._dtypes[name], ("C", "W")) for name, array in feeds.items()}
            for name, array in held.inputs.items():
                request.set_tensor(name, self._tensor(array, shared_memory=True))
            request.infer()
            return [request.get_tensor(key).data.copy() for key in (self._outputs if output_names is None else output_names)]
        finally:
            self._idle.append(held)

    def get_providers(self) -> list[str]:
        return ["OpenVINO (runtime, CPU)"]


def open_openvino_session(path: str | Path, precision: str, threads: int, streams: int = 1) -> ort.InferenceSession | OpenVinoSession:
    """A session on OpenVINO's CPU plugin, computing in `precision` (bf16 runs on AMX/AVX512-BF16).
    Through onnxruntime's OpenVINO plugin where it offers this CPU (it then takes the hint through
    load_config, not the EP's own precision option), else through OpenVINO's own runtime, with the
    same settings.

    `streams`: how many calls may run at once, each on its own `threads` threads. OpenVINO runs
    the calls of one stream one after another, so workers that share a session need one stream
    each, or they take turns."""
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {OPENVINO_PRECISIONS}, not {precision!r}")
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads * streams, "NUM_STREAMS": streams}
    device = openvino_device()
    if device is None:
        core = _openvino_core()
        if core is None:
            raise DeviceError("backend 'openvino' asked for, but neither onnxruntime-ep-openvino offers a CPU device here nor is "
                              "OpenVINO's runtime installed (pip install 'romebert[openvino]')")
        try:
            return OpenVinoSession(core.compile_model(core.read_model(str(path)), "CPU", config))
        except Exception as err:  # noqa: BLE001 - OpenVINO's own exception types
            raise BundleError(f"{path}: OpenVINO cannot load it ({type(err).__name__}: {err})") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    _give_threads(options, threads)  # for the nodes OpenVINO leaves to onnxruntime
    options.add_provider_for_devices([device], {"load_config": json.dumps({"CPU": config})})
    try:
        return ort.InferenceSession(str(path), sess_options=options)
    except Exception as err:  # noqa: BLE001 - onnxruntime's own exception types
        raise BundleError(f"{path}: OpenVINO cannot load it ({type(err).__name__}: {err})") from None


def open_session(path: str | Path, device: str = "cpu", threads: int | None = None) -> ort.InferenceSession:
    """A session configured the way every session of this project is: CPU threads as the process
    chose (set_pool_spinning), and on CUDA the CUDA provider, verified: a session that onnxruntime put on the CPU instead raises
    DeviceError with onnxruntime's own reason, never a silent fall-back. A file onnxruntime cannot
    load raises BundleError naming it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Every session, CUDA ones too: once a process has the shared pool, onnxruntime refuses any
    # session with threads of its own (and CUDA sessions run their CPU-placed nodes on it).
    _give_threads(options, threads or default_threads())
    if device != "cuda":
        return _load(path, options, ["CPUExecutionProvider"])
    with _onnxruntime_messages() as messages:
        session = _load(path, options, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        reason = "; ".join(messages) or "onnxruntime gave no reason"
        raise DeviceError(f"{path}: onnxruntime runs this session on {session.get_providers()}, not on CUDA: {reason}")
    return session


def _load(path: str | Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as err:  # onnxruntime's own exception types (InvalidProtobuf, Fail, NoSuchFile)
        raise BundleError(f"{path}: onnxruntime cannot load it ({type(err).__name__}: {err})") from None


def resolve_device(device: str, probe: str | Path | None = None) -> str:
    """"cpu" or "cuda". cuda must be offered by onnxruntime (and, given a probe model, really run
    it); auto is cuda only when a probe session really lands on CUDA, else the CPU with a warning."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    available = ort.get_available_providers()
    if device == "cpu" or (device == "auto" and "CUDAExecutionProvider" not in available):
        return "cpu"
    if "CUDAExecutionProvider" not in available:
        raise DeviceError(f"device 'cuda' asked for, but this onnxruntime offers only {available} (install onnxruntime-gpu)")
    if probe is not None:
        try:
            open_session(probe, "cuda")
        except DeviceError as err:
            if device == "cuda":
                raise
            log.warning("device auto: CUDA does not work here, serving on the CPU (%s)", err)
            return "cpu"
    return "cuda"


@dataclass
class HiddenBatch:
    """Hidden states of the rows still running, and their attention mask (always on the host).

    With shape buckets the arrays may hold more rows than `rows`: copies of the last real row that
    fill the batch up to its bucket, whose outputs are never read."""

    hidden: Any  # np.ndarray, or an ort.OrtValue on the sessions' device with IO binding
    attention_mask: np.ndarray
    rows: int = -1  # real rows; -1: all of them

    def __post_init__(self) -> None:
        if self.rows < 0:
            self.rows = self.attention_mask.shape[0]

    def __len__(self) -> int:
        return self.rows


def _up_to(n: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if b >= n), n)


# Every size up to 8 rows, then steps of an eighth to a quarter of the size: a bucket's copies of
# the last row are computed like real rows, and at c32 (about 6 rows a layer call) the coarser
# 1, 2, 4, 8, 12, 16, 24, 32 spent 13% of the items/s on them (docs/results.md, "Finer row buckets").
ROW_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128)
WIDTH_STEP = 16


class Engine:
    """`io_binding` (default: on for CUDA only) keeps hidden states as OrtValues on the sessions'
    device between segments. On a CPU it only adds bookkeeping, but it lets the CUDA path's logic
    (bindings, the on-device row gather, merges) be tested on any machine.

    backend "openvino" runs the segments on OpenVINO's CPU plugin in `precision` (bf16 or f32).
    OpenVINO compiles a graph anew for every input shape it has not seen (tens of milliseconds
    on this model), so there every batch is padded to a shape bucket, rows to ROW_BUCKETS and
    width to a multiple of WIDTH_STEP, and `shapes()` lists them all for the warm-up: no first
    call at a new shape ever lands on a request. `buckets` (default: on for OpenVINO only) does
    the same on onnxruntime, where it only adds padding, so that the buckets' logic is tested on
    machines without OpenVINO, as io_binding's is without a GPU. `streams` (OpenVINO only): how
    many threads may call the engine at once without taking turns, each with `threads` threads."""

    def __init__(self, bundle: Bundle, device: str = "auto", threads: int | None = None, io_binding: bool | None = None,
                 backend: str = "onnxruntime", precision: str = "bf16", buckets: bool | None = None, streams: int = 1):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.bundle = bundle
        segments = bundle.segments
        self.backend = backend
        self.device = "cpu" if backend == "openvino" else resolve_device(device, probe=bundle.path(segments[0].file))
        if backend == "openvino" and device == "cuda":
            raise DeviceError("backend 'openvino' runs on the CPU; device 'cuda' needs backend 'onnxruntime'")
        self.threads = threads or default_threads()
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        if backend == "openvino" and self.io_binding:
            raise ValueError("backend 'openvino' keeps hidden states on the host: no io_binding")
        self.precision = precision if backend == "openvino" else bundle.precision
        self.bucketed = backend == "openvino" if buckets is None else buckets
        if self.bucketed and self.io_binding:
            raise ValueError("shape buckets pad hidden states on the host: not with io_binding")

        def session(path: Path) -> ort.InferenceSession:
            if backend == "openvino":
                return open_openvino_session(path, precision, self.threads, streams)
            return open_session(path, self.device, self.threads)

        self._embeddings = session(bundle.path(segments[0].file))
        self._layers = [session(bundle.path(s.file)) for s in segments[1:]]
        self._select = None
        if self.io_binding:
            self._select = open_session(bundle.path(bundle.manifest["extras"]["select_rows"]["file"]), self.device, self.threads)

    @property
    def providers(self) -> list[str]:
        """The execution providers onnxruntime really gave the sessions, best first."""
        return self._embeddings.get_providers()

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def shapes(self, max_rows: int, max_width: int) -> list[tuple[int, int]] | None:
        """Every (rows, width) this engine runs for batches up to these sizes, when it pads to
        buckets; None when it runs any shape as it comes."""
        if not self.bucketed:
            return None
        rows = sorted({self._bucket(n, 1)[0] for n in range(1, max_rows + 1)})
        widths = range(WIDTH_STEP, self._bucket(1, max_width)[1] + 1, WIDTH_STEP)
        return [(r, w) for r in rows for w in widths]

    def _bucket(self, rows: int, width: int) -> tuple[int, int]:
        return _up_to(rows, ROW_BUCKETS), -(-width // WIDTH_STEP) * WIDTH_STEP

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        """The (rows, width) this engine runs a batch of `rows` rows `width` tokens wide at."""
        return self._bucket(rows, width) if self.bucketed else (rows, width)

    def embed(self, batch: Encoded) -> HiddenBatch:
        n = len(batch.lengths)
        ids, types, mask = batch.input_ids, batch.token_type_ids, batch.attention_mask
        if self.bucketed:  # extra rows repeat the last real one; extra columns are padding (mask 0)
            rows, width = self._bucket(n, ids.shape[1])
            index = np.minimum(np.arange(rows), n - 1)
            widen = lambda a: np.pad(a[index], ((0, 0), (0, width - a.shape[1])))  # noqa: E731
            ids, types, mask = widen(ids), widen(types), widen(mask)
        feeds = {"input_ids": ids, "token_type_ids": types}
        if not self.io_binding:
            (hidden,) = self._embeddings.run(None, feeds)
            return HiddenBatch(hidden, mask, n)
        binding = self._embeddings.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("hidden_states", self.device)
        self._embeddings.run_with_iobinding(binding)
        return HiddenBatch(binding.get_outputs()[0], batch.attention_mask)

    def layer(self, i: int, state: HiddenBatch) -> tuple[HiddenBatch, np.ndarray]:
        """Encoder layer i (0-based) and exit i+1: (next hidden states, exit logits on the host)."""
        session = self._layers[i]
        if not self.io_binding:
            hidden, logits = session.run(None, {"hidden_states": state.hidden, "attention_mask": state.attention_mask})
            return HiddenBatch(hidden, state.attention_mask, state.rows), logits[: state.rows]
        binding = session.io_binding()
        binding.bind_ortvalue_input("hidden_states", state.hidden)
        binding.bind_cpu_input("attention_mask", state.attention_mask)
        binding.bind_output("next_hidden_states", self.device)
        binding.bind_output("logits", "cpu")
        session.run_with_iobinding(binding)
        hidden, logits = binding.get_outputs()
        return HiddenBatch(hidden, state.attention_mask), logits.numpy()

    def keep(self, state: HiddenBatch, rows: np.ndarray) -> HiddenBatch:
        """Only `rows` go on; with IO binding the gather runs on the device, not through the host."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        if self.bucketed:  # the same one gather pads back to the bucket
            rows = rows[np.minimum(np.arange(self._bucket(n, 1)[0]), n - 1)]
        mask = state.attention_mask[rows]
        if not self.io_binding:
            return HiddenBatch(state.hidden[rows], mask, n)
        binding = self._select.io_binding()
        binding.bind_ortvalue_input("hidden_states", state.hidden)
        binding.bind_cpu_input("rows", rows)
        binding.bind_output("selected", self.device)
        self._select.run_with_iobinding(binding)
        return HiddenBatch(binding.get_outputs()[0], mask)

    def merge(self, states: list[HiddenBatch]) -> HiddenBatch:
        """Stack batches that sit at the same depth into one, zero-padding the narrower ones.

        Exact for BERT: padded positions carry mask 0, so no real token attends to them, and the
        exits pool [CLS] or the masked mean, so what the padded positions compute is never read.
        With IO binding the stacking goes through the host; merges are rare next to layer calls.
        """
        width = max(s.attention_mask.shape[1] for s in states)
        mask = np.concatenate([np.pad(s.attention_mask[: s.rows], ((0, 0), (0, width - s.attention_mask.shape[1]))) for s in states])
        hidden = [(s.hidden.numpy() if self.io_binding else s.hidden)[: s.rows] for s in states]
        stacked = np.concatenate([np.pad(h, ((0, 0), (0, width - h.shape[1]), (0, 0))) for h in hidden])
        if self.bucketed:
            return self.keep(HiddenBatch(stacked, mask), np.arange(len(mask)))
        if not self.io_binding:
            return HiddenBatch(stacked, mask)
        return HiddenBatch(ort.OrtValue.ortvalue_from_numpy(stacked, self.device, 0), mask)

    def all_exit_logits(self, batch: Encoded) -> np.ndarray:
        """Logits of every exit for every row, shape (L, B, C): what parity and calibration need."""
        state = self.embed(batch)
        out = []
        for i in range(self.num_layers):
            state, logits = self.layer(i, state)
            out.append(logits)
        return np.stack(out)


def run_early_exit(engine: Engine, batch: Encoded, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offline early exit for one batch: (logits at each row's exit (B, C), exit layer (B,)).

    Rows leave at the first exit whose entropy is below their own threshold; only the survivors
    run the next layer. The server's scheduler does the same with budgets and arrivals on top.
    The exit test is skipped when no row can leave early (see can_leave_early).
    """
    n = len(batch.lengths)
    out_logits = np.zeros((n, len(engine.bundle.labels)), dtype=np.float32)
    out_layer = np.full(n, engine.num_layers, dtype=np.int64)
    alive = np.arange(n)
    test_exits = can_leave_early(thresholds)
    state = engine.embed(batch)
    for i in range(engine.num_layers - 1):
        state, logits = engine.layer(i, state)
        if not test_exits:
            continue
        done = confident(entropy(logits), thresholds[alive])
        if done.any():
            out_logits[alive[done]] = logits[done]
            out_layer[alive[done]] = i + 1
            if done.all():
                return out_logits, out_layer
            alive = alive[~done]
            state = engine.keep(state, np.flatnonzero(~done))
    state, logits = engine.layer(engine.num_layers - 1, state)
    out_logits[alive] = logits
    return out_logits, out_layer
