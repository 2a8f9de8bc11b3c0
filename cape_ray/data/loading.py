"""One entry point from a TrainConfig to a prepared split, whatever the data source."""

from __future__ import annotations

from cape_ray.config import TrainConfig
from cape_ray.data.dataset import KeypointDataset
from cape_ray.data.transforms import PreparedSplit, prepare


def load_dataset(config: TrainConfig, subset: str) -> KeypointDataset:
    """The raw instances of `subset` (train / val / test): MP-100 files or the built-in generator."""
    if config.data_root is not None:
        from cape_ray.data.mp100 import load_mp100

        return load_mp100(config.data_root, config.mp100_split, subset)
    from cape_ray.data.synthetic import make_synthetic_split

    return make_synthetic_split(subset, seed=config.data_seed,
                                instances_per_category=config.synthetic_instances_per_category,
                                canvas=config.synthetic_canvas)


def load_split(config: TrainConfig, subset: str, num_queries: int) -> PreparedSplit:
    return prepare(load_dataset(config, subset), config.image_size, config.num_shots, num_queries)
