"""`romebert serve` with an engine that costs nothing: the server's own latency floor.

Everything a request meets is the real server (uvicorn with our protocol, the middlewares,
FastAPI and validation, tokenizing, admission, the scheduler's worker and its thread hops,
rendering), built by service.cli.build_server with the defaults of `romebert serve`; only the
engine is replaced by one whose layers return at once, every row confident at exit `--layers`.
So a request's latency here is what the server adds to the model's own time, which
bench/lone_request.py sets beside issue 14's c1 allowance (the engine's p50 + 1 ms).

    .venv/bin/python bench/instant_server.py artifacts/default-bundle --port 8001 [--layers 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from romebert.core.bundle import load_bundle  # noqa: E402
from romebert.core.engine import HiddenBatch  # noqa: E402
from romebert.core.tokenization import Encoded  # noqa: E402
from romebert.service.cli import build_server  # noqa: E402
from romebert.service.settings import Settings  # noqa: E402

SURE, UNSURE = [8.0, -8.0], [0.0, 0.0]  # entropy about 2e-6 nats (any threshold but 0 lets it leave), and ln 2


class InstantEngine:
    """The engine interface with no model: hidden states of width 1, exit logits unsure before
    layer `exit_layer` and sure from it on (a two-label bundle's shape). No `merge`: the default
    policy never merges cohorts."""

    device, backend, precision = "cpu", "instant", "none"

    def __init__(self, num_layers: int, exit_layer: int):
        self.num_layers = num_layers
        self.exit_layer = exit_layer

    def padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        return rows, width

    def embed(self, batch: Encoded) -> HiddenBatch:
        return HiddenBatch(np.zeros((*batch.input_ids.shape, 1), dtype=np.float32), batch.attention_mask)

    def layer(self, i: int, state: HiddenBatch) -> tuple[HiddenBatch, np.ndarray]:
        logits = SURE if i + 1 >= self.exit_layer else UNSURE
        return state, np.tile(np.array(logits, dtype=np.float32), (len(state.attention_mask), 1))

    def keep(self, state: HiddenBatch, rows: np.ndarray) -> HiddenBatch:
        return HiddenBatch(state.hidden[rows], state.attention_mask[rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="a bundle for the labels, the tokenizer and the layer count (its graphs are not run)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--layers", type=int, default=2, help="the exit every row leaves at")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle, verify=False)
    if len(bundle.labels) != len(SURE) or not 1 <= args.layers <= bundle.num_layers:
        parser.error(f"--layers must be 1..{bundle.num_layers}, and the bundle two-label")
    settings = Settings(bundle=str(args.bundle), host=args.host, port=args.port, log_level=args.log_level)
    build_server(settings, engine_factory=lambda *_: InstantEngine(bundle.num_layers, args.layers)).run()


if __name__ == "__main__":
    main()
