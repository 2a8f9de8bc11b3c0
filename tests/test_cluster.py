"""The cluster files: a real token-protected head on loopback, and the configs checked by Ray itself.

The head (and a worker node where one is needed) is a separate Ray instance started with `ray start
--block` by tests/loopback.py and stopped by signalling that process; `ray stop` is never used: it
would stop every Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cape_ray import checkpoint as ckpt
from cape_ray.cli import build_parser, config_from_args
from loopback import BIN, LoopbackCluster, http_get

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"

# A tiny run: 1 worker, 4 steps per epoch, 2 epochs (as small as tests/test_ray_job.py's BASE).
TINY_FLAGS = [
    "--epochs", "2", "--episodes_per_epoch", "16", "--batch_size", "2", "--accumulation_steps", "2",
    "--num_queries_per_episode", "2", "--val_episodes", "2", "--val_queries_per_episode", "3",
    "--image_size", "32", "--feature_dim", "16", "--refine_layers", "1",
    "--synthetic_instances_per_category", "6", "--synthetic_canvas", "48", "--num_workers", "1",
    "--warmup_steps", "2", "--lr", "3e-3", "--keep", "2",
]


# ----------------------------------------------------------------------------- a real head
@pytest.fixture(scope="module")
def head():
    """A token-protected head on loopback (tests/loopback.py): its own ports, temp dir and HOME."""
    cluster = LoopbackCluster(head_cpus=2)
    try:
        yield cluster
    finally:
        cluster.close()


def jobs(head: LoopbackCluster) -> list[dict]:
    status, body = http_get(f"{head.dashboard}/api/jobs/", head.token)
    assert status == 200, body
    return json.loads(body)


@pytest.mark.slow
def test_submission_without_the_token_is_refused(head, tmp_path):
    before = {j["submission_id"] for j in jobs(head)}
    # A client that sends no token (auth mode off on its side, no token anywhere): the head refuses.
    env = {k: v for k, v in head.env.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="disabled")
    command = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--no-wait",
               "--", "python", "-c", "print('should never run')"]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    output = refused.stdout + refused.stderr
    assert "Authentication required" in output and "Missing authentication token" in output, output[-2000:]

    # In token mode without a token, Ray's client does not even send the request.
    local = subprocess.run(command, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                           timeout=120)
    assert local.returncode != 0 and "couldn't find an authentication token" in local.stdout + local.stderr

    # The REST API says the same, and a wrong token is rejected as well.
    assert http_get(f"{head.dashboard}/api/jobs/")[0] == 401
    assert http_get(f"{head.dashboard}/api/jobs/", "not-the-token")[0] == 403
    wrong = subprocess.run([str(CLUSTER / "submit.sh"), "--no-wait", "--name", "refused",
                            "--storage_path", str(tmp_path / "runs"), *TINY_FLAGS],
                           env={**env, "RAY_ADDRESS": head.dashboard, "RAY_AUTH_TOKEN": "not-the-token"},
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode != 0
    assert "403" in wrong.stdout + wrong.stderr or "invalid" in (wrong.stdout + wrong.stderr).lower()
    assert {j["submission_id"] for j in jobs(head)} == before, "a refused submission must not create a job"


def assert_completed_run(run_dir: Path, epochs: int) -> ckpt.LoadedCheckpoint:
    """Ray's snapshot, the epoch checkpoints, both best exports, every directory verifying; the
    final checkpoint's history of `epochs` epochs (returned)."""
    assert (run_dir / "checkpoint_manager_snapshot.json").exists()
    names = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    final_name = f"checkpoint_e{epochs:03d}_lr3e-3_bs2_acc2_qpe2"
    assert final_name in names
    assert any(n.startswith("checkpoint_best_pck_") for n in names)
    assert any(n.startswith("checkpoint_best_loss_") for n in names)
    for name in names:
        assert ckpt.verify_checkpoint(run_dir / name) == [], name
    final = ckpt.load_checkpoint(run_dir / final_name)
    assert [h["epoch"] for h in final.state["history"]] == list(range(1, epochs + 1))
    return final


@pytest.mark.slow
def test_submit_sh_with_the_token_runs_the_real_entrypoint(head, tmp_path):
    storage = tmp_path / "runs"
    env = {**head.env, "RAY_ADDRESS": head.dashboard, "HOME": str(tmp_path)}  # the token from RAY_AUTH_TOKEN
    submitted = subprocess.run([str(CLUSTER / "submit.sh"), "--name", "authrun", "--storage_path", str(storage),
                                *TINY_FLAGS], env=env, capture_output=True, text=True, timeout=400)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-5000:]
    assert re.search(r"job authrun-\d{8}-\d{6}-[0-9a-f]+: SUCCEEDED", output), output[-3000:]

    (job,) = [j for j in jobs(head) if (j["submission_id"] or "").startswith("authrun-")]
    assert job["status"] == "SUCCEEDED"
    assert job["submission_id"].startswith("authrun-")
    assert job["entrypoint"].startswith("python -m cape_ray train --name authrun --storage_path ")

    run_dir = storage / "authrun"
    assert_completed_run(run_dir, 2)

    # The same name again with one more epoch: a fresh submission id, and the run resumes.
    again = subprocess.run([str(CLUSTER / "submit.sh"), "--name", "authrun", "--storage_path", str(storage),
                            *TINY_FLAGS, "--epochs", "3"], env=env, capture_output=True, text=True, timeout=400)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-5000:]
    assert "RESUMING FROM CHECKPOINT" in output, output[-3000:]
    assert "Checkpoint: checkpoint_e002_lr3e-3_bs2_acc2_qpe2  [" in output, output[-3000:]
    # a finished job of the run does not block its resubmission
    assert len({j["submission_id"] for j in jobs(head) if (j["submission_id"] or "").startswith("authrun-")}) == 2
    final = ckpt.load_checkpoint(run_dir / "checkpoint_e003_lr3e-3_bs2_acc2_qpe2")
    assert [h["epoch"] for h in final.state["history"]] == [1, 2, 3]


def job_api(head: LoopbackCluster, method: str, path: str, body: dict | None = None) -> dict:
    import urllib.request

    request = urllib.request.Request(f"{head.dashboard}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {head.token}",
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


@pytest.mark.slow
def test_submit_sh_refuses_while_a_job_of_the_run_is_running(head, tmp_path):
    """A resubmission after a dropped connection: the first job still runs, so submit.sh must not
    start a second driver; it names the running job and how to follow it. Jobs of other runs,
    even ones whose names start alike, do not count."""
    sleepers = {"busyrun": "busyrun-20260101-000000-aa", "busyrun-b": "busyrun-b-20260101-000000-bb"}
    for submission_id in sleepers.values():
        job_api(head, "POST", "/api/jobs/", {"entrypoint": "python -c 'import time; time.sleep(300)'",
                                             "submission_id": submission_id})
    try:
        deadline = time.time() + 120
        while {j["submission_id"]: j["status"] for j in jobs(head)}.get(sleepers["busyrun"]) != "RUNNING":
            assert time.time() < deadline, "the stand-in job never started"
            time.sleep(0.5)
        env = {**head.env, "RAY_ADDRESS": head.dashboard, "HOME": str(tmp_path), "CAPE_EXTRA_EXCLUDES": ""}
        before = {j["submission_id"] for j in jobs(head)}
        for name, running in sleepers.items():
            refused = subprocess.run([str(CLUSTER / "submit.sh"), "--no-wait", "--name", name,
                                      "--storage_path", str(tmp_path / "runs"), *TINY_FLAGS],
                                     env=env, capture_output=True, text=True, timeout=120)
            assert refused.returncode != 0
            message = refused.stderr.strip().splitlines()[-1]
            assert message.startswith(f"submit.sh: run '{name}' already has job {running} (")
            assert f"ray job logs --address {head.dashboard} --follow {running}" in message
            others = set(sleepers.values()) - {running}
            assert not any(other in refused.stderr for other in others), refused.stderr
        assert {j["submission_id"] for j in jobs(head)} == before, "a refused submission created a job"
        assert not (tmp_path / "runs").exists()
    finally:
        for submission_id in sleepers.values():
            job_api(head, "POST", f"/api/jobs/{submission_id}/stop")


@pytest.mark.slow
def test_a_second_driver_on_a_training_run_fails_fast(head, tmp_path):
    """Two `python -m cape_ray train` on one run: the second exits non-zero within seconds, naming
    the run and the first driver (host, pid, since), while the first trains on and finishes."""
    import socket

    storage = tmp_path / "runs"
    env = {**head.env, "RAY_ADDRESS": head.gcs, "HOME": str(tmp_path)}
    # 600 steps per epoch (about 25 s here, longer on a loaded machine) with a checkpoint every 50: long
    # enough to be caught training, and to outlast the second driver's attempt.
    command = [sys.executable, "-m", "cape_ray", "train", "--name", "dup", "--storage_path", str(storage),
               *TINY_FLAGS, "--episodes_per_epoch", "2400", "--checkpoint_every_steps", "50"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        run_dir = storage / "dup"
        deadline = time.time() + 300
        while not any(p.name.startswith("checkpoint_") for p in run_dir.glob("checkpoint_*")):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the first driver never wrote a checkpoint"
            time.sleep(0.2)
        lease = json.loads((run_dir / "driver_lease.json").read_text())
        assert lease["pid"] == first.pid

        started = time.time()
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
        took = time.time() - started
        assert second.returncode == 3, second.stdout[-2000:] + second.stderr[-2000:]
        error = second.stderr.strip().splitlines()[-1]
        assert error.startswith("cape-ray train: error: run 'dup' (")
        assert f"host {socket.gethostname()}, pid {first.pid}, since {lease['started']}" in error
        assert "RESUMING" not in second.stdout + second.stderr and "epoch" not in second.stdout
        assert took < 30, f"the second driver took {took:.0f} s to give up"
        assert first.poll() is None, "the first driver did not survive the second one's attempt"
        seen = {p.name for p in run_dir.glob("checkpoint_*")}
        while not {p.name for p in run_dir.glob("checkpoint_*")} - seen:  # ... and trains on
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)

        assert first.wait(timeout=400) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        log.close()
    assert json.loads((run_dir / "driver_lease.json").read_text())["released"]  # released at the end
    final = assert_completed_run(run_dir, 2)
    assert final.state["position"]["global_step"] == 2 * 2400 // 4  # one driver's steps (4 episodes each), none twice


# ----------------------------------------------------------------------------- submit.sh, offline
def dry_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {**os.environ, "RAY_AUTH_TOKEN": "t", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([str(CLUSTER / "submit.sh"), "--dry-run", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=30)


def test_submit_sh_builds_the_job_command():
    result = dry_run("--suffix", "r2", "--name", "mp100", "--storage_path", "s3://bucket/runs", "--epochs", "3")
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    assert words[:3] == ["ray", "job", "submit"]
    assert words[words.index("--address") + 1] == "http://127.0.0.1:8265"
    assert re.fullmatch(r"mp100-\d{8}-\d{6}-r2", words[words.index("--submission-id") + 1])
    assert words[words.index("--working-dir") + 1] == str(REPO)
    runtime_env = json.loads(words[words.index("--runtime-env-json") + 1])
    assert {"/.venv/", "/runs/", "/data/", "/.git/"} <= set(runtime_env["excludes"])
    assert "pip" not in runtime_env
    assert "--no-wait" not in words
    assert words[words.index("--") + 1:] == ["python", "-m", "cape_ray", "train", "--name", "mp100",
                                             "--storage_path", "s3://bucket/runs", "--epochs", "3"]

    # Two submissions of one run name get different ids; --pip leaves Ray out of the install.
    other = shlex.split(dry_run("--pip", "--no-wait", "--name=mp100", "--storage-path=/nfs/runs").stdout)
    assert other[other.index("--submission-id") + 1] != words[words.index("--submission-id") + 1]
    assert "--no-wait" in other
    pip = json.loads(other[other.index("--runtime-env-json") + 1])["pip"]["packages"]
    assert "torch==2.14.1" in pip and not any(p.startswith("ray") for p in pip)
    address = dry_run("--name", "a", "--storage_path", "/nfs", env={"RAY_ADDRESS": "http://10.0.0.5:8265"})
    assert "--address http://10.0.0.5:8265" in address.stdout


def test_submit_sh_refuses_what_would_break_a_resume(tmp_path):
    assert "--name" in dry_run("--storage_path", "s3://b/p").stderr
    assert "--storage_path" in dry_run("--name", "a").stderr
    relative = dry_run("--name", "a", "--storage_path", "runs")
    assert relative.returncode != 0 and "relative" in relative.stderr
    no_token = dry_run("--name", "a", "--storage_path", "/nfs", env={"RAY_AUTH_TOKEN": "", "HOME": str(tmp_path)})
    assert no_token.returncode != 0 and "auth token" in no_token.stderr


def test_submit_sh_takes_name_and_storage_from_a_config_file(tmp_path):
    """examples/cluster.yaml names its run and storage; flags still win; a file the job would not
    have (outside the checkout) is refused before anything is submitted."""
    words = shlex.split(dry_run("--config", "examples/cluster.yaml", "--epochs", "3").stdout)
    assert words[words.index("--submission-id") + 1].startswith("mp100_vit_split1_cluster-")
    assert words[words.index("--") + 1:] == ["python", "-m", "cape_ray", "train", "--config", "examples/cluster.yaml",
                                             "--epochs", "3"]
    renamed = shlex.split(dry_run("--config", "examples/cluster.yaml", "--name", "other").stdout)
    assert renamed[renamed.index("--submission-id") + 1].startswith("other-")
    outside = tmp_path / "mine.yaml"
    outside.write_text("name: mine\nstorage_path: s3://b/p\n")
    refused = dry_run("--config", str(outside))
    assert refused.returncode == 2 and "relative to" in refused.stderr
    local = dry_run("--config", "examples/quickstart.yaml")  # storage_path: runs, a local relative path
    assert local.returncode == 2 and "is relative" in local.stderr


def test_submit_sh_keeps_to_bash_3_2_with_empty_arrays():
    """macOS /bin/bash is 3.2: there, under `set -u`, "${a[@]}" of an empty array is an unbound
    variable (fixed in bash 4.4, so no newer bash shows it). Every array expansion must be the
    guarded ${a[@]+"${a[@]}"}; and the empty-excludes path must run."""
    code = "\n".join(line for line in (CLUSTER / "submit.sh").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    guarded = re.sub(r'\$\{(\w+)\[@\]\+"\$\{\1\[@\]\}"\}', "GUARDED", code)
    bare = re.findall(r'\$\{\w+\[[@*]\]\}', guarded)
    assert not bare, f"unguarded array expansions (unbound on bash < 4.4 when empty): {bare}"

    for excludes in ("", " , ", "extra/"):
        result = dry_run("--name", "a", "--storage_path", "/nfs", env={"CAPE_EXTRA_EXCLUDES": excludes})
        assert result.returncode == 0 and "unbound variable" not in result.stderr, result.stderr
        runtime_env = json.loads(shlex.split(result.stdout)[shlex.split(result.stdout).index("--runtime-env-json") + 1])
        assert ("extra/" in runtime_env["excludes"]) == (excludes == "extra/")
        assert "" not in runtime_env["excludes"]


# ----------------------------------------------------------------------------- config files
def fill_markers(text: str) -> str:
    """Stand-ins for the <<FILL:...>> values a user supplies."""
    return re.sub(r"<<FILL:([A-Z0-9_]+)>>", lambda m: m.group(1).lower().replace("_", "-"), text)


def test_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = (CLUSTER / "aws.yaml").read_text()
    config = yaml.safe_load(raw)
    prepared = prepare_config(config)  # what `ray up` does: merge the AWS defaults, then validate
    validate_config(prepared)  # the launcher's JSON schema, the docker section included
    assert set(re.findall(r"<<FILL:([A-Z0-9_]+)>>", raw)) == {
        "AMI_ID", "HEAD_INSTANCE_PROFILE_ARN", "WORKER_INSTANCE_PROFILE_ARN", "IMAGE", "SECURITY_GROUP_ID",
        "EFS_DNS_NAME"}

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]  # on-demand
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for t in workers)
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # GPU families

    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "spot_watch.sh" in worker_start
    # The token directory (not the file: a bind-mounted file keeps its old inode after a rotation).
    assert config["file_mounts"] == {"~/.ray": "~/.ray"}
    assert "chmod 600 ~/.ray/auth_token" in config["setup_commands"]


def test_launcher_nodes_run_the_image_and_install_nothing():
    """Every node runs cluster/Dockerfile's image (Python >= 3.11, the runtime pins, no test
    tools); no command on a node installs packages, so a replacement spot node only pulls."""
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    docker = config["docker"]
    assert docker["image"] == "<<FILL:IMAGE>>" and docker["container_name"] and docker["pull_before_run"]
    assert "--gpus all" in docker["worker_run_options"] and "--gpus all" not in docker.get("head_run_options", [])
    assert "-v /data/mp100:/data/mp100:ro" in docker["worker_run_options"]  # --data_root, read-only
    commands = [c for key, value in config.items() if key.endswith("_commands") for c in value]
    assert commands and not any(re.search(r"\b(pip|conda|uv) +install\b|apt(-get)? +install", c) for c in commands), \
        commands
    assert not any("venv" in c for c in commands)

    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    python = re.search(r"-py3(\d+)", base)
    assert python and int(python.group(1)) >= 11, base  # what pyproject requires
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^requires-python = ">=3\.11"$', pyproject, flags=re.M)
    runtime = (REPO / "requirements.txt").read_text()
    (ray_pin,) = re.findall(r"^ray\[[^]]*\]==(\S+)$", runtime, flags=re.M)
    assert base.startswith(f"rayproject/ray:{ray_pin}-"), (base, ray_pin)
    assert "RUN pip install --no-cache-dir -r requirements.txt" in dockerfile
    assert "requirements-test" not in dockerfile
    # spot_watch.sh is where worker_start_ray_commands run it: ~ is /home/ray in the image.
    assert "WORKDIR /home/ray/cape-ray" in dockerfile and "cluster/spot_watch.sh ./cluster/spot_watch.sh" in dockerfile
    assert "~/cape-ray/cluster/spot_watch.sh" in " ".join(config["worker_start_ray_commands"])
    # The build context is only what the image copies (no .venv, runs/ or data sent to the builder).
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore
    sources = [p for s in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, flags=re.M) for p in s.split()]
    assert {"requirements.txt", "pyproject.toml", "README.md", "cape_ray", "cluster/spot_watch.sh"} == set(sources)
    for path in sources:
        assert f"!{path}" in [l.rstrip("/") for l in ignore], f"{path} is not in the build context"


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-r"):
            name, version = line.split("==")
            found[name] = version
    return found


def test_requirements_split_keeps_test_tools_off_the_nodes():
    runtime, test = pins(REPO / "requirements.txt"), pins(REPO / "requirements-test.txt")
    assert {"torch", "ray[train,default]", "numpy", "pillow", "matplotlib"} <= set(runtime)
    assert not {"pytest", "moto[server]"} & set(runtime)
    assert set(test) == {"pytest", "moto[server]"} and not set(test) & set(runtime)  # one pin per package
    assert "-r requirements.txt" in (REPO / "requirements-test.txt").read_text().splitlines()
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "pip install --quiet -r requirements-test.txt" in setup  # local dev and tests get both


def test_launcher_never_creates_a_security_group_open_to_the_world():
    """The launcher's own group always allows SSH from 0.0.0.0/0. With a pre-made group on every
    node type, Ray's security-group step must leave the config alone and call no EC2 API."""
    from unittest import mock

    from ray.autoscaler._private.aws import config as aws_config

    # Why: what the launcher adds to a group it creates, whatever IpPermissions say.
    rules = aws_config._create_default_inbound_rules({"sg-x"}, [{"IpProtocol": "tcp", "FromPort": 22,
                                                                  "ToPort": 22, "IpRanges": [{"CidrIp": "1.2.3.4/32"}]}])
    assert {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]} in rules

    config = yaml.safe_load(fill_markers((CLUSTER / "aws.yaml").read_text()))
    assert "security_group" not in config["provider"]
    for node_type in config["available_node_types"].values():
        assert node_type["node_config"]["SecurityGroupIds"] == ["security-group-id"]
    forbidden = mock.Mock(side_effect=AssertionError("the launcher would create or change a security group"))
    with mock.patch.object(aws_config, "_resource", forbidden), mock.patch.object(aws_config, "_client", forbidden):
        configured = aws_config._configure_security_group(json.loads(json.dumps(config)))
    for node_type in configured["available_node_types"].values():
        assert node_type["node_config"]["SecurityGroupIds"] == ["security-group-id"]


def test_rayjob_manifest_runs_the_documented_entrypoint():
    documents = [d for d in yaml.safe_load_all(fill_markers((CLUSTER / "rayjob.yaml").read_text())) if d]
    (job,) = [d for d in documents if d["kind"] == "RayJob"]
    (secret,) = [d for d in documents if d["kind"] == "Secret"]
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    assert spec["shutdownAfterJobFinishes"] is True

    entrypoint = shlex.split(spec["entrypoint"])
    assert entrypoint[:4] == ["python", "-m", "cape_ray", "train"]
    parser = build_parser()
    args = parser.parse_args(entrypoint[3:])
    # Named for MP-100, trains on it: the directory exists on the workers (the volume below), not
    # here, so the rest of the flags are validated without it.
    assert args.data_root == "/data/mp100" and args.mp100_split == 1
    args.data_root = None
    config = config_from_args(args, parser)
    assert config.name == "mp100-split1" and config.storage_path.startswith("s3://")
    assert config.use_gpu

    # README's submit.sh example runs the same flags against the same run.
    readme = (CLUSTER / "README.md").read_text()
    (example,) = re.findall(r"^cluster/submit\.sh (--name mp100-split1 .*)$", readme, flags=re.M)
    readme_flags = shlex.split(example.replace('"s3://$BUCKET/cape-ray"', "s3://bucket/cape-ray"))
    assert readme_flags == entrypoint[4:]

    # The token comes from the Secret on every Ray container and the submitter, and the operator
    # knows it too (authOptions), for its own calls to the job API.
    secret_name, key = secret["metadata"]["name"], next(iter(secret["stringData"]))
    assert key == "auth_token"  # the key KubeRay reads from the Secret named in authOptions
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": secret_name}
    pods = [cluster["headGroupSpec"]["template"], *[g["template"] for g in cluster["workerGroupSpecs"]],
            spec["submitterPodTemplate"]]
    envs = [c["env"] for pod in pods for c in pod["spec"]["containers"]] + [cluster["autoscalerOptions"]["env"]]
    for container_env in envs:
        env = {e["name"]: e for e in container_env}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": key}

    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) > 0]
    assert gpu_groups
    low, high = config.worker_range()
    assert gpu_groups[0]["maxReplicas"] >= high
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    # --data_root is a read-only volume claim on every GPU worker.
    for group in gpu_groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/data/mp100"]
        assert mount.get("readOnly") is True
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] and claim["readOnly"] is True

    # The head and the submitter stay off spot nodes; the GPU workers are the spot ones.
    on_demand = {"eks.amazonaws.com/capacityType": "ON_DEMAND"}
    assert cluster["headGroupSpec"]["template"]["spec"]["nodeSelector"] == on_demand
    assert spec["submitterPodTemplate"]["spec"]["nodeSelector"] == on_demand
    assert all(g["template"]["spec"]["nodeSelector"] == {"eks.amazonaws.com/capacityType": "SPOT"} for g in gpu_groups)


def test_rayjob_manifest_fits_the_kuberay_crd_schema():
    """Every key and value of the RayJob against the published RayJob CRD schema (KubeRay v1.6.0,
    tests/fixtures/README.md): a misspelt or misplaced field would be dropped by the API server."""
    from k8s_schema import problems, rayjob_problems, rayjob_schema

    documents = [d for d in yaml.safe_load_all(fill_markers((CLUSTER / "rayjob.yaml").read_text())) if d]
    (job,) = [d for d in documents if d["kind"] == "RayJob"]
    assert rayjob_problems(job) == []

    # The checker itself catches what it must: a misplaced authOptions (spec, not rayClusterSpec),
    # a wrong type, an unparsable quantity, a missing required field, a value outside an enum.
    broken = json.loads(json.dumps(job))
    broken["spec"]["authOptions"] = broken["spec"]["rayClusterSpec"].pop("authOptions")
    broken["spec"]["backoffLimit"] = "2"
    worker = broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["resources"]["limits"]["memory"] = "28 gigabytes"
    del worker["name"]
    found = "\n".join(rayjob_problems(broken))
    assert ".spec.authOptions: unknown field" in found
    assert ".spec.backoffLimit: expected integer, got str" in found
    assert "limits.memory: '28 gigabytes' does not match" in found
    assert "containers[0]: required field 'name' is missing" in found
    assert problems({"mode": "tokens"}, rayjob_schema()["properties"]["spec"]["properties"]["rayClusterSpec"]
                    ["properties"]["authOptions"]) == [".mode: 'tokens' is not one of ['disabled', 'token']"]


def test_nothing_binds_all_interfaces_without_saying_why():
    for path in sorted(CLUSTER.iterdir()):
        if path.suffix == ".md":  # prose; the configs and scripts are what bind
            continue
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if "0.0.0.0" not in line or line.lstrip().startswith("#"):
                continue
            context = lines[max(0, number - 6):number + 1]
            assert any(l.lstrip().startswith("#") for l in context), f"{path.name}:{number + 1} binds 0.0.0.0 unexplained"


def test_shell_scripts_parse():
    for script in ("submit.sh", "spot_watch.sh"):
        subprocess.run(["bash", "-n", str(CLUSTER / script)], check=True)
        assert os.access(CLUSTER / script, os.X_OK), f"{script} is not executable"


class MetadataService:
    """A stand-in for the EC2 metadata service (IMDSv2) on loopback: the spot notice appears at
    the `notice_at`-th poll, for a termination `seconds_left` ahead."""

    def __init__(self, notice_at: int = 3, seconds_left: int = 90):
        import datetime
        import http.server
        import threading

        self.polls = 0
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds_left)
        self.notice = json.dumps({"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):  # IMDSv2 session token
                self._answer(200, "session") if self.path == "/latest/api/token" else self._answer(404, "")

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") != "session":
                    return self._answer(401, "")
                if self.path == "/latest/meta-data/spot/instance-action":
                    service.polls += 1
                    return self._answer(200, service.notice) if service.polls >= notice_at else self._answer(404, "")
                self._answer(404, "")

            def _answer(self, code, body):
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/latest"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def recording_ray(tmp_path: Path, fail_first: int, then: str = "") -> Path:
    """A `ray` that records each call's arguments and auth mode, fails the first `fail_first`
    drain calls, then runs `then` (e.g. the real ray) or succeeds."""
    script = tmp_path / "ray"
    script.write_text(
        "#!/bin/sh\n"
        f'n=$(cat {tmp_path}/calls 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {tmp_path}/calls\n'
        f'echo "$RAY_AUTH_MODE" > {tmp_path}/mode\n'
        f'printf "%s\\n" "$@" > {tmp_path}/args_$n\n'
        f'[ "$n" -gt {fail_first} ] || {{ echo "drain failed (attempt $n)" >&2; exit 1; }}\n'
        + (f'exec {then} "$@"\n' if then else "exit 0\n"))
    script.chmod(0o755)
    return script


def test_spot_watch_drains_the_node_on_an_interruption_notice(tmp_path):
    """spot_watch.sh against the stand-in metadata service and a recording `ray` that fails the
    first two drains: it keeps polling through the 404s, then retries the drain until it succeeds."""
    fake_ray = recording_ray(tmp_path, fail_first=2)
    with MetadataService(notice_at=3, seconds_left=90) as imds:
        env = {**os.environ, "SPOT_WATCH_IMDS": imds.url, "RAY": str(fake_ray), "SPOT_WATCH_INTERVAL_S": "0.1",
               "SPOT_WATCH_NODE_ID": "ab" * 28}
        started = time.time()
        done = subprocess.run(["bash", str(CLUSTER / "spot_watch.sh"), "10.0.0.1:6379"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert imds.polls == 3  # kept polling through the 404s, stopped at the notice
    assert (tmp_path / "calls").read_text().strip() == "3"  # two failed drains, then success
    assert time.time() - started >= 3  # backoff 1 s + 2 s between the attempts
    for attempt in (1, 2, 3):
        args = (tmp_path / f"args_{attempt}").read_text().splitlines()
        assert args[:5] == ["drain-node", "--address", "10.0.0.1:6379", "--node-id", "ab" * 28]
        assert args[args.index("--reason") + 1] == "DRAIN_NODE_REASON_PREEMPTION"
        # the deadline: the notice's termination time (90 s) minus the 15 s margin
        assert 65 <= int(args[args.index("--deadline-remaining-seconds") + 1]) <= 75
    assert (tmp_path / "mode").read_text().strip() == "token"
    assert "retrying in 1s" in done.stderr and "retrying in 2s" in done.stderr


@pytest.mark.slow
def test_spot_watch_drains_its_own_node_on_a_real_cluster(tmp_path):
    """The real `ray drain-node` against a real head: spot_watch.sh on a worker node resolves that
    node's id (the head shares its IP: only the temp dir tells them apart), the first drain fails
    and is retried, and the GCS records the node as drained for preemption."""
    cluster = LoopbackCluster(head_cpus=0)
    try:
        spot = cluster.add_worker("spot", cpus=1)
        wrapper = recording_ray(tmp_path, fail_first=1, then=str(BIN / "ray"))
        # As on a node: the token only in ~/.ray/auth_token, token mode set by the script itself.
        home = tmp_path / "home"
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text(cluster.token)
        env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
        with MetadataService(notice_at=2, seconds_left=120) as imds:
            env.update(HOME=str(home), SPOT_WATCH_IMDS=imds.url, RAY=str(wrapper), SPOT_WATCH_INTERVAL_S="0.2",
                       SPOT_WATCH_PYTHON=sys.executable, SPOT_WATCH_TEMP_DIR=spot.temp_dir)
            done = subprocess.run(["bash", str(CLUSTER / "spot_watch.sh"), cluster.gcs], env=env,
                                  capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"this is Ray node {spot.node_id}" in done.stderr, done.stderr[-3000:]
        assert (tmp_path / "calls").read_text().strip() == "2"
        args = (tmp_path / "args_2").read_text().splitlines()
        assert args[args.index("--node-id") + 1] == spot.node_id

        # An idle node drained for preemption leaves at once; the GCS says why.
        deadline = time.time() + 60
        while cluster.node_info(spot)["alive"] and time.time() < deadline:
            time.sleep(0.5)
        info = cluster.node_info(spot)
        assert not info["alive"] and info["death_reason"] == "AUTOSCALER_DRAIN_PREEMPTED", info
        assert info["death_message"].startswith("EC2 spot interruption: {")
        assert cluster.node_info(cluster.head)["alive"]  # the head, on the same IP, was left alone
    finally:
        cluster.close()
