"""Models, outputs and inputs against real temporary folders; downloads
with their HTTP edge cases; a traversal corpus; uploads; retention."""

from __future__ import annotations

import hashlib
import logging
import os

import aiohttp
import pytest
from test_bridge import status_is, submit, wait_backends_up, wait_job

import comfymgr
from conftest import HEADERS, workflow
from fake_comfyui import FakeComfyUI

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")
SECRET = b"TOP-SECRET-d0c9a7"


def write(path, data=b"x", mtime=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def dirs(tmp_path):
    d = {name: tmp_path / name for name in ("outputs", "temp", "inputs", "ckpt", "loras", "vae",
                                             "controlnet", "upscale")}
    for path in d.values():
        path.mkdir()
    write(tmp_path / "secret.txt", SECRET)
    return d


@pytest.fixture
def files_config(make_config, dirs):
    def make(**overrides):
        values = dict(outputs_dir=dirs["outputs"], temp_dir=dirs["temp"],
                      models_checkpoints=dirs["ckpt"], models_loras=dirs["loras"],
                      models_vae=dirs["vae"], models_controlnet=dirs["controlnet"],
                      models_upscale=dirs["upscale"], comfyui_url="http://127.0.0.1:9")
        values.update(overrides)
        return make_config(**values)
    return make


async def get_json(client, path, status=200, **params):
    resp = await client.get(path, params=params, headers=HEADERS)
    body = await resp.json()
    assert resp.status == status, body
    return body


# -- models ----------------------------------------------------------------------------

async def test_models_listing_nested_filtered_with_background_hashes(make_client, files_config, dirs):
    write(dirs["ckpt"] / "sdxl" / "base.safetensors", b"weights-1")
    write(dirs["ckpt"] / "v15.ckpt", b"weights-22")
    write(dirs["ckpt"] / "notes.txt", b"not a model")
    write(dirs["ckpt"] / "sdxl" / "preview.png", PNG)
    write(dirs["loras"] / "style.gguf", b"lora")
    client = await make_client(files_config())
    body = await get_json(client, "/v1/comfyui/models", type="checkpoints")
    assert [(m["name"], m["size"], m["hash"]) for m in body["models"]] == [
        ("sdxl/base.safetensors", 9, None), ("v15.ckpt", 10, None)]
    assert body["folders"] == [{"type": "checkpoints", "source": "folder",
                                "path": str(dirs["ckpt"]), "status": "ok"}]
    assert all(m["type"] == "checkpoints" and isinstance(m["modified"], int) for m in body["models"])
    await client.app[comfymgr.FILES].hashes_done()
    body = await get_json(client, "/v1/comfyui/models", type="checkpoints")
    assert body["models"][0]["hash"] == hashlib.sha256(b"weights-1").hexdigest()
    assert body["models"][1]["hash"] == hashlib.sha256(b"weights-22").hexdigest()
    # A changed file loses its hash until the next background pass.
    write(dirs["ckpt"] / "v15.ckpt", b"weights-333")
    body = await get_json(client, "/v1/comfyui/models", type="checkpoints")
    assert body["models"][1]["hash"] is None and body["models"][1]["size"] == 11
    await client.app[comfymgr.FILES].hashes_done()
    body = await get_json(client, "/v1/comfyui/models", type="checkpoints")
    assert body["models"][1]["hash"] == hashlib.sha256(b"weights-333").hexdigest()
    every = await get_json(client, "/v1/comfyui/models")
    assert [f["type"] for f in every["folders"]] == list(comfymgr.MODEL_TYPES)
    assert [m["name"] for m in every["models"] if m["type"] == "loras"] == ["style.gguf"]


async def test_missing_and_unreadable_model_folders_are_reported(make_client, files_config, dirs, tmp_path):
    os.symlink(tmp_path / "gone", dirs["vae"] / "dangling.safetensors")
    write(dirs["vae"] / "ok.safetensors")
    client = await make_client(files_config(models_loras=tmp_path / "nowhere"))
    body = await get_json(client, "/v1/comfyui/models")
    folders = {f["type"]: f for f in body["folders"]}
    assert folders["loras"] == {"type": "loras", "source": "folder", "path": str(tmp_path / "nowhere"),
                                "status": "missing", "error": f"{tmp_path / 'nowhere'} is not a folder"}
    assert folders["vae"]["status"] == "partial"
    assert "dangling.safetensors" in folders["vae"]["error"]
    assert [m["name"] for m in body["models"] if m["type"] == "vae"] == ["ok.safetensors"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder; the dangling-link case covers it")
async def test_unreadable_subfolder_as_non_root(make_client, files_config, dirs):
    locked = dirs["ckpt"] / "locked"
    write(locked / "a.safetensors")
    locked.chmod(0)
    try:
        client = await make_client(files_config())
        body = await get_json(client, "/v1/comfyui/models", type="checkpoints")
        assert body["folders"][0]["status"] == "partial"
    finally:
        locked.chmod(0o755)


async def test_models_fall_back_to_comfyui_when_no_folder_is_configured(make_client, make_config, tmp_path):
    models = tmp_path / "cmodels"
    write(models / "checkpoints" / "from_comfy.safetensors")
    fake = FakeComfyUI(output_dir=tmp_path / "c" / "output", models_dir=models)
    await fake.start()
    try:
        client = await make_client(make_config(comfyui_url=fake.url))
        await wait_backends_up(client)
        body = await get_json(client, "/v1/comfyui/models", type="checkpoints")
        assert body == {"models": [{"name": "from_comfy.safetensors", "type": "checkpoints",
                                    "size": None, "hash": None, "modified": None, "source": "comfyui"}],
                        "folders": [{"type": "checkpoints", "source": "comfyui", "backend": "local",
                                     "status": "ok"}]}
    finally:
        await fake.stop()
    body = await get_json(client, "/v1/comfyui/models", type="vae")
    assert body["folders"][0]["status"] == "unavailable"


async def test_models_bad_type(make_client, files_config):
    client = await make_client(files_config())
    body = await get_json(client, "/v1/comfyui/models", status=400, type="weights")
    assert body["error"] == "invalid_request" and body["details"] == {"field": "type"}


# -- outputs -----------------------------------------------------------------------------

async def test_ten_thousand_outputs_paginated_newest_first(make_client, files_config, dirs):
    base = 1_700_000_000
    for i in range(10_000):
        write(dirs["outputs"] / f"sub{i % 7}" / f"img_{i:05d}.png", b"p", mtime=base + i // 3)
    client = await make_client(files_config())
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": "500"} | ({"cursor": cursor} if cursor else {})
        body = await get_json(client, "/v1/comfyui/outputs", **params)
        seen.extend(body["outputs"])
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == 20 and len(seen) == 10_000
    keys = [(item["createdAt"], f"{item['subfolder']}/{item['filename']}") for item in seen]
    assert len(set(keys)) == 10_000
    assert [k[0] for k in keys] == sorted((k[0] for k in keys), reverse=True)
    first = seen[0]
    assert first == {"filename": "img_09999.png", "subfolder": "sub3", "workflowId": None,
                     "type": "output", "size": 1, "createdAt": (base + 9999 // 3) * 1000,
                     "url": "/v1/comfyui/output/sub3/img_09999.png"}
    body = await get_json(client, "/v1/comfyui/outputs", status=400, cursor="garbage")
    assert body["details"] == {"field": "cursor"}


async def test_outputs_carry_the_job_that_made_them(make_client, make_config, tmp_path):
    fake = FakeComfyUI(output_dir=tmp_path / "c" / "output")
    await fake.start()
    try:
        write(tmp_path / "c" / "output" / "stranger.png", PNG)
        client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0,
                                               outputs_dir=tmp_path / "c" / "output"))
        await wait_backends_up(client)
        job = await submit(client, workflow("simple"))
        done = await wait_job(client, job["workflowId"], status_is("completed"))
        listing = await get_json(client, "/v1/comfyui/outputs")
        owners = {o["filename"]: o["workflowId"] for o in listing["outputs"]}
        assert owners == {"peer_simple_00001_.png": job["workflowId"], "stranger.png": None}
        mine = await get_json(client, "/v1/comfyui/outputs", workflowId=job["workflowId"])
        assert [o["url"] for o in mine["outputs"]] == [o["url"] for o in done["outputs"]]
        resp = await client.get(done["outputs"][0]["url"], headers=HEADERS)
        assert resp.status == 200 and (await resp.read()).startswith(b"\x89PNG")
        body = await get_json(client, "/v1/comfyui/outputs", status=404, workflowId="nope")
        assert body["error"] == "not_found"
    finally:
        await fake.stop()


# -- downloads ------------------------------------------------------------------------------

async def test_download_headers_head_range_and_conditionals(make_client, files_config, dirs):
    data = bytes(range(256)) * 40
    write(dirs["outputs"] / "a b" / "pic.png", data)
    write(dirs["temp"] / "prev.png", PNG)
    client = await make_client(files_config())
    url = "/v1/comfyui/output/a%20b/pic.png"
    resp = await client.get(url, headers=HEADERS)
    assert resp.status == 200 and await resp.read() == data
    assert resp.headers["Content-Type"] == "image/png"
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    etag, modified = resp.headers["ETag"], resp.headers["Last-Modified"]
    head = await client.head(url, headers=HEADERS)
    assert head.status == 200 and head.headers["Content-Length"] == str(len(data))
    assert head.headers["ETag"] == etag and await head.read() == b""
    part = await client.get(url, headers={**HEADERS, "Range": "bytes=10-19"})
    assert part.status == 206 and await part.read() == data[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    tail = await client.get(url, headers={**HEADERS, "Range": "bytes=-5"})
    assert tail.status == 206 and await tail.read() == data[-5:]
    bad = await client.get(url, headers={**HEADERS, "Range": f"bytes={len(data)}-"})
    assert bad.status == 416 and bad.headers["Content-Range"] == f"bytes */{len(data)}"
    assert (await bad.json())["error"] == "range_not_satisfiable"
    same = await client.get(url, headers={**HEADERS, "If-None-Match": etag})
    assert same.status == 304 and await same.read() == b""
    other = await client.get(url, headers={**HEADERS, "If-None-Match": '"other"'})
    assert other.status == 200
    unchanged = await client.get(url, headers={**HEADERS, "If-Modified-Since": modified})
    assert unchanged.status == 304
    temp = await client.get("/v1/comfyui/output/prev.png", params={"type": "temp"}, headers=HEADERS)
    assert temp.status == 200 and await temp.read() == PNG
    wrong = await client.get("/v1/comfyui/output/prev.png", headers=HEADERS)
    assert wrong.status == 404
    assert (await client.get(url)).status == 401


TRAVERSALS = [
    "../secret.txt", "../../secret.txt", "..%2fsecret.txt", "%2e%2e/secret.txt",
    "%2e%2e%2fsecret.txt", "..%252fsecret.txt", "%252e%252e/secret.txt", "....//secret.txt",
    "..\\secret.txt", "..%5csecret.txt", "%2e%2e%5csecret.txt", "sub/../../secret.txt",
    "./../secret.txt", "%2F..%2Fsecret.txt", "/secret.txt", "%2fsecret.txt",
    "%00../secret.txt", "..%00/secret.txt", "secret.txt%00.png", "link_out",
    "link_dir/secret.txt", "inner/link_up/secret.txt", "..;/secret.txt", "%c0%ae%c0%ae/secret.txt",
    "%uff0e%uff0e/secret.txt", "..%c0%afsecret.txt", ".%2e/secret.txt", "%2e./secret.txt",
    "abs_link", "sub/%2e%2e/%2e%2e/secret.txt", "..//..//secret.txt", "%252e%252e%252fsecret.txt",
]


async def test_traversal_corpus_never_leaks_a_byte(make_client, files_config, dirs, tmp_path):
    write(dirs["outputs"] / "ok.png", PNG)
    write(dirs["outputs"] / "sub" / "inner.png", PNG)
    os.symlink(tmp_path / "secret.txt", dirs["outputs"] / "link_out")
    os.symlink(tmp_path, dirs["outputs"] / "link_dir")
    (dirs["outputs"] / "inner").mkdir()
    os.symlink("../..", dirs["outputs"] / "inner" / "link_up")
    os.symlink(str(tmp_path / "secret.txt"), dirs["outputs"] / "abs_link")
    os.symlink("ok.png", dirs["outputs"] / "alias.png")  # inside the root: allowed
    client = await make_client(files_config())
    statuses = {}
    for attack in TRAVERSALS:
        for type_ in ("output", "temp"):
            url = f"http://127.0.0.1:{client.port}/v1/comfyui/output/{attack}?type={type_}"
            async with aiohttp.ClientSession() as raw:
                async with raw.get(url, headers=HEADERS, allow_redirects=False) as resp:
                    body = await resp.read()
            assert SECRET not in body, attack
            assert resp.status in (400, 404), (attack, resp.status)
            statuses[attack] = resp.status
    assert len(TRAVERSALS) >= 30
    ok = await client.get("/v1/comfyui/output/alias.png", headers=HEADERS)
    assert ok.status == 200 and await ok.read() == PNG
    nul = await client.get("/v1/comfyui/output/a%00b.png", headers=HEADERS)
    assert nul.status == 400 and (await nul.json())["error"] == "invalid_path"


async def test_outputs_without_a_configured_folder(make_client, make_config):
    client = await make_client(make_config())
    body = await get_json(client, "/v1/comfyui/outputs", status=404)
    assert body == {"error": "not_configured",
                    "message": "no output folder is configured (COMFYUI_OUTPUTS)",
                    "statusCode": 404, "details": {"type": "output"}}
    resp = await client.get("/v1/comfyui/output/x.png", headers=HEADERS)
    assert resp.status == 404


# -- inputs ----------------------------------------------------------------------------------

def form(name="cat.png", data=PNG, **fields):
    f = aiohttp.FormData(default_to_multipart=True)
    if data is not None:
        f.add_field("image", data, filename=name, content_type="image/png")
    for key, value in fields.items():
        f.add_field(key, value)
    return f


async def test_upload_round_trip_through_comfyui_then_loadimage_runs(make_client, make_config, tmp_path):
    fake = FakeComfyUI(output_dir=tmp_path / "c" / "output")
    await fake.start()
    try:
        client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0))
        await wait_backends_up(client)
        resp = await client.post("/v1/comfyui/inputs", data=form(subfolder="jobs"), headers=HEADERS)
        assert resp.status == 201
        body = await resp.json()
        assert body == {"name": "cat.png", "subfolder": "jobs", "type": "input",
                        "backends": ["local"], "workflowValue": "jobs/cat.png"}
        assert (tmp_path / "c" / "input" / "jobs" / "cat.png").read_bytes() == PNG
        # ComfyUI keeps one copy of identical content, and renames a different one.
        same = await (await client.post("/v1/comfyui/inputs", data=form(subfolder="jobs"),
                                        headers=HEADERS)).json()
        assert same["name"] == "cat.png"
        other = await (await client.post("/v1/comfyui/inputs", data=form(data=PNG + b"2", subfolder="jobs"),
                                         headers=HEADERS)).json()
        assert other["name"] == "cat (1).png"
        graph = {"1": {"class_type": "LoadImage", "inputs": {"image": body["workflowValue"]}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "up"}}}
        job = await submit(client, graph)
        assert (await wait_job(client, job["workflowId"], status_is("completed", "failed")))["status"] == "completed"
    finally:
        await fake.stop()


async def test_upload_into_a_configured_input_folder(make_client, files_config, dirs):
    client = await make_client(files_config(inputs_dir=dirs["inputs"]))
    resp = await client.post("/v1/comfyui/inputs", data=form("../../evil name.png", subfolder="a/b"),
                             headers=HEADERS)
    assert resp.status == 201
    body = await resp.json()
    assert body["name"] == "evil name.png" and body["workflowValue"] == "a/b/evil name.png"
    assert (dirs["inputs"] / "a" / "b" / "evil name.png").read_bytes() == PNG
    body = await (await client.post("/v1/comfyui/inputs", data=form("evil name.png", subfolder="a/b",
                                                                   overwrite="true"),
                                    headers=HEADERS)).json()
    assert body["name"] == "evil name.png"
    assert sorted(p.name for p in (dirs["inputs"] / "a" / "b").iterdir()) == ["evil name.png"]


async def test_upload_errors(make_client, files_config, dirs):
    client = await make_client(files_config(inputs_dir=dirs["inputs"], max_upload_bytes=1000))
    cases = [
        (dict(data=b"not multipart", headers={**HEADERS, "Content-Type": "application/json"}), 415,
         "unsupported_media_type"),
        (dict(data=form(data=None, subfolder="x")), 400, "invalid_request"),
        (dict(data=form("doc.html", b"<script>")), 400, "invalid_request"),
        (dict(data=form("fake.png", b"GIF? no, text")), 400, "invalid_image"),
        (dict(data=form("big.png", PNG + b"0" * 2000)), 413, "payload_too_large"),
        (dict(data=form(extra="1")), 400, "invalid_request"),
        (dict(data=form(overwrite="maybe")), 400, "invalid_request"),
        (dict(data=form("...")), 400, "invalid_request"),
    ]
    for kwargs, status, code in cases:
        kwargs.setdefault("headers", HEADERS)
        resp = await client.post("/v1/comfyui/inputs", **kwargs)
        body = await resp.json()
        assert (resp.status, body["error"]) == (status, code), body
    assert list(dirs["inputs"].iterdir()) == []


# -- retention and disk use --------------------------------------------------------------------

async def test_retention_removes_old_finished_jobs_events_and_files(make_client, files_config, dirs, clock):
    client = await make_client(files_config(retention_days=7, retention_delete_outputs=True), clock=clock)
    db = client.app[comfymgr.DB]

    async def finished_job(filename, shared=False):
        job = await submit(client, workflow("simple"))
        now = comfymgr._ms(clock())
        outputs = [comfymgr._output_record("2", {"filename": filename, "subfolder": "", "type": "output"})]
        if not shared:
            write(dirs["outputs"] / filename, PNG)
        await db.write(lambda s: s._transition(job["workflowId"], comfymgr.JobState.DISPATCHING, now,
                                              backend="local", prompt_id=f"p-{filename}"))
        await db.write(lambda s: s._transition(job["workflowId"], comfymgr.JobState.COMPLETED, now,
                                              completed_at=now, outputs=outputs))
        return job["workflowId"]

    old = await finished_job("old.png")
    shared_old = await finished_job("shared.png")
    waiting = await submit(client, workflow("simple"))
    clock.advance(8 * 86400)
    shared_new = await finished_job("shared.png", shared=True)  # a cached re-run: same file
    recent = await finished_job("recent.png")
    removed = await client.app[comfymgr.RETENTION].run_once()
    assert removed == {"jobs": 2, "events": 4, "files": 1}  # queued + completed each
    for gone in (old, shared_old):
        assert (await client.get(f"/v1/comfyui/workflow/{gone}", headers=HEADERS)).status == 404
    for kept in (shared_new, recent, waiting["workflowId"]):
        assert (await client.get(f"/v1/comfyui/workflow/{kept}", headers=HEADERS)).status == 200
    assert not (dirs["outputs"] / "old.png").exists()
    assert (dirs["outputs"] / "shared.png").exists() and (dirs["outputs"] / "recent.png").exists()
    events = await db.read(lambda s: s.events_since(0, job_ids=[old, shared_old]))
    assert events == []
    text = await (await client.get("/metrics")).text()
    assert 'comfymgr_retention_removed_total{kind="jobs"} 2.0' in text
    assert 'comfymgr_retention_removed_total{kind="files"} 1.0' in text
    assert await client.app[comfymgr.RETENTION].run_once() == {"jobs": 0, "events": 0, "files": 0}


async def test_retention_30_days_by_default_and_disk_use_in_status(make_client, files_config, dirs, clock,
                                                                  caplog):
    write(dirs["outputs"] / "a.png", b"12345")
    write(dirs["outputs"] / "d" / "b.png", b"123")
    caplog.set_level(logging.INFO, "comfymgr")
    client = await make_client(files_config(), clock=clock)
    assert ("retention: finished jobs and their events are deleted after 30 days; output files are "
            "kept (COMFYMGR_RETENTION_DAYS; 0 keeps them)") in caplog.text
    await client.app[comfymgr.FILES].measure_disk()
    status = await get_json(client, "/v1/status")
    assert status["files"]["output"]["bytes"] == 8 and status["files"]["output"]["files"] == 2
    assert status["files"]["output"]["filesystemFreeBytes"] > 0
    assert status["files"]["retentionDays"] == 30
    assert await client.app[comfymgr.RETENTION].run_once() == {"jobs": 0, "events": 0, "files": 0}
