"""storage.size_problems: a checkpoint's manifest against the stored files' sizes, without reading
the files (what the best exports need at every start); storage.problems reads every byte."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from cape_ray import storage
from tiny import make_config, write_checkpoint

NAME = "checkpoint_e001_lr3e-3_bs2_acc2_qpe2"


class ReadRecorder(pafs.LocalFileSystem):
    """The local filesystem, recording which files are opened for reading."""

    def __init__(self):
        super().__init__()
        self.opened = []

    def open_input_stream(self, path, *args, **kwargs):
        self.opened.append(path)
        return super().open_input_stream(path, *args, **kwargs)

    def open_input_file(self, path):
        self.opened.append(path)
        return super().open_input_file(path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return write_checkpoint(root, NAME, make_config(root), ranks=2)


@pytest.fixture
def checkpoint(pristine, tmp_path):
    copy = tmp_path / NAME
    storage.copy_checkpoint(pafs.LocalFileSystem(), str(pristine), str(copy))
    return copy


def test_a_complete_checkpoint_passes_reading_only_its_manifest(checkpoint):
    fs = ReadRecorder()
    assert storage.size_problems(fs, str(checkpoint)) == []
    assert fs.opened == [f"{checkpoint}/manifest.json"]


def test_a_file_corrupted_at_its_size_needs_the_full_check(checkpoint):
    data = bytearray((checkpoint / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (checkpoint / "optimizer.pt").write_bytes(bytes(data))
    fs = pafs.LocalFileSystem()
    assert storage.size_problems(fs, str(checkpoint)) == []  # the cheap check reads no file
    assert storage.problems(fs, str(checkpoint)) == [f"{checkpoint}/optimizer.pt does not match its SHA-256 in the "
                                                     f"manifest (corrupted)"]


@pytest.mark.parametrize("damage, expected", [
    (lambda c: (c / "manifest.json").unlink(), "{c}/manifest.json is missing (checkpoint incomplete)"),
    (lambda c: (c / "optimizer.pt").write_bytes(b"x" * 100), "{c}/optimizer.pt has 100 bytes, manifest says"),
    (lambda c: (c / "rng" / "rank_00001.pt").unlink(), "{c}/rng/rank_00001.pt is missing"),
    (lambda c: (c / "rng" / "rank_00002.pt").write_bytes(b"x"), "{c}/rng/rank_00002.pt is not listed in"),
    (lambda c: (c / "manifest.json").write_text("{"), "{c}/manifest.json is unreadable"),
    (lambda c: _relist(c, "../../elsewhere/model.pt"), "lists '../../elsewhere/model.pt', which is not a relative"),
])
def test_what_the_sizes_show_is_found(checkpoint, damage, expected):
    damage(checkpoint)
    found = storage.size_problems(pafs.LocalFileSystem(), str(checkpoint))
    assert expected.format(c=checkpoint) in "\n".join(found), found
    assert storage.problems(pafs.LocalFileSystem(), str(checkpoint))  # the full check finds it too


def test_a_missing_directory_is_incomplete(tmp_path):
    assert storage.size_problems(pafs.LocalFileSystem(), str(tmp_path / "gone")) == [
        f"{tmp_path}/gone/manifest.json is missing (checkpoint incomplete)"]


def _relist(checkpoint, name):
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = manifest["files"]["model.pt"]
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
