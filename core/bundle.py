"""The model bundle (DESIGN.md, Contract 2): manifest.json written (`seal`) and read (`load_bundle`).

The service reads nothing else before the manifest has vouched for it: the format version must
be one we know and every file's sha256 must match, or the bundle is refused with a clear error.
Export writes through `seal`, so the files the manifest lists and the files checked are one list.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from romebert.core.files import write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """The bundle cannot be served; the message says which file and why."""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class Segment:
    name: str
    file: str
    sha256: str
    inputs: list[str]
    outputs: list[str]
    exit: int | None  # 1-based exit layer this segment's logits belong to; None for embeddings


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def num_layers(self) -> int:
        return int(self.manifest["num_layers"])

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    @property
    def default_threshold(self) -> float:
        return float(self.manifest["default_threshold"])

    @property
    def pair_input(self) -> bool:
        """Whether the model was trained on text pairs (NLI, paraphrase) and takes text_pair."""
        return bool(self.manifest.get("pair_input", False))

    @property
    def segments(self) -> list[Segment]:
        return [Segment(**s) for s in self.manifest["segments"]]

    @property
    def tokenizer_file(self) -> Path:
        return self.root / self.manifest["tokenizer"]["file"]

    def path(self, relative: str) -> Path:
        return self.root / relative


def listed_files(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every entry of the manifest that names a file (and carries its sha256)."""
    return [*manifest["segments"], manifest["tokenizer"], *manifest.get("extras", {}).values()]


def seal(root: Path, manifest: dict[str, Any]) -> None:
    """Record the sha256 of every listed file, then write manifest.json atomically."""
    for entry in listed_files(manifest):
        entry["sha256"] = sha256_file(Path(root) / entry["file"])
    write_json(Path(root) / MANIFEST, manifest)


def load_bundle(root: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle folder; raise BundleError naming what is wrong."""
    root = Path(root)
    manifest_file = root / MANIFEST
    if not manifest_file.is_file():
        hint = f": it is a training checkpoint, which `romebert export {root} BUNDLE` makes a bundle of" if (root / "config.json").is_file() else ""
        raise BundleError(f"{root}: not a model bundle (no {MANIFEST}){hint}")
    try:
        manifest = json.loads(manifest_file.read_text())
    except OSError as err:  # permissions: a bundle built by another user, with private files
        raise BundleError(f"{manifest_file}: cannot be read ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise BundleError(f"{manifest_file}: not valid JSON ({err})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"{manifest_file}: format_version {version!r} is not supported (this server reads {FORMAT_VERSION})")
    required = ("labels", "num_layers", "max_length", "precision", "segments", "tokenizer", "default_threshold", "calibration")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise BundleError(f"{manifest_file}: missing fields {missing}")
    bundle = Bundle(root, manifest)
    layers = [s.exit for s in bundle.segments if s.exit is not None]
    if layers != list(range(1, bundle.num_layers + 1)):
        raise BundleError(f"{manifest_file}: segments carry exits {layers}, expected 1..{bundle.num_layers}")
    if verify:
        for entry in listed_files(manifest):
            path = root / entry["file"]
            if not path.is_file():
                raise BundleError(f"{path}: listed in the manifest but missing")
            try:
                digest = sha256_file(path)
            except OSError as err:
                raise BundleError(f"{path}: cannot be read ({err.strerror})") from None
            if digest != entry.get("sha256"):
                raise BundleError(f"{path}: sha256 does not match the manifest (corrupt or modified bundle)")
    return bundle
