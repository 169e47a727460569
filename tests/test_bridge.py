"""The bridge against the fake ComfyUI: every scenario of the recordings,
plus the failures on either side that must never lose or double a job."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

import comfymgr
from conftest import API_KEY, HEADERS, ROOT, workflow
from fake_comfyui import FakeComfyUI

WAIT = 15.0  # generous ceiling for awaited states; tests normally pass in milliseconds


@pytest.fixture
def bridge_config(make_config, fake):
    def make(**overrides):
        values = dict(comfyui_url=fake.url, progress_interval=0.0, reconcile_interval=0.2,
                      backend_timeout=2.0)
        values.update(overrides)
        return make_config(**values)

    return make


async def submit(client, graph, status=202, **fields):
    resp = await client.post("/v1/comfyui/workflow", json={"workflow": graph, **fields},
                             headers=HEADERS)
    body = await resp.json()
    assert resp.status == status, body
    return body


async def get_job(client, job_id):
    resp = await client.get(f"/v1/comfyui/workflow/{job_id}", headers=HEADERS)
    assert resp.status == 200
    return await resp.json()


async def wait_job(client, job_id, predicate, timeout=WAIT):
    """Poll GET until predicate(job) holds: waits for a state, not for time."""
    async def poll():
        while True:
            job = await get_job(client, job_id)
            if predicate(job):
                return job
            await asyncio.sleep(0.01)
    return await asyncio.wait_for(poll(), timeout)


def status_is(*statuses):
    return lambda job: job["status"] in statuses


async def wait_backends_up(client, timeout=WAIT):
    async def poll():
        while True:
            resp = await client.get("/v1/status", headers=HEADERS)
            backends = (await resp.json())["backends"]
            if all(b["state"] == "up" for b in backends):
                return backends
            await asyncio.sleep(0.01)
    return await asyncio.wait_for(poll(), timeout)


def slow_workflow():
    """EmptyImage -> ImageBlur -> SaveImage; the fake's gate holds the blur."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                     "color": 0}},
        "10": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3,
                                                     "sigma": 1.0}},
        "99": {"class_type": "SaveImage", "inputs": {"images": ["10", 0],
                                                     "filename_prefix": "slow"}},
    }


def unique(graph, tag):
    """A copy whose output prefix differs, so ComfyUI's cache does not serve it."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = f"{node['inputs']['filename_prefix']}_{tag}"
    return graph


# -- success paths ---------------------------------------------------------------------

async def test_success_runs_on_comfyui_and_takes_outputs_from_history(make_client, bridge_config, fake):
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    job = await submit(client, workflow("simple"))
    done = await wait_job(client, job["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "completed", done
    assert done["progress"] == 100
    assert done["startTime"] is not None and done["completionTime"] >= done["startTime"]
    pid = done["promptId"]
    # One POST with comfymgr's own lowercase UUID4 prompt id and its socket's clientId.
    assert fake.posted_prompt_ids == [pid]
    assert pid == pid.lower() and len(pid) == 36
    assert fake.execution_count == {pid: 1}
    # The outputs are the history's, with URLs comfymgr serves.
    assert done["outputs"] == [{
        "filename": "peer_simple_00001_.png", "subfolder": "", "type": "output", "nodeId": "2",
        "kind": "images", "url": "/v1/comfyui/output/peer_simple_00001_.png",
        "workflowId": job["workflowId"]}]
    assert done["error"] is None and done["backend"] == "local"


async def test_chain_and_temp_outputs(make_client, bridge_config, fake):
    (fake._dirs.input / "example.png").write_bytes(
        (comfymgr_root_data("http") / "view_input_example.body").read_bytes())
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    chain = await submit(client, workflow("chain"))
    preview = await submit(client, workflow("loadimage_preview"))
    done = await wait_job(client, chain["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "completed" and done["outputs"][0]["filename"] == "peer_chain_00001_.png"
    done = await wait_job(client, preview["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "completed", done
    [item] = done["outputs"]
    assert item["type"] == "temp" and item["url"].endswith("?type=temp")


def comfymgr_root_data(kind):
    return ROOT / "tests" / "data" / "comfyui" / kind


async def test_cached_rerun_completes_with_its_outputs(make_client, bridge_config, fake):
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    first = await submit(client, workflow("chain"))
    first = await wait_job(client, first["workflowId"], status_is("completed", "failed"))
    second = await submit(client, workflow("chain"))
    second = await wait_job(client, second["workflowId"], status_is("completed", "failed"))
    assert second["status"] == "completed"
    assert [o["filename"] for o in second["outputs"]] == [o["filename"] for o in first["outputs"]]
    assert second["progress"] == 100
    assert len(fake.posted_prompt_ids) == 2


async def test_progress_events_coalesce_and_reach_100(make_client, bridge_config, fake):
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    graph = json.loads((comfymgr_root_data("workflows") / "upscale_progress.json").read_text())
    del graph["4"]  # ImageScaleBy is not in the recorded object_info subset
    graph["5"]["inputs"]["images"] = ["3", 0]
    models = fake._dirs.output.parent / "models" / "upscale_models"
    models.mkdir(parents=True)
    (models / "peer_tiny_compact.safetensors").write_bytes(b"x")
    fake._dirs.models = fake._dirs.output.parent / "models"
    fake.progress_steps["ImageUpscaleWithModel"] = 16
    job = await submit(client, graph)
    done = await wait_job(client, job["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "completed", done
    events = await client.app[comfymgr.DB].read(lambda s: s.events_since(0, job_ids=[job["workflowId"]]))
    kinds = [e.type for e in events]
    assert kinds[0] == "workflow:queued" and kinds[1] == "workflow:started"
    assert kinds[-1] == "workflow:completed"
    progress = [e.data["progress"] for e in events if e.type == "workflow:progress"]
    assert progress == sorted(progress) and progress[-1] == 100


# -- validation ------------------------------------------------------------------------

async def test_invalid_workflow_refused_at_submit(make_client, bridge_config, fake):
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    bad = {"1": {"class_type": "NoSuchNode", "inputs": {}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    body = await submit(client, bad, status=400)
    assert body == {
        "error": "invalid_workflow",
        "message": "Cannot execute because node NoSuchNode does not exist.: Node ID '#1'",
        "statusCode": 400,
        "details": {"error": {"type": "invalid_prompt",
                              "message": "Cannot execute because node NoSuchNode does not exist.",
                              "details": "Node ID '#1'", "extra_info": {}},
                    "node_errors": {}}}
    missing = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                             "color": 0}},
               "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}
    body = await submit(client, missing, status=400)
    assert body["details"]["node_errors"] == {"2": {
        "errors": [{"type": "required_input_missing", "message": "Required input is missing",
                    "details": "images", "extra_info": {"input_name": "images"}}],
        "dependent_outputs": ["2"], "class_type": "SaveImage"}}
    dangling = {"2": {"class_type": "SaveImage", "inputs": {"images": ["77", 0], "filename_prefix": "x"}}}
    body = await submit(client, dangling, status=400)
    assert body["details"]["node_errors"]["2"]["errors"][0]["type"] == "linked_node_missing"
    bad_index = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8,
                                                               "batch_size": 1, "color": 0}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 3],
                                                              "filename_prefix": "x"}}}
    body = await submit(client, bad_index, status=400)
    assert body["details"]["node_errors"]["2"]["errors"][0]["type"] == "linked_output_missing"
    no_output = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8,
                                                               "batch_size": 1, "color": 0}}}
    body = await submit(client, no_output, status=400)
    assert body["message"] == "Prompt has no outputs"
    assert body["details"]["error"]["type"] == "prompt_no_outputs"
    assert fake.posted_prompt_ids == []
    listing = await (await client.get("/v1/comfyui/workflows", headers=HEADERS)).json()
    assert listing["workflows"] == []  # nothing refused was queued


async def test_invalid_values_fail_at_dispatch_with_comfyui_node_errors(make_client, bridge_config, fake):
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    graph = workflow("simple")
    graph["1"]["inputs"]["width"] = 0  # only ComfyUI knows the range
    job = await submit(client, graph)
    done = await wait_job(client, job["workflowId"], status_is("failed", "completed"))
    assert done["status"] == "failed"
    error = done["error"]
    assert error["code"] == "invalid_workflow"
    assert error["details"]["error"]["type"] == "prompt_outputs_failed_validation"
    [node_error] = error["details"]["node_errors"]["1"]["errors"]
    assert node_error["type"] == "value_smaller_than_min"
    assert fake.execution_count == {}


async def test_accepts_and_queues_when_no_backend_was_ever_reachable(make_client, make_config):
    port = free_port()
    client = await make_client(make_config(comfyui_url=f"http://127.0.0.1:{port}"))
    job = await submit(client, {"1": {"class_type": "Anything", "inputs": {}}})
    assert job["status"] == "queued"


# -- failures inside ComfyUI ---------------------------------------------------------------

async def test_execution_error_fails_with_node_and_exception(make_client, bridge_config, fake):
    (fake._dirs.input / "corrupt.png").write_bytes(b"not a png")
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "corrupt.png"}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "e"}}}
    job = await submit(client, graph)
    done = await wait_job(client, job["workflowId"], status_is("failed", "completed"))
    error = done["error"]
    assert done["status"] == "failed"
    assert error["code"] == "execution_error"
    assert error["nodeId"] == "1" and error["nodeType"] == "LoadImage"
    assert error["exceptionType"] == "PIL.UnidentifiedImageError"
    assert "cannot identify image file" in error["exceptionMessage"]
    assert 0 < len(error["traceback"]) <= 12
    metrics = await (await client.get("/metrics")).text()
    assert 'comfyui_workflow_errors_total{error_type="execution_error"} 1.0' in metrics


# -- cancel ----------------------------------------------------------------------------------

async def test_cancel_queued_never_reaches_comfyui(make_client, bridge_config, fake):
    gate = fake.gate("ImageBlur")
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    busy = await submit(client, slow_workflow())
    await wait_job(client, busy["workflowId"], status_is("running"))
    prefetched = await submit(client, unique(workflow("simple"), "next"))
    await wait_job(client, prefetched["workflowId"], lambda j: j["state"] == "submitted")
    waiting = await submit(client, workflow("simple"))
    assert waiting["queuePosition"] == 1 and waiting["state"] == "queued"
    resp = await client.delete(f"/v1/comfyui/workflow/{waiting['workflowId']}", headers=HEADERS)
    assert resp.status == 200
    assert await resp.json() == {"workflowId": waiting["workflowId"], "status": "cancelled"}
    gate.set()
    await wait_job(client, prefetched["workflowId"], status_is("completed"))
    assert len(fake.posted_prompt_ids) == 2  # busy and prefetched; never the cancelled one


async def test_prefetch_keeps_exactly_one_job_waiting_in_comfyui(make_client, bridge_config, fake):
    gate = fake.gate("ImageBlur")
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    jobs = [await submit(client, unique(slow_workflow(), f"p{i}")) for i in range(4)]
    await wait_job(client, jobs[0]["workflowId"], status_is("running"))
    waiting = await wait_job(client, jobs[1]["workflowId"], lambda j: j["state"] == "submitted")
    assert waiting["status"] == "queued" and waiting["queuePosition"] == 0
    for job in jobs[2:]:
        assert (await get_job(client, job["workflowId"]))["state"] == "queued"
    assert len(fake.posted_prompt_ids) == 2
    status = await (await client.get("/v1/status", headers=HEADERS)).json()
    assert status["backends"][0]["runningJob"] == jobs[0]["workflowId"]
    assert status["backends"][0]["waitingJob"] == jobs[1]["workflowId"]
    gate.set()
    for job in jobs:
        assert (await wait_job(client, job["workflowId"], status_is("completed")))["status"] == "completed"
    done = [await get_job(client, j["workflowId"]) for j in jobs]
    assert fake.posted_prompt_ids == [j["promptId"] for j in done]  # in queue order


async def test_a_more_urgent_job_takes_the_prefetched_place(make_client, bridge_config, fake):
    gate = fake.gate("ImageBlur")
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    busy = await submit(client, slow_workflow())
    await wait_job(client, busy["workflowId"], status_is("running"))
    normal = await submit(client, unique(workflow("simple"), "normal"))
    first_try = await wait_job(client, normal["workflowId"], lambda j: j["state"] == "submitted")
    urgent = await submit(client, unique(workflow("simple"), "urgent"), priority="high")
    await wait_job(client, urgent["workflowId"], lambda j: j["state"] == "submitted")
    back = await get_job(client, normal["workflowId"])
    assert back["state"] == "queued" and back["queuePosition"] == 1
    assert first_try["promptId"] in fake.queue_delete_ids
    gate.set()
    urgent = await wait_job(client, urgent["workflowId"], status_is("completed"))
    normal = await wait_job(client, normal["workflowId"], status_is("completed"))
    assert urgent["startTime"] <= normal["startTime"]
    assert first_try["promptId"] not in fake.execution_count  # taken back before it ran
    assert normal["attempts"] == 2


async def test_cancel_the_prefetched_job_removes_it_from_comfyui(make_client, bridge_config, fake):
    gate = fake.gate("ImageBlur")
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    busy = await submit(client, slow_workflow())
    await wait_job(client, busy["workflowId"], status_is("running"))
    nxt = await submit(client, unique(workflow("simple"), "next"))
    waiting = await wait_job(client, nxt["workflowId"], lambda j: j["state"] == "submitted")
    resp = await client.delete(f"/v1/comfyui/workflow/{nxt['workflowId']}", headers=HEADERS)
    assert resp.status == 200  # removed from ComfyUI's queue before the answer
    assert await resp.json() == {"workflowId": nxt["workflowId"], "status": "cancelled"}
    done = await get_job(client, nxt["workflowId"])
    assert done["status"] == "cancelled"
    assert waiting["promptId"] not in fake.execution_count
    gate.set()
    assert (await wait_job(client, busy["workflowId"], status_is("completed")))["status"] == "completed"


async def test_without_prefetch_one_job_at_a_time(make_client, bridge_config, fake):
    gate = fake.gate("ImageBlur")
    client = await make_client(bridge_config(prefetch=False))
    await wait_backends_up(client)
    busy = await submit(client, slow_workflow())
    await wait_job(client, busy["workflowId"], status_is("running"))
    nxt = await submit(client, workflow("simple"))
    await asyncio.sleep(0.2)
    assert (await get_job(client, nxt["workflowId"]))["state"] == "queued"
    assert len(fake.posted_prompt_ids) == 1
    gate.set()
    assert (await wait_job(client, nxt["workflowId"], status_is("completed")))["status"] == "completed"


async def test_cancel_running_interrupts_the_prompt(make_client, bridge_config, fake):
    fake.gate("ImageBlur")
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    job = await submit(client, slow_workflow())
    running = await wait_job(client, job["workflowId"], status_is("running"))
    await fake.wait_for_gated(running["promptId"], "10")
    resp = await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    assert resp.status == 202
    assert (await resp.json())["cancelRequested"] is True
    done = await wait_job(client, job["workflowId"], status_is("cancelled", "failed", "completed"))
    assert done["status"] == "cancelled"
    assert done["error"]["code"] == "cancelled"
    assert {"prompt_id": running["promptId"]} in fake.interrupt_bodies
    # The backend is free again: the next job runs.
    fake.ungate("ImageBlur")
    nxt = await submit(client, workflow("simple"))
    assert (await wait_job(client, nxt["workflowId"], status_is("completed")))["status"] == "completed"


async def test_cancel_uses_jobs_cancel_route_where_the_server_has_it(make_client, make_config, tmp_path):
    fake = FakeComfyUI(output_dir=tmp_path / "c2" / "output", supports_jobs_cancel=True)
    await fake.start()
    try:
        gate = fake.gate("ImageBlur", interruptible=False)  # the interrupt lands at the next node
        client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0,
                                               reconcile_interval=0.2))
        await wait_backends_up(client)
        job = await submit(client, slow_workflow())
        running = await wait_job(client, job["workflowId"], status_is("running"))
        await fake.wait_for_gated(running["promptId"], "10")
        resp = await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
        assert resp.status == 202
        gate.set()
        done = await wait_job(client, job["workflowId"], status_is("cancelled", "failed", "completed"))
        assert done["status"] == "cancelled"
        assert ("POST", f"/api/jobs/{running['promptId']}/cancel") in fake.requests
        assert fake.interrupt_bodies == []
    finally:
        await fake.stop()


async def test_cancel_grace_records_cancelled_when_comfyui_never_confirms(make_client, bridge_config,
                                                                          fake, clock):
    fake.gate("ImageBlur", interruptible=False)  # a node that ignores interrupts
    client = await make_client(bridge_config(cancel_grace=30.0), clock=clock)
    await wait_backends_up(client)
    job = await submit(client, slow_workflow())
    running = await wait_job(client, job["workflowId"], status_is("running"))
    await fake.wait_for_gated(running["promptId"], "10")
    resp = await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    assert resp.status == 202
    clock.advance(31)
    bridge = client.app[comfymgr.BRIDGE]
    await bridge.backends["local"].tick()
    done = await get_job(client, job["workflowId"])
    assert done["status"] == "cancelled"
    assert "did not confirm the interrupt within 30 s" in done["error"]["message"]
    fake.ungate("ImageBlur")


# -- timeouts ------------------------------------------------------------------------------

async def test_timeout_interrupts_and_fails_with_timeout(make_client, bridge_config, fake, clock):
    fake.gate("ImageBlur")
    client = await make_client(bridge_config(), clock=clock)
    await wait_backends_up(client)
    job = await submit(client, slow_workflow(), timeout=5)
    running = await wait_job(client, job["workflowId"], status_is("running"))
    await fake.wait_for_gated(running["promptId"], "10")
    bridge = client.app[comfymgr.BRIDGE]
    clock.advance(4)
    await bridge.backends["local"].tick()
    assert (await get_job(client, job["workflowId"]))["status"] == "running"
    clock.advance(2)
    await bridge.backends["local"].tick()
    done = await wait_job(client, job["workflowId"], status_is("failed", "cancelled", "completed"))
    assert done["status"] == "failed"
    assert done["error"]["code"] == "timeout"
    assert done["error"]["message"] == "ran longer than its 5 s timeout"


async def test_hanging_backend_never_hangs_comfymgr(make_client, bridge_config, fake):
    fake.mode = "hang"
    await fake.drop_websockets()
    client = await make_client(bridge_config(backend_timeout=0.3))
    job = await submit(client, workflow("simple"))
    for _ in range(3):
        resp = await asyncio.wait_for(client.get("/health"), 1.0)
        assert resp.status == 200
    status = await (await client.get("/v1/status", headers=HEADERS)).json()
    [backend] = status["backends"]
    assert backend["state"] == "down"
    assert (await get_job(client, job["workflowId"]))["status"] == "queued"
    fake.mode = "ok"
    done = await wait_job(client, job["workflowId"], status_is("completed"))
    assert done["status"] == "completed"


# -- several backends ------------------------------------------------------------------------

async def test_priorities_across_two_backends(make_client, make_config, tmp_path):
    fakes = [FakeComfyUI(output_dir=tmp_path / f"c{i}" / "output") for i in range(2)]
    for f in fakes:
        await f.start()
    try:
        gates = [f.gate("ImageBlur") for f in fakes]
        # Plain queue order (prefetch has its own tests).
        config = make_config(
            backends=(comfymgr.BackendSpec("a", fakes[0].url, 0), comfymgr.BackendSpec("b", fakes[1].url, 1)),
            progress_interval=0.0, reconcile_interval=0.2, prefetch=False)
        client = await make_client(config)
        await wait_backends_up(client)
        busy = [await submit(client, unique(slow_workflow(), f"busy{i}")) for i in range(2)]
        for job in busy:
            await wait_job(client, job["workflowId"], status_is("running"))
        low = await submit(client, unique(workflow("simple"), "low"), priority="low")
        normal = await submit(client, unique(workflow("simple"), "normal"))
        high = await submit(client, unique(workflow("simple"), "high"), priority="high")
        pinned = await submit(client, unique(workflow("simple"), "pinned"), gpu="b", priority="low")
        assert [low["queuePosition"], normal["queuePosition"], high["queuePosition"]] == [1, 1, 1]
        now = [(await get_job(client, j["workflowId"]))["queuePosition"]
               for j in (high, normal, low, pinned)]
        assert now == [1, 2, 3, 4]
        assert pinned["gpu"] == "b"
        gates[0].set()  # backend a frees up: it takes the high one, then normal, then low
        for job in (high, normal, low):
            done = await wait_job(client, job["workflowId"], status_is("completed"))
            assert done["backend"] == "a"
        order = [p for p in fakes[0].posted_prompt_ids]
        jobs = [await get_job(client, j["workflowId"]) for j in (busy[0], high, normal, low)]
        assert order == [j["promptId"] for j in jobs if j["backend"] == "a"]
        assert (await get_job(client, pinned["workflowId"]))["status"] == "queued"
        gates[1].set()
        done = await wait_job(client, pinned["workflowId"], status_is("completed"))
        assert done["backend"] == "b"
        resp = await client.post("/v1/comfyui/workflow", json={"workflow": workflow(), "gpu": "c"},
                                 headers=HEADERS)
        assert resp.status == 400
        assert await resp.json() == {
            "error": "unknown_gpu", "message": "gpu: unknown value 'c'; use one of local, any, a, b",
            "statusCode": 400, "details": {"field": "gpu", "valid": ["local", "any", "a", "b"]}}
    finally:
        for f in fakes:
            await f.stop()


# -- ComfyUI restarts, drops, comes late ------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_backend_down_at_start_then_up(make_client, make_config, tmp_path):
    port = free_port()
    client = await make_client(make_config(comfyui_url=f"http://127.0.0.1:{port}",
                                           progress_interval=0.0, reconcile_interval=0.2))
    job = await submit(client, workflow("simple"))
    status = await (await client.get("/v1/status", headers=HEADERS)).json()
    assert status["backends"][0]["state"] == "down"
    assert status["backends"][0]["lastError"]
    assert (await client.get("/health")).status == 200
    fake = FakeComfyUI(output_dir=tmp_path / "late" / "output")
    await fake.start(port=port)
    try:
        done = await wait_job(client, job["workflowId"], status_is("completed", "failed"))
        assert done["status"] == "completed"
        backends = await wait_backends_up(client)
        assert backends[0]["comfyuiVersion"] == "0.3.64"
    finally:
        await fake.stop()


async def test_backend_restarted_mid_job_fails_backend_lost(make_client, bridge_config, fake):
    fake.gate("ImageBlur")
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    job = await submit(client, slow_workflow())
    running = await wait_job(client, job["workflowId"], status_is("running"))
    await fake.wait_for_gated(running["promptId"], "10")
    await fake.restart()  # ComfyUI forgets its queue and history
    done = await wait_job(client, job["workflowId"], status_is("failed", "completed", "queued"))
    assert done["status"] == "failed"
    assert done["error"]["code"] == "backend_lost"
    assert fake.execution_count[running["promptId"]] == 1


async def test_backend_lost_job_is_requeued_when_retries_allow(make_client, bridge_config, fake):
    gate = fake.gate("ImageBlur")
    client = await make_client(bridge_config(backend_retries=1))
    await wait_backends_up(client)
    job = await submit(client, slow_workflow())
    first = await wait_job(client, job["workflowId"], status_is("running"))
    await fake.wait_for_gated(first["promptId"], "10")
    await fake.restart()
    gate.set()
    done = await wait_job(client, job["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "completed"
    assert done["promptId"] != first["promptId"] and done["attempts"] == 2
    assert fake.posted_prompt_ids == [first["promptId"], done["promptId"]]


async def test_websocket_dropped_mid_job_result_arrives_from_history(make_client, bridge_config, fake):
    gate = fake.gate("ImageBlur")
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    job = await submit(client, slow_workflow())
    running = await wait_job(client, job["workflowId"], status_is("running"))
    await fake.wait_for_gated(running["promptId"], "10")
    connects = len(fake.ws_connects)
    await fake.drop_websockets()
    gate.set()  # the end is announced to a socket that is gone
    done = await wait_job(client, job["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "completed"
    assert done["outputs"][0]["filename"].startswith("slow_")
    assert len(fake.ws_connects) > connects  # it reconnected with a fresh clientId
    assert len(set(fake.ws_connects)) == len(fake.ws_connects)
    assert fake.execution_count == {running["promptId"]: 1}


async def test_backend_errors_500_html_truncated_keep_jobs_safe(make_client, bridge_config, fake):
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    for mode in ("http500", "html", "truncated"):
        fake.mode = mode
        job = await submit(client, unique(workflow("simple"), mode))
        await asyncio.sleep(0.3)  # let the dispatcher try against the broken server
        assert (await client.get("/health")).status == 200
        state = await get_job(client, job["workflowId"])
        assert state["status"] in ("queued", "running"), state
        fake.mode = "ok"
        done = await wait_job(client, job["workflowId"], status_is("completed", "failed"))
        assert done["status"] == "completed", done
    assert len(fake.posted_prompt_ids) == len(set(fake.posted_prompt_ids))
    assert all(n == 1 for n in fake.execution_count.values())


# -- comfymgr killed mid-job --------------------------------------------------------------------

def start_comfymgr(tmp_path, port, comfyui_url):
    env = dict(os.environ, MANAGEMENT_API_PORT=str(port), MANAGEMENT_API_HOST="127.0.0.1",
               MANAGEMENT_API_KEY=API_KEY, COMFYMGR_STATE_DIR=str(tmp_path / "state"),
               COMFYUI_URL=comfyui_url, COMFYMGR_RECONCILE_INTERVAL="0.2",
               COMFYMGR_PROGRESS_INTERVAL="0", COMFYMGR_RATE_LIMIT="0")
    return subprocess.Popen([sys.executable, str(ROOT / "comfymgr.py")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_kill_9_mid_job_reattaches_and_never_reposts(tmp_path, fake, aiohttp_client):
    import aiohttp

    gate = fake.gate("ImageBlur")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_comfymgr(tmp_path, port, fake.url)
    try:
        async with aiohttp.ClientSession() as http:
            async def call(method, path, **kw):
                for _ in range(500):
                    try:
                        async with http.request(method, base + path, headers=HEADERS, **kw) as resp:
                            return resp.status, await resp.json()
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.02)
                raise AssertionError("comfymgr did not answer")

            async def wait_status(job_id, *statuses):
                for _ in range(1500):
                    _, job = await call("GET", f"/v1/comfyui/workflow/{job_id}")
                    if job["status"] in statuses:
                        return job
                    await asyncio.sleep(0.01)
                raise AssertionError(f"{job_id} never reached {statuses}: {job}")

            status, job = await call("POST", "/v1/comfyui/workflow", json={"workflow": slow_workflow()})
            assert status == 202
            running = await wait_status(job["workflowId"], "running")
            await fake.wait_for_gated(running["promptId"], "10")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc = start_comfymgr(tmp_path, port, fake.url)
            again = await wait_status(job["workflowId"], "running")
            assert again["promptId"] == running["promptId"]
            gate.set()
            done = await wait_status(job["workflowId"], "completed", "failed")
            assert done["status"] == "completed"
            assert fake.posted_prompt_ids == [running["promptId"]]
            assert fake.execution_count == {running["promptId"]: 1}
    finally:
        proc.kill()
        proc.wait(10)


async def test_stream_shows_a_real_run_from_queued_to_completed(make_client, bridge_config, fake):
    client = await make_client(bridge_config())
    await wait_backends_up(client)
    ws = await client.ws_connect("/v1/comfyui/stream", headers=HEADERS)
    job = await submit(client, workflow("chain"))
    seen = []
    while not seen or seen[-1]["type"] != "workflow:completed":
        msg = json.loads((await asyncio.wait_for(ws.receive(), WAIT)).data)
        seen.append(msg)
    kinds = [m["type"] for m in seen]
    assert kinds[0] == "workflow:queued" and kinds[1] == "workflow:started"
    assert set(kinds[2:-1]) <= {"workflow:progress"}
    assert all(m["workflowId"] == job["workflowId"] for m in seen)
    assert [m["seq"] for m in seen] == sorted(m["seq"] for m in seen)
    done = seen[-1]
    assert done["status"] == "completed" and done["backend"] == "local"
    assert done["outputs"][0]["filename"].startswith("peer_chain_")
    assert done["completionTime"] >= done["startTime"]
    await ws.close()
