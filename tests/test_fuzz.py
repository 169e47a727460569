"""A hostile ComfyUI, fuzzed: between the real messages of each run its
WebSocket sends messages of every known type with random JSON as `data`,
messages of types nobody knows, and binary frames of random bytes; its
/history, /queue, /system_stats and /object_info answers are replaced at
random by other JSON. Whatever it does, every job ends, or waits behind a
backend /v1/status shows down with a lastError; no task fails; /health
answers; and once the hostility stops, the next well-formed job completes.

COMFYMGR_FUZZ_EXAMPLES sets the number of examples (CI: 20; the figures in
docs/RELIABILITY.md come from a longer run). Each example is reproducible
from the seed hypothesis prints when it fails."""

from __future__ import annotations

import asyncio
import json
import os

from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bridge import unique

import comfymgr
from conftest import API_KEY, HEADERS, workflow
from fake_comfyui import CHAOS_ROUTES, PROMPT_ID_MARK, Chaos, FakeComfyUI

EXAMPLES = int(os.environ.get("COMFYMGR_FUZZ_EXAMPLES", "20"))
REPORT = os.environ.get("COMFYMGR_FUZZ_REPORT")  # a JSON-lines file of per-example figures

KNOWN_TYPES = ["status", "execution_start", "execution_cached", "executing", "executed", "progress",
               "progress_state", "execution_success", "execution_error", "execution_interrupted",
               "feature_flags"]
FIELDS = ["node", "nodes", "value", "max", "output", "display_node", "status", "exec_info",
          "exception_message", "exception_type", "traceback", "node_id", "node_type", "sid"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
# Data with the real field names, aimed at the running prompt: known types
# whose fields hold the wrong things.
aimed = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4).map(
    lambda data: {**data, "prompt_id": PROMPT_ID_MARK})
messages = st.tuples(st.sampled_from(KNOWN_TYPES) | st.text(min_size=1, max_size=24),
                     json_values | aimed | st.text(max_size=40))
answers = (json_values
           | st.builds(lambda a, b: {"queue_running": a, "queue_pending": b}, json_values, json_values)
           | st.builds(lambda s: {"status": s, "outputs": {}}, json_values)
           | st.builds(lambda s: {"system": s, "devices": [s]}, json_values))
plans = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1),
    "messages": st.lists(messages, min_size=1, max_size=12),
    "message_rate": st.sampled_from([0.2, 0.5, 0.9]),
    "answers": st.lists(answers, min_size=1, max_size=8),
    "answer_rates": st.fixed_dictionaries({route: st.sampled_from([0.0, 0.2, 0.5])
                                           for route in CHAOS_ROUTES}),
    "binary": st.lists(st.binary(max_size=64), max_size=3),
    "jobs": st.integers(1, 3),
})


@settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(plan=plans)
def test_a_hostile_comfyui_never_wedges_comfymgr(plan, tmp_path_factory):
    figures = asyncio.run(asyncio.wait_for(scenario(plan, tmp_path_factory.mktemp("fuzz")), 120))
    if REPORT:
        with open(REPORT, "a") as out:
            out.write(json.dumps(figures) + "\n")


async def scenario(plan, tmp):
    fake = FakeComfyUI(output_dir=tmp / "comfy" / "output")
    # Runs long enough for several reconciles and many progress messages each.
    fake.node_delay.update({"ImageInvert": 0.2, "ImageScale": 0.2})
    fake.progress_steps["ImageScale"] = 10
    await fake.start()
    config = comfymgr.Config.defaults(
        state_dir=tmp / "state", api_keys=(API_KEY,), rate_limit=0, port=0, host="127.0.0.1",
        comfyui_url=fake.url, progress_interval=0.0, reconcile_interval=0.05, backend_timeout=0.3,
        cancel_grace=2.0)
    app = comfymgr.create_app(config)
    client = TestClient(TestServer(app))
    await client.start_server()
    app[comfymgr.SUPERVISOR].restart_base = 0.01
    loop = asyncio.get_running_loop()
    try:
        await until(client, lambda status: status["backends"][0]["state"] == "up", 15)
        chaos = Chaos(seed=plan["seed"], messages=plan["messages"], message_rate=plan["message_rate"],
                      answers=plan["answers"], answer_rates=plan["answer_rates"], binary=plan["binary"])
        fake.chaos = chaos
        ids = []
        for n in range(plan["jobs"]):
            resp = await client.post("/v1/comfyui/workflow", headers=HEADERS,
                                     json={"workflow": unique(workflow("chain"), f"fz{n}")})
            assert resp.status == 202, await resp.text()
            ids.append((await resp.json())["workflowId"])
        # Hostile for up to 3 s, or until every job ended.
        deadline = loop.time() + 3
        while loop.time() < deadline and not all(j["status"] in TERMINAL for j in await jobs(client, ids)):
            await asyncio.sleep(0.05)
        fake.chaos = None
        # Calm: every job ends (or waits behind a backend shown down, with why).
        status = await until(client, lambda status: True, 1)
        ended = await until_jobs(client, ids, 30)
        for job in ended:
            if job["status"] not in TERMINAL:
                backend = next(b for b in status["backends"] if b["name"] == (job["backend"] or "local"))
                assert job["status"] == "queued" and backend["state"] != "up" and backend["lastError"], job
        status = await (await client.get("/v1/status", headers=HEADERS)).json()
        failed_tasks = [t for t in status["tasks"] if t["failures"]]
        assert not failed_tasks, failed_tasks  # an exception in a task is a defect, even if it recovered
        assert all(t["running"] for t in status["tasks"] if t["running"] is not None), status["tasks"]
        assert (await client.get("/health")).status == 200
        # The next well-formed job completes.
        resp = await client.post("/v1/comfyui/workflow", headers=HEADERS,
                                 json={"workflow": unique(workflow("simple"), "after")})
        assert resp.status == 202, await resp.text()
        after = (await resp.json())["workflowId"]
        [done] = await until_jobs(client, [after], 30)
        assert done["status"] == "completed", done
        assert all(n == 1 for n in fake.execution_count.values()), fake.execution_count
        return {"jobs": len(ids), "ends": sorted(j["status"] + (":" + j["error"]["code"] if j["error"] else "")
                                                 for j in ended),
                "junk_sent": chaos.sent, "answers_replaced": chaos.replaced}
    finally:
        fake.chaos = None
        await client.close()
        await fake.stop()


TERMINAL = ("completed", "failed", "cancelled")


async def jobs(client, ids):
    out = []
    for job_id in ids:
        resp = await client.get(f"/v1/comfyui/workflow/{job_id}", headers=HEADERS)
        assert resp.status == 200
        out.append(await resp.json())
    return out


async def until(client, predicate, timeout):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        resp = await client.get("/v1/status", headers=HEADERS)
        assert resp.status == 200
        status = await resp.json()
        if predicate(status) or loop.time() > deadline:
            return status
        await asyncio.sleep(0.02)


async def until_jobs(client, ids, timeout):
    """The jobs once all ended, or as they are when the time is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await jobs(client, ids)
        if all(j["status"] in TERMINAL for j in found) or loop.time() > deadline:
            return found
        await asyncio.sleep(0.05)
