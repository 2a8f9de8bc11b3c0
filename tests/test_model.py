"""The CNN model: output shape, padding invariance across mixed K, shots, determinism."""

import torch

from cape_ray.config import TrainConfig
from cape_ray.model import build_backbone, build_model
from cape_ray.model.layers import sample_features

SIZE = 32  # smallest allowed image size keeps these fast


def episode(num_keypoints: int, shots: int = 1, queries: int = 2, seed: int = 0) -> dict:
    """One episode's model inputs with a leading batch dimension of 1."""
    g = torch.Generator().manual_seed(seed)
    skeleton = torch.zeros(1, num_keypoints, num_keypoints)
    for k in range(num_keypoints - 1):  # a chain
        skeleton[0, k, k + 1] = skeleton[0, k + 1, k] = 1
    return dict(
        support_images=torch.rand(1, shots, 3, SIZE, SIZE, generator=g),
        support_keypoints=torch.rand(1, shots, num_keypoints, 2, generator=g),
        support_visible=torch.ones(1, shots, num_keypoints, dtype=torch.bool),
        query_images=torch.rand(1, queries, 3, SIZE, SIZE, generator=g),
        keypoint_mask=torch.ones(1, num_keypoints, dtype=torch.bool),
        skeleton=skeleton,
    )


def pad_and_stack(episodes: list[dict]) -> dict:
    """Batch episodes of different K the way collate does: zero padding, mask False."""
    k_max = max(e["keypoint_mask"].shape[1] for e in episodes)
    batch = {}
    for name in episodes[0]:
        padded = []
        for e in episodes:
            x = e[name]
            pad = k_max - e["keypoint_mask"].shape[1]
            if name in ("support_keypoints",):
                x = torch.nn.functional.pad(x, (0, 0, 0, pad))
            elif name in ("support_visible", "keypoint_mask"):
                x = torch.nn.functional.pad(x, (0, pad), value=False)
            elif name == "skeleton":
                x = torch.nn.functional.pad(x, (0, pad, 0, pad))
            padded.append(x)
        batch[name] = torch.cat(padded)
    return batch


def coords_of(net, **inputs) -> torch.Tensor:
    """The Prediction's coordinates [L, B, Q, K, 2] (model/api.py)."""
    return net(**inputs).coords


def model(**changes):
    torch.manual_seed(0)
    return build_model(TrainConfig(image_size=SIZE, **changes)).eval()


def test_output_shape_and_range():
    net = model(refine_layers=2)
    coords = coords_of(net, **episode(7, shots=1, queries=3))
    assert coords.shape == (3, 1, 3, 7, 2)  # proposal + 2 refinement layers
    assert coords.min() >= 0 and coords.max() <= 1


def test_padding_does_not_change_real_keypoints():
    net = model(refine_layers=2, use_skeleton=True)
    small, large = episode(5, seed=1), episode(9, seed=2)
    with torch.no_grad():
        alone_small = coords_of(net, **small)
        alone_large = coords_of(net, **large)
        together = coords_of(net, **pad_and_stack([small, large]))
    assert together.shape == (3, 2, 2, 9, 2)
    assert torch.allclose(together[:, 0, :, :5], alone_small[:, 0], atol=1e-5)
    assert torch.allclose(together[:, 1], alone_large[:, 0], atol=1e-5)


def test_five_identical_shots_equal_one_shot():
    net = model()
    one = episode(6, shots=1, seed=3)
    five = dict(one)
    five["support_images"] = one["support_images"].expand(1, 5, -1, -1, -1)
    five["support_keypoints"] = one["support_keypoints"].expand(1, 5, -1, -1)
    five["support_visible"] = one["support_visible"].expand(1, 5, -1)
    with torch.no_grad():
        assert torch.allclose(coords_of(net, **one), coords_of(net, **five), atol=1e-5)


def test_shot_where_keypoint_is_invisible_is_ignored():
    net = model()
    one = episode(6, shots=1, seed=4)
    other = episode(6, shots=1, seed=5)
    two = dict(one)
    two["support_images"] = torch.cat([one["support_images"], other["support_images"]], dim=1)
    two["support_keypoints"] = torch.cat([one["support_keypoints"], other["support_keypoints"]], dim=1)
    two["support_visible"] = torch.cat([one["support_visible"], torch.zeros(1, 1, 6, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        assert torch.allclose(coords_of(net, **one), coords_of(net, **two), atol=1e-5)


def test_training_is_deterministic():
    def train() -> list[torch.Tensor]:
        net = model(dropout=0.1).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        batch = pad_and_stack([episode(4, seed=6), episode(6, seed=7)])
        target = torch.rand(2, 2, 6, 2, generator=torch.Generator().manual_seed(8))
        for _ in range(3):
            loss = (coords_of(net, **batch) - target).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return [p.detach().clone() for p in net.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(), train()))


def test_large_backbone_runs():
    backbone = build_backbone("large", 32)
    features = backbone(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 32, 64 // backbone.stride, 64 // backbone.stride)
    net = model(backbone="large", feature_dim=32, refine_layers=1)
    assert coords_of(net, **episode(3)).shape == (2, 1, 2, 3, 2)


def grid_sample_reference(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """What the model sampled with before: grid_sample, border padding, align_corners=False."""
    grid = (points * 2 - 1).unsqueeze(2)
    return torch.nn.functional.grid_sample(features, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False).squeeze(3).transpose(1, 2)


def test_sampling_equals_grid_sample_in_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    # unit-norm features as the model samples them; points also beyond the border
    features = torch.nn.functional.normalize(torch.randn(3, 16, 12, 20, generator=g), dim=1)
    points = torch.rand(3, 40, 2, generator=g) * 1.4 - 0.2
    ours = sample_features(features, points)
    assert (ours - grid_sample_reference(features, points)).abs().max() <= 1e-6
    # gradients with respect to both inputs (float64: the comparison is about the math, not rounding)
    f64 = features.double().requires_grad_(True)
    p64 = points.double().requires_grad_(True)
    weights = torch.randn(3, 40, 16, dtype=torch.float64, generator=g)
    expected = torch.autograd.grad((grid_sample_reference(f64, p64) * weights).sum(), (f64, p64))
    got = torch.autograd.grad((sample_features(f64, p64) * weights).sum(), (f64, p64))
    assert torch.allclose(got[0], expected[0], atol=1e-12)
    assert torch.allclose(got[1], expected[1], atol=1e-10)
    # the same values from a channels-last layout (the evaluation's feature bank)
    channels_last = features.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.equal(sample_features(channels_last, points), ours)


def test_forward_is_decode_of_encode():
    net = model(refine_layers=2)
    inputs = episode(5, shots=2, queries=3, seed=9)
    with torch.no_grad():
        supports = net.encode(inputs["support_images"].flatten(0, 1)).unflatten(0, (1, 2))
        queries = net.encode(inputs["query_images"].flatten(0, 1)).unflatten(0, (1, 3))
        decoded = net.decode(supports, inputs["support_keypoints"], inputs["support_visible"], queries,
                             inputs["keypoint_mask"], inputs["skeleton"]).coords
        assert torch.allclose(decoded, coords_of(net, **inputs), atol=1e-6)
    assert torch.allclose(supports.norm(dim=2), torch.ones(()), atol=1e-5)  # unit-norm features


def test_window_patch_equals_sampling_every_window_point():
    """The refinement's (window + 1)^2 patch interpolation gives what sampling each of the window's
    points one by one gives (grid_sample, border padding), including estimates at the border."""
    from cape_ray.model.layers import cell_and_offset, cell_patches, interpolate

    g = torch.Generator().manual_seed(1)
    features = torch.nn.functional.normalize(torch.randn(2, 8, 10, 14, generator=g), dim=1).double()
    estimate = torch.rand(2, 6, 2, generator=g).double()
    estimate[0, 0] = torch.tensor([0.0, 1.0])  # corners of the map
    estimate[1, 1] = torch.tensor([1.0, 0.02])
    window, (height, width) = 5, features.shape[-2:]
    steps = torch.arange(window, dtype=torch.float64) - window // 2
    offset_y, offset_x = torch.meshgrid(steps / height, steps / width, indexing="ij")
    points = estimate.unsqueeze(2) + torch.stack([offset_x.reshape(-1), offset_y.reshape(-1)], dim=-1)
    expected = grid_sample_reference(features, points.view(2, -1, 2)).view(2, 6, window * window, 8)

    x0, y0, wx, wy = cell_and_offset(estimate, height, width)
    patch = cell_patches(features, x0, y0, -(window // 2), window + 1)
    got = interpolate(patch, wx, wy).flatten(2, 3)
    assert torch.allclose(got, expected, atol=1e-12)


def test_local_soft_argmax_is_the_softmax_over_the_window_around_the_peak():
    from cape_ray.model.layers import local_soft_argmax

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 9, 12, generator=g, dtype=torch.float64) * 3
    logits[0, 0, 0, 0] = 50.0  # a peak in the corner: the window is cut by the border
    logits[1, 2, 8, 5] = 50.0
    height, width, radius = 9, 12, 2
    # reference: mask the full map to the window, softmax, expectation of the cell centres
    flat = logits.flatten(-2)
    peak = flat.argmax(-1, keepdim=True)
    cell_y = torch.arange(height).repeat_interleave(width)
    cell_x = torch.arange(width).repeat(height)
    window = ((cell_y - peak // width).abs() <= radius) & ((cell_x - peak % width).abs() <= radius)
    prob = flat.masked_fill(~window, float("-inf")).softmax(-1)
    centres = torch.stack([(cell_x + 0.5) / width, (cell_y + 0.5) / height], dim=-1).double()
    assert torch.allclose(local_soft_argmax(logits, radius), prob @ centres, atol=1e-12)
