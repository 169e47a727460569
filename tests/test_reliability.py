"""reliability: the promise to operators, tried hard. No acknowledged job is
lost or run twice, comfymgr keeps answering whatever ComfyUI, the disk or a
client does, and nobody gets in without a key.

Everything here runs comfymgr as a real process (`python comfymgr.py`) and,
where a ComfyUI is needed, the fake one as another process; the helpers live
in bench/crash_harness.py, whose long run (`make crash`) is the big brother
of test_crash_harness_short. Figures of these tests go to the file named by
COMFYMGR_RELIABILITY_REPORT (JSON lines) when it is set; with
COMFYMGR_RELIABILITY_LONG=1 the abuse tests run their long versions.
docs/RELIABILITY.md says what each test does and shows the last long run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import crash_harness as ch  # noqa: E402
from crash_harness import API_KEY, Api, Comfymgr, FakeComfy, HealthProbe, job_workflow  # noqa: E402

from conftest import HEADERS as IN_PROCESS_HEADERS  # noqa: E402 - the key of make_config's apps

LONG = os.environ.get("COMFYMGR_RELIABILITY_LONG") == "1"
HEALTH_BOUND_MS = 100.0  # the promise: /health answers within 100 ms whatever ComfyUI does


def record(test: str, **figures) -> None:
    """Append this test's figures to COMFYMGR_RELIABILITY_REPORT, if set."""
    path = os.environ.get("COMFYMGR_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"test": test, "long": LONG, **figures}) + "\n")


class World:
    """The processes of one test, stopped at its end whatever happens."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.fakes: list[FakeComfy] = []
        self.services: list[Comfymgr] = []

    def fake(self, *, start: bool = True, **kwargs) -> FakeComfy:
        fake = FakeComfy(self.tmp / f"comfy{len(self.fakes)}", **kwargs)
        self.fakes.append(fake)
        return fake.start() if start else fake

    def comfymgr(self, comfyui_url: str, *, start: bool = True, **kwargs) -> Comfymgr:
        service = Comfymgr(self.tmp / f"run{len(self.services)}" / "state", comfyui_url, **kwargs)
        self.services.append(service)
        return service.start() if start else service

    def close(self) -> None:
        for service in self.services:
            service.stop(signal.SIGTERM, timeout=10)
        for fake in self.fakes:
            fake.kill()


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def assert_health_fast(probe: HealthProbe, test: str, *, least: int = 20,
                       bound_ms: float = HEALTH_BOUND_MS) -> dict:
    """Every /health answer was a 200 within the bound; many samples."""
    summary = probe.stop()
    record(test, health=summary)
    assert not summary["errors"], summary
    assert summary["count"] >= least, summary
    assert summary["statuses"] == {200: summary["count"]}, summary
    assert summary["max_ms"] < bound_ms, summary
    return summary


# The storage tests send megabyte bodies (to make the WAL grow): parsing
# them shares the event loop with /health, so there the bound is "quick",
# not the 100 ms promised whatever ComfyUI does.
STORAGE_HEALTH_BOUND_MS = 500.0


def executions(fake: FakeComfy) -> dict[str, int]:
    return fake.stats()["execution_count"]


def submit_ok(api: Api, tag: str, **fields) -> dict:
    status, body = api.submit(job_workflow(tag), **fields)
    assert status == 202, body
    return body


# -- crash harness (short) ------------------------------------------------------------------

def test_crash_harness_short():
    """kill -9 (and SIGTERM) comfymgr under load, restart, audit everything."""
    args = ch.parser().parse_args(["--kills", "4", "--sigterms", "1", "--seed", "20261126",
                                   "--min-up", "0.3", "--max-up", "1.2", "--drain-timeout", "60"])
    report = ch.run(args, log=lambda line: None)
    record("crash_harness_short", **{k: v for k, v in report.items() if k != "stream"})
    assert report["problems"] == []
    assert report["acknowledged"] > 20 and report["lost"] == 0 and report["duplicated"] == 0
    assert report["jobs_executed_twice"] == 0 and report["prompts_executed_twice"] == 0
    assert report["integrity_ok"] == report["integrity_checks"] >= 6
    assert all(s["missing"] == 0 and s["duplicates"] == 0 for s in report["stream"])


# -- faults on the ComfyUI side --------------------------------------------------------------

def test_comfyui_down_at_start(world):
    """comfymgr starts, accepts and queues while ComfyUI is not there; runs
    the jobs once it comes up."""
    fake = world.fake(start=False)
    service = world.comfymgr(fake.url)
    api = Api(service.base)
    probe = HealthProbe(service.port)
    probe.start()
    jobs = [submit_ok(api, f"down{i}") for i in range(3)]
    backend = api.status()["backends"][0]
    assert backend["state"] == "down" and "cannot connect" in backend["lastError"]
    time.sleep(0.5)
    assert [api.job(j["workflowId"])["status"] for j in jobs] == ["queued"] * 3
    fake.start()
    done = [api.wait_job(j["workflowId"], timeout=30) for j in jobs]
    assert [d["status"] for d in done] == ["completed"] * 3
    assert sorted(executions(fake).values()) == [1, 1, 1]
    assert_health_fast(probe, "comfyui_down_at_start")


def test_comfyui_killed_mid_job_and_back_empty(world):
    """ComfyUI dies mid-job and comes back with an empty memory: the running
    job fails backend_lost (it forgot it); the one prefetched into ComfyUI's
    queue, which never started, goes back to comfymgr's queue as soon as a
    reconnect fails and runs on the new ComfyUI under a new prompt id, like
    the queued ones; no prompt id is posted twice."""
    fake = world.fake(node_delay={"ImageBlur": 1.0})
    service = world.comfymgr(fake.url)
    api = Api(service.base)
    api.wait_backend("up")
    probe = HealthProbe(service.port)
    probe.start()
    jobs = [submit_ok(api, f"killed{i}") for i in range(4)]
    victim = api.wait_job(jobs[0]["workflowId"], ("running",))
    deadline = time.monotonic() + 10
    while api.status()["backends"][0]["waitingJob"] is None:  # the prefetched one
        assert time.monotonic() < deadline
        time.sleep(0.01)
    waiting = api.job(api.status()["backends"][0]["waitingJob"])
    fake.kill(signal.SIGKILL)
    time.sleep(0.3)
    assert api.job(victim["workflowId"])["status"] == "running"  # not judged while unreachable
    deadline = time.monotonic() + 10
    while api.job(waiting["workflowId"])["state"] != "queued":  # released while ComfyUI is away
        assert time.monotonic() < deadline
        time.sleep(0.01)
    reborn = world.fake(port=fake.port, node_delay={"ImageBlur": 0.05})
    lost = api.wait_job(victim["workflowId"], timeout=30)
    assert lost["status"] == "failed", lost
    assert lost["error"]["code"] == "backend_lost"
    rest = [j for j in jobs if j["workflowId"] != victim["workflowId"]]
    done = [api.wait_job(j["workflowId"], timeout=30) for j in rest]
    assert [d["status"] for d in done] == ["completed"] * len(rest), done
    stats = reborn.stats()
    assert {victim["promptId"], waiting["promptId"]}.isdisjoint(stats["posted_prompt_ids"])
    assert sorted(stats["execution_count"].values()) == [1] * len(rest)
    assert_health_fast(probe, "comfyui_killed_mid_job")


def test_comfyui_hangs(world):
    """ComfyUI accepts connections and never answers: every call gives up
    after COMFYMGR_BACKEND_TIMEOUT, jobs wait, and all run once it answers."""
    fake = world.fake(node_delay={"ImageBlur": 0.5})
    service = world.comfymgr(fake.url, env={"COMFYMGR_BACKEND_TIMEOUT": "0.5s"})
    api = Api(service.base)
    api.wait_backend("up")
    probe = HealthProbe(service.port)
    probe.start()
    first = submit_ok(api, "hang-running")
    api.wait_job(first["workflowId"], ("running",))
    fake.set_mode("hang")
    fake._control("POST", "/__fake__/drop_websockets")
    second = submit_ok(api, "hang-queued")
    time.sleep(2.0)  # the run ends unheard; reconnects and polls time out meanwhile
    assert api.job(first["workflowId"])["status"] == "running"
    assert api.job(second["workflowId"])["status"] == "queued"
    backend = api.status()["backends"][0]
    assert backend["state"] == "down" and backend["lastError"]
    fake.set_mode("ok")
    done = [api.wait_job(j["workflowId"], timeout=30) for j in (first, second)]
    assert [d["status"] for d in done] == ["completed"] * 2
    assert sorted(executions(fake).values()) == [1, 1]
    assert_health_fast(probe, "comfyui_hangs")


@pytest.mark.parametrize("mode", ["http500", "html", "truncated"])
def test_comfyui_answers_garbage(world, mode):
    """500s, an HTML error page, truncated JSON: no job is judged on them;
    the running one and the queued one complete once ComfyUI is sane."""
    fake = world.fake(node_delay={"ImageBlur": 0.5})
    service = world.comfymgr(fake.url)
    api = Api(service.base)
    api.wait_backend("up")
    probe = HealthProbe(service.port)
    probe.start()
    first = submit_ok(api, f"{mode}-running")
    api.wait_job(first["workflowId"], ("running",))
    fake.set_mode(mode)
    second = submit_ok(api, f"{mode}-queued")
    time.sleep(1.2)  # the first ends meanwhile: its history and the next POST meet the fault
    assert api.job(second["workflowId"])["status"] == "queued"
    assert api.status()["backends"][0]["lastError"]
    fake.set_mode("ok")
    done = [api.wait_job(j["workflowId"], timeout=30) for j in (first, second)]
    assert [d["status"] for d in done] == ["completed"] * 2
    assert sorted(executions(fake).values()) == [1, 1]
    assert_health_fast(probe, f"comfyui_{mode}")


def test_comfyui_websocket_keeps_closing(world):
    """A WebSocket that ComfyUI closes every half second: results come from
    /history after each reconnect (fresh clientId each time); every job
    completes, once."""
    fake = world.fake(node_delay={"ImageBlur": 0.3})
    fake.set_mode("ok", ws_close_every=0.5)
    service = world.comfymgr(fake.url)
    api = Api(service.base)
    api.wait_backend("up")
    probe = HealthProbe(service.port)
    probe.start()
    jobs = [submit_ok(api, f"wsclose{i}") for i in range(8)]
    done = [api.wait_job(j["workflowId"], timeout=60) for j in jobs]
    assert [d["status"] for d in done] == ["completed"] * 8
    stats = fake.stats()
    assert sorted(stats["execution_count"].values()) == [1] * 8
    assert len(stats["ws_connects"]) >= 3 and len(set(stats["ws_connects"])) == len(stats["ws_connects"])
    assert_health_fast(probe, "comfyui_ws_closes")


def test_comfyui_slow(world):
    """Seconds per call: under the backend timeout jobs just take longer;
    over it, calls give up, the job waits, and it runs once when ComfyUI is
    quick again."""
    fake = world.fake(node_delay={"ImageBlur": 0.1})
    service = world.comfymgr(fake.url, env={"COMFYMGR_BACKEND_TIMEOUT": "1s"})
    api = Api(service.base)
    api.wait_backend("up")
    probe = HealthProbe(service.port)
    probe.start()
    fake.set_mode("ok", latency=0.5)  # slow, under the timeout
    slow = submit_ok(api, "slow")
    assert api.wait_job(slow["workflowId"], timeout=30)["status"] == "completed"
    fake.set_mode("ok", latency=1.6)  # slower than the timeout
    stuck = submit_ok(api, "slower")
    time.sleep(2.0)  # its POST gave up after 1 s; ComfyUI queued it 1.6 s after it was sent
    assert api.job(stuck["workflowId"])["status"] in ("queued", "running")
    fake.set_mode("ok", latency=0)
    done = api.wait_job(stuck["workflowId"], timeout=30)
    assert done["status"] == "completed", done
    assert sorted(executions(fake).values()) == [1, 1]
    assert_health_fast(probe, "comfyui_slow")


# -- faults on the storage side ----------------------------------------------------------------

STORAGE_REFUSED = {"error": "storage_unavailable", "statusCode": 503,
                   "message": "the database cannot be written right now; nothing was changed, try again"}


def assert_refused(status: int, body: dict, reason: str | None = None) -> None:
    """The exact 503 envelope of a write the database refused."""
    assert status == 503, body
    assert {k: body[k] for k in STORAGE_REFUSED} == STORAGE_REFUSED, body
    assert set(body["details"]) == {"reason"} and body["details"]["reason"], body
    if reason is not None:
        assert body["details"]["reason"] == reason, body


def assert_not_stored(db: Path, tag: str, key: str | None = None) -> None:
    """A refused submit left nothing: no job with its tag, no event without
    its job, no idempotency key (read-only, beside the running comfymgr)."""
    import hashlib
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE workflow LIKE ?",
                            (f'%"filename_prefix":"{tag}"%',)).fetchone()[0] == 0, tag
        assert conn.execute("SELECT COUNT(*) FROM events WHERE job_id NOT IN "
                            "(SELECT id FROM jobs)").fetchone()[0] == 0
        if key is not None:
            scope = hashlib.sha256(hashlib.sha256(API_KEY.encode()).digest() + b"\0" + key.encode())
            assert conn.execute("SELECT COUNT(*) FROM idempotency WHERE key = ?",
                                (scope.hexdigest(),)).fetchone()[0] == 0, key
    finally:
        conn.close()


def padded(tag: str, size: int) -> dict:
    """A workflow whose text is about `size` bytes (a string input SaveImage ignores)."""
    graph = job_workflow(tag)
    graph["9"]["inputs"]["note"] = "x" * size
    return graph


_BATCH_SCRIPT = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[2])
import comfymgr
storage = comfymgr.Storage(sys.argv[1])
normal = comfymgr.Priority.NORMAL
storage.enqueue("before", "{}", normal, "any", 1)
published = []
storage.on_commit = lambda events: published.extend(e.job_id for e in events)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(sys.argv[1] + "-wal"), resource.RLIM_INFINITY))
big = json.dumps({"x": "y" * 2_000_000})
outcomes = storage.run_batch([lambda: storage.enqueue("small1", "{}", normal, "any", 2),
                              lambda: storage.enqueue("big", big, normal, "any", 3),
                              lambda: storage.enqueue("small2", "{}", normal, "any", 4)])
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
after = storage.run_batch([lambda: storage.enqueue("after", "{}", normal, "any", 5)])
print(json.dumps({
    "outcomes": [[ok, str(v) if not ok else v[0].id] for ok, v in outcomes],
    "after": [[ok, str(v) if not ok else v[0].id] for ok, v in after],
    "jobs": [r[0] for r in storage._conn.execute("SELECT id FROM jobs ORDER BY n")],
    "events": [r[0] for r in storage._conn.execute("SELECT job_id FROM events ORDER BY seq")],
    "published": published}))
"""


def test_group_commit_when_sqlite_rolls_the_whole_batch_back(tmp_path):
    """A write that fills the disk makes SQLite roll the whole transaction
    back by itself. Every submit of that group commit must then be refused:
    none may be answered 202 (and its event published) while not stored, and
    none may be committed on its own in autocommit while refused. (Found by
    the disk-full test: the batch was answered op by op as if the savepoints
    still existed.) Runs in a child process: RLIMIT_FSIZE is per process."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _BATCH_SCRIPT, str(tmp_path / "batch.db"), str(ROOT)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert [ok for ok, _ in result["outcomes"]] == [False, False, False], result
    assert len({reason for _, reason in result["outcomes"]}) == 1, result  # the one real cause
    assert result["after"] == [[True, "after"]]
    assert result["jobs"] == result["events"] == ["before", "after"]
    assert result["published"] == ["after"]


def _chattr_works(tmp_path: Path) -> bool:
    import subprocess

    probe = tmp_path / "chattr-probe"
    probe.write_text("x")
    ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
    return ok


def test_database_not_writable(world, tmp_path):
    """The database file and its WAL made immutable (chattr +i: root ignores
    file modes, but not that flag; writes through comfymgr's open descriptors
    fail with EPERM): submits get 503 storage_unavailable and leave nothing
    behind, /health stays quick, and everything resumes once writable."""
    import shutil
    import subprocess

    if shutil.which("chattr") is None or not _chattr_works(tmp_path):
        pytest.skip("chattr +i is not available here (needs root and ext4/xfs/btrfs)")
    fake = world.fake(node_delay={"ImageBlur": 0.4})
    service = world.comfymgr(fake.url)
    api = Api(service.base)
    api.wait_backend("up")
    jobs = [submit_ok(api, f"ro{i}") for i in range(3)]
    api.wait_job(jobs[0]["workflowId"], ("running",))
    probe = HealthProbe(service.port)
    probe.start()
    files = [str(service.db_path), f"{service.db_path}-wal"]
    subprocess.run(["chattr", "+i", *files], check=True)
    try:
        status, body, _ = api.call("POST", "/v1/comfyui/workflow", {"workflow": padded("ro-refused", 500_000)},
                                   headers={"Idempotency-Key": "ro-refused"})
        assert_refused(status, body)
        status, body = api.submit(job_workflow("ro-refused-small"), priority="high")
        assert_refused(status, body)
        assert_not_stored(service.db_path, "ro-refused", key="ro-refused")
        assert_not_stored(service.db_path, "ro-refused-small")
        time.sleep(1.0)  # the running job ends meanwhile: its end cannot be written yet
        database = api.status()["database"]
        assert database["lastError"], database
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)
    again = submit_ok(api, "ro-after")
    done = [api.wait_job(j["workflowId"], timeout=30) for j in [*jobs, again]]
    assert [d["status"] for d in done] == ["completed"] * 4
    assert sorted(executions(fake).values()) == [1] * 4
    assert api.status()["database"]["lastError"] is None
    assert_health_fast(probe, "database_not_writable", bound_ms=STORAGE_HEALTH_BOUND_MS)


def test_disk_full_file_size_limit(world):
    """A full disk, as RLIMIT_FSIZE put on the running comfymgr (prlimit):
    the WAL cannot grow. A large submit gets 503; in a burst of submits
    sharing group commits, every 202 is stored and every 503 is not; with
    the limit lifted, everything resumes by itself."""
    import concurrent.futures
    import resource

    fake = world.fake(node_delay={"ImageBlur": 0.2})
    service = world.comfymgr(fake.url)
    api = Api(service.base)
    api.wait_backend("up")
    queued = [submit_ok(api, f"full{i}") for i in range(3)]
    wal = Path(f"{service.db_path}-wal")
    probe = HealthProbe(service.port)
    probe.start()
    resource.prlimit(service.pid, resource.RLIMIT_FSIZE, (wal.stat().st_size, resource.RLIM_INFINITY))
    try:
        status, body = api.submit(padded("full-big", 2_000_000))
        assert_refused(status, body)
        assert_not_stored(service.db_path, "full-big")
        with pytest.raises(AssertionError):  # the check does see a stored job
            assert_not_stored(service.db_path, "full0")

        def burst(i: int) -> tuple[str, int, dict]:
            tag = f"burst{i}"
            status, body = api.submit(padded(tag, 1_500_000) if i % 5 == 0 else job_workflow(tag))
            return tag, status, body

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(burst, range(40)))
        assert {s for _, s, _ in answers} <= {202, 503}, answers
        for _, status, body in answers:
            if status == 503:
                assert_refused(status, body)
        assert any(s == 503 for _, s, _ in answers)
    finally:
        resource.prlimit(service.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    accepted = {b["workflowId"] for _, s, b in answers if s == 202}
    jobs, _, _ = ch.read_db_live(service.db_path)
    stored = {ch.prompt_tag(json.loads(j.workflow)): j.id for j in jobs}
    for tag, status, body in answers:
        if status == 202:
            assert stored.get(tag) == body["workflowId"], f"{tag}: 202 but not stored"
        else:
            assert tag not in stored, f"{tag}: 503 but stored"
    after = submit_ok(api, "full-after")
    done = [api.wait_job(j, timeout=60) for j in [*(q["workflowId"] for q in queued), *accepted,
                                                   after["workflowId"]]]
    assert {d["status"] for d in done} == {"completed"}, done
    assert set(executions(fake).values()) == {1}
    assert_health_fast(probe, "disk_full_fsize", bound_ms=STORAGE_HEALTH_BOUND_MS)


def test_database_locked_by_another_writer(world):
    """Another process holds the write lock (BEGIN IMMEDIATE) past comfymgr's
    5 s busy timeout: submits get 503 storage_unavailable 'database is
    locked' and store nothing; /health answers within its own 2 s bound (503
    `unhealthy` while the database thread waits on the lock); once the lock
    goes, everything resumes by itself."""
    import sqlite3

    fake = world.fake(node_delay={"ImageBlur": 0.2})
    service = world.comfymgr(fake.url)
    api = Api(service.base)
    api.wait_backend("up")
    queued = [submit_ok(api, f"locked{i}") for i in range(3)]
    holder = sqlite3.connect(str(service.db_path), isolation_level=None, timeout=30)
    holder.execute("BEGIN IMMEDIATE")
    probe = HealthProbe(service.port, interval=0.1)
    probe.start()
    try:
        started = time.monotonic()
        status, body = api.submit(job_workflow("locked-refused"))
        waited = time.monotonic() - started
        assert_refused(status, body, "database is locked")
        # the 5 s busy timeout, perhaps behind other writes waiting on it too
        assert 4.0 < waited < 20.0, waited
        assert_not_stored(service.db_path, "locked-refused")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    health = probe.stop()
    record("database_locked", health=health, submit_refused_after_s=round(waited, 2))
    assert not health["errors"] and health["max_ms"] < 2600, health  # its own bound: 2 s
    assert set(health["statuses"]) <= {200, 503}, health
    after_probe = HealthProbe(service.port)
    after_probe.start()
    again = submit_ok(api, "locked-after")
    done = [api.wait_job(j["workflowId"], timeout=60) for j in [*queued, again]]
    assert {d["status"] for d in done} == {"completed"}, done
    assert set(executions(fake).values()) == {1}
    assert_health_fast(after_probe, "database_locked_after", least=5)


def _tmpfs_in_namespace_works(tmp_path: Path) -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    target = tmp_path / "tmpfs-probe"
    target.mkdir()
    done = subprocess.run(["unshare", "-rm", "--", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$0"',
                           str(target)], capture_output=True, timeout=30)
    return done.returncode == 0


def test_disk_full_tmpfs(world, tmp_path):
    """A real ENOSPC: the state directory is a 4 MiB tmpfs, mounted in a
    mount namespace of comfymgr's own (`unshare -rm`, no root needed where
    user namespaces are allowed), filled up from outside through
    /proc/<pid>/root. Submits get 503 'database or disk is full' and store
    nothing; deleting the filler is all it takes to resume."""
    import errno

    if not _tmpfs_in_namespace_works(tmp_path):
        pytest.skip("no tmpfs in a user+mount namespace here (unshare -rm)")
    fake = world.fake(node_delay={"ImageBlur": 0.2})
    service = world.comfymgr(fake.url, start=False)
    service.state_dir.mkdir(parents=True)
    service.wrapper = ["unshare", "-rm", "--", "sh", "-c",
                       'mount -t tmpfs -o size=4m tmpfs "$0" && exec "$@"', str(service.state_dir)]
    service.start()
    api = Api(service.base)
    api.wait_backend("up")
    inside = Path(f"/proc/{service.pid}/root{service.state_dir}")
    queued = [submit_ok(api, f"tmpfs{i}") for i in range(3)]
    probe = HealthProbe(service.port)
    probe.start()

    def counts() -> tuple[int, int]:
        # SQLite resolves /proc/<pid>/root to "/", so the tmpfs is read
        # through the API here: jobs stored and the latest event seq.
        status = api.status()
        return sum(status["queue"]["byStatus"].values()), status["stream"]["latestSeq"]

    filler = inside / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    try:
        before = counts()
        status, body = api.submit(padded("tmpfs-big", 1_000_000))
        assert_refused(status, body, "database or disk is full")
        assert counts() == before
        time.sleep(1.0)
    finally:
        filler.unlink()
    after = submit_ok(api, "tmpfs-after")
    done = [api.wait_job(j["workflowId"], timeout=60) for j in [*queued, after]]
    assert {d["status"] for d in done} == {"completed"}, done
    assert set(executions(fake).values()) == {1}
    assert_health_fast(probe, "disk_full_tmpfs", bound_ms=STORAGE_HEALTH_BOUND_MS)


# -- abuse: the documented API, fuzzed --------------------------------------------------------

# Where an operation may refuse data its schema allows, and why; every other
# check runs with schemathesis's defaults. A schema can say "a string" but
# not "a cursor this API returned", "a graph ComfyUI's node list accepts" or
# "a real image".
SCHEMATHESIS_CONFIG = """
# Every check schemathesis has (what `--checks all` does; said here, not on
# the command line, so that the one exception below can apply).
[checks]
enabled = true

# DELETE /v1/comfyui/workflow/{id} cancels a job (the seed's contract): the
# job stays readable, status cancelled, so "deleted, then still there" is
# the promise here, not a use after free.
[checks.use_after_free]
enabled = false

[[operations]]
# The workflow is checked against ComfyUI's /object_info (unknown node
# classes, missing inputs, dangling links): 400 invalid_workflow. The gpu
# must name a configured backend, the webhook URL an address webhooks may
# reach: 400.
include-operation-id = "submit"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "409", "429"]

[[operations]]
# The file must really be an image, with an image file name: 400. And in
# multipart/form-data every field is text: the "null" or "12" schemathesis
# sends to break a string field's type are legal folder and backend names,
# so type-breaking cases cannot be rejected there (missing and unknown
# fields are: see test_abuse_bodies_and_uploads).
include-operation-id = "inputs"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "409", "429"]
checks.negative_data_rejection.enabled = false

[[operations]]
# Cursors are opaque: only a `next` this API returned is one (else 400).
include-operation-id = ["jobs", "outputs"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404", "409", "429"]

[[operations]]
# A job has a preview only while a node sends them: 404 no_preview otherwise (documented).
include-operation-id = "preview"
checks.ensure_resource_availability.enabled = false

[[operations]]
# A WebSocket endpoint: a plain GET is answered 426 (documented).
include-operation-id = "stream"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "426", "429"]
"""


@pytest.mark.parametrize("comfyui", ["up", "down"])
def test_schemathesis_every_operation_all_checks(world, tmp_path, comfyui):
    """schemathesis against /openapi.json with a valid key, every operation,
    every check: no 5xx, every answer matches the documented schema. With
    ComfyUI up, submits meet the workflow check against its node list (and
    jobs run); with it down, they are queued, so the job routes are reached
    through the submit's answers (stateful phase)."""
    schemathesis = Path(sys.executable).with_name("schemathesis")
    if not schemathesis.exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    import subprocess

    fake = world.fake(node_delay={"ImageBlur": 0.01}, start=comfyui == "up")
    files = {name: tmp_path / name for name in ("inputs", "outputs", "temp")}
    for folder in files.values():
        folder.mkdir()
    (files["outputs"] / "sub").mkdir()
    (files["outputs"] / "sub" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    service = world.comfymgr(fake.url, env={
        "COMFYUI_INPUTS": str(files["inputs"]), "COMFYUI_OUTPUTS": str(files["outputs"]),
        "COMFYUI_TEMP": str(files["temp"]),
        # ?wait= is generated too: a short cap keeps every answer within the request timeout.
        "COMFYMGR_MAX_WAIT": "500ms"})
    Api(service.base).wait_backend(comfyui)
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    examples = 150 if LONG else 10
    report = tmp_path / "schemathesis.json"
    done = subprocess.run(
        [str(schemathesis), "--config-file", str(config), "--no-color", "run",
         f"{service.base}/openapi.json", "--header", f"X-API-Key: {API_KEY}",
         "--max-examples", str(examples), "--seed", "20261126", "--request-timeout", "20",
         "--report", "json", "--report-json-path", str(report)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache goes to the cwd
    output = done.stdout + done.stderr
    cases = _schemathesis_cases(output)
    statuses = _status_counts(Api(service.base))
    record(f"schemathesis_comfyui_{comfyui}", examples_per_operation=examples, cases=cases,
           exit_code=done.returncode, http_statuses=statuses)
    assert done.returncode == 0, output[-8000:]
    assert cases > 10 * examples, output[-3000:]  # every operation, and more
    assert not any(status.startswith("5") for status in statuses), statuses


def test_the_documented_output_path_pattern_is_the_enforced_rule():
    """/openapi.json describes the output path with a pattern; it must let
    through exactly what _check_rel_path lets through."""
    import random
    import re

    import comfymgr

    pattern = comfymgr._PATH_PARAM_SCHEMAS[("output", "path")]["pattern"]
    rng = random.Random(7)
    for _ in range(20000):
        rel = "".join(rng.choice("a./\\\x00b") for _ in range(rng.randint(0, 8)))
        try:
            comfymgr._check_rel_path(rel)
            allowed = True
        except comfymgr.ApiError:
            allowed = False
        assert allowed == bool(re.search(pattern, rel)), repr(rel)


def _schemathesis_cases(output: str) -> int:
    import re

    found = re.search(r"(\d+) generated", output)
    return int(found.group(1)) if found else 0


def _status_counts(api: Api) -> dict[str, float]:
    """comfymgr's own count of answers by status, from /metrics."""
    import re

    status, text, _ = api.call("GET", "/metrics")
    counts: dict[str, float] = {}
    raw = text.decode() if isinstance(text, bytes) else str(text)
    for match in re.finditer(r'comfymgr_http_requests_total\{[^}]*status="(\d+)"[^}]*\} ([0-9.e+]+)', raw):
        counts[match.group(1)] = counts.get(match.group(1), 0) + float(match.group(2))
    return counts


# -- abuse: keys -------------------------------------------------------------------------------

OPEN_PATHS = {"/health", "/metrics", "/openapi.json", "/docs", "/docs/init.js",
              "/docs/assets/swagger-ui.css"}


def _one_byte_off(key: str) -> list[str]:
    """The key with each byte changed in turn, one byte longer, one shorter."""
    variants = []
    for i, char in enumerate(key):
        variants.append(key[:i] + chr(ord(char) ^ 1) + key[i + 1:])
    return [*variants, key + "x", key[:-1]]


def test_every_route_needs_the_key(world):
    """Every documented operation (and HEAD beside each GET), answered 401
    with the envelope: without a key, with a wrong one, with one differing
    in a single byte (each byte in turn), one byte longer or shorter, with
    the key only in ?api_key= (honoured for the stream alone), and with a
    wrong X-API-Key header before the right one. The open routes answer
    without a key."""
    import http.client
    import uuid

    service = world.comfymgr(f"http://127.0.0.1:{ch.free_port()}")
    status, doc, _ = Api(service.base).call("GET", "/openapi.json", key=None)
    assert status == 200
    operations = []
    for path, methods in doc["paths"].items():
        concrete = path.replace("{id}", str(uuid.uuid4())).replace("{path}", "a.png")
        for method, operation in methods.items():
            operations.append((method.upper(), concrete, operation.get("security")))
            if method == "get":
                operations.append(("HEAD", concrete, operation.get("security")))
    protected = [(m, p) for m, p, security in operations if security != []]
    open_ops = [(m, p) for m, p, security in operations if security == []]
    assert {p for _, p in open_ops} <= OPEN_PATHS and len(protected) >= 14
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)

    def ask(method: str, path: str, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
        conn.putrequest(method, path)
        for name, value in headers:
            conn.putheader(name, value)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()

    variants: list[list[tuple[str, str]]] = [[], [("X-API-Key", "")], [("X-API-Key", "wrong")],
                                              [("X-API-Key", "wrong"), ("X-API-Key", API_KEY)]]
    variants += [[("X-API-Key", key)] for key in _one_byte_off(API_KEY)]
    refused = 0
    for method, path in protected:
        for headers in variants:
            status, body = ask(method, path, headers)
            assert status == 401, (method, path, headers, status, body)
            if method != "HEAD":
                envelope = json.loads(body)
                assert envelope["error"] == "unauthorized" and envelope["statusCode"] == 401
                assert envelope["details"] == {}, envelope
            refused += 1
        sep = "&" if "?" in path else "?"
        status, _ = ask(method, f"{path}{sep}api_key={API_KEY}", [])
        expected = 426 if path.startswith("/v1/comfyui/stream") and method == "GET" else 401
        if method == "HEAD" and path.startswith("/v1/comfyui/stream"):
            expected = 426
        assert status == expected, (method, path, status)
        for key in ["wrong", *_one_byte_off(API_KEY)]:
            status, _ = ask(method, f"{path}{sep}api_key={key}", [])
            assert status == 401, (method, path, key)
            refused += 1
    for method, path in open_ops:
        status, _ = ask(method, path, [])
        assert status == 200, (method, path)
    status, _ = ask("GET", "/docs/assets/swagger-ui.css", [])
    assert status == 200
    conn.close()
    record("every_route_needs_the_key", operations=len(protected), refused_401=refused)


# -- abuse: bodies ------------------------------------------------------------------------------

def _post_raw(service: Comfymgr, body: bytes, path: str = "/v1/comfyui/workflow",
              content_type: str = "application/json") -> tuple[int, dict | None, float]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
    started = time.perf_counter()
    conn.request("POST", path, body=body, headers={"X-API-Key": API_KEY, "Content-Type": content_type})
    resp = conn.getresponse()
    raw = resp.read()
    elapsed = time.perf_counter() - started
    conn.close()
    try:
        return resp.status, json.loads(raw), elapsed
    except ValueError:
        return resp.status, None, elapsed


def _chain(n: int) -> dict:
    """EmptyImage -> n-2 ImageInverts -> SaveImage: one long valid graph."""
    graph = {"0": {"class_type": "EmptyImage",
                   "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
    for i in range(1, n - 1):
        graph[str(i)] = {"class_type": "ImageInvert", "inputs": {"image": [str(i - 1), 0]}}
    graph[str(n - 1)] = {"class_type": "SaveImage",
                         "inputs": {"images": [str(n - 2), 0], "filename_prefix": "chain"}}
    return graph


def test_hostile_bodies(world):
    """Nesting 100,000 deep (and 65: refused, ComfyUI's queue would die of
    it), a 9 MB string, an 11 MB body, a 1,000,000-digit integer, 1e999,
    NaN, duplicate keys, invalid UTF-8, a lone surrogate, 10,000-node
    graphs (a chain, which ComfyUI itself then refuses; 5,000 outputs sharing
    one 5,000-node chain with faults, which held the event loop for minutes
    before _check_workflow became linear). Each is answered
    at once with a clear 4xx or normal service; /health never stalls; the
    process stays up and its memory bounded."""
    fake = world.fake(node_delay={"ImageBlur": 0.01})
    service = world.comfymgr(fake.url)
    api = Api(service.base)
    api.wait_backend("up")
    rss_before = service.rss_kib()
    probe = HealthProbe(service.port)
    probe.start()
    answers: dict[str, tuple[int, str | None, float]] = {}

    def expect(name: str, body: bytes, status: int, code: str | None = None) -> dict | None:
        got, envelope, elapsed = _post_raw(service, body)
        answers[name] = (got, (envelope or {}).get("error"), round(elapsed, 3))
        assert got == status, (name, got, envelope)
        if code is not None:
            assert envelope["error"] == code and envelope["statusCode"] == status, (name, envelope)
        assert elapsed < 5.0, (name, elapsed)
        return envelope

    def wrapped(value: str) -> bytes:
        """A good submit whose SaveImage has one more input, holding `value` as written."""
        graph = job_workflow(f"hostile{len(answers)}")
        graph["9"]["inputs"]["note"] = "@@VALUE@@"
        return json.dumps({"workflow": graph}).replace('"@@VALUE@@"', value).encode()

    expect("nested 100000", ("[" * 100_000 + "]" * 100_000).encode(), 400, "invalid_json")
    expect("nested 100000 in a node", wrapped("[" * 100_000 + "]" * 100_000), 400, "invalid_json")
    # body, workflow, node, inputs: 4 levels; the value adds the rest
    deep = expect("nested 65", wrapped('{"a":' * 61 + "1" + "}" * 61), 400, "invalid_json")
    assert deep["details"] == {"limit": 64}
    ok = expect("nested 64", wrapped('{"a":' * 60 + "1" + "}" * 60), 202)
    expect("1,000,000-digit integer", wrapped("9" * 1_000_000), 400, "invalid_json")
    expect("1e999", wrapped("1e999"), 400, "invalid_json")
    expect("-1e999 timeout", b'{"workflow": %s, "timeout": -1e999}' % json.dumps(job_workflow("t")).encode(),
           400, "invalid_json")
    expect("NaN", wrapped("NaN"), 400, "invalid_json")
    expect("4000-digit timeout", b'{"workflow": %s, "timeout": %s}' % (
        json.dumps(job_workflow("t")).encode(), b"9" * 4000), 400, "invalid_request")
    expect("invalid UTF-8", wrapped('"\xff\xfe"').replace(b"\xc3\xbf\xc3\xbe", b"\xff\xfe"), 400, "invalid_json")
    expect("lone surrogate", wrapped('"\\ud800"'), 400, "invalid_json")
    expect("11 MB", wrapped('"' + "x" * 11_000_000 + '"'), 413, "payload_too_large")
    huge = expect("9 MB string", wrapped('"' + "x" * 9_000_000 + '"'), 202)
    dup = expect("duplicate keys", b'{"priority": "low", "workflow": %s, "priority": "high"}'
                 % json.dumps(job_workflow("dup")).encode(), 202)
    assert dup["priority"] == "high"  # the last one wins, as in ComfyUI's own json
    chain = expect("10,000-node chain", json.dumps({"workflow": _chain(10_000)}).encode(), 202)
    shared = _chain(5_000)
    for i in range(1, 4_999):  # blurs that miss their sigma: 4,998 faulty nodes in a chain
        shared[str(i)] = {"class_type": "ImageBlur",
                          "inputs": {"image": [str(i - 1), 0], "blur_radius": 1}}
    for i in range(5_000, 10_000):
        shared[str(i)] = {"class_type": "SaveImage",
                          "inputs": {"images": ["4998", 0], "filename_prefix": f"o{i}"}}
    refused = expect("10,000 nodes, 5,000 outputs on one faulty chain",
                     json.dumps({"workflow": shared}).encode(), 400, "invalid_workflow")
    assert len(refused["details"]["node_errors"]) == 20  # the first faulty nodes, not thousands
    for job in (ok, huge, dup):
        done = api.wait_job(job["workflowId"], timeout=60)
        assert done["status"] == "completed", done
    # ComfyUI validates a graph recursively: a 10,000-deep chain is too deep
    # for it, and the job fails with ComfyUI's own refusal, clearly.
    done = api.wait_job(chain["workflowId"], timeout=120)
    assert (done["status"], done["error"]["code"]) == ("failed", "invalid_workflow"), done
    health = probe.stop()
    rss_after = service.rss_kib()
    record("hostile_bodies", answers=answers, health=health, rss_kib_before=rss_before,
           rss_kib_after=rss_after)
    assert service.alive()
    assert not health["errors"] and set(health["statuses"]) == {200}, health
    assert health["max_ms"] < 1000, health  # never a stall; seconds of parsing would show here
    assert rss_after - rss_before < 400_000, (rss_before, rss_after)


async def test_progress_of_a_10000_node_run_costs_linear_time(make_config):
    """Every `executed` of a 10,000-node run used to re-sum all 10,000 nodes
    on the event loop (10^8 steps for one job, found by the 10,000-node
    abuse); now each message costs the same whatever the graph's size."""
    import comfymgr

    app = comfymgr.create_app(make_config(comfyui_url=f"http://127.0.0.1:{ch.free_port()}",
                                          progress_interval=3600.0))
    backend = app[comfymgr.BRIDGE].backends["local"]
    nodes = [str(i) for i in range(10_000)]
    run = comfymgr._Run(job_id="j", prompt_id="p", priority=1, nodes=frozenset(nodes),
                        timeout_s=None, started=1.0, last_flush=time.time())
    backend.runs["j"] = run
    started = time.perf_counter()
    await backend._on_text(json.dumps({"type": "execution_cached", "data": {"nodes": nodes[:10],
                                                                            "prompt_id": "p"}}))
    for node in nodes[10:]:
        await backend._on_text(json.dumps({"type": "executing", "data": {"node": node, "prompt_id": "p"}}))
        await backend._on_text(json.dumps({"type": "executed", "data": {"node": node, "output": {},
                                                                        "prompt_id": "p"}}))
    elapsed = time.perf_counter() - started
    record("progress_10000_nodes", seconds=round(elapsed, 3))
    assert run.progress == 100.0
    assert elapsed < 5.0, elapsed  # 20,000 messages; the quadratic version took minutes


# -- abuse: connections ---------------------------------------------------------------------------

def _raise_fd_limit(need: int) -> int:
    """Lift this process's soft descriptor limit (comfymgr, started after,
    inherits it); returns how many descriptors may be opened."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_slowloris(world):
    """Many clients send request headers one byte at a time and never finish.
    comfymgr keeps answering /health within the bound and serving the API;
    the connections cost little memory and nothing once gone. (aiohttp
    closes a connection that has not completed a request within its
    keep-alive timeout, 75 s under web.run_app, counted from the connect:
    the long run waits that out and counts the closes.)"""
    import socket

    count = 2000 if LONG else 300
    hold = 85.0 if LONG else 3.0
    count = min(count, _raise_fd_limit(2 * count + 200) // 2 - 100)
    service = world.comfymgr(f"http://127.0.0.1:{ch.free_port()}")
    api = Api(service.base)
    rss_before, fds_before = service.rss_kib(), service.open_fds()
    probe = HealthProbe(service.port)
    probe.start()
    request = b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + API_KEY.encode() + b"\r\nX-Slow: "
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
        sock.setblocking(False)
        sockets.append([sock, 0, None, time.monotonic()])  # bytes sent, closed at, connected at
    started = time.monotonic()
    served_meanwhile = rounds = 0
    during = None  # comfymgr's memory and descriptors with every slow client connected
    while time.monotonic() - started < hold:
        rounds += 1
        for entry in sockets:
            sock, sent, closed, _ = entry
            if closed is not None:
                continue
            try:
                sock.send(request[sent:sent + 1] if sent < len(request) else b"z")
                entry[1] += 1
                if sock.recv(1, socket.MSG_PEEK) == b"":
                    entry[2] = time.monotonic()
            except BlockingIOError:
                pass
            except OSError:
                entry[2] = time.monotonic()
        status, _, _ = api.call("GET", "/v1/status")
        served_meanwhile += status == 200
        if during is None and time.monotonic() - started > min(2.0, hold / 2):
            during = {"rss_kib": service.rss_kib(), "fds": service.open_fds()}
        time.sleep(0.5)
    # How long each lived, from its own connect: the kernel completes a
    # few thousand connects faster than comfymgr accepts them.
    closed_by_server = sorted(round(e[2] - e[3], 1) for e in sockets if e[2] is not None)
    for sock, _, _, _ in sockets:
        sock.close()
    time.sleep(1.0)
    health = probe.stop()
    after = {"rss_kib": service.rss_kib(), "fds": service.open_fds()}
    record("slowloris", sockets=count, held_s=hold, health=health, served_meanwhile=served_meanwhile,
           rss_kib_before=rss_before, fds_before=fds_before, during=during, after=after,
           rounds=rounds, closed_by_server=len(closed_by_server),
           close_s=closed_by_server[::max(1, len(closed_by_server) // 10)])
    assert service.alive() and served_meanwhile == rounds
    assert not health["errors"] and set(health["statuses"]) == {200}, health
    assert health["max_ms"] < HEALTH_BOUND_MS, health
    assert during["fds"] >= fds_before + count * 0.9  # they really were held open
    assert (during["rss_kib"] - rss_before) / count < 64, (rss_before, during)  # KiB per connection
    assert after["fds"] <= fds_before + 5, after
    if LONG:  # every one closed by the server after its keep-alive timeout (75 s)
        assert len(closed_by_server) == count, (len(closed_by_server), count)
        assert 74 <= closed_by_server[0] and closed_by_server[-1] <= 82, closed_by_server[::100]


_KEEPALIVE_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import comfymgr
comfymgr._KEEPALIVE_TIMEOUT = 1.0
sys.exit(comfymgr.main([]))
"""


def test_the_service_closes_a_connection_that_never_completes_a_request(tmp_path):
    """The service as `comfymgr` runs it (not an app in a test client): a
    connection that sends half a request is closed by comfymgr after the
    keep-alive timeout (75 s; 1 s here), not after aiohttp's default hour.
    test_slowloris's long run shows the 75 s with 2,000 such connections."""
    import socket
    import subprocess

    port = ch.free_port()
    env = dict(os.environ, MANAGEMENT_API_PORT=str(port), MANAGEMENT_API_HOST="127.0.0.1",
               MANAGEMENT_API_KEY=API_KEY, COMFYMGR_STATE_DIR=str(tmp_path / "state"),
               COMFYUI_URL=f"http://127.0.0.1:{ch.free_port()}", COMFYMGR_RATE_LIMIT="0")
    proc = subprocess.Popen([sys.executable, "-c", _KEEPALIVE_SCRIPT, str(ROOT)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "comfymgr did not listen"
                time.sleep(0.05)
        with sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sock.settimeout(30)
            assert sock.recv(1024) == b""  # closed by comfymgr, nothing answered
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


async def test_many_idle_websockets(world):
    """2,000 stream clients that never say a word: each costs a few KiB,
    /health stays quick, a job's events reach every one of them and a new
    client, and the memory comes back when they go (twice, to see no leak)."""
    import aiohttp

    count = min(2000, _raise_fd_limit(2200) - 200)  # this process holds the client ends
    if count < 500:
        pytest.skip(f"too few file descriptors here for many sockets ({count + 200})")
    service = world.comfymgr(f"http://127.0.0.1:{ch.free_port()}",
                             env={"COMFYMGR_WS_SEND_QUEUE": "100"})
    api = Api(service.base)
    figures: dict = {"sockets": count, "rss_kib_before": service.rss_kib()}
    probe = HealthProbe(service.port, interval=0.05)
    probe.start()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        url = f"{service.base}/v1/comfyui/stream"
        for round_ in (1, 2):
            started = time.monotonic()
            sockets = []
            for batch in range(0, count, 200):
                sockets += await asyncio.gather(*(
                    http.ws_connect(url, headers={"X-API-Key": API_KEY}, heartbeat=None)
                    for _ in range(batch, min(count, batch + 200))))
            figures[f"connect_s_{round_}"] = round(time.monotonic() - started, 2)
            await asyncio.sleep(0.5)
            figures[f"rss_kib_open_{round_}"] = service.rss_kib()
            status, stream, _ = await asyncio.to_thread(api.call, "GET", "/v1/status")
            assert stream["stream"]["clients"] == count
            late = await http.ws_connect(url, headers={"X-API-Key": API_KEY})
            status, job = await asyncio.to_thread(api.submit, job_workflow(f"idle{round_}"))
            assert status == 202, job

            async def first_event(ws) -> dict:
                while True:
                    message = await ws.receive(timeout=30)
                    data = json.loads(message.data)
                    if data["type"] == "workflow:queued":
                        return data

            started = time.monotonic()
            heard = await asyncio.gather(*(first_event(ws) for ws in [*sockets, late]))
            figures[f"fanout_s_{round_}"] = round(time.monotonic() - started, 2)
            assert {h["workflowId"] for h in heard} == {job["workflowId"]}
            await asyncio.gather(*(ws.close() for ws in [*sockets, late]))
            await asyncio.sleep(1.0)
            figures[f"rss_kib_closed_{round_}"] = service.rss_kib()
    health = await asyncio.to_thread(probe.stop)
    figures["kib_per_socket"] = round(
        (figures["rss_kib_open_1"] - figures["rss_kib_before"]) / count, 1)
    record("many_idle_websockets", health=health, **figures)
    assert service.alive()
    assert not health["errors"] and set(health["statuses"]) == {200}, health
    assert health["max_ms"] < 1000, health  # while 2,000 sockets connect, 200 at a time
    assert figures["kib_per_socket"] < 64, figures
    # No growth from one round to the next: what 2,000 clients took is reused.
    assert figures["rss_kib_closed_2"] - figures["rss_kib_closed_1"] < 0.1 * figures["rss_kib_closed_1"], figures


async def test_hostile_stream_clients(world):
    """The stream, abused: a `since` beyond any seq (it used to pass the
    schema and crash the handler after the upgrade: a 500 written into a
    WebSocket), the same in a subscribe message, invalid UTF-8, a frame over
    the 64 KiB limit, JSON nested past the parser's depth, binary frames, a
    flood. Each gets its documented refusal or close code; comfymgr serves
    on, and never answers 5xx."""
    import aiohttp

    service = world.comfymgr(f"http://127.0.0.1:{ch.free_port()}")
    api = Api(service.base)
    status, job = await asyncio.to_thread(api.submit, job_workflow("streamed"))
    assert status == 202
    headers = {"X-API-Key": API_KEY}
    url = f"{service.base}/v1/comfyui/stream"
    closes: dict[str, int | None] = {}
    async with aiohttp.ClientSession() as http:
        for since in (2**63, 10**30):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{url}?since={since}", headers=headers)
            assert refused.value.status == 400
        async with http.ws_connect(f"{url}?since={2**63 - 1}", headers=headers) as ws:
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_json(timeout=10))["type"] == "pong"

        async def answer(ws) -> dict:
            return json.loads((await ws.receive(timeout=10)).data)

        async with http.ws_connect(url, headers=headers) as ws:
            await ws.send_json({"type": "subscribe", "workflowId": job["workflowId"], "since": 10**30})
            reply = await answer(ws)
            while reply["type"].startswith("workflow:"):
                reply = await answer(ws)
            assert reply["type"] == "error" and reply["code"] == "invalid_message", reply
            await ws.send_str("[" * 30_000 + "]" * 30_000)  # under 64 KiB, past json's depth
            assert (await answer(ws))["code"] == "invalid_message"
            await ws.send_bytes(b"\x00\x01")
            assert (await answer(ws))["code"] == "invalid_message"
            await ws.send_json({"type": "ping"})
            assert (await answer(ws))["type"] == "pong"  # still served
        async with http.ws_connect(url, headers=headers) as ws:
            await ws.send_str("x" * 70_000)
            await ws.receive(timeout=10)
            closes["over 64 KiB"] = ws.close_code
        async with http.ws_connect(url, headers=headers) as ws:
            writer = getattr(ws, "_writer", None)
            if writer is not None:  # aiohttp's client would never send it otherwise
                await writer.send_frame(b'{"type": "\xff"}', aiohttp.WSMsgType.TEXT)
                await ws.receive(timeout=10)
                closes["invalid UTF-8"] = ws.close_code
        async with http.ws_connect(url, headers=headers) as ws:
            for _ in range(100):
                await ws.send_json({"type": "ping"})
            while (await ws.receive(timeout=10)).type not in (aiohttp.WSMsgType.CLOSE,
                                                              aiohttp.WSMsgType.CLOSED):
                pass
            closes["flood"] = ws.close_code
    statuses = await asyncio.to_thread(_status_counts, api)
    record("hostile_stream_clients", closes=closes, http_statuses=statuses)
    assert closes["over 64 KiB"] == 1009 and closes["flood"] == 1008, closes
    assert closes.get("invalid UTF-8", 1007) == 1007, closes
    assert not any(status.startswith("5") for status in statuses), statuses
    assert service.alive() and (await asyncio.to_thread(api.call, "GET", "/health"))[0] == 200


# -- the bridge, where the crash harness pointed ---------------------------------------------------

async def test_preemption_cut_short_requeues_rather_than_loses(make_client, make_config, tmp_path):
    """With prefetch, a more urgent job takes the waiting one back from
    ComfyUI's queue (POST /queue delete), then records it queued again. If
    anything cuts in between (GET /queue failing here; a kill -9 in the long
    crash run, which found it: one `backend_lost` in 85 restarts with a
    ComfyUI that never restarted), reconcile later finds the prompt gone
    from ComfyUI and must not call it lost: comfymgr removed it itself, it
    never ran, it goes back to the queue."""
    import comfymgr
    from fake_comfyui import FakeComfyUI

    fake = FakeComfyUI(output_dir=tmp_path / "comfy" / "output")
    await fake.start()
    try:
        gate = fake.gate("ImageBlur")
        client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0,
                                               reconcile_interval=0.2))
        headers = IN_PROCESS_HEADERS

        async def submit(tag: str, priority: str) -> dict:
            resp = await client.post("/v1/comfyui/workflow", headers=headers,
                                     json={"workflow": job_workflow(tag), "priority": priority})
            assert resp.status == 202
            return await resp.json()

        async def job(job_id: str) -> dict:
            return await (await client.get(f"/v1/comfyui/workflow/{job_id}", headers=headers)).json()

        async def until(predicate, what: str) -> None:
            for _ in range(1000):
                if await predicate():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(what)

        backend = client.app[comfymgr.BRIDGE].backends["local"]
        await until(lambda: _true(backend.up), "backend up")
        running = await submit("pre-running", "normal")
        await until(lambda: _status(job, running["workflowId"], "running"), "first job running")
        waiting = await submit("pre-waiting", "low")
        await until(lambda: _true(backend.waiting_run() is not None), "second job prefetched")
        real_queue = backend.client.queue
        cut = []

        async def queue_failing_once():
            if not cut and fake.queue_delete_ids:  # right after the delete: the cut
                cut.append(True)
                raise comfymgr.BackendError("GET /queue: connection reset")
            return await real_queue()

        backend.client.queue = queue_failing_once
        urgent = await submit("pre-urgent", "high")
        await until(lambda: _true(bool(cut)), "preemption cut short")
        backend.client.queue = real_queue
        await asyncio.sleep(0.6)  # reconciles meanwhile: the waiting job's prompt is gone
        assert (await job(waiting["workflowId"]))["status"] == "queued"
        gate.set()
        for item in (running, urgent, waiting):
            await until(lambda i=item: _status(job, i["workflowId"], "completed", "failed",
                                               "cancelled"), "all end")
        ends = {k: (await job(v["workflowId"]))["status"]
                for k, v in (("running", running), ("urgent", urgent), ("waiting", waiting))}
        assert ends == {"running": "completed", "urgent": "completed", "waiting": "completed"}, ends
        assert all(n == 1 for n in fake.execution_count.values())
    finally:
        await fake.stop()


async def _true(value: bool) -> bool:
    return value


async def _status(job, job_id: str, *statuses: str) -> bool:
    return (await job(job_id))["status"] in statuses
