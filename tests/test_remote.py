"""Remote backends: a ComfyUI on another box, behind nginx with TLS and a
bearer-token check (contrib/nginx/comfyui-gpu-host.conf, run here by a real
nginx with a CA and a server certificate the test makes with openssl), driven
by comfymgr with COMFYMGR_BACKEND_CA_FILE and COMFYMGR_BACKEND_HEADERS_FILE.

The fake ComfyUI runs in-process as in the other tests, built here rather
than by conftest's `fake` fixture so that a middleware can record the
Authorization header of every request that reaches it (none may: nginx
checks the token and drops it). comfymgr's logs are captured at DEBUG,
aiohttp's included; no secret may appear in them, in /v1/status, in
/metrics or in nginx's logs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

import comfymgr
from conftest import API_KEY, HEADERS, ROOT, need_tool
from fake_comfyui import FakeComfyUI
from nginx_helpers import free_port, nginx_main_conf, start_nginx

CONTRIB = ROOT / "contrib"
SCALING = (ROOT / "docs" / "SCALING.md").read_text()
TOKEN = "5f1e0c4b9a7d3e2f8c6b1a0d9e8f7c6b5a4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b"  # openssl rand -hex 32
WRONG = "0000000000000000000000000000000000000000000000000000000000000bad"
WAIT = 15.0
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


# -- certificates, token, nginx ---------------------------------------------------

def scaling_block(marker: str) -> str:
    """The code block between <!-- marker --> and <!-- /marker --> in docs/SCALING.md."""
    match = re.search(rf"<!-- {marker} -->\n```\w+\n(.*?)```\n<!-- /{marker} -->", SCALING, re.S)
    assert match, marker
    return match.group(1)


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict[str, Path]:
    """A private CA and a server certificate it signed for 127.0.0.1 and
    localhost, made by the openssl commands of docs/SCALING.md as written
    (only the name changed)."""
    need_tool("openssl")
    d = tmp_path_factory.mktemp("tls")
    script = scaling_block("tls-commands")
    name = 'SAN="DNS:gpu-host-1.example.com"\n'
    assert script.count(name) == 1
    script = script.replace(name, 'SAN="IP:127.0.0.1,DNS:localhost"\n')
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=d, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


def gpu_host_conf() -> str:
    return (CONTRIB / "nginx" / "comfyui-gpu-host.conf").read_text()


def write_token_file(path: Path, token: str) -> None:
    """The token file, made by the very commands in the conf's header."""
    text = gpu_host_conf()
    match = re.search(r"^#   (printf .*\\)\n#\s+(.*)$", text, re.M)
    assert match, "comfyui-gpu-host.conf should show the printf that writes the token file"
    command = match.group(1)[:-1] + match.group(2)
    assert command.count("/etc/nginx/comfyui-tokens.conf") == 1
    command = command.replace("/etc/nginx/comfyui-tokens.conf", str(path))
    subprocess.run(["bash", "-c", command], check=True, env={**os.environ, "token": token})
    path.chmod(0o640)


def render_gpu_host_conf(*, listen_port: int, upstream_port: int, cert: Path, key: Path,
                         tokens: Path, logs: Path) -> str:
    """contrib/nginx/comfyui-gpu-host.conf with only its ports and paths
    changed; everything else is tested as shipped."""
    text = gpu_host_conf()
    for old, new, count in [
        ("    listen 443 ssl;\n", f"    listen 127.0.0.1:{listen_port} ssl;\n", 1),
        ("    listen [::]:443 ssl;\n", "", 1),
        ("proxy_pass http://127.0.0.1:8188;", f"proxy_pass http://127.0.0.1:{upstream_port};", 2),
        ("/etc/ssl/comfyui/fullchain.pem", str(cert), 1),
        ("/etc/ssl/comfyui/privkey.pem", str(key), 1),
        ("include /etc/nginx/comfyui-tokens.conf;", f"include {tokens};", 1),
        ("/var/log/nginx/comfyui-gpu-host.access.log", str(logs / "access.log"), 1),
        ("/var/log/nginx/comfyui-gpu-host.error.log", str(logs / "error.log"), 1),
    ]:
        assert text.count(old) == count, f"comfyui-gpu-host.conf should have {old!r} {count} time(s)"
        text = text.replace(old, new)
    return text


class GpuHost:
    """The fake ComfyUI behind nginx: `url` is what comfymgr is given."""

    def __init__(self, fake: RecordingFake, url: str, ca: Path, logs: Path) -> None:
        self.fake = fake
        self.url = url
        self.ca = ca  # the CA that signed nginx's certificate
        self.logs = logs

    def nginx_logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


class RecordingFake(FakeComfyUI):
    """The fake ComfyUI, recording the Authorization header of each request
    that reaches it (None when there is none)."""

    def __init__(self, **kwargs) -> None:
        self.authorization_seen: list[str | None] = []
        super().__init__(**kwargs)

    def _build_app(self) -> web.Application:
        app = super()._build_app()

        @web.middleware
        async def record_authorization(request, handler):
            self.authorization_seen.append(request.headers.get("Authorization"))
            return await handler(request)

        app.middlewares.append(record_authorization)
        return app


@pytest.fixture
async def gpu_host(tmp_path, tls):
    fake = RecordingFake(output_dir=tmp_path / "comfy" / "output")
    await fake.start()
    prefix = tmp_path / "nginx"
    (prefix / "logs").mkdir(parents=True)
    tokens = prefix / "comfyui-tokens.conf"
    write_token_file(tokens, TOKEN)
    port = free_port()
    site = render_gpu_host_conf(listen_port=port, upstream_port=fake.port, cert=tls["cert"],
                                key=tls["key"], tokens=tokens, logs=prefix / "logs")
    # nginx is a subprocess; starting it blocks only for the moment it takes.
    nginx = await asyncio.to_thread(start_nginx, prefix, site, port)
    try:
        yield GpuHost(fake, f"https://127.0.0.1:{port}", tls["ca"], prefix / "logs")
    finally:
        await asyncio.to_thread(nginx.stop, signal.SIGQUIT)
        await fake.stop()


# -- comfymgr --------------------------------------------------------------------

def headers_file(tmp_path: Path, data, mode: int = 0o600) -> Path:
    path = tmp_path / "backend-headers.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    path.chmod(mode)
    return path


def remote_env(tmp_path: Path, backend_url: str, **extra: str) -> dict[str, str]:
    return {"MANAGEMENT_API_KEY": API_KEY, "MANAGEMENT_API_HOST": "127.0.0.1",
            "MANAGEMENT_API_PORT": "0", "COMFYMGR_STATE_DIR": str(tmp_path / "state"),
            "COMFYMGR_RATE_LIMIT": "0", "COMFYUI_BACKENDS": f"rack1={backend_url}",
            "COMFYMGR_PROGRESS_INTERVAL": "0", "COMFYMGR_RECONCILE_INTERVAL": "200ms",
            "COMFYMGR_BACKEND_TIMEOUT": "2s", **extra}


async def get_json(client, path: str):
    resp = await client.get(path, headers=HEADERS)
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def wait_for(predicate, what: str, timeout: float = WAIT):
    async def poll():
        while not (value := await predicate()):
            await asyncio.sleep(0.02)
        return value
    try:
        return await asyncio.wait_for(poll(), timeout)
    except asyncio.TimeoutError:
        pytest.fail(f"not within {timeout} s: {what}")


async def backend_status(client) -> dict:
    return (await get_json(client, "/v1/status"))["backends"][0]


async def wait_job(client, job_id: str, *statuses: str) -> dict:
    async def job():
        body = await get_json(client, f"/v1/comfyui/workflow/{job_id}")
        return body if body["status"] in statuses else None
    return await wait_for(job, f"job {job_id} {statuses}")


async def submit(client, graph: dict) -> dict:
    resp = await client.post("/v1/comfyui/workflow", json={"workflow": graph}, headers=HEADERS)
    body = await resp.json()
    assert resp.status == 202, body
    return body


def blur_workflow() -> dict:
    """EmptyImage -> ImageBlur -> SaveImage: the gate holds the blur."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                     "color": 0}},
        "10": {"class_type": "ImageBlur", "inputs": {"image": ["1", 0], "blur_radius": 3,
                                                     "sigma": 1.0}},
        "99": {"class_type": "SaveImage", "inputs": {"images": ["10", 0],
                                                     "filename_prefix": "remote_blur"}},
    }


async def next_events(ws, job_id: str, until: str, where=lambda event: True) -> list[dict]:
    """This job's stream events up to and including the first `until` event
    for which `where` holds."""
    events: list[dict] = []
    while not events or events[-1]["type"] != until or not where(events[-1]):
        message = await ws.receive_json(timeout=WAIT)
        if message.get("workflowId") == job_id and message["type"].startswith("workflow:"):
            events.append(message)
    return events


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text and WRONG not in text


# -- a job end to end through nginx -------------------------------------------------

async def test_jobs_run_end_to_end_over_tls_with_the_token(gpu_host, tmp_path, make_client, caplog):
    caplog.set_level(logging.DEBUG)
    fake = gpu_host.fake
    path = headers_file(tmp_path, {"rack1": {"Authorization": f"Bearer {TOKEN}"}})
    config = comfymgr.load_config([], remote_env(tmp_path, gpu_host.url,
                                                 COMFYMGR_BACKEND_HEADERS_FILE=str(path),
                                                 COMFYMGR_BACKEND_CA_FILE=str(gpu_host.ca)))
    assert TOKEN not in repr(config)  # the headers file's repr shows names only
    client = await make_client(config)
    up = await wait_for(lambda: _up(client), "the remote backend up")
    assert (up["name"], up["url"], up["lastError"], up["comfyuiVersion"]) == \
        ("rack1", gpu_host.url, None, "0.3.64")

    ws = await client.ws_connect("/v1/comfyui/stream", headers=HEADERS)
    await ws.send_json({"type": "ping"})
    assert (await ws.receive_json(timeout=WAIT))["type"] == "pong"

    # Progress seen live, then a cancel of the running job: both need
    # ComfyUI's WebSocket (wss through nginx) and POST /interrupt.
    fake.progress_steps["ImageBlur"] = 4
    fake.gate("ImageBlur")
    job = await submit(client, blur_workflow())
    events = await next_events(ws, job["workflowId"], "workflow:progress",
                               where=lambda event: event["progress"] > 0)
    assert [e["type"] for e in events[:2]] == ["workflow:queued", "workflow:started"]
    assert 0 < events[-1]["progress"] < 100
    running = await wait_job(client, job["workflowId"], "running")
    await fake.wait_for_gated(running["promptId"], "10")
    resp = await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    assert resp.status == 202, await resp.text()
    assert (await next_events(ws, job["workflowId"], "workflow:cancelled"))[-1]["status"] == "cancelled"
    assert fake.interrupt_bodies == [{"prompt_id": running["promptId"]}]
    fake.ungate("ImageBlur")

    # An input image goes up through ComfyUI's /upload/image (no
    # COMFYUI_INPUTS: comfymgr cannot write to the GPU host's disk) and a job
    # that loads it completes, seen live.
    form = aiohttp.FormData()
    form.add_field("image", PNG, filename="remote.png", content_type="image/png")
    resp = await client.post("/v1/comfyui/inputs", data=form, headers=HEADERS)
    assert resp.status == 201, await resp.text()
    uploaded = await resp.json()
    assert (uploaded["name"], uploaded["backends"]) == ("remote.png", ["rack1"])
    assert (fake._dirs.input / "remote.png").read_bytes() == PNG
    graph = {"1": {"class_type": "LoadImage", "inputs": {"image": uploaded["workflowValue"]}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "remote"}}}
    job = await submit(client, graph)
    events = await next_events(ws, job["workflowId"], "workflow:completed")
    assert [e["type"] for e in events][:2] == ["workflow:queued", "workflow:started"]
    done = await get_json(client, f"/v1/comfyui/workflow/{job['workflowId']}")
    assert done["status"] == "completed" and done["backend"] == "rack1"
    assert [o["filename"] for o in done["outputs"]] == ["remote_00001_.png"]
    assert (fake._dirs.output / "remote_00001_.png").exists()
    # The output comes through comfymgr (COMFYUI_OUTPUTS unset: ComfyUI's GET
    # /view, through nginx, with the token), a range of it too.
    whole = (fake._dirs.output / "remote_00001_.png").read_bytes()
    resp = await client.get(done["outputs"][0]["url"], headers=HEADERS)
    assert resp.status == 200 and await resp.read() == whole
    resp = await client.get(done["outputs"][0]["url"], headers={**HEADERS, "Range": "bytes=0-7"})
    assert resp.status == 206 and await resp.read() == whole[:8]
    await ws.close()

    # Nothing secret in what comfymgr shows; then stop it, which ends its
    # WebSocket to ComfyUI: nginx logs that request when it closes.
    status = await (await client.get("/v1/status", headers=HEADERS)).text()
    metrics = await (await client.get("/metrics")).text()
    await client.close()

    def access_log() -> str:
        return (gpu_host.logs / "access.log").read_text()

    await wait_for(lambda: _async('" 101 ' in access_log()), "nginx's log of the WebSocket")
    # Every call went through nginx with the token; none carried it on to ComfyUI.
    access = access_log()
    assert re.search(r'"GET /ws HTTP/1\.1" 101 ', access), access
    for call in ("POST /prompt", "POST /interrupt", "POST /upload/image", "GET /history/",
                 "GET /object_info", "GET /system_stats"):
        assert f'"{call}' in access, call
    assert " 401 " not in access
    assert len(fake.authorization_seen) > 10 and set(fake.authorization_seen) == {None}
    assert_no_secret(status, metrics, caplog.text, gpu_host.nginx_logs())


async def _async(value):
    return value


async def _up(client):
    backend = await backend_status(client)
    return backend if backend["state"] == "up" else None


# -- refusals: a wrong token, an unknown CA -------------------------------------------

async def wait_down_with_error(client) -> dict:
    async def down():
        backend = await backend_status(client)
        return backend if backend["state"] == "down" and backend["lastError"] else None
    return await wait_for(down, "the backend down with a lastError")


async def test_a_wrong_token_shows_the_backend_down_and_no_secret(gpu_host, tmp_path, make_client,
                                                                  caplog):
    caplog.set_level(logging.DEBUG)
    path = headers_file(tmp_path, {"rack1": {"Authorization": f"Bearer {WRONG}"}})
    client = await make_client(comfymgr.load_config([], remote_env(
        tmp_path, gpu_host.url, COMFYMGR_BACKEND_HEADERS_FILE=str(path),
        COMFYMGR_BACKEND_CA_FILE=str(gpu_host.ca))))
    job = await submit(client, blur_workflow())
    backend = await wait_down_with_error(client)
    assert backend["lastError"] == f"HTTP 401 from {gpu_host.url}/ws"
    # It keeps trying (with back-off) and the job waits, queued, for it.
    await wait_for(lambda: _async((gpu_host.logs / "access.log").read_text().count(" 401 ") >= 2),
                   "a second attempt")
    assert (await get_json(client, f"/v1/comfyui/workflow/{job['workflowId']}"))["status"] == "queued"
    assert gpu_host.fake.authorization_seen == []  # nothing reached ComfyUI
    status = await (await client.get("/v1/status", headers=HEADERS)).text()
    metrics = await (await client.get("/metrics")).text()
    assert 'comfymgr_backend_up{backend="rack1"} 0.0' in metrics
    # Said once in the log, not once per attempt.
    warnings = [r.getMessage() for r in caplog.records if r.name == "comfymgr.bridge"
                and r.levelno == logging.WARNING]
    assert warnings == [f"backend rack1: HTTP 401 from {gpu_host.url}/ws"]
    assert_no_secret(status, metrics, caplog.text, gpu_host.nginx_logs())


async def test_without_the_ca_bundle_tls_refuses(gpu_host, tmp_path, make_client, caplog):
    caplog.set_level(logging.DEBUG)
    path = headers_file(tmp_path, {"rack1": {"Authorization": f"Bearer {TOKEN}"}})
    client = await make_client(comfymgr.load_config([], remote_env(
        tmp_path, gpu_host.url, COMFYMGR_BACKEND_HEADERS_FILE=str(path))))
    backend = await wait_down_with_error(client)
    assert backend["lastError"] == (f"cannot connect to {gpu_host.url}: TLS certificate verify "
                                    "failed: unable to get local issuer certificate")
    assert gpu_host.fake.authorization_seen == []
    assert (gpu_host.logs / "access.log").read_text() == ""  # no request got past the handshake
    status = await (await client.get("/v1/status", headers=HEADERS)).text()
    assert_no_secret(status, caplog.text)


# -- the settings ----------------------------------------------------------------------

def test_the_headers_file_is_read_once_and_its_repr_hides_the_values(tmp_path):
    path = headers_file(tmp_path, {"rack1": {"Authorization": f"Bearer {TOKEN}", "X-Team": "a"}})
    config = comfymgr.load_config([], {"COMFYUI_BACKENDS": "rack1=https://gpu-1.example.com,"
                                                           "local0=http://127.0.0.1:8188",
                                       "COMFYMGR_BACKEND_HEADERS_FILE": str(path)})
    path.unlink()  # read at start: the file is not needed afterwards
    headers = config.backend_headers_file
    assert headers.for_backend("rack1") == {"Authorization": f"Bearer {TOKEN}", "X-Team": "a"}
    assert headers.for_backend("local0") == {}
    assert repr(headers) == f"_BackendHeaders(path={path!r}, backends=['rack1'])"
    assert TOKEN not in repr(config)
    client = comfymgr._ComfyClient.for_backend(config.backends[0], config)
    assert client.ws_url("abc") == "wss://gpu-1.example.com/ws?clientId=abc"
    assert comfymgr._ComfyClient.for_backend(config.backends[1], config).ws_url("abc") == \
        "ws://127.0.0.1:8188/ws?clientId=abc"


BAD_HEADER_FILES = [
    ('{"rack1": {"Authorization": "Bearer ' + TOKEN + '"', "not valid JSON (Expecting ',' delimiter at line 1 column 102)"),
    ('["Bearer ' + TOKEN + '"]', 'expected a JSON object {"<backend name>": {"<header>": "<value>", ...}}'),
    ({"rack1": "Bearer " + TOKEN}, "backend 'rack1': expected an object of header names to values"),
    ({"rack1": {"Authorization": "Bearer " + TOKEN + "\r\nX-Evil: 1"}},
     "backend 'rack1', header 'Authorization': the value must be a string without line breaks or "
     "control characters"),
    ({"rack1": {"Authorization": ["Bearer " + TOKEN]}},
     "backend 'rack1', header 'Authorization': the value must be a string without line breaks or "
     "control characters"),
    ({"rack1": {"Bad Name": TOKEN}}, "backend 'rack1': 'Bad Name' is not a valid header name"),
    ({"rack1": {"Host": TOKEN}}, "backend 'rack1': header 'Host' is set by comfymgr itself"),
    ({"rack1": {"Authorization": TOKEN, "authorization": TOKEN}},
     "backend 'rack1': header 'authorization' appears twice"),
    ('{"rack1": {}, "rack1": {"Authorization": "' + TOKEN + '"}}', "not valid: 'rack1' appears twice"),
    ({"rack2": {"Authorization": "Bearer " + TOKEN}},
     "no backend is named 'rack2' (the backends are rack1)"),
    (b"\xff\xfe", "it is not UTF-8 text"),
]


@pytest.mark.parametrize("content, message", BAD_HEADER_FILES)
def test_a_bad_headers_file_stops_startup_with_exit_2_naming_the_setting(tmp_path, content, message,
                                                                         monkeypatch, capsys):
    path = tmp_path / "backend-headers.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    path.chmod(0o600)
    for name in [n for n in os.environ if n.startswith(("COMFYMGR_", "COMFYUI_", "MANAGEMENT_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("COMFYUI_BACKENDS", "rack1=https://gpu-1.example.com")
    monkeypatch.setenv("COMFYMGR_BACKEND_HEADERS_FILE", str(path))
    monkeypatch.setenv("COMFYMGR_STATE_DIR", str(tmp_path / "state"))
    assert comfymgr.main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"comfymgr: error: COMFYMGR_BACKEND_HEADERS_FILE={str(path)!r}: {message}\n"
    assert not (tmp_path / "state").exists()  # stopped before anything started


def test_a_missing_headers_file_or_ca_bundle_stops_startup(tmp_path):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(comfymgr.ConfigError) as info:
        comfymgr.load_config(["--backend-headers-file", str(missing)], {})
    assert str(info.value) == f"--backend-headers-file={str(missing)!r}: cannot read it: No such file or directory"
    with pytest.raises(comfymgr.ConfigError) as info:
        comfymgr.load_config([], {"COMFYMGR_BACKEND_CA_FILE": str(missing)})
    assert str(info.value) == f"COMFYMGR_BACKEND_CA_FILE={str(missing)!r}: cannot read it: No such file or directory"
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(comfymgr.ConfigError) as info:
        comfymgr.load_config([], {"COMFYMGR_BACKEND_CA_FILE": str(not_pem)})
    assert str(info.value) == f"COMFYMGR_BACKEND_CA_FILE={str(not_pem)!r}: no PEM certificate in it"


def test_credentials_in_a_backend_url_are_refused(tmp_path):
    with pytest.raises(comfymgr.ConfigError) as info:
        comfymgr.load_config([], {"COMFYUI_BACKENDS": f"rack1=https://user:{TOKEN}@gpu-1.example.com"})
    assert str(info.value) == (
        "COMFYUI_BACKENDS='rack1=https://user:***@gpu-1.example.com': backend 'rack1': "
        "'https://user:***@gpu-1.example.com': expected an http:// or https:// URL without user info "
        "(a GPU index goes after the whole URL, NAME=URL@GPU: gpu0=http://127.0.0.1:8188@0; credentials go in "
        "COMFYMGR_BACKEND_HEADERS_FILE)")
    assert TOKEN not in str(info.value)


@pytest.mark.parametrize("mode, warned", [(0o600, False), (0o400, False), (0o640, True), (0o604, True)])
async def test_a_headers_file_others_can_read_is_warned_about(tmp_path, make_client, caplog, mode, warned):
    path = headers_file(tmp_path, {"local": {"Authorization": f"Bearer {TOKEN}"}}, mode)
    config = comfymgr.load_config([], {"COMFYMGR_BACKEND_HEADERS_FILE": str(path),
                                       "COMFYMGR_STATE_DIR": str(tmp_path / "state"),
                                       "COMFYUI_URL": f"http://127.0.0.1:{free_port()}"})
    caplog.set_level(logging.INFO)
    await make_client(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and "COMFYMGR_BACKEND_HEADERS_FILE" in r.getMessage()]
    expected = (f"COMFYMGR_BACKEND_HEADERS_FILE {path} holds backend secrets and is readable by its "
                f"group or others (mode {mode:04o}): chmod 0600 it, or hand it over with systemd's "
                "LoadCredential= (docs/SCALING.md)")
    assert warnings == ([expected] if warned else [])
    assert TOKEN not in caplog.text


def test_systemd_analyze_verify_the_backend_headers_drop_in(tmp_path):
    """comfymgr.service with contrib/systemd/comfymgr-backend-headers.conf
    as its drop-in: systemd reads both without a complaint, and the
    variable the drop-in sets is the setting comfymgr reads."""
    analyze = need_tool("systemd-analyze")
    unit = (CONTRIB / "systemd" / "comfymgr.service").read_text()
    if not os.access("/usr/bin/python3", os.X_OK):
        unit = unit.replace("/usr/bin/python3", sys.executable)
    (tmp_path / "comfymgr.service").write_text(unit)
    (tmp_path / "comfymgr.service.d").mkdir()
    drop_in = (CONTRIB / "systemd" / "comfymgr-backend-headers.conf").read_text()
    (tmp_path / "comfymgr.service.d" / "backend-headers.conf").write_text(drop_in)
    done = subprocess.run([analyze, "verify", str(tmp_path / "comfymgr.service")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    assert "\nEnvironment=COMFYMGR_BACKEND_HEADERS_FILE=%d/backend-headers\n" in drop_in
    assert "\nLoadCredential=backend-headers:/etc/comfymgr/backend-headers.json\n" in drop_in
    assert "COMFYMGR_BACKEND_HEADERS_FILE" in {s.env for s in comfymgr._SETTINGS}
    env_file = (CONTRIB / "systemd" / "comfymgr.env").read_text()
    assert not re.search(r"^COMFYMGR_BACKEND_HEADERS_FILE=", env_file, re.M)  # it would override the drop-in


def test_the_instances_load_balancer_of_scaling_md_is_valid_nginx(tmp_path):
    """The load-balancer example of docs/SCALING.md, "Past one comfymgr",
    passes `nginx -t` (with a test certificate in place of its paths)."""
    nginx_bin = need_tool("nginx")
    openssl = need_tool("openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    site = scaling_block("instances-nginx")
    for old, new in [("/etc/ssl/comfy/fullchain.pem", tmp_path / "cert.pem"),
                     ("/etc/ssl/comfy/privkey.pem", tmp_path / "key.pem"),
                     ("listen 443 ssl;", f"listen 127.0.0.1:{free_port()} ssl;")]:
        assert site.count(old) == 1, old
        site = site.replace(old, str(new))
    for sub in ("logs", "temp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(nginx_main_conf(tmp_path, tmp_path / "site.conf"))
    done = subprocess.run([nginx_bin, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                           "-e", str(tmp_path / "logs" / "error.log")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
