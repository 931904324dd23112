"""What the project publishes (checkpoints, bundles, results, reports): whole or not at all, and
with the permissions any new file gets, so that another user (a container's server mounting a
bundle read-only) can read what this one built."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

import pytest

from romebert.core.files import atomic_write, publish_dir, write_json


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def umask_now() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.fixture
def set_umask():
    before = umask_now()
    yield os.umask
    os.umask(before)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=lambda m: f"umask {m:03o}")
def test_a_file_written_atomically_gets_the_mode_open_would_give_it(tmp_path, set_umask, mask):
    set_umask(mask)
    path = tmp_path / "result.json"
    path.write_text("old")
    path.chmod(0o600)
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert mode(path) == 0o666 & ~mask


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "result.json"
    write_json(path, {"a": 1})

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text('{"a": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=lambda m: f"umask {m:03o}")
def test_a_published_folder_and_all_in_it_get_the_modes_of_new_files_and_folders(tmp_path, set_umask, mask):
    set_umask(mask)
    tmp = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as training and export make theirs
    (tmp / "segments").mkdir(mode=0o700)
    for name in ("model.safetensors", "segments/layer_01.onnx"):  # 0600, as safetensors writes its file
        (tmp / name).write_bytes(b"weights")
        (tmp / name).chmod(0o600)
    final = tmp_path / "bundle"
    publish_dir(tmp, final)
    assert [mode(final), mode(final / "segments")] == [0o777 & ~mask] * 2
    assert [mode(final / "model.safetensors"), mode(final / "segments" / "layer_01.onnx")] == [0o666 & ~mask] * 2


def test_a_trained_checkpoint_and_an_exported_bundle_are_readable_as_new_files_are(tiny_checkpoint, tiny_bundle):
    mask = umask_now()  # the session's, under which both were built
    for folder in (tiny_checkpoint, tiny_bundle, tiny_bundle / "segments"):
        assert mode(folder) == 0o777 & ~mask, folder
    for file in ("model.safetensors", "training_record.json", "config.json"):
        assert mode(tiny_checkpoint / file) == 0o666 & ~mask, file
    assert mode(tiny_bundle / "manifest.json") == 0o666 & ~mask
    assert {mode(f) for f in (tiny_bundle / "segments").iterdir()} == {0o666 & ~mask}
