"""Keys with roles: MANAGEMENT_API_KEY keys see everything; each client key
(COMFYMGR_CLIENT_KEYS) sees only the jobs submitted with a key of its name,
and another client's job is indistinguishable from an unknown id. The walk
over the router fails for a route nobody decided the visibility of."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid

import aiohttp
import pytest
from test_bridge import status_is, wait_backends_up, wait_job

import comfymgr
from conftest import API_KEY, HEADERS, workflow

A_KEY, B_KEY = "client-a-key-0123456789", "client-b-key-0123456789"
A, B = {"X-API-Key": A_KEY}, {"X-API-Key": B_KEY}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture
async def three(make_client, make_config, fake):
    """comfymgr with an admin key and clients a and b, each with a completed job."""
    client = await make_client(make_config(
        comfyui_url=fake.url, progress_interval=0.0, outputs_dir=fake._dirs.output,
        client_keys=comfymgr._parse_client_keys(f"a:{A_KEY},b:{B_KEY}")))
    await wait_backends_up(client)
    jobs = {}
    for who, headers in (("a", A), ("b", B), ("admin", HEADERS)):
        graph = workflow("simple")
        graph["2"]["inputs"]["filename_prefix"] = f"by_{who}"
        resp = await client.post("/v1/comfyui/workflow", json={"workflow": graph}, headers=headers)
        assert resp.status == 202
        jobs[who] = await wait_job(client, (await resp.json())["workflowId"], status_is("completed"))
    return client, jobs


async def envelope_of(resp):
    return resp.status, await resp.json()


async def test_a_client_key_sees_its_own_jobs_only_on_every_route(three):
    client, jobs = three
    a_job, b_job = jobs["a"]["workflowId"], jobs["b"]["workflowId"]
    unknown = str(uuid.uuid4())

    def same_as_unknown(status_body, job_id):
        status, body = status_body
        return status == 404 and json.loads(json.dumps(body).replace(job_id, unknown)) == expected[1]

    checked = set()
    for route in client.app.router.routes():
        if route.method == "HEAD":
            continue
        name = route.name
        if "{id}" in route.resource.canonical:
            checked.add(name)
            path = route.resource.canonical.replace("{id}", unknown)
            expected = await envelope_of(await client.request(route.method, path, headers=A))
            assert expected[0] == 404, (name, expected)
            # Another client's job answers exactly as an unknown id ...
            resp = await client.request(route.method, route.resource.canonical.replace("{id}", b_job),
                                        headers=A)
            assert same_as_unknown(await envelope_of(resp), b_job), name
            # ... and neither its own nor the admin key are refused.
            for headers, job_id in ((A, a_job), (HEADERS, b_job)):
                if route.method == "DELETE":
                    continue  # cancelling is below; these jobs have finished
                resp = await client.request(route.method,
                                            route.resource.canonical.replace("{id}", job_id),
                                            headers=headers)
                assert resp.status in (200, 404) and (resp.status == 200 or name == "preview"), name
        elif name in ROUTE_CHECKS:
            checked.add(name)
            await ROUTE_CHECKS[name](client, jobs)
        else:
            assert name in UNSCOPED, f"route {name} ({route.method} {route.resource.canonical}) " \
                                     "has no visibility rule: add it to ROUTE_CHECKS or UNSCOPED"
    assert {"job", "cancel"} <= checked


async def check_list(client, jobs):
    for headers, who in ((A, {"a"}), (B, {"b"}), (HEADERS, {"a", "b", "admin"})):
        body = await (await client.get("/v1/comfyui/workflows", headers=headers)).json()
        ids = {j["workflowId"] for j in body["workflows"]}
        assert ids == {jobs[w]["workflowId"] for w in who}
        assert all(("submittedBy" in j) == (headers is HEADERS) for j in body["workflows"])


async def check_outputs(client, jobs):
    b_job = jobs["b"]["workflowId"]
    resp = await client.get(f"/v1/comfyui/outputs?workflowId={b_job}", headers=A)
    assert resp.status == 404
    assert (await resp.json())["message"] == f"workflow {b_job} not found"
    body = await (await client.get("/v1/comfyui/outputs", headers=A)).json()
    assert [o["filename"] for o in body["outputs"]] == ["by_a_00001_.png"]
    body = await (await client.get("/v1/comfyui/outputs", headers=HEADERS)).json()
    assert sorted(o["filename"] for o in body["outputs"]) == [
        "by_a_00001_.png", "by_admin_00001_.png", "by_b_00001_.png"]


async def check_output(client, jobs):
    for headers, name, status in ((A, "by_a_00001_.png", 200), (A, "by_b_00001_.png", 404),
                                  (A, "by_admin_00001_.png", 404), (B, "by_b_00001_.png", 200),
                                  (HEADERS, "by_b_00001_.png", 200)):
        resp = await client.get(f"/v1/comfyui/output/{name}", headers=headers)
        assert resp.status == status, (headers, name)
        if status == 404:
            assert await resp.json() == {"error": "not_found", "message": "no such file",
                                         "statusCode": 404, "details": {"path": name}}


async def check_status(client, jobs):
    counts = {}
    for headers in (A, HEADERS):
        listed = await (await client.get("/v1/comfyui/workflows", headers=headers)).json()
        counts[id(headers)] = {s: sum(j["status"] == s for j in listed["workflows"])
                               for s in ("queued", "running", "completed", "failed", "cancelled")}
    body = await (await client.get("/v1/status", headers=A)).json()
    assert set(body) == {"version", "key", "queue"} and body["key"] == "a"
    assert body["queue"]["byStatus"] == counts[id(A)]
    admin = await (await client.get("/v1/status", headers=HEADERS)).json()
    assert admin["queue"]["byStatus"] == counts[id(HEADERS)] and "backends" in admin


async def check_submit(client, jobs):
    for who in ("a", "b", "admin"):
        resp = await client.get(f"/v1/comfyui/workflow/{jobs[who]['workflowId']}", headers=HEADERS)
        assert (await resp.json())["submittedBy"] == who
    own = await (await client.get(f"/v1/comfyui/workflow/{jobs['a']['workflowId']}", headers=A)).json()
    assert own["status"] == "completed" and "submittedBy" not in own  # shown to admins only


async def check_stream(client, jobs):
    # Replay from the start: only the client's own events.
    async with client.ws_connect("/v1/comfyui/stream?since=0", headers=A) as ws:
        await ws.send_json({"type": "ping"})
        seen = set()
        while True:
            message = await asyncio.wait_for(ws.receive_json(), 10)
            if message["type"] == "pong":
                break
            seen.add(message["workflowId"])
        listed = await (await client.get("/v1/comfyui/workflows", headers=A)).json()
        assert seen == {j["workflowId"] for j in listed["workflows"]}
        assert jobs["a"]["workflowId"] in seen and jobs["b"]["workflowId"] not in seen
        # Another client's job cannot be followed: it is "unknown".
        await ws.send_json({"type": "subscribe", "workflowId": jobs["b"]["workflowId"], "since": 0})
        ack = await asyncio.wait_for(ws.receive_json(), 10)
        assert ack == {"type": "subscribed", "all": False, "workflowIds": [],
                       "unknown": [jobs["b"]["workflowId"]]}
    async with client.ws_connect(f"/v1/comfyui/stream?workflowId={jobs['b']['workflowId']}",
                                 headers=A) as ws:
        ack = await asyncio.wait_for(ws.receive_json(), 10)
        assert ack["unknown"] == [jobs["b"]["workflowId"]]


async def check_inputs(client, jobs):
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("image", PNG, filename="mine.png", content_type="image/png")
    resp = await client.post("/v1/comfyui/inputs", data=form, headers=A)
    assert resp.status == 201
    body = await resp.json()
    folder = comfymgr._client_input_folder(client.app[comfymgr.INPUT_SALT], "a")
    assert body["subfolder"] == folder and body["workflowValue"] == f"{folder}/mine.png"
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": body["workflowValue"]}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    # Client b cannot use a's upload by its name; a can; the admin key can.
    resp = await client.post("/v1/comfyui/workflow", json={"workflow": graph}, headers=B)
    assert resp.status == 400
    assert await resp.json() == {
        "error": "foreign_input", "message": "workflow.1.inputs.image: refers to an input uploaded "
        "with another key", "statusCode": 400,
        "details": {"field": "workflow.1.inputs.image", "nodeId": "1"}}
    for headers in (A, HEADERS):
        resp = await client.post("/v1/comfyui/workflow", json={"workflow": graph}, headers=headers)
        assert resp.status == 202
        done = await wait_job(client, (await resp.json())["workflowId"], status_is("completed", "failed"))
        assert done["status"] == "completed"


ROUTE_CHECKS = {"jobs": check_list, "outputs": check_outputs, "output": check_output,
                "status": check_status, "submit": check_submit, "stream": check_stream,
                "inputs": check_inputs}
# Routes that are the same for every key: nothing in them belongs to a job.
UNSCOPED = {"models", "health", "metrics", "openapi", "docs", "docs_init", "docs_assets",
            "ui", "ui_files"}  # the dashboard's page and files: the same for every key


async def test_a_client_cancels_its_own_jobs_only(make_client, make_config):
    client = await make_client(make_config(
        client_keys=comfymgr._parse_client_keys(f"a:{A_KEY},b:{B_KEY}")))
    ids = {}
    for who, headers in (("a", A), ("b", B)):
        resp = await client.post("/v1/comfyui/workflow", json={"workflow": workflow()}, headers=headers)
        ids[who] = (await resp.json())["workflowId"]
    resp = await client.delete(f"/v1/comfyui/workflow/{ids['b']}", headers=A)
    assert resp.status == 404
    assert (await resp.json())["message"] == f"workflow {ids['b']} not found"
    resp = await client.get(f"/v1/comfyui/workflow/{ids['b']}", headers=B)
    assert (await resp.json())["status"] == "queued"
    resp = await client.delete(f"/v1/comfyui/workflow/{ids['a']}", headers=A)
    assert resp.status == 200 and (await resp.json())["status"] == "cancelled"
    resp = await client.delete(f"/v1/comfyui/workflow/{ids['b']}", headers=HEADERS)
    assert resp.status == 200


async def test_a_client_stream_hears_its_own_live_events_only(make_client, make_config):
    client = await make_client(make_config(
        client_keys=comfymgr._parse_client_keys(f"a:{A_KEY},b:{B_KEY}")))
    async with client.ws_connect("/v1/comfyui/stream", headers=A) as ws:
        for headers in (B, HEADERS, A):
            resp = await client.post("/v1/comfyui/workflow", json={"workflow": workflow()},
                                     headers=headers)
            mine = (await resp.json())["workflowId"]
        message = await asyncio.wait_for(ws.receive_json(), 10)
        assert message["workflowId"] == mine and message["type"] == "workflow:queued"


async def test_idempotency_keys_stay_scoped_per_key(make_client, make_config):
    client = await make_client(make_config(
        client_keys=comfymgr._parse_client_keys(f"a:{A_KEY},b:{B_KEY}")))
    seen = []
    for headers in (A, B, A):
        resp = await client.post("/v1/comfyui/workflow", json={"workflow": workflow()},
                                 headers={**headers, "Idempotency-Key": "same"})
        seen.append((resp.status, (await resp.json())["workflowId"]))
    assert [s for s, _ in seen] == [202, 202, 200]
    assert seen[0][1] == seen[2][1] != seen[1][1]


@pytest.mark.parametrize("value,message", [
    ("a", "expected NAME:KEY[,NAME:KEY...]"),
    ("a:", "expected NAME:KEY[,NAME:KEY...]"),
    ("admin:xxxxxxxxxxxxxxxxxxxx", "client key name 'admin' must be 1-64 letters, digits, '_', '.', "
                                  "'-' and not 'admin'"),
    ("a b:k", "client key name 'a b' must be 1-64 letters, digits, '_', '.', '-' and not 'admin'"),
    ("a:k1,a:k2", "client key name 'a' appears twice"),
    ("a:k1,b:k1", "client keys 'b' and another share one key"),
])
def test_bad_client_keys_stop_startup(value, message):
    with pytest.raises(comfymgr.ConfigError) as raised:
        comfymgr.load_config([], {"COMFYMGR_CLIENT_KEYS": value})
    assert str(raised.value) == f"COMFYMGR_CLIENT_KEYS={value!r}: {message}"


async def test_weak_keys_are_named_in_a_warning_never_shown(make_client, make_config, caplog):
    caplog.set_level(logging.WARNING, "comfymgr")
    await make_client(make_config(api_keys=("short-admin", API_KEY),
                                  client_keys=comfymgr._parse_client_keys("app:tiny")))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "shorter than" in r.getMessage()]
    assert warnings == [
        "MANAGEMENT_API_KEY key 1 of 2 is shorter than 16 characters: use a long random key "
        "(e.g. openssl rand -base64 32)",
        "COMFYMGR_CLIENT_KEYS key 'app' is shorter than 16 characters: use a long random key "
        "(e.g. openssl rand -base64 32)"]
    assert not any(re.search("short-admin|tiny", r.getMessage()) for r in caplog.records)


async def test_a_client_key_that_is_also_an_admin_key_stops_startup(make_client, make_config):
    with pytest.raises(comfymgr.ConfigError, match="a client key is also a MANAGEMENT_API_KEY key"):
        await make_client(make_config(client_keys=comfymgr._parse_client_keys(f"a:{API_KEY}")))
