import math

import numpy as np
import pytest
import torch

from cape_ray.data.dataset import Category, Instance, KeypointDataset
from cape_ray.data.synthetic import make_synthetic_split
from cape_ray.data.transforms import (AugmentParams, apply_affine, augment, compose_affine, crop_box, prepare,
                                      sample_augment_params)


def _dot_dataset(points, size=(150, 200), bbox=(60.0, 20.0, 80.0, 50.0), lazy=False):
    """One category, instances with a bright 3x3 dot at each keypoint (integer pixel positions)."""
    h, w = size
    category = Category(1, "dots", tuple(f"p{i}" for i in range(len(points[0]))), ((0, 1),))
    images, instances = {}, []
    for i, pts in enumerate(points):
        img = np.zeros((h, w, 3), dtype=np.uint8)
        for x, y in pts:
            img[y - 1:y + 2, x - 1:x + 2] = 255
        images[i] = img
        instances.append(Instance(id=i, image_id=i, category_id=1, keypoints=np.array(pts, dtype=np.float32),
                                  visible=np.ones(len(pts), dtype=bool), bbox=np.array(bbox, dtype=np.float32),
                                  file_name=f"dots/{i}.png", width=w, height=h,
                                  image=None if lazy else img))
    loader = (lambda inst: images[inst.image_id]) if lazy else None
    return KeypointDataset({1: category}, {1: instances}, image_loader=loader, source="dots")


def _brightest(image: torch.Tensor) -> np.ndarray:
    """(x, y) pixel-centre position of the brightest spot, as normalised crop coordinates."""
    grey = image.float().sum(0)
    weights = torch.clamp(grey - 0.5 * grey.max(), min=0)
    size = grey.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.stack([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()
    return ((centre + 0.5) / size).numpy()


def test_prepare_crops_square_box_and_keeps_the_affine():
    ds = _dot_dataset([[(100, 45), (70, 30)], [(120, 60), (90, 25)]])
    split = prepare(ds, 64, num_shots=1, num_queries=1)
    assert split.images.shape == (2, 3, 64, 64) and split.images.dtype == torch.uint8
    assert split.keypoints.dtype == torch.float32 and split.visible.dtype == torch.bool
    x0, y0, side = crop_box(np.array([60, 20, 80, 50]))
    assert side == 100 and (x0, y0) == (50, -5)
    expected = torch.tensor([[100.0, 0, 50], [0, 100, -5]])
    assert torch.equal(split.crop_to_original[0], expected)
    back = apply_affine(split.crop_to_original, split.keypoints)
    torch.testing.assert_close(back, torch.tensor([[[100.0, 45], [70, 30]], [[120, 60], [90, 25]]]), atol=1e-3, rtol=0)
    for row in range(2):  # the image content sits where the normalised keypoint says
        img = split.images[row].clone()
        kp = split.keypoints[row]
        img[:, :, : int(64 * (kp[0, 0] + kp[1, 0]) / 2)] = 0  # keep only the right-hand dot
        np.testing.assert_allclose(_brightest(img), kp[0].numpy(), atol=1.0 / 64)
    assert split.rows_by_category[1].tolist() == [0, 1] and split.category.tolist() == [1, 1]
    assert split.adjacency[1].tolist() == [[0, 1], [1, 0]]


def test_crop_pads_with_zeros_outside_the_image():
    ds = _dot_dataset([[(3, 3), (10, 10)]] * 2, bbox=(0.0, 0.0, 12.0, 12.0))
    ds.instances[1][0].image[:] = 255
    split = prepare(ds, 32)
    img = split.images[0]
    # the crop starts at x = y = -1.5; the image edge is at -0.5, so the first row/column is padding
    assert img[:, 0, :].max() == 0 and img[:, :, 0].max() == 0
    assert img[:, 3:, 3:].min() == 255


def test_lazy_and_in_memory_images_give_identical_crops():
    points = [[(100, 45), (70, 30)], [(120, 60), (90, 25)], [(65, 22), (139, 69)]]
    eager = prepare(_dot_dataset(points), 48)
    lazy = prepare(_dot_dataset(points, lazy=True), 48)
    assert torch.equal(eager.images, lazy.images) and torch.equal(eager.keypoints, lazy.keypoints)


def test_prepare_pads_mixed_keypoint_counts_and_skips_small_categories(caplog):
    ds = make_synthetic_split("val", seed=0, instances_per_category=3, canvas=64)
    tiny = ds.category_ids[0]
    ds.instances[tiny] = ds.instances[tiny][:1]
    split = prepare(ds, 32, num_shots=1, num_queries=2)
    assert tiny in split.skipped and tiny not in split.category_ids and "1 usable instance" in split.skipped[tiny]
    assert "skipped" in caplog.text and ds.categories[tiny].name in caplog.text
    kmax = max(ds.categories[c].num_keypoints for c in split.category_ids)
    assert split.keypoints.shape == (len(split), kmax, 2)
    for cid in split.category_ids:
        k = ds.categories[cid].num_keypoints
        rows = split.rows_by_category[cid]
        assert (split.keypoints[rows, k:] == 0).all() and not split.visible[rows, k:].any()
        assert (split.category[rows] == cid).all()
    with pytest.raises(ValueError, match="no category"):
        prepare(ds, 32, num_shots=5)


def test_augment_params_follow_the_recipe_and_the_generator():
    params = sample_augment_params(np.random.default_rng(1), 4000)
    assert params.scale.min() >= 0.85 and params.scale.max() <= 1.15
    assert np.abs(params.rotation).max() <= math.radians(30) + 1e-12
    assert 0.35 < np.mean(params.rotation == 0) < 0.45
    again = sample_augment_params(np.random.default_rng(1), 4000)
    assert np.array_equal(params.scale, again.scale) and np.array_equal(params.rotation, again.rotation)


def test_augment_moves_content_with_the_keypoints_and_inverts_exactly():
    ds = _dot_dataset([[(100, 45), (72, 30)]] * 3)
    split = prepare(ds, 64)
    images = split.images.float() / 255
    params = AugmentParams(scale=np.array([1.15, 0.85, 1.0]), rotation=np.radians([30.0, -25.0, 0.0]))
    out, moved, inverse = augment(images, split.keypoints, params)
    assert out.shape == images.shape
    for row in range(3):
        img = out[row].clone()
        cut = int(64 * (moved[row, 0, 0] + moved[row, 1, 0]) / 2)
        img[:, :, :cut] = 0  # keep only the dot of keypoint 0
        np.testing.assert_allclose(_brightest(img), moved[row, 0].numpy(), atol=1.0 / 64)
    torch.testing.assert_close(apply_affine(inverse, moved), split.keypoints, atol=1e-6, rtol=0)
    to_original = compose_affine(split.crop_to_original, inverse)
    torch.testing.assert_close(apply_affine(to_original, moved), torch.tensor([[[100.0, 45], [72, 30]]] * 3),
                               atol=1e-3, rtol=0)
    assert torch.equal(out[2], images[2]) or (out[2] - images[2]).abs().max() < 1e-5  # identity stays put
