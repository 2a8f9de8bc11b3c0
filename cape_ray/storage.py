"""Run directories on any pyarrow filesystem (local, NFS, s3://...): list, fetch, copy, delete.

Ray keeps a run at `{storage_path}/{name}`; checkpoints are its `checkpoint_*` subdirectories.
Everything here goes through pyarrow so the same code serves local disks and object stores, except
copies onto a local or NFS disk: those fsync every file and directory before the manifest, which a
power loss could otherwise leave vouching for files that never reached the disk (a completed S3
PUT is durable already).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from typing import Iterator, Optional

import pyarrow.fs as pafs

from cape_ray.checkpoint import (MANIFEST, MANIFEST_TMP, fsync_directory, listing_problems, parse_manifest,
                                 position_from_name, verify_checkpoint)

log = logging.getLogger("cape_ray")


def resolve(uri_or_path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path (`~` expanded) or a URI such as s3://bucket/prefix."""
    if "://" not in uri_or_path:
        uri_or_path = os.path.abspath(os.path.expanduser(uri_or_path))
    return pafs.FileSystem.from_uri(uri_or_path)


def run_path(storage_path: str, name: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of the run directory `{storage_path}/{name}`."""
    fs, base = resolve(storage_path)
    return fs, f"{base.rstrip('/')}/{name}"


def list_dirs(fs: pafs.FileSystem, path: str, prefix: str = "checkpoint_") -> list[str]:
    """Names of the subdirectories of `path` starting with `prefix` (empty if `path` is absent)."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix))


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if exists(fs, path):
        fs.delete_dir(path)


def delete_dir_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Remove what a failed write left, if the storage lets us; a failure here changes nothing."""
    try:
        delete_dir(fs, path)
    except OSError:
        pass


def display(path: str, fs: pafs.FileSystem) -> str:
    """A path on `fs` as a user writes it: s3://bucket/key for object stores, the path for disks."""
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"


def download(fs: pafs.FileSystem, path: str, local_dir: str) -> str:
    """Copy a storage directory to a local directory (no-op for a local filesystem: read in place)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


@contextlib.contextmanager
def local_copy(fs: pafs.FileSystem, path: str) -> Iterator[str]:
    """A local directory holding the storage directory `path` for the `with` block (read in place
    on a local filesystem)."""
    with tempfile.TemporaryDirectory(prefix="cape_ray_copy_") as tmp:
        yield download(fs, path, tmp)


def free_bytes(fs: pafs.FileSystem, path: str) -> Optional[int]:
    """Free bytes of the local or NFS filesystem holding `path` (or its nearest existing parent);
    None for object stores, which have no such figure."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return None
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return shutil.disk_usage(probe).free


def _copy_durably(source_dir: str, names: list[str], target: str) -> None:
    """Copy the files `names` (relative; the manifest among them) of local directory `source_dir`
    to `target` on a local or NFS disk: every other file fsynced, then the directories, and only
    then the manifest (under a temporary name, fsynced, renamed, the directory fsynced again)."""
    os.makedirs(target, exist_ok=True)
    directories = {target}
    for name in names:
        if name == MANIFEST:
            continue
        destination = os.path.join(target, name)
        directories.add(os.path.dirname(destination))
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        shutil.copyfile(os.path.join(source_dir, name), destination)
        with open(destination, "rb+") as out:
            os.fsync(out.fileno())
    for directory in sorted(directories, key=len, reverse=True):  # rng/ before the checkpoint itself
        fsync_directory(directory)
    if MANIFEST in names:
        shutil.copyfile(os.path.join(source_dir, MANIFEST), os.path.join(target, MANIFEST_TMP))
        with open(os.path.join(target, MANIFEST_TMP), "rb+") as out:
            os.fsync(out.fileno())
        os.replace(os.path.join(target, MANIFEST_TMP), os.path.join(target, MANIFEST))
        fsync_directory(target)
    fsync_directory(os.path.dirname(target.rstrip("/")))  # the checkpoint's own entry in the run directory


def upload_checkpoint(local_dir: str, fs: pafs.FileSystem, path: str) -> None:
    """Copy a staged checkpoint directory to `path` on `fs`, manifest last: an upload cut short
    never verifies. On a local or NFS disk, everything else reaches the disk before the manifest."""
    files = sorted(os.path.relpath(os.path.join(root, f), local_dir).replace(os.sep, "/")
                   for root, _, names in os.walk(local_dir) for f in names)
    files.sort(key=lambda name: name == MANIFEST)
    if isinstance(fs, pafs.LocalFileSystem):
        _copy_durably(local_dir, files, path)
        return
    for relative in files:
        target = f"{path}/{relative}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(os.path.join(local_dir, relative), "rb") as source, fs.open_output_stream(target) as out:
            shutil.copyfileobj(source, out, 1 << 22)


def problems(fs: pafs.FileSystem, path: str) -> list[str]:
    """What is wrong with the checkpoint directory at `path` (empty: it verifies). Reads every byte
    (downloading it from an object store first); `size_problems` is the cheap check."""
    try:
        with local_copy(fs, path) as local:
            found = verify_checkpoint(local)
            return found if local == path else [line.replace(local, display(path, fs)) for line in found]
    except OSError as exc:
        return [f"{path} cannot be read: {exc}"]


def size_problems(fs: pafs.FileSystem, path: str) -> list[str]:
    """What is wrong with the checkpoint directory at `path`, judged from its manifest and the stored
    files' sizes without reading them: one listing and one read of manifest.json. It finds what is
    missing, truncated, unlisted or wrongly listed, not a file corrupted in place at its listed size
    (`problems` reads every byte against its SHA-256)."""
    where = display(path.rstrip("/"), fs)
    manifest_path = f"{where}/{MANIFEST}"
    prefix = path.rstrip("/") + "/"
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        present = {info.path[len(prefix):]: info.size if info.type == pafs.FileType.File else None
                   for info in infos if info.type != pafs.FileType.Directory}
        if MANIFEST not in present:
            return [f"{manifest_path} is missing (checkpoint incomplete)"]
        with fs.open_input_stream(f"{prefix}{MANIFEST}") as stream:
            text = stream.read()
    except OSError as exc:
        return [f"{where} cannot be read: {exc}"]
    files, found = parse_manifest(text, manifest_path)
    return found if files is None else found + listing_problems(files, present, where, manifest_path)


def copy_checkpoint(fs: pafs.FileSystem, source: str, destination: str) -> None:
    """Copy a checkpoint directory within one filesystem, manifest last, so a partial copy never
    verifies (and on a local or NFS disk, the manifest only after everything else reached the disk)."""
    selector = pafs.FileSelector(source, recursive=True)
    files = [i for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    files.sort(key=lambda i: i.base_name == MANIFEST)  # manifest last
    if isinstance(fs, pafs.LocalFileSystem):
        _copy_durably(source, [i.path[len(source.rstrip("/")) + 1:] for i in files], destination)
        return
    for info in files:
        relative = info.path[len(source.rstrip("/")) + 1:]
        target = f"{destination}/{relative}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        fs.copy_file(info.path, target)


def copy_between(source_fs: pafs.FileSystem, source: str, destination_fs: pafs.FileSystem, destination: str) -> None:
    """Copy a checkpoint directory from one filesystem to another (or within one), manifest last."""
    if source_fs is destination_fs or (isinstance(source_fs, pafs.LocalFileSystem)
                                       and isinstance(destination_fs, pafs.LocalFileSystem)):
        return copy_checkpoint(source_fs, source, destination)
    files = [i for i in source_fs.get_file_info(pafs.FileSelector(source, recursive=True)) if i.type == pafs.FileType.File]
    files.sort(key=lambda i: i.base_name == MANIFEST)  # manifest last
    for info in files:
        target = f"{destination}/{info.path[len(source.rstrip('/')) + 1:]}"
        destination_fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with source_fs.open_input_stream(info.path) as reader, destination_fs.open_output_stream(target) as writer:
            shutil.copyfileobj(reader, writer, 1 << 22)


def newest_valid_before(fs: pafs.FileSystem, run_dir: str, limit_name: Optional[str]) -> Optional[str]:
    """The newest verifying regular checkpoint of `run_dir` at or before `limit_name`'s position,
    excluding `limit_name` itself; with no limit, the newest verifying one."""
    limit = position_from_name(limit_name) if limit_name else None
    candidates = []
    for name in list_dirs(fs, run_dir):
        pos = position_from_name(name)
        if pos is None or name == limit_name or (limit is not None and pos > limit):
            continue
        candidates.append((pos, name))
    for _, name in sorted(candidates, reverse=True):
        if not problems(fs, f"{run_dir}/{name}"):
            return name
        log.warning("checkpoint %s/%s does not verify either; skipping it", run_dir, name)
    return None
