"""Engine: schedule, optimizer groups, batch-size-independent evaluation, baselines, overfitting."""

import math
from types import SimpleNamespace

import torch

from cape_ray import engine
from cape_ray.config import TrainConfig
from cape_ray.model import build_model

SIZE = 32


def blob_batch(num_episodes: int, num_keypoints: int = 5, queries: int = 2, seed: int = 0) -> SimpleNamespace:
    """Episodes shaped like EpisodeBatch: the query is a shifted, noisier copy of the support, so the
    keypoints move with the image content. Categories alternate K and K-2 to exercise padding."""
    g = torch.Generator().manual_seed(seed)
    fields = {name: [] for name in ("support_images", "support_keypoints", "support_visible", "query_images",
                                    "query_keypoints", "query_visible", "keypoint_mask", "skeleton")}
    for e in range(num_episodes):
        k = num_keypoints - 2 * (e % 2)
        image = torch.rand(3, SIZE, SIZE, generator=g)
        support_kp = 0.25 + 0.5 * torch.rand(k, 2, generator=g)
        shifts = torch.randint(-4, 5, (queries, 2), generator=g)
        query_images = torch.stack([torch.roll(image, (int(dy), int(dx)), dims=(1, 2)) for dx, dy in shifts])
        query_images = query_images + 0.05 * torch.rand(query_images.shape, generator=g)
        query_kp = support_kp.unsqueeze(0) + shifts.unsqueeze(1).float() / SIZE
        pad = num_keypoints - k
        fields["support_images"].append(image[None])
        fields["support_keypoints"].append(torch.nn.functional.pad(support_kp, (0, 0, 0, pad))[None])
        fields["support_visible"].append(torch.arange(num_keypoints)[None] < k)
        fields["query_images"].append(query_images)
        fields["query_keypoints"].append(torch.nn.functional.pad(query_kp, (0, 0, 0, pad)))
        fields["query_visible"].append((torch.arange(num_keypoints) < k).expand(queries, -1))
        fields["keypoint_mask"].append(torch.arange(num_keypoints) < k)
        fields["skeleton"].append(torch.zeros(num_keypoints, num_keypoints))
    batch = SimpleNamespace(**{name: torch.stack(values) for name, values in fields.items()})
    batch.query_bbox = torch.tensor([0.0, 0.0, 40.0, 40.0]).expand(num_episodes, queries, 4)
    batch.query_to_original = torch.tensor([[50.0, 0.0, -5.0], [0.0, 50.0, -5.0]]).expand(num_episodes, queries, 2, 3)
    batch.category_ids = torch.arange(num_episodes)
    return batch


def select(batch: SimpleNamespace, start: int, stop: int) -> SimpleNamespace:
    return SimpleNamespace(**{name: value[start:stop] for name, value in vars(batch).items()})


def test_scheduler_warmup_then_cosine():
    config = TrainConfig(lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    model = torch.nn.Linear(2, 2)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, total_steps=14)
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [round(lr, 10) for lr in lrs[:4]] == [2.5e-4, 5e-4, 7.5e-4, 1e-3]
    assert math.isclose(lrs[4], 1e-3)
    assert math.isclose(lrs[9], 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half way
    assert math.isclose(lrs[14], 1e-4) and math.isclose(lrs[15], 1e-4)  # floor after the end
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_a_second_schedule_over_the_same_optimizer_starts_from_the_base_lr():
    """A re-planned schedule (bench/quality.py re-plans as its speed estimate changes) must not take
    the LR the first schedule has set by then for its base."""
    config = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    optimizer = engine.build_optimizer(torch.nn.Linear(2, 2), config)
    first = engine.build_scheduler(optimizer, config, total_steps=100)
    for _ in range(3):
        first.step()
    assert math.isclose(optimizer.param_groups[0]["lr"], 4e-4)  # in the warmup
    second = engine.build_scheduler(optimizer, config, total_steps=200)
    second.set_progress(first.progress + 20)
    assert math.isclose(optimizer.param_groups[0]["lr"], 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 13 / 190)))


def test_scheduler_state_dict_round_trip():
    config = TrainConfig(lr=1e-3, warmup_steps=3)
    model = torch.nn.Linear(2, 2)
    optimizer = engine.build_optimizer(model, config)
    scheduler = engine.build_scheduler(optimizer, config, total_steps=20)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()

    def primitive(value) -> bool:
        if isinstance(value, (list, tuple)):
            return all(primitive(v) for v in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and primitive(v) for k, v in value.items())
        return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))

    assert primitive(state)
    fresh_optimizer = engine.build_optimizer(model, config)
    fresh = engine.build_scheduler(fresh_optimizer, config, total_steps=20)
    fresh.load_state_dict(state)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    for _ in range(3):
        optimizer.step(), fresh_optimizer.step()
        scheduler.step(), fresh.step()
        assert fresh.get_last_lr() == scheduler.get_last_lr()
        assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_no_weight_decay_on_norms_and_biases():
    config = TrainConfig(weight_decay=0.05)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, parameter in model.named_parameters():
        assert (id(parameter) in decayed) == (parameter.dim() >= 2), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_evaluation_does_not_depend_on_batch_size():
    torch.manual_seed(0)
    model = build_model(TrainConfig(image_size=SIZE)).train()  # evaluation must switch to eval mode
    batch = blob_batch(6, seed=1)
    whole = engine.evaluation_sums(model, batch)
    assert model.training  # and restore the mode
    for size in (1, 4):
        parts = {}
        for start in range(0, 6, size):
            engine.add_sums(parts, engine.evaluation_sums(model, select(batch, start, start + size)))
        assert parts.keys() == whole.keys()
        for key in whole:
            assert math.isclose(parts[key], whole[key], rel_tol=1e-5, abs_tol=1e-6), key
    metrics = engine.summarize(whole)
    assert metrics["val_pck"] == metrics["pck@0.20"]
    assert math.isclose(metrics["mpck"], sum(metrics[f"pck@{t:.2f}"] for t in (0.05, 0.1, 0.15, 0.2, 0.25)) / 5)
    assert whole["pairs"] == 12


def test_baselines():
    batch = blob_batch(3)
    copy = engine.copy_support_predictions(batch)
    centre = engine.center_predictions(batch)
    assert copy.shape == centre.shape == batch.query_keypoints.shape
    assert torch.equal(copy[:, 1], batch.support_keypoints[:, 0])
    assert centre.eq(0.5).all()
    tensors = engine.batch_tensors(batch, torch.device("cpu"))
    exact = engine.summarize(engine.pck_sums(batch.query_keypoints, tensors))
    assert exact["val_pck"] == 1.0 and exact["pck@0.05"] == 1.0


def test_overfits_a_few_episodes():
    torch.manual_seed(0)
    config = TrainConfig(image_size=SIZE, lr=3e-3, warmup_steps=0, dropout=0.0)
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    batch = blob_batch(4, seed=2)
    for step in range(60):
        loss, _ = engine.compute_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9 and engine.summarize(engine.evaluation_sums(model, batch))["val_pck"] == 1.0:
            break
    metrics = engine.summarize(engine.evaluation_sums(model, batch))
    assert metrics["val_pck"] == 1.0, (step, metrics)
