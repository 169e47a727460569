"""One call from workflow to pictures: inline inputs (data: URI, base64, URL),
?wait= for the end, ?include=data for the outputs' bytes, and downloads that
work without COMFYUI_OUTPUTS (through ComfyUI's /view)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket

import aiohttp
import pytest
from aiohttp import web
from test_bridge import get_job, status_is, wait_backends_up, wait_job

import comfymgr
from conftest import HEADERS
from fake_comfyui import _png_bytes

PNG = _png_bytes(16, 16, (200, 10, 10), [])
OTHER_PNG = _png_bytes(8, 8, (1, 2, 3), [])
SUBMIT = "/v1/comfyui/workflow"


def loadimage(value="photo", prefix="inv"):
    return {"1": {"class_type": "LoadImage", "inputs": {"image": value}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}}


def data_uri(data=PNG, kind="image/png"):
    return f"data:{kind};base64," + base64.b64encode(data).decode()


@pytest.fixture
def one_call(make_client, make_config, fake):
    async def make(**overrides):
        values = dict(comfyui_url=fake.url, progress_interval=0.0, reconcile_interval=0.1)
        values.update(overrides)
        client = await make_client(make_config(**values))
        await wait_backends_up(client)
        return client
    return make


async def post(client, body, query="", status=None):
    resp = await client.post(SUBMIT + query, json=body, headers=HEADERS)
    payload = await resp.json()
    if status is not None:
        assert resp.status == status, payload
    return resp.status, payload


async def no_jobs(client):
    listed = await (await client.get("/v1/comfyui/workflows", headers=HEADERS)).json()
    return listed["workflows"] == []


# -- inline inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("encode", [data_uri, lambda d: base64.b64encode(d).decode(),
                                    lambda d: base64.encodebytes(d).decode()],  # wrapped lines
                         ids=["data URI", "bare base64", "base64 in lines"])
async def test_an_inline_input_is_uploaded_under_a_job_unique_name(one_call, fake, encode):
    client = await one_call()
    _, job = await post(client, {"workflow": loadimage(), "inputs": {"photo": encode(PNG)}},
                        query="?wait=30", status=200)
    assert job["status"] == "completed", job
    stored = fake._dirs.input / "comfymgr-jobs" / job["workflowId"] / "photo.png"
    # The fake ran LoadImage on the rewritten name: the job-unique file of these bytes.
    assert fake.posted_prompt_ids == [job["promptId"]]
    prompt = fake._queue.history[job["promptId"]]["prompt"][2]
    assert prompt["1"]["inputs"]["image"] == f"comfymgr-jobs/{job['workflowId']}/photo.png"
    assert stored.read_bytes() == PNG
    # comfymgr's own copy is gone once the job ended (ComfyUI's copy stays: it has no delete).
    state = client.app[comfymgr.CONFIG].state_dir / "inputs" / job["workflowId"]
    for _ in range(100):
        if not state.exists():
            break
        await asyncio.sleep(0.01)
    assert not state.exists()


async def test_with_comfyui_inputs_the_file_is_written_there_and_removed_after(one_call, fake):
    client = await one_call(inputs_dir=fake._dirs.input)
    _, job = await post(client, {"workflow": loadimage(), "inputs": {"photo": data_uri()}},
                        query="?wait=30", status=200)
    assert job["status"] == "completed", job
    assert not [r for r in fake.requests if r[1].endswith("/upload/image")]  # no upload needed
    folder = fake._dirs.input / "comfymgr-jobs" / job["workflowId"]
    for _ in range(100):
        if not folder.exists():
            break
        await asyncio.sleep(0.01)
    assert not folder.exists()


async def test_keep_inputs_keeps_them(one_call, fake):
    client = await one_call(inputs_dir=fake._dirs.input, keep_inputs=True)
    _, job = await post(client, {"workflow": loadimage(), "inputs": {"photo": data_uri()}},
                        query="?wait=30", status=200)
    await asyncio.sleep(0.2)
    assert (fake._dirs.input / "comfymgr-jobs" / job["workflowId"] / "photo.png").read_bytes() == PNG


async def test_every_string_equal_to_the_name_is_replaced(one_call, fake):
    client = await one_call()
    graph = loadimage("left")
    graph["4"] = {"class_type": "LoadImage", "inputs": {"image": "right"}}
    graph["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "left"}}
    _, job = await post(client, {"workflow": graph, "inputs": {"left": data_uri(),
                                                               "right": data_uri(OTHER_PNG)}},
                        query="?wait=30", status=200)
    assert job["status"] == "completed", job
    prompt = fake._queue.history[job["promptId"]]["prompt"][2]
    folder = f"comfymgr-jobs/{job['workflowId']}"
    assert prompt["1"]["inputs"]["image"] == f"{folder}/left.png"
    assert prompt["4"]["inputs"]["image"] == f"{folder}/right.png"
    assert prompt["5"]["inputs"]["filename_prefix"] == f"{folder}/left.png"  # every string equal to it
    assert (fake._dirs.input / folder / "right.png").read_bytes() == OTHER_PNG


@pytest.fixture
async def images(aiohttp_server):
    """An HTTP server with input images, and ways to misbehave."""
    async def serve(request):
        name = request.match_info["name"]
        if name == "photo.png":
            return web.Response(body=PNG, content_type="image/png")
        if name == "page.html":
            return web.Response(text="<html>not an image</html>", content_type="text/html")
        if name == "missing.png":
            raise web.HTTPNotFound()
        if name == "big.png":
            return web.Response(body=PNG + b"\0" * 4096, content_type="image/png")
        if name == "to-metadata":
            raise web.HTTPFound("http://169.254.169.254/latest")
        if name == "to-photo":
            raise web.HTTPFound("/photo.png")
        if name == "to-nothing":  # a Location that is no URL (a port past 65535)
            return web.Response(status=302, headers={"Location": "http://a:99999/"})
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_get("/{name}", serve)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


async def test_an_input_url_is_fetched_when_the_policy_allows_it(one_call, fake, images):
    allowed = await one_call(webhook_allow=comfymgr._parse_hosts_and_networks("127.0.0.1"))
    for url in (f"{images}/photo.png", f"{images}/to-photo"):
        _, job = await post(allowed, {"workflow": loadimage(), "inputs": {"photo": url}},
                            query="?wait=30", status=200)
        assert job["status"] == "completed", job
        assert (fake._dirs.input / "comfymgr-jobs" / job["workflowId"] / "photo.png").read_bytes() == PNG
    await allowed.close()
    refused = await one_call()  # the same state directory: two jobs there already
    status, body = await post(refused, {"workflow": loadimage(), "inputs": {"photo": f"{images}/photo.png"}})
    assert (status, body["error"], body["details"]) == (
        400, "input_forbidden", {"field": "inputs.photo", "reason": "a loopback address"})
    listed = await (await refused.get("/v1/comfyui/workflows", headers=HEADERS)).json()
    assert len(listed["workflows"]) == 2


async def test_each_bad_input_is_refused_by_name_and_nothing_is_queued(one_call, images):
    client = await one_call(webhook_allow=comfymgr._parse_hosts_and_networks("127.0.0.1"),
                            max_input_bytes=2048)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}/x.png"
    cases = [
        ({"photo": "not base64 at all!"}, 400, "invalid_input",
         "inputs.photo: neither base64, a data: URI with base64, nor an http(s) URL"),
        ({"photo": "data:image/png,rawbytes"}, 400, "invalid_input",
         "inputs.photo: a data: URI must be data:<type>;base64,<data>"),
        ({"photo": base64.b64encode(b"GIF8 is not quite a gif").decode()}, 400, "invalid_image",
         "inputs.photo: not a PNG, JPEG, WebP, GIF, BMP or TIFF image"),
        ({"photo": f"{images}/page.html"}, 400, "invalid_image",
         "inputs.photo: not a PNG, JPEG, WebP, GIF, BMP or TIFF image"),
        ({"photo": data_uri(), "elsewhere": data_uri()}, 400, "input_not_used",
         "inputs.elsewhere: no input of the workflow is 'elsewhere'; put that name where the "
         "image goes (e.g. LoadImage's image)"),
        ({"photo": data_uri(PNG + b"\0" * 4096)}, 413, "payload_too_large",
         "inputs.photo: over the limit of 2048 bytes (COMFYMGR_MAX_INPUT_BYTES)"),
        ({"photo": f"{images}/big.png"}, 413, "payload_too_large",
         "inputs.photo: over the limit of 2048 bytes (COMFYMGR_MAX_INPUT_BYTES)"),
        ({"photo": f"{images}/missing.png"}, 422, "input_unavailable",
         f"inputs.photo: {images}/missing.png answered HTTP 404"),
        ({"photo": nowhere}, 422, "input_unavailable", f"inputs.photo: {nowhere} could not be fetched"),
        ({"photo": f"{images}/to-nothing"}, 422, "input_unavailable",
         f"inputs.photo: {images}/to-nothing redirected to something that is not a URL"),
        ({"photo": f"{images}/to-metadata"}, 400, "input_forbidden",
         "inputs.photo: http://169.254.169.254/latest is a cloud metadata address; comfymgr sends "
         "requests only to public addresses (see COMFYMGR_WEBHOOK_ALLOW)"),
    ]
    for inputs, status, code, message in cases:
        got, body = await post(client, {"workflow": loadimage(), "inputs": inputs})
        assert (got, body["error"], body["message"]) == (status, code, message), inputs
        assert body["details"]["field"] == f"inputs.{next(n for n in inputs if n in message)}"
    assert await no_jobs(client)
    assert not (client.app[comfymgr.CONFIG].state_dir / "inputs").exists() or \
        not any((client.app[comfymgr.CONFIG].state_dir / "inputs").iterdir())


# -- waiting --------------------------------------------------------------------------------

async def test_wait_answers_200_at_the_end_and_202_when_the_time_is_up(one_call, fake):
    gate = fake.gate("ImageInvert")
    client = await one_call()
    status, job = await post(client, {"workflow": loadimage(), "inputs": {"photo": data_uri()}},
                             query="?wait=0.3")
    assert status == 202 and job["status"] in ("queued", "running")
    resp = await client.get(f"{SUBMIT}/{job['workflowId']}?wait=0.3", headers=HEADERS)
    assert resp.status == 200 and (await resp.json())["status"] == "running"

    async def later():
        await asyncio.sleep(0.2)
        gate.set()

    opener = asyncio.ensure_future(later())
    resp = await client.get(f"{SUBMIT}/{job['workflowId']}?wait=30", headers=HEADERS)
    assert resp.status == 200 and (await resp.json())["status"] == "completed"
    await opener
    # An ended job answers at once whatever the wait.
    resp = await client.get(f"{SUBMIT}/{job['workflowId']}?wait=30", headers=HEADERS)
    assert (await resp.json())["status"] == "completed"


async def test_the_wait_is_capped_and_checked(one_call, fake):
    fake.gate("ImageInvert")
    client = await one_call(max_wait=0.2)
    status, job = await post(client, {"workflow": loadimage(), "inputs": {"photo": data_uri()}},
                             query="?wait=3600")
    assert status == 202
    for query, message in (("?wait=-1", "wait: must be >= 0"), ("?wait=x", "wait: must be a number"),
                           ("?wait=1e999", "wait: must be a number"),
                           ("?include=everything", "include: must be one of data")):
        resp = await client.get(f"{SUBMIT}/{job['workflowId']}{query}", headers=HEADERS)
        assert resp.status == 400 and (await resp.json())["message"] == message


async def test_shutdown_answers_waiters_at_once(make_client, make_config, fake):
    fake.gate("ImageInvert")
    client = await make_client(make_config(comfyui_url=fake.url))
    await wait_backends_up(client)
    status, job = await post(client, {"workflow": loadimage(), "inputs": {"photo": data_uri()}})
    waiting = asyncio.ensure_future(client.get(f"{SUBMIT}/{job['workflowId']}?wait=60", headers=HEADERS))
    while not len(client.app[comfymgr.WAITERS]):
        await asyncio.sleep(0.01)
    await client.app.shutdown()  # what a SIGTERM starts with
    resp = await asyncio.wait_for(waiting, 5)
    assert resp.status == 200 and (await resp.json())["status"] in ("queued", "running")


async def test_a_client_that_goes_away_leaves_no_waiter(one_call, fake):
    fake.gate("ImageInvert")
    client = await one_call()
    _, job = await post(client, {"workflow": loadimage(), "inputs": {"photo": data_uri()}})
    comfymgr._Waiters._CHECK = 0.05
    try:
        async with aiohttp.ClientSession() as session:
            url = str(client.make_url(f"{SUBMIT}/{job['workflowId']}?wait=60"))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(session.get(url, headers=HEADERS), 0.2)
        for _ in range(200):
            if not len(client.app[comfymgr.WAITERS]):
                break
            await asyncio.sleep(0.01)
        assert len(client.app[comfymgr.WAITERS]) == 0
    finally:
        comfymgr._Waiters._CHECK = 5.0


# -- outputs inline, and downloads through ComfyUI -------------------------------------------

async def test_include_data_equals_the_download(one_call, fake):
    client = await one_call()  # no COMFYUI_OUTPUTS: the bytes come from ComfyUI's /view
    _, job = await post(client, {"workflow": loadimage(), "inputs": {"photo": data_uri()}},
                        query="?wait=30&include=data", status=200)
    [output] = job["outputs"]
    download = await client.get(output["url"], headers=HEADERS)
    assert download.status == 200
    body = await download.read()
    assert base64.b64decode(output["data"]) == body == (fake._dirs.output / output["filename"]).read_bytes()
    assert output["contentType"] == "image/png" == download.content_type
    again = await (await client.get(f"{SUBMIT}/{job['workflowId']}?include=data", headers=HEADERS)).json()
    assert again["outputs"] == job["outputs"]
    plain = await get_job(client, job["workflowId"])
    assert "data" not in plain["outputs"][0]


async def test_outputs_over_the_inline_limit_keep_only_their_url(one_call, fake):
    client = await one_call(inline_max_bytes=10, outputs_dir=fake._dirs.output)
    _, job = await post(client, {"workflow": loadimage(), "inputs": {"photo": data_uri()}},
                        query="?wait=30&include=data", status=200)
    [output] = job["outputs"]
    assert output["dataOmitted"] == "too_large" and "data" not in output and output["url"]


async def test_downloads_through_comfyui_keep_range_etag_and_headers(one_call, fake):
    client = await one_call()
    _, job = await post(client, {"workflow": loadimage(), "inputs": {"photo": data_uri()}},
                        query="?wait=30", status=200)
    [output] = job["outputs"]
    whole = (fake._dirs.output / output["filename"]).read_bytes()
    resp = await client.get(output["url"], headers=HEADERS)
    assert resp.status == 200 and await resp.read() == whole
    assert resp.headers["Content-Security-Policy"].endswith("sandbox")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Content-Disposition"] == f"inline; filename*=UTF-8''{output['filename']}"
    etag = resp.headers["ETag"]
    part = await client.get(output["url"], headers={**HEADERS, "Range": "bytes=4-11"})
    assert part.status == 206 and await part.read() == whole[4:12]
    assert part.headers["Content-Range"] == f"bytes 4-11/{len(whole)}"
    cached = await client.get(output["url"], headers={**HEADERS, "If-None-Match": etag})
    assert cached.status == 304
    head = await client.head(output["url"], headers=HEADERS)
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(whole)
    outside = await client.get(output["url"], headers={**HEADERS, "Range": f"bytes={len(whole) + 5}-"})
    assert outside.status == 416
    assert (await outside.json())["error"] == "range_not_satisfiable"
    missing = await client.get("/v1/comfyui/output/never-made.png", headers=HEADERS)
    assert missing.status == 404 and (await missing.json())["message"] == "no such file"
    listed = await (await client.get(f"/v1/comfyui/outputs?workflowId={job['workflowId']}",
                                     headers=HEADERS)).json()
    assert [o["url"] for o in listed["outputs"]] == [output["url"]]
    await fake.stop()  # the backend that holds it is gone
    gone = await client.get(output["url"], headers=HEADERS)
    assert gone.status == 503 and (await gone.json())["error"] == "backend_unavailable"


async def test_a_webhook_can_carry_the_outputs_bytes(one_call, fake, aiohttp_server):
    received = []

    async def hook(request):
        received.append(json.loads(await request.read()))
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    client = await one_call(webhook_allow=comfymgr._parse_hosts_and_networks("127.0.0.1"))
    _, job = await post(client, {"workflow": loadimage(), "inputs": {"photo": data_uri()},
                                 "webhook": {"url": f"http://127.0.0.1:{server.port}/hook",
                                             "include": ["data"]}}, query="?wait=30", status=200)
    assert job["webhook"]["include"] == ["data"]
    for _ in range(500):
        if received:
            break
        await asyncio.sleep(0.01)
    [payload] = received
    [output] = payload["outputs"]
    assert hashlib.sha256(base64.b64decode(output["data"])).digest() == \
        hashlib.sha256((fake._dirs.output / output["filename"]).read_bytes()).digest()
    done = await wait_job(client, job["workflowId"], status_is("completed"))
    assert done["webhook"]["deliveries"][0]["state"] == "delivered"
