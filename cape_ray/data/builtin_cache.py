"""The built-in data, prepared once per node: a restarted worker opens the split instead of
generating it again (generating the default categories takes seconds; most of a restart's own
time before this cache).

One file per prepared split: `{--cache_dir}/builtin/{subset}-{data}-{key}.pt`, the split's
tensors and fields (torch.save; loads with weights_only=True, memory-mapped, so the workers of a
node share its pages), and `{...}.sha256` beside it, checked at every open (tens of MB: a few
hundredths of a second). The key covers everything the pixels and labels depend on: the data
modules' source code (so a change to the generator is a new entry, without a version number to
remember), the generator's parameters (data, --data_seed, instances per category, canvas), the
subset, --image_size, shots and queries, and the numpy and torch versions. A file is written under
a temporary name and renamed, so a crash never leaves one half written; two workers of a node that
both miss write the same bytes, and the last rename wins. A damaged file is generated again.
Nothing is ever deleted: `rm -rf {--cache_dir}/builtin` clears it. `--cache_dir ''` turns it off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cape_ray.data.cache import file_sha256
from cape_ray.data.dataset import Category
from cape_ray.data.transforms import PreparedSplit

log = logging.getLogger("cape_ray")

SUBDIRECTORY = "builtin"
# The modules whose code decides what a prepared built-in split holds.
SOURCE_MODULES = ("dataset.py", "synthetic.py", "synthetic_hard.py", "transforms.py", "loading.py")


def source_digest() -> str:
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in SOURCE_MODULES:
        path = here / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def cache_path(cache_dir: str, subset: str, params: dict) -> Path:
    key = {**params, "subset": subset, "source": source_digest(), "numpy": np.__version__, "torch": torch.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(os.path.expanduser(cache_dir)) / SUBDIRECTORY / f"{subset}-{params['data']}-{digest}.pt"


def to_record(split: PreparedSplit) -> dict:
    """A prepared split as tensors and primitives only (weights_only loads it)."""
    record = {}
    for f in dataclasses.fields(split):
        value = getattr(split, f.name)
        if f.name == "rows_by_category":
            value = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in value.items()}
        elif f.name == "categories":
            value = {k: [c.id, c.name, list(c.keypoint_names), [list(e) for e in c.skeleton], c.supercategory]
                     for k, c in value.items()}
        record[f.name] = value
    return record


def from_record(record: dict) -> PreparedSplit:
    values = dict(record)
    values["rows_by_category"] = {k: v.numpy() for k, v in record["rows_by_category"].items()}
    values["categories"] = {k: Category(id=c[0], name=c[1], keypoint_names=tuple(c[2]),
                                        skeleton=tuple(tuple(e) for e in c[3]), supercategory=c[4])
                            for k, c in record["categories"].items()}
    return PreparedSplit(**values)


def open_or_prepare(cache_dir: str, subset: str, params: dict, prepare: Callable[[], PreparedSplit]) -> PreparedSplit:
    """The prepared split from this node's cache, or `prepare()`d now and cached for the next start."""
    path = cache_path(cache_dir, subset, params)
    checksum = path.with_suffix(".sha256")
    if path.is_file() and checksum.is_file():
        try:
            if checksum.read_text().strip() == file_sha256(path):
                return from_record(torch.load(path, weights_only=True, mmap=True))
            log.warning("built-in data cache: %s does not match its checksum; generating it again", path)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: generate it again
            log.warning("built-in data cache: %s cannot be read (%s); generating it again", path, exc)
    split = prepare()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
            torch.save(to_record(split), handle)
        Path(handle.name).replace(path)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{checksum.name}.", delete=False) as handle:
            handle.write(file_sha256(path))
        Path(handle.name).replace(checksum)
    except OSError as exc:  # a full or read-only cache directory costs the next start the generation
        log.warning("built-in data cache: cannot write %s (%s); the split is used from memory", path, exc)
    return split
