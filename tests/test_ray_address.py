"""Which Ray cluster a driver joins (cape_ray/ray_address.py), and a dead one refused before Ray starts.

The fast tests give the address Ray would join (RAY_ADDRESS, the `ray_current_cluster` file of a
temp dir of their own, --address) a listening or a closed loopback port. The slow one kills a real
`ray start --head` with SIGKILL, the way the OOM killer does, and runs `cape-ray train` after it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cape_ray import ray_address
from cape_ray.ray_address import RayAddressError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def listening():
    """A loopback port that accepts connections, as a live GCS does: 'host:port'."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield "127.0.0.1:%d" % server.getsockname()[1]
    server.close()


@pytest.fixture
def closed():
    """A loopback port nobody listens on (what a killed head leaves): 'host:port'."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % probe.getsockname()[1]
    probe.close()
    return address


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """Ray's temp dir for this test ($RAY_TMPDIR/ray), RAY_ADDRESS unset; -> a function recording an address."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def record(address: str) -> Path:
        path = tmp_path / "ray" / "ray_current_cluster"
        path.parent.mkdir(exist_ok=True)
        path.write_text(address)
        return path

    return record


def test_a_recorded_address_that_does_not_answer_is_refused_in_one_line(temp_dir, closed):
    path = temp_dir(closed)
    assert ray_address.recorded_address() == (closed, str(path))
    with pytest.raises(RayAddressError) as refused:
        ray_address.choose(None)
    message = str(refused.value)
    assert "\n" not in message
    for part in (f"no Ray cluster answers at {closed}", f"left in {path} by the last `ray start`",
                 "connection refused", "run `ray stop`", "--address local", "RAY_ADDRESS=local"):
        assert part in message, (part, message)
    with pytest.raises(RayAddressError):
        ray_address.choose("auto")  # auto would join it too


def test_a_live_recorded_address_is_joined_and_local_always_starts_a_private_instance(temp_dir, listening, closed,
                                                                                     monkeypatch):
    assert ray_address.choose(None) is None  # nothing recorded: Ray starts a private instance
    assert ray_address.choose("auto") == "auto"  # Ray's own search, which refuses when it finds nothing
    temp_dir(listening)
    assert ray_address.choose(None) == listening and ray_address.choose("auto") == listening
    temp_dir(closed)
    assert ray_address.choose("local") == "local"  # the dead address is never tried
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert ray_address.choose(None) == "local"


def test_ray_address_and_the_flag_come_before_the_recorded_address(temp_dir, listening, closed, monkeypatch):
    temp_dir(closed)
    monkeypatch.setenv("RAY_ADDRESS", listening)
    assert ray_address.choose(None) == listening
    monkeypatch.setenv("RAY_ADDRESS", closed)
    with pytest.raises(RayAddressError, match=f"at {closed} \\(RAY_ADDRESS\\).*point RAY_ADDRESS at a live cluster"):
        ray_address.choose(None)
    assert ray_address.choose(listening) == listening  # --address HOST:PORT wins over RAY_ADDRESS
    with pytest.raises(RayAddressError, match=f"at {closed} \\(--address\\)"):
        ray_address.choose(closed)
    assert ray_address.host_port("ray://[::1]:10001") == ("::1", 10001)
    assert ray_address.host_port("not-an-address") is None


# ----------------------------------------------------------------------------- a real head, SIGKILLed


def train_command(storage: Path, *flags: str) -> list[str]:
    from tiny import cli_flags, make_config

    return [sys.executable, "-m", "cape_ray", "train", *cli_flags(make_config(storage, "dead", epochs=1)), *flags]


@pytest.mark.slow
def test_a_killed_ray_start_head_is_refused_before_ray_starts(tmp_path):
    from loopback import BIN, Node, free_ports, processes_under, process_tree

    # Short: Ray's unix sockets live under it. Its own temp dir, HOME and no token (conftest.py).
    root = tempfile.mkdtemp(prefix="cr_", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "CAPE_LEASE_"))}
    env.update(RAY_TMPDIR=root, HOME=root, RAY_USAGE_STATS_ENABLED="0", CAPE_LEASE_SETTLE_S="0.1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    gcs_port, *ports = free_ports(7)
    command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(gcs_port), "--include-dashboard", "false", "--num-cpus", "1", "--num-gpus", "0",
               "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
               "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
               "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
               "--min-worker-port", "0", "--max-worker-port", "0",
               "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
    recorded = Path(root, "ray", "ray_current_cluster")
    with open(tmp_path / "head.log", "w") as log:
        head = Node("head", subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True), root, tmp_path / "head.log")
    try:
        deadline = time.time() + 180
        while not (recorded.exists() and ray_address.unanswered(recorded.read_text().strip()) is None):
            assert head.process.poll() is None and time.time() < deadline, head.log()
            time.sleep(0.5)
        address = recorded.read_text().strip()  # this machine's address (Ray picks it for the GCS)
        assert address.endswith(f":{gcs_port}")
        head.kill()  # SIGKILL of every process of the head at once: the address file stays behind
        for pid in processes_under(root):
            os.kill(pid, signal.SIGKILL)
        assert recorded.exists() and ray_address.unanswered(address) == "connection refused"

        started = time.time()
        refused = subprocess.run(train_command(tmp_path), env=env, capture_output=True, text=True, timeout=120,
                                 cwd=tmp_path)
        took = time.time() - started
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        error = refused.stderr.strip()
        assert error.count("\n") == 0 and refused.stdout == "", error
        assert error.startswith(f"cape-ray train: error: no Ray cluster answers at {address} (left in {recorded} ")
        assert "`ray stop`" in error and "--address local" in error
        assert took < 30, f"the refusal took {took:.0f} s"

        # --address local gets past the check to ray.init(address="local"), a private instance
        # (stopped right there: starting one is the cost of every other Ray test already).
        stop_at_init = ("import sys, ray\n"
                        "def init(**kwargs):\n"
                        "    print('ray.init', repr(kwargs.get('address')), flush=True)\n"
                        "    raise SystemExit(42)\n"
                        "ray.init = init\n"
                        "from cape_ray import cli\n"
                        "sys.exit(cli.main(sys.argv[1:]))\n")
        local = subprocess.run([sys.executable, "-c", stop_at_init, *train_command(tmp_path, "--address", "local")[3:]],
                               env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert local.returncode == 42 and "ray.init 'local'" in local.stdout, local.stdout + local.stderr[-2000:]
    finally:
        if head.process.poll() is None:
            for pid in process_tree(head.process.pid):
                os.kill(pid, signal.SIGKILL)
            head.process.wait()
        for pid in processes_under(root):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", root])
