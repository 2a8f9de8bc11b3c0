"""One driver per run: a lease object in the run directory, renewed by a heartbeat thread, and a
fence that every writer of run state checks before it writes.

Two drivers on one run (`{storage_path}/{name}`) would both train from the same checkpoint into
the same directory and overwrite each other's checkpoints and best exports. The driver therefore
holds `{storage_path}/{name}/driver_lease.json` while it trains. Everything goes through pyarrow
filesystems, so a local disk, NFS and S3 behave alike; pyarrow's S3 client has no conditional put,
so the protocol uses only whole-object PUT and GET.

The lease record: owner token (random), claim number (the fence, one more than the record it
replaced), host, pid, the process's start tick and the machine id (boot id + pid namespace), when
it was taken, the last heartbeat (wall clock), the holder's timeout and heartbeat interval, and the
Ray job submission id when there is one. A released lease stays as a record marked `released`
(no owner), so that claim numbers keep growing over the life of the run directory.

Protocol
- claim: read the lease. A live holder (heartbeat younger than the timeout *stored in its record*
  and, when it runs on this machine, a running process) makes the claim fail with LeaseHeld; one on
  another machine that has missed two of its heartbeats is watched until it expires (then taken
  over) or beats again (then refused). Otherwise write our record, wait `settle_s`, read it back: it
  must still carry our token. The write must also have completed within `settle_s / 2` of the moment
  our read began, otherwise we withdraw (LeaseContended).
- heartbeat: every `interval_s` a thread renews: read the lease, which must still carry our token,
  and rewrite it with a new heartbeat. A renewal must be complete, write included, within
  `timeout_s / 2` of the heartbeat it replaces (the deadline). Its I/O runs on a thread of its own, so
  a read or write that blocks (a hard NFS mount, a stalled connection) cannot hold the heartbeat: at
  the deadline the lease counts as lost. The deadline is also checked before the write and after it:
  a driver that was stopped (SIGSTOP, a paused VM) mid-renewal and wakes up late writes nothing, or
  learns that its write came too late. A lost lease stops the driver at once (exit status 75). (Only
  a write already issued when the process stopped can land late; the new holder then finds a foreign
  token at its read-back or next renewal and stops too: neither trains on, a rerun resumes.)
- fence: the driver hands its claim (number, token, timeout: `Fence`) to everything that writes run
  state: the workers check it before storing a checkpoint and its exports and before tidying at a
  start, the controller's history callback before each line. While the driver is stopped its workers
  and Ray's controller keep running (they are other processes), so the check is theirs to make: one
  small read of the lease object. A writer goes on only while the lease carries its claim and its
  heartbeat is younger than `WRITE_GUARD` (3/4) of the timeout; otherwise it raises Fenced and the
  run ends without writing. Writers therefore stop before a stalled driver's lease can be taken over
  (at the full timeout), and at the latest at their next write once it has been.
- release: read; if it still carries our token, rewrite it as released (only before the renewal
  deadline: past it the lease may be another driver's, and is left to expire).

Why two claimants cannot both proceed (S3 gives strong read-after-write consistency: a GET that
starts after a PUT completed returns that PUT or a later one; a local or NFS rename is atomic).
Say A and B both proceed and A's claim was written first (at w_A). A read back its own token at
least `settle_s` after w_A, so B's write completed later still. B saw no live holder, so B's read
began before w_A (a read after w_A returns A's fresh record). B's read-to-write gap therefore
exceeded `settle_s`, more than the `settle_s / 2` B allows itself: B withdrew. Contradiction.
In the rare interleavings the rules refuse, both drivers may stop (neither trains); a rerun then
resumes. Staleness from another machine needs the holder's timeout; on the same machine a dead
holder's pid is seen at once, so a rerun after a crash starts without waiting.

Clock skew. Heartbeats are wall-clock times written by one machine and aged by another; every
duration a machine measures about itself uses its monotonic clock. With T the holder's timeout:
- Holder vs claimant: while a driver holds the lease its record's heartbeat is younger than T/2 on
  the holder's clock (the renewal deadline; past it the holder stops). A claimant takes over once
  the heartbeat is older than T on its own clock. So a claimant whose clock runs ahead of the
  holder's by less than T/2 (30 s at the default T = 60 s) never takes a live lease; one whose clock
  runs behind only waits longer.
- Holder vs writers (workers, controller): a writer refuses once the heartbeat looks older than
  3/4 T on its clock. A writer's clock may run ahead of the driver's by less than T/4 (15 s) without
  stopping a healthy run; beyond that the run stops with a message (nothing is damaged). The guard
  leaves a store that passed its check T/4 (less the writers' and the claimant's skew) to finish
  before any takeover can happen; a store that takes longer on slow storage calls for a larger
  CAPE_LEASE_TIMEOUT_S.
- The token check does not depend on clocks: whatever the skew, a writer of a run that was taken
  over stops at its next write, and the old driver at its next renewal.
A step of a wall clock (a manual change) counts as skew; NTP keeps clocks within milliseconds. The
storage's clock matters only for an unreadable lease file (aged by its modification time).
"""

from __future__ import annotations

import dataclasses
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
from typing import Any, Callable, Optional, TypeVar

import pyarrow.fs as pafs

from cape_ray import storage

log = logging.getLogger("cape_ray")

LEASE_FILE = "driver_lease.json"
EXIT_LEASE_LOST = 75  # the driver's exit status when it loses its lease while training
FENCE_KEY = "_cape_lease_fence"  # the train loop config's entry carrying the driver's Fence
WRITE_GUARD = 0.75  # writers stop once the heartbeat is older than this fraction of the timeout

# Overridable from the environment so that tests and slow storage can tune them without a flag.
TIMEOUT_ENV, INTERVAL_ENV, SETTLE_ENV = "CAPE_LEASE_TIMEOUT_S", "CAPE_LEASE_INTERVAL_S", "CAPE_LEASE_SETTLE_S"
DEFAULT_TIMEOUT_S, DEFAULT_INTERVAL_S, DEFAULT_SETTLE_S = 60.0, 10.0, 2.0

T = TypeVar("T")


class LeaseError(RuntimeError):
    """A one-line reason why this driver may not (or may no longer) train the run."""


class LeaseHeld(LeaseError):
    pass


class LeaseContended(LeaseError):
    pass


class LeaseLost(LeaseError):
    pass


class Fenced(LeaseLost):
    """A writer of run state found that its driver no longer (safely) holds the run: it stops
    without writing."""


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


def _stored_seconds(record: dict, key: str, default: float) -> float:
    """A duration the holder stored in its record (its timeout, its interval), else `default`."""
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else default


def read_record(fs: pafs.FileSystem, path: str, now: Callable[[], float] = time.time) -> Optional[dict]:
    """The lease record at `path`, None if there is none. An unreadable record counts as held by an
    unknown driver until its file is a timeout old (its heartbeat is the file's mtime)."""
    try:
        with fs.open_input_stream(path) as stream:
            raw = stream.read()
    except FileNotFoundError:
        return None
    except OSError:
        if not storage.exists(fs, path):
            return None
        raise
    try:
        record = json.loads(raw.decode())
        if isinstance(record, dict) and isinstance(record.get("token"), str):
            return record
    except (UnicodeDecodeError, ValueError):
        pass
    info = fs.get_file_info(path)
    mtime = info.mtime.timestamp() if info.mtime is not None else now()
    return {"token": "", "host": "unknown (unreadable lease file)", "pid": None, "started": _iso(mtime),
            "heartbeat": mtime}


def _bounded(io: Callable[[], T], seconds: float, overdue: Callable[[], LeaseLost]) -> T:
    """`io()` on a thread of its own, waited for at most `seconds`: storage that blocks cannot hold
    the caller (the thread is left behind; `io` checks its own deadline before it writes)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = io()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="cape-ray-lease-io", daemon=True)
    thread.start()
    thread.join(max(0.0, seconds))
    if thread.is_alive():
        raise overdue()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@dataclasses.dataclass(frozen=True)
class Fence:
    """One claim of a run's lease, as the writers of its run state see it. `problem()` before every
    write: one small read of the lease object."""

    number: int  # the claim number: one more at every claim of the run
    token: str
    timeout_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[dict]) -> Optional["Fence"]:
        return cls(**data) if data else None

    def problem(self, fs: pafs.FileSystem, run_dir: str, now: Callable[[], float] = time.time) -> Optional[str]:
        """None while the lease in `run_dir` carries this claim and was renewed within WRITE_GUARD of
        its timeout; otherwise, in one line, why nothing may be written."""
        try:
            record = read_record(fs, f"{run_dir.rstrip('/')}/{LEASE_FILE}", now)
        except OSError as exc:
            return f"the driver lease cannot be read ({str(exc).splitlines()[0]})"
        if record is None or record.get("released"):
            return f"the driver lease of this run (claim {self.number}) was deleted or released"
        if (record.get("fence"), record.get("token")) != (self.number, self.token):
            return (f"the driver lease of this run (claim {self.number}) was taken over: it is now claim "
                    f"{record.get('fence')} by host {record.get('host')}, pid {record.get('pid')}")
        try:
            age = now() - float(record.get("heartbeat", 0))
        except (TypeError, ValueError):
            age = float("inf")  # a record without a usable heartbeat proves nothing
        limit = WRITE_GUARD * _stored_seconds(record, "timeout_s", self.timeout_s)
        if age > limit:
            return (f"the driver lease (claim {self.number}) was last renewed {age:.0f} s ago, over the {limit:g} s "
                    f"a writer allows: its driver is stalled and another driver may take the run over")
        return None


class DriverLease:
    """The lease of one run: `acquire()` (raises LeaseError), heartbeat thread, `release()`.

    Use as a context manager around the training: acquired and heartbeating inside, released on
    the way out whatever happened. `fence()` is the claim to hand to the writers of run state.
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
        self._beat_at = 0.0  # monotonic time at which the heartbeat now in the lease was taken
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ storage
    def read(self) -> Optional[dict]:
        return read_record(self.fs, self.path, self.clock.time)

    def _write(self, record: dict, deadline: Optional[float] = None) -> None:
        """Replace the lease with `record`; with a `deadline` (monotonic), never after it."""
        data = json.dumps(record, indent=1).encode()
        if isinstance(self.fs, pafs.LocalFileSystem):
            # A rename replaces the file atomically: a reader never sees half a record.
            self.fs.create_dir(self.run_dir, recursive=True)
            partial = f"{self.path}.{secrets.token_hex(4)}.tmp"
            with self.fs.open_output_stream(partial) as out:
                out.write(data)
            if deadline is not None and self.clock.monotonic() > deadline:
                self.fs.delete_file(partial)
                raise self._overdue()
            self.fs.move(partial, self.path)
        else:
            with self.fs.open_output_stream(self.path) as out:  # one PUT: atomic on S3
                out.write(data)

    # ------------------------------------------------------------------ decisions
    def holder_alive(self, record: dict) -> bool:
        if record.get("released"):
            return False
        if self.clock.time() - float(record.get("heartbeat", 0)) > _stored_seconds(record, "timeout_s", self.timeout_s):
            return False
        if record.get("machine") == self.me.get("machine") and isinstance(record.get("pid"), int):
            if record["pid"] == self.me.get("pid") and record.get("process_start") == self.me.get("process_start"):
                return False  # this very process, from an earlier attempt that did not release
            return process_running(record["pid"], record.get("process_start"))
        return True

    def describe(self, record: dict) -> str:
        age = max(0.0, self.clock.time() - float(record.get("heartbeat", 0)))
        expires = max(0.0, _stored_seconds(record, "timeout_s", self.timeout_s) - age)
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

    def fence(self) -> Fence:
        """This driver's claim, for the writers of run state (see the module docstring)."""
        if self.token is None or self.record is None:
            raise LeaseLost(f"run '{self.name}' ({self.where}): no lease held")
        return Fence(int(self.record["fence"]), self.token, self.timeout_s)

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
            timeout = _stored_seconds(current, "timeout_s", self.timeout_s)
            if current.get("machine") == self.me.get("machine") or \
                    age <= 2 * _stored_seconds(current, "interval_s", self.interval_s):
                raise LeaseHeld(self.describe(current))
            # A holder elsewhere that missed two heartbeats is most likely gone (e.g. its cluster
            # was torn down under it and this is the retry): wait for its lease to expire instead
            # of failing, unless it beats again meanwhile.
            if watched is None:
                log.warning("the driver lease of run '%s' (host %s, pid %s) is %.0f s old: waiting up to %.0f s "
                            "for it to expire", self.name, current.get("host"), current.get("pid"), age,
                            timeout - age)
            watched = current
            self.clock.sleep(min(self.interval_s, max(0.1, timeout - age + 0.1)))
        previous = current.get("fence") if current is not None else None
        number = previous + 1 if isinstance(previous, int) and not isinstance(previous, bool) else 1
        now, beat_at = self.clock.time(), self.clock.monotonic()
        record = {**self.me, "token": token, "fence": number, "run": self.name, "started": _iso(now),
                  "heartbeat": now, "heartbeat_iso": _iso(now), "timeout_s": self.timeout_s,
                  "interval_s": self.interval_s}
        self._write(record)
        written = self.clock.monotonic()
        if written - began > self.settle_s / 2:
            self._withdraw(record)
            raise LeaseContended(
                f"run '{self.name}' ({self.where}): claiming the driver lease took {written - began:.1f} s, over "
                f"the {self.settle_s / 2:.1f} s that keeps two claims apart; storage is slow or another driver "
                f"claimed it at the same time: rerun (or raise {SETTLE_ENV})")
        self.clock.sleep(self.settle_s)
        back = self.read()
        if back is None or back.get("token") != token:
            if back is not None and back.get("token") and not back.get("released"):
                raise LeaseContended(f"another driver claimed the run at the same time; {self.describe(back)}")
            raise LeaseContended(f"run '{self.name}' ({self.where}): the driver lease vanished while claiming it; "
                                 f"another driver is starting or stopping: rerun")
        self.token, self.record, self._beat_at = token, record, beat_at

    def _released(self, record: dict) -> dict:
        now = self.clock.time()
        return {**record, "token": "", "released": _iso(now), "heartbeat": now, "heartbeat_iso": _iso(now)}

    def _withdraw(self, record: dict) -> None:
        try:
            current = self.read()
            if current is not None and current.get("token") == record["token"]:
                self._write(self._released(record))
        except OSError as exc:
            log.warning("could not withdraw the lease claim %s: %s", self.where, exc)

    def _overdue(self) -> LeaseLost:
        since = self.clock.monotonic() - self._beat_at
        return LeaseLost(
            f"run '{self.name}' ({self.where}): the driver lease was not renewed for {since:.0f} s, over the "
            f"{self.timeout_s / 2:g} s allowed (storage blocked or unreachable, or this process was stopped); "
            f"another driver may take the run over, so this one stops; rerun to resume")

    def renew(self) -> None:
        """One heartbeat; raises LeaseLost when the lease is no longer safely ours. Complete, write
        included, within `timeout_s / 2` of the previous heartbeat, or lost."""
        with self._lock:
            if self.token is None:
                raise LeaseLost(f"run '{self.name}' ({self.where}): no lease held")
            deadline = self._beat_at + self.timeout_s / 2
            left = deadline - self.clock.monotonic()
            if left <= 0:
                raise self._overdue()
            _bounded(lambda: self._renew_io(deadline), left, self._overdue)

    def _renew_io(self, deadline: float) -> None:
        current = self.read()
        if current is None or current.get("token") != self.token:
            other = (f"; now: {self.describe(current)}" if current and not current.get("released")
                     else " (the lease file was deleted or released)")
            raise LeaseLost(f"run '{self.name}' ({self.where}): this driver lost its lease{other}")
        now, beat_at = self.clock.time(), self.clock.monotonic()
        if beat_at > deadline:  # the read outlived the deadline: another driver may hold the run now
            raise self._overdue()
        record = {**self.record, "heartbeat": now, "heartbeat_iso": _iso(now)}
        self._write(record, deadline)
        if self.clock.monotonic() > deadline:  # written too late: it may have replaced a new holder's claim
            raise self._overdue()
        self.record, self._beat_at = record, beat_at

    def confirm(self) -> None:
        """A last renewal once training is over: LeaseLost if the lease was lost meanwhile (a driver
        that was stopped while Ray trained learns it here). A storage error within the deadline is
        only warned about: until then no other driver can have taken the run over."""
        try:
            self.renew()
        except OSError as exc:
            log.warning("could not confirm the driver lease %s (%s); it was renewed %.0f s ago", self.where, exc,
                        self.clock.monotonic() - self._beat_at)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
            except LeaseLost as lost:
                self.on_lost(lost)
                return
            except OSError as exc:  # a storage hiccup: retried next beat; the deadline bounds how long
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
            token, self.token = self.token, None
            deadline = self._beat_at + self.timeout_s / 2
            if self.clock.monotonic() > deadline:
                return  # past our own deadline the lease may be another driver's: leave it to expire

            def release_io() -> None:
                current = self.read()
                if current is not None and current.get("token") == token:
                    self._write(self._released(self.record), deadline)

            try:
                _bounded(release_io, deadline - self.clock.monotonic(), self._overdue)
            except (OSError, LeaseLost) as exc:
                log.warning("could not release the driver lease %s (%s); it expires %g s after its last "
                            "heartbeat", self.where, exc, self.timeout_s)

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
