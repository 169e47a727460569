"""comfymgr as its own client: `python comfymgr.py submit|status|list|...` run
as real subprocesses against a comfymgr on a real port with the fake ComfyUI;
a pseudo-terminal for the live progress line and the Ctrl-C question."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import socket
import sqlite3
import struct
import sys
import termios
import time
from dataclasses import dataclass

import pytest
from test_bridge import status_is, wait_backends_up, wait_job
from test_metrics import NoNVML, two_gpus

import comfymgr
from conftest import API_KEY, DATA, HEADERS, ROOT, workflow

WAIT = 20.0
WORKFLOWS = DATA / "workflows"
ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def blur_graph(color=0):
    """EmptyImage -> ImageBlur -> SaveImage: the fake's gate or delay holds the blur."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                    "color": color}},
        "10": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3, "sigma": 1.0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": f"blur{color}"}},
    }


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def date(ms):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def clock(ms):
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000))


@pytest.fixture
async def server(make_client, make_config, fake, tmp_path):
    """comfymgr on a loopback port, fed by the fake ComfyUI, its outputs served."""
    client = await make_client(make_config(
        comfyui_url=fake.url, progress_interval=0.0, reconcile_interval=0.2, backend_timeout=2.0,
        outputs_dir=tmp_path / "comfy" / "output", temp_dir=tmp_path / "comfy" / "temp"), nvml=NoNVML())
    await wait_backends_up(client)
    return client


def url_of(client):
    return str(client.make_url("")).rstrip("/")


@dataclass
class Result:
    rc: int
    out: str
    err: str


@pytest.fixture
def cli_env(tmp_path):
    def make(client=None, **extra):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1",
               "TZ": "UTC", "MANAGEMENT_API_KEY": API_KEY,
               "COMFYMGR_STATE_DIR": str(tmp_path / "client-state")}  # no key file there
        if client is not None:
            env["COMFYMGR_URL"] = url_of(client)
        env.update(extra)
        return {k: v for k, v in env.items() if v is not None}
    return make


@pytest.fixture
def cli(cli_env):
    """Run `python comfymgr.py ARGS` from the repository root to its end."""
    async def run(client, *args, env=None, stdin=None, timeout=WAIT):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "comfymgr.py", *map(str, args), cwd=ROOT, env=cli_env(client, **(env or {})),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return Result(proc.returncode, out.decode(), err.decode())
    return run


@pytest.fixture
async def spawn(cli_env):
    """Start `python comfymgr.py ARGS` with stdout on a pipe; killed at the end of the test."""
    procs = []

    async def start(client, *args):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "comfymgr.py", *map(str, args), cwd=ROOT, env=cli_env(client),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


class Pty:
    """A child on a pseudo-terminal (120 columns): what it wrote, as the terminal got it."""

    def __init__(self, proc, master):
        self.proc, self.master = proc, master
        self.data = b""
        self.eof = False
        self.changed = asyncio.Event()
        asyncio.get_running_loop().add_reader(master, self._read)

    def _read(self):
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed its side
            chunk = b""
        if not chunk:
            self.eof = True
            asyncio.get_running_loop().remove_reader(self.master)
        self.data += chunk
        self.changed.set()

    @property
    def text(self):
        return self.data.decode(errors="replace")

    async def expect(self, pattern, timeout=WAIT):
        async def poll():
            while not re.search(pattern, self.text):
                assert not self.eof, f"ended without {pattern!r}:\n{self.text!r}"
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(poll(), timeout)

    def write(self, data):
        os.write(self.master, data)

    async def finish(self, timeout=WAIT):
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._drained(), timeout)
        return rc

    async def _drained(self):
        while not self.eof:
            self.changed.clear()
            await self.changed.wait()

    async def close(self):
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if not self.eof:
            asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)


@pytest.fixture
async def on_pty(cli_env):
    started = []

    async def start(client, *args):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "comfymgr.py", *map(str, args), cwd=ROOT, env=cli_env(client, TERM="xterm"),
            stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        started.append(Pty(proc, master))
        return started[-1]

    yield start
    for child in started:
        await child.close()


async def get_job(client, job_id):
    resp = await client.get(f"/v1/comfyui/workflow/{job_id}", headers=HEADERS)
    assert resp.status == 200
    return await resp.json()


async def post_job(client, graph, **fields):
    resp = await client.post("/v1/comfyui/workflow", json={"workflow": graph, **fields}, headers=HEADERS)
    assert resp.status == 202, await resp.text()
    return await resp.json()


async def all_jobs(client):
    resp = await client.get("/v1/comfyui/workflows?limit=500", headers=HEADERS)
    return (await resp.json())["workflows"]


async def read_line_until(stream, pattern, timeout=WAIT):
    """Lines from a pipe until one matches; returns them all."""
    lines = []
    while True:
        line = (await asyncio.wait_for(stream.readline(), timeout)).decode()
        assert line, f"the stream ended without {pattern!r}: {lines}"
        lines.append(line.rstrip("\n"))
        if re.search(pattern, line):
            return lines


def write_graph(path, graph):
    path.write_text(json.dumps(graph))
    return path


# -- submit ----------------------------------------------------------------------------


async def test_submit_wait_out_saves_the_output_and_exits_0(server, cli, tmp_path):
    out = tmp_path / "pictures"
    r = await cli(server, "submit", WORKFLOWS / "simple.json", "--wait", "--out", out)
    assert (r.rc, r.err) == (0, "")
    lines = r.out.splitlines()
    job_id = re.fullmatch(f"simple.json: submitted ({ID})", lines[0])[1]
    assert lines[1] == "simple.json: queued (position 1)"
    for line in lines[2:-2]:
        assert re.fullmatch(r"simple\.json: running \d+%( node (1 EmptyImage|2 SaveImage))?", line), line
    assert lines[-2:] == ["simple.json: completed 100%, 1 output",
                          f"simple.json: saved {out}/peer_simple_00001_.png"]
    assert (await get_job(server, job_id))["status"] == "completed"
    made = tmp_path / "comfy" / "output" / "peer_simple_00001_.png"
    assert [p.name for p in out.iterdir()] == ["peer_simple_00001_.png"]
    assert (out / "peer_simple_00001_.png").read_bytes() == made.read_bytes()


async def test_submit_several_files_keeps_every_name_and_overwrites_nothing(server, cli, tmp_path):
    out = tmp_path / "pictures"
    out.mkdir()
    (out / "peer_chain_00001_.png").write_bytes(b"mine")
    r = await cli(server, "submit", WORKFLOWS / "simple.json", WORKFLOWS / "chain.json",
                  WORKFLOWS / "simple.json", "--wait", "--out", out, "--priority", "high")
    assert (r.rc, r.err) == (0, "")
    lines = r.out.splitlines()
    labels = ["simple.json", "chain.json", "simple.json#2"]
    ids = [re.fullmatch(f"{label}: submitted ({ID})", line)[1] for label, line in zip(labels, lines)]
    made = {}
    for label, job_id in zip(labels, ids):
        job = await get_job(server, job_id)
        assert (job["status"], job["priority"]) == ("completed", "high")
        [output] = job["outputs"]
        made[label] = output["filename"]
    assert made["chain.json"] == "peer_chain_00001_.png"
    saved = {label: f"{made[label]}" for label in labels}
    saved["chain.json"] = "peer_chain_00001_ (1).png"  # the file already there is kept
    assert sorted(line for line in lines if ": saved " in line) == sorted(
        f"{label}: saved {out}/{name}" for label, name in saved.items())
    assert sorted(p.name for p in out.iterdir()) == sorted([*saved.values(), "peer_chain_00001_.png"])
    assert (out / "peer_chain_00001_.png").read_bytes() == b"mine"
    for label, name in saved.items():
        assert (out / name).read_bytes() == (tmp_path / "comfy" / "output" / made[label]).read_bytes()


async def test_submit_without_wait_prints_the_ids_and_sends_every_option(server, cli, fake, tmp_path):
    fake.gate("ImageBlur")
    graph = write_graph(tmp_path / "blur.json", blur_graph())
    r = await cli(server, "submit", graph, "--priority", "low", "--gpu", "any", "--timeout", "90s")
    assert (r.rc, r.err) == (0, "")
    job_id = re.fullmatch(f"({ID})\n", r.out)[1]
    job = await get_job(server, job_id)
    assert (job["priority"], job["gpu"], job["timeout"]) == ("low", "any", 90.0)
    r = await cli(server, "submit", graph, "--gpu", "gpu7")
    assert r.rc == 2 and r.out == ""
    assert r.err == "error: unknown_gpu: gpu: unknown value 'gpu7'; use one of local, any\n"


async def test_a_failing_job_exits_1_with_its_error_on_stderr(server, cli, fake):
    fake.fail_node["ImageInvert"] = ("RuntimeError", "the invert broke")
    r = await cli(server, "submit", WORKFLOWS / "chain.json", "--wait")
    assert r.rc == 1
    job_id = re.match(f"chain.json: submitted ({ID})", r.out)[1]
    job = await get_job(server, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "execution_error"
    assert "the invert broke" in job["error"]["message"]
    assert r.err == f"error: execution_error: {job['error']['message']}\n"
    assert r.out.splitlines()[-1] == f"chain.json: failed: execution_error: {job['error']['message']}"


async def test_a_refused_workflow_is_one_line_from_the_envelope_and_exit_2(server, cli, tmp_path):
    graph = write_graph(tmp_path / "bad.json", {"1": {"class_type": "NoSuchNode", "inputs": {}}})
    r = await cli(server, "submit", graph, "--wait")
    assert (r.rc, r.out) == (2, "")
    assert r.err == ("error: invalid_workflow: Cannot execute because node NoSuchNode does not exist.: "
                     "Node ID '#1'\n")
    assert await all_jobs(server) == []


async def test_unreachable_comfymgr_exits_3(cli):
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["submit", WORKFLOWS / "simple.json", "--wait"], ["list"], ["watch"]):
        r = await cli(None, *args, "--url", url)
        assert (r.rc, r.out) == (3, ""), args
        assert re.fullmatch(rf"error: unreachable: cannot reach comfymgr at {url} \(.+\)\n", r.err), r.err


async def test_a_refused_key_exits_3_and_submits_nothing(server, cli):
    for args in (["submit", WORKFLOWS / "simple.json", "--wait"], ["submit", WORKFLOWS / "simple.json"],
                 ["list"], ["watch"]):
        r = await cli(server, *args, "--key", "not-the-key")
        assert (r.rc, r.out, r.err) == (3, "", "error: unauthorized: the API key is not valid\n"), args
    r = await cli(server, "list", env={"MANAGEMENT_API_KEY": None})
    assert (r.rc, r.out) == (3, "")
    assert r.err == ("error: unauthorized: a valid X-API-Key header is required "
                     "(no key found: pass --key or set MANAGEMENT_API_KEY)\n")
    assert await all_jobs(server) == []


async def test_the_key_file_and_the_service_port_need_no_flags(server, cli, tmp_path):
    state = tmp_path / "box-state"
    state.mkdir()
    (state / "api-key").write_text(API_KEY + "\n")
    r = await cli(None, "list", env={"MANAGEMENT_API_KEY": None, "COMFYMGR_STATE_DIR": str(state),
                                     "MANAGEMENT_API_HOST": "0.0.0.0",
                                     "MANAGEMENT_API_PORT": str(server.server.port)})
    assert (r.rc, r.out, r.err) == (0, "no jobs\n", "")
    # The first of several keys; a bad setting is a configuration error.
    r = await cli(server, "list", env={"MANAGEMENT_API_KEY": f"{API_KEY},another-key"})
    assert (r.rc, r.out) == (0, "no jobs\n")
    r = await cli(None, "list", env={"MANAGEMENT_API_PORT": "abc"})
    assert (r.rc, r.out, r.err) == (2, "", "error: invalid_setting: MANAGEMENT_API_PORT='abc': "
                                           "expected a whole number\n")
    r = await cli(None, "list", "--url", "ftp://x")
    assert (r.rc, r.err) == (2, "error: invalid_url: --url='ftp://x': expected an http:// or https:// URL\n")


async def test_a_ui_format_file_is_refused_before_sending(server, cli, tmp_path):
    ui = write_graph(tmp_path / "ui.json", {"last_node_id": 9, "nodes": [{"id": 9, "type": "SaveImage"}],
                                            "links": [], "version": 0.4})
    r = await cli(server, "submit", WORKFLOWS / "simple.json", ui, "--wait")
    assert (r.rc, r.out) == (2, "")
    assert r.err == ('error: ui_format: ui.json is a UI-format workflow (it has "nodes" and "links"); '
                     'in ComfyUI use Workflow > Export (API) and submit that file\n')
    r = await cli(server, "submit", write_graph(tmp_path / "list.json", [1, 2]))
    assert (r.rc, r.out) == (2, "")
    assert r.err.startswith("error: invalid_file: list.json: an API-format workflow is a JSON object")
    (tmp_path / "broken.json").write_text("{")
    r = await cli(server, "submit", tmp_path / "broken.json")
    assert (r.rc, r.err) == (2, "error: invalid_file: broken.json: not JSON (Expecting property name "
                                "enclosed in double quotes: line 1 column 2 (char 1))\n")
    (tmp_path / "a-file").write_text("")
    r = await cli(server, "submit", WORKFLOWS / "simple.json", "--out", tmp_path / "a-file" / "pictures")
    assert (r.rc, r.err) == (2, f"error: invalid_out: {tmp_path}/a-file/pictures: Not a directory\n")
    r = await cli(server, "submit", tmp_path / "missing.json")
    assert (r.rc, r.err) == (2, f"error: invalid_file: {tmp_path}/missing.json: No such file or directory\n")
    assert await all_jobs(server) == []  # nothing sent, not even the good file


async def test_json_lines_parse_and_follow_the_job_to_its_end(server, cli, tmp_path):
    out = tmp_path / "pictures"
    r = await cli(server, "submit", WORKFLOWS / "simple.json", "--wait", "--json", "--out", out)
    assert (r.rc, r.err) == (0, "")
    lines = [json.loads(line) for line in r.out.splitlines()]
    first, *events, last = lines
    job_id = first["workflowId"]
    assert (first["type"], first["file"], first["status"]) == ("job", "simple.json", "queued")
    assert [e["workflowId"] for e in events] == [job_id] * len(events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    types = [e["type"] for e in events]
    assert types[:2] == ["workflow:queued", "workflow:started"] and types[-1] == "workflow:completed"
    assert set(types[2:-1]) <= {"workflow:progress"}
    assert last == {"type": "job", "file": "simple.json", **(await get_job(server, job_id)),
                    "saved": [f"{out}/peer_simple_00001_.png"]}


async def test_stdin_is_a_workflow_file(server, cli):
    r = await cli(server, "submit", "-", stdin=json.dumps(workflow("chain")).encode())
    assert (r.rc, r.err) == (0, "")
    job_id = r.out.strip()
    assert [j["workflowId"] for j in await all_jobs(server)] == [job_id]
    r = await cli(server, "submit", "-", "--wait", stdin=json.dumps(workflow("simple")).encode())
    assert (r.rc, r.err) == (0, "")
    assert re.fullmatch(f"stdin: submitted {ID}", r.out.splitlines()[0])
    assert r.out.splitlines()[-1] == "stdin: completed 100%, 1 output"
    r = await cli(server, "submit", "-", "-", stdin=b"{}")
    assert (r.rc, r.err) == (2, "error: invalid_file: - (stdin) can be given once\n")


async def test_inline_input_goes_as_a_data_uri(tmp_path):
    picture = tmp_path / "cat.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n-not-really")
    assert comfymgr._inline_input(f"photo={picture}") == (
        "photo", "data:image/png;base64,iVBORw0KGgotbm90LXJlYWxseQ==")
    with pytest.raises(comfymgr._ClientError, match="expected NAME=PATH"):
        comfymgr._inline_input("photo")


async def test_submit_input_attaches_a_local_image(server, cli, fake, tmp_path):
    picture = tmp_path / "photo.png"
    picture.write_bytes((DATA / "http" / "view_input_example.body").read_bytes())
    graph = write_graph(tmp_path / "load.json", {
        "1": {"class_type": "LoadImage", "inputs": {"image": "photo"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "loaded"}}})
    r = await cli(server, "submit", graph, "--input", f"photo={picture}", "--wait")
    assert (r.rc, r.err) == (0, ""), r.err
    job_id = re.match(f"load.json: submitted ({ID})", r.out)[1]
    assert (await get_job(server, job_id))["outputs"][0]["filename"] == "loaded_00001_.png"
    assert picture.read_bytes() in [p.read_bytes() for p in fake._dirs.input.rglob("*") if p.is_file()]
    r = await cli(server, "submit", graph, "--input", f"photo={tmp_path}/none.png")
    assert (r.rc, r.err) == (2, f"error: invalid_input: --input photo: {tmp_path}/none.png: "
                                "No such file or directory\n")


async def test_a_dropped_stream_is_resumed_without_losing_the_end(server, spawn, fake, tmp_path):
    gate = fake.gate("ImageBlur")
    proc = await spawn(server, "submit", write_graph(tmp_path / "blur.json", blur_graph()), "--wait")
    seen = await read_line_until(proc.stdout, "node 10 ImageBlur")
    job_id = re.fullmatch(f"blur.json: submitted ({ID})", seen[0])[1]
    hub = server.app[comfymgr.HUB]
    for sub in list(hub.subscribers):  # as when comfymgr sheds a slow client
        hub.kill(sub, 1013, "test")
    gate.set()  # the job ends while the client is away
    done = await wait_job(server, job_id, status_is("completed"))
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert (proc.returncode, err) == (0, b"")
    assert out.decode().splitlines()[-1] == "blur.json: completed 100%, 1 output"
    assert done["outputs"][0]["filename"] == "blur0_00001_.png"


# -- the live line and Ctrl-C ----------------------------------------------------------------


async def test_the_progress_line_redraws_in_place_on_a_terminal_and_ends_at_100(server, on_pty, fake,
                                                                              tmp_path):
    fake.progress_steps["ImageBlur"] = 5
    fake.node_delay["ImageBlur"] = 0.5
    child = await on_pty(server, "submit", write_graph(tmp_path / "blur.json", blur_graph()), "--wait")
    assert await child.finish() == 0
    head, live = child.text.split("\r\n", 1)
    assert re.fullmatch(f"blur.json: submitted {ID}", head)
    # One line, drawn again and again with \r and erased to its end: no newline until the end.
    assert live.endswith("\x1b[K\r\n") and live.count("\n") == 1
    frames = [f.removesuffix("\x1b[K") for f in live.removesuffix("\r\n").split("\r") if f]
    pattern = r"blur\.json  \[([#.]{20})\] +(\d+)%  (queued|running|completed) +\d:\d\d(.*)"
    parsed = [re.fullmatch(pattern, f) for f in frames]
    assert all(parsed), frames
    percents = [int(m[2]) for m in parsed]
    assert percents == sorted(percents) and len(set(percents)) >= 4, frames
    assert any(m[4] == "  node 10 ImageBlur" and m[3] == "running" for m in parsed)
    assert re.fullmatch(r"blur\.json  \[#{20}\] 100%  completed  0:0\d", frames[-1])


async def test_ctrl_c_with_cancel_on_exit_cancels_the_job(server, spawn, fake, tmp_path):
    fake.gate("ImageBlur")
    proc = await spawn(server, "submit", write_graph(tmp_path / "blur.json", blur_graph()), "--wait",
                       "--cancel-on-exit")
    seen = await read_line_until(proc.stdout, "node 10 ImageBlur")
    job_id = re.fullmatch(f"blur.json: submitted ({ID})", seen[0])[1]
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 130
    job = await get_job(server, job_id)
    assert job["status"] == "cancelled"
    assert out.decode().splitlines() == [f"blur.json: cancelling {job_id}",
                                         f"blur.json: cancelled: {job['error']['message']}"]
    assert err.decode() == f"error: cancelled: {job['error']['message']}\n"


async def test_ctrl_c_on_a_pipe_leaves_the_job_running_and_says_so(server, spawn, fake, tmp_path):
    gate = fake.gate("ImageBlur")
    proc = await spawn(server, "submit", write_graph(tmp_path / "blur.json", blur_graph()), "--wait")
    seen = await read_line_until(proc.stdout, "node 10 ImageBlur")
    job_id = re.fullmatch(f"blur.json: submitted ({ID})", seen[0])[1]
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert (proc.returncode, out) == (130, b"")
    assert err.decode() == f"interrupted: the job keeps running on comfymgr; follow with: comfymgr watch {job_id}\n"
    assert (await get_job(server, job_id))["status"] == "running"
    gate.set()
    assert (await wait_job(server, job_id, status_is("completed", "failed")))["status"] == "completed"


async def test_ctrl_c_on_a_terminal_asks_and_y_cancels(server, on_pty, fake, tmp_path):
    fake.gate("ImageBlur")
    child = await on_pty(server, "submit", write_graph(tmp_path / "blur.json", blur_graph()), "--wait")
    await child.expect("node 10 ImageBlur")
    job_id = re.search(f"submitted ({ID})", child.text)[1]
    child.proc.send_signal(signal.SIGINT)
    await child.expect(r"Cancel 1 unfinished job on comfymgr\? \[y/N\] $")
    await asyncio.sleep(1.2)  # past the live line's once-a-second redraw: the question stays put
    assert child.text.endswith("[y/N] ")
    child.write(b"y\n")
    assert await child.finish() == 130
    job = await get_job(server, job_id)
    assert job["status"] == "cancelled"
    assert f"blur.json: cancelling {job_id}" in child.text
    filled = round(job["progress"] / 5)
    bar = re.escape("[" + "#" * filled + "." * (20 - filled) + "]")
    assert re.search(rf"blur\.json  {bar} +{job['progress']:.0f}%  cancelled  0:0\d  "
                     rf"{re.escape(job['error']['message'])}", child.text)


async def test_ctrl_c_on_a_terminal_and_n_leaves_it_running(server, on_pty, fake, tmp_path):
    gate = fake.gate("ImageBlur")
    child = await on_pty(server, "submit", write_graph(tmp_path / "blur.json", blur_graph()), "--wait")
    await child.expect("node 10 ImageBlur")
    job_id = re.search(f"submitted ({ID})", child.text)[1]
    child.proc.send_signal(signal.SIGINT)
    await child.expect(r"\[y/N\] $")
    child.write(b"\n")
    assert await child.finish() == 130
    assert child.text.endswith(f"interrupted: the job keeps running on comfymgr; follow with: "
                               f"comfymgr watch {job_id}\r\n")
    assert (await get_job(server, job_id))["status"] == "running"
    gate.set()


# -- status, list, cancel, watch, outputs, backends -----------------------------------------


async def test_status_shows_one_job(server, cli, fake):
    done = await post_job(server, workflow("simple"))
    done = await wait_job(server, done["workflowId"], status_is("completed"))
    r = await cli(server, "status", done["workflowId"])
    assert (r.rc, r.err) == (0, "")
    assert r.out == (f"workflow  {done['workflowId']}\n"
                     "status    completed\n"
                     "progress  100%  node 2\n"
                     "priority  normal\n"
                     "gpu       any\n"
                     "backend   local\n"
                     f"created   {date(done['createdAt'])}\n"
                     f"started   {date(done['startTime'])}\n"
                     f"ended     {date(done['completionTime'])}  after "
                     f"{(done['completionTime'] - done['startTime']) / 1000:.1f} s\n"
                     "output    peer_simple_00001_.png  /v1/comfyui/output/peer_simple_00001_.png\n")
    fake.fail_node["ImageInvert"] = ("RuntimeError", "no")
    failed = await post_job(server, workflow("chain"), priority="low")
    failed = await wait_job(server, failed["workflowId"], status_is("failed"))
    r = await cli(server, "status", failed["workflowId"])
    assert r.rc == 0
    node = f"  node {failed['currentNode']}" if failed["currentNode"] else ""
    assert r.out.splitlines()[1:4] == ["status    failed", f"progress  {failed['progress']:.0f}%{node}",
                                       "priority  low"]
    assert r.out.splitlines()[-1] == f"error     execution_error: {failed['error']['message']}"
    r = await cli(server, "status", "no-such-job")
    assert (r.rc, r.out, r.err) == (2, "", "error: not_found: workflow no-such-job not found\n")


async def test_list_shows_the_newest_jobs_as_a_table(server, cli, fake):
    r = await cli(server, "list")
    assert (r.rc, r.out) == (0, "no jobs\n")
    first = await wait_job(server, (await post_job(server, workflow("simple")))["workflowId"],
                           status_is("completed"))
    fake.fail_node["ImageInvert"] = ("RuntimeError", "no")
    second = await wait_job(server, (await post_job(server, workflow("chain"), priority="high"))["workflowId"],
                            status_is("failed"))
    r = await cli(server, "list")
    assert (r.rc, r.err) == (0, "")
    assert r.out == (f"{'ID':<36}  STATUS     PRIORITY  PROGRESS  {'CREATED':<19}  BACKEND\n"
                     f"{second['workflowId']}  failed     high      {second['progress']:7.0f}%  "
                     f"{date(second['createdAt'])}  local\n"
                     f"{first['workflowId']}  completed  normal        100%  {date(first['createdAt'])}  local\n")
    r = await cli(server, "list", "--status", "completed", "--limit", "1")
    assert r.out.splitlines()[1:] == [
        f"{first['workflowId']}  completed  normal        100%  {date(first['createdAt'])}  local"]
    r = await cli(server, "list", "--limit", "0")
    assert (r.rc, r.err) == (2, "error: invalid_request: limit: must be >= 1\n")
    r = await cli(server, "list", "--status", "done")
    assert r.rc == 2 and "invalid choice: 'done'" in r.err


async def test_cancel_queued_running_finished_and_unknown(server, cli, fake):
    fake.gate("ImageBlur")
    running = await post_job(server, blur_graph(1))
    await wait_job(server, running["workflowId"], lambda j: j["currentNode"] == "10")
    queued = await post_job(server, blur_graph(2))
    finished = await post_job(server, blur_graph(3))
    r = await cli(server, "cancel", finished["workflowId"])
    assert (r.rc, r.out) == (0, f"{finished['workflowId']}: cancelled\n")
    r = await cli(server, "cancel", queued["workflowId"], running["workflowId"], finished["workflowId"],
                  "no-such-job")
    assert r.out == (f"{queued['workflowId']}: cancelled\n"
                     f"{running['workflowId']}: cancelling (ComfyUI is interrupting it)\n")
    assert r.err == (f"error: not_cancellable: workflow {finished['workflowId']} already cancelled; "
                     "there is nothing to cancel\n"
                     "error: not_found: workflow no-such-job not found\n")
    assert r.rc == 2
    done = await wait_job(server, running["workflowId"], status_is("cancelled", "failed", "completed"))
    assert done["status"] == "cancelled"


async def test_watch_follows_named_jobs_to_their_end(server, cli, spawn, fake):
    gate = fake.gate("ImageBlur")
    job = await post_job(server, blur_graph(5))
    running = await wait_job(server, job["workflowId"], lambda j: j["currentNode"] == "10")
    proc = await spawn(server, "watch", job["workflowId"])
    [first] = await read_line_until(proc.stdout, job["workflowId"])
    assert first == f"{clock(running['startTime'])}  {job['workflowId']}  progress    33% node 10"
    gate.set()
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert (proc.returncode, err) == (0, b"")
    done = await get_job(server, job["workflowId"])
    lines = out.decode().splitlines()
    assert lines[-1] == (f"{clock(done['completionTime'])}  {job['workflowId']}  completed  "
                         "1 output: blur5_00001_.png")
    for line in lines[:-1]:
        assert re.fullmatch(rf"\d\d:\d\d:\d\d  {job['workflowId']}  progress   +\d+% node (10|2)", line), line
    # A job already ended: its end, at once; a failed one exits 1; an unknown one 2.
    r = await cli(server, "watch", job["workflowId"])
    assert (r.rc, r.out) == (0, lines[-1] + "\n")
    fake.fail_node["ImageInvert"] = ("RuntimeError", "no")
    failed = await wait_job(server, (await post_job(server, workflow("chain")))["workflowId"],
                            status_is("failed"))
    r = await cli(server, "watch", failed["workflowId"], "--json")
    assert r.rc == 1
    assert json.loads(r.out) == {"type": "job", **failed}
    r = await cli(server, "watch", "no-such-job")
    assert (r.rc, r.out, r.err) == (2, "", "error: not_found: workflow no-such-job not found\n")


async def test_watch_everything_as_json_until_ctrl_c(server, spawn):
    proc = await spawn(server, "watch", "--json")
    hub = server.app[comfymgr.HUB]
    while not hub.subscribers:
        await asyncio.sleep(0.01)
    job = await post_job(server, workflow("simple"))
    events = [json.loads(line) for line in await read_line_until(proc.stdout, "workflow:completed")]
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert (proc.returncode, err) == (130, b"")
    stored = await server.app[comfymgr.DB].read(lambda s: s.events_since(0, job_ids=[job["workflowId"]]))
    assert events == [e.message() for e in stored]


async def test_watch_prints_one_human_line_per_event(server, spawn):
    proc = await spawn(server, "watch")
    hub = server.app[comfymgr.HUB]
    while not hub.subscribers:
        await asyncio.sleep(0.01)
    job = await post_job(server, workflow("simple"))
    lines = await read_line_until(proc.stdout, "completed")
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.communicate(), WAIT)
    done = await get_job(server, job["workflowId"])
    i = job["workflowId"]
    assert lines[0] == f"{clock(done['createdAt'])}  {i}  queued     priority normal, position 1"
    assert lines[1] == f"{clock(done['startTime'])}  {i}  started    on local"
    assert lines[-1] == f"{clock(done['completionTime'])}  {i}  completed  1 output: peer_simple_00001_.png"
    for line in lines[2:-1]:
        assert re.fullmatch(rf"\d\d:\d\d:\d\d  {i}  progress   +\d+% node [12]", line), line


async def test_outputs_lists_and_downloads(server, cli, fake, tmp_path):
    done = await wait_job(server, (await post_job(server, workflow("simple")))["workflowId"],
                          status_is("completed"))
    r = await cli(server, "outputs", done["workflowId"])
    assert (r.rc, r.out, r.err) == (0, "peer_simple_00001_.png  output  /v1/comfyui/output/peer_simple_00001_.png\n", "")
    out = tmp_path / "got"
    for name in ("peer_simple_00001_.png", "peer_simple_00001_ (1).png"):
        r = await cli(server, "outputs", done["workflowId"], "--out", out)
        assert (r.rc, r.out, r.err) == (0, f"saved {out}/{name}\n", "")
        assert (out / name).read_bytes() == (tmp_path / "comfy" / "output" / "peer_simple_00001_.png").read_bytes()
    fake.gate("ImageBlur")
    running = await post_job(server, blur_graph(7))
    r = await cli(server, "outputs", running["workflowId"])
    assert r.rc == 1 and r.out == ""
    assert re.fullmatch(f"error: no_outputs: workflow {running['workflowId']} has no outputs "
                        r"\(status (queued|running)\)\n", r.err)
    (tmp_path / "a-file").write_text("")
    r = await cli(server, "outputs", done["workflowId"], "--out", tmp_path / "a-file")
    assert (r.rc, r.out, r.err) == (2, "", f"error: invalid_out: {tmp_path}/a-file: not a folder\n")
    (tmp_path / "comfy" / "output" / "peer_simple_00001_.png").unlink()
    r = await cli(server, "outputs", done["workflowId"], "--out", out)
    assert (r.rc, r.out) == (2, "")
    assert r.err.startswith("error: not_found: ")
    assert sorted(p.name for p in out.iterdir()) == ["peer_simple_00001_ (1).png", "peer_simple_00001_.png"]


async def test_backends_shows_state_version_gpus_and_the_running_job(make_client, make_config, fake, cli):
    down = f"http://127.0.0.1:{free_port()}"
    client = await make_client(make_config(
        backends=comfymgr._parse_backends(f"gpu0={fake.url}@0,gpu1={down}@1"), progress_interval=0.0,
        backend_timeout=1.0, reconcile_interval=0.2), nvml=two_gpus())
    fake.gate("ImageBlur")
    job = await post_job(client, blur_graph(9), gpu="gpu0")
    await wait_job(client, job["workflowId"], status_is("running"))
    resp = await client.get("/v1/status", headers=HEADERS)
    status = await resp.json()
    [gpu1] = [b for b in status["backends"] if b["name"] == "gpu1"]
    assert gpu1["state"] == "down" and gpu1["lastError"]
    r = await cli(client, "backends")
    assert (r.rc, r.err) == (0, "")
    assert r.out == (
        "NAME  STATE  COMFYUI  RUNNING                               DEVICES\n"
        f"gpu0  up     0.3.64   {job['workflowId']}  cpu (22.3/23.5 GiB free)\n"
        "gpu1  down   -        -                                     -\n"
        f"  gpu1: {gpu1['lastError']}\n"
        "gpu 0  NVIDIA H100 80GB HBM3  37% busy  10.0/80.0 GiB  51 C  312 W  backends gpu0\n"
        "gpu 1  NVIDIA L4  99% busy  20.0/24.0 GiB  83 C  backends gpu1\n"
        "jobs: 0 queued, 1 running, 0 completed, 0 failed, 0 cancelled\n")


async def test_backends_without_nvml_says_why(server, cli):
    r = await cli(server, "backends")
    assert r.out.splitlines()[-2:] == ["gpus: no figures (NVML unavailable: NVML Shared Library Not Found)",
                                       "jobs: 0 queued, 0 running, 0 completed, 0 failed, 0 cancelled"]


# -- backup ----------------------------------------------------------------------------


async def test_backup_while_jobs_are_submitted_holds_every_acknowledged_job(make_client, make_config,
                                                                          cli, tmp_path):
    state = tmp_path / "state"
    client = await make_client(make_config(state_dir=state))
    acknowledged: list[str] = []
    stop = asyncio.Event()

    async def submit_forever():
        n = 0
        while not stop.is_set():
            n += 1
            acknowledged.append((await post_job(client, {**workflow("simple"), "9": {
                "class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                       "color": n}}}))["workflowId"])

    submitter = asyncio.create_task(submit_forever())
    while len(acknowledged) < 50:
        await asyncio.sleep(0.01)
    before = list(acknowledged)
    dest = tmp_path / "backup.db"
    r = await cli(None, "backup", dest, env={"COMFYMGR_STATE_DIR": str(state)})
    during = len(acknowledged)
    stop.set()
    await submitter
    assert (r.rc, r.err) == (0, "")
    assert during > len(before)  # submits went on while it copied
    with contextlib.closing(sqlite3.connect(dest)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        copied = {row[0] for row in db.execute("SELECT id FROM jobs")}
    assert set(before) <= copied <= set(acknowledged)
    assert r.out == f"{state}/comfymgr.db -> {dest}: {dest.stat().st_size:,} bytes, {len(copied):,} jobs, integrity ok\n"
    # Never over an existing file unless asked; into a folder as comfymgr.db.
    r = await cli(None, "backup", dest, "--state-dir", state)
    assert (r.rc, r.out, r.err) == (2, "", f"error: exists: {dest} exists; pass --force to replace it\n")
    r = await cli(None, "backup", dest, "--state-dir", state, "--force")
    assert r.rc == 0
    with contextlib.closing(sqlite3.connect(dest)) as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == len(acknowledged)
    folder = tmp_path / "backups"
    folder.mkdir()
    r = await cli(None, "backup", folder, "--state-dir", state)
    assert r.rc == 0 and (folder / "comfymgr.db").is_file()
    assert [p.name for p in folder.iterdir()] == ["comfymgr.db"]  # no temporary file left
    r = await cli(None, "backup", dest, "--state-dir", tmp_path / "nowhere")
    assert (r.rc, r.err) == (2, f"error: no_database: {tmp_path}/nowhere/comfymgr.db does not exist "
                                "(set --state-dir or COMFYMGR_STATE_DIR)\n")


# -- help ------------------------------------------------------------------------------


async def test_help_is_short_with_an_example_and_serve_help_lists_the_settings(cli):
    r = await cli(None, "--help")
    assert (r.rc, r.err) == (0, "")
    assert len(r.out.splitlines()) < 30
    assert "  comfymgr submit workflow.json --wait --out ./pictures\n" in r.out
    helps = await asyncio.gather(*(cli(None, command, "--help") for command in comfymgr._CLIENT_COMMANDS))
    for command, sub in zip(comfymgr._CLIENT_COMMANDS, helps):
        assert f"\n  {command} " in r.out
        assert (sub.rc, sub.err) == (0, ""), command
        assert len(sub.out.splitlines()) < 35, command
        assert re.search(rf"\nexample:\n  .*comfymgr {command}\b", sub.out), command
    r = await cli(None, "serve", "--help")
    assert r.rc == 0 and "--comfyui-url VALUE" in r.out
    r = await cli(None, "sumbit", "x.json")
    assert (r.rc, r.out) == (2, "")
    assert r.err == "comfymgr: error: unknown command 'sumbit'; `comfymgr --help` lists them\n"
    r = await cli(None, "submit")
    assert r.rc == 2 and "the following arguments are required: FILE" in r.err


async def test_the_readme_shell_block_runs_as_written(server, cli_env, tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- readme-shell -->\n", 1)[1].split("<!-- /readme-shell -->", 1)[0]
    script = block.split("```sh\n", 1)[1].rsplit("```", 1)[0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "comfymgr").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT}/comfymgr.py" "$@"\n')
    (bin_dir / "comfymgr").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (work / "workflow.json").write_text((WORKFLOWS / "simple.json").read_text())
    env = cli_env(server, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    proc = await asyncio.create_subprocess_exec("bash", "-euo", "pipefail", "-c", script, cwd=work, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert (proc.returncode, err) == (0, b""), err
    assert [p.name for p in (work / "pictures").iterdir()] == ["peer_simple_00001_.png"]
    lines = out.decode().splitlines()
    assert "workflow.json: saved pictures/peer_simple_00001_.png" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("ID "))  # list
    assert re.fullmatch(f"{ID}  completed  normal +100%  .*  local", lines[header + 1])
    assert lines[header + 2].startswith("NAME ")  # backends
    assert lines[-1] == "jobs: 0 queued, 0 running, 1 completed, 0 failed, 0 cancelled"


async def test_a_client_key_submits_follows_and_lists_its_own_jobs(make_client, make_config, fake, cli, tmp_path):
    alice = "alice-key-0123456789abcdef"
    client = await make_client(make_config(
        comfyui_url=fake.url, progress_interval=0.0, outputs_dir=tmp_path / "comfy" / "output",
        client_keys=comfymgr._parse_client_keys(f"alice:{alice}")), nvml=NoNVML())
    await wait_backends_up(client)
    theirs = await post_job(client, workflow("chain"))  # the admin's
    out = tmp_path / "pictures"
    r = await cli(client, "submit", WORKFLOWS / "simple.json", "--wait", "--out", out,
                  env={"MANAGEMENT_API_KEY": alice})
    assert (r.rc, r.err) == (0, "")
    job_id = re.match(f"simple.json: submitted ({ID})", r.out)[1]
    assert (out / "peer_simple_00001_.png").is_file()
    r = await cli(client, "list", env={"MANAGEMENT_API_KEY": alice})
    assert [line.split()[0] for line in r.out.splitlines()[1:]] == [job_id]
    r = await cli(client, "watch", theirs["workflowId"], env={"MANAGEMENT_API_KEY": alice})
    assert (r.rc, r.err) == (2, f"error: not_found: workflow {theirs['workflowId']} not found\n")
    r = await cli(client, "backends", env={"MANAGEMENT_API_KEY": alice})
    assert (r.rc, r.err) == (0, "")
    assert r.out == ("backends: shown to MANAGEMENT_API_KEY keys only; this is the client key alice\n"
                     "jobs: 0 queued, 0 running, 1 completed, 0 failed, 0 cancelled\n")
