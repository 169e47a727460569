"""The README says what is true: its settings table is the config table,
and its curl walkthrough runs as written against comfymgr and the fake."""

from __future__ import annotations

import asyncio
import os
import re
import shutil

import pytest

import comfymgr
from conftest import API_KEY, DATA, ROOT
from fake_comfyui import FakeComfyUI

README = (ROOT / "README.md").read_text()


def between(marker):
    match = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", README, re.S)
    assert match, marker
    return match.group(1)


def test_settings_table_is_the_config_table():
    assert between("config-table").strip() == comfymgr._config_table()


def test_the_websocat_commands_are_the_tested_ones():
    for command in ('websocat -H="X-API-Key: $KEY" ws://127.0.0.1:9090/v1/comfyui/stream',
                    'websocat "ws://127.0.0.1:9090/v1/comfyui/stream?workflowId=$ID&api_key=$KEY"',
                    'websocat -H="X-API-Key: $KEY" "ws://127.0.0.1:9090/v1/comfyui/stream?since=$SEQ"'):
        assert command in README


def test_the_verify_snippet_is_the_tested_one():
    import inspect

    import test_webhooks
    source = inspect.getsource(test_webhooks.verify)
    body = [line for line in source.splitlines() if not line.strip().startswith('"""')]
    for line in body:
        assert line in README, line


async def test_curl_walkthrough_runs_as_written(make_client, make_config, tmp_path):
    for tool in ("curl", "jq", "bash"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (.ci/run installs it)")
    fake = FakeComfyUI(output_dir=tmp_path / "comfy" / "output")
    await fake.start()
    try:
        client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0,
                                               outputs_dir=tmp_path / "comfy" / "output"))
        block = between("readme-walkthrough")
        script = block.split("```sh\n", 1)[1].rsplit("```", 1)[0]
        script = (script.replace("KEY=change-me", f"KEY={API_KEY}")
                  .replace("http://127.0.0.1:9090", f"http://127.0.0.1:{client.port}")
                  .replace("tests/data/comfyui/", f"{DATA}/"))
        proc = await asyncio.create_subprocess_exec(
            "bash", "-euo", "pipefail", "-c", script, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PATH": os.environ.get("PATH", "")})
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        text = out.decode()
        assert '"status": "completed"' in text and '"progress": 100' in text
        assert (tmp_path / "output.png").read_bytes().startswith(b"\x89PNG")
        assert '"completed"' in text and '"up"' in text
    finally:
        await fake.stop()


def test_make_help_list_is_the_makefile_targets():
    makefile = (ROOT / "Makefile").read_text()
    targets = re.findall(r"^([a-z-]+):.*## ", makefile, re.M)
    listed = re.search(r"`make help` lists every target: (.*?)\.\n\n", README, re.S).group(1)
    assert re.findall(r"`([a-z-]+)`", listed) == [t for t in targets if t != "help"]


def test_files_the_code_and_docs_name_are_in_the_repository():
    """Paths like docs/PROTOCOL.md or contrib/systemd/comfymgr.env in the
    code, the tests, contrib/ and the docs name files that exist (bench/results
    is made by `make bench` and `make crash`)."""
    texts = [ROOT / "comfymgr.py", ROOT / "README.md", *(ROOT / "tests").glob("*.py"),
             *(ROOT / "contrib").rglob("*.*"), *(ROOT / "docs").glob("*.md")]
    # A folder's name starts with a letter or digit: "-/etc/x.env" (systemd's
    # "optional" mark) is the absolute /etc/x.env.
    path = r"(?<![\w/:.~-])((?:\w[\w-]*/)+[\w.@-]+\.(?:md|yml|json|conf|service|env))\b"
    named = {name for text in texts for name in re.findall(path, text.read_text())}
    assert {"docs/PROTOCOL.md", "contrib/systemd/comfymgr.env"} <= named
    missing = {name for name in named if not (ROOT / name).is_file() and not name.startswith("bench/results/")}
    assert missing == set()
