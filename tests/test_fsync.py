"""A checkpoint marked complete must not come back empty after a power loss: on a local or NFS
disk, every file and then its directory is fsynced before the manifest is written, and the manifest
after. os.fsync and os.replace are wrapped to record what is synced and renamed, in order."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest
import torch

from cape_ray import checkpoint as ckpt, storage


@pytest.fixture
def synced(monkeypatch):
    """The events, in order: ('fsync', real path, whether a manifest existed then) and
    ('replace', source, target)."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        directory = path if os.path.isdir(path) else os.path.dirname(path)
        manifests = [os.path.join(d, name) for d in (directory, os.path.dirname(directory))
                     for name in (ckpt.MANIFEST, ckpt.MANIFEST_TMP)]
        events.append(("fsync", path, any(os.path.exists(m) for m in manifests)))
        fsync(fd)

    def recording_replace(source, target):
        events.append(("replace", os.path.realpath(source), os.path.realpath(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def assert_durable(events, checkpoint) -> None:
    """Every file fsynced before any manifest exists, then rng/ and the checkpoint directory, then
    the manifest (under its temporary name), its rename, and the directory again."""
    checkpoint = os.path.realpath(checkpoint)
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(checkpoint) for f in names
                   if f != ckpt.MANIFEST)
    assert len(files) == 6  # model, optimizer, scheduler, state.json and two rank files
    synced = [e[1] for e in events if e[0] == "fsync"]

    def first(path):
        assert path in synced, f"{path} was never fsynced: {synced}"
        return synced.index(path)

    manifest_tmp = os.path.join(checkpoint, ckpt.MANIFEST_TMP)
    manifest_at = first(manifest_tmp)
    for file in files:
        assert first(file) < manifest_at, f"{file} fsynced after the manifest"
    for _, path, manifest_existed in (e for e in events if e[0] == "fsync"):
        if path in files:
            assert not manifest_existed, f"a manifest existed when {path} was fsynced"
    rng_dir = os.path.join(checkpoint, "rng")
    rng_dir_at = synced.index(rng_dir, max(first(f) for f in files if f.startswith(rng_dir + "/")))
    checkpoint_at = synced.index(checkpoint, max(first(f) for f in files))
    assert rng_dir_at < manifest_at and checkpoint_at < manifest_at  # the directories before the manifest
    renamed = events.index(("replace", manifest_tmp, os.path.join(checkpoint, ckpt.MANIFEST)))
    assert events.index(("fsync", manifest_tmp, True)) < renamed
    assert any(e[:2] == ("fsync", checkpoint) for e in events[renamed:]), "the rename was not synced"
    assert any(e[:2] == ("fsync", os.path.dirname(checkpoint)) for e in events[renamed:]), \
        "the checkpoint's own entry was not synced"


def write(directory, durable=True):
    model = torch.nn.Linear(64, 64).state_dict()
    ranks = {rank: ckpt.serialize({"loss_sum": float(rank)}) for rank in range(2)}
    return ckpt.write_checkpoint(directory, model=model, optimizer={"state": {}, "param_groups": []},
                                 scheduler={"last_epoch": 0}, state={"epoch": 0}, rank_states=ranks, durable=durable)


def test_write_checkpoint_syncs_every_file_and_directory_before_the_manifest(tmp_path, synced):
    path = write(tmp_path / "ck")
    assert_durable(synced, path)
    assert ckpt.verify_checkpoint(path) == []


def test_a_staging_directory_can_skip_the_syncs(tmp_path, synced):
    path = write(tmp_path / "staging", durable=False)
    assert synced == [("replace", str(path / ckpt.MANIFEST_TMP), str(path / ckpt.MANIFEST))]
    assert ckpt.verify_checkpoint(path) == []


def test_upload_to_a_local_or_nfs_storage_syncs_before_the_manifest(tmp_path, synced):
    staging = write(tmp_path / "staging", durable=False)
    synced.clear()
    target = tmp_path / "storage" / "run" / "ck"
    storage.upload_checkpoint(str(staging), pafs.LocalFileSystem(), str(target))
    assert_durable(synced, target)
    assert ckpt.verify_checkpoint(target) == []


def test_an_export_on_a_local_storage_syncs_before_the_manifest(tmp_path, synced):
    source = write(tmp_path / "run" / "ck")
    synced.clear()
    target = tmp_path / "run" / "checkpoint_best_pck_e001_pck0.5000_valloss0.1000"
    storage.copy_checkpoint(pafs.LocalFileSystem(), str(source), str(target))
    assert_durable(synced, target)
    assert ckpt.verify_checkpoint(target) == []
