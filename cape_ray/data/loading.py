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
    """The prepared split through the node's cache (`--cache_dir`; '' = prepared here every time):
    MP-100 files in the prepared-split cache (cache.py), the built-in data in builtin_cache.py."""
    def prepared() -> PreparedSplit:
        return prepare(load_dataset(config, subset), config.image_size, config.num_shots, num_queries)

    if not config.cache_dir:
        return prepared()
    if config.data_root is None:
        from cape_ray.data.builtin_cache import open_or_prepare

        params = {"data": config.data, "data_seed": config.data_seed, "image_size": config.image_size,
                  "num_shots": config.num_shots, "num_queries": num_queries,
                  "instances_per_category": config.synthetic_instances_per_category,
                  "canvas": config.synthetic_canvas}
        return open_or_prepare(config.cache_dir, subset, params, prepared)
    from cape_ray.data.cache import open_or_build
    from cape_ray.data.mp100 import annotation_path

    annotation_file = annotation_path(config.data_root, config.mp100_split, subset)
    if not annotation_file.is_file():  # the reader's error explains the expected layout
        return prepare(load_dataset(config, subset), config.image_size, config.num_shots, num_queries)
    split, _ = open_or_build(os.path.expanduser(config.cache_dir), annotation_file, Path(config.data_root) / "images",
                             config.image_size, config.num_shots, num_queries,
                             load_dataset=lambda: load_dataset(config, subset))
    return split
