"""Webhooks against a receiver on loopback that checks signatures, and
idempotent submits."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import time

import aiohttp
import pytest
from aiohttp import web
from test_bridge import free_port, start_comfymgr, status_is, submit, wait_backends_up, wait_job

import comfymgr
from conftest import API_KEY, HEADERS, workflow

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"fedcba9876543210fedcba9876543210").decode()


def verify(secret: str, headers, body: bytes, tolerance: float = 300) -> dict:
    """docs/API.md's verification snippet: Standard Webhooks, stdlib only."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance:
        raise ValueError("stale webhook")
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body,
                                         hashlib.sha256).digest()).decode()
    for signature in headers["webhook-signature"].split():
        version, _, value = signature.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return json.loads(body)
    raise ValueError("bad signature")


class Receiver:
    """An application's webhook endpoint; `plan` says how to answer each call."""

    def __init__(self):
        self.received = []
        self.plan = []            # per call: int status, ("retry_after", s), "hang", "redirect", "huge"
        self.arrived = asyncio.Event()
        self.redirected_to = 0

    async def handle(self, request):
        body = await request.read()
        self.received.append((dict(request.headers), body))
        self.arrived.set()
        action = self.plan.pop(0) if self.plan else 200
        if action == "hang":
            await asyncio.sleep(30)
        if action == "redirect":
            raise web.HTTPFound("/elsewhere")
        if action == "huge":
            return web.Response(body=b"x" * (10 * 2**20))
        if isinstance(action, tuple):
            return web.Response(status=429, headers={"Retry-After": str(action[1])})
        return web.Response(status=action, text="ok")

    async def elsewhere(self, request):
        self.redirected_to += 1
        return web.Response(text="moved here")

    async def wait(self, count, timeout=10):
        async def poll():
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(poll(), timeout)


@pytest.fixture
async def receiver(aiohttp_server):
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    app.router.add_post("/elsewhere", r.elsewhere)
    server = await aiohttp_server(app)
    r.url = f"http://127.0.0.1:{server.port}/hook"
    return r


@pytest.fixture
def hook_config(make_config):
    def make(**overrides):
        values = dict(webhook_secrets=comfymgr._parse_webhook_secrets(f"{SECRET},{OLD_SECRET}"),
                      webhook_backoff=5.0, webhook_timeout=0.5, progress_interval=0.0,
                      comfyui_url="http://127.0.0.1:9",
                      # The receiver is on loopback, which only an allowlist opens.
                      webhook_allow=comfymgr._parse_hosts_and_networks("127.0.0.1"))
        values.update(overrides)
        return make_config(**values)
    return make


def delivered_states(job):
    return [(d["event"], d["state"], d["attempts"]) for d in job["webhook"]["deliveries"]]


async def get(client, job_id):
    return await (await client.get(f"/v1/comfyui/workflow/{job_id}", headers=HEADERS)).json()


async def test_signed_delivery_of_a_real_completion(make_client, hook_config, fake, receiver):
    client = await make_client(hook_config(comfyui_url=fake.url,
                                           public_url="https://gpu1.example.com"))
    await wait_backends_up(client)
    job = await submit(client, workflow("simple"), webhook={"url": receiver.url})
    assert job["webhook"] == {"url": receiver.url, "events": ["completed", "error", "cancelled"],
                              "deliveries": []}
    await wait_job(client, job["workflowId"], status_is("completed"))
    await receiver.wait(1)
    headers, body = receiver.received[0]
    payload = verify(SECRET, headers, body)
    assert verify(OLD_SECRET, headers, body) == payload  # every configured secret signs
    assert payload["type"] == "workflow:completed" and payload["workflowId"] == job["workflowId"]
    assert payload["status"] == "completed" and isinstance(payload["seq"], int)
    assert payload["outputs"][0]["url"] == \
        "https://gpu1.example.com/v1/comfyui/output/peer_simple_00001_.png"
    assert headers["webhook-id"].startswith("msg_")
    with pytest.raises(ValueError):
        verify(SECRET, {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) + 1)}, body)
    state = await wait_job(client, job["workflowId"],
                           lambda j: j["webhook"]["deliveries"] and
                           j["webhook"]["deliveries"][0]["state"] == "delivered")
    [delivery] = state["webhook"]["deliveries"]
    assert delivery["id"] == headers["webhook-id"] and delivery["lastStatus"] == 200
    assert delivery["attempts"] == 1 and delivery["deliveredAt"] is not None
    assert len(receiver.received) == 1  # queued and started were not asked for
    text = await (await client.get("/metrics")).text()
    assert 'comfymgr_webhook_deliveries_total{outcome="sent"} 1.0' in text


async def test_retries_with_backoff_until_success(make_client, hook_config, receiver, clock):
    receiver.plan = [500, 503, 200]
    client = await make_client(hook_config(), clock=clock)
    job = await submit(client, workflow(), webhook={"url": receiver.url, "events": ["cancelled"]})
    await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    hooks = client.app[comfymgr.WEBHOOKS]
    await receiver.wait(1)
    await asyncio.sleep(0.05)
    assert delivered_states(await get(client, job["workflowId"])) == [("workflow:cancelled", "pending", 1)]
    assert await hooks.deliver_due() == 0          # not due before the backoff
    clock.advance(4)                               # 5 s +- 20 % jitter
    assert await hooks.deliver_due() == 0
    clock.advance(2.1)
    assert await hooks.deliver_due() == 1          # second attempt: 503
    clock.advance(12.1)                            # 10 s +- 20 %
    assert await hooks.deliver_due() == 1          # third: 200
    state = await get(client, job["workflowId"])
    assert delivered_states(state) == [("workflow:cancelled", "delivered", 3)]
    ids = {h["webhook-id"] for h, _ in receiver.received}
    assert len(receiver.received) == 3 and len(ids) == 1  # one id across retries
    text = await (await client.get("/metrics")).text()
    assert 'comfymgr_webhook_deliveries_total{outcome="retried"} 2.0' in text


async def test_429_retry_after_is_honoured(make_client, hook_config, receiver, clock):
    receiver.plan = [("retry_after", 120)]
    client = await make_client(hook_config(), clock=clock)
    job = await submit(client, workflow(), webhook={"url": receiver.url, "events": ["cancelled"]})
    await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    await receiver.wait(1)
    hooks = client.app[comfymgr.WEBHOOKS]
    await asyncio.sleep(0.05)
    clock.advance(60)
    assert await hooks.deliver_due() == 0
    clock.advance(61)
    assert await hooks.deliver_due() == 1
    assert delivered_states(await get(client, job["workflowId"])) == [("workflow:cancelled", "delivered", 2)]


async def test_hanging_receiver_times_out_and_is_retried(make_client, hook_config, receiver, clock):
    receiver.plan = ["hang"]
    client = await make_client(hook_config(webhook_timeout=0.3), clock=clock)
    job = await submit(client, workflow(), webhook={"url": receiver.url, "events": ["cancelled"]})
    await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    state = await wait_job(client, job["workflowId"],
                           lambda j: j["webhook"]["deliveries"] and j["webhook"]["deliveries"][0]["attempts"])
    [delivery] = state["webhook"]["deliveries"]
    assert delivery["state"] == "pending" and delivery["lastError"] == "timed out"
    clock.advance(10)
    assert await client.app[comfymgr.WEBHOOKS].deliver_due() == 1
    assert delivered_states(await get(client, job["workflowId"])) == [("workflow:cancelled", "delivered", 2)]


async def test_redirects_are_not_followed_and_4xx_is_final(make_client, hook_config, receiver):
    receiver.plan = ["redirect"]
    client = await make_client(hook_config())
    a = await submit(client, workflow(), webhook={"url": receiver.url, "events": ["cancelled"]})
    await client.delete(f"/v1/comfyui/workflow/{a['workflowId']}", headers=HEADERS)
    state = await wait_job(client, a["workflowId"],
                           lambda j: j["webhook"]["deliveries"][0]["state"] != "pending"
                           if j["webhook"]["deliveries"] else False)
    assert delivered_states(state) == [("workflow:cancelled", "failed", 1)]
    assert state["webhook"]["deliveries"][0]["lastStatus"] == 302
    assert receiver.redirected_to == 0
    receiver.plan = [410]
    b = await submit(client, workflow(), webhook={"url": receiver.url, "events": ["cancelled"]})
    await client.delete(f"/v1/comfyui/workflow/{b['workflowId']}", headers=HEADERS)
    state = await wait_job(client, b["workflowId"],
                           lambda j: j["webhook"]["deliveries"][0]["state"] != "pending"
                           if j["webhook"]["deliveries"] else False)
    assert delivered_states(state) == [("workflow:cancelled", "failed", 1)]


async def test_gives_up_after_max_attempts(make_client, hook_config, receiver, clock):
    receiver.plan = [500] * 10
    client = await make_client(hook_config(webhook_max_attempts=3), clock=clock)
    job = await submit(client, workflow(), webhook={"url": receiver.url, "events": ["cancelled"]})
    await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    await receiver.wait(1)
    hooks = client.app[comfymgr.WEBHOOKS]
    for _ in range(5):
        clock.advance(3600)
        await hooks.deliver_due()
    assert delivered_states(await get(client, job["workflowId"])) == [("workflow:cancelled", "failed", 3)]
    assert len(receiver.received) == 3


async def test_huge_response_bodies_are_not_read(make_client, hook_config, receiver):
    receiver.plan = ["huge"]
    client = await make_client(hook_config())
    job = await submit(client, workflow(), webhook={"url": receiver.url, "events": ["cancelled"]})
    await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    state = await wait_job(client, job["workflowId"],
                           lambda j: j["webhook"]["deliveries"] and
                           j["webhook"]["deliveries"][0]["state"] == "delivered")
    assert delivered_states(state) == [("workflow:cancelled", "delivered", 1)]


async def test_bad_webhook_fields(make_client, hook_config, receiver):
    client = await make_client(hook_config())
    for url, message in [
            ("ftp://example.com/x", "webhook.url: must be an http:// or https:// URL with a host"),
            ("http:///nohost", "webhook.url: must be an http:// or https:// URL with a host")]:
        resp = await client.post("/v1/comfyui/workflow", headers=HEADERS,
                                 json={"workflow": workflow(), "webhook": {"url": url}})
        assert resp.status == 400
        assert await resp.json() == {"error": "invalid_request", "message": message, "statusCode": 400,
                                     "details": {"field": "webhook.url"}}
    resp = await client.post("/v1/comfyui/workflow", headers=HEADERS,
                             json={"workflow": workflow(), "webhook": {"url": receiver.url,
                                                                       "events": ["progress"]}})
    assert resp.status == 400 and (await resp.json())["details"] == {"field": "webhook.events.0"}


async def test_delivery_survives_kill_9(tmp_path, fake, receiver):
    receiver.plan = [503] * 1000
    port = free_port()
    env_extra = {"COMFYMGR_WEBHOOK_SECRET": SECRET, "COMFYMGR_WEBHOOK_BACKOFF": "100ms",
                 "COMFYMGR_WEBHOOK_ALLOW": "127.0.0.1"}
    os.environ.update(env_extra)
    try:
        proc = start_comfymgr(tmp_path, port, fake.url)
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.post(base + "/v1/comfyui/workflow", headers=HEADERS, json={
                            "workflow": workflow(), "webhook": {"url": receiver.url}}) as resp:
                        job = await resp.json()
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            await receiver.wait(2)  # the completion event, failing
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            seen = {h["webhook-id"] for h, _ in receiver.received}
            receiver.plan = []
            proc = start_comfymgr(tmp_path, port, fake.url)
            await receiver.wait(len(receiver.received) + 1, timeout=20)
            headers, body = receiver.received[-1]
            assert headers["webhook-id"] in seen
            payload = verify(SECRET, headers, body)
            assert payload["workflowId"] == job["workflowId"] and payload["type"] == "workflow:completed"
    finally:
        for key in env_extra:
            os.environ.pop(key, None)
        proc.kill()
        proc.wait(10)


# -- idempotent submits ------------------------------------------------------------

async def test_twenty_concurrent_submits_with_one_key_make_one_job(make_client, make_config):
    client = await make_client(make_config(api_keys=(API_KEY, "second-key")))
    body = {"workflow": workflow(), "priority": "high"}

    async def post():
        resp = await client.post("/v1/comfyui/workflow", json=body,
                                 headers={**HEADERS, "Idempotency-Key": "order-42"})
        return resp.status, (await resp.json())["workflowId"], resp.headers.get("Idempotent-Replayed")

    results = await asyncio.gather(*(post() for _ in range(20)))
    assert sorted(r[0] for r in results) == [200] * 19 + [202]
    assert len({r[1] for r in results}) == 1
    assert sorted(str(r[2]) for r in results) == ["None"] + ["true"] * 19
    listing = await (await client.get("/v1/comfyui/workflows", headers=HEADERS)).json()
    assert [j["workflowId"] for j in listing["workflows"]] == [results[0][1]]
    # Whitespace and key order do not make a different body.
    resp = await client.post("/v1/comfyui/workflow", headers={**HEADERS, "Idempotency-Key": "order-42",
                                                               "Content-Type": "application/json"},
                             data=json.dumps({"priority": "high", "workflow": workflow()}, indent=2))
    assert resp.status == 200
    # The same key with another body is a conflict.
    resp = await client.post("/v1/comfyui/workflow", json={**body, "priority": "low"},
                             headers={**HEADERS, "Idempotency-Key": "order-42"})
    assert resp.status == 422
    assert await resp.json() == {
        "error": "idempotency_conflict",
        "message": "this Idempotency-Key was used with a different request body",
        "statusCode": 422, "details": {"workflowId": results[0][1]}}
    # Keys are per API key: another client's "order-42" is its own.
    resp = await client.post("/v1/comfyui/workflow", json=body,
                             headers={"X-API-Key": "second-key", "Idempotency-Key": "order-42"})
    assert resp.status == 202 and (await resp.json())["workflowId"] != results[0][1]


async def test_idempotency_keys_expire(make_client, make_config, clock):
    client = await make_client(make_config(), clock=clock)
    headers = {**HEADERS, "Idempotency-Key": "k1"}
    first = await (await client.post("/v1/comfyui/workflow", json={"workflow": workflow()},
                                     headers=headers)).json()
    clock.advance(23 * 3600)
    again = await client.post("/v1/comfyui/workflow", json={"workflow": workflow()}, headers=headers)
    assert again.status == 200 and (await again.json())["workflowId"] == first["workflowId"]
    clock.advance(2 * 3600)
    fresh = await client.post("/v1/comfyui/workflow", json={"workflow": workflow()}, headers=headers)
    assert fresh.status == 202 and (await fresh.json())["workflowId"] != first["workflowId"]
    await client.app[comfymgr.RETENTION].run_once()  # prunes expired keys
    count = await client.app[comfymgr.DB].read(
        lambda s: s._conn.execute("SELECT COUNT(*) FROM idempotency").fetchone()[0])
    assert count == 1
    for bad in ("", "x" * 256, "tab\there", "é"):
        resp = await client.post("/v1/comfyui/workflow", json={"workflow": workflow()},
                                 headers={**HEADERS, "Idempotency-Key": bad})
        assert resp.status == 400, bad
