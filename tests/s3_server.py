"""An S3-compatible server on loopback for the storage tests: moto's server mode, one bucket.

The `s3_endpoint` fixture (conftest.py) starts it; `s3_uri` builds a storage URI that carries the
endpoint and the credentials, so that every process reading it reaches the same server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

BUCKET = "cape-ray-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_s3_server():
    """A moto S3 server on loopback with an empty bucket; yields 'host:port'."""
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    command = [str(moto)] if moto.exists() else [sys.executable, "-m", "moto.server"]
    log = tempfile.NamedTemporaryFile(prefix="moto_", suffix=".log", delete=False)
    server = subprocess.Popen([*command, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, Path(log.name).read_text()
                assert time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        admin = pafs.S3FileSystem(access_key="cape", secret_key="cape", endpoint_override=endpoint,
                                  scheme="http", region="us-east-1", allow_bucket_creation=True)
        admin.create_dir(BUCKET)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        os.unlink(log.name)


def s3_uri(endpoint: str, prefix: str) -> str:
    return f"s3://cape:cape@{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


