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
prometheus, systemd-analyze, systemd-nspawn) skips its tests; `make
system-deps` installs them all.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

import comfymgr
from conftest import need_tool, workflow
from nginx_helpers import Proc, free_port, start_nginx, wait_until

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


# -- the system packages the suite needs ----------------------------------------

def apt_packages() -> set[str]:
    text = (ROOT / ".ci" / "apt-packages").read_text()
    return {line.split("#")[0].strip() for line in text.splitlines()} - {""}


def test_make_system_deps_and_ci_install_one_list():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^system-deps:.*\n\t\.ci/system-deps$", makefile, re.M)
    assert re.search(r"^\.ci/system-deps$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert "apt-packages" in (ROOT / ".ci" / "system-deps").read_text()


def test_every_tool_the_tests_need_is_in_the_list():
    """Each tool a test asks need_tool() for (and the README walkthrough's
    curl and jq, and make pyz's strip) belongs to a listed package, or to an
    Essential one that every Debian has (util-linux: unshare, nsenter)."""
    dpkg = shutil.which("dpkg-query")
    if dpkg is None:
        pytest.skip("not a Debian/Ubuntu system: no dpkg-query to ask which package has a tool")
    source = "".join(path.read_text() for path in (ROOT / "tests").glob("test_*.py"))
    tools = set(re.findall(r'need_tool\("([\w.-]+)"\)', source)) | {"curl", "jq", "strip"}
    assert {"nginx", "promtool", "systemd-nspawn", "make"} <= tools
    listed = apt_packages()
    for tool in sorted(tools):
        path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
        if path is None:
            continue  # not installed here: nothing tells its package
        owner = subprocess.run([dpkg, "-S", path], capture_output=True, text=True)
        if owner.returncode != 0:  # found through a merged /usr link: ask for the real path
            owner = subprocess.run([dpkg, "-S", os.path.realpath(path)], capture_output=True, text=True)
        package = owner.stdout.split(":")[0]
        essential = subprocess.run([dpkg, "-W", "-f=${Essential}", package],
                                   capture_output=True, text=True).stdout
        assert package in listed or essential == "yes", (tool, path, package)


def test_a_run_ends_with_the_count_of_tests_skipped_for_missing_tools(tmp_path):
    (tmp_path / "test_tools.py").write_text(
        "from conftest import need_tool\n\n"
        "def test_one():\n    need_tool('comfymgr-no-such-tool')\n\n"
        "def test_two():\n    need_tool('comfymgr-no-such-tool')\n\n"
        "def test_three():\n    need_tool('comfymgr-no-such-tool-either')\n\n"
        "def test_there():\n    assert need_tool('sh').endswith('/sh')\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-q", "test_tools.py"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "1 passed, 3 skipped" in lines[-2], done.stdout
    assert lines[-1] == ("3 tests skipped for missing tools (comfymgr-no-such-tool, "
                         "comfymgr-no-such-tool-either): `make system-deps` installs them"), done.stdout


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
        ("/var/log/nginx/comfymgr.access.log ", str(logs / "comfymgr.access.log") + " "),
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


@contextlib.contextmanager
def running_nginx(prefix: Path, upstream_port: int) -> Iterator[Nginx]:
    """A real nginx with contrib/nginx/comfymgr.conf in front of the comfymgr
    on 127.0.0.1:upstream_port; its files in prefix (tests/test_ui.py too)."""
    openssl = need_tool("openssl")
    for sub in ("logs", "tls"):
        (prefix / sub).mkdir()
    cert, key = prefix / "tls" / "cert.pem", prefix / "tls" / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    port = free_port()
    site = render_nginx_conf(listen_port=port, upstream_port=upstream_port,
                             cert=cert, key=key, logs=prefix / "logs")
    proc = start_nginx(prefix, site, port)
    try:
        yield Nginx(f"https://127.0.0.1:{port}", cert, prefix / "logs", f"http://127.0.0.1:{upstream_port}")
    finally:
        proc.stop(signal.SIGQUIT)  # graceful: finish requests, then exit


@pytest.fixture(scope="module")
def nginx(tmp_path_factory, backend):
    with running_nginx(tmp_path_factory.mktemp("nginx"), int(backend.rsplit(":", 1)[1])) as server:
        yield server


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


async def test_access_log_never_holds_a_stream_key_from_the_query(nginx):
    """Stream clients that cannot set headers send the key as ?api_key=: the
    access log shows *** instead, however the parameter is written."""
    source, stream = "127.0.0.9", "/v1/comfyui/stream"
    cases = [  # query sent -> query logged, status
        (f"api_key={KEY}", "api_key=***", 101),
        (f"since=0&api_key={KEY}", "since=0&api_key=***", 101),
        (f"api_key={KEY}&since=0", "api_key=***&since=0", 101),
        (f"API_Key={KEY}&since=0", "API_Key=***&since=0", 401),  # not comfymgr's name, hidden all the same
        (f"api%5Fkey={KEY}", "***", 101),  # comfymgr decodes the name: api_key
        (f"api_key={KEY}&api_key={KEY}", "***", 101),
        (f"since=0&api_key={KEY[:-1]}", "since=0&api_key=***", 401),  # a wrong key is hidden too
        ("since=0", "since=0", 401),
    ]
    async with nginx.session(source) as http:
        for query, _, status in cases:
            url = URL(f"{nginx.url.replace('https', 'wss')}{stream}?{query}", encoded=True)
            if status == 101:
                async with http.ws_connect(url, heartbeat=None) as ws:
                    await ws.send_json({"type": "ping"})
                    while (await ws.receive_json(timeout=10))["type"] != "pong":
                        pass  # since=0 replays the events of earlier tests first
            else:
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(url, heartbeat=None)
                assert refused.value.status == status, query
    log = nginx.logs / "comfymgr.access.log"

    def stream_lines() -> list[str]:  # a WebSocket's line is written when it closes
        return [line for line in log.read_text().splitlines() if line.startswith(source + " ")]

    deadline = time.monotonic() + 10
    while len(stream_lines()) < len(cases) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    lines = stream_lines()
    assert [re.search(r'"GET (\S+) HTTP/1.1" (\d+) ', line).groups() for line in lines] == \
        [(f"{stream}?{logged}", str(status)) for _, logged, status in cases], lines
    assert KEY not in log.read_text() and KEY[:-1] not in log.read_text()


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


# pip's words when it reaches no package index at all.
_NO_NETWORK = re.compile(r"NewConnectionError|Temporary failure in name resolution|"
                         r"Network is unreachable|ConnectTimeoutError|ProxyError")


def make_pyz(checkout: Path, out: Path, env: dict[str, str] | None = None, **variables) -> Path:
    """`make pyz` in `checkout`, building into `out`. Without a network,
    with nothing cached in .cache/ (the wheels, shiv's venv), pip reaches no
    index: the test is skipped, saying so, rather than failed."""
    need_tool("make")
    target = out / "comfymgr.pyz"
    argv = ["make", "--no-print-directory", "pyz", f"PYZ={target}", f"PYZ_BUILD={out / 'build'}",
            *(f"{name}={value}" for name, value in variables.items())]
    done = subprocess.run(argv, cwd=checkout, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        offline = _NO_NETWORK.search(done.stdout + done.stderr)
        if offline:
            pytest.skip(f"building the .pyz needs the network, and its wheels are not cached in "
                        f".cache/wheels (pip: {offline.group(0)})")
        pytest.fail(done.stdout + done.stderr)
    assert os.access(target, os.X_OK)
    return target


@pytest.fixture(scope="session")
def pyz(tmp_path_factory):
    """`make pyz`, built into tmp from the current comfymgr.py (wheels come
    from the .cache/wheels the Makefile keeps)."""
    return make_pyz(ROOT, tmp_path_factory.mktemp("pyz"))


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_checkout(dest: Path) -> Path:
    """What `make pyz` reads, copied to another directory."""
    dest.mkdir(parents=True)
    for name in ("comfymgr.py", "Makefile", "requirements.lock", "pyproject.toml"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "ui", dest / "ui")  # the dashboard's files
    return dest


def test_pyz_is_the_same_bytes_whatever_the_checkout_path(pyz, tmp_path):
    """Built again in a checkout at another path, with its own build venv
    (whose path pip writes into console scripts): byte for byte the same.
    The wheels are this checkout's, so no network is needed."""
    other = copy_checkout(tmp_path / "another" / "checkout")
    again = make_pyz(other, tmp_path / "out", WHEELS=ROOT / ".cache" / "wheels")
    assert sha256(again) == sha256(pyz), (again, pyz)
    # make pyz installed no test tools: pip, shiv and shiv's own dependencies.
    assert not (other / ".venv").exists()
    tools = subprocess.run([other / ".cache" / "pyz-venv" / "bin" / "python", "-m", "pip", "list",
                            "--format=freeze", "--disable-pip-version-check"],
                           capture_output=True, text=True, check=True).stdout
    assert sorted(line.split("==")[0].lower() for line in tools.split()) == \
        ["click", "pip", "setuptools", "shiv"]


def test_pyz_build_without_network_is_skipped_not_failed(tmp_path):
    """No network (a new network namespace) and no cached wheels: the
    deployment tests that need the .pyz skip, naming the reason."""
    unshare = need_tool("unshare")
    if subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("no user and network namespaces here (unshare -rn)")
    other = copy_checkout(tmp_path / "offline-checkout")
    (tmp_path / "bin").mkdir()
    make = tmp_path / "bin" / "make"  # make, run in a namespace with no network
    make.write_text(f"#!/bin/sh\nexec {unshare} -rn {shutil.which('make')} \"$@\"\n")
    make.chmod(0o755)
    # PIP_RETRIES: pip says why at each retry; one is enough, and quick.
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "PIP_RETRIES": "1"}
    with pytest.raises(pytest.skip.Exception) as skipped:
        make_pyz(other, tmp_path / "out", env=env)
    assert "building the .pyz needs the network" in str(skipped.value)


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
        dashboard = {name.split("/", 2)[2]: archive.read(name) for name in archive.namelist()
                     if name.startswith("site-packages/ui/")}
    packages = {t for t in tops if not t.endswith(".dist-info") and t}
    assert packages == {
        "comfymgr.py", "ui", "aiohttp", "aiohappyeyeballs", "aiosignal", "async_timeout", "attr",
        "attrs", "frozenlist", "idna", "multidict", "propcache", "prometheus_client", "pynvml.py",
        "swagger_ui_bundle", "typing_extensions.py", "yarl", "orjson"}, packages
    # The dashboard's files, beside comfymgr.py as it expects them.
    assert dashboard == {p.name: p.read_bytes() for p in (ROOT / "ui").iterdir()}


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
        # The dashboard, served from the files unpacked from the .pyz.
        for path, name in (("/ui", "index.html"), ("/ui/app.js", "app.js"), ("/ui/app.css", "app.css")):
            status, body = http_get(url + path)
            assert (status, body) == (200, (ROOT / "ui" / name).read_bytes()), path
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
    analyze = need_tool("systemd-analyze")
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

# The README's deploy steps as it writes them (test_readme_deploy_steps_are_
# the_tested_ones checks that these lines are there).
README_USERADD = ("useradd --system --user-group --home-dir /var/lib/comfyui --no-create-home "
                  "--shell /usr/sbin/nologin comfyui")
README_COMFYUI_ENV = """\
for gpu in $(nvidia-smi --query-gpu=index --format=csv,noheader); do
  printf 'COMFYUI_GPU=%s\\nCOMFYUI_PORT=%s\\n' "$gpu" $((8180 + gpu)) > /etc/comfyui/$gpu.env
  systemctl enable --now comfyui@$gpu
done
"""
README_BACKENDS = ("cd /etc/comfyui && for f in $(ls | sort -n); do . ./$f; printf '%s' "
                   "\"${sep-}gpu$COMFYUI_GPU=http://127.0.0.1:$COMFYUI_PORT@$COMFYUI_GPU\"; sep=,; done; echo")

# Run inside the container: the deployment as README "Deploy on a GPU box"
# does it, on two GPUs, 0 and 12 (past 9, where ports 818N ran out), then a
# job, an upload that ComfyUI reads back, a download; the watchdog, pinged
# and then starved; a stop.
IN_CONTAINER = r"""
set -eu
# The container has no GPU: a stand-in for the driver's tool lists two.
PATH=/opt/stand-in:$PATH
""" + README_USERADD + r"""
SHIV_ROOT=/tmp/comfymgr-check /usr/bin/python3 /opt/comfymgr/comfymgr.pyz --version && rm -rf /tmp/comfymgr-check
systemctl daemon-reload
install -d -m 0755 /etc/comfyui
""" + README_COMFYUI_ENV + r"""
backends=$(""" + README_BACKENDS + r""")
echo "BACKENDS $backends"
sed -i "s|^COMFYUI_BACKENDS=.*|COMFYUI_BACKENDS=$backends|" /etc/comfymgr/comfymgr.env
# Type=notify: this returns once comfymgr has said READY=1.
systemctl enable --now comfymgr
systemctl show comfymgr -p Type -p NotifyAccess -p WatchdogUSec -p ActiveState
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
        backends = json.loads(call("/v1/status")[1])["backends"]
        if [(b["name"], b["state"]) for b in backends] == [("gpu0", "up"), ("gpu12", "up")]:
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
# The watchdog, with a period short enough to watch: the pings come (their
# time moves on), then a frozen comfymgr (SIGSTOP, as a stuck event loop)
# is killed and started again.
mkdir -p /etc/systemd/system/comfymgr.service.d
printf '[Service]\nWatchdogSec=2s\nTimeoutAbortSec=2s\nRestartSec=1s\n' > /etc/systemd/system/comfymgr.service.d/watchdog.conf
systemctl daemon-reload && systemctl restart comfymgr
first=$(systemctl show comfymgr -p WatchdogTimestampMonotonic --value)
sleep 3
second=$(systemctl show comfymgr -p WatchdogTimestampMonotonic --value)
[ "$second" -gt "$first" ] && echo "WATCHDOG PINGED"
frozen=$(systemctl show comfymgr -p MainPID --value)
kill -STOP "$frozen"
for i in $(seq 100); do
  [ "$(systemctl show comfymgr -p NRestarts --value)" = 1 ] && [ "$(systemctl is-active comfymgr)" = active ] && break
  sleep 0.2
done
now=$(systemctl show comfymgr -p MainPID --value)
[ "$now" != "$frozen" ] && [ "$now" != 0 ] && echo "WATCHDOG RESTARTED"
journalctl --no-pager -u comfymgr | grep -c 'Watchdog timeout'
systemctl stop comfymgr
systemctl show comfymgr -p Result -p ExecMainStatus
systemd-analyze security comfymgr.service comfyui@0.service | grep 'Overall exposure'
"""


def test_systemd_runs_the_units_for_real(pyz, tmp_path):
    """Boot this machine's own OS under systemd-nspawn (read-only, a private
    network, /etc and /opt overlaid), install the units, the env file and
    the .pyz as the README says, and let systemd run them."""
    nspawn, nsenter, unshare = need_tool("systemd-nspawn"), need_tool("nsenter"), need_tool("unshare")
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
    (opt / "stand-in").mkdir()
    (opt / "stand-in" / "nvidia-smi").write_text("#!/bin/sh\n# --query-gpu=index --format=csv,noheader\n"
                                                 "printf '0\\n12\\n'\n")
    (opt / "stand-in" / "nvidia-smi").chmod(0o755)
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
        journal = inside("journalctl --no-pager -u comfymgr -u comfyui@0 -u comfyui@12").stdout
        assert done.returncode == 0, done.stdout + done.stderr + journal
        # One ComfyUI per GPU, each on the port of its /etc/comfyui/N.env, named to comfymgr.
        assert "BACKENDS gpu0=http://127.0.0.1:8180@0,gpu12=http://127.0.0.1:8192@12\n" in done.stdout
        assert "JOBS OK" in done.stdout
        assert "Type=notify\nNotifyAccess=main\nWatchdogUSec=30s\nActiveState=active\n" in done.stdout
        assert "WATCHDOG PINGED\n" in done.stdout and "WATCHDOG RESTARTED\n1\n" in done.stdout, \
            done.stdout + journal
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
    # systemd waits for READY=1 and restarts a comfymgr whose pings stop.
    assert (unit["Type"], unit["NotifyAccess"]) == (["notify"], ["main"])
    assert parse(unit["WatchdogSec"][0]) == 30 and "RestartPreventExitStatus" in unit


def test_comfyui_unit_serves_any_number_of_gpus():
    """Port and GPU come from the instance's own file, not from the instance
    name pasted into a port (818%i ran out at comfyui@10)."""
    unit = unit_settings(CONTRIB / "systemd" / "comfyui@.service")
    assert unit["EnvironmentFile"] == ["/etc/comfyui/%i.env"]  # no "-": a missing file is an error
    argv = unit["ExecStart"][0].split()
    assert argv[argv.index("--port") + 1] == "${COMFYUI_PORT}"
    assert argv[argv.index("--cuda-device") + 1] == "${COMFYUI_GPU}"
    assert unit["ExecStartPre"] == ["-+/usr/bin/nvidia-modprobe -u -c=${COMFYUI_GPU}"]
    assert "818%i" not in (CONTRIB / "systemd" / "comfyui@.service").read_text()


def test_readme_deploy_steps_are_the_tested_ones():
    """The container test runs the README's commands; the unit's own
    comment gives the same ones."""
    readme = (ROOT / "README.md").read_text()
    unit = (CONTRIB / "systemd" / "comfyui@.service").read_text()
    for command in (README_USERADD, README_COMFYUI_ENV, f"({README_BACKENDS})"):
        assert command in readme, command
        assert command in IN_CONTAINER or command.strip("()") in IN_CONTAINER, command
    assert f"#   {README_USERADD}\n" in unit
    assert f"#   ({README_BACKENDS})\n" in unit
    assert README_COMFYUI_ENV.splitlines()[1] in unit
    assert [line for line in readme.splitlines() if "useradd" in line] == [README_USERADD]


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

ALERTS_YML = CONTRIB / "prometheus" / "alerts.yml"
DASHBOARD = CONTRIB / "grafana" / "comfymgr.json"


def alert_exprs() -> dict[str, str]:
    """alertname -> expr of every rule in alerts.yml."""
    text = ALERTS_YML.read_text()
    rules = re.findall(r"- alert: (\w+)\n\s+expr: (\|\n(?:.+\n)+?|.+\n)\s+for:", text)
    assert len(rules) == text.count("- alert:"), "every rule has an expr and a for:"
    return {name: expr.removeprefix("|\n") for name, expr in rules}


def test_promtool_checks_config_and_rules():
    promtool = need_tool("promtool")
    for argv in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        done = subprocess.run([promtool, *argv], cwd=CONTRIB / "prometheus",
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    assert len(alert_exprs()) == 15


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
    prometheus = need_tool("prometheus")
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
        if status == 503 and body.strip() == b"Service Unavailable":
            return []  # still starting: its storage is not ready yet
        assert status == 200, body
        return json.loads(body)["data"]["result"]

    try:
        wait_until(proc, lambda: query('up{job="comfymgr"} == 1'), "no successful scrape", 60)
        assert [r["value"][1] for r in query('comfymgr_backend_up{job="comfymgr"}')] == ["1"]

        def rules() -> list:
            body = http_get(f"{api}/rules")[1]
            return [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]

        assert len(rules()) == len(alert_exprs())
        wait_until(proc, lambda: {r["health"] for r in rules()} == {"ok"}, "rules not all ok", 30)
    finally:
        proc.stop()


def test_alert_rules_fire_when_they_should(tmp_path):
    """contrib/prometheus/alerts_test.yml (promtool's unit tests: a broken
    box, a healthy one, one without GPUs) passes; it tests every alert, once
    firing and (but GpuLost, covered by its 45 s check) once before; and each
    alert, made never to fire, fails it: none is in there untested."""
    promtool = need_tool("promtool")
    done = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=CONTRIB / "prometheus",
                          capture_output=True, text=True)
    assert (done.returncode, done.stdout.split()) == \
        (0, ["Unit", "Testing:", "alerts_test.yml", "SUCCESS"]), done.stdout + done.stderr
    tests = (CONTRIB / "prometheus" / "alerts_test.yml").read_text()
    one = r"- alertname: (\w+)\n\s+eval_time: \S+\n\s+exp_alerts:"
    firing, quiet = set(re.findall(one + r"\n\s+- exp_labels", tests)), set(re.findall(one + r" \[\]", tests))
    exprs = alert_exprs()
    assert firing == set(exprs), set(exprs) - firing
    assert set(exprs) - quiet == {"GpuLost"}, set(exprs) - quiet
    shipped = ALERTS_YML.read_text()
    runs = {}
    for name in exprs:  # all at once: each run takes about a second
        broken = re.sub(rf"(- alert: {name}\n\s+expr: )(?:\|\n(?:.+\n)+?|.+\n)(\s+for:)",
                        r"\1vector(0) == 1\n\2", shipped)
        assert broken != shipped, name
        (tmp_path / name).mkdir()
        (tmp_path / name / "alerts.yml").write_text(broken)
        shutil.copy(CONTRIB / "prometheus" / "alerts_test.yml", tmp_path / name)
        runs[name] = subprocess.Popen([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path / name,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert {name: run.wait(60) for name, run in runs.items()} == dict.fromkeys(exprs, 1), \
        "alerts that alerts_test.yml does not test (0)"


# -- what the dashboard and the alerts may name ---------------------------------

# PromQL's own words (functions, aggregations, keywords) that the dashboard
# and the alerts use; any other word in an expression is a metric name.
_PROMQL_WORDS = {"sum", "min", "max", "count", "rate", "increase", "histogram_quantile", "vector",
                 "and", "or", "unless"}
# Metrics comfymgr exports for operations (disks, NVML, task and dispatch
# failures): the alerts rely on them, so they must be in /metrics like all others.
OPERATIONS_METRICS = {
    "comfymgr_filesystem_free_bytes", "comfymgr_filesystem_size_bytes", "comfymgr_gpu_available",
    "comfymgr_task_failures_total", "comfymgr_dispatch_failures_total",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: what is left once strings,
    label matchers, ranges, grouping clauses, offsets, numbers and
    PromQL's own words are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\boffset\s+\w+", "", expr)
    expr = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", "", expr)
    return set(re.findall(r"[A-Za-z_:][\w:]*", expr)) - _PROMQL_WORDS


def test_promql_metric_names():
    assert promql_metric_names(
        'sum by (job, instance) (increase(a_total{outcome=~"retried|failed"}[15m])) / b > 10e9 '
        'and on (job) c{gpu_id!=""} or vector(0) unless d offset 1h') == {"a_total", "b", "c", "d"}
    assert promql_metric_names('histogram_quantile(0.95, sum by (le) (rate(x_bucket{j="$job"}[$__rate_interval])))'
                               ) == {"x_bucket"}
    assert promql_metric_names("clamp_min(x, 0)") == {"clamp_min", "x"}  # a new function must be listed


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: the panels' targets, and the
    series selectors of its variables' label_values() queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable
        exprs.append(match.group(1))
    return exprs


def grafana_to_promql(expr: str) -> str:
    """A panel's expression as Prometheus gets it, Grafana's variables filled in."""
    return (expr.replace("[$__rate_interval]", "[1m]")
            .replace('=~"$job"', '=~".+"').replace('=~"$instance"', '=~".+"'))


def exported_families(scrape: str) -> dict[str, set[str]]:
    """family -> the series names PromQL sees of it, from a /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name: {family.name + s for s in suffixes.get(family.type, ("",))}
            for family in text_string_to_metric_families(scrape)}


def test_dashboard_is_ready_to_import():
    """contrib/grafana/comfymgr.json: Grafana asks for the Prometheus data
    source on import; every panel uses it and narrows its series to the
    chosen job and boxes; the panels tile the grid."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["__inputs"] == [{
        "name": "DS_PROMETHEUS", "label": "Prometheus", "description": "The Prometheus that scrapes comfymgr",
        "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}]
    assert "id" not in dashboard and dashboard["uid"] == "comfymgr"
    source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    assert [v["datasource"] for v in dashboard["templating"]["list"]] == [source, source]
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "GPUs", "Backends", "Queue", "Jobs", "Errors", "HTTP", "Event stream",
                    "Webhooks", "Disk", "Background tasks"]
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(box["x"], box["x"] + box["w"]) for y in range(box["y"], box["y"] + box["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == source and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
            selectors = re.findall(r"(?<![\w:$])(comfy\w+|up)\b(\{[^}]*\})?", target["expr"])
            assert selectors, panel["title"]
            for name, matchers in selectors:
                assert matchers.startswith('{job=~"$job", instance=~"$instance"'), (panel["title"], name)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_dashboard_and_alert_expressions_parse(tmp_path):
    """promtool checks every expression, as the recording rules of a
    generated rule file (it refuses one that does not parse)."""
    promtool = need_tool("promtool")
    exprs = [grafana_to_promql(e) for e in dashboard_exprs()] + list(alert_exprs().values())
    assert len(exprs) > 50
    rules = "".join(f"      - record: check:expr_{i}\n        expr: {json.dumps(expr.strip())}\n"
                    for i, expr in enumerate(exprs))
    (tmp_path / "rules.yml").write_text("groups:\n  - name: check\n    rules:\n" + rules)
    done = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")],
                          capture_output=True, text=True)
    assert done.returncode == 0 and f"SUCCESS: {len(exprs)} rules found" in done.stdout, \
        done.stdout + done.stderr
    (tmp_path / "bad.yml").write_text("groups:\n  - name: check\n    rules:\n"
                                      "      - record: check:bad\n        expr: sum(rate(x[1m])\n")
    assert subprocess.run([promtool, "check", "rules", str(tmp_path / "bad.yml")],
                          capture_output=True).returncode == 1


async def test_dashboard_and_alerts_name_only_metrics_comfymgr_exports(make_client, make_config, fake,
                                                                      tmp_path):
    """A live /metrics of comfymgr with a backend on GPU 0, two GPUs read
    through a stand-in NVML and every folder configured: each metric the
    dashboard or an alert names is in it (besides Prometheus's own `up`),
    and the dashboard shows every metric it has."""
    from test_bridge import wait_backends_up
    from test_metrics import two_gpus

    for folder in ("output", "temp", "input"):
        (tmp_path / folder).mkdir()
    config = make_config(backends=(comfymgr.BackendSpec("gpu0", fake.url, 0),),
                         outputs_dir=tmp_path / "output", temp_dir=tmp_path / "temp",
                         inputs_dir=tmp_path / "input")
    client = await make_client(config, nvml=two_gpus())
    await wait_backends_up(client)
    await client.app[comfymgr.GPUS].poll()
    resp = await client.get("/metrics")
    assert resp.status == 200
    families = exported_families(await resp.text())
    exported = set().union(*families.values())
    assert OPERATIONS_METRICS - exported == set()
    by_dashboard = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    by_alerts = set().union(*(promql_metric_names(e) for e in alert_exprs().values()))
    assert (by_dashboard - exported, by_alerts - exported) == ({"up"}, {"up"})
    unshown = {name for name, series in families.items() if not series & by_dashboard}
    assert unshown == set(), f"metrics the dashboard does not show: {unshown}"
