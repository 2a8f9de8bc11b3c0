"""The cluster files: a real token-protected head on loopback, and the configs checked by Ray itself.

The head is a separate Ray instance (own ports, own temp dir) started with `ray start --head
--block`; it is stopped by signalling that process, which tears down the processes it started,
and any leftover found by its temp dir is killed by PID. `ray stop` is never used: it would stop
every Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from cape_ray import checkpoint as ckpt
from cape_ray.cli import build_parser, config_from_args

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
BIN = Path(sys.executable).parent

# A tiny run: 1 worker, 4 steps per epoch, 2 epochs (as small as tests/test_ray_job.py's BASE).
TINY_FLAGS = [
    "--epochs", "2", "--episodes_per_epoch", "16", "--batch_size", "2", "--accumulation_steps", "2",
    "--num_queries_per_episode", "2", "--val_episodes", "2", "--val_queries_per_episode", "3",
    "--image_size", "32", "--feature_dim", "16", "--refine_layers", "1",
    "--synthetic_instances_per_category", "6", "--synthetic_canvas", "48", "--num_workers", "1",
    "--warmup_steps", "2", "--lr", "3e-3", "--keep", "2",
]


# ----------------------------------------------------------------------------- a real head
def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def processes_under(temp_dir: str) -> list[int]:
    """PIDs whose command line names `temp_dir` (every process of that head does)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(entry.name))
    return pids


def http_get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Head:
    def __init__(self, dashboard: str, gcs: str, token: str, env: dict, temp_dir: str):
        self.dashboard, self.gcs, self.token, self.env, self.temp_dir = dashboard, gcs, token, env, temp_dir


@pytest.fixture(scope="module")
def head():
    # A short temp dir: Ray's unix socket paths under it must stay below the OS limit.
    temp_dir = tempfile.mkdtemp(prefix="caperay_", dir="/tmp")
    (gcs_port, dashboard_port, client_port, node_manager_port, object_manager_port, agent_listen_port,
     agent_grpc_port, runtime_env_port, metrics_port) = free_ports(9)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `ray` and the job's `python` are this venv's
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once on SIGTERM
        RAY_USAGE_STATS_ENABLED="0",
    )
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--ray-client-server-port", str(client_port), "--node-manager-port", str(node_manager_port),
        "--object-manager-port", str(object_manager_port),
        "--dashboard-agent-listen-port", str(agent_listen_port),
        "--dashboard-agent-grpc-port", str(agent_grpc_port),
        "--runtime-env-agent-port", str(runtime_env_port), "--metrics-export-port", str(metrics_port),
        "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", temp_dir, "--disable-usage-stats",
    ]
    log_path = Path(temp_dir, "ray_start.log")
    log = open(log_path, "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, "ray start exited:\n" + log_path.read_text()[-3000:]
            assert time.time() < deadline, "the head's job API never came up:\n" + log_path.read_text()[-3000:]
            try:
                if http_get(f"{dashboard}/api/jobs/", token)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        yield Head(dashboard, f"127.0.0.1:{gcs_port}", token, env, temp_dir)
    finally:
        process.send_signal(signal.SIGTERM)  # `ray start --block` then stops what it started
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        deadline = time.time() + 20
        while processes_under(temp_dir) and time.time() < deadline:
            time.sleep(0.5)
        for pid in processes_under(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def jobs(head: Head) -> list[dict]:
    status, body = http_get(f"{head.dashboard}/api/jobs/", head.token)
    assert status == 200, body
    return json.loads(body)


@pytest.mark.slow
def test_submission_without_the_token_is_refused(head, tmp_path):
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
    assert jobs(head) == [], "a refused submission must not create a job"


@pytest.mark.slow
def test_submit_sh_with_the_token_runs_the_real_entrypoint(head, tmp_path):
    storage = tmp_path / "runs"
    env = {**head.env, "RAY_ADDRESS": head.dashboard, "HOME": str(tmp_path)}  # the token from RAY_AUTH_TOKEN
    submitted = subprocess.run([str(CLUSTER / "submit.sh"), "--name", "authrun", "--storage_path", str(storage),
                                *TINY_FLAGS], env=env, capture_output=True, text=True, timeout=400)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-5000:]
    assert re.search(r"job authrun-\d{8}-\d{6}-[0-9a-f]+: SUCCEEDED", output), output[-3000:]

    (job,) = jobs(head)
    assert job["status"] == "SUCCEEDED"
    assert job["submission_id"].startswith("authrun-")
    assert job["entrypoint"].startswith("python -m cape_ray train --name authrun --storage_path ")

    run_dir = storage / "authrun"
    assert (run_dir / "checkpoint_manager_snapshot.json").exists()
    names = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert "checkpoint_e002_lr3e-3_bs2_acc2_qpe2" in names
    assert any(n.startswith("checkpoint_best_pck_") for n in names)
    assert any(n.startswith("checkpoint_best_loss_") for n in names)
    for name in names:
        assert ckpt.verify_checkpoint(run_dir / name) == [], name
    final = ckpt.load_checkpoint(run_dir / "checkpoint_e002_lr3e-3_bs2_acc2_qpe2")
    assert [h["epoch"] for h in final.state["history"]] == [1, 2]

    # The same name again with one more epoch: a fresh submission id, and the run resumes.
    again = subprocess.run([str(CLUSTER / "submit.sh"), "--name", "authrun", "--storage_path", str(storage),
                            *TINY_FLAGS, "--epochs", "3"], env=env, capture_output=True, text=True, timeout=400)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-5000:]
    assert "RESUMING FROM CHECKPOINT" in output, output[-3000:]
    assert "Checkpoint: checkpoint_e002_lr3e-3_bs2_acc2_qpe2  [" in output, output[-3000:]
    assert len({j["submission_id"] for j in jobs(head)}) == 2
    final = ckpt.load_checkpoint(run_dir / "checkpoint_e003_lr3e-3_bs2_acc2_qpe2")
    assert [h["epoch"] for h in final.state["history"]] == [1, 2, 3]


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
    assert "torch==2.13.0" in pip and not any(p.startswith("ray") for p in pip)
    address = dry_run("--name", "a", "--storage_path", "/nfs", env={"RAY_ADDRESS": "http://10.0.0.5:8265"})
    assert "--address http://10.0.0.5:8265" in address.stdout


def test_submit_sh_refuses_what_would_break_a_resume(tmp_path):
    assert "--name" in dry_run("--storage_path", "s3://b/p").stderr
    assert "--storage_path" in dry_run("--name", "a").stderr
    relative = dry_run("--name", "a", "--storage_path", "runs")
    assert relative.returncode != 0 and "relative" in relative.stderr
    no_token = dry_run("--name", "a", "--storage_path", "/nfs", env={"RAY_AUTH_TOKEN": "", "HOME": str(tmp_path)})
    assert no_token.returncode != 0 and "auth token" in no_token.stderr


# ----------------------------------------------------------------------------- config files
def fill_markers(text: str) -> str:
    """Stand-ins for the <<FILL:...>> values a user supplies."""
    return re.sub(r"<<FILL:([A-Z0-9_]+)>>", lambda m: m.group(1).lower().replace("_", "-"), text)


def test_launcher_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = (CLUSTER / "aws.yaml").read_text()
    config = yaml.safe_load(raw)
    prepared = prepare_config(config)  # what `ray up` does: merge the AWS defaults, then validate
    validate_config(prepared)
    assert set(re.findall(r"<<FILL:([A-Z0-9_]+)>>", raw)) == {
        "AMI_ID", "HEAD_INSTANCE_PROFILE_ARN", "WORKER_INSTANCE_PROFILE_ARN", "YOUR_PUBLIC_IP"}

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
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "pip install --quiet -r ~/cape-ray/requirements.txt" in " ".join(config["setup_commands"])
    assert "spot_watch.sh" in worker_start
    for local in config["file_mounts"].values():  # relative to the repository root
        assert local.startswith("~") or (REPO / local).exists(), local


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
    config = config_from_args(parser.parse_args(entrypoint[3:]), parser)
    assert config.name == "mp100-split1" and config.storage_path.startswith("s3://")
    assert config.use_gpu

    # README's submit.sh example runs the same flags against the same run.
    readme = (CLUSTER / "README.md").read_text()
    (example,) = re.findall(r"^cluster/submit\.sh (--name mp100-split1 .*)$", readme, flags=re.M)
    readme_flags = shlex.split(example.replace('"s3://$BUCKET/cape-ray"', "s3://bucket/cape-ray"))
    assert readme_flags == entrypoint[4:]

    # The token comes from the Secret on every Ray container and the submitter.
    secret_name, key = secret["metadata"]["name"], next(iter(secret["stringData"]))
    cluster = spec["rayClusterSpec"]
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


def test_spot_watch_drains_the_node_on_an_interruption_notice(tmp_path):
    """spot_watch.sh against a stand-in for the EC2 metadata service and a recording `ray`."""
    import datetime
    import http.server
    import threading

    polls = {"count": 0}
    deadline = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=90))
    notice = json.dumps({"action": "terminate", "time": deadline.strftime("%Y-%m-%dT%H:%M:%SZ")})

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):  # IMDSv2 session token
            self._answer(200, "session") if self.path == "/latest/api/token" else self._answer(404, "")

        def do_GET(self):
            if self.headers.get("X-aws-ec2-metadata-token") != "session":
                return self._answer(401, "")
            if self.path == "/latest/meta-data/spot/instance-action":
                polls["count"] += 1
                return self._answer(200, notice) if polls["count"] >= 3 else self._answer(404, "")
            self._answer(404, "")

        def _answer(self, code, body):
            self.send_response(code)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake_ray = tmp_path / "ray"
    fake_ray.write_text(f'#!/bin/sh\necho "$RAY_AUTH_MODE" > {tmp_path}/mode\nprintf "%s\\n" "$@" > {tmp_path}/args\n')
    fake_ray.chmod(0o755)
    try:
        env = {**os.environ, "SPOT_WATCH_IMDS": f"http://127.0.0.1:{server.server_address[1]}/latest",
               "RAY": str(fake_ray), "SPOT_WATCH_INTERVAL_S": "0.1"}
        subprocess.run(["bash", str(CLUSTER / "spot_watch.sh"), "10.0.0.1:6379"], env=env, check=True,
                       capture_output=True, timeout=60)
    finally:
        server.shutdown()
    assert polls["count"] == 3  # kept polling through the 404s, stopped at the notice
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:3] == ["drain-node", "--address", "10.0.0.1:6379"]
    assert args[args.index("--reason") + 1] == "DRAIN_NODE_REASON_PREEMPTION"
    assert 80 <= int(args[args.index("--deadline-remaining-seconds") + 1]) <= 90
    assert (tmp_path / "mode").read_text().strip() == "token"
