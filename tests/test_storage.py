"""storage: comfymgr.Storage used directly (synchronous) on a file in tmp_path,
and _Database, the one worker thread that owns the connection for the app."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import threading

import pytest

import comfymgr
from comfymgr import JobState as S
from comfymgr import Priority

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW
WORKFLOW = json.dumps({"1": {"class_type": "EmptyImage", "inputs": {}}})


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "comfymgr.db"


@pytest.fixture
def storage(db_path):
    s = comfymgr.Storage(db_path)
    yield s
    s.close()


def enqueue(s, job_id, priority=NORMAL, target="any", now=1000):
    job, _position = s.enqueue(job_id, WORKFLOW, priority, target, now)
    return job


def all_events(s):
    return s.events_since(0, limit=1_000_000)


def queued_brute_force(s):
    """Every queued job's position computed the slow, obvious way."""
    rows = s._conn.execute("SELECT id, priority, n FROM jobs WHERE state = 'queued'").fetchall()
    order = sorted(rows, key=lambda r: (r["priority"], r["n"]))
    return {row["id"]: index + 1 for index, row in enumerate(order)}


def counts_brute_force(s):
    rows = s._conn.execute("SELECT state, priority, COUNT(*) AS c FROM jobs GROUP BY state, priority")
    return {(S(r["state"]), Priority(r["priority"])): r["c"] for r in rows}


def nonzero(counts):
    return {key: n for key, n in counts.items() if n}


###############################################################################
# schema, pragmas, migrations
###############################################################################


def test_new_database_is_wal_with_busy_timeout_at_the_latest_schema(storage, db_path):
    conn = storage._conn
    assert storage.schema_version == len(comfymgr._MIGRATIONS)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(comfymgr._MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    # journal_mode=WAL is persistent: any other connection sees it too.
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"jobs", "events", "job_counts"} <= tables
    partial = {r["name"]: r["partial"] for r in conn.execute("PRAGMA index_list(jobs)")}
    assert partial["jobs_claim"] == 1 and partial["jobs_queue"] == 1
    assert storage._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert storage.ping() is True


def test_busy_timeout_and_synchronous_are_configurable(db_path):
    s = comfymgr.Storage(db_path, synchronous="normal", busy_timeout_ms=1234)
    try:
        assert s._conn.execute("PRAGMA busy_timeout").fetchone()[0] == 1234
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    finally:
        s.close()


def test_reopening_keeps_the_data_and_does_not_migrate_again(db_path, caplog):
    s = comfymgr.Storage(db_path)
    enqueue(s, "a", HIGH)
    s.close()
    caplog.set_level("INFO", logger="comfymgr.storage")
    s = comfymgr.Storage(db_path)
    try:
        assert s.get("a").priority is HIGH
        assert s.schema_version == len(comfymgr._MIGRATIONS)
        assert "migrating" not in caplog.text
    finally:
        s.close()


def test_a_database_from_a_newer_comfymgr_is_refused_untouched(db_path):
    comfymgr.Storage(db_path).close()
    newer = len(comfymgr._MIGRATIONS) + 1
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {newer}")
    conn.close()
    with pytest.raises(sqlite3.DatabaseError, match="newer than this comfymgr understands"):
        comfymgr.Storage(db_path)
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newer
    finally:
        conn.close()


def test_forward_migrations_run_in_order_and_keep_data(db_path, monkeypatch):
    s = comfymgr.Storage(db_path)
    enqueue(s, "old")
    s.close()
    latest = len(comfymgr._MIGRATIONS)
    v2 = "CREATE TABLE added_in_v2 (x INTEGER);\nINSERT INTO added_in_v2 VALUES (2);"
    v3 = "ALTER TABLE added_in_v2 ADD COLUMN y TEXT;\nUPDATE added_in_v2 SET y = 'three';"
    monkeypatch.setattr(comfymgr, "_MIGRATIONS", comfymgr._MIGRATIONS + (v2, v3))
    s = comfymgr.Storage(db_path)
    try:
        assert s.schema_version == len(comfymgr._MIGRATIONS) == latest + 2
        assert tuple(s._conn.execute("SELECT x, y FROM added_in_v2").fetchone()) == (2, "three")
        assert s.get("old").state is S.QUEUED
    finally:
        s.close()


def test_a_database_of_every_older_version_migrates_to_the_latest(tmp_path, monkeypatch):
    everything = comfymgr._MIGRATIONS
    for version in range(1, len(everything)):
        path = tmp_path / f"v{version}.db"
        monkeypatch.setattr(comfymgr, "_MIGRATIONS", everything[:version])
        comfymgr.Storage(path).close()
        with sqlite3.connect(path) as conn:  # rows as that version wrote them: its columns only
            for n, (job_id, priority) in enumerate((("old", HIGH), ("older-but-low", LOW)), 1):
                conn.execute("INSERT INTO jobs (id, priority, state, status, target, workflow, "
                             "created_at, updated_at) VALUES (?, ?, 'queued', 'queued', 'any', '{}', "
                             "?, ?)", (job_id, int(priority), n, n))
        monkeypatch.setattr(comfymgr, "_MIGRATIONS", everything)
        s = comfymgr.Storage(path)
        try:
            assert s.schema_version == len(everything)
            assert s.position(s.get("old")) == 1
            assert s.claim("local", "p", 2)[0].id == "old"
            assert [j.id for j in s.list_jobs()] == ["older-but-low", "old"]
            assert {j.submitted_by for j in s.list_jobs()} == {"admin"}
            assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            s.close()


def test_a_failing_migration_rolls_back_completely(db_path, monkeypatch):
    comfymgr.Storage(db_path).close()
    broken = "CREATE TABLE half_done (x INTEGER);\nTHIS IS NOT SQL;"
    monkeypatch.setattr(comfymgr, "_MIGRATIONS", comfymgr._MIGRATIONS + (broken,))
    with pytest.raises(sqlite3.OperationalError):
        comfymgr.Storage(db_path)
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(comfymgr._MIGRATIONS) - 1
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchone() is None
    finally:
        conn.close()


def test_claim_and_position_queries_use_the_partial_indexes(storage):
    """EXPLAIN QUERY PLAN of the very statements claim and position run
    (captured with a trace callback): no full scan of jobs anywhere."""
    rng = random.Random(3)
    for i in range(200):
        enqueue(storage, f"j{i}", Priority(rng.randrange(3)), rng.choice(["any", "gpu0", "gpu1"]))
    traced: list[str] = []
    storage._conn.set_trace_callback(traced.append)
    try:
        storage.claim("gpu1", "p-1", 2000)[0]
        storage.position(storage.get("j150"))
        storage.enqueue("new", WORKFLOW, LOW, "any", 3000)
    finally:
        storage._conn.set_trace_callback(None)
    plans = {}
    for sql in dict.fromkeys(traced):
        if sql.split()[0].upper() in ("SELECT", "UPDATE"):
            plans[sql] = [row[3] for row in storage._conn.execute("EXPLAIN QUERY PLAN " + sql)]
    on_jobs = [(sql, step) for sql, steps in plans.items() for step in steps
               if " jobs " in f"{step} "]
    assert on_jobs, plans
    for sql, step in on_jobs:
        assert not step.startswith("SCAN"), (sql, step)
    claim_heads = [s for s in plans if s.startswith("SELECT priority, n FROM jobs")]
    assert len(claim_heads) == 2  # the "any" head and this backend's head
    for sql in claim_heads:
        assert any("INDEX jobs_claim" in step for step in plans[sql]), (sql, plans[sql])
        # The index's order is the queue's order: the head is read, nothing is sorted.
        assert not any("TEMP B-TREE" in step for step in plans[sql]), (sql, plans[sql])
    ahead = [s for s in plans if s.startswith("SELECT COUNT(*) FROM jobs")]
    assert len(ahead) == 1
    assert any("INDEX jobs_queue" in step for step in plans[ahead[0]]), plans[ahead[0]]


###############################################################################
# enqueue, claim, queue order, position
###############################################################################


def test_enqueue_stores_the_job_and_its_queued_event(storage):
    published = []
    storage.on_commit = published.extend
    job, position = storage.enqueue("a", WORKFLOW, HIGH, "gpu0", 1234, timeout_s=60.0,
                                    extra={"client": "x"})
    assert position == 1
    assert storage.get("a") == job
    assert (job.id, job.priority, job.state, job.status, job.target, job.workflow, job.timeout_s,
            job.created_at, job.updated_at, job.attempts, job.extra) == (
        "a", HIGH, S.QUEUED, "queued", "gpu0", WORKFLOW, 60.0, 1234, 1234, 0, {"client": "x"})
    [event] = published
    assert event == comfymgr.Event(1, "a", "workflow:queued", 1234,
                                   {"status": "queued", "priority": "high", "queuePosition": 1})
    assert all_events(storage) == [event]
    _, position = storage.enqueue("b", WORKFLOW, HIGH, "any", 1235)
    assert position == 2
    _, position = storage.enqueue("c", WORKFLOW, LOW, "any", 1236)
    assert position == 3
    _, position = storage.enqueue("d", WORKFLOW, NORMAL, "any", 1237)
    assert position == 3  # ahead of the low one


def test_enqueue_of_a_duplicate_id_changes_nothing(storage):
    enqueue(storage, "a")
    published = []
    storage.on_commit = published.extend
    with pytest.raises(sqlite3.IntegrityError):
        enqueue(storage, "a", HIGH)
    assert published == []
    assert len(all_events(storage)) == 1
    assert nonzero(storage.counts()) == {(S.QUEUED, NORMAL): 1}
    assert storage.get("a").priority is NORMAL


def test_300_mixed_priority_jobs_are_claimed_in_priority_then_fifo_order(storage):
    rng = random.Random(1)
    submitted = []
    for i in range(300):
        priority = Priority(rng.randrange(3))
        job = enqueue(storage, f"job-{i:03}", priority, now=10_000 + i)
        submitted.append((priority, i, job.id))
    expected = [job_id for _, _, job_id in sorted(submitted)]
    assert queued_brute_force(storage) == {job_id: k + 1 for k, job_id in enumerate(expected)}
    for job_id, position in queued_brute_force(storage).items():
        assert storage.position(storage.get(job_id)) == position
    claimed = []
    while (job := storage.claim("local", f"prompt-{len(claimed)}", 20_000)[0]) is not None:
        assert (job.state, job.backend, job.prompt_id, job.attempts, job.updated_at) == (
            S.DISPATCHING, "local", f"prompt-{len(claimed)}", 1, 20_000)
        claimed.append(job.id)
    assert claimed == expected
    assert storage.position(storage.get(expected[0])) is None
    assert nonzero(storage.counts()) == nonzero(counts_brute_force(storage))


def test_a_claim_on_an_empty_queue_returns_none_and_leaves_no_transaction(storage):
    assert storage.claim("local", "p", 1)[0] is None
    assert not storage._conn.in_transaction
    enqueue(storage, "a")
    assert storage.claim("local", "p", 2)[0].id == "a"


def test_targeted_jobs_are_claimed_only_by_their_backend(storage):
    rng = random.Random(5)
    targets = ["any", "gpu0", "gpu1"]
    for i in range(150):
        enqueue(storage, f"j{i}", Priority(rng.randrange(3)), rng.choice(targets), now=i)
    rows = {r["id"]: (r["priority"], r["n"], r["target"])
            for r in storage._conn.execute("SELECT id, priority, n, target FROM jobs")}
    remaining = set(rows)
    claimed_by = {"gpu0": [], "gpu1": []}
    while remaining:
        backend = rng.choice(["gpu0", "gpu1"])
        eligible = [j for j in remaining if rows[j][2] in ("any", backend)]
        job = storage.claim(backend, f"p{len(remaining)}", 1000)[0]
        if not eligible:
            assert job is None
            continue
        # Exactly the head of what this backend may run: priority, then age.
        assert job.id == min(eligible, key=lambda j: rows[j][:2])
        assert job.target in ("any", backend) and job.backend == backend
        claimed_by[backend].append(job.id)
        remaining.discard(job.id)
    assert all(rows[j][2] != "gpu1" for j in claimed_by["gpu0"])
    assert all(rows[j][2] != "gpu0" for j in claimed_by["gpu1"])
    assert storage.claim("gpu0", "p", 1)[0] is None


def test_a_backend_never_claims_another_backends_jobs(storage):
    enqueue(storage, "for-gpu1", HIGH, "gpu1")
    assert storage.claim("gpu0", "p", 1)[0] is None
    assert storage.claim("local", "p", 1)[0] is None
    assert storage.get("for-gpu1").state is S.QUEUED
    assert storage.claim("gpu1", "p", 1)[0].id == "for-gpu1"


def test_position_is_right_for_every_queued_job_after_random_cancels_and_claims(storage):
    rng = random.Random(11)
    n = 0
    for round_ in range(12):
        for _ in range(25):
            job_id = f"j{n}"
            n += 1
            job, position = storage.enqueue(job_id, WORKFLOW, Priority(rng.randrange(3)),
                                            rng.choice(["any", "gpu0"]), n)
            assert position == queued_brute_force(storage)[job_id]
        for _ in range(10):
            queued = list(queued_brute_force(storage))
            op = rng.random()
            if op < 0.45 and queued:
                storage.request_cancel(rng.choice(queued), n)
            elif op < 0.9:
                storage.claim(rng.choice(["gpu0", "gpu1"]), f"p{n}", n)[0]
            elif queued:
                # a claimed job that goes back to the queue keeps its place
                in_flight = storage.in_flight()
                if in_flight:
                    storage._transition(rng.choice(in_flight).id, S.QUEUED, n)
        expected = queued_brute_force(storage)
        assert expected, "the test should keep some jobs queued"
        actual = {job_id: storage.position(storage.get(job_id)) for job_id in expected}
        assert actual == expected, f"round {round_}"
        # positions(): the same answer for any subset of jobs, queued or not, in any order.
        everyone = storage.list_jobs(limit=10_000)
        assert storage.positions(everyone) == expected
        subset = rng.sample(everyone, len(everyone) // 3)
        assert storage.positions(subset) == {j.id: expected[j.id] for j in subset if j.id in expected}
        assert nonzero(storage.counts()) == nonzero(counts_brute_force(storage))
    not_queued = storage._conn.execute("SELECT id FROM jobs WHERE state != 'queued'").fetchall()
    assert not_queued
    for row in not_queued:
        job = storage.get(row["id"])
        assert storage.position(job) is None


###############################################################################
# transitions
###############################################################################

EXPECTED_ALLOWED = {
    S.QUEUED: {S.DISPATCHING, S.CANCELLED, S.FAILED},
    S.DISPATCHING: {S.SUBMITTED, S.RUNNING, S.QUEUED, S.COMPLETED, S.FAILED, S.CANCELLED},
    S.SUBMITTED: {S.RUNNING, S.QUEUED, S.COMPLETED, S.FAILED, S.CANCELLED},
    S.RUNNING: {S.QUEUED, S.COMPLETED, S.FAILED, S.CANCELLED},
    S.COMPLETED: set(), S.FAILED: set(), S.CANCELLED: set(),
}
# How a fresh job reaches each state, through allowed moves only.
PATH_TO = {
    S.QUEUED: [], S.DISPATCHING: [S.DISPATCHING], S.SUBMITTED: [S.DISPATCHING, S.SUBMITTED],
    S.RUNNING: [S.DISPATCHING, S.RUNNING], S.COMPLETED: [S.DISPATCHING, S.RUNNING, S.COMPLETED],
    S.FAILED: [S.FAILED], S.CANCELLED: [S.CANCELLED],
}
EVENT_FOR = {S.QUEUED: "workflow:queued", S.RUNNING: "workflow:started",
             S.COMPLETED: "workflow:completed", S.FAILED: "workflow:error",
             S.CANCELLED: "workflow:cancelled"}


def test_positions_across_many_queue_blocks_match_the_brute_force(storage):
    """Deep queues: positions sum per-block counts (comfymgr._QUEUE_BLOCK jobs
    a block) and count within blocks; compare with counting every job."""
    rng = random.Random(11)
    block = comfymgr._QUEUE_BLOCK
    total = 3 * block + 777
    ops = [lambda i=i: storage.enqueue(f"j{i}", WORKFLOW, rng.choice([HIGH, NORMAL, NORMAL, LOW]),
                                        "any", 1000) for i in range(total)]
    assert all(ok for ok, _ in storage.run_batch(ops))
    for i in rng.sample(range(total), 2000):
        storage.request_cancel(f"j{i}", 2000)
    for k in range(300):
        storage.claim("local", f"p{k}", 3000)[0]
    expected = queued_brute_force(storage)
    sample = rng.sample(sorted(expected), 300)
    for job_id in sample:
        assert storage.position(storage.get(job_id)) == expected[job_id], job_id
    jobs = [storage.get(job_id) for job_id in sample]
    assert storage.positions(jobs) == {job_id: expected[job_id] for job_id in sample}
    blocks = storage._conn.execute(
        "SELECT priority, block, n FROM queue_blocks WHERE n != 0 ORDER BY 1, 2").fetchall()
    brute = storage._conn.execute(
        f"SELECT priority, n / {block}, COUNT(*) FROM jobs WHERE state = 'queued' "
        "GROUP BY 1, 2 ORDER BY 1, 2").fetchall()
    assert [tuple(r) for r in blocks] == [tuple(r) for r in brute]


def test_the_queue_blocks_migration_counts_the_jobs_already_queued(db_path, monkeypatch):
    monkeypatch.setattr(comfymgr, "_MIGRATIONS", comfymgr._MIGRATIONS[:3])
    comfymgr.Storage(db_path).close()
    with sqlite3.connect(db_path) as conn:  # rows as schema 3 wrote them
        for i in range(50):
            conn.execute("INSERT INTO jobs (id, priority, state, status, target, workflow, created_at, "
                         "updated_at) VALUES (?, ?, ?, ?, 'any', ?, 1000, 1000)",
                         (f"j{i}", int([HIGH, NORMAL, LOW][i % 3]), *(("cancelled",) * 2 if i == 4
                                                                     else ("queued",) * 2), WORKFLOW))
    monkeypatch.undo()
    new = comfymgr.Storage(db_path)
    assert new.schema_version == len(comfymgr._MIGRATIONS)
    expected = queued_brute_force(new)
    for job_id, position in expected.items():
        assert new.position(new.get(job_id)) == position
    new.close()


def test_the_transition_table_is_the_designed_one():
    """A change to _ALLOWED must be a conscious one: update this table too."""
    assert {k: set(v) for k, v in comfymgr._ALLOWED.items()} == EXPECTED_ALLOWED
    assert set(comfymgr._ALLOWED) == set(S)
    assert comfymgr._EVENT_FOR_STATE == EVENT_FOR


def job_in(storage, state, job_id="j"):
    enqueue(storage, "ahead", NORMAL)  # so a re-queued job has a position > 1
    enqueue(storage, job_id, NORMAL)
    for step in PATH_TO[state]:
        storage._transition(job_id, step, 1500)
    assert storage.get(job_id).state is state
    return storage.get(job_id)


@pytest.mark.parametrize("to", list(S), ids=lambda s: s.value)
@pytest.mark.parametrize("from_", list(S), ids=lambda s: s.value)
def test_every_transition_is_allowed_or_refused_by_the_table(storage, from_, to):
    before = job_in(storage, from_)
    events_before = all_events(storage)
    published = []
    storage.on_commit = published.extend
    if to in comfymgr._ALLOWED[from_]:
        job = storage._transition("j", to, 2000, expect=[from_])
        assert (job.state, job.status, job.updated_at) == (to, comfymgr._PUBLIC_STATUS[to], 2000)
        assert storage.get("j") == job
        new = all_events(storage)[len(events_before):]
        assert published == new
        if to in EVENT_FOR:
            [event] = new
            data = {"status": comfymgr._PUBLIC_STATUS[to]}
            if to is S.QUEUED:
                data.update(priority="normal", queuePosition=2)
            assert (event.job_id, event.type, event.ts, event.data) == ("j", EVENT_FOR[to], 2000, data)
        else:
            assert new == []
    else:
        with pytest.raises(comfymgr.InvalidTransition) as raised:
            storage._transition("j", to, 2000)
        err = raised.value
        assert comfymgr._storage_api_error(err).envelope() == {
            "error": "invalid_transition",
            "message": f"workflow j is {from_.value}; it cannot become {to.value}",
            "statusCode": 409,
            "details": {"workflowId": "j", "state": from_.value, "to": to.value}}
        assert storage.get("j") == before
        assert all_events(storage) == events_before
        assert published == []
        assert not storage._conn.in_transaction


def test_transition_refuses_a_move_the_caller_did_not_expect(storage):
    job_in(storage, S.RUNNING)
    with pytest.raises(comfymgr.InvalidTransition):
        storage._transition("j", S.COMPLETED, 2000, expect=[S.SUBMITTED])
    assert storage.get("j").state is S.RUNNING


def test_transition_writes_fields_and_refuses_unknown_ones(storage):
    job_in(storage, S.RUNNING)
    with pytest.raises(TypeError, match="not job columns"):
        storage._transition("j", S.COMPLETED, 2000, state="completed")
    outputs = [{"filename": "a.png", "subfolder": "", "type": "output"}]
    job = storage._transition("j", S.COMPLETED, 2000, completed_at=2000, outputs=outputs,
                             progress=100.0, event={"outputs": outputs})
    assert (job.completed_at, job.outputs, job.progress) == (2000, outputs, 100.0)
    assert all_events(storage)[-1].data == {"status": "completed", "outputs": outputs}
    with pytest.raises(comfymgr.JobNotFound):
        storage._transition("missing", S.CANCELLED, 1)


###############################################################################
# cancel, progress, in-flight, lists
###############################################################################


def test_request_cancel_ends_a_queued_job_and_marks_an_in_flight_one(storage):
    enqueue(storage, "q")
    enqueue(storage, "f")
    storage.claim("local", "p-1", 1100)[0]  # takes "q"
    storage._transition("q", S.QUEUED, 1150)  # back: "q" is first again
    storage.claim("local", "p-2", 1200)[0]
    assert storage.get("q").state is S.DISPATCHING
    published = []
    storage.on_commit = published.extend
    job = storage.request_cancel("f", 1300)
    assert (job.state, job.completed_at, job.error) == (
        S.CANCELLED, 1300, {"code": "cancelled", "message": "cancelled by request"})
    assert [(e.job_id, e.type, e.data) for e in published] == [
        ("f", "workflow:cancelled", {"status": "cancelled", "reason": "cancelled by request"})]
    published.clear()
    job = storage.request_cancel("q", 1400)
    assert (job.state, job.cancel_requested_at, job.updated_at) == (S.DISPATCHING, 1400, 1400)
    assert storage.get("q").cancel_requested_at == 1400
    assert published == []
    assert storage.request_cancel("q", 1500).cancel_requested_at == 1400  # first mark kept
    with pytest.raises(comfymgr.NotCancellable) as raised:
        storage.request_cancel("f", 1600)
    assert comfymgr._storage_api_error(raised.value).envelope() == {
        "error": "not_cancellable",
        "message": "workflow f already cancelled; there is nothing to cancel",
        "statusCode": 409, "details": {"workflowId": "f", "status": "cancelled"}}
    with pytest.raises(comfymgr.JobNotFound):
        storage.request_cancel("missing", 1)


def test_set_progress_only_touches_running_jobs(storage):
    job_in(storage, S.RUNNING)
    assert storage.set_progress("j", 40.0, "3", 2000, emit=False) is None
    assert (storage.get("j").progress, storage.get("j").current_node) == (40.0, "3")
    event = storage.set_progress("j", 50.0, "4", 2100, emit=True)
    assert (event.type, event.data) == ("workflow:progress",
                                        {"status": "running", "progress": 50.0, "currentNode": "4"})
    assert storage.set_progress("ahead", 10.0, "1", 2200, emit=True) is None  # queued
    assert storage.get("ahead").progress == 0


def test_in_flight_lists_handed_over_jobs_by_backend(storage):
    for i in range(4):
        enqueue(storage, f"j{i}")
    storage.claim("gpu0", "p0", 1)[0]
    storage.claim("gpu1", "p1", 1)[0]
    storage.claim("gpu0", "p2", 1)[0]
    storage._transition("j2", S.RUNNING, 2)
    assert [j.id for j in storage.in_flight()] == ["j0", "j1", "j2"]
    assert [j.id for j in storage.in_flight("gpu0")] == ["j0", "j2"]
    assert storage.get("j1").prompt_id == "p1"


def test_list_jobs_newest_first_with_filters_and_keyset_cursor(storage):
    for i in range(10):
        enqueue(storage, f"j{i}", Priority(i % 3))
    storage.request_cancel("j4", 5)
    assert [j.id for j in storage.list_jobs()] == [f"j{i}" for i in range(9, -1, -1)]
    assert [j.id for j in storage.list_jobs(limit=3)] == ["j9", "j8", "j7"]
    assert [j.id for j in storage.list_jobs(statuses=["cancelled"])] == ["j4"]
    assert [j.id for j in storage.list_jobs(priority=HIGH)] == ["j9", "j6", "j3", "j0"]
    assert [j.id for j in storage.list_jobs(statuses=["queued"], priority=NORMAL)] == ["j7", "j1"]
    cursor = storage.get("j6").n
    assert [j.id for j in storage.list_jobs(before=cursor, limit=2)] == ["j5", "j4"]


def test_counts_follow_every_change(storage):
    for i in range(6):
        enqueue(storage, f"j{i}", Priority(i % 3))
    storage.claim("local", "p", 1)[0]
    storage.request_cancel("j1", 2)
    storage._transition("j0", S.RUNNING, 3)
    storage._transition("j0", S.COMPLETED, 4)
    assert nonzero(storage.counts()) == {
        (S.COMPLETED, HIGH): 1, (S.CANCELLED, NORMAL): 1, (S.QUEUED, LOW): 2,
        (S.QUEUED, HIGH): 1, (S.QUEUED, NORMAL): 1}
    assert nonzero(storage.counts()) == nonzero(counts_brute_force(storage))


###############################################################################
# events
###############################################################################


def test_events_since_and_event_bounds(storage):
    assert storage.event_bounds() == (0, 0)
    assert storage.events_since(0) == []
    for i in range(5):
        enqueue(storage, f"j{i}")
    storage.request_cancel("j1", 2000)
    events = all_events(storage)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert [(e.job_id, e.type) for e in events][-1] == ("j1", "workflow:cancelled")
    assert storage.event_bounds() == (1, 6)
    assert [e.seq for e in storage.events_since(2, limit=2)] == [3, 4]
    assert [e.seq for e in storage.events_since(0, job_ids=["j1"])] == [2, 6]
    assert storage.events_since(6) == []
    assert events[0].message() == {"type": "workflow:queued", "seq": 1, "workflowId": "j0",
                                   "timestamp": 1000, "status": "queued", "priority": "normal",
                                   "queuePosition": 1}
    # Retention drops the oldest rows; the sequence is never reused.
    storage._conn.execute("DELETE FROM events WHERE seq <= 3")
    assert storage.event_bounds() == (4, 6)
    storage._conn.execute("DELETE FROM events")
    assert storage.event_bounds() == (0, 6)
    enqueue(storage, "later")
    assert [e.seq for e in all_events(storage)] == [7]


###############################################################################
# transactions and batches
###############################################################################


def test_run_batch_keeps_the_good_ops_and_publishes_after_commit_in_seq_order(storage, db_path):
    enqueue(storage, "existing")
    storage.request_cancel("existing", 1)
    seen_at_commit = []

    def on_commit(events):
        # Called after COMMIT: another connection already sees the rows.
        assert not storage._conn.in_transaction
        other = sqlite3.connect(db_path)
        try:
            seen_at_commit.append(sorted(r[0] for r in other.execute(
                "SELECT id FROM jobs WHERE id IN ('a', 'b', 'c')")))
        finally:
            other.close()
        published.append(list(events))

    published: list[list[comfymgr.Event]] = []
    storage.on_commit = on_commit

    def half_done():
        storage.enqueue("b", WORKFLOW, HIGH, "any", 2)
        raise RuntimeError("boom after the insert")

    outcomes = storage.run_batch([
        lambda: storage.enqueue("a", WORKFLOW, LOW, "any", 2),
        lambda: storage._transition("existing", S.RUNNING, 2),
        half_done,
        lambda: storage.enqueue("c", WORKFLOW, HIGH, "any", 2),
    ])
    assert [ok for ok, _ in outcomes] == [True, False, False, True]
    assert outcomes[0][1][1] == 1 and outcomes[3][1][1] == 1  # positions
    assert isinstance(outcomes[1][1], comfymgr.InvalidTransition)
    assert isinstance(outcomes[2][1], RuntimeError)
    assert storage.get("a") is not None and storage.get("c") is not None
    assert storage.get("b") is None
    assert storage.get("existing").state is S.CANCELLED
    assert seen_at_commit == [["a", "c"]]
    [events] = published  # one commit, one hand-over
    assert [(e.job_id, e.type) for e in events] == [("a", "workflow:queued"), ("c", "workflow:queued")]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert events == [e for e in all_events(storage) if e.job_id in ("a", "c")]
    assert "b" not in {e.job_id for e in all_events(storage)}
    assert nonzero(storage.counts()) == nonzero(counts_brute_force(storage))


def test_an_exception_rolls_the_transaction_back_and_drops_its_events(storage):
    published = []
    storage.on_commit = published.extend
    with pytest.raises(RuntimeError), storage.transaction():
        storage.enqueue("a", WORKFLOW, NORMAL, "any", 1)
        raise RuntimeError("boom")
    assert storage.get("a") is None
    assert published == [] and all_events(storage) == []
    assert nonzero(storage.counts()) == {}
    enqueue(storage, "b")
    assert [e.job_id for e in published] == ["b"]


def test_a_locked_database_fails_cleanly_after_busy_timeout(db_path):
    s = comfymgr.Storage(db_path, busy_timeout_ms=50)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            enqueue(s, "a")
        other.execute("ROLLBACK")
        assert not s._conn.in_transaction and s._depth == 0
        enqueue(s, "b")
        assert [j.id for j in s.list_jobs()] == ["b"]
        assert [e.job_id for e in all_events(s)] == ["b"]
    finally:
        other.close()
        s.close()


###############################################################################
# _Database: the one thread that owns the connection
###############################################################################


async def test_database_worker_owns_the_connection_and_group_commits(tmp_path):
    delivered: list[comfymgr.Event] = []
    db = comfymgr._Database(tmp_path / "db.sqlite", synchronous="normal",
                            on_events=delivered.extend)
    await db.start()
    try:
        def submit(i):
            def op(s):
                _job, position = s.enqueue(f"j{i:02}", WORKFLOW, NORMAL, "any", i)
                return threading.current_thread(), position
            return op

        results = await asyncio.gather(*(db.write(submit(i)) for i in range(50)))
        threads = {thread for thread, _ in results}
        assert len(threads) == 1 and threads.pop().name == "comfymgr-db"
        assert threading.current_thread().name != "comfymgr-db"
        assert sorted(position for _, position in results) == list(range(1, 51))
        assert [e.seq for e in delivered] == list(range(1, 51))
        reader = await db.read(lambda s: threading.current_thread().name)
        assert reader == "comfymgr-db"
        # Events of a commit are delivered before the writer's future resolves.
        await db.write(lambda s: s.enqueue("last", WORKFLOW, HIGH, "any", 99))
        assert delivered[-1].job_id == "last"
    finally:
        await db.close()
    with pytest.raises(comfymgr.StorageUnavailable):
        await db.read(lambda s: s.ping())


async def test_database_worker_isolates_a_failing_write_and_reports_sqlite_errors(tmp_path):
    db = comfymgr._Database(tmp_path / "db.sqlite", synchronous="normal", on_events=lambda e: None)
    await db.start()
    try:
        ok1, bad, sql_error, ok2 = await asyncio.gather(
            db.write(lambda s: s.enqueue("a", WORKFLOW, NORMAL, "any", 1)),
            db.write(lambda s: s.request_cancel("missing", 1)),
            db.write(lambda s: s._conn.execute("INSERT INTO no_such_table VALUES (1)")),
            db.write(lambda s: s.enqueue("b", WORKFLOW, NORMAL, "any", 1)),
            return_exceptions=True)
        assert ok1[1] == 1 and ok2[1] == 2
        assert isinstance(bad, comfymgr.JobNotFound)
        assert isinstance(sql_error, comfymgr.StorageUnavailable)
        assert sql_error.envelope() == {
            "error": "storage_unavailable",
            "message": "the database cannot be written right now; nothing was changed, try again",
            "statusCode": 503, "details": {"reason": "no such table: no_such_table"}}
        assert await db.read(lambda s: [j.id for j in s.list_jobs()]) == ["b", "a"]
        with pytest.raises(comfymgr.StorageUnavailable):
            await db.write(lambda s: s._conn.execute("INSERT INTO no_such_table VALUES (1)"))
        assert db.last_error == "OperationalError: no such table: no_such_table"
        await db.read(lambda s: s.ping())
        assert db.last_error is None  # a later success clears it
    finally:
        await db.close()
