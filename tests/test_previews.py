"""Live previews: ComfyUI's binary preview frames (with metadata, and the
legacy form), kept in memory one per running job, served at
/v1/comfyui/workflow/{id}/preview and announced on the stream, coalesced."""

from __future__ import annotations

import asyncio
import struct

import pytest
from test_bridge import get_job, status_is, submit, wait_backends_up, wait_job

import comfymgr
from conftest import HEADERS


def sampler_workflow(steps=12):
    """EmptyImage -> ImageUpscaleWithModel-like progress node -> SaveImage; the
    progress node is ImageBlur with progress steps and previews configured."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                     "color": 0}},
        "10": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3,
                                                     "sigma": 1.0}},
        "99": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "pv"}},
    }


@pytest.fixture
def previewing(fake):
    fake.preview_nodes.add("ImageBlur")
    fake.progress_steps["ImageBlur"] = 12
    return fake


async def preview(client, job_id, **headers):
    return await client.get(f"/v1/comfyui/workflow/{job_id}/preview", headers={**HEADERS, **headers})


@pytest.mark.parametrize("legacy", [False, True], ids=["with metadata", "legacy frames"])
async def test_the_latest_preview_is_served_while_the_job_runs(make_client, make_config, previewing,
                                                               legacy):
    previewing.legacy_previews = legacy
    gate = previewing.gate("ImageBlur")
    client = await make_client(make_config(comfyui_url=previewing.url, progress_interval=0.0))
    await wait_backends_up(client)
    ws = await client.ws_connect("/v1/comfyui/stream", headers=HEADERS)
    job = await submit(client, sampler_workflow())
    running = await wait_job(client, job["workflowId"], status_is("running"))
    await previewing.wait_for_gated(running["promptId"], "10")
    assert [p[0] for p in previewing.previews_sent] == [1 if legacy else 4] * 12

    async def latest():
        for _ in range(500):
            resp = await preview(client, job["workflowId"])
            if resp.status == 200 and resp.headers["X-Preview-Counter"] == "12":
                return resp
            await asyncio.sleep(0.01)
        raise AssertionError("the last preview never arrived")

    resp = await latest()
    body = await resp.read()
    assert resp.content_type == "image/png" and body.startswith(b"\x89PNG\r\n\x1a\n")
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["ETag"] == f'"{running["promptId"]}-12"'
    assert resp.headers.get("X-Preview-Node") == (None if legacy else "10")
    again = await preview(client, job["workflowId"], **{"If-None-Match": resp.headers["ETag"]})
    assert again.status == 304
    # The stream heard of them coalesced: at most 2 a second, the last one included.
    previews = []
    while not previews or previews[-1]["counter"] != 12:
        message = await asyncio.wait_for(ws.receive_json(), 10)
        if message["type"] == "workflow:preview":
            previews.append(message)
    assert 1 <= len(previews) <= 3, previews
    assert previews[-1] == {"type": "workflow:preview", "workflowId": job["workflowId"],
                            "nodeId": None if legacy else "10",
                            "url": f"/v1/comfyui/workflow/{job['workflowId']}/preview",
                            "counter": 12, "timestamp": previews[-1]["timestamp"]}
    gate.set()
    await wait_job(client, job["workflowId"], status_is("completed"))
    resp = await preview(client, job["workflowId"])
    assert resp.status == 404
    assert (await resp.json())["error"] == "no_preview"  # nothing kept after the end
    assert all(not b.runs for b in client.app[comfymgr.BRIDGE].backends.values())
    # Not stored, so never replayed.
    events = await client.app[comfymgr.DB].read(lambda s: s.events_since(0, job_ids=[job["workflowId"]]))
    assert "workflow:preview" not in {e.type for e in events}
    await ws.close()


async def test_a_client_can_refuse_previews(make_client, make_config, previewing):
    client = await make_client(make_config(comfyui_url=previewing.url, progress_interval=0.0))
    await wait_backends_up(client)
    quiet = await client.ws_connect("/v1/comfyui/stream?previews=false", headers=HEADERS)
    later = await client.ws_connect("/v1/comfyui/stream", headers=HEADERS)
    await later.send_json({"type": "subscribe", "all": True, "previews": False})
    assert (await later.receive_json())["type"] == "subscribed"
    job = await submit(client, sampler_workflow())
    for ws in (quiet, later):
        kinds = []
        while not kinds or kinds[-1] != "workflow:completed":
            kinds.append((await asyncio.wait_for(ws.receive_json(), 10))["type"])
        assert "workflow:preview" not in kinds
        await ws.close()
    assert len(previewing.previews_sent) == 12
    assert (await get_job(client, job["workflowId"]))["status"] == "completed"


FRAMES = {
    "short": b"\x00\x00\x00\x01\x00",
    "unknown event": struct.pack(">II", 9, 2) + b"\x89PNG\r\n\x1a\n",
    "unknown image type": struct.pack(">II", 1, 7) + b"\x89PNG\r\n\x1a\n",
    "not an image": struct.pack(">II", 1, 2) + b"GIF89a....",
    "metadata longer than the frame": struct.pack(">II", 4, 5000) + b"{}",
    "metadata not JSON": struct.pack(">II", 4, 3) + b"{x}" + b"\x89PNG\r\n\x1a\n",
    "metadata not an object": struct.pack(">II", 4, 2) + b"[]" + b"\x89PNG\r\n\x1a\n",
    "metadata without an image type": struct.pack(">II", 4, 2) + b"{}" + b"\x89PNG\r\n\x1a\n",
}


async def test_malformed_frames_are_ignored_and_counted(make_client, make_config, fake):
    gate = fake.gate("ImageBlur")
    client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0))
    await wait_backends_up(client)
    job = await submit(client, sampler_workflow())
    running = await wait_job(client, job["workflowId"], status_is("running"))
    await fake.wait_for_gated(running["promptId"], "10")
    for frame in FRAMES.values():
        fake.send_binary(frame)
    fake.send_binary(struct.pack(">I", 3) + b"\x00\x00\x00\x0210some text")  # progress text: known
    await fake.wait_flushed()
    gate.set()
    done = await wait_job(client, job["workflowId"], status_is("completed", "failed"))
    assert done["status"] == "completed"
    assert (await preview(client, job["workflowId"])).status == 404
    text = await (await client.get("/metrics")).text()
    assert 'comfymgr_backend_messages_ignored_total{backend="local",reason="unreadable"} 7.0' in text
    assert 'comfymgr_backend_messages_ignored_total{backend="local",reason="unknown_type"} 1.0' in text


def test_frames_are_read_as_comfyui_writes_them():
    png = b"\x89PNG\r\n\x1a\n" + b"x" * 10
    assert comfymgr._read_binary_frame(struct.pack(">II", 1, 2) + png) == (1, "image/png", png, {})
    metadata = b'{"node_id": "3", "prompt_id": "p", "image_type": "image/jpeg"}'
    jpeg = b"\xff\xd8\xff\xe0" + b"y" * 10
    assert comfymgr._read_binary_frame(struct.pack(">II", 4, len(metadata)) + metadata + jpeg) == (
        4, "image/jpeg", jpeg, {"node_id": "3", "prompt_id": "p", "image_type": "image/jpeg"})
    for name, frame in FRAMES.items():
        read = comfymgr._read_binary_frame(frame)
        assert read is None or read[0] == 9, name
