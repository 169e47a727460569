"""Deployment, as users run it, with real processes: the .pyz `make pyz`
builds (on every CPython 3.10-3.13 found), nginx in front with
contrib/nginx/comfymgr.conf, a Prometheus scraping through it with
contrib/prometheus/, and the systemd units, checked by systemd-analyze and
run by a real systemd (this machine's OS booted under systemd-nspawn).

Everything listens on 127.0.0.x (the container has its own network) and
lives in tmp_path; every process started here is stopped here. nginx tells
clients apart by their source address, so each test talks to it from its
own loopback address (127.0.0.2, .3, ...), and each gets its own rate-limit
bucket in comfymgr. A tool that is not installed (nginx, openssl, promtool,
prometheus, systemd-analyze, systemd-nspawn) skips its tests; .ci/run
installs them all.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import pytest

import comfymgr
from conftest import workflow
from nginx_helpers import Proc, free_port, needs, start_nginx, wait_until

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
FAKE_COMFYUI = ROOT / "tests" / "fake_comfyui.py"
KEY = "deploy-test-key-0123456789"
HEADERS = {"X-API-Key": KEY}
RATE_LIMIT = 30  # per minute per client address, in the comfymgr behind nginx
SUBMIT = "/v1/comfyui/workflow"
SETTINGS = {st.env: st for st in comfymgr._SETTINGS}
BODY_LIMIT = int(SETTINGS["COMFYMGR_MAX_BODY_BYTES"].default)
UPLOAD_LIMIT = int(SETTINGS["COMFYMGR_MAX_UPLOAD_BYTES"].default)
UPLOAD_SLACK = 64 * 1024  # the multipart framing comfymgr allows on top of an upload


def http_get(url: str, headers=None, timeout: float = 5):
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def http_json(method: str, url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={**HEADERS, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def comfymgr_env(port: int, state_dir: Path, comfyui_url: str, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "MANAGEMENT_API_HOST": "127.0.0.1",
        "MANAGEMENT_API_PORT": str(port),
        "MANAGEMENT_API_KEY": KEY,
        "COMFYMGR_STATE_DIR": str(state_dir),
        "COMFYUI_URL": comfyui_url,
        "COMFYMGR_SHUTDOWN_TIMEOUT": "5s",
        "COMFYMGR_GPU_POLL_INTERVAL": "1s",
        **extra,
    }


def wait_completed(base_url: str, job_id: str, within: float = 30.0) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status, job = http_json("GET", f"{base_url}{SUBMIT}/{job_id}")
        assert status == 200, job
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    pytest.fail(f"job {job_id} did not finish within {within} s: {job}")


# -- processes shared by the module ------------------------------------------

@pytest.fixture(scope="module")
def fake_comfyui(tmp_path_factory):
    """The fake ComfyUI (tests/fake_comfyui.py) as its own process."""
    tmp = tmp_path_factory.mktemp("fake-comfyui")
    port = free_port()
    proc = Proc("fake-comfyui", [sys.executable, str(FAKE_COMFYUI), "--port", str(port),
                                 "--output-dir", str(tmp / "output")], tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(proc, lambda: http_get(f"{url}/system_stats")[0] == 200, "no /system_stats")
        yield url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def backend(tmp_path_factory, fake_comfyui):
    """comfymgr as nginx's upstream: `python3 comfymgr.py`, trusting 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("comfymgr")
    port = free_port()
    (tmp / "inputs").mkdir()
    env = comfymgr_env(port, tmp / "state", fake_comfyui,
                       COMFYMGR_TRUSTED_PROXIES="127.0.0.1",
                       COMFYMGR_RATE_LIMIT=str(RATE_LIMIT),
                       COMFYUI_INPUTS=str(tmp / "inputs"))
    proc = Proc("comfymgr", [sys.executable, str(ROOT / "comfymgr.py")], tmp, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(proc, lambda: http_get(f"{url}/health")[0] == 200, "no 200 from /health")
        yield url
    finally:
        proc.stop()


def render_nginx_conf(*, listen_port: int, upstream_port: int, cert: Path, key: Path,
                      logs: Path) -> str:
    """contrib/nginx/comfymgr.conf with only its ports, paths and
    certificate changed; everything else is tested as shipped."""
    text = (CONTRIB / "nginx" / "comfymgr.conf").read_text()
    for old, new in [
        ("    listen 443 ssl;\n", f"    listen 127.0.0.1:{listen_port} ssl;\n"),
        ("    listen [::]:443 ssl;\n", ""),
        ("    server 127.0.0.1:9090;\n", f"    server 127.0.0.1:{upstream_port};\n"),
        ("/etc/ssl/comfymgr/fullchain.pem", str(cert)),
        ("/etc/ssl/comfymgr/privkey.pem", str(key)),
        ("/var/log/nginx/comfymgr.access.log", str(logs / "comfymgr.access.log")),
        ("/var/log/nginx/comfymgr.error.log", str(logs / "comfymgr.error.log")),
    ]:
        assert text.count(old) == 1, f"contrib/nginx/comfymgr.conf should have {old!r} once"
        text = text.replace(old, new)
    return text


class Nginx:
    def __init__(self, url: str, cert: Path, logs: Path, backend: str) -> None:
        self.url = url
        self.cert = cert
        self.logs = logs
        self.backend = backend

    def error_log(self) -> str:
        return (self.logs / "comfymgr.error.log").read_text(errors="replace")

    def session(self, source: str) -> aiohttp.ClientSession:
        """A client whose connections come from `source` (a 127.0.0.x address),
        checking the test certificate."""
        context = ssl.create_default_context(cafile=str(self.cert))
        connector = aiohttp.TCPConnector(ssl=context, local_addr=(source, 0))
        return aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60))


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, backend):
    openssl = needs("openssl")
    prefix = tmp_path_factory.mktemp("nginx")
    (prefix / "tls").mkdir()
    cert, key = prefix / "tls" / "cert.pem", prefix / "tls" / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = free_port()
    (prefix / "logs").mkdir()
    site = render_nginx_conf(listen_port=port, upstream_port=int(backend.rsplit(":", 1)[1]),
                             cert=cert, key=key, logs=prefix / "logs")
    proc = start_nginx(prefix, site, port)
    try:
        yield Nginx(f"https://127.0.0.1:{port}", cert, prefix / "logs", backend)
    finally:
        proc.stop(signal.SIGQUIT)  # graceful: finish requests, then exit


# -- nginx in front of comfymgr ------------------------------------------------

async def test_submit_and_status_through_nginx_over_tls(nginx):
    async with nginx.session("127.0.0.2") as http:
        resp = await http.post(nginx.url + SUBMIT, json={"workflow": workflow()}, headers=HEADERS)
        assert resp.status == 202, await resp.text()
        assert resp.headers["Strict-Transport-Security"] == "max-age=63072000"
        assert resp.headers["Server"] == "nginx"  # server_tokens off: no version
        job_id = (await resp.json())["workflowId"]
        for _ in range(20):  # well under RATE_LIMIT
            resp = await http.get(f"{nginx.url}{SUBMIT}/{job_id}", headers=HEADERS)
            assert resp.status == 200, await resp.text()
            job = await resp.json()
            if job["status"] == "completed":
                break
            await asyncio.sleep(0.25)
        assert job["status"] == "completed", job
        assert job["outputs"], job
        resp = await http.get(f"{nginx.url}{SUBMIT}/{job_id}")
        assert resp.status == 401  # comfymgr's own errors pass through unchanged
        assert (await resp.json())["error"] == "unauthorized"
        # The API docs work through nginx, without a key.
        for path, kind in [("/docs", "text/html"), ("/openapi.json", "application/json"),
                           ("/docs/assets/swagger-ui-bundle.js", "javascript")]:
            resp = await http.get(nginx.url + path)
            assert resp.status == 200, path
            assert kind in resp.headers["Content-Type"], (path, resp.headers["Content-Type"])


async def test_event_stream_through_nginx(nginx):
    async with nginx.session("127.0.0.3") as http:
        async with http.ws_connect(nginx.url.replace("https", "wss") + "/v1/comfyui/stream",
                                   headers=HEADERS, heartbeat=None) as ws:
            await ws.send_json({"type": "ping"})  # answered once the hub serves us
            assert (await ws.receive_json(timeout=10))["type"] == "pong"
            resp = await http.post(nginx.url + SUBMIT, json={"workflow": workflow()}, headers=HEADERS)
            assert resp.status == 202, await resp.text()
            job_id = (await resp.json())["workflowId"]
            seen = []
            while "workflow:completed" not in seen:
                message = await ws.receive_json(timeout=30)
                if message.get("workflowId") == job_id:
                    seen.append(message["type"])
            assert seen[0] == "workflow:queued" and "workflow:started" in seen, seen


async def test_metrics_only_from_the_prometheus_network(nginx):
    # 127.0.0.1 is in the shipped allow list (a Prometheus on the box);
    # 127.0.0.4 stands for any other client.
    async with nginx.session("127.0.0.1") as http:
        resp = await http.get(nginx.url + "/metrics")
        assert resp.status == 200
        scrape = await resp.text()
    assert "comfymgr_build_info{" in scrape
    async with nginx.session("127.0.0.4") as http:
        resp = await http.get(nginx.url + "/metrics")
        assert resp.status == 403
        assert resp.headers["Content-Type"] == "application/json"
        body = await resp.json()
        assert (body["error"], body["statusCode"]) == ("forbidden", 403)
        resp = await http.get(nginx.url + "/health")  # the rest stays open to it
        assert resp.status == 200
    # Every series the alert rules use is one comfymgr exports: here, or (GPU
    # series, present only with NVML) declared in comfymgr.py.
    exported = set(re.findall(r"^# HELP (\w+)", scrape, re.M))
    source = (ROOT / "comfymgr.py").read_text()
    for name in alert_metric_names():
        assert name in exported or f'"{name}"' in source, f"alerts.yml uses unknown {name}"


async def test_rate_limit_follows_the_real_client_address(nginx):
    async with nginx.session("127.0.0.5") as http:
        for i in range(RATE_LIMIT):
            resp = await http.get(nginx.url + "/v1/status", headers=HEADERS)
            assert resp.status == 200, (i, await resp.text())
        resp = await http.get(nginx.url + "/v1/status", headers=HEADERS)
        assert resp.status == 429
        assert (await resp.json())["error"] == "rate_limited"
        assert int(resp.headers["Retry-After"]) >= 1
        # Claiming to be someone else does not help: nginx replaces both headers.
        for spoofed in ("203.0.113.7", "127.0.0.6", "127.0.0.1, 198.51.100.1"):
            resp = await http.get(nginx.url + "/v1/status", headers={
                **HEADERS, "X-Forwarded-For": spoofed, "X-Real-IP": spoofed})
            assert resp.status == 429, spoofed
    # Another client, through the same nginx, has its own allowance.
    async with nginx.session("127.0.0.6") as http:
        resp = await http.get(nginx.url + "/v1/status", headers=HEADERS)
        assert resp.status == 200, await resp.text()


def padded_submit(size: int) -> bytes:
    """A valid submit of exactly `size` bytes (JSON allows trailing spaces)."""
    body = json.dumps({"workflow": workflow()}).encode()
    return body + b" " * (size - len(body))


async def test_body_limit_is_the_same_in_nginx_and_comfymgr(nginx):
    headers = {**HEADERS, "Content-Type": "application/json"}
    async with nginx.session("127.0.0.7") as http:
        # Exactly the limit: nginx passes it and comfymgr takes it.
        resp = await http.post(nginx.url + SUBMIT, data=padded_submit(BODY_LIMIT), headers=headers)
        assert resp.status == 202, await resp.text()
        # One byte more: nginx refuses it, in comfymgr's envelope...
        resp = await http.post(nginx.url + SUBMIT, data=padded_submit(BODY_LIMIT + 1), headers=headers)
        assert resp.status == 413
        assert resp.headers["Content-Type"] == "application/json"
        from_nginx = await resp.json()
    assert "client intended to send too large body" in nginx.error_log()
    # ...and comfymgr, asked directly, refuses it the same way.
    async with aiohttp.ClientSession() as http:
        resp = await http.post(nginx.backend + SUBMIT, data=padded_submit(BODY_LIMIT + 1),
                               headers=headers)
        assert resp.status == 413
        from_comfymgr = await resp.json()
    same = ("error", "statusCode", "details")
    assert {k: from_nginx[k] for k in same} == {k: from_comfymgr[k] for k in same}
    assert from_nginx["details"] == {"limit": BODY_LIMIT}


def multipart_upload(image_size: int) -> aiohttp.FormData:
    form = aiohttp.FormData()
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * (image_size - 8)
    form.add_field("image", png, filename="big.png", content_type="image/png")
    return form


async def test_uploads_have_their_own_limit_in_nginx_and_comfymgr(nginx):
    async with nginx.session("127.0.0.8") as http:
        # Over the 10 MiB body limit, well under the upload limit: nginx
        # passes it on (whatever comfymgr makes of the file, it is not 413).
        resp = await http.post(nginx.url + "/v1/comfyui/inputs",
                               data=multipart_upload(BODY_LIMIT + 1024 * 1024), headers=HEADERS)
        assert resp.status != 413, await resp.text()
        # Over what comfymgr would read: nginx refuses it, with the upload limit.
        big = multipart_upload(UPLOAD_LIMIT + UPLOAD_SLACK)
        resp = await http.post(nginx.url + "/v1/comfyui/inputs", data=big, headers=HEADERS)
        assert resp.status == 413
        from_nginx = await resp.json()
    async with aiohttp.ClientSession() as http:
        resp = await http.post(nginx.backend + "/v1/comfyui/inputs",
                               data=multipart_upload(UPLOAD_LIMIT + UPLOAD_SLACK), headers=HEADERS)
        assert resp.status == 413
        from_comfymgr = await resp.json()
    assert (from_nginx["error"], from_nginx["statusCode"], from_nginx["details"]) == \
        (from_comfymgr["error"], from_comfymgr["statusCode"], from_comfymgr["details"]) == \
        ("payload_too_large", 413, {"limit": UPLOAD_LIMIT})


def test_nginx_limits_match_comfymgr_defaults():
    conf = (CONTRIB / "nginx" / "comfymgr.conf").read_text()
    sizes = re.findall(r"client_max_body_size (\d+)(m?);", conf)
    assert [int(n) * (1024 * 1024 if unit else 1) for n, unit in sizes] == \
        [BODY_LIMIT, UPLOAD_LIMIT + UPLOAD_SLACK]


# -- the .pyz ------------------------------------------------------------------

def find_python(minor: int) -> str | None:
    """A CPython 3.<minor> on this machine: pyenv's or the system's (never a shim)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = sorted(glob.glob(str(pyenv / "versions" / f"3.{minor}.*" / "bin" / "python3")))
    candidates += [f"/usr/bin/python3.{minor}", f"/usr/local/bin/python3.{minor}"]
    for path in candidates:
        if os.access(path, os.X_OK):
            done = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"],
                                  capture_output=True, text=True)
            if done.stdout.strip() == f"(3, {minor})":
                return path
    return None


PYTHONS = {minor: find_python(minor) for minor in (10, 11, 12, 13)}


@pytest.fixture(scope="session")
def pyz(tmp_path_factory):
    """`make pyz`, built into tmp from the current comfymgr.py (wheels come
    from the .cache/wheels the Makefile keeps)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path_factory.mktemp("pyz")
    target = out / "comfymgr.pyz"
    done = subprocess.run(["make", "pyz", f"PYZ={target}", f"PYZ_BUILD={out / 'build'}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert os.access(target, os.X_OK)
    return target


def test_pyz_prints_its_version_run_either_way(pyz, tmp_path):
    env = {**os.environ, "SHIV_ROOT": str(tmp_path / "shiv")}
    expected = f"comfymgr {comfymgr.__version__}\n"
    python3 = PYTHONS[11] or sys.executable
    for argv in ([python3, str(pyz), "--version"], [str(pyz), "--version"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        assert (done.returncode, done.stdout) == (0, expected), (argv, done.stderr)
    # The first start unpacks it with no network at all (a new, empty netns).
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        env["SHIV_ROOT"] = str(tmp_path / "shiv-offline")
        done = subprocess.run([unshare, "-rn", python3, str(pyz), "--version"], env=env,
                              capture_output=True, text=True)
        assert (done.returncode, done.stdout) == (0, expected), done.stderr


def test_pyz_packs_only_the_runtime_dependencies(pyz):
    import zipfile

    with zipfile.ZipFile(pyz) as archive:
        tops = {name.split("/")[1] for name in archive.namelist()
                if name.startswith("site-packages/") and name.count("/") >= 1}
    packages = {t for t in tops if not t.endswith(".dist-info") and t}
    assert packages == {
        "comfymgr.py", "aiohttp", "aiohappyeyeballs", "aiosignal", "async_timeout", "attr",
        "attrs", "frozenlist", "idna", "multidict", "propcache", "prometheus_client", "pynvml.py",
        "swagger_ui_bundle", "typing_extensions.py", "yarl", "orjson"}, packages


@pytest.mark.parametrize("minor", sorted(PYTHONS))
def test_pyz_core_smoke(pyz, minor, fake_comfyui, tmp_path):
    """Start the .pyz as the unit does, submit to the fake ComfyUI, watch
    the job complete, stop it with SIGTERM: exit 0."""
    python = PYTHONS[minor]
    if python is None:
        pytest.skip(f"no Python 3.{minor} on this machine")
    port = free_port()
    env = comfymgr_env(port, tmp_path / "state", fake_comfyui, SHIV_ROOT=str(tmp_path / "shiv"),
                       COMFYMGR_RATE_LIMIT="0")
    service = Proc("comfymgr-pyz", [python, "-I", str(pyz)], tmp_path, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(service, lambda: http_get(f"{url}/health")[0] == 200, "no 200 from /health")
        status, job = http_json("POST", url + SUBMIT, {"workflow": workflow()})
        assert status == 202, job
        job = wait_completed(url, job["workflowId"])
        assert job["status"] == "completed" and job["outputs"], job
        status, body = http_get(f"{url}/docs/assets/swagger-ui.css")
        assert status == 200 and body, "Swagger UI's assets are in the .pyz"
        status, info = http_json("GET", url + "/v1/status")
        assert info["runtime"]["eventLoop"] == "asyncio" and info["runtime"]["json"] == "orjson", info
    finally:
        code = service.stop(signal.SIGTERM)
    assert code == 0, service.log()
    assert "stopped" in service.log()
    # The compiled modules were this interpreter's, not the pure-Python fallbacks.
    site = next((tmp_path / "shiv").glob("*/site-packages"))
    check = ("import sys; sys.path.insert(0, sys.argv[1]); import aiohttp._http_parser, "
             "aiohttp._websocket.reader_c, multidict._multidict, yarl._quoting_c, "
             "propcache._helpers_c, frozenlist._frozenlist, orjson")
    done = subprocess.run([python, "-I", "-c", check, str(site)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- systemd -------------------------------------------------------------------

def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file, continuation lines joined."""
    values: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        if line and line[0] not in "#;[" and "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key.strip(), []).append(value.strip())
    return values


@pytest.mark.parametrize("unit, instance", [("comfymgr.service", "comfymgr.service"),
                                            ("comfyui@.service", "comfyui@0.service")])
def test_systemd_analyze_verify(unit, instance, tmp_path):
    """`systemd-analyze verify` on the units as shipped, with the programs
    they start pointed at ones this machine has (it checks they exist)."""
    analyze = needs("systemd-analyze")
    text = (CONTRIB / "systemd" / unit).read_text()
    for program in ("/usr/bin/python3", "/opt/comfyui/venv/bin/python"):
        if program in text and not os.access(program, os.X_OK):
            text = text.replace(program, sys.executable)
    (tmp_path / unit).write_text(text)
    done = subprocess.run([analyze, "verify", str(tmp_path / instance)], capture_output=True,
                          text=True, cwd=tmp_path)
    ours = [line for line in (done.stdout + done.stderr).splitlines()
            if "comfymgr" in line or "comfyui" in line]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr
    security = subprocess.run([analyze, "security", "--offline=yes", str(tmp_path / instance)],
                              capture_output=True, text=True, cwd=tmp_path)
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    if score is None:
        pytest.skip(f"systemd-analyze security --offline is not available: {security.stderr}")
    assert float(score.group(1)) <= 2.0, security.stdout  # "OK"; was 1.5-1.7 when written


# ComfyUI's main.py, for comfyui@.service in the container below: it takes
# ComfyUI's flags and runs the fake ComfyUI on the .pyz's own aiohttp.
COMFYUI_MAIN_STANDIN = """
import argparse, os, runpy, sys
here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, "site-packages"))
parser = argparse.ArgumentParser()
for flag in ("--listen", "--port", "--cuda-device", "--output-directory", "--input-directory",
             "--temp-directory", "--user-directory", "--database-url"):
    parser.add_argument(flag, required=True)
parser.add_argument("--disable-auto-launch", action="store_true")
args = parser.parse_args()
assert os.path.isdir(args.user_directory), args.user_directory
print("uid", os.getuid(), "gid", os.getgid(), "HOME", os.environ["HOME"], flush=True)
sys.argv = ["fake_comfyui", "--host", args.listen, "--port", args.port,
            "--output-dir", args.output_directory, "--input-dir", args.input_directory,
            "--temp-dir", os.path.join(args.temp_directory, "temp")]
runpy.run_path(os.path.join(here, "fake_comfyui.py"), run_name="__main__")
"""

# Run inside the container: the deployment as README "Deploy on a GPU box"
# does it, then a job, an upload that ComfyUI reads back, a download, a stop.
IN_CONTAINER = r"""
set -eu
useradd --system --user-group --home-dir /var/lib/comfyui --no-create-home --shell /usr/sbin/nologin comfyui
SHIV_ROOT=/tmp/comfymgr-check /usr/bin/python3 /opt/comfymgr/comfymgr.pyz --version && rm -rf /tmp/comfymgr-check
systemctl daemon-reload
systemctl enable --now comfyui@0 comfymgr
/usr/bin/python3 - <<'PY'
import json, time, urllib.request, uuid
base = "http://127.0.0.1:9090"
def call(path, data=None, headers={}, key=True):
    if key:
        headers = {**headers, "X-API-Key": open("/var/lib/comfymgr/api-key").read().strip()}
    request = urllib.request.Request(base + path, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, resp.read()
deadline = time.monotonic() + 60
while True:
    try:
        if json.loads(call("/v1/status")[1])["backends"][0]["state"] == "up":
            break
    except OSError:
        pass
    assert time.monotonic() < deadline, "comfymgr or its backend never came up"
    time.sleep(0.2)
def run(graph):
    body = json.dumps({"workflow": graph}).encode()
    status, job = call("/v1/comfyui/workflow", body, {"Content-Type": "application/json"})
    job = json.loads(job)
    while job["status"] in ("queued", "running"):
        time.sleep(0.1)
        job = json.loads(call("/v1/comfyui/workflow/" + job["workflowId"])[1])
    assert job["status"] == "completed", job
    return job
job = run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 255}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "deploy"}}})
status, png = call(job["outputs"][0]["url"])
assert status == 200 and png.startswith(b"\x89PNG"), status
boundary = uuid.uuid4().hex
form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"up.png\"\r\n"
        f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
status, stored = call("/v1/comfyui/inputs", form, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
assert status == 201, stored
name = json.loads(stored)["workflowValue"]
job = run({"1": {"class_type": "LoadImage", "inputs": {"image": name}},
           "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})
assert call(job["outputs"][0]["url"])[0] == 200
print("JOBS OK")
PY
stat -L -c '%n %U:%G %a' /var/lib/comfymgr /var/cache/comfymgr /var/lib/comfyui/input/up.png
systemctl stop comfymgr
systemctl show comfymgr -p Result -p ExecMainStatus
systemd-analyze security comfymgr.service comfyui@0.service | grep 'Overall exposure'
"""


def test_systemd_runs_the_units_for_real(pyz, tmp_path):
    """Boot this machine's own OS under systemd-nspawn (read-only, a private
    network, /etc and /opt overlaid), install the units, the env file and
    the .pyz as the README says, and let systemd run them."""
    nspawn, nsenter, unshare = needs("systemd-nspawn"), needs("nsenter"), needs("unshare")
    if os.geteuid() != 0:
        pytest.skip("booting a container needs root")
    import zipfile

    etc, opt = tmp_path / "etc", tmp_path / "opt"
    for unit in ("comfymgr.service", "comfyui@.service"):
        (etc / "systemd" / "system").mkdir(parents=True, exist_ok=True)
        shutil.copy(CONTRIB / "systemd" / unit, etc / "systemd" / "system" / unit)
    (etc / "comfymgr").mkdir()
    shutil.copy(CONTRIB / "systemd" / "comfymgr.env", etc / "comfymgr" / "comfymgr.env")
    (etc / "comfymgr" / "comfymgr.env").chmod(0o600)
    (opt / "comfymgr").mkdir(parents=True)
    shutil.copy(pyz, opt / "comfymgr" / "comfymgr.pyz")
    comfyui = opt / "comfyui" / "ComfyUI"
    (comfyui / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(FAKE_COMFYUI, comfyui / "fake_comfyui.py")
    shutil.copytree(ROOT / "tests" / "data", comfyui / "data")
    (comfyui / "main.py").write_text(COMFYUI_MAIN_STANDIN)
    with zipfile.ZipFile(pyz) as archive:
        archive.extractall(comfyui, [n for n in archive.namelist() if n.startswith("site-packages/")])
    (opt / "comfyui" / "venv" / "bin").mkdir(parents=True)
    (opt / "comfyui" / "venv" / "bin" / "python").symlink_to("/usr/bin/python3")
    (tmp_path / "root").mkdir()
    (tmp_path / "work").mkdir()
    machine = f"comfymgr-test-{os.getpid()}"
    boot = (f"mount --bind / {tmp_path / 'root'} && exec {nspawn} -D {tmp_path / 'root'} "
            f"--volatile=state --private-network --register=no --keep-unit --link-journal=no "
            f"--machine={machine} --overlay=/etc:{etc}:/etc --overlay=/opt:{opt}:/opt "
            f"--boot --console=passive")
    container = Proc("nspawn", [unshare, "--mount", "--propagation", "private", "sh", "-c", boot],
                     tmp_path)

    def leader() -> int | None:  # the container's systemd, PID 1 inside
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)
            except OSError:
                continue
            if fields[0].endswith("(systemd") and int(fields[1].split()[1]) == container.proc.pid:
                return int(stat.split("/")[2])
        return None

    def inside(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([nsenter, "-t", str(pid), "-a", "sh", "-c", script],
                              capture_output=True, text=True, timeout=timeout)

    try:
        wait_until(container, lambda: leader() is not None, "no systemd in the container", 60)
        pid = leader()
        wait_until(container, lambda: inside("systemctl is-system-running").stdout.strip()
                   in ("running", "degraded"), "the container did not finish booting", 90)
        done = inside(IN_CONTAINER)
        journal = inside("journalctl --no-pager -u comfymgr -u comfyui@0").stdout
        assert done.returncode == 0, done.stdout + done.stderr + journal
        assert "JOBS OK" in done.stdout
        assert "Result=success\nExecMainStatus=0" in done.stdout, done.stdout + journal
        files = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith("/var"))
        assert files["/var/lib/comfymgr"].endswith(":comfyui 700"), files  # the database and key
        assert files["/var/cache/comfymgr"].endswith(":comfyui 700"), files  # SHIV_ROOT
        assert files["/var/lib/comfyui/input/up.png"].endswith(":comfyui 640"), files
        scores = [float(x) for x in re.findall(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)]
        assert len(scores) == 2 and max(scores) <= 2.0, done.stdout
    finally:
        if container.proc.poll() is None and leader() is not None:
            subprocess.run([nsenter, "-t", str(leader()), "-a", "systemctl", "poweroff"],
                           capture_output=True, timeout=30)
        container.stop(signal.SIGTERM, timeout=60)


def test_comfymgr_unit_fits_comfymgr():
    unit = unit_settings(CONTRIB / "systemd" / "comfymgr.service")
    exec_start = unit["ExecStart"][0].split()
    assert exec_start[-1] == "/opt/comfymgr/comfymgr.pyz"  # the .pyz itself,
    assert Path(exec_start[0]).name.startswith("python3")  # no shell in between
    assert unit["EnvironmentFile"] == ["/etc/comfymgr/comfymgr.env"]
    environment = dict(v.split("=", 1) for v in unit["Environment"])
    assert environment["COMFYMGR_STATE_DIR"] == "%S/" + unit["StateDirectory"][0]
    assert environment["SHIV_ROOT"] == "%C/" + unit["CacheDirectory"][0]
    assert unit["Restart"] == ["on-failure"]
    parse = comfymgr._parse_duration
    shutdown = parse(env_file_values()[0].get("COMFYMGR_SHUTDOWN_TIMEOUT",
                                              SETTINGS["COMFYMGR_SHUTDOWN_TIMEOUT"].default))
    assert parse(unit["TimeoutStopSec"][0]) >= 2 * shutdown
    assert unit["CapabilityBoundingSet"] == [""] and unit["NoNewPrivileges"] == ["yes"]
    assert "char-nvidia* rw" in unit["DeviceAllow"] and unit["PrivateDevices"] == ["no"]


def env_file_values() -> tuple[dict[str, str], dict[str, str]]:
    """(set, commented out) NAME=value lines of contrib/systemd/comfymgr.env."""
    text = (CONTRIB / "systemd" / "comfymgr.env").read_text()
    return (dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", text, re.M)),
            dict(re.findall(r"^#([A-Z][A-Z0-9_]*)=(.*)$", text, re.M)))


def test_env_file_documents_every_setting_with_valid_values():
    active, commented = env_file_values()
    assert set(SETTINGS) - set(active) - set(commented) == set(), "undocumented settings"
    assert set(active) | set(commented) <= set(SETTINGS), "settings comfymgr does not have"
    config = comfymgr.load_config([], active)  # what the service will run with
    assert config.host == "127.0.0.1" and config.trusted_proxies  # behind nginx
    for name, value in commented.items():
        comfymgr.load_config([], {name: value})  # every example is a valid value


# -- Prometheus ----------------------------------------------------------------

def alert_metric_names() -> set[str]:
    text = (CONTRIB / "prometheus" / "alerts.yml").read_text()
    exprs = re.findall(r"expr: (?:\|\n)?((?:.+\n)+?)\s+for:", text)
    return {name for expr in exprs for name in re.findall(r"\b(comfy\w+)", expr)}


def test_promtool_checks_config_and_rules():
    promtool = needs("promtool")
    for argv in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        done = subprocess.run([promtool, *argv], cwd=CONTRIB / "prometheus",
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    assert len(alert_metric_names()) >= 8


def render_prometheus_yml(*, target: str, ca_file: Path) -> str:
    """contrib/prometheus/prometheus.yml scraping `target` every second."""
    text = (CONTRIB / "prometheus" / "prometheus.yml").read_text()
    for old, new in [
        ("  scrape_interval: 15s\n", "  scrape_interval: 1s\n"),
        ("  evaluation_interval: 15s\n", "  evaluation_interval: 1s\n"),
        ("    scrape_timeout: 10s\n", "    scrape_timeout: 1s\n"),
        ("      # ca_file: /etc/prometheus/comfymgr-ca.pem\n", f"      ca_file: {ca_file}\n"),
        ("          - gpu-box-1.example.com:443\n          - gpu-box-2.example.com:443\n",
         f"          - {target}\n"),
    ]:
        assert text.count(old) == 1, f"contrib/prometheus/prometheus.yml should have {old!r} once"
        text = text.replace(old, new)
    return text


def test_prometheus_scrapes_comfymgr_through_nginx(nginx, tmp_path):
    """A real Prometheus with the shipped scrape job and rules, pointed at
    the nginx above: the target is up, comfymgr's series arrive, the rules load."""
    prometheus = needs("prometheus")
    (tmp_path / "prometheus.yml").write_text(render_prometheus_yml(
        target=nginx.url.removeprefix("https://"), ca_file=nginx.cert))
    shutil.copy(CONTRIB / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    proc = Proc("prometheus", [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}",
                               f"--web.listen-address=127.0.0.1:{port}"], tmp_path, cwd=tmp_path)

    def query(expr: str) -> list:
        status, body = http_get(f"{api}/query?" + urllib.parse.urlencode({"query": expr}))
        assert status == 200, body
        return json.loads(body)["data"]["result"]

    try:
        wait_until(proc, lambda: query('up{job="comfymgr"} == 1'), "no successful scrape", 60)
        assert [r["value"][1] for r in query('comfymgr_backend_up{job="comfymgr"}')] == ["1"]

        def rules() -> list:
            body = http_get(f"{api}/rules")[1]
            return [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]

        assert len(rules()) == len(EXPECTED_ALERTS)
        wait_until(proc, lambda: {r["health"] for r in rules()} == {"ok"}, "rules not all ok", 30)
    finally:
        proc.stop()


# One box where everything is wrong, one where all is well: after 30 minutes
# exactly the expected alerts fire, for the bad box only; after 45 seconds
# none has fired yet (each has a `for:` of a minute or more).
RULE_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - {{series: 'up{{job="comfymgr",instance="bad"}}', values: '0x200'}}
      - {{series: 'up{{job="comfymgr",instance="ok"}}', values: '1x200'}}
      - {{series: 'comfymgr_backend_up{{job="comfymgr",instance="bad",backend="gpu0"}}', values: '0x200'}}
      - {{series: 'comfymgr_backend_up{{job="comfymgr",instance="ok",backend="gpu0"}}', values: '1x200'}}
      - {{series: 'comfymgr_queue_oldest_age_seconds{{job="comfymgr",instance="bad"}}', values: '2000+15x200'}}
      - {{series: 'comfymgr_queue_oldest_age_seconds{{job="comfymgr",instance="ok"}}', values: '20x200'}}
      - {{series: 'comfyui_queue_length{{job="comfymgr",instance="bad"}}', values: '80x200'}}
      - {{series: 'comfyui_queue_length{{job="comfymgr",instance="ok"}}', values: '3x200'}}
      - {{series: 'comfyui_workflow_errors_total{{job="comfymgr",instance="bad",error_type="execution_error"}}', values: '0+3x200'}}
      - {{series: 'comfyui_workflow_total{{job="comfymgr",instance="bad",status="completed"}}', values: '0+1x200'}}
      - {{series: 'comfyui_workflow_errors_total{{job="comfymgr",instance="ok",error_type="timeout"}}', values: '0+0.05x200'}}
      - {{series: 'comfyui_workflow_total{{job="comfymgr",instance="ok",status="completed"}}', values: '0+5x200'}}
      - {{series: 'comfymgr_gpu_temperature_celsius{{job="comfymgr",instance="bad",gpu_id="0"}}', values: '91x200'}}
      - {{series: 'comfymgr_gpu_temperature_celsius{{job="comfymgr",instance="ok",gpu_id="0"}}', values: '64x200'}}
      - {{series: 'comfyui_vram_usage_bytes{{job="comfymgr",instance="bad",gpu_id="0"}}', values: '79e9x200'}}
      - {{series: 'comfyui_vram_usage_bytes{{job="comfymgr",instance="ok",gpu_id="0"}}', values: '60e9x200'}}
      - {{series: 'comfymgr_gpu_memory_total_bytes{{job="comfymgr",instance="bad",gpu_id="0"}}', values: '80e9x200'}}
      - {{series: 'comfymgr_gpu_memory_total_bytes{{job="comfymgr",instance="ok",gpu_id="0"}}', values: '80e9x200'}}
      - {{series: 'comfymgr_gpu_up{{job="comfymgr",instance="bad",gpu_id="0"}}', values: '0x200'}}
      - {{series: 'comfymgr_gpu_up{{job="comfymgr",instance="ok",gpu_id="0"}}', values: '1x200'}}
    promql_expr_test:
      - expr: count(ALERTS{{alertstate="firing"}})
        eval_time: 45s
        exp_samples: []
      - expr: ALERTS{{alertstate="firing"}}
        eval_time: 30m
        exp_samples:
{expected}
"""
EXPECTED_ALERTS = [
    ("ComfymgrDown", "critical", ""),
    ("ComfyUIBackendDown", "critical", 'backend="gpu0",'),
    ("ComfymgrQueueStalled", "warning", ""),
    ("ComfymgrQueueBackingUp", "warning", ""),
    ("ComfyUIJobsFailing", "warning", ""),
    ("GpuHot", "warning", 'gpu_id="0",'),
    ("GpuVramNearlyFull", "warning", 'gpu_id="0",'),
    ("GpuLost", "critical", 'gpu_id="0",'),
]


def test_alert_rules_fire_when_they_should(tmp_path):
    promtool = needs("promtool")
    expected = "\n".join(
        f"          - labels: 'ALERTS{{alertname=\"{name}\",alertstate=\"firing\",{extra}"
        f"instance=\"bad\",job=\"comfymgr\",severity=\"{severity}\"}}'\n            value: 1"
        for name, severity, extra in EXPECTED_ALERTS)
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(RULE_TESTS.format(alerts=CONTRIB / "prometheus" / "alerts.yml",
                                       expected=expected))
    done = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    names = set(re.findall(r"- alert: (\w+)", (CONTRIB / "prometheus" / "alerts.yml").read_text()))
    assert names == {name for name, _, _ in EXPECTED_ALERTS}
