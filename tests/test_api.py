"""http api: every endpoint and every error path over a real socket, with
exact statuses and bodies, and the state each call leaves behind."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import comfymgr
from comfymgr import BackendSpec, JobState, Priority
from conftest import API_KEY, HEADERS, workflow

SUBMIT = "/v1/comfyui/workflow"
LIST = "/v1/comfyui/workflows"
T0_MS = 1_800_000_000_000  # FakeClock's start, in epoch milliseconds


def envelope(error, message, status, details=None):
    return {"error": error, "message": message, "statusCode": status, "details": details or {}}


def job_url(job_id):
    return f"{SUBMIT}/{job_id}"


def queued_view(job_id, **changes):
    """A fresh job as the API shows it (FakeClock time, default settings)."""
    view = {
        "workflowId": job_id, "status": "queued", "priority": "normal", "queuePosition": 1,
        "progress": 0, "currentNode": None, "createdAt": T0_MS, "startTime": None,
        "completionTime": None, "outputs": [], "error": None, "state": "queued", "gpu": "any",
        "backend": None, "promptId": None, "attempts": 0, "timeout": 3600,
        "cancelRequested": False, "submittedBy": "admin",
    }
    view.update(changes)
    return view


async def submit(client, **body):
    body.setdefault("workflow", workflow())
    resp = await client.post(SUBMIT, json=body, headers=HEADERS)
    assert resp.status == 202, await resp.text()
    return await resp.json()


async def get_job(client, job_id):
    resp = await client.get(job_url(job_id), headers=HEADERS)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def post_raw(client, data, **headers):
    resp = await client.post(SUBMIT, data=data, headers={**HEADERS, **headers})
    return resp.status, await resp.json()


async def listing(client, **params):
    resp = await client.get(LIST, params={k: str(v) for k, v in params.items()}, headers=HEADERS)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def no_jobs_stored(client):
    body = await listing(client)
    return body["workflows"] == []


@pytest.fixture
async def client(make_client, clock):
    return await make_client(clock=clock)


###############################################################################
# POST /v1/comfyui/workflow
###############################################################################


async def test_submit_returns_202_with_the_job_and_its_location(client):
    resp = await client.post(SUBMIT, json={"workflow": workflow()}, headers=HEADERS)
    assert resp.status == 202
    assert resp.content_type == "application/json"
    body = await resp.json()
    job_id = body["workflowId"]
    assert str(uuid.UUID(job_id, version=4)) == job_id
    assert body == queued_view(job_id)
    assert resp.headers["Location"] == f"/v1/comfyui/workflow/{job_id}"
    assert await get_job(client, job_id) == body


async def test_a_job_is_committed_before_its_202(client, make_config):
    body = await submit(client, workflow=workflow("chain"), priority="low")
    # Read the file with a connection of our own while the app runs.
    conn = sqlite3.connect(make_config().state_dir / "comfymgr.db")
    try:
        row = conn.execute("SELECT state, priority, target, workflow, created_at FROM jobs "
                           "WHERE id = ?", (body["workflowId"],)).fetchone()
    finally:
        conn.close()
    assert row[:3] == ("queued", int(Priority.LOW), "any")
    assert json.loads(row[3]) == workflow("chain")
    assert row[4] == T0_MS


async def test_submit_keeps_extra_node_keys(client):
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8}, "_meta": {"title": "x"}}}
    body = await submit(client, workflow=graph)
    stored = await client.app[comfymgr.DB].read(lambda s: s.get(body["workflowId"]).workflow)
    assert json.loads(stored) == graph


async def test_priorities_order_the_queue(client):
    low = await submit(client, priority="low")
    normal = await submit(client)
    high = await submit(client, priority="high")
    assert (low["queuePosition"], normal["queuePosition"], high["queuePosition"]) == (1, 1, 1)
    assert (low["priority"], normal["priority"], high["priority"]) == ("low", "normal", "high")
    positions = [(await get_job(client, j["workflowId"]))["queuePosition"] for j in (high, normal, low)]
    assert positions == [1, 2, 3]


async def test_concurrent_submits_get_distinct_ids_and_positions(client):
    bodies = await asyncio.gather(*(submit(client) for _ in range(40)))
    assert len({b["workflowId"] for b in bodies}) == 40
    assert sorted(b["queuePosition"] for b in bodies) == list(range(1, 41))
    assert len((await listing(client, limit=100))["workflows"]) == 40


@pytest.fixture
async def two_gpus(make_client, make_config, clock):
    config = make_config(backends=(BackendSpec("gpu0", "http://127.0.0.1:1", 0),
                                   BackendSpec("gpu1", "http://127.0.0.1:2", 1)))
    return await make_client(config, clock=clock)


@pytest.mark.parametrize("gpu, target", [("local", "any"), ("any", "any"), ("gpu0", "gpu0"),
                                         ("gpu1", "gpu1")])
async def test_gpu_selects_any_backend_or_one_by_name(two_gpus, gpu, target):
    body = await submit(two_gpus, gpu=gpu)
    assert body == queued_view(body["workflowId"], gpu=target)
    stored = await two_gpus.app[comfymgr.DB].read(lambda s: s.get(body["workflowId"]).target)
    assert stored == target


async def test_an_unknown_gpu_is_refused_with_the_valid_values(two_gpus):
    status, body = await post_raw(two_gpus, json.dumps({"workflow": workflow(), "gpu": "gpu7"}))
    assert status == 400
    assert body == envelope("unknown_gpu", "gpu: unknown value 'gpu7'; use one of local, any, gpu0, gpu1",
                            400, {"field": "gpu", "valid": ["local", "any", "gpu0", "gpu1"]})
    assert await no_jobs_stored(two_gpus)


async def test_an_unknown_gpu_with_the_default_backend_lists_each_value_once(client):
    # The one default backend is named "local", which is also the alias for "any".
    status, body = await post_raw(client, json.dumps({"workflow": workflow(), "gpu": "gpu0"}))
    assert status == 400
    assert body == envelope("unknown_gpu", "gpu: unknown value 'gpu0'; use one of local, any",
                            400, {"field": "gpu", "valid": ["local", "any"]})


@pytest.mark.parametrize("timeout, config_timeout, shown", [
    (30, 3600.0, 30), (2.5, 3600.0, 2.5), (None, 3600.0, 3600), (None, 90.0, 90),
    (None, 0.0, None)])
async def test_timeout_defaults_to_the_configured_job_timeout(make_client, make_config, clock,
                                                              timeout, config_timeout, shown):
    client = await make_client(make_config(job_timeout=config_timeout), clock=clock)
    body = await submit(client, **({} if timeout is None else {"timeout": timeout}))
    assert body["timeout"] == shown
    stored = await client.app[comfymgr.DB].read(lambda s: s.get(body["workflowId"]).timeout_s)
    assert stored == shown


DEEP_ARRAY = b'{"workflow":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
DEEP_OBJECT = b'{"workflow":{"1":{"class_type":"X","inputs":{"v":' + b'{"a":' * 100_000 + b"1" + \
    b"}" * 100_000 + b"}}}}"


@pytest.mark.parametrize("data, message", [
    (b"", "the request body is empty; send a JSON object"),
    (b" \r\n\t ", "the request body is empty; send a JSON object"),
    (b'{"workflow":', "the request body is not valid JSON: Expecting value: line 1 column 13 (char 12)"),
    (b"{'workflow': {}}", ("the request body is not valid JSON: Expecting property name enclosed "
                           "in double quotes: line 1 column 2 (char 1)")),
    (b'\xff\xfe{"workflow": {}}', "the request body is not UTF-8"),
    (b'{"workflow": {"1": {"class_type": "\xe9", "inputs": {}}}}', "the request body is not UTF-8"),
    (b'{"workflow": NaN}', "the request body is not valid JSON: NaN is not valid JSON"),
    (b'{"workflow": {"1": {"class_type": "X", "inputs": {"v": -Infinity}}}}',
     "the request body is not valid JSON: -Infinity is not valid JSON"),
    (DEEP_ARRAY, "the request body is not valid JSON: JSON nested too deeply"),
    (DEEP_OBJECT, "the request body is not valid JSON: JSON nested too deeply"),
], ids=["empty", "blank", "truncated", "single-quotes", "utf16-bom", "latin1", "nan", "infinity",
        "deep-array", "deep-object"])
async def test_a_body_that_is_not_json_is_400_invalid_json(client, data, message):
    status, body = await post_raw(client, data, **{"Content-Type": "application/json"})
    assert (status, body) == (400, envelope("invalid_json", message, 400))
    assert await no_jobs_stored(client)


async def test_a_number_that_overflows_to_infinity_is_400_invalid_json(client):
    # 1e999 is float('inf'): it must not be stored as the non-JSON token Infinity.
    data = b'{"workflow": {"1": {"class_type": "X", "inputs": {"v": 1e999}}}}'
    status, body = await post_raw(client, data)
    assert (status, body) == (400, envelope(
        "invalid_json", "the request body is not valid JSON: the number 1e999 is too large", 400))
    assert await no_jobs_stored(client)


SURROGATE = ("the request body is not valid JSON: a string holds an unpaired UTF-16 surrogate "
             "(\\uD800-\\uDFFF)")


@pytest.mark.parametrize("data", [
    b'{"workflow": {"1": {"class_type": "\\ud800", "inputs": {}}}}',
    b'{"workflow": {"\\udfff": {"class_type": "X", "inputs": {}}}}',
    b'{"workflow": {"\\ud800": "not a node"}}',
    b'{"workflow": {"1": {"class_type": "X", "inputs": {}}}, "\\ud800": 1}',
    b'{"workflow": {"1": {"class_type": "X", "inputs": {}}}, "gpu": "\\ud800"}',
], ids=["stored", "node-id", "in-field-name", "unknown-field", "gpu"])
async def test_an_unpaired_surrogate_is_400_invalid_json(client, data):
    # Once a 500 (it cannot be stored as UTF-8) or aiohttp's bare text/plain 500
    # (echoed in an error message).
    status, body = await post_raw(client, data)
    assert (status, body) == (400, envelope("invalid_json", SURROGATE, 400))
    assert await no_jobs_stored(client)


async def test_a_surrogate_pair_escape_is_an_ordinary_character(client):
    graph = {"1": {"class_type": "X", "inputs": {"text": "\U0001f600 ok"}}}
    data = b'{"workflow": {"1": {"class_type": "X", "inputs": {"text": "\\ud83d\\ude00 ok"}}}}'
    status, body = await post_raw(client, data)
    assert status == 202
    stored = await client.app[comfymgr.DB].read(lambda s: s.get(body["workflowId"]).workflow)
    assert json.loads(stored) == graph


NODE = {"class_type": "EmptyImage", "inputs": {}}


@pytest.mark.parametrize("payload, message, details", [
    ({}, "workflow: is required", {"field": "workflow"}),
    ([], "body: must be an object", {"field": "body"}),
    ("workflow", "body: must be an object", {"field": "body"}),
    (None, "body: must be an object", {"field": "body"}),
    ({"workflow": [NODE]}, "workflow: must be an object", {"field": "workflow"}),
    ({"workflow": "{}"}, "workflow: must be an object", {"field": "workflow"}),
    ({"workflow": {}}, "workflow: must not be empty", {"field": "workflow"}),
    ({"workflow": {"1": NODE, "2": "node"}}, "workflow.2: must be an object",
     {"field": "workflow.2", "nodeId": "2"}),
    ({"workflow": {"7": {"inputs": {}}}}, "workflow.7.class_type: is required",
     {"field": "workflow.7.class_type", "nodeId": "7"}),
    ({"workflow": {"7": {"class_type": "X"}}}, "workflow.7.inputs: is required",
     {"field": "workflow.7.inputs", "nodeId": "7"}),
    ({"workflow": {"7": {"class_type": "", "inputs": {}}}},
     "workflow.7.class_type: must be at least 1 characters",
     {"field": "workflow.7.class_type", "nodeId": "7"}),
    ({"workflow": {"7": {"class_type": 5, "inputs": {}}}}, "workflow.7.class_type: must be a string",
     {"field": "workflow.7.class_type", "nodeId": "7"}),
    ({"workflow": {"7": {"class_type": "X", "inputs": [1]}}}, "workflow.7.inputs: must be an object",
     {"field": "workflow.7.inputs", "nodeId": "7"}),
    ({"workflow": {"1": NODE}, "prority": "high"}, "prority: is not a known field",
     {"field": "prority"}),
    ({"workflow": {"1": NODE}, "priority": "urgent"}, "priority: must be one of high, normal, low",
     {"field": "priority"}),
    ({"workflow": {"1": NODE}, "priority": "HIGH"}, "priority: must be one of high, normal, low",
     {"field": "priority"}),
    ({"workflow": {"1": NODE}, "priority": 0}, "priority: must be a string", {"field": "priority"}),
    ({"workflow": {"1": NODE}, "gpu": ""}, "gpu: must be at least 1 characters", {"field": "gpu"}),
    ({"workflow": {"1": NODE}, "gpu": "g" * 129}, "gpu: must be at most 128 characters",
     {"field": "gpu"}),
    ({"workflow": {"1": NODE}, "gpu": 0}, "gpu: must be a string", {"field": "gpu"}),
    ({"workflow": {"1": NODE}, "timeout": 0}, "timeout: must be > 0", {"field": "timeout"}),
    ({"workflow": {"1": NODE}, "timeout": -5}, "timeout: must be > 0", {"field": "timeout"}),
    ({"workflow": {"1": NODE}, "timeout": 604801}, "timeout: must be <= 604800", {"field": "timeout"}),
    ({"workflow": {"1": NODE}, "timeout": "60"}, "timeout: must be a number", {"field": "timeout"}),
    ({"workflow": {"1": NODE}, "timeout": True}, "timeout: must be a number", {"field": "timeout"}),
])
async def test_a_schema_violation_is_400_invalid_request_naming_the_field(client, payload, message,
                                                                          details):
    status, body = await post_raw(client, json.dumps(payload))
    assert (status, body) == (400, envelope("invalid_request", message, 400, details))
    assert await no_jobs_stored(client)


async def test_a_body_over_the_limit_is_413(make_client, make_config):
    client = await make_client(make_config(max_body_bytes=2000))
    data = json.dumps({"workflow": {"1": {"class_type": "X", "inputs": {"s": "x" * 2000}}}})
    status, body = await post_raw(client, data)
    assert (status, body) == (413, envelope(
        "payload_too_large", f"the body is {len(data)} bytes; the limit is 2000", 413, {"limit": 2000}))
    assert await no_jobs_stored(client)


###############################################################################
# GET /v1/comfyui/workflow/{id}
###############################################################################


async def test_get_an_unknown_job_is_404(client):
    for job_id in (str(uuid.uuid4()), "not-a-uuid"):
        resp = await client.get(job_url(job_id), headers=HEADERS)
        assert resp.status == 404
        assert await resp.json() == envelope("not_found", f"workflow {job_id} not found", 404,
                                             {"workflowId": job_id})


async def test_queue_position_is_1_based_and_follows_cancels(client):
    n1, n2 = await submit(client), await submit(client)
    low = await submit(client, priority="low")
    high = await submit(client, priority="high")
    n3 = await submit(client)

    async def positions():
        return [(await get_job(client, j["workflowId"]))["queuePosition"]
                for j in (high, n1, n2, n3, low)]

    assert await positions() == [1, 2, 3, 4, 5]
    resp = await client.delete(job_url(n1["workflowId"]), headers=HEADERS)
    assert resp.status == 200
    assert await positions() == [1, None, 2, 3, 4]
    resp = await client.delete(job_url(high["workflowId"]), headers=HEADERS)
    assert resp.status == 200
    assert await positions() == [None, None, 1, 2, 3]
    # A claimed job is handed to ComfyUI: position 0; the rest move up.
    claimed = await client.app[comfymgr.DB].write(lambda s: s.claim("local", "p-1", 0)[0])
    assert claimed.id == n2["workflowId"]
    assert await positions() == [None, None, 0, 1, 2]


###############################################################################
# DELETE /v1/comfyui/workflow/{id}
###############################################################################


async def test_cancel_a_queued_job(client, clock):
    job = await submit(client)
    other = await submit(client)
    clock.advance(5)
    resp = await client.delete(job_url(job["workflowId"]), headers=HEADERS)
    assert resp.status == 200
    assert await resp.json() == {"workflowId": job["workflowId"], "status": "cancelled"}
    assert await get_job(client, job["workflowId"]) == queued_view(
        job["workflowId"], status="cancelled", state="cancelled", queuePosition=None,
        completionTime=T0_MS + 5000,
        error={"code": "cancelled", "message": "cancelled by request"})
    assert (await get_job(client, other["workflowId"]))["queuePosition"] == 1


async def test_cancel_an_in_flight_job_marks_it_and_answers_202(client, clock):
    job = await submit(client)
    claimed = await client.app[comfymgr.DB].write(lambda s: s.claim("local", "p-1", 0)[0])
    assert claimed.id == job["workflowId"]
    clock.advance(2)
    for _ in range(2):  # asking twice changes nothing
        resp = await client.delete(job_url(job["workflowId"]), headers=HEADERS)
        assert resp.status == 202
        assert await resp.json() == {
            "workflowId": job["workflowId"], "status": "queued", "cancelRequested": True,
            "message": "the job is with ComfyUI; it is being interrupted"}
        clock.advance(1)
    stored = await client.app[comfymgr.DB].read(lambda s: s.get(job["workflowId"]))
    assert (stored.state, stored.cancel_requested_at) == (JobState.DISPATCHING, T0_MS + 2000)
    assert await get_job(client, job["workflowId"]) == queued_view(
        job["workflowId"], queuePosition=0, state="dispatching", backend="local", promptId="p-1",
        attempts=1, cancelRequested=True)


async def test_cancel_a_finished_job_is_409(client):
    cancelled = await submit(client)
    await client.delete(job_url(cancelled["workflowId"]), headers=HEADERS)
    completed = await submit(client)

    def finish(s):
        s.claim("local", "p-2", 0)[0]
        s._transition(completed["workflowId"], JobState.RUNNING, 1)
        return s._transition(completed["workflowId"], JobState.COMPLETED, 2, completed_at=2)

    await client.app[comfymgr.DB].write(finish)
    for job, status in ((cancelled, "cancelled"), (completed, "completed")):
        resp = await client.delete(job_url(job["workflowId"]), headers=HEADERS)
        assert resp.status == 409
        assert await resp.json() == envelope(
            "not_cancellable", f"workflow {job['workflowId']} already {status}; there is nothing "
            "to cancel", 409, {"workflowId": job["workflowId"], "status": status})
        assert (await get_job(client, job["workflowId"]))["status"] == status


async def test_cancel_an_unknown_job_is_404(client):
    job_id = str(uuid.uuid4())
    resp = await client.delete(job_url(job_id), headers=HEADERS)
    assert resp.status == 404
    assert await resp.json() == envelope("not_found", f"workflow {job_id} not found", 404,
                                         {"workflowId": job_id})


###############################################################################
# GET /v1/comfyui/workflows
###############################################################################


async def seed(client, count, priorities=(Priority.NORMAL,)):
    """Many jobs at once, through the app's own database thread."""
    def write(s):
        return [s.enqueue(str(uuid.uuid4()), "{}", priorities[i % len(priorities)], "any", i)[0].id
                for i in range(count)]
    return await client.app[comfymgr.DB].write(write)


async def test_list_is_newest_first_with_default_limit_50(client):
    ids = await seed(client, 120)
    body = await listing(client)
    assert body["limit"] == 50
    assert [j["workflowId"] for j in body["workflows"]] == ids[::-1][:50]
    assert body["next"] is not None
    body = await listing(client, limit=500)
    assert (body["limit"], body["next"]) == (500, None)
    assert [j["workflowId"] for j in body["workflows"]] == ids[::-1]


async def test_list_entries_are_the_job_views_get_shows(client):
    job = await submit(client, priority="high")
    body = await listing(client)
    assert body["workflows"] == [job]


async def test_list_shows_the_same_queue_position_as_get(client):
    """queuePosition null means "not queued": a list must not say so of a queued job."""
    rng = random.Random(9)
    jobs = [await submit(client, priority=rng.choice(["high", "normal", "low"])) for _ in range(24)]
    for job in jobs[::5]:
        await client.delete(job_url(job["workflowId"]), headers=HEADERS)
    await client.app[comfymgr.DB].write(lambda s: s.claim("local", "p-1", 0)[0])
    gets = {j["workflowId"]: await get_job(client, j["workflowId"]) for j in jobs}
    positions = sorted(g["queuePosition"] for g in gets.values() if g["queuePosition"])
    assert positions == list(range(1, 19))  # 24 - 5 cancelled - 1 claimed
    for params in ({}, {"limit": 7}, {"status": "queued", "limit": 4}, {"priority": "low"}):
        listed, cursor = [], None
        while True:
            page = await listing(client, **params, **({"cursor": cursor} if cursor else {}))
            listed += page["workflows"]
            if not (cursor := page["next"]):
                break
        assert listed and all(entry == gets[entry["workflowId"]] for entry in listed), params


async def test_list_filters_by_status_and_priority(client):
    ids = await seed(client, 12, priorities=(Priority.HIGH, Priority.NORMAL, Priority.LOW))
    for job_id in ids[:6:2]:  # cancel three: high, low, normal
        resp = await client.delete(job_url(job_id), headers=HEADERS)
        assert resp.status == 200
    newest = ids[::-1]

    async def listed(**params):
        return [j["workflowId"] for j in (await listing(client, **params))["workflows"]]

    assert await listed(status="cancelled") == [ids[4], ids[2], ids[0]]
    assert await listed(status="queued") == [i for i in newest if i not in ids[:6:2]]
    assert await listed(priority="high") == newest[2::3]
    assert await listed(priority="low", status="queued") == [ids[11], ids[8], ids[5]]
    assert await listed(status="completed") == []


@pytest.mark.parametrize("page_size, count", [(5, 23), (5, 10), (1, 3), (7, 7)])
async def test_keyset_pagination_has_no_duplicates_or_gaps(client, page_size, count):
    ids = await seed(client, count, priorities=(Priority.HIGH, Priority.LOW))
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": page_size, **({"cursor": cursor} if cursor else {})}
        body = await listing(client, **params)
        pages += 1
        seen += [j["workflowId"] for j in body["workflows"]]
        assert len(body["workflows"]) <= page_size
        cursor = body["next"]
        if cursor is None:
            break
        # A job submitted while paging is newer than every cursor: never on a later page.
        await submit(client)
    assert seen == ids[::-1]
    assert pages == count // page_size + 1


async def test_pagination_with_a_filter(client):
    ids = await seed(client, 20, priorities=(Priority.HIGH, Priority.NORMAL))
    expected = [i for i in ids[::-1] if ids.index(i) % 2 == 0]
    seen, cursor = [], None
    while True:
        body = await listing(client, priority="high", limit=3, **({"cursor": cursor} if cursor else {}))
        seen += [j["workflowId"] for j in body["workflows"]]
        if not (cursor := body["next"]):
            break
    assert seen == expected


@pytest.mark.parametrize("params, message, field", [
    ({"limit": "abc"}, "limit: must be an integer", "limit"),
    ({"limit": "1.5"}, "limit: must be an integer", "limit"),
    ({"limit": "0"}, "limit: must be >= 1", "limit"),
    ({"limit": "-1"}, "limit: must be >= 1", "limit"),
    ({"limit": "501"}, "limit: must be <= 500", "limit"),
    ({"status": "done"}, "status: must be one of queued, running, completed, failed, cancelled",
     "status"),
    ({"status": "dispatching"}, ("status: must be one of queued, running, completed, failed, "
                                 "cancelled"), "status"),
    ({"priority": "urgent"}, "priority: must be one of high, normal, low", "priority"),
    ({"cursor": "!!!"}, "cursor: not a cursor this API returned", "cursor"),
    ({"cursor": "YWJj"}, "cursor: not a cursor this API returned", "cursor"),  # "abc"
    ({"cursor": "__4"}, "cursor: not a cursor this API returned", "cursor"),  # not UTF-8
    ({"cursor": "A" * 65}, "cursor: must be at most 64 characters", "cursor"),
    # Once a 500: an integer over 2**63-1 reached SQLite (OverflowError).
    pytest.param({"cursor": comfymgr._b64url(b"9" * 30)}, "cursor: not a cursor this API returned",
                 "cursor", id="cursor-overflow"),
    pytest.param({"cursor": comfymgr._b64url(b"0")}, "cursor: not a cursor this API returned",
                 "cursor", id="cursor-zero"),
])
async def test_a_bad_list_parameter_is_400_naming_it(client, params, message, field):
    await submit(client)
    resp = await client.get(LIST, params=params, headers=HEADERS)
    assert resp.status == 400
    assert await resp.json() == envelope("invalid_request", message, 400, {"field": field})


###############################################################################
# service routes, unknown routes, wrong methods
###############################################################################


async def test_health(client):
    resp = await client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "version": comfymgr.__version__, "database": "ok"}


async def test_status_counts_jobs_by_status_and_priority(client, clock, make_config):
    h1, h2 = await submit(client, priority="high"), await submit(client, priority="high")
    n1 = await submit(client)
    await submit(client)
    await submit(client)
    await submit(client, priority="low")
    assert (await client.delete(job_url(n1["workflowId"]), headers=HEADERS)).status == 200

    def start(s):
        job = s.claim("local", "p-1", 0)[0]
        return s._transition(job.id, JobState.RUNNING, 1).id

    assert await client.app[comfymgr.DB].write(start) == h1["workflowId"]
    clock.advance(12.5)
    resp = await client.get("/v1/status", headers=HEADERS)
    assert resp.status == 200
    body = await resp.json()
    zero = dict.fromkeys(comfymgr.PUBLIC_STATUSES, 0)
    size = body["database"].pop("sizeBytes")
    assert isinstance(size, int) and size > 0
    # The sections this issue owns, exactly (the bridge adds "backends" beside them).
    assert {k: body[k] for k in ("version", "startedAt", "uptimeSeconds", "queue", "database")} == {
        "version": comfymgr.__version__,
        "startedAt": T0_MS,
        "uptimeSeconds": 12.5,
        "queue": {
            "byStatus": {**zero, "queued": 4, "running": 1, "cancelled": 1},
            "byPriority": {"high": {**zero, "queued": 1, "running": 1},
                           "normal": {**zero, "queued": 2, "cancelled": 1},
                           "low": {**zero, "queued": 1}},
        },
        "database": {"path": str(make_config().state_dir / "comfymgr.db"),
                     "schemaVersion": len(comfymgr._MIGRATIONS), "lastError": None},
    }
    assert (await get_job(client, h2["workflowId"]))["queuePosition"] == 1


async def test_an_unknown_route_is_404(client):
    for path in ("/v1/nope", "/v1/comfyui/workflow/a/b", "/"):
        resp = await client.get(path, headers=HEADERS)
        assert resp.status == 404
        assert await resp.json() == envelope("not_found", f"no route for GET {path}", 404,
                                             {"path": path})


@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/v1/comfyui/workflow/abc", ["DELETE", "GET", "HEAD"]),
    ("POST", "/v1/comfyui/workflow/abc", ["DELETE", "GET", "HEAD"]),
    ("GET", SUBMIT, ["POST"]),
    ("DELETE", LIST, ["GET", "HEAD"]),
    ("POST", "/v1/status", ["GET", "HEAD"]),
    ("PATCH", "/health", ["GET", "HEAD"]),
])
async def test_a_wrong_method_is_405_with_allow(client, method, path, allowed):
    resp = await client.request(method, path, headers=HEADERS)
    assert resp.status == 405
    assert resp.headers["Allow"] == ",".join(allowed)
    assert await resp.json() == envelope(
        "method_not_allowed", f"{method} is not allowed here; use {', '.join(allowed)}", 405,
        {"allowed": allowed})


async def test_metrics_show_the_queue_and_job_totals(client):
    jobs = [await submit(client) for _ in range(3)]
    await client.delete(job_url(jobs[0]["workflowId"]), headers=HEADERS)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(await resp.text())
               for s in family.samples}
    assert samples[("comfyui_queue_length", ())] == 2
    assert samples[("comfyui_workflow_total", (("status", "queued"),))] == 3
    assert samples[("comfyui_workflow_total", (("status", "cancelled"),))] == 1
    assert samples[("comfymgr_queue_length", (("priority", "normal"),))] == 2
    assert samples[("comfymgr_queue_length", (("priority", "high"),))] == 0
    assert samples[("comfymgr_http_requests_total", (
        ("method", "POST"), ("route", "/v1/comfyui/workflow"), ("status", "202")))] == 3


# -- a newcomer's rough edges ---------------------------------------------------------------

async def test_a_ui_format_workflow_gets_the_export_hint(client):
    ui = {"last_node_id": 9, "last_link_id": 9, "nodes": [{"id": 1, "type": "KSampler"}],
          "links": [[1, 1, 0, 2, 0, "LATENT"]], "version": 0.4}
    for body, where in (({"workflow": ui}, "workflow"), (ui, "body")):
        resp = await client.post(SUBMIT, json=body, headers=HEADERS)
        assert resp.status == 400
        assert await resp.json() == envelope(
            "invalid_workflow", f"{where}: this is a workflow in ComfyUI's UI format (it has nodes and "
            "links); comfymgr runs the API format: in ComfyUI use Workflow > Export (API), and send "
            "that file's content as workflow", 400, {"field": where, "format": "ui"})


async def test_the_most_useful_failure_comes_first(client):
    resp = await client.post(SUBMIT, json={"workflow": workflow(), "webhook": {"url": "ftp://x"}},
                             headers=HEADERS)
    assert await resp.json() == envelope(
        "invalid_request", "webhook.url: must be an http:// or https:// URL with a host", 400,
        {"field": "webhook.url"})


async def test_server_header_is_plain(client):
    for path, headers in (("/health", {}), (SUBMIT + "/x", HEADERS), ("/nowhere", HEADERS)):
        resp = await client.get(path, headers=headers)
        assert resp.headers["Server"] == "comfymgr", path


async def raw_exchange(client, request: bytes, read_until=b"\r\n\r\n") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.readuntil(read_until), 5)
    writer.close()
    return data


async def test_expect_continue_checks_the_key_before_inviting_the_body(client):
    head = (f"POST {SUBMIT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 5000000\r\nExpect: 100-continue\r\n")
    refused = await raw_exchange(client, (head + "\r\n").encode())
    assert refused.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in refused
    wrong = await raw_exchange(client, (head + "X-API-Key: nope\r\n\r\n").encode())
    assert wrong.startswith(b"HTTP/1.1 401 ")
    invited = await raw_exchange(client, (head + f"X-API-Key: {API_KEY}\r\n\r\n").encode())
    assert invited == b"HTTP/1.1 100 Continue\r\n\r\n"
    odd = await raw_exchange(client, (head.replace("100-continue", "something-else")
                                       + f"X-API-Key: {API_KEY}\r\n\r\n").encode())
    assert odd.startswith(b"HTTP/1.1 417 ")


# The submit's graph check has a fast path; it must answer as the generic walk does.
_values = st.none() | st.booleans() | st.integers() | st.text(max_size=3) | st.lists(st.integers(), max_size=2)
_nodes = st.one_of(
    st.fixed_dictionaries({}, optional={"class_type": st.one_of(st.text(max_size=3), st.integers()),
                                        "inputs": st.one_of(st.dictionaries(st.text(max_size=2), _values,
                                                                            max_size=2), _values),
                                        "_meta": _values}),
    _values)
_graphs = st.one_of(st.dictionaries(st.text(max_size=3), _nodes, max_size=4), _values)


@settings(max_examples=500, deadline=None)
@given(graph=_graphs)
def test_the_fast_graph_check_answers_as_the_generic_walk(graph):
    generic_schema = dict(comfymgr._WORKFLOW_SCHEMA)  # another object: no fast path
    assert comfymgr._Schema._check(comfymgr._WORKFLOW_SCHEMA, graph, ("workflow",)) == \
        comfymgr._Schema._check(generic_schema, graph, ("workflow",))
