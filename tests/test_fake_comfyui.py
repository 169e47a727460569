"""Tests for tests/fake_comfyui.py: it must behave like the recorded ComfyUI.

Each recorded scenario in tests/data/comfyui/traces is replayed against the
fake over real sockets, with a submitter socket (its clientId sent as
client_id) and an observer socket, and each socket must receive the recorded
sequence of messages (types and key fields; ids, timestamps and file counters
aside). Gates stand in for the slow nodes of the recordings, so nothing sleeps.

Run: python -m pytest -q tests/test_fake_comfyui.py -o asyncio_mode=auto
"""

import asyncio
import copy
import json
import re
import sys
import time
from pathlib import Path

import aiohttp
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_comfyui import FakeComfyUI

DATA = Path(__file__).resolve().parent / "data" / "comfyui"
TRACES = DATA / "traces"
HTTP = DATA / "http"
WAIT = 5.0  # seconds; only a safety net, every wait below ends on an event


# ---------------------------------------------------------------------------
# Recordings
# ---------------------------------------------------------------------------

def load_trace(name):
    return [json.loads(line) for line in (TRACES / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def recorded_messages(trace, sock):
    return [r["msg"] for r in trace if r["sock"] == sock and r["kind"] == "ws_text"]


def recorded_posts(trace, path="/prompt"):
    return [r.get("request") for r in trace if r["kind"] == "http" and r["method"] == "POST" and r["path"] == path]


def recorded_history(name):
    """traces/<name>.history.json maps each prompt id to its GET /history/<id> answer ({} if unknown)."""
    answers = json.loads((TRACES / f"{name}.history.json").read_text())
    return {pid: answer.get(pid) for pid, answer in answers.items()}


def normalize_filename(name):
    name = re.sub(r"^ComfyUI_temp_[a-z]{5}_", "ComfyUI_temp_?????_", name)
    return re.sub(r"_\d{5}_\.png$", "_#####_.png", name)


def summarize(message):
    """What must match between a recorded and a replayed message."""
    kind, data = message["type"], message["data"]
    keys = tuple(data)
    if kind == "status":
        return kind, keys, data["status"]["exec_info"]["queue_remaining"]
    if kind == "execution_cached":
        return kind, keys, tuple(data["nodes"])
    if kind == "executing":
        return kind, keys, data["node"]
    if kind == "executed":
        images = [dict(i, filename=normalize_filename(i["filename"])) for i in data["output"]["images"]]
        return kind, keys, data["node"], data["display_node"], json.dumps(images, sort_keys=True)
    if kind == "progress_state":
        nodes = {k: [tuple(v), v["state"], v["value"], v["max"], v["display_node_id"], v["parent_node_id"],
                     v["real_node_id"]] for k, v in data["nodes"].items()}
        return kind, keys, json.dumps(nodes)  # json keeps 1 and 1.0 apart, as the recording does
    if kind == "progress":
        return kind, keys, json.dumps([data["value"], data["max"], data["node"]])
    if kind in ("execution_error", "execution_interrupted"):
        return kind, keys, data["node_id"], data["node_type"], tuple(sorted(data["executed"]))
    if kind == "feature_flags":
        return kind, json.dumps(data, sort_keys=True)
    return (kind, keys)


def frame_functions(traceback_lines):
    return [re.search(r", in (\S+)\n", line).group(1) for line in traceback_lines]


def normalize_history(entry, dirs=None):
    """A history entry with ids, numbers, timestamps, counters and local paths taken out."""
    entry = copy.deepcopy(entry)
    _number, _prompt_id, prompt, extra_data, outputs = entry["prompt"]
    entry["prompt"] = ["<number>", "<id>", prompt, {k: "<client>" for k in extra_data}, outputs]
    for node_output in entry["outputs"].values():
        for image in node_output.get("images", []):
            image["filename"] = normalize_filename(image["filename"])
    for _, data in entry["status"]["messages"]:
        data["prompt_id"], data["timestamp"] = "<id>", 0
        if "traceback" in data:
            data["traceback"] = frame_functions(data["traceback"])
            data["executed"] = sorted(data["executed"])
            data["current_outputs"] = sorted(data["current_outputs"])
            message = data["exception_message"]
            for local, recorded in (dirs or {}).items():
                message = message.replace(local, recorded)
            data["exception_message"] = re.sub(r"(full_output_folder|commonpath): \S+", r"\1: <dir>", message)
            if "images" in data["current_inputs"]:
                data["current_inputs"]["images"] = ["<image>"]
        elif "executed" in data:
            data["executed"] = sorted(data["executed"])
    return entry


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------

@pytest.fixture
async def fake(tmp_path):
    fake = FakeComfyUI(output_dir=tmp_path / "output")
    # The recordings' input folder held these two.
    (tmp_path / "input" / "example.png").write_bytes((HTTP / "view_input_example.body").read_bytes())
    (tmp_path / "input" / "peer_corrupt.png").write_bytes(b"this is not an image\n")
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


class Sock:
    """A client socket and every message it received, the first (status with sid) included."""

    def __init__(self, ws, index, first):
        self.ws, self.index, self.received = ws, index, [first]

    async def drain(self, fake, idle=True):
        """Receives exactly what the fake has sent to this socket (once idle, or so far)."""
        await (fake.wait_idle() if idle else fake.wait_flushed())
        while len(self.received) < len(fake.ws_sent[self.index]):
            self.received.append(await self.ws.receive_json(timeout=WAIT))
        return self.received


async def connect(session, fake, client_id=None, prefix=""):
    query = f"?clientId={client_id}" if client_id else ""
    ws = await session.ws_connect(f"{fake.url}{prefix}/ws{query}")
    first = await ws.receive_json(timeout=WAIT)  # the handler has registered the socket by now
    index = max(i for i, sid in enumerate(fake.ws_connects) if sid == first["data"]["sid"])
    return Sock(ws, index, first)


async def post_prompt(session, fake, body, client_id=None, expect=200):
    body = copy.deepcopy(body)
    if client_id is not None and "client_id" in body:
        body["client_id"] = client_id
    async with session.post(f"{fake.url}/prompt", json=body) as response:
        assert response.status == expect, await response.text()
        return await response.json()


async def get_json(session, url):
    async with session.get(url) as response:
        assert response.status == 200
        return await response.json()


def pulse(gate):
    """Lets the nodes waiting at a gate go on; the next ones wait again."""
    gate.set()
    gate.clear()


def assert_same_messages(received, recorded):
    assert [summarize(m) for m in received] == [summarize(m) for m in recorded]


async def assert_replay(fake, socks, trace):
    for name, sock in socks.items():
        assert_same_messages(await sock.drain(fake), recorded_messages(trace, name))


async def two_sockets(session, fake, name):
    submitter_id = f"{name}-submitter-test"
    return submitter_id, {"submitter": await connect(session, fake, submitter_id),
                          "observer": await connect(session, fake, f"{name}-observer-test")}


# ---------------------------------------------------------------------------
# Replayed scenarios
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["success", "success_chain", "cached_rerun", "upscale_progress"])
async def test_sequential_scenarios_replay(fake, session, name):
    trace = load_trace(name)
    submitter_id, socks = await two_sockets(session, fake, name)
    prompt_ids = []
    for body in recorded_posts(trace):
        prompt_ids.append((await post_prompt(session, fake, body, submitter_id))["prompt_id"])
        await fake.wait_idle()
    await assert_replay(fake, socks, trace)

    recorded = list(recorded_history(name).values())
    for prompt_id, expected in zip(prompt_ids, recorded):
        answer = await get_json(session, f"{fake.url}/history/{prompt_id}")
        assert list(answer) == [prompt_id]
        assert normalize_history(answer[prompt_id]) == normalize_history(expected)
    assert await get_json(session, f"{fake.url}/queue") == {"queue_running": [], "queue_pending": []}


async def test_cached_rerun_writes_no_new_file_and_preview_goes_to_temp(fake, session, tmp_path):
    trace = load_trace("cached_rerun")
    for body in recorded_posts(trace):
        await post_prompt(session, fake, body)
        await fake.wait_idle()
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == ["peer_chain_00001_.png", "peer_chain_b_00001_.png"]
    assert (tmp_path / "output" / "peer_chain_00001_.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    preview = recorded_posts(load_trace("success_chain"))[1]
    answer = await post_prompt(session, fake, preview)
    await fake.wait_idle()
    history = await get_json(session, f"{fake.url}/history/{answer['prompt_id']}")
    (image,) = history[answer["prompt_id"]]["outputs"]["3"]["images"]
    assert image["type"] == "temp" and re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", image["filename"])
    assert (tmp_path / "temp" / image["filename"]).is_file()


async def test_execution_error_replay(fake, session, tmp_path):
    trace = load_trace("execution_error")
    submitter_id, socks = await two_sockets(session, fake, "execution_error")
    prompt_ids = []
    for body in recorded_posts(trace):
        prompt_ids.append((await post_prompt(session, fake, body, submitter_id))["prompt_id"])
        await fake.wait_idle()
    await assert_replay(fake, socks, trace)

    dirs = {str(tmp_path / "input"): "/opt/comfyui/ComfyUI/input", str(tmp_path / "output"): "/opt/comfyui/ComfyUI/output"}
    for prompt_id, expected in zip(prompt_ids, recorded_history("execution_error").values()):
        answer = (await get_json(session, f"{fake.url}/history/{prompt_id}"))[prompt_id]
        assert normalize_history(answer, dirs) == normalize_history(expected)


async def test_interrupt_between_nodes_replay(fake, session):
    trace = load_trace("interrupt")
    submitter_id, socks = await two_sockets(session, fake, "interrupt")
    blur = fake.gate("ImageBlur", interruptible=False)  # a blur does not look at interrupts
    first, second = recorded_posts(trace)
    targeted = [b for b in recorded_posts(trace, "/interrupt") if b]

    for body, interrupts in ((first, [None]), (second, targeted)):
        prompt_id = (await post_prompt(session, fake, body, submitter_id))["prompt_id"]
        await fake.wait_for_gated(prompt_id, "10")
        pulse(blur)
        await fake.wait_for_gated(prompt_id, "11")
        for interrupt in interrupts:
            if interrupt and interrupt["prompt_id"] != "00000000-not-running":
                interrupt = {"prompt_id": prompt_id}
            async with session.post(f"{fake.url}/interrupt", json=interrupt) as response:
                assert response.status == 200 and await response.read() == b""
        pulse(blur)  # node 11 ends; the interrupt lands on node 12
        await fake.wait_idle()

    await assert_replay(fake, socks, trace)
    for prompt_id, expected in zip(fake.posted_prompt_ids, recorded_history("interrupt").values()):
        answer = (await get_json(session, f"{fake.url}/history/{prompt_id}"))[prompt_id]
        assert normalize_history(answer) == normalize_history(expected)
    assert fake.interrupt_bodies[0] == {} and fake.interrupt_bodies[1] == {"prompt_id": "00000000-not-running"}


async def test_no_client_id_replay(fake, session):
    trace = load_trace("no_client_id")
    _, socks = await two_sockets(session, fake, "no_client_id")
    save, blur = fake.gate("SaveImage", interruptible=False), fake.gate("ImageBlur", interruptible=False)
    simple, slow = recorded_posts(trace)
    first = (await post_prompt(session, fake, simple))["prompt_id"]
    await fake.wait_for_gated(first, "2")
    second = (await post_prompt(session, fake, slow))["prompt_id"]
    pulse(save)
    await fake.wait_for_gated(second, "10")
    async with session.post(f"{fake.url}/interrupt") as response:
        assert response.status == 200
    pulse(blur)
    await fake.wait_idle()
    await assert_replay(fake, socks, trace)
    for prompt_id, expected in zip((first, second), recorded_history("no_client_id").values()):
        answer = (await get_json(session, f"{fake.url}/history/{prompt_id}"))[prompt_id]
        assert normalize_history(answer) == normalize_history(expected)


def normalize_queue(queue):
    return {key: [["<n>", "<id>", item[2], item[3], item[4]] for item in items] for key, items in queue.items()}


async def test_queue_delete_replay(fake, session):
    trace = load_trace("queue_delete")
    submitter_id, socks = await two_sockets(session, fake, "queue_delete")
    fake.gate("ImageBlur")
    slow, pending_b, pending_c = recorded_posts(trace)
    running = (await post_prompt(session, fake, slow, submitter_id))["prompt_id"]
    await fake.wait_for_gated(running, "10")
    deleted = (await post_prompt(session, fake, pending_b, submitter_id))["prompt_id"]
    kept = (await post_prompt(session, fake, pending_c, submitter_id))["prompt_id"]

    def recorded_queue(moment):
        queue = json.loads((TRACES / f"queue_delete.{moment}.json").read_text())
        for item in queue["queue_running"] + queue["queue_pending"]:
            item[3]["client_id"] = submitter_id
        return normalize_queue(queue)

    assert normalize_queue(await get_json(session, f"{fake.url}/queue")) == recorded_queue("queue_before")
    for prompt_id in (deleted, running):  # deleting the running prompt does nothing
        async with session.post(f"{fake.url}/queue", json={"delete": [prompt_id]}) as response:
            assert response.status == 200 and await response.read() == b""
        if prompt_id == deleted:
            assert normalize_queue(await get_json(session, f"{fake.url}/queue")) == recorded_queue("queue_after")
    fake.ungate("ImageBlur")
    await fake.wait_idle()
    await assert_replay(fake, socks, trace)
    assert fake.queue_delete_ids == [deleted, running]
    expected = recorded_history("queue_delete")
    assert expected["53f900fd-851b-4990-b61f-9afdb37385d8"] is None
    assert await get_json(session, f"{fake.url}/history/{deleted}") == {}
    for prompt_id, recorded_id in ((running, "4d4424a7-880f-4613-a633-3c1378148472"),
                                   (kept, "87c92a5f-11be-42a4-b699-5e52aed724f3")):
        answer = (await get_json(session, f"{fake.url}/history/{prompt_id}"))[prompt_id]
        assert normalize_history(answer) == normalize_history(expected[recorded_id])


async def test_reconnect_with_same_client_id_steals_then_loses_the_stream(fake, session):
    trace = load_trace("reconnect_same_client_id")
    submitter_id, socks = await two_sockets(session, fake, "reconnect")
    blur = fake.gate("ImageBlur")
    (body,) = recorded_posts(trace)
    prompt_id = (await post_prompt(session, fake, body, submitter_id))["prompt_id"]
    await fake.wait_for_gated(prompt_id, "10")
    socks["submitter_new"] = await connect(session, fake, submitter_id)
    pulse(blur)
    await fake.wait_for_gated(prompt_id, "11")
    assert await get_json(session, f"{fake.url}/history/{prompt_id}") == {}  # not finished: not in history
    await socks["submitter"].drain(fake, idle=False)  # what the old socket got before it closes
    await socks["submitter"].ws.close()
    await fake.wait_until(lambda: submitter_id not in fake.connected_client_ids)
    fake.ungate("ImageBlur")
    await fake.wait_idle()
    await assert_replay(fake, socks, trace)
    history = (await get_json(session, f"{fake.url}/history/{prompt_id}"))[prompt_id]
    assert history["status"]["status_str"] == "success"


async def test_feature_flags_and_anonymous_socket(fake, session):
    trace = load_trace("feature_flags")
    submitter_id = "feature_flags-submitter-test"
    socks = {"submitter": await connect(session, fake, submitter_id),
             "observer": await connect(session, fake, "feature_flags-observer-test")}
    await socks["submitter"].ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
    socks["submitter"].received.append(await socks["submitter"].ws.receive_json(timeout=WAIT))
    socks["submitter_reconnect"] = await connect(session, fake, submitter_id)
    (body,) = recorded_posts(trace)
    await post_prompt(session, fake, body, submitter_id)
    await fake.wait_idle()
    socks["anonymous"] = await connect(session, fake)
    assert re.fullmatch(r"[0-9a-f]{32}", socks["anonymous"].received[0]["data"]["sid"])
    await assert_replay(fake, socks, trace)


async def test_client_prompt_id_and_front_replay(fake, session):
    trace = load_trace("client_prompt_id")
    submitter_id, socks = await two_sockets(session, fake, "client_prompt_id")
    posts = recorded_posts(trace)
    for body in posts[:2]:  # the same prompt_id twice: honoured, not checked, history overwritten
        assert (await post_prompt(session, fake, body, submitter_id))["prompt_id"] == "peer-fixed-875dffd7"
        await fake.wait_idle()
    fake.gate("ImageBlur")
    slow = (await post_prompt(session, fake, posts[2], submitter_id))["prompt_id"]
    await fake.wait_for_gated(slow, "10")
    numbers = [(await post_prompt(session, fake, body, submitter_id))["number"] for body in posts[3:]]
    assert numbers == [3, 4, 5, 6, -7]
    queue = await get_json(session, f"{fake.url}/queue")
    assert sorted(item[0] for item in queue["queue_pending"]) == [-7, 3, 4, 5, 6]
    fake.ungate("ImageBlur")
    await fake.wait_idle()
    await assert_replay(fake, socks, trace)
    history = (await get_json(session, f"{fake.url}/history/peer-fixed-875dffd7"))["peer-fixed-875dffd7"]
    assert history["prompt"][0] == 1
    assert history["outputs"]["2"]["images"][0]["filename"] == "peer_simple_dup_00001_.png"


async def test_validation_error_bodies(fake, session):
    trace = load_trace("validation_error")
    submitter_id, socks = await two_sockets(session, fake, "validation_error")
    expected = json.loads((TRACES / "validation_error.bodies.json").read_text())
    posts = recorded_posts(trace)
    assert len(posts) == len(expected)

    def without_line_numbers(body):
        body = copy.deepcopy(body)
        for node in body["node_errors"].values():
            for error in node["errors"]:
                if "traceback" in error["extra_info"]:
                    error["extra_info"]["traceback"] = frame_functions(error["extra_info"]["traceback"])
        return body

    for body, (case, answer) in zip(posts, expected.items()):
        async with session.post(f"{fake.url}/prompt", json=dict(body, client_id=submitter_id)) as response:
            assert response.status == answer["status"], case
            assert without_line_numbers(await response.json()) == without_line_numbers(answer["body"]), case
    assert fake.posted_prompt_ids == []
    # Rejected posts count: the next accepted prompt is number 10.
    accepted = await post_prompt(session, fake, recorded_posts(load_trace("success"))[0], submitter_id)
    assert accepted["number"] == 10
    await fake.wait_idle()
    for name, sock in socks.items():
        received = await sock.drain(fake)
        assert_same_messages(received[:1], recorded_messages(trace, name))


async def test_partly_valid_prompt_runs_its_good_outputs(fake, session):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "sub/good"}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "nope", "width": 8,
                                                     "height": 8, "crop": "disabled"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["1", 7], "filename_prefix": "bad"}},
        "9": {"class_type": "ImageInvert", "inputs": {"image": ["404", 0]}},  # unreachable: not validated
    }
    answer = await post_prompt(session, fake, {"prompt": prompt})
    assert set(answer["node_errors"]) == {"3", "5"}
    assert answer["node_errors"]["3"]["errors"][0]["type"] == "value_not_in_list"
    assert answer["node_errors"]["5"]["errors"][0]["extra_info"]["exception_type"] == "IndexError"
    await fake.wait_idle()
    history = (await get_json(session, f"{fake.url}/history/{answer['prompt_id']}"))[answer["prompt_id"]]
    assert history["prompt"][4] == ["2"]
    assert history["outputs"] == {"2": {"images": [{"filename": "good_00001_.png", "subfolder": "sub", "type": "output"}]}}
    assert (fake._dirs.output / "sub" / "good_00001_.png").is_file()


# ---------------------------------------------------------------------------
# Knobs: gates, failures, cancel
# ---------------------------------------------------------------------------

async def test_interruptible_gate_cancels_the_running_node(fake, session):
    sock = await connect(session, fake, "cancel-test")
    fake.gate("ImageUpscaleWithModel")
    body = recorded_posts(load_trace("upscale_progress"))[0]
    prompt_id = (await post_prompt(session, fake, body, "cancel-test"))["prompt_id"]
    await fake.wait_for_execution_start(prompt_id)
    await fake.wait_for_gated(prompt_id, "3")
    assert fake.started(prompt_id) and fake.execution_count == {prompt_id: 1}
    async with session.post(f"{fake.url}/interrupt", json={"prompt_id": "someone-else"}) as response:
        assert response.status == 200  # another prompt's id: nothing happens
    assert (prompt_id, "3") in fake.gated
    async with session.post(f"{fake.url}/interrupt", json={"prompt_id": prompt_id}):
        pass
    await fake.wait_idle()
    kinds = [m["type"] for m in await sock.drain(fake)]
    assert kinds[-3:] == ["execution_interrupted", "status", "executing"]
    assert kinds.count("progress") == 16
    interrupted = next(m["data"] for m in sock.received if m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "3" and sorted(interrupted["executed"]) == ["1", "2"]


async def test_fail_node_knob_reports_execution_error(fake, session):
    fake.fail_node["ImageInvert"] = ("RuntimeError", "boom")
    body = recorded_posts(load_trace("success_chain"))[0]
    prompt_id = (await post_prompt(session, fake, body))["prompt_id"]
    await fake.wait_idle()
    status = (await get_json(session, f"{fake.url}/history/{prompt_id}"))[prompt_id]["status"]
    assert (status["status_str"], status["completed"]) == ("error", False)
    event, error = status["messages"][-1]
    assert event == "execution_error"
    assert (error["node_id"], error["node_type"], error["exception_type"], error["exception_message"]) == \
        ("2", "ImageInvert", "RuntimeError", "boom\n")
    assert error["current_inputs"]["image"][0].startswith("<IMAGE stand-in")
    assert sorted(error["current_outputs"]) == ["1", "2", "3", "4"] and error["executed"] == ["1"]


async def test_app_runs_under_aiohttp_test_client(tmp_path, aiohttp_client):
    fake = FakeComfyUI(output_dir=tmp_path / "output")
    client = await aiohttp_client(fake.app)
    async with client.ws_connect("/api/ws?clientId=tc") as ws:
        assert (await ws.receive_json(timeout=WAIT))["data"]["sid"] == "tc"
        body = recorded_posts(load_trace("success"))[0]
        response = await client.post("/api/prompt", json=dict(body, client_id="tc"))
        prompt_id = (await response.json())["prompt_id"]
        await fake.wait_idle()
        kinds = [(await ws.receive_json(timeout=WAIT))["type"] for _ in range(len(fake.ws_sent[0]) - 1)]
        assert kinds[-3:] == ["execution_success", "status", "executing"]
    history = await (await client.get(f"/history/{prompt_id}")).json()
    assert history[prompt_id]["status"]["completed"] is True


async def test_jobs_cancel_when_supported(tmp_path, session):
    fake = FakeComfyUI(output_dir=tmp_path / "output", supports_jobs_cancel=True)
    await fake.start()
    try:
        fake.gate("ImageBlur")
        slow, pending, _ = recorded_posts(load_trace("queue_delete"))
        running = (await post_prompt(session, fake, slow))["prompt_id"]
        waiting = (await post_prompt(session, fake, pending))["prompt_id"]
        await fake.wait_for_gated(running, "10")
        for prompt_id in (waiting, running):
            async with session.post(f"{fake.url}/api/jobs/{prompt_id}/cancel") as response:
                assert response.status == 200
                assert await response.json() == {"cancelled": True}
        await fake.wait_idle()
        for prompt_id in (running, "nope"):  # finished or unknown: a no-op, still 200
            async with session.post(f"{fake.url}/api/jobs/{prompt_id}/cancel") as response:
                assert response.status == 200
                assert await response.json() == {"cancelled": False}
        history = await get_json(session, f"{fake.url}/history")
        assert list(history) == [running]
        assert history[running]["status"]["messages"][-1][0] == "execution_interrupted"
    finally:
        await fake.stop()


async def test_jobs_cancel_absent_by_default(fake, session):
    async with session.post(f"{fake.url}/api/jobs/x/cancel") as response:
        assert response.status == 404


async def test_node_delay_and_progress_steps(fake, session):
    sock = await connect(session, fake, "delay-test")
    fake.node_delay["ImageInvert"] = 0.05
    fake.progress_steps["ImageInvert"] = 3
    body = recorded_posts(load_trace("success_chain"))[0]
    started = time.monotonic()
    await post_prompt(session, fake, body, "delay-test")
    await fake.wait_idle()
    assert time.monotonic() - started >= 0.05
    progress = [m["data"] for m in await sock.drain(fake) if m["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(1, 3, "2"), (2, 3, "2"), (3, 3, "2")]


# ---------------------------------------------------------------------------
# HTTP routes
# ---------------------------------------------------------------------------

def recorded_headers(name):
    lines = (HTTP / f"{name}.headers.txt").read_text().splitlines()
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return status, {k: v for k, v in headers.items() if k not in ("Date", "Server")}


@pytest.mark.parametrize("path, name", [
    ("/object_info/EmptyImage", "object_info_EmptyImage"),
    ("/object_info/SaveImage", "object_info_SaveImage"),
    ("/object_info/NoSuchNode", "object_info_unknown"),
    ("/history/no-such-id", "history_unknown_id"),
    ("/models", "models"),
    ("/models/checkpoints", "models_checkpoints"),
    ("/features", "features"),
    ("/embeddings", "embeddings"),
    ("/prompt", "prompt_get"),
    ("/queue", "queue"),
])
async def test_plain_answers_match_recordings(fake, session, path, name):
    status, headers = recorded_headers(name)
    for prefix in ("", "/api"):
        async with session.get(fake.url + prefix + path) as response:
            assert response.status == status
            assert response.headers["Content-Type"] == headers["Content-Type"]
            assert await response.json() == json.loads((HTTP / f"{name}.json").read_text())


async def test_system_stats_models_and_object_info(fake, session):
    stats = await get_json(session, f"{fake.url}/system_stats")
    recorded = json.loads((HTTP / "system_stats.json").read_text())
    assert list(stats["system"]) == list(recorded["system"]) and list(stats) == list(recorded)
    assert stats["system"]["comfyui_version"] == "0.3.64"
    assert stats["system"]["argv"][:5] == ["main.py", "--listen", "127.0.0.1", "--port", str(fake.port)]
    assert stats["devices"] == recorded["devices"]
    async with session.get(f"{fake.url}/models/no_such_folder") as response:
        assert response.status == 404 and await response.read() == b""
    info = await get_json(session, f"{fake.url}/object_info")
    assert set(info) == set(json.loads((HTTP / "object_info_subset.json").read_text())) | {"ImageScaleBy"}
    assert info["LoadImage"]["input"]["required"]["image"][0] == ["example.png", "peer_corrupt.png"]


async def test_models_dir_feeds_model_lists(tmp_path, session):
    (tmp_path / "models" / "checkpoints" / "sd").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "sd" / "base.safetensors").write_bytes(b"x")
    (tmp_path / "models" / "checkpoints" / "notes.txt").write_bytes(b"x")
    fake = FakeComfyUI(output_dir=tmp_path / "output", models_dir=tmp_path / "models", version="0.3.99")
    await fake.start()
    try:
        assert await get_json(session, f"{fake.url}/models/checkpoints") == ["sd/base.safetensors"]
        info = await get_json(session, f"{fake.url}/object_info/CheckpointLoaderSimple")
        assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["sd/base.safetensors"]
        assert (await get_json(session, f"{fake.url}/system_stats"))["system"]["comfyui_version"] == "0.3.99"
    finally:
        await fake.stop()


async def test_history_routes(fake, session):
    body = recorded_posts(load_trace("success"))[0]
    ids = []
    for _ in range(3):
        ids.append((await post_prompt(session, fake, body))["prompt_id"])
        await fake.wait_idle()
    last_two = await get_json(session, f"{fake.url}/history?max_items=2")
    assert list(last_two) == ids[1:]
    recorded = json.loads((HTTP / "history_max2.json").read_text())
    assert [list(entry) for entry in last_two.values()] == [list(entry) for entry in recorded.values()]
    assert list(await get_json(session, f"{fake.url}/history?max_items=1&offset=0")) == ids[:1]
    async with session.post(f"{fake.url}/history", json={"delete": [ids[0]]}) as response:
        assert response.status == 200 and await response.read() == b""
    assert list(await get_json(session, f"{fake.url}/history")) == ids[1:]
    async with session.post(f"{fake.url}/api/history", json={"clear": True}):
        pass
    assert await get_json(session, f"{fake.url}/history") == {}


async def test_view_headers_and_refusals(fake, session):
    body = recorded_posts(load_trace("success"))[0]
    prompt_id = (await post_prompt(session, fake, body))["prompt_id"]
    await fake.wait_idle()
    image = (await get_json(session, f"{fake.url}/history/{prompt_id}"))[prompt_id]["outputs"]["2"]["images"][0]
    status, headers = recorded_headers("view_output")
    query = f"filename={image['filename']}&subfolder=&type=output"
    for method in ("GET", "HEAD"):
        async with session.request(method, f"{fake.url}/view?{query}") as response:
            assert response.status == status
            assert set(headers) <= set(response.headers)
            assert response.headers["Content-Disposition"] == f'filename="{image["filename"]}"'
            assert response.headers["Content-Type"] == "image/png"
            assert response.headers["Accept-Ranges"] == "bytes"
    async with session.get(f"{fake.url}/api/view?{query}") as response:
        assert (await response.read()).startswith(b"\x89PNG")
    for query, name in (("filename=../secret.png", "view_traversal"), ("filename=/etc/passwd", "view_traversal"),
                        ("filename=missing.png&type=output", "view_missing")):
        status, headers = recorded_headers(name)
        async with session.get(f"{fake.url}/view?{query}") as response:
            assert response.status == status and await response.read() == b""
            assert "Content-Type" not in headers or response.headers["Content-Type"] == headers["Content-Type"]
    async with session.get(f"{fake.url}/view?filename=example.png&type=input&subfolder=../..") as response:
        assert response.status == 403
    async with session.get(f"{fake.url}/view?filename=example.png [input]") as response:
        assert response.status == 200


async def test_upload_renames_like_comfyui(fake, session, tmp_path):
    async def upload(content, **fields):
        form = aiohttp.FormData()
        form.add_field("image", content, filename="example.png", content_type="image/png")
        for key, value in fields.items():
            form.add_field(key, value)
        async with session.post(f"{fake.url}/upload/image", data=form) as response:
            assert response.status == 200
            return await response.json()

    original = (tmp_path / "input" / "example.png").read_bytes()
    assert await upload(original) == {"name": "example.png", "subfolder": "", "type": "input"}  # same bytes: kept
    assert await upload(b"\x89PNG other") == {"name": "example (1).png", "subfolder": "", "type": "input"}
    assert await upload(b"\x89PNG third") == {"name": "example (2).png", "subfolder": "", "type": "input"}
    assert await upload(b"\x89PNG new", overwrite="true") == {"name": "example.png", "subfolder": "", "type": "input"}
    assert (tmp_path / "input" / "example.png").read_bytes() == b"\x89PNG new"
    assert await upload(b"x", subfolder="sub", type="temp") == {"name": "example.png", "subfolder": "sub", "type": "temp"}
    assert (tmp_path / "temp" / "sub" / "example.png").read_bytes() == b"x"


async def test_origin_check_refuses_cross_site_posts(fake, session):
    async with session.post(f"{fake.url}/prompt", json={}, headers={"Origin": "http://evil.example"}) as response:
        assert response.status == 403


# ---------------------------------------------------------------------------
# Faults, restart, CLI
# ---------------------------------------------------------------------------

async def test_fault_modes(fake, session):
    fake.mode = "http500"
    async with session.get(f"{fake.url}/queue") as response:
        assert response.status == 500 and "Internal Server Error" in await response.text()
    fake.mode = "html"
    async with session.get(f"{fake.url}/queue") as response:
        assert response.status == 200 and response.content_type == "text/html"
    fake.mode = "truncated"
    async with session.get(f"{fake.url}/queue") as response:
        assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        with pytest.raises(ValueError):
            json.loads(await response.text())
    fake.mode = "hang"
    with pytest.raises(asyncio.TimeoutError):
        await session.get(f"{fake.url}/queue", timeout=aiohttp.ClientTimeout(total=0.2))
    fake.mode = "ok"
    fake.latency = 0.05
    started = time.monotonic()
    assert await get_json(session, f"{fake.url}/queue") == {"queue_running": [], "queue_pending": []}
    assert time.monotonic() - started >= 0.05
    assert ("GET", "/queue") in fake.requests


async def test_websocket_drops(fake, session):
    async def closed_by_server(ws):
        while (await ws.receive(timeout=WAIT)).type == aiohttp.WSMsgType.TEXT:
            pass  # messages sent before the close
        return ws.close_code

    fake.ws_close_every = 0.05
    sock = await connect(session, fake, "short-lived")
    assert await closed_by_server(sock.ws) == aiohttp.WSCloseCode.GOING_AWAY
    fake.ws_close_every = None

    sock = await connect(session, fake, "dropped")
    fake.gate("ImageBlur")
    body = recorded_posts(load_trace("reconnect_same_client_id"))[0]
    prompt_id = (await post_prompt(session, fake, body, "dropped"))["prompt_id"]
    await fake.wait_for_gated(prompt_id, "10")
    await fake.drop_websockets()
    assert await closed_by_server(sock.ws) == aiohttp.WSCloseCode.GOING_AWAY
    assert fake.connected_client_ids == []
    fake.ungate("ImageBlur")
    await fake.wait_idle()  # the prompt ran on with nobody listening
    history = (await get_json(session, f"{fake.url}/history/{prompt_id}"))[prompt_id]
    assert history["status"]["status_str"] == "success"


async def test_restart_forgets_everything_but_files(fake, session, tmp_path):
    port = fake.port
    body = recorded_posts(load_trace("success"))[0]
    prompt_id = (await post_prompt(session, fake, body))["prompt_id"]
    await fake.wait_idle()
    fake.gate("ImageBlur")
    slow = recorded_posts(load_trace("reconnect_same_client_id"))[0]
    lost = (await post_prompt(session, fake, slow))["prompt_id"]
    await fake.wait_for_gated(lost, "10")
    await fake.restart()
    fake.ungate("ImageBlur")
    assert fake.port == port
    assert await get_json(session, f"{fake.url}/history") == {}
    assert await get_json(session, f"{fake.url}/queue") == {"queue_running": [], "queue_pending": []}
    again = await post_prompt(session, fake, body)
    assert again["number"] == 0
    await fake.wait_idle()
    history = (await get_json(session, f"{fake.url}/history/{again['prompt_id']}"))[again["prompt_id"]]
    assert history["status"]["messages"][1][1]["nodes"] == []  # caches were forgotten too
    assert history["outputs"]["2"]["images"][0]["filename"] == "peer_simple_00002_.png"
    assert fake.posted_prompt_ids == [prompt_id, lost, again["prompt_id"]]


async def test_cli_and_control_api(tmp_path, session):
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve().parent / "fake_comfyui.py"), "--port", "0",
        "--output-dir", str(tmp_path / "out"), "--node-delay", "ImageInvert=0.01",
        stdout=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), WAIT)).decode()
        url = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+)\n", line).group(1)
        body = recorded_posts(load_trace("success_chain"))[0]
        async with session.post(f"{url}/prompt", json=body) as response:
            prompt_id = (await response.json())["prompt_id"]
        async with session.post(f"{url}/__fake__/mode", json={"mode": "http500"}) as response:
            assert (await response.json())["mode"] == "http500"
        async with session.get(f"{url}/queue") as response:
            assert response.status == 500
        async with session.post(f"{url}/__fake__/mode", json={"mode": "ok"}):
            pass
        for _ in range(200):  # another process: poll its stats until the prompt is done
            stats = await get_json(session, f"{url}/__fake__/stats")
            if prompt_id in stats["history"]:
                break
            await asyncio.sleep(0.01)
        assert stats["posted_prompt_ids"] == [prompt_id] and stats["execution_count"] == {prompt_id: 1}
        assert stats["history"][prompt_id]["status_str"] == "success"
        async with session.post(f"{url}/__fake__/restart") as response:
            assert response.status == 200
        assert await get_json(session, f"{url}/history") == {}
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), WAIT)
