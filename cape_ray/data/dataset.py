"""The in-memory form every data source produces: categories and their annotated instances.

Both the built-in generator (`synthetic.py`) and the MP-100 reader (`mp100.py`) produce a
`KeypointDataset` with instances in ORIGINAL image pixels. `prepare` (transforms.py) then crops every
instance once to a square around its bbox (MP-100 rule: 1.25x padding), resizes it to the model input
and keeps the affine that maps crop coordinates back to original pixels, so PCK is computed in the
original pixels as the benchmark does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    keypoint_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]  # 0-based keypoint index pairs (MP-100 files are 1-based)
    supercategory: str = ""

    @property
    def num_keypoints(self) -> int:
        return len(self.keypoint_names)


@dataclass
class Instance:
    """One annotated object. Coordinates are original image pixels."""

    id: int  # annotation id
    image_id: int
    category_id: int
    keypoints: np.ndarray  # float32 [K, 2] (x, y)
    visible: np.ndarray  # bool [K]: MP-100 visibility min(1, v)
    bbox: np.ndarray  # float32 [4] x, y, w, h, clipped to the image
    file_name: str = ""  # relative to the image root (MP-100) or the export folder
    width: int = 0
    height: int = 0
    image: Optional[np.ndarray] = field(default=None, repr=False)  # uint8 [H, W, 3] when in memory


@dataclass
class KeypointDataset:
    """Categories of one split and their instances, grouped by category id."""

    categories: dict[int, Category]
    instances: dict[int, list[Instance]]  # category id -> instances (same order every load)
    image_loader: Optional[Callable[[Instance], np.ndarray]] = None  # for instances without `image`
    source: str = ""  # human-readable origin for messages

    def load_image(self, inst: Instance) -> np.ndarray:
        if inst.image is not None:
            return inst.image
        if self.image_loader is None:
            raise RuntimeError(f"{self.source}: instance {inst.id} has no image and no loader")
        return self.image_loader(inst)

    @property
    def category_ids(self) -> list[int]:
        return sorted(self.categories)

    def __len__(self) -> int:
        return sum(len(v) for v in self.instances.values())
