"""PCK with MP-100 rules against hand-computed cases, and the loss terms."""

import torch

from cape_ray.metrics import (
    PCK_THRESHOLDS,
    coordinate_l1,
    loss_valid_mask,
    mean_pck,
    pck_per_pair,
    pck_valid_mask,
    similarity_cross_entropy,
    to_original_pixels,
)

# crop -> original: x_orig = 200 x + 10, y_orig = 100 y + 20 (anisotropic on purpose)
AFFINE = torch.tensor([[200.0, 0.0, 10.0], [0.0, 100.0, 20.0]])
# bbox 50 wide, 80 tall: PCK normalises by max(w, h) = 80 original pixels
BBOX = torch.tensor([5.0, 7.0, 50.0, 80.0])


def one_pair(pred, gt):
    """pred, gt [K, 2] -> [1, 1, K, 2] plus bbox and affine of one pair."""
    return pred[None, None], gt[None, None], BBOX.expand(1, 1, 4), AFFINE.expand(1, 1, 2, 3)


def test_to_original_pixels_applies_affine():
    points = torch.tensor([[[[0.0, 0.0], [0.5, 1.0]]]])
    pixels = to_original_pixels(points, AFFINE.expand(1, 1, 2, 3))
    assert torch.allclose(pixels, torch.tensor([[[[10.0, 20.0], [110.0, 120.0]]]]))


def test_each_threshold_at_boundary_values():
    # distances (fraction of 80 px) just below / just above every threshold, along x (200 px per
    # unit) and along y (100 px per unit): pixel offsets = d * 80
    distances = [0.049, 0.051, 0.099, 0.101, 0.149, 0.151, 0.199, 0.201, 0.249, 0.251]
    gt = torch.full((len(distances), 2), 0.5)
    pred = gt.clone()
    for k, d in enumerate(distances):
        if k % 2 == 0:
            pred[k, 0] += d * 80 / 200
        else:
            pred[k, 1] -= d * 80 / 100
    p, g, bbox, affine = one_pair(pred, gt)
    valid = torch.ones(1, 1, len(distances), dtype=torch.bool)
    pck = pck_per_pair(p, g, valid, bbox, affine)
    expected = torch.tensor([[[1 / 10, 3 / 10, 5 / 10, 7 / 10, 9 / 10]]])
    assert torch.allclose(pck, expected)
    assert PCK_THRESHOLDS == (0.05, 0.10, 0.15, 0.20, 0.25)


def test_bbox_normalisation_uses_max_side_in_original_pixels():
    # 13 px off in original pixels: d = 13 / 80 = 0.1625 -> counted at 0.20 but not 0.15;
    # normalising by w (50) would give 0.26 and miss every threshold
    gt = torch.tensor([[0.3, 0.3]])
    pred = torch.tensor([[0.3 + 13 / 200, 0.3]])
    p, g, bbox, affine = one_pair(pred, gt)
    pck = pck_per_pair(p, g, torch.ones(1, 1, 1, dtype=torch.bool), bbox, affine)
    assert pck[0, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    # the same 0.06 normalised offset along y is only 6 px: d = 0.075
    pred = torch.tensor([[0.3, 0.3 + 0.06]])
    p, g, bbox, affine = one_pair(pred, gt)
    pck = pck_per_pair(p, g, torch.ones(1, 1, 1, dtype=torch.bool), bbox, affine)
    assert pck[0, 0].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_valid_mask_needs_query_and_every_support():
    query_visible = torch.tensor([[[True, False, True, True, True]]])  # [B=1, Q=1, K=5]
    support_visible = torch.tensor([[[True, True, False, True, True],  # 2 shots
                                     [True, True, True, False, True]]])
    keypoint_mask = torch.tensor([[True, True, True, True, False]])  # last is padding
    valid = pck_valid_mask(query_visible, support_visible, keypoint_mask)
    assert valid.tolist() == [[[True, False, False, False, False]]]
    # training uses a keypoint seen by at least one support
    loss_valid = loss_valid_mask(query_visible, support_visible, keypoint_mask)
    assert loss_valid.tolist() == [[[True, False, True, True, False]]]


def test_invalid_keypoints_leave_the_denominator():
    # 4 keypoints: 0 correct, 1 wrong, 2 wrong but invisible in the query, 3 wrong in one support
    gt = torch.full((4, 2), 0.5)
    pred = gt.clone()
    pred[1:, 0] += 0.3  # 60 px = 0.75 of the bbox
    query_visible = torch.tensor([[[True, True, False, True]]])
    support_visible = torch.tensor([[[True, True, True, True], [True, True, True, False]]])
    valid = pck_valid_mask(query_visible, support_visible, torch.ones(1, 4, dtype=torch.bool))
    p, g, bbox, affine = one_pair(pred, gt)
    pck = pck_per_pair(p, g, valid, bbox, affine)
    assert torch.allclose(pck, torch.full((1, 1, 5), 0.5))


def test_pair_without_valid_keypoint_scores_zero():
    gt = torch.full((2, 1, 3, 2), 0.5)  # [B=2, Q=1, K=3]
    valid = torch.tensor([[[True, True, True]], [[False, False, False]]])
    pck = pck_per_pair(gt, gt, valid, BBOX.expand(2, 1, 4), AFFINE.expand(2, 1, 2, 3))
    assert pck[0].eq(1).all() and pck[1].eq(0).all()
    assert pck.mean().item() == 0.5  # the empty pair still counts in the mean over pairs


def test_pair_whose_bbox_has_no_size_scores_zero_even_when_exact():
    gt = torch.full((2, 1, 3, 2), 0.5)
    valid = torch.ones(2, 1, 3, dtype=torch.bool)
    bbox = torch.stack([BBOX, torch.tensor([5.0, 7.0, 0.0, 0.0])]).view(2, 1, 4)
    pck = pck_per_pair(gt, gt, valid, bbox, AFFINE.expand(2, 1, 2, 3))
    assert pck[0].eq(1).all() and pck[1].eq(0).all()  # as MP-100's reference: nothing in it counts


def test_padding_is_ignored():
    gt = torch.tensor([[[[0.2, 0.2], [0.7, 0.4], [0.0, 0.0], [0.0, 0.0]]]])
    pred = gt.clone()
    pred[..., 2:, :] = 0.9  # garbage in the padded slots
    keypoint_mask = torch.tensor([[True, True, False, False]])
    visible = torch.tensor([[[True, True, False, False]]])
    valid = pck_valid_mask(visible, visible, keypoint_mask)
    pck = pck_per_pair(pred, gt, valid, BBOX.expand(1, 1, 4), AFFINE.expand(1, 1, 2, 3))
    assert pck.eq(1).all()


def test_mean_pck_is_mean_of_thresholds():
    values = dict(zip(PCK_THRESHOLDS, [0.1, 0.2, 0.3, 0.4, 0.5]))
    assert abs(mean_pck(values) - 0.3) < 1e-12


def test_coordinate_l1_averages_layers():
    gt = torch.zeros(1, 1, 1, 2)
    coords = torch.stack([torch.full((1, 1, 1, 2), 0.1), torch.full((1, 1, 1, 2), 0.3)])
    assert torch.allclose(coordinate_l1(coords, gt), torch.tensor([[[0.4]]]))


def test_similarity_cross_entropy_is_lowest_at_the_gt():
    gt = torch.tensor([[[[0.3, 0.7]]]])  # x=0.3, y=0.7 on an 8x8 map -> cell (row 5, col 2)
    logits_right = torch.zeros(1, 1, 1, 8, 8)
    logits_right[..., 5, 2] = 10.0
    logits_wrong = torch.zeros(1, 1, 1, 8, 8)
    logits_wrong[..., 2, 5] = 10.0
    assert similarity_cross_entropy(logits_right, gt) < similarity_cross_entropy(logits_wrong, gt)
