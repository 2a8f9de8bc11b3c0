"""One driver per run: a lease object in the run directory, renewed by a heartbeat thread.

Two drivers on one run (`{storage_path}/{name}`) would both train from the same checkpoint into
the same directory and overwrite each other's checkpoints and best exports. The driver therefore
holds `{storage_path}/{name}/driver_lease.json` while it trains. Everything goes through pyarrow
filesystems, so a local disk, NFS and S3 behave alike; pyarrow's S3 client has no conditional put,
so the protocol uses only whole-object PUT, GET and DELETE.

The lease record: owner token (random), host, pid, the process's start tick and the machine id
(boot id + pid namespace), when it was taken, the last heartbeat (wall clock), and the Ray job
submission id when there is one.

Protocol
- claim: read the lease. A live holder (heartbeat younger than `timeout_s` and, when it runs on
  this machine, a running process) makes the claim fail with LeaseHeld; one on another machine
  that has missed two heartbeats is watched until it expires (then taken over) or beats again
  (then refused). Otherwise write our record,
  wait `settle_s`, read it back: it must still carry our token. The write must also have completed
  within `settle_s / 2` of the moment our read began, otherwise we withdraw (LeaseContended).
- heartbeat: every `interval_s` a thread reads the lease; it must still carry our token, and our
  last successful write must be younger than `timeout_s / 2`; then it rewrites the record with a
  new heartbeat. Failing either, the lease is lost: the driver stops at once (another one may be
  training, or may start at any moment).
- release: read; delete only if it still carries our token.

Why two claimants cannot both proceed (S3 gives strong read-after-write consistency: a GET that
starts after a PUT completed returns that PUT or a later one; a local or NFS rename is atomic).
Say A and B both proceed and A's claim was written first (at w_A). A read back its own token at
least `settle_s` after w_A, so B's write completed later still. B saw no live holder, so B's read
began before w_A (a read after w_A returns A's fresh record). B's read-to-write gap therefore
exceeded `settle_s`, more than the `settle_s / 2` B allows itself: B withdrew. Contradiction.
A holder's own renewals cannot be mistaken for a stale lease either: it renews only while its
last write is younger than `timeout_s / 2`, so every reader sees a record younger than `timeout_s`
as long as wall clocks agree within `timeout_s / 2` (NTP keeps them within milliseconds).
In the rare interleavings the rules refuse, both drivers may stop (neither trains); a rerun then
resumes. Staleness from another machine needs `timeout_s`; on the same machine a dead holder's
pid is seen at once, so a rerun after a crash starts without waiting.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Optional

import pyarrow.fs as pafs

from cape_ray import storage

log = logging.getLogger("cape_ray")

LEASE_FILE = "driver_lease.json"
EXIT_LEASE_LOST = 75  # the driver's exit status when it loses its lease while training

# Overridable from the environment so that tests and slow storage can tune them without a flag.
TIMEOUT_ENV, INTERVAL_ENV, SETTLE_ENV = "CAPE_LEASE_TIMEOUT_S", "CAPE_LEASE_INTERVAL_S", "CAPE_LEASE_SETTLE_S"
DEFAULT_TIMEOUT_S, DEFAULT_INTERVAL_S, DEFAULT_SETTLE_S = 60.0, 10.0, 2.0


class LeaseError(RuntimeError):
    """A one-line reason why this driver may not (or may no longer) train the run."""


class LeaseHeld(LeaseError):
    pass


class LeaseContended(LeaseError):
    pass


class LeaseLost(LeaseError):
    pass


class Clock:
    """Wall time for heartbeats, monotonic time for durations, sleep: injectable for tests."""

    def __init__(self, time: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.time, self.monotonic, self.sleep = time, monotonic, sleep


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def machine_id() -> str:
    """Which pid space a pid belongs to: the boot id plus the pid namespace (Linux), else the host.

    Two containers on one host share a hostname but not their pids; comparing pids is only
    meaningful within one namespace of one boot.
    """
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = None
    if boot and namespace:
        return f"{boot}/{namespace}"
    return f"host:{socket.gethostname()}"


def process_start(pid: int) -> Optional[int]:
    """The start tick of a process (Linux /proc), to tell a reused pid from the original."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[19])  # field 22 of stat; fields[0] is field 3 (the state)
    except (IndexError, ValueError):
        return None


def process_running(pid: int, start: Optional[int]) -> bool:
    """Whether `pid` still runs the process that started at tick `start` (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _read_text(f"/proc/{pid}/stat")
    if stat:
        state = stat.rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    if start is not None:
        current = process_start(pid)
        if current is not None and current != start:
            return False
    return True


def _submission_id() -> Optional[str]:
    """The Ray job submission id when this driver runs under `ray job submit`."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "") or "{}")
    except ValueError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _display(uri: str) -> str:
    """A storage URI without credentials or query options, for messages."""
    uri = uri.split("?", 1)[0].rstrip("/")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        netloc, _, path = rest.partition("/")
        return f"{scheme}://{netloc.rsplit('@', 1)[-1]}" + (f"/{path}" if path else "")
    return uri


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise LeaseError(f"{name}={value!r} is not a number of seconds; unset it or give e.g. {default:g}")
    if seconds <= 0:
        raise LeaseError(f"{name}={value!r} must be positive; unset it or give e.g. {default:g}")
    return seconds


class DriverLease:
    """The lease of one run: `acquire()` (raises LeaseError), heartbeat thread, `release()`.

    Use as a context manager around the training: acquired and heartbeating inside, released on
    the way out whatever happened.
    """

    def __init__(self, storage_path: str, name: str, *, timeout_s: Optional[float] = None,
                 interval_s: Optional[float] = None, settle_s: Optional[float] = None,
                 clock: Optional[Clock] = None, on_lost: Optional[Callable[[LeaseLost], None]] = None,
                 identity: Optional[dict] = None) -> None:
        self.name = name
        self.fs, self.run_dir = storage.run_path(storage_path, name)
        self.path = f"{self.run_dir}/{LEASE_FILE}"
        self.where = self.path if isinstance(self.fs, pafs.LocalFileSystem) else f"{_display(storage_path)}/{name}/{LEASE_FILE}"
        self.timeout_s = timeout_s if timeout_s is not None else _env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
        self.interval_s = interval_s if interval_s is not None else _env_seconds(INTERVAL_ENV, DEFAULT_INTERVAL_S)
        self.settle_s = settle_s if settle_s is not None else _env_seconds(SETTLE_ENV, DEFAULT_SETTLE_S)
        if not self.interval_s < self.timeout_s / 2:
            raise LeaseError(f"lease heartbeat interval {self.interval_s:g} s must be below half the timeout "
                             f"{self.timeout_s:g} s ({INTERVAL_ENV}, {TIMEOUT_ENV})")
        self.clock = clock or Clock()
        self.on_lost = on_lost or _stop_driver
        pid = os.getpid()
        self.me = identity or {"host": socket.gethostname(), "pid": pid, "process_start": process_start(pid),
                               "machine": machine_id(), "submission_id": _submission_id()}
        self.token: Optional[str] = None
        self.record: Optional[dict] = None
        self._last_write = 0.0  # monotonic time our last write completed
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ storage
    def read(self) -> Optional[dict]:
        """The lease record, None if there is none. An unreadable record counts as held by an
        unknown driver until its file is `timeout_s` old."""
        try:
            with self.fs.open_input_stream(self.path) as stream:
                raw = stream.read()
        except FileNotFoundError:
            return None
        except OSError:
            if not storage.exists(self.fs, self.path):
                return None
            raise
        try:
            record = json.loads(raw.decode())
            if isinstance(record, dict) and isinstance(record.get("token"), str):
                return record
        except (UnicodeDecodeError, ValueError):
            pass
        info = self.fs.get_file_info(self.path)
        mtime = info.mtime.timestamp() if info.mtime is not None else self.clock.time()
        return {"token": "", "host": "unknown (unreadable lease file)", "pid": None, "started": _iso(mtime),
                "heartbeat": mtime}

    def _write(self, record: dict) -> None:
        data = json.dumps(record, indent=1).encode()
        if isinstance(self.fs, pafs.LocalFileSystem):
            # A rename replaces the file atomically: a reader never sees half a record.
            self.fs.create_dir(self.run_dir, recursive=True)
            partial = f"{self.path}.{record['token'][:8]}.tmp"
            with self.fs.open_output_stream(partial) as out:
                out.write(data)
            self.fs.move(partial, self.path)
        else:
            with self.fs.open_output_stream(self.path) as out:  # one PUT: atomic on S3
                out.write(data)

    def _delete(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------------ decisions
    def holder_alive(self, record: dict) -> bool:
        if self.clock.time() - float(record.get("heartbeat", 0)) > self.timeout_s:
            return False
        if record.get("machine") == self.me.get("machine") and isinstance(record.get("pid"), int):
            if record["pid"] == self.me.get("pid") and record.get("process_start") == self.me.get("process_start"):
                return False  # this very process, from an earlier attempt that did not release
            return process_running(record["pid"], record.get("process_start"))
        return True

    def describe(self, record: dict) -> str:
        age = max(0.0, self.clock.time() - float(record.get("heartbeat", 0)))
        expires = max(0.0, self.timeout_s - age)
        job = f", job {record['submission_id']}" if record.get("submission_id") else ""
        if record.get("submission_id"):
            stop = f"stop it (`ray job stop {record['submission_id']}`)"
        elif record.get("pid") is not None:
            stop = f"stop it (pid {record['pid']} on {record.get('host')})"
        else:
            stop = "stop it"
        # On this machine a gone driver is seen at once (its pid); elsewhere only its lease expiring tells.
        gone = "" if record.get("machine") == self.me.get("machine") else (
            f", or if it is gone, rerun in {expires:.0f} s when its lease expires")
        return (f"run '{self.name}' ({self.where}) is being trained by another driver: host {record.get('host')}, "
                f"pid {record.get('pid')}{job}, since {record.get('started')} (last heartbeat {age:.0f} s ago); "
                f"{stop} first{gone}")

    # ------------------------------------------------------------------ protocol
    def acquire(self) -> None:
        token = uuid.uuid4().hex + secrets.token_hex(4)
        watched: Optional[dict] = None
        while True:
            began = self.clock.monotonic()
            current = self.read()
            if current is None or not self.holder_alive(current):
                break
            if watched is not None and (current.get("token"), current.get("heartbeat")) != (
                    watched.get("token"), watched.get("heartbeat")):
                raise LeaseHeld(self.describe(current))  # it beat again: alive after all
            age = self.clock.time() - float(current.get("heartbeat", 0))
            if current.get("machine") == self.me.get("machine") or age <= 2 * self.interval_s:
                raise LeaseHeld(self.describe(current))
            # A holder elsewhere that missed two heartbeats is most likely gone (e.g. its cluster
            # was torn down under it and this is the retry): wait for its lease to expire instead
            # of failing, unless it beats again meanwhile.
            if watched is None:
                log.warning("the driver lease of run '%s' (host %s, pid %s) is %.0f s old: waiting up to %.0f s "
                            "for it to expire", self.name, current.get("host"), current.get("pid"), age,
                            self.timeout_s - age)
            watched = current
            self.clock.sleep(min(self.interval_s, max(0.1, self.timeout_s - age + 0.1)))
        now = self.clock.time()
        record = {**self.me, "token": token, "run": self.name, "started": _iso(now), "heartbeat": now,
                  "heartbeat_iso": _iso(now), "timeout_s": self.timeout_s}
        self._write(record)
        written = self.clock.monotonic()
        if written - began > self.settle_s / 2:
            self._withdraw(token)
            raise LeaseContended(
                f"run '{self.name}' ({self.where}): claiming the driver lease took {written - began:.1f} s, over "
                f"the {self.settle_s / 2:.1f} s that keeps two claims apart; storage is slow or another driver "
                f"claimed it at the same time: rerun (or raise {SETTLE_ENV})")
        self.clock.sleep(self.settle_s)
        back = self.read()
        if back is None or back.get("token") != token:
            if back is not None and back.get("token"):
                raise LeaseContended(f"another driver claimed the run at the same time; {self.describe(back)}")
            raise LeaseContended(f"run '{self.name}' ({self.where}): the driver lease vanished while claiming it; "
                                 f"another driver is starting or stopping: rerun")
        self.token, self.record, self._last_write = token, record, written

    def _withdraw(self, token: str) -> None:
        try:
            current = self.read()
            if current is not None and current.get("token") == token:
                self._delete()
        except OSError as exc:
            log.warning("could not withdraw the lease claim %s: %s", self.where, exc)

    def renew(self) -> None:
        """One heartbeat; raises LeaseLost when the lease is no longer safely ours."""
        with self._lock:
            if self.token is None:
                raise LeaseLost(f"run '{self.name}' ({self.where}): no lease held")
            since = self.clock.monotonic() - self._last_write
            if since > self.timeout_s / 2:
                raise LeaseLost(
                    f"run '{self.name}' ({self.where}): the driver lease was not renewed for {since:.0f} s "
                    f"(storage unreachable?); another driver may take the run over, so this one stops; rerun to resume")
            current = self.read()
            if current is None or current.get("token") != self.token:
                other = f"; now: {self.describe(current)}" if current else " (the lease file was deleted)"
                raise LeaseLost(f"run '{self.name}' ({self.where}): this driver lost its lease{other}")
            now = self.clock.time()
            self.record = {**self.record, "heartbeat": now, "heartbeat_iso": _iso(now)}
            self._write(self.record)
            self._last_write = self.clock.monotonic()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except LeaseLost as lost:
                self.on_lost(lost)
                return
            except OSError as exc:  # a storage hiccup: retried next beat; renew() bounds how long
                log.warning("driver lease heartbeat failed (%s); retrying in %g s", exc, self.interval_s)

    def start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="cape-ray-driver-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.interval_s + 5)
        with self._lock:
            if self.token is None:
                return
            try:
                current = self.read()
                if current is not None and current.get("token") == self.token:
                    self._delete()
            except OSError as exc:
                log.warning("could not release the driver lease %s (%s); it expires %g s after its last "
                            "heartbeat", self.where, exc, self.timeout_s)
            self.token = None

    def __enter__(self) -> "DriverLease":
        self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _stop_driver(lost: LeaseLost) -> None:
    """Another driver may own the run now: stop this process at once, taking its Ray workers with it
    (they belong to this driver's job), rather than let two drivers write one run directory."""
    sys.stderr.write(f"cape-ray train: error: {lost}\n")
    sys.stderr.flush()
    os._exit(EXIT_LEASE_LOST)
