"""CapeModel: output shape, padding invariance across mixed K, shots, determinism."""

import torch

from cape_ray.config import TrainConfig
from cape_ray.model import build_backbone, build_model

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


def model(**changes):
    torch.manual_seed(0)
    return build_model(TrainConfig(image_size=SIZE, **changes)).eval()


def test_output_shape_and_range():
    net = model(refine_layers=2)
    coords = net(**episode(7, shots=1, queries=3))
    assert coords.shape == (3, 1, 3, 7, 2)  # proposal + 2 refinement layers
    assert coords.min() >= 0 and coords.max() <= 1


def test_padding_does_not_change_real_keypoints():
    net = model(refine_layers=2, use_skeleton=True)
    small, large = episode(5, seed=1), episode(9, seed=2)
    with torch.no_grad():
        alone_small = net(**small)
        alone_large = net(**large)
        together = net(**pad_and_stack([small, large]))
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
        assert torch.allclose(net(**one), net(**five), atol=1e-5)


def test_shot_where_keypoint_is_invisible_is_ignored():
    net = model()
    one = episode(6, shots=1, seed=4)
    other = episode(6, shots=1, seed=5)
    two = dict(one)
    two["support_images"] = torch.cat([one["support_images"], other["support_images"]], dim=1)
    two["support_keypoints"] = torch.cat([one["support_keypoints"], other["support_keypoints"]], dim=1)
    two["support_visible"] = torch.cat([one["support_visible"], torch.zeros(1, 1, 6, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        assert torch.allclose(net(**one), net(**two), atol=1e-5)


def test_training_is_deterministic():
    def train() -> list[torch.Tensor]:
        net = model(dropout=0.1).train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        batch = pad_and_stack([episode(4, seed=6), episode(6, seed=7)])
        target = torch.rand(2, 2, 6, 2, generator=torch.Generator().manual_seed(8))
        for _ in range(3):
            loss = (net(**batch) - target).abs().mean()
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
    assert net(**episode(3)).shape == (2, 1, 2, 3, 2)
