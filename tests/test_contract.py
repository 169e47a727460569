"""The bridge scenarios against a REAL ComfyUI, when one is reachable.

    make contract COMFYUI_URL=http://127.0.0.1:8188

runs them (skipped otherwise: CI has no ComfyUI). The workflows are the
model-free ones of the recordings; they need no weights. The contract is
what the fake claims: same answers, same ends, outputs from /history.
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid

import aiohttp
import pytest
from test_bridge import get_job, status_is, submit, unique, wait_backends_up, wait_job

from conftest import HEADERS, workflow

URL = os.environ.get("COMFYMGR_CONTRACT_URL", "")
pytestmark = pytest.mark.skipif(not URL, reason="set COMFYMGR_CONTRACT_URL (make contract COMFYUI_URL=...)")
WAIT = 120.0  # a real CPU ComfyUI blurs 2048 px in seconds


@pytest.fixture
def real_config(make_config):
    def make(**overrides):
        return make_config(comfyui_url=URL.rstrip("/"), progress_interval=0.0,
                           reconcile_interval=1.0, backend_timeout=30.0, **overrides)
    return make


def tagged(graph):
    """A copy no earlier prompt can serve from ComfyUI's cache. ComfyUI caches
    per node, keyed by the node's inputs and those of its ancestors: a new
    SaveImage prefix alone re-runs only SaveImage, and a slow graph run just
    before is served from cache in ~0.2 s. A new EmptyImage colour changes the
    key of every node downstream of it."""
    graph = unique(graph, uuid.uuid4().hex[:8])
    for node in graph.values():
        if node["class_type"] == "EmptyImage":
            node["inputs"]["color"] = random.randrange(0x1000000)
    return graph


@pytest.fixture(autouse=True)
async def idle_comfyui():
    """Leave the real ComfyUI idle after each test, so that a test that fails
    mid-way does not leave a slow prompt running under the next one."""
    yield
    async with aiohttp.ClientSession() as session:
        await session.post(f"{URL.rstrip('/')}/queue", json={"clear": True})
        for _ in range(600):
            async with session.get(f"{URL.rstrip('/')}/queue") as resp:
                queue = await resp.json()
            if not queue["queue_running"] and not queue["queue_pending"]:
                return
            for item in queue["queue_running"]:  # [number, prompt_id, ...]
                await session.post(f"{URL.rstrip('/')}/interrupt", json={"prompt_id": item[1]})
            await asyncio.sleep(0.1)


async def comfyui_history(prompt_id):
    async with aiohttp.ClientSession() as session, \
            session.get(f"{URL.rstrip('/')}/history/{prompt_id}") as resp:
        assert resp.status == 200
        return await resp.json()


async def test_success_and_chain(make_client, real_config):
    client = await make_client(real_config())
    await wait_backends_up(client, timeout=WAIT)
    for name in ("simple", "chain"):
        job = await submit(client, tagged(workflow(name)))
        done = await wait_job(client, job["workflowId"], status_is("completed", "failed"), WAIT)
        assert done["status"] == "completed", done
        assert done["progress"] == 100 and done["outputs"]
        assert all(o["type"] == "output" for o in done["outputs"])


async def test_cached_rerun_completes_with_outputs(make_client, real_config):
    client = await make_client(real_config())
    await wait_backends_up(client, timeout=WAIT)
    graph = tagged(workflow("chain"))
    first = await wait_job(client, (await submit(client, graph))["workflowId"],
                           status_is("completed", "failed"), WAIT)
    second = await wait_job(client, (await submit(client, graph))["workflowId"],
                            status_is("completed", "failed"), WAIT)
    assert second["status"] == "completed"
    assert [o["filename"] for o in second["outputs"]] == [o["filename"] for o in first["outputs"]]


async def test_validation_at_submit_and_at_dispatch(make_client, real_config):
    client = await make_client(real_config())
    await wait_backends_up(client, timeout=WAIT)
    body = await submit(client, {"1": {"class_type": "NoSuchNode", "inputs": {}},
                                 "2": {"class_type": "SaveImage",
                                       "inputs": {"images": ["1", 0], "filename_prefix": "x"}}},
                        status=400)
    assert body["error"] == "invalid_workflow"
    graph = tagged(workflow("simple"))
    graph["1"]["inputs"]["width"] = 0
    job = await submit(client, graph)
    done = await wait_job(client, job["workflowId"], status_is("failed", "completed"), WAIT)
    assert done["status"] == "failed" and done["error"]["code"] == "invalid_workflow"
    assert done["error"]["details"]["node_errors"]["1"]["errors"][0]["type"] == "value_smaller_than_min"


async def test_execution_error(make_client, real_config):
    client = await make_client(real_config())
    await wait_backends_up(client, timeout=WAIT)
    name = f"contract_corrupt_{uuid.uuid4().hex[:6]}.png"
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("image", b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, filename=name,
                   content_type="image/png")
    resp = await client.post("/v1/comfyui/inputs", data=form, headers=HEADERS)
    assert resp.status == 201, await resp.text()
    value = (await resp.json())["workflowValue"]
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": value}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "e"}}}
    job = await submit(client, graph)
    done = await wait_job(client, job["workflowId"], status_is("failed", "completed"), WAIT)
    assert done["status"] == "failed" and done["error"]["code"] == "execution_error"
    assert done["error"]["nodeType"] == "LoadImage"


async def test_cancel_queued_and_running(make_client, real_config):
    client = await make_client(real_config())
    await wait_backends_up(client, timeout=WAIT)
    slow = tagged(json_slow())
    running = await submit(client, slow)
    await wait_job(client, running["workflowId"], status_is("running"), WAIT)
    # With prefetch (the default) the next job goes to ComfyUI's own queue
    # while the slow one runs; only the one after it waits in comfymgr's.
    prefetched = await submit(client, tagged(workflow("simple")))
    prefetched = await wait_job(client, prefetched["workflowId"],
                                lambda j: j["state"] == "submitted", WAIT)
    queued = await submit(client, tagged(workflow("simple")))
    assert queued["state"] == "queued"
    resp = await client.delete(f"/v1/comfyui/workflow/{queued['workflowId']}", headers=HEADERS)
    assert resp.status == 200
    assert (await resp.json())["status"] == "cancelled"
    # In ComfyUI's queue: removed there (POST /queue delete), never run.
    resp = await client.delete(f"/v1/comfyui/workflow/{prefetched['workflowId']}", headers=HEADERS)
    assert resp.status == 200  # removed from ComfyUI's queue before the answer
    done = await get_job(client, prefetched["workflowId"])
    assert done["status"] == "cancelled", done
    assert await comfyui_history(prefetched["promptId"]) == {}
    resp = await client.delete(f"/v1/comfyui/workflow/{running['workflowId']}", headers=HEADERS)
    assert resp.status == 202
    done = await wait_job(client, running["workflowId"], status_is("cancelled", "failed", "completed"), WAIT)
    assert done["status"] == "cancelled", done


async def test_timeout(make_client, real_config):
    client = await make_client(real_config())
    await wait_backends_up(client, timeout=WAIT)
    job = await submit(client, tagged(json_slow()), timeout=1)
    done = await wait_job(client, job["workflowId"], status_is("failed", "completed", "cancelled"), WAIT)
    assert done["status"] == "failed" and done["error"]["code"] == "timeout"


def json_slow():
    import json

    from conftest import DATA
    return json.loads((DATA / "workflows" / "slow.json").read_text())


# -- with the custom nodes of tests/comfyui_nodes ----------------------------------------------

async def custom_nodes(*names):
    """Skip unless the real ComfyUI has the test custom nodes installed."""
    async with aiohttp.ClientSession() as session:
        for name in names:
            async with session.get(f"{URL.rstrip('/')}/object_info/{name}") as resp:
                if name not in await resp.json():
                    pytest.skip(f"ComfyUI lacks the {name} node: copy tests/comfyui_nodes/"
                                "comfymgr_test_nodes into its custom_nodes folder and restart it")


async def test_custom_node_broadcasting_its_own_messages_wedges_nothing(make_client, real_config):
    """Node packs broadcast messages of their own types, and known types with
    data that is text, a list, a number or null, while a prompt runs: the job
    completes, and so does the next one."""
    await custom_nodes("ComfymgrChatter")
    client = await make_client(real_config())
    await wait_backends_up(client, timeout=WAIT)
    graph = tagged(workflow("simple"))
    graph["5"] = {"class_type": "ComfymgrChatter", "inputs": {"image": ["1", 0], "rounds": 5}}
    graph["2"]["inputs"]["images"] = ["5", 0]
    for _ in range(2):
        job = await submit(client, tagged(graph))
        done = await wait_job(client, job["workflowId"], status_is("completed", "failed"), WAIT)
        assert done["status"] == "completed", done
    status = await (await client.get("/v1/status", headers=HEADERS)).json()
    assert status["backends"][0]["state"] == "up"
    assert not [t for t in status["tasks"] if t["failures"]]
    text = await (await client.get("/metrics")).text()
    assert 'comfymgr_backend_messages_ignored_total{backend="local",reason="unknown_type"}' in text
    assert 'comfymgr_backend_messages_ignored_total{backend="local",reason="bad_shape"}' in text


async def test_previews_of_a_running_node_are_served_as_jpeg(make_client, real_config):
    """A node that reports progress with preview images the way samplers do:
    while it runs, the preview endpoint answers the latest JPEG."""
    await custom_nodes("ComfymgrPreviewSteps")
    client = await make_client(real_config())
    await wait_backends_up(client, timeout=WAIT)
    graph = tagged(workflow("simple"))
    graph["5"] = {"class_type": "ComfymgrPreviewSteps",
                  "inputs": {"image": ["1", 0], "steps": 20, "seconds_per_step": 0.25}}
    graph["2"]["inputs"]["images"] = ["5", 0]
    job = await submit(client, graph)
    counters = []
    while True:
        state = await get_job(client, job["workflowId"])
        if state["status"] != "running" and state["status"] != "queued":
            break
        resp = await client.get(f"/v1/comfyui/workflow/{job['workflowId']}/preview", headers=HEADERS)
        if resp.status == 200:
            body = await resp.read()
            assert resp.content_type == "image/jpeg" and body.startswith(b"\xff\xd8\xff")
            assert resp.headers["X-Preview-Node"] == "5"
            counters.append(int(resp.headers["X-Preview-Counter"]))
        else:
            assert (await resp.json())["error"] == "no_preview"
        await asyncio.sleep(0.2)
    assert state["status"] == "completed", state
    assert counters and counters == sorted(counters) and counters[-1] > counters[0], counters
    resp = await client.get(f"/v1/comfyui/workflow/{job['workflowId']}/preview", headers=HEADERS)
    assert resp.status == 404


def _png_pixels(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, channels, rows) of an 8-bit RGB/RGBA PNG, stdlib only."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    idat = b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            idat += body
        else:
            chunks.setdefault(kind, body)
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and color in (2, 6), (depth, color)
    channels = 3 if color == 2 else 4
    raw, stride, rows, previous = zlib.decompress(idat), width * channels, [], bytes(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up, corner = previous[x], previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, channels, rows


async def test_one_call_inline_png_in_inverted_png_out(make_client, real_config):
    """An inline PNG through LoadImage -> ImageInvert -> SaveImage, waiting,
    with the result inline: the returned image is the inverted input."""
    import base64

    from fake_comfyui import _png_bytes

    client = await make_client(real_config())
    await wait_backends_up(client, timeout=WAIT)
    color = (random.randrange(256), random.randrange(256), random.randrange(256))
    source = _png_bytes(16, 8, color, [])
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": "photo"}},
             "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                         "filename_prefix": f"onecall_{uuid.uuid4().hex[:8]}"}}}
    resp = await client.post("/v1/comfyui/workflow?wait=120&include=data", headers=HEADERS, json={
        "workflow": graph, "inputs": {"photo": "data:image/png;base64," + base64.b64encode(source).decode()}})
    assert resp.status == 200, await resp.text()
    job = await resp.json()
    assert job["status"] == "completed", job
    [output] = job["outputs"]
    assert output["contentType"] == "image/png"
    width, height, channels, rows = _png_pixels(base64.b64decode(output["data"]))
    assert (width, height) == (16, 8)
    # ComfyUI inverts in floats and truncates back to 8 bits: 255 - c, or one less.
    inverted = [255 - c for c in color]
    assert all(0 <= want - got <= 1 for row in rows for x in range(width)
               for want, got in zip(inverted, row[x * channels:x * channels + 3])), (color, rows[0][:9])
    download = await client.get(output["url"], headers=HEADERS)  # through ComfyUI's /view
    assert download.status == 200 and await download.read() == base64.b64decode(output["data"])
