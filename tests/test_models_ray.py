"""The guarantees at model scale, with real Ray: a worker of a 2-worker run SIGKILLed mid-epoch, the
run resumed by Ray, ends bitwise identical to an uninterrupted one, for the ViT model and for the
CNN in bf16. And a model of your own trained for two epochs through the real CLI, its module shipped
to the workers by Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cape_ray import checkpoint as ckpt
from test_ray_job import assert_bitwise_equal, final_checkpoint, fit
from tiny import cli_flags, make_config, tiny_vit

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TWO_WORKERS = dict(epochs=2, episodes_per_epoch=32, num_workers="2", keep=100)
CONFIGS = {
    "vit": lambda root, name: tiny_vit(root, name, **TWO_WORKERS),
    "cnn-bf16": lambda root, name: make_config(root, name, precision="bf16", **TWO_WORKERS),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_worker_killed_mid_epoch_resumes_bitwise(ray_cluster, tmp_path, kind):
    from ray import cloudpickle

    import faults

    cloudpickle.register_pickle_by_value(faults)
    reference = CONFIGS[kind](tmp_path, "reference")
    assert fit(reference).error is None
    killed = CONFIGS[kind](tmp_path, "killed")
    # 8 micro-batches per epoch per rank: call 14 is epoch 2, step 3 (after the checkpoints of steps 1
    # and 2; Ray may lose the last report before a kill, so the resume is from either)
    plan = {"rank": 1, "kill_at_call": 14, "marker": str(tmp_path / "killed.marker"), "log": str(tmp_path / "starts.log")}
    result = fit(killed, faults.train_with_faults, {**killed.to_dict(), "_fault_plan": plan})
    assert result.error is None and os.path.exists(plan["marker"]), "the worker was never killed"
    starts = Path(plan["log"]).read_text().splitlines()
    resumed_from = {line.split("checkpoint=")[1] for line in starts[2:]}
    assert len(starts) == 4 and len(resumed_from) == 1
    assert ckpt.position_from_name(resumed_from.pop()) in {(2, 1), (2, 2)}  # mid-epoch 2
    final = final_checkpoint(tmp_path / "killed")
    assert_bitwise_equal(final, final_checkpoint(tmp_path / "reference"))
    assert final.state["precision"] == killed.precision and final.state["model"]["builder"] == killed.model


def test_a_model_of_your_own_trains_two_epochs_through_the_cli(ray_cluster, tmp_path):
    """examples/my_model.py as a package of the user's own (`mymodels`), importable only from the
    directory the command runs in: the workers get it because the driver ships it."""
    (tmp_path / "mymodels").mkdir()
    shutil.copy(ROOT / "examples" / "my_model.py", tmp_path / "mymodels" / "my_model.py")
    (tmp_path / "mymodels" / "__init__.py").write_text("")
    config = make_config(tmp_path, "mine", epochs=2, checkpoint_every_steps=0, model="mymodels.my_model:build",
                         model_kwargs={"width": 8})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    done = subprocess.run([sys.executable, "-m", "cape_ray", "train", *cli_flags(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "training mymodels.my_model:build (" in done.stdout and "epoch   2/2" in done.stdout
    state = ckpt.read_state(final_checkpoint(tmp_path / "mine").path)
    assert state["position"]["epoch"] == 2 and state["model"]["class"] == "mymodels.my_model.TinyMatcher"
