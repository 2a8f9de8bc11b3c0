"""The driver lease (cape_ray/lease.py) without Ray: local files, a fake clock, real processes.

The protocol's claims are checked directly: a live holder is refused with its identity in one
line, a stale or dead one is taken over, a holder that lost its lease learns it on the next
heartbeat, and concurrent claimants never both win, even when one of them stalls between its read
and its write (the case the settle rule exists for).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest

from cape_ray import cli, lease
from cape_ray.lease import LEASE_FILE, Clock, DriverLease, LeaseContended, LeaseHeld, LeaseLost
from s3_server import s3_uri


class FakeClock:
    """Shared wall and monotonic time; sleeping advances both."""

    def __init__(self, start: float = 1_800_000_000.0):
        self.wall, self.mono = start, 0.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def clock(self) -> Clock:
        return Clock(time=lambda: self.wall, monotonic=lambda: self.mono, sleep=self.advance)


def other_machine(host: str, pid: int = 4242) -> dict:
    return {"host": host, "pid": pid, "process_start": 1, "machine": f"machine-{host}", "submission_id": None}


def make(tmp_path, fake: FakeClock, identity=None, name="dup", **kwargs) -> DriverLease:
    settings = dict(timeout_s=60.0, interval_s=10.0, settle_s=2.0)
    settings.update(kwargs)
    return DriverLease(str(tmp_path), name, clock=fake.clock(), identity=identity, **settings)


def test_a_live_holder_is_refused_in_one_line_naming_it(tmp_path):
    fake = FakeClock()
    first = make(tmp_path, fake, other_machine("node-a", 1234))
    first.acquire()
    record = json.loads((tmp_path / "dup" / LEASE_FILE).read_text())
    assert record["host"] == "node-a" and record["pid"] == 1234 and record["run"] == "dup"

    fake.advance(16)  # 18 s after the claim (2 s of it settling): a live holder, beating every 10 s
    second = make(tmp_path, fake, other_machine("node-b"))
    with pytest.raises(LeaseHeld) as refused:
        second.acquire()
    message = str(refused.value)
    assert "\n" not in message
    for part in ("run 'dup'", str(tmp_path / "dup" / LEASE_FILE), "host node-a", "pid 1234",
                 f"since {record['started']}", "last heartbeat 18 s ago", "rerun in 42 s"):
        assert part in message, (part, message)
    # the refused driver left the holder's record alone
    assert json.loads((tmp_path / "dup" / LEASE_FILE).read_text())["token"] == record["token"]


def test_heartbeats_keep_the_lease_and_a_stale_one_is_taken_over(tmp_path):
    fake = FakeClock()
    holder = make(tmp_path, fake, other_machine("node-a"))
    holder.acquire()
    for _ in range(5):  # 5 x 25 s: far past the timeout, but renewed every 25 s
        fake.advance(25)
        holder.renew()
        with pytest.raises(LeaseHeld):
            make(tmp_path, fake, other_machine("node-b")).acquire()

    fake.advance(61)  # the holder stops renewing (hung or gone): stale after the 60 s timeout
    taker = make(tmp_path, fake, other_machine("node-b"))
    began = fake.wall
    taker.acquire()
    assert fake.wall - began == 2  # no waiting, only the settle delay
    assert json.loads((tmp_path / "dup" / LEASE_FILE).read_text())["host"] == "node-b"

    # The old holder wakes up: it must not renew over the new one.
    with pytest.raises(LeaseLost) as lost:
        holder.renew()
    assert "not renewed for" in str(lost.value)
    holder._beat_at = fake.mono  # even with a recent heartbeat of its own, the token decides
    with pytest.raises(LeaseLost) as lost:
        holder.renew()
    assert "lost its lease" in str(lost.value) and "host node-b" in str(lost.value)
    assert json.loads((tmp_path / "dup" / LEASE_FILE).read_text())["host"] == "node-b"
    holder.release()  # releases nothing that is not its own
    assert (tmp_path / "dup" / LEASE_FILE).exists()
    taker.release()
    record = json.loads((tmp_path / "dup" / LEASE_FILE).read_text())
    assert record["released"] and record["token"] == "" and record["fence"] == 2  # kept: the count goes on


def test_a_dead_driver_on_this_machine_is_taken_over_at_once(tmp_path):
    """Same machine: the pid tells a crashed driver from a live one without waiting for the timeout."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        identity = {"host": "here", "pid": child.pid, "process_start": lease.process_start(child.pid),
                    "machine": lease.machine_id(), "submission_id": None}
        fake = FakeClock(time.time())
        make(tmp_path, fake, identity).acquire()
        with pytest.raises(LeaseHeld) as refused:
            make(tmp_path, fake).acquire()  # this process's real identity
        assert f"pid {child.pid}" in str(refused.value)
    finally:
        child.kill()
        child.wait()
    fresh = make(tmp_path, fake)  # heartbeat 0 s old, but its process is gone
    fresh.acquire()
    assert json.loads((tmp_path / "dup" / LEASE_FILE).read_text())["pid"] == os.getpid()


def test_a_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    fake = FakeClock(time.time())
    parent = os.getppid()  # a live process, but not the one that wrote the lease
    identity = {"host": "here", "pid": parent, "process_start": (lease.process_start(parent) or 0) + 1,
                "machine": lease.machine_id(), "submission_id": None}
    make(tmp_path, fake, identity).acquire()
    make(tmp_path, fake).acquire()


def test_a_slow_claim_withdraws_so_two_claimants_never_both_win(tmp_path):
    """B reads the empty run, stalls, and writes after A has claimed and settled: without the
    settle rule both would train. B must withdraw, and A learns at its next heartbeat that the
    lease was disturbed: neither trains on, which is safe; a rerun resumes."""
    fake = FakeClock()
    a = make(tmp_path, fake, other_machine("node-a"))
    b = make(tmp_path, fake, other_machine("node-b"))
    read = b.read
    calls = {"n": 0}

    def read_then_stall():
        calls["n"] += 1
        seen = read()
        if calls["n"] == 1:
            a.acquire()  # A claims, settles and proceeds while B is between its read and write
        return seen

    b.read = read_then_stall
    with pytest.raises(LeaseContended) as withdrawn:
        b.acquire()
    assert "took 2.0 s" in str(withdrawn.value) and "\n" not in str(withdrawn.value)
    assert a.token is not None  # A proceeded ...
    with pytest.raises(LeaseLost):
        a.renew()  # ... and stops at its next heartbeat: B's claim replaced its record


def test_simultaneous_claims_the_last_writer_wins(tmp_path):
    """A and B both read the empty run before either writes; B writes last. The read-back after
    the settle delay decides: B holds the run, A refuses. (Two machines: two clocks, so that B's
    settling runs beside A's instead of inside A's write.)"""
    a = make(tmp_path, FakeClock(), other_machine("node-a"))
    b = make(tmp_path, FakeClock(), other_machine("node-b"))
    write_a, read_b = a._write, b.read

    def b_reads_then_a_writes_then_b_claims(record):
        if b.token is None:
            seen_by_b = read_b()  # B's read happens before A's write: the run is empty
            assert seen_by_b is None
            write_a(record)
            b.read = lambda: seen_by_b if b.token is None and not b.__dict__.setdefault("_used", False) \
                and not b.__dict__.update(_used=True) else read_b()
            b.acquire()  # B: its earlier read -> write over A -> settle -> read back: B's own
        else:
            write_a(record)

    a._write = b_reads_then_a_writes_then_b_claims
    with pytest.raises(LeaseContended) as lost_race:
        a.acquire()
    assert "claimed the run at the same time" in str(lost_race.value) and "host node-b" in str(lost_race.value)
    assert b.token is not None
    b.renew()  # B holds it


class Straggler(DriverLease):
    """Reads first, lets the others go, then stalls longer than the settle delay before writing."""

    stalled = False
    has_read = threading.Event()

    def read(self):
        seen = super().read()
        if self.token is None and not self.stalled:
            self.stalled = True
            self.has_read.set()
            time.sleep(0.9)
        return seen


def race(uri: str, claimants: int, jitter: random.Random | None = None) -> dict[int, object]:
    """`claimants` threads claim run 'race' at once on the real clock; claimant 0 is a Straggler
    that stalls past the settle delay between its read and its write. -> index: lease or error."""
    Straggler.has_read = threading.Event()
    results: dict[int, object] = {}

    def contender(index: int) -> None:
        kind = Straggler if index == 0 else DriverLease
        candidate = kind(uri, "race", timeout_s=60, interval_s=10, settle_s=0.6,
                         identity=other_machine(f"node-{index}", 1000 + index))
        if index:  # the others start once the straggler has seen the empty run
            Straggler.has_read.wait(10)
            if jitter is not None:
                time.sleep(jitter.uniform(0, 0.02))
        try:
            candidate.acquire()
            results[index] = candidate
        except lease.LeaseError as exc:
            results[index] = exc

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(claimants)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_claimants_with_real_threads(tmp_path, round_):
    """Four threads claim one run at once, one of them stalling past the settle delay between its
    read and its write (it would otherwise overwrite a settled winner and win too): at most one
    wins, never the straggler."""
    results = race(str(tmp_path), 4, random.Random(round_))
    winners = [r for r in results.values() if isinstance(r, DriverLease)]
    assert len(winners) <= 1, [str(r) for r in results.values()]
    assert isinstance(results[0], LeaseContended), results[0]
    for result in results.values():
        if not isinstance(result, DriverLease):
            assert isinstance(result, (LeaseHeld, LeaseContended)) and "\n" not in str(result)


def test_heartbeat_thread_stops_a_driver_that_lost_its_lease(tmp_path):
    lost = threading.Event()
    holder = DriverLease(str(tmp_path), "beat", timeout_s=3, interval_s=0.1, settle_s=0.05,
                         identity=other_machine("node-a"), on_lost=lambda exc: lost.set())
    with holder:
        first = json.loads((tmp_path / "beat" / LEASE_FILE).read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / "beat" / LEASE_FILE).read_text())["heartbeat"] > first  # renewed
        assert not lost.is_set()
        (tmp_path / "beat" / LEASE_FILE).write_text(json.dumps({"token": "someone-else", "heartbeat": time.time(),
                                                                "host": "node-b"}))
        assert lost.wait(2), "the heartbeat did not notice another driver's lease"
    assert json.loads((tmp_path / "beat" / LEASE_FILE).read_text())["token"] == "someone-else"  # not released


def test_release_on_the_way_out_even_after_an_error(tmp_path):
    holder = DriverLease(str(tmp_path), "err", timeout_s=60, interval_s=10, settle_s=0.01,
                         identity=other_machine("node-a"))
    with pytest.raises(ZeroDivisionError):
        with holder:
            assert (tmp_path / "err" / LEASE_FILE).exists()
            1 / 0
    assert json.loads((tmp_path / "err" / LEASE_FILE).read_text())["released"]
    assert not list((tmp_path / "err").glob("*.tmp"))


def test_an_unreadable_lease_counts_until_its_file_is_old(tmp_path):
    (tmp_path / "junk").mkdir()
    path = tmp_path / "junk" / LEASE_FILE
    path.write_text("{not json")
    fake = FakeClock(time.time())
    with pytest.raises(LeaseHeld) as refused:
        make(tmp_path, fake, name="junk").acquire()
    assert "unreadable" in str(refused.value)
    old = time.time() - 120
    os.utime(path, (old, old))
    make(tmp_path, fake, name="junk").acquire()


def test_settings_come_from_the_environment_and_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv(lease.TIMEOUT_ENV, "9")
    monkeypatch.setenv(lease.INTERVAL_ENV, "2")
    monkeypatch.setenv(lease.SETTLE_ENV, "0.5")
    made = DriverLease(str(tmp_path), "env")
    assert (made.timeout_s, made.interval_s, made.settle_s) == (9, 2, 0.5)
    monkeypatch.setenv(lease.INTERVAL_ENV, "5")
    with pytest.raises(lease.LeaseError, match="below half the timeout"):
        DriverLease(str(tmp_path), "env")
    monkeypatch.setenv(lease.TIMEOUT_ENV, "soon")
    with pytest.raises(lease.LeaseError, match="CAPE_LEASE_TIMEOUT_S='soon'"):
        DriverLease(str(tmp_path), "env")


def test_cape_ray_train_refuses_before_starting_ray(tmp_path, capsys, monkeypatch, ray_must_not_start):
    """The CLI: one error line naming the run and the holder, exit status 3, and no Ray started."""
    monkeypatch.setenv(lease.SETTLE_ENV, "0.01")
    holder = DriverLease(str(tmp_path), "busy", timeout_s=60, interval_s=10, settle_s=0.01,
                         identity={**other_machine("gpu-head-7", 31337), "submission_id": "busy-20260101-000000-ab"})
    holder.acquire()
    status = cli.main(["train", "--name", "busy", "--storage_path", str(tmp_path), "--epochs", "1"])
    assert status == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("cape-ray train: error: run 'busy'")
    assert "host gpu-head-7, pid 31337, job busy-20260101-000000-ab" in err
    assert "`ray job stop busy-20260101-000000-ab`" in err


def test_storage_uri_credentials_stay_out_of_messages():
    assert lease._display("s3://KEY:SECRET@bucket/runs?endpoint_override=h:1&scheme=http") == "s3://bucket/runs"
    assert lease._display("s3://bucket/runs/") == "s3://bucket/runs"
    assert lease._display("/nfs/runs") == "/nfs/runs"


# ----------------------------------------------------------------------------- the same on S3


def test_the_lease_on_s3(s3_endpoint):
    uri = s3_uri(s3_endpoint, "leases")
    fake = FakeClock()
    holder = DriverLease(uri, "s3dup", timeout_s=60, interval_s=10, settle_s=2, clock=fake.clock(),
                         identity=other_machine("node-a", 77))
    holder.acquire()
    fs, run_dir = holder.fs, holder.run_dir
    with fs.open_input_stream(f"{run_dir}/{LEASE_FILE}") as stream:
        assert json.loads(stream.read())["token"] == holder.token

    fake.advance(10)
    holder.renew()
    fake.advance(15)
    with pytest.raises(LeaseHeld) as refused:
        DriverLease(uri, "s3dup", timeout_s=60, interval_s=10, settle_s=2, clock=fake.clock(),
                    identity=other_machine("node-b")).acquire()
    message = str(refused.value)
    assert "run 's3dup' (s3://cape-ray-test/leases/s3dup/driver_lease.json)" in message
    assert "host node-a, pid 77" in message and "cape:cape" not in message and "endpoint" not in message

    fake.advance(46)  # 61 s since the last heartbeat: stale
    taker = DriverLease(uri, "s3dup", timeout_s=60, interval_s=10, settle_s=2, clock=fake.clock(),
                        identity=other_machine("node-b"))
    taker.acquire()
    with pytest.raises(LeaseLost):
        holder.renew()
    taker.release()
    with fs.open_input_stream(f"{run_dir}/{LEASE_FILE}") as stream:
        assert json.loads(stream.read())["released"]


def test_concurrent_claimants_on_s3(s3_endpoint):
    results = race(s3_uri(s3_endpoint, "race"), 3)
    assert len([r for r in results.values() if isinstance(r, DriverLease)]) <= 1, results
    assert isinstance(results[0], LeaseContended), results[0]


def test_a_silent_holder_elsewhere_is_waited_out_but_a_beating_one_refuses(tmp_path):
    """A driver on another machine that missed two heartbeats (its cluster torn down, say): the
    next driver waits for the lease to expire and takes over; if it beats again, it is refused."""
    fake = FakeClock()
    gone = make(tmp_path, fake, other_machine("old-head"))
    gone.acquire()
    fake.advance(25)  # two missed beats (interval 10 s)
    successor = make(tmp_path, fake, other_machine("new-head"))
    started = fake.wall
    successor.acquire()
    assert 60 - 27 <= fake.wall - started <= 60 - 27 + 10 + 2  # waited out the rest of the 60 s
    assert json.loads((tmp_path / "dup" / LEASE_FILE).read_text())["host"] == "new-head"

    fake = FakeClock()
    slow = make(tmp_path, fake, other_machine("slow-head"), name="slow")
    slow.acquire()
    fake.advance(25)
    waiting = make(tmp_path, fake, other_machine("new-head"), name="slow")
    sleep = fake.advance

    def holder_beats_while_we_wait(seconds):
        sleep(seconds)
        slow._beat_at = fake.mono
        slow.renew()

    waiting.clock = Clock(time=lambda: fake.wall, monotonic=lambda: fake.mono, sleep=holder_beats_while_we_wait)
    with pytest.raises(LeaseHeld) as refused:
        waiting.acquire()
    assert "host slow-head" in str(refused.value)


# ----------------------------------------------------------------------------- renewals bounded in time


def test_a_renewal_whose_read_stalls_past_the_timeout_writes_nothing(tmp_path):
    """A's renewal reads the lease, and the read takes 70 s (a hard NFS mount): meanwhile B takes the
    stale lease over. The read then returns what it saw before B's claim, A's own token. A must not
    write its heartbeat over B's claim: the renewal outlived its deadline, so the lease is lost."""
    fake = FakeClock()
    a = make(tmp_path, fake, other_machine("node-a"))
    a.acquire()
    b = make(tmp_path, fake, other_machine("node-b"))
    read = a.read

    def stalled_read():
        seen = read()  # A's record, as the read found it before stalling
        fake.advance(70)
        b.acquire()
        return seen

    a.read = stalled_read
    with pytest.raises(LeaseLost, match="not renewed for 74 s, over the 30 s allowed"):
        a.renew()
    record = json.loads((tmp_path / "dup" / LEASE_FILE).read_text())
    assert record["token"] == b.token and record["host"] == "node-b" and record["fence"] == 2
    b.renew()  # B holds it undisturbed


def test_a_renewal_blocked_in_storage_loses_the_lease_at_its_deadline(tmp_path):
    """Real time: the lease's read blocks (as on an unreachable hard mount). The heartbeat must not
    wait with it: at half the timeout the driver counts the lease as lost, and the blocked read,
    when it returns at last, writes nothing."""
    lost = threading.Event()
    holder = DriverLease(str(tmp_path), "blocked", timeout_s=1.0, interval_s=0.2, settle_s=0.02,
                         identity=other_machine("node-a"), on_lost=lambda exc: lost.set())
    path = tmp_path / "blocked" / LEASE_FILE
    unblock = threading.Event()
    read = holder.read
    with holder:
        before = path.read_text()

        def blocked_read():
            unblock.wait(30)
            return read()

        holder.read = blocked_read
        started = time.monotonic()
        assert lost.wait(5), "a blocked renewal held the heartbeat past its deadline"
        assert time.monotonic() - started < 1.0  # within the 0.5 s deadline plus one interval
        unblock.set()
        time.sleep(0.3)
        assert path.read_text() == before  # the late read wrote no heartbeat
    assert path.read_text() == before  # nor did the release: past its deadline the lease is left to expire


def test_the_last_confirmation_after_training(tmp_path):
    """job.run confirms the lease once fit() returns: a storage error within the deadline is only a
    warning, a lease past its deadline or in another driver's hands is lost."""
    fake = FakeClock()
    holder = make(tmp_path, fake, other_machine("node-a"))
    holder.acquire()
    read = holder.read

    def unreachable():
        raise OSError("storage unreachable")

    holder.read = unreachable
    holder.confirm()  # 2 s after the claim: no other driver can have taken it
    fake.advance(29)
    with pytest.raises(LeaseLost, match="not renewed for 31 s"):
        holder.confirm()
    holder.read = read
    with pytest.raises(LeaseLost, match="not renewed for 31 s"):
        holder.confirm()  # readable again, but too late

    fake = FakeClock(time.time())  # take_over's clock is the real one, 61 s on
    holder = make(tmp_path, fake, other_machine("node-a"), name="other")
    holder.acquire()
    fake.advance(20)
    holder.confirm()
    take_over(tmp_path, "other")
    with pytest.raises(LeaseLost, match="lost its lease; now: run 'other'"):
        holder.confirm()


# ----------------------------------------------------------------------------- the stored timeout


def test_readers_use_the_timeout_stored_in_the_lease(tmp_path):
    fake = FakeClock()
    make(tmp_path, fake, other_machine("node-a"), timeout_s=100.0, interval_s=10.0).acquire()
    fake.advance(5)  # 7 s after the claim: stale for a 1 s reader, not for the holder's 100 s
    with pytest.raises(LeaseHeld, match="rerun in 93 s"):
        make(tmp_path, fake, other_machine("node-b"), timeout_s=1.0, interval_s=0.2, settle_s=0.01).acquire()

    fake = FakeClock()
    make(tmp_path, fake, other_machine("node-a"), name="short", timeout_s=10.0, interval_s=2.0).acquire()
    fake.advance(11)  # stale by the holder's 10 s: a reader with 600 s of its own takes it at once
    taker = make(tmp_path, fake, other_machine("node-b"), name="short", timeout_s=600.0, interval_s=100.0)
    began = fake.wall
    taker.acquire()
    assert fake.wall - began == 2 and taker.fence().number == 2


# ----------------------------------------------------------------------------- the fence


def test_the_fence_holds_only_while_the_claim_is_live_and_its_number_grows(tmp_path):
    fake = FakeClock()
    a = make(tmp_path, fake, other_machine("node-a"))
    a.acquire()
    fence = a.fence()
    assert (fence.number, fence.token, fence.timeout_s) == (1, a.token, 60.0)
    assert lease.Fence.from_dict(fence.to_dict()) == fence
    check = lambda f=fence: f.problem(a.fs, a.run_dir, now=lambda: fake.wall)  # noqa: E731
    assert check() is None
    fake.advance(20)
    a.renew()
    fake.advance(45)
    assert check() is None  # 45 s old: within 3/4 of the 60 s timeout
    fake.advance(1.5)
    assert "last renewed 46 s ago, over the 45 s a writer allows: its driver is stalled" in check()

    fake.advance(15)  # stale: B takes over
    b = make(tmp_path, fake, other_machine("node-b", 99))
    b.acquire()
    assert "(claim 1) was taken over: it is now claim 2 by host node-b, pid 99" in check()
    b_fence = b.fence()
    assert check(b_fence) is None and "\n" not in check()
    b.release()
    assert "(claim 2) was deleted or released" in check(b_fence)
    c = make(tmp_path, fake, other_machine("node-c"))
    c.acquire()  # the released record kept the count
    c_fence = c.fence()
    assert c_fence.number == 3
    (tmp_path / "dup" / LEASE_FILE).unlink()
    assert "was deleted or released" in check(c_fence)
    d = make(tmp_path, fake, other_machine("node-d"))
    d.acquire()  # the count starts again, but the token still tells the claims apart
    assert d.fence().number == 1 and "was taken over: it is now claim 1 by host node-d" in check()


def take_over(tmp_path, name: str, host: str = "node-b") -> DriverLease:
    """Another driver takes the run over (its clock 61 s on: the current holder looks stale to it)."""
    fake = FakeClock(time.time() + 61)
    taker = make(tmp_path, fake, other_machine(host, 99), name=name, settle_s=0.01)
    taker.acquire()
    return taker


def test_a_worker_stores_nothing_once_its_run_was_taken_over(tmp_path):
    """The real loop (one rank, no Ray) trains under a fence; after its first checkpoint another
    driver takes the run over. The next checkpoint is not stored, no export is made, and the loop
    stops with Fenced. A restart of the old run then touches nothing either: its tidy, which would
    remove the new run's checkpoints as orphans, is fenced too."""
    from local_edge import LocalEdge
    from tiny import make_config

    from cape_ray.worker import train_loop_per_worker

    config = make_config(tmp_path, "fenced", epochs=1)
    holder = DriverLease(str(tmp_path), "fenced", timeout_s=60, interval_s=10, settle_s=0.01,
                         identity=other_machine("node-a"))
    holder.acquire()
    loop_config = {**config.to_dict(), lease.FENCE_KEY: holder.fence().to_dict()}
    edge = LocalEdge(tmp_path / "fenced", quiet=True)
    report = edge.report

    def report_then_taken_over(metrics, stored, name):
        report(metrics, stored, name)
        take_over(tmp_path, "fenced")

    edge.report = report_then_taken_over
    with pytest.raises(lease.Fenced, match=r"checkpoint \S+_s000002 not stored: the driver lease of this run "
                                           r"\(claim 1\) was taken over: it is now claim 2 by host node-b"):
        train_loop_per_worker(loop_config, edge)
    run_dir = tmp_path / "fenced"
    assert [name for name, _ in edge.reports] == ["checkpoint_e001_lr3e-3_bs2_acc2_qpe2_s000001"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_e001_lr3e-3_bs2_acc2_qpe2_s000001",
                                                         LEASE_FILE]

    (run_dir / "checkpoint_e001_lr3e-3_bs2_acc2_qpe2_s000003").mkdir()  # the new run's, unregistered here
    with pytest.raises(lease.Fenced, match="nothing tidied"):
        train_loop_per_worker(loop_config, LocalEdge.after(edge))
    assert (run_dir / "checkpoint_e001_lr3e-3_bs2_acc2_qpe2_s000003").is_dir()


def test_the_history_writes_nothing_once_its_run_was_taken_over(tmp_path):
    from types import SimpleNamespace

    from ray.train import RunConfig

    from cape_ray import history

    holder = DriverLease(str(tmp_path), "hist", timeout_s=60, interval_s=10, settle_s=0.01,
                         identity=other_machine("node-a"))
    holder.acquire()
    context = SimpleNamespace(run_config=RunConfig(name="hist", storage_path=str(tmp_path)))
    callback = history.RunHistory(tensorboard=False, fence=holder.fence())
    metrics = [{"epoch": 1, "step": 1, "global_step": 1, "validated": 0, "train_loss": 1.0}]
    callback.after_report(context, metrics, None)
    path = tmp_path / "hist" / history.METRICS_FILE
    assert len(path.read_text().splitlines()) == 1

    take_over(tmp_path, "hist")
    callback.after_report(context, [{**metrics[0], "step": 2, "global_step": 2}], None)
    callback.after_exception(context, {0: RuntimeError("worker died")})
    assert len(path.read_text().splitlines()) == 1


# ----------------------------------------------------------------------------- end to end, real drivers


def run_files(run_dir) -> dict[str, tuple[int, int]]:
    """Every file of the run directory but the lease: path -> (size, mtime_ns)."""
    files = {}
    for path in run_dir.rglob("*"):
        if path.is_file() and path.name != LEASE_FILE:
            info = path.stat()
            files[path.relative_to(run_dir).as_posix()] = (info.st_size, info.st_mtime_ns)
    return files


def wait_for_idle_cluster(timeout: float = 120) -> None:
    import ray

    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0):
            return
        time.sleep(0.2)
    raise AssertionError("Ray still runs the stopped driver's workers")


@pytest.mark.slow
def test_a_stopped_driver_taken_over_exits_without_writing(ray_cluster, tmp_path):
    """Driver A trains; it is SIGSTOPped past its lease timeout while its Ray workers and controller
    run on. Driver B, a real `cape-ray train` of the same run, takes it over, and is held still by
    the test once it has claimed, so that every write seen is A's. From B's claim on no file of the
    run directory changes (checkpoints, exports, metrics.jsonl, TensorBoard): A's workers and its
    history callback stopped at their fence, long before A's epoch would have ended. SIGCONT A: it
    exits with the lease-lost status, writing nothing. (That a rerun resumes is test_ray_job's.)"""
    import signal

    from tiny import cli_flags, make_config

    # 200 steps at a checkpoint every 5: A, unfenced, would write for many seconds after B's claim.
    config = make_config(tmp_path, "stop", epochs=1, episodes_per_epoch=800, checkpoint_every_steps=5)
    command = [sys.executable, "-m", "cape_ray", "train", *cli_flags(config)]
    base = {k: v for k, v in os.environ.items() if not k.startswith("CAPE_LEASE_")}
    base["RAY_ADDRESS"] = ray_cluster
    run_dir = tmp_path / "stop"
    lease_path = run_dir / LEASE_FILE
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("a", "b")}
    a = subprocess.Popen(command, env={**base, lease.TIMEOUT_ENV: "4", lease.INTERVAL_ENV: "0.5",
                                       lease.SETTLE_ENV: "0.2"}, stdout=logs["a"], stderr=subprocess.STDOUT)
    b = None
    try:
        deadline = time.time() + 240
        while not (list(run_dir.glob("checkpoint_*")) and (run_dir / "metrics.jsonl").exists()):
            assert a.poll() is None and time.time() < deadline, (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.1)
        a.send_signal(signal.SIGSTOP)
        while time.time() - json.loads(lease_path.read_text())["heartbeat"] <= 4.5:  # stale by A's own 4 s
            time.sleep(0.1)

        b = subprocess.Popen(command, env={**base, lease.TIMEOUT_ENV: "120", lease.SETTLE_ENV: "3"},
                             stdout=logs["b"], stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while json.loads(lease_path.read_text()).get("pid") != b.pid:
            assert b.poll() is None and time.time() < deadline, (tmp_path / "b.log").read_text()[-3000:]
            time.sleep(0.01)
        b.send_signal(signal.SIGSTOP)  # within its settle delay: B has not started Ray yet
        claimed = json.loads(lease_path.read_text())
        at_takeover = run_files(run_dir)
        assert claimed["fence"] == 2 and claimed["timeout_s"] == 120

        wait_for_idle_cluster()  # A's workers ended on their own (B has none yet)
        a.send_signal(signal.SIGCONT)
        assert a.wait(timeout=60) == lease.EXIT_LEASE_LOST, (tmp_path / "a.log").read_text()[-3000:]
        assert "cape-ray train: error: run 'stop'" in (tmp_path / "a.log").read_text()
        assert run_files(run_dir) == at_takeover, "the run directory changed after the takeover"
        assert json.loads(lease_path.read_text())["token"] == claimed["token"]
        checkpoints = [name for name in at_takeover if name.startswith("checkpoint_e")]
        assert checkpoints and all("_s0" in name for name in checkpoints), checkpoints  # mid-epoch only
        assert "metrics.jsonl" in at_takeover
    finally:
        for process in (a, b):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        for log in logs.values():
            log.close()
