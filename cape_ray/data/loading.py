"""One entry point from a TrainConfig to a prepared split, whatever the data source."""

from __future__ import annotations

import os
from pathlib import Path

from cape_ray.config import TrainConfig
from cape_ray.data.dataset import KeypointDataset
from cape_ray.data.transforms import PreparedSplit, prepare


def load_dataset(config: TrainConfig, subset: str) -> KeypointDataset:
    """The raw instances of `subset` (train / val / test): MP-100 files or a built-in generator
    (`--data builtin`: synthetic.py; `--data builtin-hard`: synthetic_hard.py)."""
    if config.data_root is not None:
        from cape_ray.data.mp100 import load_mp100

        return load_mp100(config.data_root, config.mp100_split, subset)
    if config.data == "builtin-hard":
        from cape_ray.data.synthetic_hard import make_hard_split as make_split
    else:
        from cape_ray.data.synthetic import make_synthetic_split as make_split
    return make_split(subset, seed=config.data_seed, instances_per_category=config.synthetic_instances_per_category,
                      canvas=config.synthetic_canvas)


def load_split(config: TrainConfig, subset: str, num_queries: int) -> PreparedSplit:
    """The prepared split: MP-100 files through the node's cache (`--cache_dir`), else prepared here.

    The built-in data are not cached: they are generated from a few integers (about 3 s for the
    default set, 9 s for the hard one) and take tens of MB per worker at the default sizes, so a
    cache would save little, and its key would need a version of the generator's code to stay correct.
    """
    if config.data_root is None or not config.cache_dir:
        return prepare(load_dataset(config, subset), config.image_size, config.num_shots, num_queries)
    from cape_ray.data.cache import open_or_build
    from cape_ray.data.mp100 import annotation_path

    annotation_file = annotation_path(config.data_root, config.mp100_split, subset)
    if not annotation_file.is_file():  # the reader's error explains the expected layout
        return prepare(load_dataset(config, subset), config.image_size, config.num_shots, num_queries)
    split, _ = open_or_build(os.path.expanduser(config.cache_dir), annotation_file, Path(config.data_root) / "images",
                             config.image_size, config.num_shots, num_queries,
                             load_dataset=lambda: load_dataset(config, subset))
    return split
