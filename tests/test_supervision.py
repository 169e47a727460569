"""Supervision: an exception injected into each long-lived task is logged at
ERROR with its traceback, counted in comfymgr_task_failures_total{task},
shown in /v1/status, and the task comes back and does its work again."""

from __future__ import annotations

import asyncio
import logging

import pytest
from test_bridge import status_is, submit, wait_backends_up, wait_job
from test_metrics import NoNVML, two_gpus

import comfymgr
from conftest import HEADERS, workflow

WAIT = 15.0


def inject_once(target, name):
    """Make target.name raise RuntimeError("injected") on its first call, then
    behave as before; returns the list of calls."""
    original = getattr(target, name)
    calls = []

    async def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return await original(*args, **kwargs)

    setattr(target, name, patched)
    return calls


async def until(predicate, timeout=WAIT):
    async def poll():
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


async def failures_shown(client, task, running=True):
    text = await (await client.get("/metrics")).text()
    assert f'comfymgr_task_failures_total{{task="{task}"}} 1.0' in text
    status = await (await client.get("/v1/status", headers=HEADERS)).json()
    [entry] = [t for t in status["tasks"] if t["name"] == task]
    assert entry["failures"] == 1 and entry["running"] is running
    assert entry["lastError"] == "RuntimeError: injected"
    assert isinstance(entry["lastErrorAt"], int)
    return status


def logged_with_traceback(caplog, task):
    [record] = [r for r in caplog.records if r.name == "comfymgr.tasks" and task in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None


# Each task: how to reach the object whose method its loop calls, the method,
# and the settings that make the loop call it again soon.
BACKEND_TASKS = [("backend:local:websocket", "_learn_server"),
                 ("backend:local:dispatch", "dispatch_next"),
                 ("backend:local:tick", "tick")]


@pytest.mark.parametrize("task,method", BACKEND_TASKS)
async def test_a_backend_task_comes_back(make_client, make_config, fake, caplog, task, method):
    client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0,
                                           reconcile_interval=0.1))
    client.app[comfymgr.SUPERVISOR].restart_base = 0.01
    backend = client.app[comfymgr.BRIDGE].backends["local"]
    calls = inject_once(backend, method)
    if method == "_learn_server":  # the task is connecting already: make it connect again
        await client.app[comfymgr.SUPERVISOR].stop("backend:local:websocket")
        client.app[comfymgr.SUPERVISOR].start(task, backend.websocket_loop, on_error=backend.error)
    await wait_backends_up(client)
    job = await submit(client, workflow())
    done = await wait_job(client, job["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "completed"
    await until(lambda: len(calls) >= 2)
    status = await failures_shown(client, task)
    logged_with_traceback(caplog, task)
    # The backend's own lastError says it too, until it next connects.
    if method == "_learn_server":
        assert status["backends"][0]["state"] == "up"


async def test_hub_tasks_come_back(make_client, make_config, caplog, clock):
    client = await make_client(make_config(heartbeat=1.0), clock=clock)
    supervisor = client.app[comfymgr.SUPERVISOR]
    supervisor.restart_base = 0.01
    hub = client.app[comfymgr.HUB]
    ticks = inject_once(hub, "tick")
    prunes = inject_once(hub, "prune")
    await supervisor.stop("hub:prune")  # it pruned at start already: start it again
    supervisor.start("hub:prune", hub.prune_loop)
    await until(lambda: len(ticks) >= 2 and len(prunes) >= 2)
    for task in ("hub:tick", "hub:prune"):
        await failures_shown(client, task)
        logged_with_traceback(caplog, task)
    # The tick works again: a heartbeat reaches a stream client.
    ws = await client.ws_connect("/v1/comfyui/stream", headers=HEADERS)
    clock.advance(2)
    message = await asyncio.wait_for(ws.receive_json(), WAIT)
    assert message["type"] == "heartbeat"
    await ws.close()


async def test_files_and_retention_tasks_come_back(make_client, make_config, caplog, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.safetensors").write_bytes(b"weights")
    client = await make_client(make_config(models_checkpoints=models))
    supervisor = client.app[comfymgr.SUPERVISOR]
    supervisor.restart_base = 0.01
    files, retention = client.app[comfymgr.FILES], client.app[comfymgr.RETENTION]
    disks = inject_once(files, "measure_filesystems")
    runs = inject_once(retention, "run_once")
    for name, loop in (("files:disk", files.disk_loop), ("files:retention", retention.loop)):
        await supervisor.stop(name)
        supervisor.start(name, loop)
    hashed = []
    real_sha = comfymgr._sha256_file

    def sha_failing_once(path, stop):
        hashed.append(path)
        if len(hashed) == 1:
            raise RuntimeError("injected")
        return real_sha(path, stop)

    comfymgr._sha256_file = sha_failing_once
    try:
        for _ in range(2):  # each listing asks for the missing hash; the first attempt fails
            resp = await client.get("/v1/comfyui/models?type=checkpoints", headers=HEADERS)
            assert resp.status == 200
            await until(lambda: not files._hashing)
        await files.hashes_done()
    finally:
        comfymgr._sha256_file = real_sha
    await until(lambda: len(disks) >= 2 and len(runs) >= 2)
    for task in ("files:disk", "files:retention", "files:hash"):
        await failures_shown(client, task)
        logged_with_traceback(caplog, task)
    listing = await (await client.get("/v1/comfyui/models?type=checkpoints", headers=HEADERS)).json()
    assert listing["models"][0]["hash"] is not None  # hashed after the restart


async def test_webhook_sender_comes_back(make_client, make_config, caplog):
    client = await make_client(make_config())
    supervisor = client.app[comfymgr.SUPERVISOR]
    supervisor.restart_base = 0.01
    webhooks = client.app[comfymgr.WEBHOOKS]
    calls = inject_once(webhooks, "deliver_due")
    webhooks.wake.set()
    await until(lambda: len(calls) >= 2)
    await failures_shown(client, "webhooks")
    logged_with_traceback(caplog, "webhooks")


async def test_gpu_poll_comes_back(make_client, make_config, caplog):
    client = await make_client(make_config(gpu_poll_interval=0.02), nvml=two_gpus())
    client.app[comfymgr.SUPERVISOR].restart_base = 0.01
    calls = inject_once(client.app[comfymgr.GPUS], "poll")
    await until(lambda: len(calls) >= 2)
    await failures_shown(client, "gpu:poll")
    logged_with_traceback(caplog, "gpu:poll")


async def test_a_stream_sender_that_fails_closes_its_client_for_a_resume(make_client, make_config, caplog):
    client = await make_client(make_config(), nvml=NoNVML())
    ws = await client.ws_connect("/v1/comfyui/stream", headers=HEADERS)
    hub = client.app[comfymgr.HUB]
    await until(lambda: len(hub.subscribers) == 1)
    [sub] = hub.subscribers

    async def broken(text):
        raise RuntimeError("injected")

    sub.ws.send_str = broken
    await client.app[comfymgr.QUEUE].submit(workflow(), comfymgr.Priority.NORMAL, "any", timeout_s=None)
    closed = await asyncio.wait_for(ws.receive(), WAIT)
    assert closed.type.name == "CLOSE" and closed.data == 1011
    assert closed.extra == "internal error; reconnect with since"
    await failures_shown(client, "stream:sender", running=None)  # one per client, not restarted
    logged_with_traceback(caplog, "stream:sender")
    other = await client.ws_connect("/v1/comfyui/stream?since=0", headers=HEADERS)  # resumes
    assert (await asyncio.wait_for(other.receive_json(), WAIT))["type"] == "workflow:queued"
    await other.close()
