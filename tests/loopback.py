"""Real Ray clusters on loopback for the tests: a token-protected head and worker nodes.

Every node is its own `ray start --block` process in its own session, with its own temp dir and
HOME (a stray ~/.ray/auth_token must neither leak in nor be written out). A node is ended by
signalling that process (which stops what it started) or, to simulate a lost machine, by SIGKILL of
its whole process tree at once. `ray stop` is never used: it would stop every Ray instance on the
machine.
"""

from __future__ import annotations

import json
import os
import secrets
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
from typing import Optional

BIN = Path(sys.executable).parent


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
    """PIDs whose command line names `temp_dir` (a node's raylet, agents and GCS do)."""
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


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (by parent pid), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop(0)
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def http_get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Node:
    def __init__(self, name: str, process: subprocess.Popen, temp_dir: str, log_path: Path):
        self.name, self.process, self.temp_dir, self.log_path = name, process, temp_dir, log_path
        self.node_id: Optional[str] = None

    def log(self) -> str:
        return self.log_path.read_text()[-3000:] if self.log_path.exists() else ""

    def kill(self) -> list[int]:
        """The machine is gone: every process of the node stopped at once, then killed (SIGSTOP
        first, so that no part of it notices the others dying and reacts)."""
        tree = process_tree(self.process.pid)
        for signum in (signal.SIGSTOP, signal.SIGKILL):
            for pid in tree:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
        self.process.wait(timeout=30)
        return tree

    def stop(self) -> None:
        if self.process.poll() is None:
            tree = process_tree(self.process.pid)
            self.process.send_signal(signal.SIGTERM)  # `ray start --block` then stops what it started
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            deadline = time.time() + 20
            while time.time() < deadline and any(_alive(p) for p in tree[1:]):
                time.sleep(0.5)
            for pid in tree[1:]:
                _kill(pid)
        for pid in processes_under(self.temp_dir):
            _kill(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class LoopbackCluster:
    """A head (job API on loopback, token auth) and worker nodes added by `add_worker`."""

    def __init__(self, head_cpus: float = 2, extra_env: Optional[dict] = None):
        # Short temp dirs: Ray's unix socket paths under them must stay below the OS limit.
        self.root = tempfile.mkdtemp(prefix="caperay_", dir="/tmp")
        self.token = secrets.token_hex(32)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `ray` and the job's `python` are this venv's
            HOME=self.root,
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once on SIGTERM
            RAY_USAGE_STATS_ENABLED="0",
            **(extra_env or {}),
        )
        self.env = env
        self.nodes: list[Node] = []
        gcs_port, dashboard_port, client_port = free_ports(3)
        self.gcs = f"127.0.0.1:{gcs_port}"
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        try:
            self.head = self._start("head", head_cpus, None, [
                "--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(dashboard_port), "--ray-client-server-port", str(client_port)])
            deadline = time.time() + 180
            while True:
                assert self.head.process.poll() is None, "ray start exited:\n" + self.head.log()
                assert time.time() < deadline, "the head's job API never came up:\n" + self.head.log()
                try:
                    if http_get(f"{self.dashboard}/api/jobs/", self.token)[0] == 200:
                        break
                except OSError:
                    pass
                time.sleep(1)
            self.head.node_id = self._wait_registered(self.head)
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, cpus: float, resources: Optional[dict], extra: list[str]) -> Node:
        temp_dir = tempfile.mkdtemp(prefix=f"{name[:6]}_", dir=self.root)
        (node_manager, object_manager, agent_listen, agent_grpc, runtime_env, metrics) = free_ports(6)
        command = [
            str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", *extra,
            "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
            "--dashboard-agent-listen-port", str(agent_listen), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--min-worker-port", "0", "--max-worker-port", "0",
            "--num-cpus", str(cpus), "--num-gpus", "0", "--temp-dir", temp_dir,
            "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
        ]
        if resources:
            command += ["--resources", json.dumps(resources)]
        log_path = Path(temp_dir, "ray_start.log")
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        node = Node(name, process, temp_dir, log_path)
        self.nodes.append(node)
        return node

    def add_worker(self, name: str, cpus: float = 1, resources: Optional[dict] = None) -> Node:
        node = self._start(name, cpus, resources, ["--address", self.gcs])
        node.node_id = self._wait_registered(node)
        return node

    def _wait_registered(self, node: Node, timeout: float = 120) -> str:
        """The node's id, once the GCS lists it alive (matched by its raylet's temp dir)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert node.process.poll() is None, f"node {node.name} exited:\n" + node.log()
            for info in self.node_table():
                if info["alive"] and node.temp_dir in info["raylet_socket"]:
                    return info["node_id"]
            time.sleep(0.5)
        raise AssertionError(f"node {node.name} never registered:\n" + node.log())

    def node_table(self) -> list[dict]:
        """Every node the GCS knows, straight from the GCS (no dashboard in the way)."""
        script = (
            "import json, sys\n"
            "from ray._raylet import GcsClient\n"
            "from ray.core.generated import common_pb2, gcs_pb2\n"
            "client = GcsClient(address=sys.argv[1])\n"
            "nodes = []\n"
            "for node_id, info in client.get_all_node_info().items():\n"
            "    nodes.append({'node_id': node_id.hex(), 'alive': info.state == gcs_pb2.GcsNodeInfo.ALIVE,\n"
            "                  'raylet_socket': info.raylet_socket_name,\n"
            "                  'death_reason': common_pb2.NodeDeathInfo.Reason.Name(info.death_info.reason),\n"
            "                  'death_message': info.death_info.reason_message,\n"
            "                  'resources': dict(info.resources_total)})\n"
            "print(json.dumps(nodes))\n"
        )
        done = subprocess.run([sys.executable, "-c", script, self.gcs], env=self.env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def node_info(self, node: Node) -> dict:
        (info,) = [i for i in self.node_table() if i["node_id"] == node.node_id]
        return info

    def ray(self, *args: str, timeout: float = 120, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "ray"), *args], env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def close(self) -> None:
        for node in reversed(self.nodes):  # workers first, the head last
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)
