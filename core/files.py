"""Atomic writes: a crash or kill leaves either the old file or the new one, never half of one.

What is published gets the permissions any new file or folder gets under the process's umask
(0644 and 0755 under the usual 022), not the private ones of the temporary names it was written
under (tempfile's 0600 and 0700, and safetensors' own 0600): a bundle built by one user is read
by another, such as the container's server mounting it read-only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    """The process's umask. os has no getter: set one and put it back (0o077 meanwhile, so a file
    another thread creates in between is private rather than open)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _as_new(path: Path, mask: int) -> None:
    """Give `path` the mode it would have had if created with open() or mkdir()."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary path beside `path`, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _as_new(Path(tmp), _umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def publish_dir(tmp_dir: Path, final: Path, force: bool = False) -> None:
    """Move a fully written folder into place, its permissions those of new files and folders;
    with force, replace what was there."""
    mask = _umask()
    for path in (tmp_dir, *Path(tmp_dir).rglob("*")):
        if not path.is_symlink():
            _as_new(path, mask)
    if final.exists():
        if not force:
            raise FileExistsError(f"{final} already exists (use --force to replace it)")
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp_dir, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final)
