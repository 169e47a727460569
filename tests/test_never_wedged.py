"""Never wedged: one bad answer, one slow answer or one bad job must not
stop a backend, run a prompt twice, or leave a job in flight forever. One
test per case found in review (issue "never wedged", cases 1-12), each with
the scenario that showed it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from test_bridge import (
    free_port,
    get_job,
    slow_workflow,
    status_is,
    submit,
    unique,
    wait_backends_up,
    wait_job,
)

import comfymgr
from conftest import API_KEY, HEADERS, ROOT, workflow
from fake_comfyui import FakeComfyUI


@pytest.fixture
def config(make_config, fake):
    def make(**overrides):
        values = dict(comfyui_url=fake.url, progress_interval=0.0, reconcile_interval=0.1,
                      backend_timeout=0.5)
        values.update(overrides)
        return make_config(**values)

    return make


def marked(tag):
    """A simple workflow whose SaveImage prefix says which job it is."""
    return unique(workflow("simple"), tag)


def prefix_of(body):
    return next(node["inputs"]["filename_prefix"] for node in body["prompt"].values()
                if node["class_type"] == "SaveImage")


async def status_of(client):
    return await (await client.get("/v1/status", headers=HEADERS)).json()


async def until(predicate, timeout=15.0):
    async def poll():
        while not await predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


# -- 1. dispatch without a cap or back-off ------------------------------------------------

async def test_1_a_refused_post_fails_its_job_after_the_attempts_and_the_next_runs(
        make_client, config, fake):
    refused = []

    def proxy(body):  # an auth plug-in or proxy refusing one job's request
        if prefix_of(body).endswith("_toolarge"):
            refused.append(body["prompt_id"])
            return 413, {"error": "Request Entity Too Large"}
        return None

    fake.prompt_answer = proxy
    client = await make_client(config())
    await wait_backends_up(client)
    bad = await submit(client, marked("toolarge"))
    good = await submit(client, marked("fine"))
    done = await wait_job(client, bad["workflowId"], status_is("failed", "completed"))
    assert done["status"] == "failed"
    assert done["error"] == {
        "code": "dispatch_failed",
        "message": "ComfyUI local refused the prompt 3 times; the last answer was HTTP 413",
        "status": 413, "excerpt": '{"error": "Request Entity Too Large"}'}
    assert done["attempts"] == 3 and len(refused) == 3 and len(set(refused)) == 3
    assert (await wait_job(client, good["workflowId"], status_is("completed")))["status"] == "completed"
    text = await (await client.get("/metrics")).text()
    assert 'comfymgr_dispatch_failures_total{backend="local"} 3.0' in text


async def test_1_posts_that_cannot_connect_back_off_exponentially(make_client, config, fake):
    client = await make_client(config(dispatch_attempts=100))
    await wait_backends_up(client)
    backend = client.app[comfymgr.BRIDGE].backends["local"]
    tries = []
    real_post = backend.client.post_prompt

    async def emfile(*args, **kwargs):  # the socket for the POST cannot be made; the WS lives
        tries.append(asyncio.get_running_loop().time())
        if len(tries) <= 5:
            raise comfymgr.BackendError("cannot connect: [Errno 24] Too many open files", sent=False)
        return await real_post(*args, **kwargs)

    backend.client.post_prompt = emfile
    job = await submit(client, marked("emfile"))
    done = await wait_job(client, job["workflowId"], status_is("completed", "failed"), timeout=30)
    assert done["status"] == "completed" and len(tries) == 6
    # Each wait at least half the doubling delay (jitter 0.5-1.0): 0.25, 0.5, 1, 2, 4 s.
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert all(gap >= 0.5 * comfymgr._BACKOFF_BASE * 2 ** (n + 1) for n, gap in enumerate(gaps)), gaps
    events = await client.app[comfymgr.DB].read(lambda s: s.events_since(0, job_ids=[job["workflowId"]]))
    assert [e.type for e in events].count("workflow:queued") == 6  # five returns, not hundreds


# -- 2. a lost answer never runs a prompt twice --------------------------------------------

async def test_2_a_post_answered_after_the_timeout_runs_once(make_client, config, fake):
    fake.validation_delays = [1.5]  # the first POST validates longer than the 0.5 s timeout
    client = await make_client(config(backend_timeout=0.5))
    await wait_backends_up(client)
    job = await submit(client, marked("slowvalidation"))
    done = await wait_job(client, job["workflowId"], status_is("completed", "failed"), timeout=30)
    assert done["status"] == "completed", done
    assert len(fake.posted_prompt_ids) == 1
    assert fake.execution_count == {done["promptId"]: 1}
    assert done["attempts"] == 1


async def test_2_the_grace_for_a_post_cut_short_by_a_crash_runs_from_the_claim(make_client, config,
                                                                                 fake, clock, tmp_path):
    """A kill between the claim and the POST leaves the row `dispatching`
    with a prompt ComfyUI never got. The grace before it is judged never
    received runs from the claim: comfymgr restarting more often than the
    grace (a crash loop under systemd) must not keep the backend idle for good."""
    state = tmp_path / "state"
    state.mkdir()
    storage = comfymgr.Storage(state / "comfymgr.db")
    storage.enqueue("cut-short", json.dumps(marked("cutshort")), comfymgr.Priority.NORMAL, "any",
                    comfymgr._ms(clock()))
    claimed_at = clock()
    storage.claim("local", "never-posted", comfymgr._ms(claimed_at))
    storage.close()
    clock.advance(1.0)  # restarted 1 s after the claim; the grace is 3 x 0.5 s
    client = await make_client(config(backend_timeout=0.5, reconcile_interval=3600.0), clock=clock)
    await wait_backends_up(client)
    backend = client.app[comfymgr.BRIDGE].backends["local"]
    await backend.reconcile()
    assert (await get_job(client, "cut-short"))["state"] == "dispatching"
    clock.advance(0.6)  # 1.6 s after the claim, 0.6 s after this start
    await backend.reconcile()
    done = await wait_job(client, "cut-short", status_is("completed"))
    assert done["promptId"] != "never-posted" and done["attempts"] == 2
    assert fake.posted_prompt_ids == [done["promptId"]]


# -- 3. a ComfyUI that mints its own prompt ids ---------------------------------------------

async def test_3_a_server_ignoring_client_prompt_ids_is_followed_then_marked_incompatible(
        make_client, config, fake):
    fake.honour_prompt_id = False
    client = await make_client(config())
    await wait_backends_up(client)
    first = await submit(client, marked("own_id"))
    done = await wait_job(client, first["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "completed", done
    assert done["promptId"] == fake.posted_prompt_ids[0]  # ComfyUI's id, followed
    assert fake.execution_count == {done["promptId"]: 1}
    [backend] = (await status_of(client))["backends"]
    assert backend["state"] == "incompatible"
    assert "ignores the prompt_id comfymgr sends" in backend["lastError"]
    second = await submit(client, marked("second"))
    await asyncio.sleep(0.5)
    assert (await get_job(client, second["workflowId"]))["state"] == "queued"
    assert len(fake.posted_prompt_ids) == 1


# -- 4. timeouts and cancels while the backend hangs or is down -----------------------------

async def test_4_cancel_grace_runs_while_the_backend_is_down(make_client, config, fake, clock):
    fake.gate("ImageBlur")
    client = await make_client(config(cancel_grace=30.0, backend_lost_after=3600.0), clock=clock)
    await wait_backends_up(client)
    job = await submit(client, slow_workflow())
    running = await wait_job(client, job["workflowId"], status_is("running"))
    await fake.wait_for_gated(running["promptId"], "10")
    await fake.stop()  # gone before the cancel
    backend = client.app[comfymgr.BRIDGE].backends["local"]
    await until(lambda: _false(backend.up))
    resp = await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    assert resp.status == 202
    clock.advance(29)
    await backend.tick()
    assert (await get_job(client, job["workflowId"]))["status"] == "running"
    clock.advance(2)
    await backend.tick()
    done = await get_job(client, job["workflowId"])
    assert done["status"] == "cancelled"
    assert done["error"]["message"] == ("cancelled by request; ComfyUI did not confirm the "
                                        "interrupt within 30 s")
    assert running["promptId"] in backend.abandoned


async def test_4_timeout_fires_while_the_backend_hangs(make_client, config, fake, clock):
    fake.gate("ImageBlur")
    client = await make_client(config(cancel_grace=10.0, backend_timeout=0.3,
                                      backend_lost_after=3600.0), clock=clock)
    await wait_backends_up(client)
    job = await submit(client, slow_workflow(), timeout=5)
    running = await wait_job(client, job["workflowId"], status_is("running"))
    await fake.wait_for_gated(running["promptId"], "10")
    fake.mode = "hang"
    backend = client.app[comfymgr.BRIDGE].backends["local"]
    clock.advance(6)
    await backend.tick()  # asks ComfyUI to interrupt: no answer within the timeout
    assert (await get_job(client, job["workflowId"]))["status"] == "running"
    clock.advance(11)
    await backend.tick()
    done = await get_job(client, job["workflowId"])
    assert done["status"] == "failed"
    assert done["error"] == {"code": "timeout", "message": "ran longer than its 5 s timeout; "
                             "ComfyUI did not confirm the interrupt within 10 s"}
    fake.mode = "ok"
    # A late answer from ComfyUI cannot reopen it.
    fake.ungate("ImageBlur")
    await asyncio.sleep(0.5)
    assert (await get_job(client, job["workflowId"]))["status"] == "failed"


async def _queued(client, job_id):
    return (await get_job(client, job_id))["state"] == "queued"


async def _false(value):
    return not value


# -- 5. a prompt that finished meanwhile is not reported cancelled --------------------------

async def test_5_cancel_of_a_waiting_prompt_that_finished_meanwhile_completes(make_client, config, fake):
    gate = fake.gate("ImageBlur")
    client = await make_client(config())
    await wait_backends_up(client)
    first = await submit(client, slow_workflow())
    running = await wait_job(client, first["workflowId"], status_is("running"))
    await fake.wait_for_gated(running["promptId"], "10")
    second = await submit(client, marked("waiting"))
    backend = client.app[comfymgr.BRIDGE].backends["local"]
    await until(lambda: _true(backend.waiting_run() is not None))
    waiting = await get_job(client, second["workflowId"])

    async def runs_first(ids):  # the delete arrives after the prompt ran to its end
        gate.set()
        await fake.wait_until(lambda: waiting["promptId"] in fake._queue.history)

    fake.before_queue_delete = runs_first
    resp = await client.delete(f"/v1/comfyui/workflow/{second['workflowId']}", headers=HEADERS)
    assert resp.status == 409
    assert (await resp.json())["error"] == "not_cancellable"
    done = await get_job(client, second["workflowId"])
    assert done["status"] == "completed" and done["outputs"], done


async def _true(value):
    return value


# -- 6. the jobs-cancel route on a prompt waiting in ComfyUI's queue -------------------------

async def test_6_jobs_cancel_route_on_a_waiting_prompt_says_cancelled_by_request(
        make_client, make_config, tmp_path):
    fake = FakeComfyUI(output_dir=tmp_path / "jc" / "output", supports_jobs_cancel=True)
    await fake.start()
    try:
        gate = fake.gate("ImageBlur")
        client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0,
                                               reconcile_interval=0.1))
        await wait_backends_up(client)
        first = await submit(client, slow_workflow())
        running = await wait_job(client, first["workflowId"], status_is("running"))
        await fake.wait_for_gated(running["promptId"], "10")
        second = await submit(client, marked("queued_in_comfyui"))
        backend = client.app[comfymgr.BRIDGE].backends["local"]
        await until(lambda: _true(backend.waiting_run() is not None))
        resp = await client.delete(f"/v1/comfyui/workflow/{second['workflowId']}", headers=HEADERS)
        assert resp.status == 200
        assert await resp.json() == {"workflowId": second["workflowId"], "status": "cancelled"}
        await asyncio.sleep(0.5)  # reconciles meanwhile
        done = await get_job(client, second["workflowId"])
        assert done["status"] == "cancelled"
        assert done["error"]["message"] == "cancelled by request"
        gate.set()
        assert (await wait_job(client, first["workflowId"], status_is("completed")))["status"] == "completed"
        waiting_pid = done["promptId"]
        assert fake.execution_count.get(waiting_pid, 0) == 0
    finally:
        await fake.stop()


# -- 7. per-attempt notes, and an end that belongs to another attempt -------------------------

async def test_7_a_timed_out_job_that_comfyui_forgot_fails_timeout(make_client, config, fake, clock):
    fake.gate("ImageBlur", interruptible=False)  # the interrupt never lands
    client = await make_client(config(cancel_grace=60.0, backend_retries=1), clock=clock)
    await wait_backends_up(client)
    job = await submit(client, slow_workflow(), timeout=5)
    running = await wait_job(client, job["workflowId"], status_is("running"))
    await fake.wait_for_gated(running["promptId"], "10")
    backend = client.app[comfymgr.BRIDGE].backends["local"]
    clock.advance(6)
    await backend.tick()
    connects = len(fake.ws_connects)
    await fake.restart()  # forgets the prompt
    await fake.wait_until(lambda: len(fake.ws_connects) > connects)
    await until(lambda: _true(backend.up))
    for _ in range(3):  # reconciles by the injected clock: the second look judges it
        clock.advance(1)
        await backend.tick()
    done = await get_job(client, job["workflowId"])
    assert done["status"] == "failed" and done["error"]["code"] == "timeout", done
    assert fake.posted_prompt_ids == [running["promptId"]]


def test_7_requeue_clears_the_attempt_and_an_end_needs_its_own_attempt(tmp_path):
    storage = comfymgr.Storage(tmp_path / "db.sqlite")
    storage.enqueue("j", '{"1": {}}', comfymgr.Priority.NORMAL, "any", 1,
                    extra={"interrupt": "timeout", "webhook": {"url": "https://x.example"}})
    job = storage.claim("local", "p1", 2)[0]
    assert job.extra == {"webhook": {"url": "https://x.example"}}  # 0.1.0's note at the top level: gone
    storage.note_attempt("j", "p1", 3, interrupt="timeout")
    assert storage.get("j").extra["attempt"] == {"interrupt": "timeout"}
    assert storage.requeue_run("j", "p1", 4, reason="preempted").state is comfymgr.JobState.QUEUED
    assert "attempt" not in storage.get("j").extra
    storage.claim("local", "p2", 5)[0]
    # The first attempt's late end changes nothing.
    assert storage.end_run("j", "p1", comfymgr.JobState.COMPLETED, 6, backend="local") is None
    assert storage.requeue_run("j", "p1", 6) is None
    assert storage.mark_running("j", "p1", 6, "local") is None
    assert storage.get("j").state is comfymgr.JobState.DISPATCHING
    ended = storage.end_run("j", "p2", comfymgr.JobState.COMPLETED, 7, backend="local", outputs=[])
    assert ended.state is comfymgr.JobState.COMPLETED
    storage.close()


# -- 8. the stream never sends an event twice -------------------------------------------------

async def test_8_subscribe_with_since_while_events_flow_sends_each_once(make_client, make_config):
    client = await make_client(make_config())
    db = client.app[comfymgr.DB]
    job, _, _ = await client.app[comfymgr.QUEUE].submit(workflow(), comfymgr.Priority.NORMAL, "any",
                                                        timeout_s=None)
    await db.write(lambda s: s.claim("local", "p", 1)[0])  # ComfyUI is down: nobody else claims it
    await db.write(lambda s: s.mark_running(job.id, "p", 1, "local"))

    async def event():  # a stored event of the job, committed then published
        await db.write(lambda s: s.set_progress(job.id, 1.0, "1", 1, emit=True))

    for _ in range(1200):  # three pages of replay
        await event()
    ws = await client.ws_connect("/v1/comfyui/stream?workflowId=nothing-yet", headers=HEADERS)
    assert (await ws.receive_json())["type"] == "subscribed"
    await ws.send_json({"type": "subscribe", "workflowId": job.id, "since": 0})
    writer = asyncio.ensure_future(asyncio.gather(*(event() for _ in range(300))))
    seqs = []
    while True:
        message = await asyncio.wait_for(ws.receive_json(), 15)
        if message["type"] == "subscribed":
            break
        seqs.append(message["seq"])
    await writer
    latest = client.app[comfymgr.HUB].latest_seq
    while not seqs or seqs[-1] < latest:
        seqs.append((await asyncio.wait_for(ws.receive_json(), 15))["seq"])
    events = await db.read(lambda s: s.events_since(0, job_ids=[job.id], limit=10_000))
    assert seqs == [e.seq for e in events]  # every event once, in order
    await ws.close()


# -- 9. a stop never waits for a model hash ---------------------------------------------------

def start(tmp_path, port, **env):
    environ = dict(os.environ, MANAGEMENT_API_PORT=str(port), MANAGEMENT_API_HOST="127.0.0.1",
                   MANAGEMENT_API_KEY=API_KEY, COMFYMGR_STATE_DIR=str(tmp_path / "state"),
                   COMFYUI_URL=f"http://127.0.0.1:{free_port()}", COMFYMGR_RATE_LIMIT="0", **env)
    return subprocess.Popen([sys.executable, str(ROOT / "comfymgr.py")], env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_answering(port, proc, timeout=20.0):
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("comfymgr did not answer")


def test_9_sigterm_while_a_100_gb_checkpoint_is_hashed(tmp_path):
    import urllib.request

    models = tmp_path / "checkpoints"
    models.mkdir()
    with open(models / "huge.safetensors", "wb") as handle:
        handle.truncate(100 * 2**30)  # sparse: reading it takes minutes, storing it nothing
    port = free_port()
    proc = start(tmp_path, port, COMFYUI_MODELS_CHECKPOINTS=str(models))
    try:
        wait_answering(port, proc)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/comfyui/models?type=checkpoints",
                                         headers=HEADERS)
        listing = json.loads(urllib.request.urlopen(request, timeout=5).read())
        assert listing["models"][0]["hash"] is None  # hashing in the background
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "hashing of" in log and "stopped: comfymgr is stopping" in log, log
    with sqlite3.connect(tmp_path / "state" / "comfymgr.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM model_hashes").fetchone()[0] == 0


# -- 10 and 11. one process per state directory; "listening" once bound ------------------------

def test_10_a_second_process_on_the_same_state_directory_refuses_to_start(tmp_path):
    port = free_port()
    first = start(tmp_path, port)
    try:
        wait_answering(port, first)
        second = start(tmp_path, free_port())
        assert second.wait(20) == 2
        out = second.stdout.read()
        assert out == (f"comfymgr: error: another comfymgr (PID {first.pid}) is using the state "
                       f"directory {tmp_path / 'state'}\n")
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0
    assert "listening on 127.0.0.1:" + str(port) in first.stdout.read()


def test_11_listening_is_said_only_once_bound(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start(tmp_path, port)
        assert proc.wait(20) == 1
        out = proc.stdout.read()
    assert " listening on " not in out, out
    assert "cannot start" in out and "address already in use" in out, out


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_systemd_hears_ready_once_bound_watchdog_pings_and_stopping(tmp_path, abstract):
    """The notify protocol as systemd speaks it (Type=notify, WatchdogSec):
    datagrams on $NOTIFY_SOCKET, a path or an abstract name (@...)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        name = f"@comfymgr-test-{os.getpid()}-{id(tmp_path)}" if abstract else str(tmp_path / "notify")
        sock.bind("\0" + name[1:] if abstract else name)
        sock.settimeout(20)
        port = free_port()
        proc = start(tmp_path, port, NOTIFY_SOCKET=name, WATCHDOG_USEC="200000")
        try:
            ready = sock.recv(4096).decode().split("\n")
            # READY=1 comes once the socket is bound: it answers at once.
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            pings = [sock.recv(4096).decode() for _ in range(3)]
            proc.send_signal(signal.SIGTERM)
            after = []
            while "STOPPING=1" not in after:
                after.append(sock.recv(4096).decode())
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert ready == ["READY=1", f"STATUS=listening on 127.0.0.1:{port}", f"MAINPID={proc.pid}"]
    assert pings == ["WATCHDOG=1"] * 3
    assert set(after) <= {"WATCHDOG=1", "STOPPING=1"}


def test_no_notify_socket_means_no_datagram_and_no_watchdog_for_another_pid():
    assert comfymgr._Notifier({}).address == ""
    assert comfymgr._Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000000",
                               "WATCHDOG_PID": "1"}).watchdog is None
    assert comfymgr._Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000",
                               "WATCHDOG_PID": str(os.getpid())}).watchdog == 1.0


# -- 12. one of several backends dies for good ---------------------------------------------------

@pytest.fixture
async def two_fakes(tmp_path):
    fakes = [FakeComfyUI(output_dir=tmp_path / f"c{i}" / "output") for i in range(2)]
    for f in fakes:
        await f.start()
    yield fakes
    for f in fakes:
        await f.stop()


async def test_12_a_dead_backend_gives_back_what_it_had_not_started(make_client, make_config,
                                                                    two_fakes, clock):
    a, b = two_fakes
    gate_a = a.gate("ImageBlur")
    gate_b = b.gate("ImageBlur")
    config = make_config(backends=(comfymgr.BackendSpec("a", a.url), comfymgr.BackendSpec("b", b.url)),
                         progress_interval=0.0, reconcile_interval=0.1, backend_lost_after=120.0,
                         backend_timeout=0.5)
    client = await make_client(config, clock=clock)
    await wait_backends_up(client)
    backends = client.app[comfymgr.BRIDGE].backends
    on_a = await submit(client, unique(slow_workflow(), "a"), gpu="a")
    await wait_job(client, on_a["workflowId"], status_is("running"))
    # b is full (one running, one waiting in its ComfyUI queue): the next job can only wait on a.
    on_b = [await submit(client, unique(slow_workflow(), f"b{i}"), gpu="b") for i in range(2)]
    await wait_job(client, on_b[0]["workflowId"], status_is("running"))
    await until(lambda: _true(backends["b"].waiting_run() is not None))
    prefetched = await submit(client, marked("prefetched"))
    await until(lambda: _true(backends["a"].waiting_run() is not None))
    gate_a.clear()
    await a.stop()  # kill -9 of a's ComfyUI, for good
    # The job waiting in a's queue goes back to the shared queue at once ...
    await until(lambda: _queued(client, prefetched["workflowId"]))
    # ... and runs on b once b has room; the one running on a waits for a.
    gate_b.set()
    done = await wait_job(client, prefetched["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "completed" and done["backend"] == "b", done
    status = await status_of(client)
    state_a = next(x for x in status["backends"] if x["name"] == "a")
    assert state_a["state"] == "down" and state_a["downSince"] is not None
    assert (await get_job(client, on_a["workflowId"]))["status"] == "running"
    clock.advance(121)
    await backends["a"].tick()
    lost = await get_job(client, on_a["workflowId"])
    assert lost["status"] == "failed" and lost["error"]["code"] == "backend_lost"
    assert "unreachable for 121 s" in lost["error"]["message"]


async def test_12_with_retries_the_lost_job_runs_on_another_backend(make_client, make_config,
                                                                     two_fakes, clock):
    a, b = two_fakes
    a.gate("ImageBlur")
    config = make_config(backends=(comfymgr.BackendSpec("a", a.url), comfymgr.BackendSpec("b", b.url)),
                         progress_interval=0.0, reconcile_interval=0.1, backend_retries=1,
                         backend_timeout=0.5)
    client = await make_client(config, clock=clock)
    await wait_backends_up(client)
    job = await submit(client, slow_workflow())
    running = await wait_job(client, job["workflowId"], status_is("running"))
    on = client.app[comfymgr.BRIDGE].backends[running["backend"]]
    other = a if on.name == "b" else b
    await (a if on.name == "a" else b).stop()
    await until(lambda: _false(on.up))
    clock.advance(121)
    await on.tick()
    done = await wait_job(client, job["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "completed" and done["backend"] != on.name and done["attempts"] == 2
    assert other.execution_count == {done["promptId"]: 1}


# -- a /history entry that cannot be read ends the job, it never waits ---------------------------

@pytest.mark.parametrize("entry,why", [
    ("the run is over", "the entry is not an object"),
    ({"outputs": {}}, "the entry has no status object"),
    ({"status": {"status_str": "success", "completed": True}, "outputs": ["a", "b"]},
     "its outputs are not an object"),
    ({"status": {"status_str": "maybe", "completed": "yes", "messages": []}},
     "its status is neither success nor error"),
])
async def test_an_unreadable_history_entry_fails_the_job_with_its_excerpt(make_client, config, fake,
                                                                          entry, why):
    gate = fake.gate("ImageBlur")
    client = await make_client(config())
    await wait_backends_up(client)
    job = await submit(client, slow_workflow())
    running = await wait_job(client, job["workflowId"], status_is("running"))
    fake.history_entries[running["promptId"]] = entry
    gate.set()
    done = await wait_job(client, job["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "failed"
    assert done["error"] == {
        "code": "backend_protocol_error",
        "message": f"ComfyUI's /history entry for prompt {running['promptId']} cannot be read: {why}",
        "excerpt": json.dumps(entry, separators=(",", ":"), ensure_ascii=False)}
    # The backend goes on: the next job completes.
    fake.history_entries.clear()
    nxt = await submit(client, marked("next"))
    assert (await wait_job(client, nxt["workflowId"], status_is("completed", "failed")))["status"] == "completed"


# -- found in review -----------------------------------------------------------------------------

async def test_a_cancel_that_waited_for_a_dispatch_leaves_no_ghost_run(make_client, config, fake):
    """A DELETE waits for the backend's lock while the job's POST is in
    flight; the POST is refused (400) and the job ends. The cancel then must
    not follow the job again from its stale snapshot: such a ghost run held
    the backend for the whole cancel grace."""
    seen, release = asyncio.Event(), asyncio.Event()

    async def held_then_refused(body):
        if not prefix_of(body).endswith("_refused"):
            return None
        seen.set()
        await release.wait()
        return 400, {"error": {"type": "prompt_outputs_failed_validation",
                               "message": "Prompt outputs failed validation", "details": "",
                               "extra_info": {}}, "node_errors": {}}

    fake.prompt_answer = held_then_refused
    client = await make_client(config(cancel_grace=300.0))
    await wait_backends_up(client)
    bad = await submit(client, marked("refused"))
    await asyncio.wait_for(seen.wait(), 10)
    cancel = asyncio.ensure_future(client.delete(f"/v1/comfyui/workflow/{bad['workflowId']}",
                                                 headers=HEADERS))
    # Marked in the database: the DELETE now waits for the lock the dispatch holds.
    await wait_job(client, bad["workflowId"], lambda j: j["cancelRequested"])
    release.set()
    resp = await cancel
    assert resp.status == 409, await resp.text()
    assert (await resp.json())["error"] == "not_cancellable"
    assert client.app[comfymgr.BRIDGE].backends["local"].runs == {}
    good = await submit(client, marked("after"))
    done = await wait_job(client, good["workflowId"], status_is("completed"), timeout=10)
    assert done["status"] == "completed"


async def test_an_end_the_database_refused_is_settled_again_once_it_takes_writes(
        make_client, config, fake, monkeypatch):
    """ComfyUI refuses the prompt (400) while the database refuses the job's
    end: the row still says dispatching and nothing follows it any more.
    Reconcile takes it up again, and the job ends once writes work."""
    real, refused = comfymgr.Storage.end_run, []

    def end_run(self, job_id, *args, **kwargs):
        if not refused:
            refused.append(job_id)
            raise sqlite3.OperationalError("disk I/O error")
        return real(self, job_id, *args, **kwargs)

    monkeypatch.setattr(comfymgr.Storage, "end_run", end_run)
    fake.prompt_answer = lambda body: (400, {
        "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                  "details": "", "extra_info": {}}, "node_errors": {}})
    client = await make_client(config())
    await wait_backends_up(client)
    job = await submit(client, marked("refusedend"))
    done = await wait_job(client, job["workflowId"], status_is("failed", "completed"), timeout=15)
    assert refused == [job["workflowId"]]
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_workflow", done
    assert client.app[comfymgr.BRIDGE].backends["local"].runs == {}


async def test_a_node_whose_schema_cannot_be_read_is_left_to_comfyui(make_client, make_config,
                                                                    tmp_path, caplog):
    """A custom node pack's /object_info entry without the fields comfymgr
    reads: a workflow using it is accepted (ComfyUI judges it at dispatch),
    not refused as "does not exist"; one naming a class ComfyUI does not list
    at all still is."""
    from fake_comfyui import DEFAULT_OBJECT_INFO, SUPPLEMENTARY_OBJECT_INFO

    info = {**json.loads(DEFAULT_OBJECT_INFO.read_text()), **SUPPLEMENTARY_OBJECT_INFO}
    info["OddPackNode"] = {"input": {"required": {}}, "output": ["IMAGE"], "name": "OddPackNode"}
    odd = FakeComfyUI(output_dir=tmp_path / "odd" / "output", object_info=info)
    await odd.start()
    try:
        client = await make_client(make_config(comfyui_url=odd.url))
        await wait_backends_up(client)
        graph = {"1": {"class_type": "OddPackNode", "inputs": {}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "odd"}}}
        accepted = await submit(client, graph)
        assert accepted["status"] == "queued"
        graph["1"]["class_type"] = "NoSuchNode"
        refused = await submit(client, graph, status=400)
        assert refused["error"] == "invalid_workflow"
        assert refused["details"]["error"]["message"] == "Cannot execute because node NoSuchNode does not exist."
        assert any("1 /object_info entries are not node schemas" in r.getMessage() for r in caplog.records)
    finally:
        await odd.stop()


async def test_a_slow_object_info_at_reconnect_keeps_the_jobs_where_they_run(make_client, config, fake,
                                                                             caplog):
    """After a reconnect, /object_info outlasts the backend timeout (a box
    with many node packs) while ComfyUI runs one job and holds the next in
    its queue. The backend comes back up with the schemas it knew; the
    waiting job is not given back to run again elsewhere."""
    gate = fake.gate("ImageBlur")
    from test_bridge import slow_workflow
    client = await make_client(config(backend_timeout=0.3))
    await wait_backends_up(client)
    first = await submit(client, unique(slow_workflow(), "first"))
    second = await submit(client, unique(slow_workflow(), "second"))
    await wait_job(client, first["workflowId"], status_is("running"))
    waiting = await wait_job(client, second["workflowId"], lambda j: j["promptId"] is not None)
    backend = client.app[comfymgr.BRIDGE].backends["local"]
    before = backend.client_id
    fake.route_modes["/object_info"] = "hang"
    await fake.drop_websockets()

    async def up_again():
        return backend.up and backend.client_id not in (None, before)

    await until(up_again)
    gate.set()
    done = [await wait_job(client, job["workflowId"], status_is("completed", "failed"), timeout=15)
            for job in (first, second)]
    assert [j["status"] for j in done] == ["completed", "completed"]
    assert done[1]["promptId"] == waiting["promptId"] and done[1]["attempts"] == 1
    assert sorted(fake.execution_count.values()) == [1, 1]
    assert any("GET /object_info" in r.getMessage() and "use what was known" in r.getMessage()
               for r in caplog.records)
    fake.route_modes.clear()

