"""Models through the interface (model/api.py): the ViT model, pretrained weights, a model of your
own, and the guarantees at model scale, in the real loop without Ray (the Ray runs that SIGKILL
workers are in test_models_ray.py). Errors that can be known before Ray starts are one line each."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cape_ray import checkpoint as ckpt, cli, engine, rng
from cape_ray.model import build_model, model_spec
from cape_ray.model.api import ModelError, ModelSpec, build, check_episode, describe
from cape_ray.worker import train_loop_per_worker
from local_edge import Crash, LocalEdge
from tiny import cli_flags, make_config, tiny_vit

ROOT = Path(__file__).resolve().parents[1]


def train(config, **edge_options) -> LocalEdge:
    edge = LocalEdge(Path(config.storage_path) / config.name, **edge_options)
    train_loop_per_worker(config.to_dict(), edge)
    return edge


def crash_then_resume(config, crash_after: int) -> LocalEdge:
    first = LocalEdge(Path(config.storage_path) / config.name, crash_after=crash_after, quiet=True)
    with pytest.raises(Crash):
        train_loop_per_worker(config.to_dict(), first)
    second = LocalEdge.after(first)
    train_loop_per_worker(config.to_dict(), second)
    return second


def assert_same(a: str | Path, b: str | Path, *, state_keys=("position", "tracking", "history", "grad_scaler")) -> None:
    one, two = ckpt.load_checkpoint(a), ckpt.load_checkpoint(b)
    assert one.model.keys() == two.model.keys()
    for key in one.model:
        assert torch.equal(one.model[key], two.model[key]), f"model {key}"
    for index, state in one.optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(value, two.optimizer["state"][index][key]), f"optimizer {index}/{key}"
    assert one.scheduler == two.scheduler
    for key in state_keys:
        assert one.state.get(key) == two.state.get(key), f"state {key}"
    for rank, mine in one.rank_states.items():
        assert torch.equal(mine["rng_state"], two.rank_states[rank]["rng_state"])
        assert mine["np_rng_state"] == two.rank_states[rank]["np_rng_state"]
        assert mine["py_rng_state"] == two.rank_states[rank]["py_rng_state"]


def train_cli(capsys, config, *extra: str) -> tuple[int, str, str]:
    try:
        status = cli.main(["train", *cli_flags(config), *extra])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


# ------------------------------------------------------------------------------- the ViT model
def test_the_vit_model_is_a_timm_vit_with_a_keypoint_decoder(tmp_path):
    config = tiny_vit(tmp_path)
    model = build_model(config)
    check_episode(model, "vit", config.image_size, 1)
    record = describe(model, model_spec(config))
    assert record["builder"] == "vit" and record["kwargs"]["backbone"] == "vit_small_patch14_dinov2"
    assert record["class"] == "cape_ray.model.vit.VitCape" and len(model.backbone.vit.blocks) == 2
    inputs = dict(support_images=torch.rand(2, 1, 3, 28, 28), support_keypoints=torch.rand(2, 1, 5, 2),
                  support_visible=torch.ones(2, 1, 5, dtype=torch.bool), query_images=torch.rand(2, 3, 3, 28, 28),
                  keypoint_mask=torch.ones(2, 5, dtype=torch.bool), skeleton=torch.eye(5).expand(2, 5, 5))
    prediction = model(**inputs)
    # the proposal and one refinement per decoder layer, every one in the loss
    assert prediction.coords.shape == (1 + config.refine_layers, 2, 3, 5, 2)
    assert prediction.similarity.shape == (2, 3, 5, 2, 2)  # 28 px / patch 14: a 2 x 2 grid of cells


def test_image_size_and_patch_size_must_agree_before_ray_starts(tmp_path, capsys, ray_must_not_start):
    status, _, err = train_cli(capsys, tiny_vit(tmp_path, image_size=30))
    assert status == 2 and err.count("\n") == 1
    assert "--image_size 30 is not a multiple of vit_small_patch14_dinov2's patch size 14" in err
    assert "use --image_size 28 or 42" in err


def test_a_vit_run_crashed_and_resumed_is_bitwise_the_uninterrupted_one(tmp_path):
    reference = train(tiny_vit(tmp_path, "reference"), quiet=True)
    resumed = crash_then_resume(tiny_vit(tmp_path, "resumed"), crash_after=6)  # epoch 2, after step 2
    assert_same(resumed.latest, reference.latest)


def test_a_frozen_backbone_stays_bitwise_what_it_was(tmp_path):
    config = tiny_vit(tmp_path, freeze_backbone=True)
    rng.seed_everything(config.seed)
    initial = build_model(config).state_dict()
    edge = train(config, quiet=True)
    final = ckpt.load_checkpoint(edge.latest).model
    backbone = [k for k in final if k.startswith("backbone.")]
    assert backbone and all(torch.equal(final[k], initial[k]) for k in backbone)
    assert not torch.equal(final["input_proj.weight"], initial["input_proj.weight"])  # the decoder trained
    record = ckpt.read_state(edge.latest)["model"]
    assert record["trainable_parameters"] < record["parameters"]


def test_training_the_last_blocks_only_and_a_slower_backbone(tmp_path):
    config = tiny_vit(tmp_path, train_backbone_blocks=1, backbone_lr_mult=0.1)
    rng.seed_everything(config.seed)
    initial = build_model(config).state_dict()
    edge = train(config, quiet=True)
    final = ckpt.load_checkpoint(edge.latest)
    frozen = [k for k in final.model if k.startswith(("backbone.vit.blocks.0.", "backbone.vit.patch_embed",
                                                      "backbone.vit.pos_embed", "backbone.vit.cls_token"))]
    trained = [k for k in final.model if k.startswith("backbone.vit.blocks.1.")]
    assert all(torch.equal(final.model[k], initial[k]) for k in frozen)
    assert all(not torch.equal(final.model[k], initial[k]) for k in trained if k.endswith("weight"))
    model = build_model(config)
    optimizer = engine.build_optimizer(model, config)
    assert {g["lr"] for g in optimizer.param_groups} == {config.lr, config.lr * 0.1}
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    for group in optimizer.param_groups:
        assert all((id(p) in backbone_ids) == (group["lr"] == config.lr * 0.1) for p in group["params"])


def test_gradient_checkpointing_gives_bitwise_the_same_run(tmp_path):
    plain = train(tiny_vit(tmp_path, "plain", epochs=1), quiet=True)
    recomputed = train(tiny_vit(tmp_path, "recomputed", epochs=1, grad_checkpointing=True), quiet=True)
    assert_same(recomputed.latest, plain.latest)


# ---------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_runs_crashed_and_resumed_are_bitwise_the_uninterrupted_ones(tmp_path, precision):
    """fp16 keeps its gradient scaler in the training state: a resume that dropped it would start
    the scale and its growth counter afresh, and the final state would differ."""
    reference = train(make_config(tmp_path, "reference", precision=precision), quiet=True)
    resumed = crash_then_resume(make_config(tmp_path, "resumed", precision=precision), crash_after=6)
    assert_same(resumed.latest, reference.latest)
    scaler = ckpt.read_state(reference.latest)["grad_scaler"]
    if precision == "fp16":
        assert scaler["_growth_tracker"] > 0 and scaler["scale"] > 0
    else:
        assert scaler is None


def test_precision_changes_the_math(tmp_path):
    plain = train(make_config(tmp_path, "fp32", epochs=1), quiet=True)
    half = train(make_config(tmp_path, "bf16", epochs=1, precision="bf16"), quiet=True)
    one, two = ckpt.load_checkpoint(plain.latest).model, ckpt.load_checkpoint(half.latest).model
    assert any(not torch.equal(one[k], two[k]) for k in one)
    assert ckpt.read_state(half.latest)["precision"] == "bf16"


def test_precision_preflight_notes_a_slow_fp16_on_cpu_and_refuses_a_missing_autocast(tmp_path, capsys, monkeypatch):
    from cape_ray import preflight
    from cape_ray.config import ConfigError

    preflight.check_precision(make_config(tmp_path, "fp16", precision="fp16"))
    assert "--precision fp16 on CPU workers runs slowly" in capsys.readouterr().err
    preflight.check_precision(make_config(tmp_path, "bf16", precision="bf16"))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(ConfigError, match="--precision bf16: this torch has no autocast for cpu"):
        preflight.check_precision(make_config(tmp_path, "bf16", precision="bf16"))


# -------------------------------------------------------------------------- pretrained weights
def backbone_file(tmp_path: Path, config, fmt: str, seed: int = 3) -> tuple[Path, dict]:
    """A tiny timm ViT's weights saved as a .safetensors or torch file: the stand-in for DINOv2's."""
    torch.manual_seed(seed)
    weights = {k: v.clone() for k, v in build_model(config).backbone.vit.state_dict().items()}
    path = tmp_path / f"backbone.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)
    return path, weights


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_pretrained_backbone_weights_are_loaded_and_said(tmp_path, capfd, fmt):
    config = tiny_vit(tmp_path, epochs=1, freeze_backbone=True)
    path, weights = backbone_file(tmp_path, config, fmt)
    edge = train(config.replace(pretrained=str(path)))
    out = capfd.readouterr().out
    assert f"pretrained weights {path}: {len(weights)} tensors loaded, 0 missing, 0 unexpected" in out
    final = ckpt.load_checkpoint(edge.latest).model  # frozen: still exactly the file's weights
    assert all(torch.equal(final[f"backbone.vit.{k}"], v) for k, v in weights.items())


def test_pretrained_mismatches_are_refused_before_ray_starts(tmp_path, capsys, ray_must_not_start):
    wider = tiny_vit(tmp_path, model_kwargs={"backbone_args": {"depth": 2, "embed_dim": 48, "num_heads": 2}})
    path, _ = backbone_file(tmp_path, wider, "safetensors")
    status, _, err = train_cli(capsys, tiny_vit(tmp_path, pretrained=str(path)))
    assert status == 2 and err.count("\n") == 1
    assert re.search(rf"--pretrained {re.escape(str(path))}: [\w.]+ has shape \[(\d+, )*48\] in the file but "
                     rf"\[(\d+, )*32\] in the model as built here", err), err

    (tmp_path / "junk.pt").write_bytes(b"not a weights file")
    status, _, err = train_cli(capsys, tiny_vit(tmp_path, pretrained=str(tmp_path / "junk.pt")))
    assert status == 2 and "cannot be read as weights" in err and err.count("\n") == 1

    status, _, err = train_cli(capsys, tiny_vit(tmp_path, pretrained=str(tmp_path / "missing.safetensors")))
    assert status == 2 and "no such file" in err


def test_a_hub_name_without_the_hub_says_how_to_pass_a_file(tmp_path, capsys, ray_must_not_start, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, _, err = train_cli(capsys, tiny_vit(tmp_path, pretrained="hf-hub:timm/vit_small_patch14_dinov2.lvd142m"))
    assert status == 2 and err.count("\n") == 1
    assert "the Hugging Face Hub cannot be reached from here" in err
    assert "hf download timm/vit_small_patch14_dinov2.lvd142m model.safetensors" in err
    assert "--pretrained weights/model.safetensors" in err


# ------------------------------------------------------------------------- a model of your own
def test_a_model_of_your_own_is_built_checked_and_recorded(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = make_config(tmp_path, "mine", epochs=1, model="examples.my_model:build", model_kwargs={"width": 8})
    edge = train(config, quiet=True)
    record = ckpt.read_state(edge.latest)["model"]
    assert record["builder"] == "examples.my_model:build" and record["kwargs"] == {"width": 8}
    assert record["class"] == "examples.my_model.TinyMatcher"
    # every command rebuilds it from the checkpoint alone
    rebuilt = build(ModelSpec.from_dict(record))
    rebuilt.load_state_dict(ckpt.load_checkpoint(edge.latest).model)


BROKEN_MODELS = {
    "no_such_module": ("nowhere.at_all:build", "cannot import nowhere.at_all: ModuleNotFoundError"),
    "no_builder": ("broken_models:missing", "broken_models has no function 'missing'"),
    "no_decode": ("broken_models:no_decode", "NoDecode has no decode() method"),
    "wrong_shape": ("broken_models:wrong_shape", "Prediction.coords is a tensor of shape [1, 2, 3], expected "
                                                 "[L, 1, 2, 3, 2]"),
    "not_a_prediction": ("broken_models:tuple_out", "decode() returned tuple, expected cape_ray.model.api.Prediction"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MODELS))
def test_a_model_that_breaks_the_interface_is_refused_in_one_line(tmp_path, capsys, monkeypatch, ray_must_not_start,
                                                                    case):
    (tmp_path / "broken_models.py").write_text(BROKEN_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    name, words = BROKEN_MODELS[case]
    status, _, err = train_cli(capsys, make_config(tmp_path, "broken", model=name))
    assert status == 2 and words in err and err.count("\n") == 1, err


BROKEN_MODULE = '''
import torch
from cape_ray.model.api import Prediction


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def encode(self, images):
        return self.conv(images)


class NoDecode(Encoder):
    pass


class WrongShape(Encoder):
    def decode(self, support_features, support_keypoints, support_visible, query_features, keypoint_mask, skeleton):
        return Prediction(torch.zeros(1, 2, 3))


class TupleOut(Encoder):
    def decode(self, support_features, support_keypoints, support_visible, query_features, keypoint_mask, skeleton):
        return torch.zeros(1, 1, 2, 3, 2), None


def no_decode():
    return NoDecode()


def wrong_shape():
    return WrongShape()


def tuple_out():
    return TupleOut()
'''


# ------------------------------------------------------- every command rebuilds from the checkpoint
def test_inspect_export_and_evaluate_need_only_the_checkpoint(tmp_path):
    edge = train(tiny_vit(tmp_path, epochs=1, val_episodes=1), quiet=True)
    checkpoint = edge.latest
    run = lambda *args: subprocess.run([sys.executable, "-m", "cape_ray", *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=300, cwd=tmp_path)
    inspected = run("inspect", checkpoint)
    assert inspected.returncode == 0 and "builder: vit" in inspected.stdout and "fingerprint" in inspected.stdout
    exported = run("export", checkpoint, "--pth", str(tmp_path / "out.pth"))
    assert exported.returncode == 0, exported.stderr
    evaluated = run("evaluate", "--checkpoint", checkpoint, "--split", "val", "--episodes", "1", "--queries", "2",
                    "--out", str(tmp_path / "eval.json"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "PCK@0.20" in evaluated.stdout and (tmp_path / "eval.json").is_file()
