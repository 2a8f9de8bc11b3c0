"""Every global RNG round-trips through a checkpoint file loaded with weights_only=True, under the
original pipeline's field names; CUDA states are restored device by device, or the reason is said."""

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
    assert restored.restored == ["torch", "numpy", "python"]
    assert [draw() for _ in range(3)] == expected


def test_fields_are_the_originals_and_restore_with_their_own_libraries():
    rng.seed_everything(7)
    state = torch.load(io.BytesIO(serialize(rng.capture())), weights_only=True)
    assert set(state) == set(rng.CAPTURED_KEYS) and set(rng.RNG_KEYS) < set(rng.CAPTURED_KEYS)
    expected = draw()
    rng.seed_everything(8)
    # what a script written for the original pipeline does with these fields
    torch.set_rng_state(state["rng_state"])
    np.random.set_state(state["np_rng_state"])
    random.setstate(state["py_rng_state"])
    assert draw() == expected
    assert state["cuda_rng_state"] is None and state["cuda_device"] is None  # no CUDA in use here


def test_cuda_states_are_restored_per_device_or_said_why_not(monkeypatch):
    saved = {**rng.capture(), "cuda_rng_state": [torch.full((16,), 1, dtype=torch.uint8),
                                                 torch.full((16,), 2, dtype=torch.uint8)]}
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((int(state[0]), device)))
    result = rng.restore(saved)
    assert calls == [(1, 0), (2, 1)] and result.cuda and result.cuda_note == ""
    # one device visible: a clear decision, said in the note
    calls.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = rng.restore(saved)
    assert calls == [(1, 0)] and result.cuda
    assert result.cuda_note == "the checkpoint has 2 device state(s), 1 visible here: restored by device index for 1"
    # knowing the device the rank trained on, its own stream continues on the device it has now
    calls.clear()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    result = rng.restore({**saved, "cuda_device": 1})
    assert calls == [(1, 0), (2, 0)] and result.cuda
    assert result.cuda_note == ("the checkpoint has 2 device state(s), 1 visible here: this rank's stream (it "
                                "trained on cuda:1) continues on cuda:0")
    calls.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    result = rng.restore({**saved, "cuda_device": 0})  # as many devices, the same one: restored by index
    assert calls == [(1, 0), (2, 1)] and result.cuda_note == ""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    # a CPU checkpoint resumed with CUDA: nothing to restore, seeded deterministically instead
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    result = rng.restore({**saved, "cuda_rng_state": None}, cuda_fallback_seed=5)
    assert not result.cuda and seeded == [5] and "written without CUDA" in result.cuda_note
    # a GPU checkpoint resumed on a CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = rng.restore(saved)
    assert not result.cuda and "no CUDA device here" in result.cuda_note


def test_derived_seed_is_stable_and_distinct():
    assert rng.derived_seed(0, 1) == rng.derived_seed(0, 1)
    assert rng.derived_seed(0, 1) != rng.derived_seed(1, 0)
    assert 0 <= rng.derived_seed(5, 7) < 2**63
