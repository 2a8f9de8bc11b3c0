"""Which Ray cluster `cape-ray train` joins, and a dead one refused before Ray starts.

`ray.init()` without an address attaches to RAY_ADDRESS when it is set, else to the address the
last `ray start` on this machine wrote to `ray_current_cluster` in Ray's temp dir ($RAY_TMPDIR/ray,
else $TMPDIR/ray, else /tmp/ray), else it starts a private instance. A head that was killed (the
OOM killer, SIGKILL) leaves that file behind, and `ray.init()` then waits for minutes on an address
nobody answers. So the address Ray would join is found the same way here and given a short TCP
connect to its GCS port first; when nothing answers, the driver stops with one line saying what to do.

    --address local      a private instance, whatever RAY_ADDRESS or the temp dir say
    --address auto       attach: RAY_ADDRESS, else the temp dir's address, else Ray's own search for
                         a running GCS on this machine (Ray refuses when there is none)
    --address HOST:PORT  attach to that cluster
    (not given)          RAY_ADDRESS, else the temp dir's address, else a private instance
"""

from __future__ import annotations

import os
import socket
from typing import Optional

CONNECT_TIMEOUT_S = 3.0  # a live GCS accepts at once; a remote one across regions well within this


class RayAddressError(RuntimeError):
    """The cluster to join does not answer (one line: the address, where it came from, what to do)."""


def recorded_address() -> tuple[Optional[str], str]:
    """(the address in Ray's `ray_current_cluster` file or None, that file's path)."""
    from ray._common.utils import get_ray_address_file  # the file ray.init() reads (Ray 2.60)

    path = get_ray_address_file(None)
    try:
        with open(path) as handle:
            return handle.read().strip() or None, path
    except OSError:
        return None, path


def host_port(address: str) -> Optional[tuple[str, int]]:
    """(host, port) of `[scheme://]host:port` (IPv6 in brackets), None if it is not one."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def unanswered(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Optional[str]:
    """Why nothing answers at `address` (refused, no answer, unknown host), None if something does."""
    parsed = host_port(address)
    if parsed is None:
        return None  # not host:port: Ray judges it
    try:
        with socket.create_connection(parsed, timeout=timeout_s):
            return None
    except socket.timeout:
        return f"no answer within {timeout_s:g} s"
    except socket.gaierror as exc:
        return f"unknown host ({exc.strerror})"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()


def choose(flag: Optional[str]) -> Optional[str]:
    """The address for `ray.init(address=...)` given the --address flag: "local", "auto", a
    HOST:PORT that answers, or None (start a private instance). Raises RayAddressError, before Ray
    starts, when the cluster it would join does not answer."""
    flag = flag.strip() if flag else None
    env = os.environ.get("RAY_ADDRESS", "").strip() or None
    if flag == "local" or (flag is None and env == "local"):
        return "local"
    if flag not in (None, "auto"):
        address, source = flag, "--address"
        fix = ("start that cluster or give the address of a live one, or pass --address local to train on a "
               "private Ray instance")
    elif env not in (None, "auto"):
        address, source = env, "RAY_ADDRESS"
        fix = ("point RAY_ADDRESS at a live cluster or unset it, or pass --address local (or set RAY_ADDRESS=local) "
               "to train on a private Ray instance")
    else:
        address, path = recorded_address()
        if address is None:
            return flag  # None: a private instance; "auto": Ray's own search
        source = f"left in {path} by the last `ray start` on this machine; that head is gone"
        fix = ("run `ray stop` to forget it (it also stops every Ray process of yours on this machine), or pass "
               "--address local (or set RAY_ADDRESS=local) to train on a private Ray instance")
    why = unanswered(address)
    if why is not None:
        raise RayAddressError(f"no Ray cluster answers at {address} ({source}): {why}; {fix}")
    return address
