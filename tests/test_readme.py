"""The README and docs/ say what is true: the settings and metrics tables are
what comfymgr reads and exports, every route and error code is in the API
reference, every setting, metric, route and file the documents name exists,
and the README's examples run as written against comfymgr started with the
README's quick-start settings and the fake ComfyUI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys

import aiohttp
import pytest
from doc_tables import between, exported_metrics, metrics_table, shown_name
from test_bridge import free_port

import comfymgr
from conftest import DATA, ROOT, need_tool
from fake_comfyui import FakeComfyUI, _png_bytes

README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
API = (DOCS / "API.md").read_text()
DOCUMENTS = {"README.md": README, **{f"docs/{p.name}": p.read_text() for p in sorted(DOCS.glob("*.md"))}}
SETTINGS = {st.env for st in comfymgr._SETTINGS}


def block(marker, text=README, language="sh"):
    """The code block between <!-- marker --> and <!-- /marker -->."""
    return between(text, marker).split(f"```{language}\n", 1)[1].rsplit("```", 1)[0]


# -- the generated references ---------------------------------------------------------------

def test_settings_table_is_the_config_table():
    assert between(DOCUMENTS["docs/CONFIGURATION.md"], "config-table").strip() == comfymgr._config_table()


async def test_metrics_table_is_what_comfymgr_exports():
    rows, scrape = await exported_metrics()
    assert between(DOCUMENTS["docs/METRICS.md"], "metrics-table").strip() == metrics_table(rows)
    # The table lists exactly the families a scrape shows (nothing collected elsewhere is missed).
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", scrape, re.M))
    assert families == {shown_name(name, type_): type_ for name, type_, _, _ in rows}


def api_paths():
    """(method, path) of every route comfymgr registers, as the reference writes them."""
    app = comfymgr.create_app(comfymgr.Config.defaults())
    found = [(route.method, re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route.resource.canonical))
             for route in app.router.routes() if route.method != "HEAD"]
    table = {(r.method, re.sub(r"\{(\w+):[^}]*\}", r"{\1}", r.path)) for r in comfymgr._routes()}
    assert table <= set(found)
    return found


def test_every_route_is_in_the_api_reference():
    paths = api_paths()
    assert {("GET", "/ui"), ("GET", "/docs"), ("GET", "/openapi.json")} <= set(paths)
    for method, path in paths:
        assert f"| {method} | `{path}` |" in API, (method, path)
    listed = re.findall(r"^\| (GET|POST|DELETE|PUT|PATCH) \| `(/[^`]*)` \|", API, re.M)
    assert sorted(listed) == sorted(paths)  # and nothing the router does not have


# `code="x"`, `code = "x"`, `status, code = 400, "x"` and `"code": "x"` in comfymgr.py:
# every error code a client can get, in a job, an answer or a stream message.
ERROR_CODE = re.compile(r'\bcode(?:=| = (?:\d+, )?)"([a-z_0-9]+)"|"code": "([a-z_0-9]+)"')


def error_codes():
    source = (ROOT / "comfymgr.py").read_text()
    return {a or b for a, b in ERROR_CODE.findall(source)}


def test_every_error_code_is_in_the_api_reference():
    codes = error_codes()
    assert {"invalid_workflow", "backend_lost", "since_expired", "unauthorized", "storage_unavailable",
            "webhook_forbidden", "foreign_input", "dispatch_failed", "backend_protocol_error"} <= codes
    missing = {code for code in codes if f"`{code}`" not in API}
    assert missing == set()
    assert "`http_<status>`" in API and 'code=f"http_{' in (ROOT / "comfymgr.py").read_text()
    # The error table names no code that comfymgr does not have.
    section = API.split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    tabled = {c for row in re.findall(r"^\| (?:\d+|any) \| (.*?) \|", section, re.M)
              for c in re.findall(r"`([a-z_<>0-9]+)`", row)}
    assert tabled - codes == {"http_<status>"}


# -- names the documents use -----------------------------------------------------------------

def test_settings_the_documents_name_exist():
    """A name like a setting is a setting, or something else that reads the
    environment: the client, contrib's files, the tests and the bench."""
    elsewhere = "".join(path.read_text() for path in [
        ROOT / "comfymgr.py", ROOT / "Makefile", *(ROOT / "tests").glob("*.py"),
        *(ROOT / "bench").glob("*.py"), *(p for p in (ROOT / "contrib").rglob("*") if p.is_file())])
    for name, text in DOCUMENTS.items():
        for word in set(re.findall(r"\b(?:COMFYMGR|COMFYUI|MANAGEMENT_API)_[A-Z0-9_]*[A-Z0-9]\b", text)):
            assert word in SETTINGS or re.search(rf"\b{word}\b", elsewhere), (name, word)
    # The README names the settings of retention, the webhook policy and the roles.
    for setting in ("COMFYMGR_RETENTION_DAYS", "COMFYMGR_WEBHOOK_ALLOW", "COMFYMGR_CLIENT_KEYS"):
        assert re.search(rf"`{setting}\b", README), setting


async def test_metrics_the_documents_name_exist():
    rows, _ = await exported_metrics()
    names = {shown_name(name, type_) for name, type_, _, _ in rows}
    names |= {f"{name}{suffix}" for name, type_, _, _ in rows if type_ == "histogram"
              for suffix in ("_bucket", "_sum", "_count")}
    labels = {label for _, _, found, _ in rows for label in found}
    for name, text in DOCUMENTS.items():
        text = re.sub(r"```nginx\n.*?```", "", text, flags=re.S)  # nginx's own variables
        for word in set(re.findall(r"(?<![$\w/])(?:comfyui|comfymgr)_[a-z0-9_]+", text)):
            assert word in names or word in labels, (name, word)
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", (ROOT / "contrib/prometheus/alerts.yml").read_text(), re.M))
    named = set(re.findall(r"`((?:Comfymgr|ComfyUI|Gpu)[A-Za-z]+)`", DOCUMENTS["docs/METRICS.md"]))
    assert named == alerts


def route_pattern(path):
    """A route template as a regular expression: {path} is any rest, {x} one segment."""
    parts = re.split(r"(\{\w+\})", path)
    return re.compile("".join(".+" if part == "{path}" else "[^/?#]+" if part.startswith("{")
                              else re.escape(part) for part in parts))


def test_routes_the_documents_name_exist():
    routes = [route_pattern(path) for _, path in api_paths()]
    assert any(r.fullmatch("/v1/comfyui/output/a/b c.png") for r in routes)
    assert not any(r.fullmatch("/v1/comfyui/workflow/$ID/nothing") for r in routes)
    for name, text in DOCUMENTS.items():
        for found in set(re.findall(r"(?<!/api)/v1/[A-Za-z0-9_/{}$<>.-]*[A-Za-z0-9_}>]", text)):
            # A route, or the folder of one ("served under /v1/comfyui/output/").
            assert any(route.fullmatch(found) or route.fullmatch(f"{found}/x") for route in routes), \
                (name, found)


def test_files_the_code_and_docs_name_are_in_the_repository():
    """Paths like docs/PROTOCOL.md or tests/test_roles.py in the code, the
    tests, contrib/ and the docs name files that exist (bench/results is made
    by `make bench` and `make crash`)."""
    texts = [ROOT / "comfymgr.py", ROOT / "Makefile", *(ROOT / "tests").glob("*.py"),
             *(ROOT / "contrib").rglob("*.*")]
    # A folder's name starts with a letter or digit: "-/etc/x.env" (systemd's
    # "optional" mark) is the absolute /etc/x.env.
    path = r"(?<![\w/:.~-])((?:\w[\w-]*/)+[\w.@-]+\.(?:{}))\b"
    config_files = path.format("md|yml|json|conf|service|env")
    named = {name for text in texts for name in re.findall(config_files, text.read_text())}
    # The documents name the repository's code and data too (tests, pictures).
    any_file = r"(?<![\w/:.~-])((?:tests|docs|contrib|bench|ui)/(?:[\w-]+/)*[\w.@-]+\.(?:py|png|json|js|css|md))\b"
    named |= {name for text in DOCUMENTS.values() for name in re.findall(any_file, text)}
    assert {"docs/PROTOCOL.md", "contrib/systemd/comfymgr.env", "tests/test_roles.py", "docs/dashboard.png",
            "docs/API.md", "tests/data/comfyui/workflows/invert.json"} <= named
    missing = {name for name in named if not (ROOT / name).is_file() and not name.startswith("bench/results/")}
    assert missing == set()


def test_the_alert_rules_are_copied_where_prometheus_yml_loads_them():
    [copied] = re.findall(r"^scp contrib/prometheus/alerts\.yml \S+:/etc/prometheus/(\S+) ", README, re.M)
    loaded = re.search(r"^rule_files:\n\s+- (\S+)$", (ROOT / "contrib/prometheus/prometheus.yml").read_text(),
                       re.M).group(1)
    assert copied == loaded == "alerts.yml"


def test_the_websocat_commands_are_the_tested_ones():
    for command in ('websocat -H="X-API-Key: $KEY" ws://127.0.0.1:9090/v1/comfyui/stream',
                    'websocat "ws://127.0.0.1:9090/v1/comfyui/stream?workflowId=$ID&api_key=$KEY"',
                    'websocat -H="X-API-Key: $KEY" "ws://127.0.0.1:9090/v1/comfyui/stream?since=$SEQ"'):
        assert command in README


def test_the_verify_snippet_is_the_tested_one():
    import inspect

    import test_webhooks
    source = inspect.getsource(test_webhooks.verify)
    snippet = block("webhook-verify", API, "python")
    body = [line for line in source.splitlines() if not line.strip().startswith('"""')]
    assert snippet.splitlines()[2:] == body


def test_make_help_is_the_makefile_s():
    make = need_tool("make")
    shown = subprocess.run([make, "-s", "--no-print-directory", "help"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    assert block("make-help", README, "text") == shown


def test_the_readme_lists_the_sections_of_comfymgr_py():
    sections = re.findall(r"^#{79}\n# ([a-z][a-z :']*)\n#{79}$", (ROOT / "comfymgr.py").read_text(), re.M)
    listed = re.search(r"would become and using only those above it: (.*?)\.\n", README, re.S).group(1)
    assert re.split(r",\s+", " ".join(listed.split())) == sections


# -- the README's examples, run as written ------------------------------------------------------

def quick_start_environment():
    """The settings of the README's quick start (`KEY=... make run`)."""
    line = next(line for line in block("readme-quick-start").splitlines() if line.endswith("make run"))
    return dict(re.findall(r"(\w+)=(\S+) ", line))


@pytest.fixture
async def quick_start(tmp_path):
    """comfymgr as `make run` starts it with the quick-start settings (but on
    a free port, with its own state directory), in front of the fake ComfyUI;
    COMFYUI_OUTPUTS is not set, so downloads go through ComfyUI's /view."""
    fake = FakeComfyUI(output_dir=tmp_path / "comfy" / "output")
    await fake.start()
    settings = quick_start_environment()
    assert set(settings) == {"MANAGEMENT_API_KEY", "COMFYUI_URL"}
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFYMGR_", "COMFYUI_", "MANAGEMENT_API_"))}
    env.update(settings, COMFYUI_URL=fake.url, MANAGEMENT_API_HOST="127.0.0.1",
               MANAGEMENT_API_PORT=str(port), COMFYMGR_STATE_DIR=str(tmp_path / "state"))
    proc = await asyncio.create_subprocess_exec(sys.executable, str(ROOT / "comfymgr.py"), env=env,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(headers={"X-API-Key": settings["MANAGEMENT_API_KEY"]}) as http:
            for _ in range(1000):
                try:
                    async with http.get(f"{base}/v1/status") as resp:
                        if resp.status == 200 and (await resp.json())["backends"][0]["state"] == "up":
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert proc.returncode is None, "comfymgr exited"
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("comfymgr did not come up")
        yield fake, base, tmp_path / "state"
    finally:
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
        await fake.stop()


def as_run_here(script, base):
    """The README's script with this comfymgr's address and the test data's path."""
    return (script.replace("http://127.0.0.1:9090", base)
            .replace("tests/data/comfyui/", f"{DATA}/"))


async def run(args, cwd):
    proc = await asyncio.create_subprocess_exec(*args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out.decode(), err.decode())
    return out.decode(), err.decode()


PHOTO = _png_bytes(16, 16, (200, 10, 10), [])


def only_output(fake):
    [made] = list(fake._dirs.output.iterdir())
    return made


async def test_one_call_with_curl_runs_as_written(quick_start, tmp_path):
    for tool in ("bash", "curl", "jq", "base64"):
        need_tool(tool)
    fake, base, _ = quick_start
    work = tmp_path / "work"
    work.mkdir()
    (work / "photo.png").write_bytes(PHOTO)
    out, err = await run(["bash", "-euo", "pipefail", "-c", as_run_here(block("readme-one-call"), base)], work)
    assert (out, err) == ("completed\n", "")
    job = json.loads((work / "job.json").read_text())
    assert job["status"] == "completed" and job["gpu"] == "any"
    # The photo reached ComfyUI under the job's own name; the picture came back inline, through /view.
    assert (fake._dirs.input / "comfymgr-jobs" / job["workflowId"] / "photo.png").read_bytes() == PHOTO
    assert (work / "result.png").read_bytes() == only_output(fake).read_bytes()
    assert only_output(fake).name == "inverted_00001_.png" and ("GET", "/view") in fake.requests


async def test_one_call_in_python_runs_as_written(quick_start, tmp_path):
    fake, base, _ = quick_start
    work = tmp_path / "work"
    work.mkdir()
    (work / "photo.png").write_bytes(PHOTO)
    script = as_run_here(block("readme-one-call-python", language="python"), base)
    out, err = await run([sys.executable, "-c", script], work)
    assert (out, err) == ("completed\n", "")
    made = only_output(fake)
    assert (work / made.name).read_bytes() == made.read_bytes()
    assert ("GET", "/view") in fake.requests


async def test_curl_walkthrough_runs_as_written(quick_start, tmp_path):
    for tool in ("bash", "curl", "jq"):
        need_tool(tool)
    fake, base, _ = quick_start
    out, _ = await run(["bash", "-euo", "pipefail", "-c", as_run_here(block("readme-walkthrough"), base)],
                       tmp_path)
    assert '"status": "completed"' in out and '"progress": 100' in out
    assert '"completed"' in out and '"up"' in out
    # Downloaded through ComfyUI's /view: the quick start has no COMFYUI_OUTPUTS.
    assert (tmp_path / "output.png").read_bytes() == only_output(fake).read_bytes()
    assert ("GET", "/view") in fake.requests


async def test_the_backup_commands_run_as_written(quick_start, tmp_path):
    for tool in ("bash", "sqlite3", "curl", "jq", "base64"):
        need_tool(tool)
    fake, base, state = quick_start
    work = tmp_path / "work"
    work.mkdir()
    (work / "photo.png").write_bytes(PHOTO)
    await run(["bash", "-euo", "pipefail", "-c", as_run_here(block("readme-one-call"), base)], work)
    backups = tmp_path / "backups"
    backups.mkdir()
    script = (block("readme-backup")
              .replace("python3 /opt/comfymgr/comfymgr.pyz", f"{sys.executable} {ROOT}/comfymgr.py")
              .replace("/var/lib/comfymgr", str(state)).replace("/var/backups", str(backups)))
    out, _ = await run(["bash", "-euo", "pipefail", "-c", script], work)  # while comfymgr runs
    assert re.fullmatch(r".* -> .*: [\d,]+ bytes, 1 jobs, integrity ok\nok\n", out)
    copies = sorted(backups.iterdir())
    assert len(copies) == 2
    for copy in copies:
        with sqlite3.connect(copy) as db:
            assert db.execute("SELECT status FROM jobs").fetchall() == [("completed",)]


def test_an_older_comfymgr_refuses_a_newer_schema_as_the_readme_says(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "comfymgr.db") as db:
        db.execute(f"PRAGMA user_version = {len(comfymgr._MIGRATIONS) + 1}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMFYMGR_", "COMFYUI_", "MANAGEMENT_API_"))}
    env.update(COMFYMGR_STATE_DIR=str(state), MANAGEMENT_API_HOST="127.0.0.1", MANAGEMENT_API_PORT="0",
               COMFYUI_URL="http://127.0.0.1:9", MANAGEMENT_API_KEY="a-key-for-this-test-only")
    done = subprocess.run([sys.executable, str(ROOT / "comfymgr.py")], env=env, capture_output=True,
                          text=True, timeout=60)
    said = re.search(r"`(cannot start:\s+/var/lib/comfymgr/comfymgr\.db has schema version N,[^`]*)`",
                     README).group(1)
    expected = (re.sub(r"\s+", " ", said).replace("/var/lib/comfymgr", str(state))
                .replace("version N", f"version {len(comfymgr._MIGRATIONS) + 1}")
                .replace("(M)", f"({len(comfymgr._MIGRATIONS)})"))
    assert done.returncode == 2 and "exit status 2" in README
    assert expected in done.stderr, done.stderr
