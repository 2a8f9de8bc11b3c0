"""Every global RNG round-trips through a checkpoint file loaded with weights_only=True."""

import io
import random

import numpy as np
import torch

from cape_ray import rng
from cape_ray.checkpoint import serialize


def draw():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(4).tolist(), torch.nn.functional.dropout(torch.ones(8), 0.5).tolist())


def test_capture_restore_continues_every_stream():
    rng.seed_everything(123)
    draw()
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.randn()  # and numpy's
    state = torch.load(io.BytesIO(serialize(rng.capture())), weights_only=True)
    expected = [draw() for _ in range(3)]
    rng.seed_everything(999)  # something else runs in between
    draw()
    restored = rng.restore(state)
    assert restored == ["python", "numpy", "torch"]
    assert [draw() for _ in range(3)] == expected


def test_state_holds_only_tensors_and_primitives():
    state = rng.capture()
    for value in state.values():
        assert isinstance(value, (torch.Tensor, int, float, str, list, type(None)))


def test_derived_seed_is_stable_and_distinct():
    assert rng.derived_seed(0, 1) == rng.derived_seed(0, 1)
    assert rng.derived_seed(0, 1) != rng.derived_seed(1, 0)
    assert 0 <= rng.derived_seed(5, 7) < 2**63
