"""The dashboard (GET /ui): how its files are served, then the page itself in
a real headless Chromium, driven over the DevTools protocol (CDP) from the
test's own event loop, so the browser, comfymgr and the fake ComfyUI all run
at once: clicks and typing are real input events, files go through the file
input, and every console message and network request of the page is seen.

The browser tests skip when Chromium is not installed (`make system-deps`
and CI install Debian's chromium). COMFYMGR_UI_SCREENSHOT=<dir> keeps their
screenshots.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import functools
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from test_deploy import running_nginx
from test_metrics import FakeNVML
from yarl import URL

import comfymgr
from conftest import API_KEY, HEADERS, need_tool, workflow
from fake_comfyui import FakeComfyUI

UI_DIR = Path(comfymgr.__file__).resolve().parent / "ui"
FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
         "app.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
WAIT = 20.0  # ceiling for a state the page should reach; normally well under a second


def csp(host: str | None) -> str:
    sockets = f" ws://{host} wss://{host}" if host else ""
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
            f"connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


def page_headers(host: str | None) -> dict[str, str]:
    return {"Content-Security-Policy": csp(host), "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cross-Origin-Opener-Policy": "same-origin", "Cache-Control": "no-cache"}


def envelope(error, message, status, details=None):
    return {"error": error, "message": message, "statusCode": status, "details": details or {}}


###############################################################################
# serving
###############################################################################

@pytest.mark.parametrize("path, name", [("/ui", "index.html"), *[(f"/ui/{n}", n) for n in FILES]])
async def test_the_page_and_its_files_need_no_key_and_carry_the_policy(make_client, path, name):
    client = await make_client()
    resp = await client.get(path)
    host = f"127.0.0.1:{client.port}"
    assert resp.status == 200
    assert resp.headers["Content-Type"] == FILES[name]
    assert {k: resp.headers[k] for k in page_headers(host)} == page_headers(host)
    assert await resp.read() == (UI_DIR / name).read_bytes()
    assert re.fullmatch(r'"[0-9a-f]{20}"', resp.headers["ETag"])


async def test_head_and_a_matching_etag_send_no_body(make_client):
    client = await make_client()
    full = await client.get("/ui/app.js")
    etag = full.headers["ETag"]
    head = await client.head("/ui/app.js")
    assert head.status == 200 and await head.read() == b""
    assert head.headers["ETag"] == etag
    assert head.headers["Content-Security-Policy"] == full.headers["Content-Security-Policy"]
    for given in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        resp = await client.get("/ui/app.js", headers={"If-None-Match": given})
        assert resp.status == 304, given
        assert await resp.read() == b""
        assert resp.headers["ETag"] == etag
        assert resp.headers["X-Frame-Options"] == "DENY"
    resp = await client.get("/ui/app.js", headers={"If-None-Match": '"other"'})
    assert resp.status == 200


@pytest.mark.parametrize("raw, name", [
    ("/ui/nope.js", "nope.js"),
    ("/ui/index.htm", "index.htm"),
    ("/ui/.app.js", ".app.js"),
    ("/ui/%2e%2e", ".."),
    ("/ui/..%2fcomfymgr.py", "../comfymgr.py"),
    ("/ui/..%2f..%2fpyproject.toml", "../../pyproject.toml"),
    ("/ui/%2e%2e%2fcomfymgr.py", "../comfymgr.py"),
    ("/ui/app.js%00", "app.js\x00"),
])
async def test_only_the_page_files_are_served(make_client, raw, name):
    client = await make_client()
    resp = await client.get(URL(raw, encoded=True))
    assert resp.status == 404
    body = await resp.json()
    assert body == envelope("not_found", f"no dashboard file {name!r}", 404,
                            {"path": URL(raw, encoded=True).path})


async def test_paths_below_the_page_are_no_route_and_need_the_key(make_client):
    client = await make_client()
    for path in ("/ui/a/app.js", "/ui/../comfymgr.py"):
        resp = await client.get(URL(path, encoded=True))
        assert resp.status == 401, path
    resp = await client.get(URL("/ui/a/app.js", encoded=True), headers=HEADERS)
    assert resp.status == 404


async def test_a_trailing_slash_redirects_to_the_page(make_client):
    client = await make_client()
    resp = await client.get("/ui/", allow_redirects=False)
    assert resp.status == 301
    assert resp.headers["Location"] == "/ui"


@pytest.mark.parametrize("host, named", [
    ("gpu1.example.com", "gpu1.example.com"),
    ("gpu1.example.com:8443", "gpu1.example.com:8443"),
    ("[::1]:9090", "[::1]:9090"),
    ("10.0.0.5", "10.0.0.5"),
    ("evil.example; script-src *", None),
    ("a b", None),
    ("host:port", None),
    ("", None),
])
async def test_the_policy_names_the_host_for_websockets_only_when_it_is_one(make_client, host, named):
    client = await make_client()
    resp = await client.get("/ui", headers={"Host": host})
    assert resp.status == 200
    assert resp.headers["Content-Security-Policy"] == csp(named)


async def test_without_its_files_the_page_is_a_clear_404(make_client, monkeypatch, tmp_path):
    monkeypatch.setattr(comfymgr, "_UI_DIR", tmp_path / "missing")
    client = await make_client()
    for path in ("/ui", "/ui/app.js"):
        resp = await client.get(path)
        assert resp.status == 404
        assert await resp.json() == envelope(
            "not_found", "the dashboard is not installed: its ui/ folder is not beside comfymgr.py",
            404, {"path": path})


async def test_ui_routes_are_rate_limited_like_the_docs(make_client, make_config, clock):
    client = await make_client(make_config(rate_limit=2), clock=clock)
    assert [(await client.get(p)).status for p in ("/ui", "/ui/app.js", "/ui/app.css")] == [200, 200, 429]


def test_the_page_refers_only_to_its_own_files_and_has_no_inline_code():
    html = (UI_DIR / "index.html").read_text()
    refs = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    assert sorted(refs) == ["/ui/app.css", "/ui/app.js", "/ui/favicon.svg"]
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/ui/app.js" defer>']
    assert not re.search(r"\son[a-z]+\s*=", html, re.I)  # no inline handlers
    assert not re.search(r"\sstyle\s*=", html, re.I)  # no inline style (CSP refuses it)
    assert "<style" not in html
    js = (UI_DIR / "app.js").read_text()
    # Data goes in as text: nothing in the script parses strings as HTML or code.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "setTimeout(\"", "createContextualFragment", "javascript:"):
        assert sink not in js, sink
    assert "http://" not in js and "https://" not in js  # no other origin


###############################################################################
# a headless Chromium over the DevTools protocol
###############################################################################

class CdpError(Exception):
    pass


class Browser:
    """One headless Chromium with a fresh profile, and one page (tab) in it.

    It records what the page reports: console errors and uncaught exceptions
    (`errors`), every URL it requests, WebSocket ones included (`requests`),
    every URL its main frame navigates to (`navigations`)."""

    def __init__(self, profile: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.profile = profile
        self.extra_args = extra_args
        self.proc: asyncio.subprocess.Process | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.session_id: str | None = None
        self._ids = 0
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.navigations: list[str] = []
        self.responses: dict[str, dict[str, str]] = {}

    async def __aenter__(self) -> Browser:
        binary = need_tool("chromium")
        self.profile.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-default-browser-check", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-extensions",
                "--disable-default-apps", "--hide-scrollbars", "--mute-audio",
                f"--user-data-dir={self.profile}", "--remote-debugging-port=0", *self.extra_args,
                "about:blank"]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        with open(self.profile.parent / f"{self.profile.name}.log", "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        for _ in range(600):
            if port_file.exists() and len(port_file.read_text().split()) == 2:
                break
            if self.proc.returncode is not None:
                raise CdpError(f"chromium exited with {self.proc.returncode}; see {log.name}")
            await asyncio.sleep(0.05)
        else:
            raise CdpError("chromium did not open its DevTools port within 30 s")
        port, path = port_file.read_text().split()
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        target = await self.send("Target.createTarget", {"url": "about:blank"}, browser=True)
        attached = await self.send("Target.attachToTarget",
                                   {"targetId": target["targetId"], "flatten": True}, browser=True)
        self.session_id = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            await self.send(f"{domain}.enable")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send("Browser.close", browser=True), 5)
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.http is not None:
            await self.http.close()
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    async def send(self, method: str, params: dict | None = None, *, browser: bool = False) -> dict:
        self._ids += 1
        message: dict[str, Any] = {"id": self._ids, "method": method, "params": params or {}}
        if not browser:
            message["sessionId"] = self.session_id
        future = asyncio.get_running_loop().create_future()
        self._waiting[self._ids] = future
        await self.ws.send_str(json.dumps(message))
        return await asyncio.wait_for(future, WAIT)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            message = json.loads(msg.data)
            if "id" in message:
                future = self._waiting.pop(message["id"], None)
                if future is not None and not future.done():
                    if "error" in message:
                        future.set_exception(CdpError(f"{message['error']}"))
                    else:
                        future.set_result(message.get("result", {}))
            else:
                self._on_event(message.get("method", ""), message.get("params", {}))

    def _on_event(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                      for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append("exception: " + details.get("exception", {}).get("description", details["text"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.errors.append(f"log ({entry['source']}): {entry['text']} {entry.get('url', '')}")
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.webSocketCreated":
            self.requests.append(params["url"])
        elif method == "Network.responseReceived":
            response = params["response"]
            self.responses[response["url"]] = {k.lower(): v for k, v in response["headers"].items()}
        elif method == "Page.frameNavigated" and "parentId" not in params["frame"]:
            self.navigations.append(params["frame"]["url"])

    # -- the page -------------------------------------------------------------------

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CdpError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = WAIT) -> Any:
        """Polls a JavaScript expression until it is truthy; returns its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        value = None
        while loop.time() < deadline:
            try:
                value = await self.evaluate(expression)
            except CdpError as exc:  # e.g. a page still loading: not there yet
                value = exc
            if value and not isinstance(value, CdpError):
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"the page did not show {what} within {timeout} s (last: {value!r}); "
                             f"console errors: {self.errors}")

    async def open(self, url: str, width: int = 1280, height: int = 900, mobile: bool = False) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 2 if mobile else 1, "mobile": mobile})
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete'", "a loaded document")

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (scrolled into view)."""
        x, y = await self.evaluate(f"""(() => {{
            const el = document.querySelector({json.dumps(selector)});
            el.scrollIntoView({{block: "center"}});
            const r = el.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()""")
        await self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent",
                            {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    async def type(self, selector: str, text: str) -> None:
        await self.click(selector)
        await self.send("Input.insertText", {"text": text})

    async def choose_file(self, selector: str, path: Path) -> None:
        root = await self.send("DOM.getDocument", {"depth": 0})
        node = await self.send("DOM.querySelector", {"nodeId": root["root"]["nodeId"], "selector": selector})
        await self.send("DOM.setFileInputFiles", {"files": [str(path)], "nodeId": node["nodeId"]})

    async def screenshot(self, path: Path) -> bytes:
        """The whole page as PNG, saved to path (and to $COMFYMGR_UI_SCREENSHOT/<name>)."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        shot = await self.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        data = base64.b64decode(shot["data"])
        path.write_bytes(data)
        keep = os.environ.get("COMFYMGR_UI_SCREENSHOT")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / path.name).write_bytes(data)
        return data

    def foreign_requests(self, origin: str) -> list[str]:
        """Requests to anything but the page's own origin (blob: URLs are its own)."""
        allowed = (origin + "/", origin.replace("http", "ws", 1) + "/", f"blob:{origin}/")
        return [u for u in self.requests if not u.startswith(allowed) and u != "about:blank"]


# -- helpers for the scenarios ----------------------------------------------------------

async def sign_in(browser: Browser, key: str = API_KEY) -> None:
    await browser.wait_for("!document.getElementById('login').hidden", "the key form")
    await browser.type("#key", key)
    await browser.click("#key-form button")
    await browser.wait_for("!document.getElementById('dash').hidden", "the dashboard")
    await browser.wait_for("document.getElementById('conn').dataset.state === 'live'", "a live stream")


async def submit_file(browser: Browser, path: Path, priority: str = "normal") -> str:
    await browser.choose_file("#file", path)
    await browser.wait_for("!document.getElementById('submit').disabled", "an enabled Submit")
    await browser.evaluate(f"document.getElementById('priority').value = {json.dumps(priority)}")
    await browser.click("#submit")
    message = await browser.wait_for(
        "(m => m.startsWith('Queued') && m)(document.getElementById('submit-message').textContent)",
        "the queued message")
    return re.match(r"Queued ([0-9a-f-]{36}) ", message).group(1)


async def select(browser: Browser, selector: str, value: str) -> None:
    """Picks an option of a <select> as a user's choice would: value, then change."""
    await browser.evaluate(f"""(s => {{ s.value = {json.dumps(value)};
        s.dispatchEvent(new Event('change', {{bubbles: true}})); }})(document.querySelector({json.dumps(selector)}))""")


def item(section: str, job_id: str) -> str:
    """A JavaScript expression for the page's element of a job in a section."""
    return f"document.querySelector('#{section} [data-id=\"{job_id}\"]')"


async def api_submit(client, graph: dict, **fields) -> dict:
    resp = await client.post("/v1/comfyui/workflow", json={"workflow": graph, **fields}, headers=HEADERS)
    body = await resp.json()
    assert resp.status == 202, body
    return body


async def api_job(client, job_id: str) -> dict:
    resp = await client.get(f"/v1/comfyui/workflow/{job_id}", headers=HEADERS)
    assert resp.status == 200
    return await resp.json()


async def wait_api(client, job_id: str, predicate, what: str, timeout: float = WAIT) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        job = await api_job(client, job_id)
        if predicate(job):
            return job
        await asyncio.sleep(0.02)
    raise AssertionError(f"{job_id} did not become {what}: {job}")


async def wait_backends_up(client, count: int = 1) -> None:
    for _ in range(int(WAIT / 0.02)):
        status = await (await client.get("/v1/status", headers=HEADERS)).json()
        if sum(b["state"] == "up" for b in status["backends"]) == count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"backends not up: {status['backends']}")


def gated_graph(tag: str, *, color: int = 0x3366CC, inverts: int = 1, blurs: int = 1) -> dict:
    """EmptyImage, some ImageInverts, ImageBlurs (gate them to hold the job)
    and a SaveImage: progress stops part way while the first blur waits."""
    graph: dict[str, Any] = {"1": {"class_type": "EmptyImage", "inputs": {
        "width": 96, "height": 96, "batch_size": 1, "color": color}}}
    last = "1"
    for i in range(inverts):
        graph[str(2 + i)] = {"class_type": "ImageInvert", "inputs": {"image": [last, 0]}}
        last = str(2 + i)
    for i in range(blurs):
        graph[str(10 + i)] = {"class_type": "ImageBlur", "inputs": {
            "image": [last, 0], "blur_radius": 3, "sigma": 1.0 + i}}
        last = str(10 + i)
    graph["99"] = {"class_type": "SaveImage", "inputs": {"images": [last, 0], "filename_prefix": f"ui_{tag}"}}
    return graph


def simple_graph(tag: str, color: int = 0xCC3333) -> dict:
    graph = copy.deepcopy(workflow("simple"))
    graph["1"]["inputs"]["color"] = color
    graph["2"]["inputs"]["filename_prefix"] = f"ui_{tag}"
    return graph


# Records every value each running job's progress bar shows, as it changes.
WATCH_PROGRESS = """
window.__seen = {};
new MutationObserver((records) => {
  for (const r of records) {
    const bar = r.target;
    if (!bar.matches || !bar.matches('#running [role=progressbar]')) continue;
    const id = bar.closest('[data-id]').dataset.id;
    (window.__seen[id] = window.__seen[id] || []).push(Number(bar.getAttribute('aria-valuenow')));
  }
}).observe(document.getElementById('running'),
           {subtree: true, attributes: true, attributeFilter: ['aria-valuenow']});
true
"""


@pytest.fixture
def ui_config(make_config, tmp_path):
    def make(comfyui_url: str, **overrides):
        values = dict(comfyui_url=comfyui_url, outputs_dir=tmp_path / "comfy" / "output",
                      progress_interval=0.0, reconcile_interval=0.2, backend_timeout=2.0)
        values.update(overrides)
        return make_config(**values)
    return make


###############################################################################
# the page in a browser
###############################################################################

async def test_the_dashboard_runs_a_workflow_from_the_form_to_its_thumbnail(
        make_client, ui_config, fake, tmp_path):
    gate = fake.gate("ImageBlur")
    fake.progress_steps["ImageBlur"] = 4
    fake.preview_nodes.add("ImageBlur")  # 8x8 PNG previews with each progress tick
    client = await make_client(ui_config(fake.url))
    await wait_backends_up(client)
    origin = str(client.make_url("")).rstrip("/")
    graph_file = tmp_path / "blur.json"
    graph_file.write_text(json.dumps(gated_graph("first", inverts=3)))
    async with Browser(tmp_path / "chromium") as browser:
        await browser.open(origin + "/ui")
        await sign_in(browser)
        assert await browser.evaluate("sessionStorage.getItem('comfymgr.apiKey')") == API_KEY
        await browser.wait_for("document.querySelector('#backends [data-name=local]')?.dataset.state === 'up'",
                               "the backend up")
        await browser.evaluate(WATCH_PROGRESS)

        # Submitted through the form; it runs, held at the blur.
        first = await submit_file(browser, graph_file, "high")
        bar = f"{item('running', first)}?.querySelector('[role=progressbar]')"
        held = await browser.wait_for(f"(v => v > 0 && v < 100 && v)(Number({bar}?.getAttribute('aria-valuenow')))",
                                      "a running job part way")
        assert held == pytest.approx(100 * (1 + 3 + 1) / 6, abs=0.1)  # 5 of 6 nodes done
        running_card = await browser.evaluate(f"""(c => ({{
            node: c.querySelector('[data-f=node]').textContent,
            backend: c.querySelector('[data-f=backend]').textContent,
            priority: c.querySelector('[data-f=priority]').textContent,
            elapsed: c.querySelector('[data-f=elapsed]').textContent}}))({item('running', first)})""")
        assert running_card["node"] == "node 10" and running_card["backend"] == "local · by admin"
        assert running_card["priority"] == "high" and re.fullmatch(r"\d+s", running_card["elapsed"])
        await browser.wait_for(f"document.querySelector('#backends [data-name=local] [data-f=job]')"
                               f".textContent === '{first}'", "the backend's running job")
        # The sampler-like node sent previews: the running card shows the latest one.
        await browser.wait_for(f"(i => i && i.src.startsWith('blob:') && i.naturalWidth === 8)"
                               f"({item('running', first)}?.querySelector('[data-f=preview-img]'))",
                               "the live preview of the running job")
        assert not await browser.evaluate(
            f"{item('running', first)}.querySelector('[data-f=preview]').hidden")

        # Two more: one is handed to ComfyUI at once (prefetch), one waits in the queue.
        second = (await api_submit(client, simple_graph("second", 0x33CC66)))["workflowId"]
        third = (await api_submit(client, simple_graph("third"), priority="low"))["workflowId"]
        await wait_api(client, second, lambda j: j["state"] == "submitted", "submitted")
        await browser.wait_for(f"{item('queue', third)}?.querySelector('[data-f=position]').textContent === '#1'",
                               "the low job at #1")
        assert await browser.evaluate(f"{item('queue', second)}.querySelector('[data-f=position]').textContent") \
            == "starting"
        assert await browser.evaluate(
            "[...document.querySelectorAll('#queue .prio')].map(g => g.dataset.priority)") == ["normal", "low"]
        assert re.fullmatch(r"waiting \d+s", await browser.evaluate(
            f"{item('queue', third)}.querySelector('[data-f=age]').textContent"))

        # Cancel the waiting one with its button: a first click arms it, the second cancels.
        cancel = f"#queue [data-id=\"{third}\"] [data-f=cancel]"
        await browser.click(cancel)
        assert await browser.evaluate(f"document.querySelector({json.dumps(cancel)}).textContent") \
            == "Confirm cancel"
        assert (await api_job(client, third))["status"] == "queued"
        await browser.click(cancel)
        job = await wait_api(client, third, lambda j: j["status"] == "cancelled", "cancelled")
        assert job["error"] == {"code": "cancelled", "message": "cancelled by request"}
        await browser.wait_for(f"{item('queue', third)} === null", "the cancelled job gone from the queue")
        await select(browser, "#problems-filter", "cancelled")
        await browser.wait_for(f"{item('problems', third)}?.dataset.status === 'cancelled'",
                               "the cancelled job among the cancelled ones")
        await select(browser, "#problems-filter", "failed")
        assert job["promptId"] is None  # it never reached ComfyUI

        # Let it finish: the bar reaches 100, the output shows as a thumbnail.
        gate.set()
        await wait_api(client, first, lambda j: j["status"] == "completed", "completed")
        thumb = f"{item('done', first)}?.querySelector('.thumbs img')"
        await browser.wait_for(f"(i => i && i.src.startsWith('blob:') && i.complete && i.naturalWidth === 96)"
                               f"({thumb})", "the first job's thumbnail")
        seen = await browser.evaluate(f"window.__seen[{json.dumps(first)}]")
        assert seen[-1] == 100 and seen == sorted(seen) and held in seen, seen
        recent = await browser.evaluate(f"""(c => ({{
            status: c.dataset.status, alt: c.querySelector('.thumbs img').alt,
            images: c.querySelectorAll('img').length,
            opens: c.querySelector('.thumbs a').href === c.querySelector('.thumbs img').src}}))({item('done', first)})""")
        job = await api_job(client, first)
        assert recent == {"status": "completed", "alt": job["outputs"][0]["filename"], "images": 1, "opens": True}
        await browser.wait_for(f"{item('done', second)}?.dataset.status === 'completed'", "the second done")
        await browser.wait_for(f"{item('running', first)} === null", "the running list emptied")

        # A failure shows its code and message, as text even when it looks like HTML.
        fake.fail_node["ImageInvert"] = ("RuntimeError", "<img src=x id=injected> broke")
        failed = (await api_submit(client, workflow("chain")))["workflowId"]
        await wait_api(client, failed, lambda j: j["status"] == "failed", "failed")
        await browser.wait_for(f"{item('problems', failed)}?.dataset.status === 'failed'", "the failed job")
        shown = await browser.evaluate(f"""(c => [c.querySelector('[data-f=error-code]').textContent,
            c.querySelector('[data-f=error-message]').textContent])({item('problems', failed)})""")
        error = (await api_job(client, failed))["error"]
        assert shown == [error["code"], error["message"]] and "<img src=x id=injected>" in shown[1]
        assert await browser.evaluate("document.getElementById('injected')") is None

        await browser.screenshot(tmp_path / "dashboard.png")

        # The ComfyUI goes away: its card says so at the next status read.
        await fake.stop()
        await browser.wait_for("document.querySelector('#backends [data-name=local]').dataset.state === 'down'",
                               "the backend down")
        assert await browser.evaluate(
            "document.querySelector('#backends [data-name=local] [data-f=state]').textContent") == "down"

        assert browser.errors == []
        assert browser.foreign_requests(origin) == []
        # The key travels in headers, and on the stream URL only (browsers
        # cannot set headers on a WebSocket); never in a page's address.
        with_key = [u for u in browser.requests if API_KEY in u]
        assert with_key and all(u.startswith(origin.replace("http", "ws") + "/v1/comfyui/stream?api_key=")
                                for u in with_key), with_key
        assert browser.navigations == [origin + "/ui"]
    assert (tmp_path / "dashboard.png").read_bytes().startswith(b"\x89PNG")


async def test_the_submit_form_explains_what_it_cannot_run(make_client, ui_config, fake, tmp_path):
    client = await make_client(ui_config(fake.url))
    origin = str(client.make_url("")).rstrip("/")
    files = {
        "ui-format.json": json.dumps({"last_node_id": 2, "nodes": [{"id": 1, "type": "EmptyImage"}],
                                      "links": [], "version": 0.4}),
        "not-json.json": "{nope",
        "list.json": "[1, 2]",
        "half.json": json.dumps({"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"inputs": {}}}),
        "unknown-node.json": json.dumps({"1": {"class_type": "NoSuchNode", "inputs": {}}}),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    message = "document.getElementById('submit-message')"
    async with Browser(tmp_path / "chromium") as browser:
        await browser.open(origin + "/ui")
        await sign_in(browser)
        expected = {
            "ui-format.json": "This file is a workflow in ComfyUI's UI format (it has \"nodes\" and "
                              "\"links\"), which only ComfyUI's editor reads. In ComfyUI, use Workflow → "
                              "Export (API) and submit that file.",
            "not-json.json": "not-json.json is not a JSON file.",
            "list.json": "This file is not an API-format workflow: expected a JSON object of nodes.",
            "half.json": "Node 2 has no class_type and inputs: this is not an API-format workflow "
                         "(in ComfyUI: Workflow → Export (API)).",
        }
        for name, text in expected.items():
            await browser.choose_file("#file", tmp_path / name)
            await browser.wait_for(f"{message}.textContent === {json.dumps(text)}", f"the advice for {name}")
            assert await browser.evaluate(f"{message}.className") == "message error"
            assert await browser.evaluate("document.getElementById('submit').disabled") is True
        # One comfymgr refuses: its error code and message, and each node's error.
        await browser.choose_file("#file", tmp_path / "unknown-node.json")
        await browser.wait_for("!document.getElementById('submit').disabled", "an enabled Submit")
        await browser.click("#submit")
        resp = await client.post("/v1/comfyui/workflow", headers=HEADERS,
                                 json={"workflow": json.loads(files["unknown-node.json"])})
        refused = await resp.json()
        assert resp.status == 400
        await browser.wait_for(f"{message}.textContent.startsWith({json.dumps(refused['error'] + ': ')})",
                               "comfymgr's refusal")
        assert await browser.evaluate(f"{message}.firstChild.textContent") == \
            f"{refused['error']}: {refused['message']}"
        # Refused before it was queued: no job came of either attempt.
        listed = await (await client.get("/v1/comfyui/workflows", headers=HEADERS)).json()
        assert listed["workflows"] == []
        # A 400 answer is logged by the browser as a failed load; nothing else is.
        assert [e for e in browser.errors if "status of 400" not in e] == []
        assert browser.foreign_requests(origin) == []


async def test_a_wrong_key_is_refused_and_forget_key_signs_out(make_client, ui_config, fake, tmp_path):
    client = await make_client(ui_config(fake.url))
    origin = str(client.make_url("")).rstrip("/")
    async with Browser(tmp_path / "chromium") as browser:
        await browser.open(origin + "/ui")
        await browser.wait_for("!document.getElementById('login').hidden", "the key form")
        await browser.type("#key", "not-the-key")
        await browser.click("#key-form button")
        await browser.wait_for("document.getElementById('key-message').textContent === "
                               "'The API key was not accepted. Enter it again.'", "the refusal")
        assert await browser.evaluate("sessionStorage.getItem('comfymgr.apiKey')") is None
        assert await browser.evaluate("document.getElementById('dash').hidden") is True
        await browser.evaluate("document.getElementById('key').value = ''")
        await sign_in(browser)
        await browser.click("#forget")
        await browser.wait_for("!document.getElementById('login').hidden", "the key form again")
        assert await browser.evaluate("sessionStorage.getItem('comfymgr.apiKey')") is None
        assert await browser.evaluate("document.getElementById('conn').dataset.state") == "off"
        # A reload of a signed-in tab needs no key again; a new tab would.
        await sign_in(browser)
        await browser.send("Page.reload")
        await browser.wait_for("document.getElementById('conn').dataset.state === 'live'",
                               "live again after a reload")
        assert [e for e in browser.errors if "status of 401" not in e] == []
        assert len(browser.errors) == 1  # the one refused /v1/status


async def test_a_client_key_sees_its_own_jobs_and_nothing_of_the_box(make_client, ui_config, fake, tmp_path):
    client_key = "alice-key-0123456789"
    client = await make_client(ui_config(fake.url, client_keys=(("alice", client_key),)))
    await wait_backends_up(client)
    origin = str(client.make_url("")).rstrip("/")
    theirs = (await api_submit(client, simple_graph("admin")))["workflowId"]
    resp = await client.post("/v1/comfyui/workflow", headers={"X-API-Key": client_key},
                             json={"workflow": simple_graph("alice", 0x22AA88)})
    assert resp.status == 202
    mine = (await resp.json())["workflowId"]
    async with Browser(tmp_path / "chromium") as browser:
        await browser.open(origin + "/ui")
        await sign_in(browser, client_key)
        await browser.wait_for(f"(i => i && i.complete && i.naturalWidth === 64)"
                               f"({item('done', mine)}?.querySelector('.thumbs img'))", "alice's thumbnail")
        assert await browser.evaluate("[...document.querySelectorAll('#done [data-id]')].map(e => e.dataset.id)") \
            == [mine]
        assert await browser.evaluate(f"{item('done', theirs)}") is None
        assert await browser.evaluate("document.getElementById('backends').textContent") == \
            'Signed in with the client key "alice": its own jobs are shown, not the backends and GPUs.'
        when = await browser.evaluate(f"{item('done', mine)}.querySelector('[data-f=when]').textContent")
        assert re.fullmatch(r"completed \d+s ago after \d+s", when)  # no "by": not told to client keys
        assert browser.errors == []


async def test_the_stream_resumes_after_a_reconnect(make_client, ui_config, fake, tmp_path):
    client = await make_client(ui_config(fake.url))
    await wait_backends_up(client)
    origin = str(client.make_url("")).rstrip("/")
    async with Browser(tmp_path / "chromium") as browser:
        await browser.open(origin + "/ui")
        await sign_in(browser)
        before = await api_submit(client, simple_graph("before"))
        await browser.wait_for(f"{item('done', before['workflowId'])}?.dataset.status === 'completed'",
                               "the first job")
        # The server drops every stream client: the page reconnects with since.
        await client.app[comfymgr.HUB].close_all()
        await browser.wait_for("document.getElementById('conn').dataset.state === 'down'", "the stream lost")
        await browser.wait_for("document.getElementById('conn').dataset.state === 'live'", "the stream back")
        streams = [u for u in browser.requests if "/v1/comfyui/stream" in u]
        assert len(streams) == 2
        since = int(re.search(r"[?&]since=(\d+)", streams[1]).group(1))
        events = [e for e in await client.app[comfymgr.DB].read(lambda s: s.events_since(0, limit=100))]
        assert since == max(e.seq for e in events)  # the last one it had seen
        after = await api_submit(client, simple_graph("after"))
        await browser.wait_for(f"{item('done', after['workflowId'])}?.dataset.status === 'completed'",
                               "the job after the reconnect")
        assert browser.errors == []


def spki_sha256(cert: Path) -> str:
    """The base64 SHA-256 of a certificate's public key, as Chromium pins it."""
    run = functools.partial(subprocess.run, check=True, capture_output=True)
    key = run(["openssl", "x509", "-pubkey", "-noout", "-in", str(cert)]).stdout
    der = run(["openssl", "pkey", "-pubin", "-outform", "der"], input=key).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


async def test_the_dashboard_works_behind_the_shipped_nginx(make_client, ui_config, fake, tmp_path):
    """contrib/nginx/comfymgr.conf as shipped (test_deploy changes only ports
    and paths): the page, its API calls and the stream over TLS (wss)."""
    client = await make_client(ui_config(fake.url, trusted_proxies=comfymgr._parse_networks("127.0.0.1")))
    await wait_backends_up(client)
    graph_file = tmp_path / "simple.json"
    graph_file.write_text(json.dumps(simple_graph("nginx", 0x8844CC)))
    (tmp_path / "nginx").mkdir()
    with running_nginx(tmp_path / "nginx", client.port) as nginx:
        # Chromium trusts the test certificate by its key, and nothing else.
        async with Browser(tmp_path / "chromium",
                           (f"--ignore-certificate-errors-spki-list={spki_sha256(nginx.cert)}",)) as browser:
            await browser.open(nginx.url + "/ui")
            await sign_in(browser)
            job_id = await submit_file(browser, graph_file)
            await browser.wait_for(f"(i => i && i.src.startsWith('blob:') && i.complete && i.naturalWidth === 64)"
                                   f"({item('done', job_id)}?.querySelector('.thumbs img'))", "the thumbnail")
            assert (await api_job(client, job_id))["status"] == "completed"
            streams = [u for u in browser.requests if "/v1/comfyui/stream" in u]
            assert streams and all(u.startswith(nginx.url.replace("https", "wss") + "/v1/comfyui/stream?")
                                   for u in streams)
            page = browser.responses[nginx.url + "/ui"]
            # nginx passes comfymgr's headers on, and adds HSTS. Host reaches
            # comfymgr without the port ($host): 'self' is what allows wss.
            assert page["content-security-policy"] == csp("127.0.0.1")
            assert (page["x-frame-options"], page["strict-transport-security"]) == ("DENY", "max-age=63072000")
            assert browser.errors == []
            assert browser.foreign_requests(nginx.url) == []
    # The stream's URL carried the key; nginx's access log hides it.
    log = (tmp_path / "nginx" / "logs" / "comfymgr.access.log").read_text()
    assert re.search(r'"GET /v1/comfyui/stream\?api_key=\*\*\*&since=\d+ HTTP/1.1" 101 ', log), log
    assert '"GET /ui HTTP/1.1" 200 ' in log and API_KEY not in log


# -- a busy box: two backends on two GPUs --------------------------------------------------

def two_gpus() -> FakeNVML:
    return FakeNVML([
        {"name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-a", "util": 97, "used": 17 * 2**30 + 2**29,
         "total": 24 * 2**30, "temp": 71, "power_mw": 402_000},
        {"name": "NVIDIA L40S", "uuid": "GPU-b", "util": 64, "used": 30 * 2**30, "total": 48 * 2**30,
         "temp": 58, "power_mw": 251_000},
    ])


@pytest.fixture
async def busy(make_client, ui_config, tmp_path):
    """comfymgr with backends a (GPU 0) and b (GPU 1), each a fake ComfyUI
    holding a job part way; jobs queued at each priority; jobs completed
    with their images; one failed."""
    out = tmp_path / "comfy" / "output"
    fakes = [FakeComfyUI(output_dir=out) for _ in range(2)]
    for f in fakes:
        await f.start()
    try:
        gates = [f.gate("ImageBlur") for f in fakes]
        for f in fakes:
            f.progress_steps["ImageBlur"] = 4  # a blur reports its steps, as a sampler does
        config = ui_config(fakes[0].url, prefetch=False, backends=(
            comfymgr.BackendSpec("a", fakes[0].url, 0), comfymgr.BackendSpec("b", fakes[1].url, 1)))
        client = await make_client(config, nvml=two_gpus())
        await wait_backends_up(client, 2)
        done = []
        for i, color in enumerate((0xE8A33D, 0x3D8FE8, 0x4CAF7A, 0xB4539A, 0x49B6B0, 0xD85C4A, 0x7A6FD8)):
            job = await api_submit(client, simple_graph(f"done{i}", color), gpu="ab"[i % 2])
            done.append(job["workflowId"])
            await wait_api(client, job["workflowId"], lambda j: j["status"] == "completed", "completed")
        for f in fakes:
            f.fail_node["ImageInvert"] = ("RuntimeError", "CUDA out of memory. Tried to allocate 2.00 GiB")
        failed = (await api_submit(client, workflow("chain"), gpu="b"))["workflowId"]
        await wait_api(client, failed, lambda j: j["status"] == "failed", "failed")
        for f in fakes:
            f.fail_node.clear()
        running = {
            "a": (await api_submit(client, gated_graph("run_a", inverts=5), gpu="a", priority="high"))["workflowId"],
            "b": (await api_submit(client, gated_graph("run_b", inverts=0, blurs=2), gpu="b"))["workflowId"],
        }
        for job_id in running.values():
            await wait_api(client, job_id, lambda j: j["status"] == "running" and j["progress"] > 0, "running")
        queued = {}
        for priority, count in (("high", 1), ("normal", 2), ("low", 1)):
            queued[priority] = [(await api_submit(client, simple_graph(f"{priority}{i}"), priority=priority)
                                 )["workflowId"] for i in range(count)]
        yield {"client": client, "fakes": fakes, "gates": gates, "done": done, "failed": failed,
               "running": running, "queued": queued}
    finally:
        for gate in gates:
            gate.set()
        for f in fakes:
            await f.stop()


async def open_busy(browser: Browser, busy: dict, **size) -> str:
    origin = str(busy["client"].make_url("")).rstrip("/")
    await browser.open(origin + "/ui", **size)
    await sign_in(browser)
    await browser.wait_for("document.querySelectorAll('#running [data-id]').length === 2 && "
                           "document.querySelectorAll('#queue [data-id]').length === 4 && "
                           "[...document.querySelectorAll('#done .thumbs img')].filter("
                           "i => i.complete && i.naturalWidth > 0).length === 6 && "
                           "document.querySelectorAll('#backends [data-f=util]')[1]?.textContent === '64 %'",
                           "the busy box")
    return origin


async def test_two_backends_their_gpus_and_a_full_queue(busy, tmp_path):
    async with Browser(tmp_path / "chromium") as browser:
        origin = await open_busy(browser, busy)
        backends = await browser.evaluate("""[...document.querySelectorAll('#backends [data-name]')].map(c =>
            Object.fromEntries([...c.querySelectorAll('[data-f]')].map(f => [f.dataset.f, f.textContent])
              .filter(([k]) => !k.endsWith('-bar'))))""")
        assert backends == [
            {"name": "a", "state": "up", "version": "ComfyUI 0.3.64", "gpu": "NVIDIA GeForce RTX 4090",
             "util": "97 %", "vram": "17.5 / 24.0 GiB", "temp": "71 °C", "job": busy["running"]["a"], "error": ""},
            {"name": "b", "state": "up", "version": "ComfyUI 0.3.64", "gpu": "NVIDIA L40S",
             "util": "64 %", "vram": "30.0 / 48.0 GiB", "temp": "58 °C", "job": busy["running"]["b"], "error": ""},
        ]
        bars = await browser.evaluate("""[...document.querySelectorAll('#backends [data-f$=-bar]')]
            .map(b => b.style.width)""")
        assert bars == ["97%", "72.9167%", "64%", "62.5%"]  # 17.5 of 24 GiB, 30 of 48
        progress = await browser.evaluate("""Object.fromEntries([...document.querySelectorAll('#running [data-id]')]
            .map(c => [c.dataset.id, c.querySelector('[role=progressbar]').getAttribute('aria-valuenow')]))""")
        # a: 7 of 8 nodes done while its blur waits; b: EmptyImage and the first of two blurs, of 4.
        assert progress == {busy["running"]["a"]: "87.5", busy["running"]["b"]: "50"}
        queue = await browser.evaluate("""[...document.querySelectorAll('#queue .prio')].map(g =>
            [g.dataset.priority, [...g.querySelectorAll('[data-id]')].map(li =>
              [li.dataset.id, li.querySelector('[data-f=position]').textContent])])""")
        q = busy["queued"]
        assert queue == [["high", [[q["high"][0], "#1"]]],
                         ["normal", [[q["normal"][0], "#2"], [q["normal"][1], "#3"]]],
                         ["low", [[q["low"][0], "#4"]]]]
        failed = await browser.evaluate(f"""(c => [c.querySelector('[data-f=error-code]').textContent,
            c.querySelector('[data-f=error-message]').textContent])({item('problems', busy['failed'])})""")
        assert failed[0] == "execution_error" and "CUDA out of memory" in failed[1]
        # Paging: 6 to a page, newest first; the older page holds the first completed job.
        done = await browser.evaluate("[...document.querySelectorAll('#done [data-id]')].map(e => e.dataset.id)")
        assert done == busy["done"][:0:-1]
        assert await browser.evaluate("document.getElementById('done-newer').disabled") is True
        await browser.click("#done-older")
        await browser.wait_for(f"[...document.querySelectorAll('#done [data-id]')].map(e => e.dataset.id)"
                               f".join() === {json.dumps(busy['done'][0])}", "the older page")
        assert await browser.evaluate("document.getElementById('done-older').disabled") is True
        await browser.click("#done-newer")
        await browser.wait_for("document.querySelectorAll('#done [data-id]').length === 6", "the newest page")
        await browser.screenshot(tmp_path / "dashboard-two-backends.png")
        assert browser.errors == []
        assert browser.foreign_requests(origin) == []


async def test_the_dashboard_fits_a_phone(busy, tmp_path):
    async with Browser(tmp_path / "chromium") as browser:
        await open_busy(browser, busy, width=390, height=844, mobile=True)
        widths = await browser.evaluate("[document.documentElement.scrollWidth, innerWidth, "
                                        "document.body.scrollWidth]")
        assert widths[1] == 390 and widths[0] <= widths[1] and widths[2] <= widths[1], widths
        # Nothing sticks out to the right either (an element past the edge
        # would be cut off rather than scroll, with overflow hidden above it).
        wide = await browser.evaluate("""[...document.querySelectorAll('body *')]
            .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > innerWidth + 0.5)
            .map(e => e.tagName + '.' + e.className + '#' + e.id)""")
        assert wide == []
        await browser.screenshot(tmp_path / "dashboard-phone.png")
        assert browser.errors == []
