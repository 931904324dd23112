"""Carry a file larger than one transfer allows (a 256 MB onnxruntime-gpu wheel, a bundle archive):
split it into parts here, join and check it there.

    python bench/wheel_parts.py split BIG_FILE PARTS_DIR [--mb 45]   # writes PARTS_DIR/NAME.partNN and NAME.sha256
    python bench/wheel_parts.py join PARTS_DIR OUT_DIR               # rebuilds OUT_DIR/NAME, exits 1 if the sha256 differs

The sha256 of the whole file travels beside the parts, so a part lost or truncated on the way is
caught before pip installs anything. Standard library only: the GPU host may have nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def split(source: Path, parts_dir: Path, mb: int) -> list[Path]:
    parts_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    with open(source, "rb") as f:
        while chunk := f.read(mb << 20):
            part = parts_dir / f"{source.name}.part{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
    (parts_dir / f"{source.name}.sha256").write_text(f"{sha256(source)}  {source.name}\n")
    return parts


def join(parts_dir: Path, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    joined = []
    for checksum in sorted(parts_dir.glob("*.sha256")):
        expected, name = checksum.read_text().split()
        target = out_dir / name
        with open(target, "wb") as out:
            for part in sorted(parts_dir.glob(f"{name}.part*")):
                out.write(part.read_bytes())
        if sha256(target) != expected:
            target.unlink()
            raise SystemExit(f"{name}: sha256 does not match {checksum} (a part is missing or damaged)")
        joined.append(target)
    return joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split")
    s.add_argument("source", type=Path)
    s.add_argument("parts_dir", type=Path)
    s.add_argument("--mb", type=int, default=45)
    j = sub.add_parser("join")
    j.add_argument("parts_dir", type=Path)
    j.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    done = split(args.source, args.parts_dir, args.mb) if args.command == "split" else join(args.parts_dir, args.out_dir)
    print("\n".join(str(p) for p in done))


if __name__ == "__main__":
    sys.exit(main())
