"""Shared fixtures. Ray tests share ONE local Ray instance for the whole session."""

import os

import pytest

# Fast failure detection and short report stalls in tests; must be set before Ray starts.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Retries of a failed checkpoint store wait 2, 4, 8, ... s in a run; tests need the retries, not the waits.
os.environ.setdefault("CAPE_STORAGE_RETRY_WAIT_S", "0.01")


@pytest.fixture(scope="session", autouse=True)
def private_home(tmp_path_factory):
    """Every test runs with a HOME of its session's own: caches (~/.cache/cape-ray), Ray's token
    file and MLflow's defaults land there, never in the user's home."""
    home = tmp_path_factory.mktemp("home")
    os.environ["HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, private_home):
    """Start one local Ray instance; yields its GCS address for subprocess drivers.

    HOME and RAY_AUTH_* are isolated first: a stray ~/.ray/auth_token would turn token
    authentication on for this instance (and removing it under a running one breaks its workers).
    Subprocess drivers inherit the same environment.
    """
    import ray

    for key in [k for k in os.environ if k.startswith("RAY_AUTH")]:
        del os.environ[key]
    if not ray.is_initialized():
        # More logical CPUs than cores: 2 workers + a subprocess driver's workers may overlap briefly.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def tiny_config(tmp_path):
    """`tiny_config(name, **changes)`: the shared tiny TrainConfig (tests/tiny.py) stored under tmp_path."""
    from tiny import make_config

    return lambda name="run", **changes: make_config(tmp_path, name, **changes)


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on loopback with an empty bucket; yields 'host:port' (tests/s3_server.py)."""
    from s3_server import run_s3_server

    yield from run_s3_server()


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """Fail the test if the code under test starts (or attaches to) Ray: for what must be decided
    before Ray starts. Works whether or not the session's Ray instance is already up."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)
