"""What one /classify request carries: texts, batch size and profile, drawn per request.

The options live here, not in cli.py, so that `romebert loadtest` and the distributed-mode
locustfile accept the same workload flags and build the same requests.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from romebert.loadtest.profiles import Profile, profiles_from_args
from romebert.loadtest.texts import TextItem, load_texts


@dataclass(frozen=True)
class Request:
    profile: str
    body: dict[str, Any]
    items: int


@dataclass(frozen=True)
class Workload:
    texts: Sequence[TextItem]
    profiles: Sequence[Profile]
    batch: int = 1
    seed: int = 0

    def draw(self, rng: random.Random) -> Request:
        """A random profile (by weight) and `batch` random texts; one item goes as a plain string."""
        profile = rng.choices(self.profiles, weights=[p.weight for p in self.profiles])[0]
        picked = [rng.choice(self.texts) for _ in range(self.batch)]
        body: dict[str, Any] = {"text": [t.text for t in picked] if self.batch > 1 else picked[0].text}
        if picked[0].text_pair is not None:  # load_texts guarantees all or none have a pair
            body["text_pair"] = [t.text_pair for t in picked] if self.batch > 1 else picked[0].text_pair
        body.update(profile.overrides)
        return Request(profile.name, body, self.batch)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The workload flags; `parser` may also be Locust's (configargparse, argparse-compatible)."""
    group = parser.add_argument_group("workload")
    source = group.add_mutually_exclusive_group()
    # A str, not a Path: Locust's master ships these options to its workers as msgpack.
    source.add_argument("--texts", default=None,
                        help="texts file: .txt (one per line), .csv or .jsonl with a 'text' (and optional 'text_pair') field")
    source.add_argument("--dataset", default=None, help="dataset whose test split supplies the texts (default: rotten_tomatoes)")
    group.add_argument("--threshold", type=float, default=None, help="entropy_threshold sent with every request (default: the server's)")
    group.add_argument("--budget-ms", type=float, default=None, help="latency_budget_ms sent with every request")
    group.add_argument("--mix", default=None, help='weighted profiles instead, e.g. "threshold=0.1:0.5,budget=20:0.3,default:0.2"')
    group.add_argument("--batch", type=int, default=1, help="items per request (default 1)")
    group.add_argument("--seed", type=int, default=0, help="seed of the text and profile draws")


def workload_from_args(args: argparse.Namespace) -> Workload:
    """Raises ValueError (bad flags) or TextsError (bad texts source), both with a readable message."""
    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    profiles = profiles_from_args(args.threshold, args.budget_ms, args.mix)
    texts = load_texts(Path(args.texts) if args.texts else None, args.dataset)
    return Workload(texts, profiles, args.batch, args.seed)
