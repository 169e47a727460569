"""Shared fixtures: a comfymgr app on a real socket, a fake clock, keys; the
one way a test skips for a system tool that is not installed."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import comfymgr  # noqa: E402
from fake_comfyui import FakeComfyUI  # noqa: E402

API_KEY = "test-key-0123456789"
HEADERS = {"X-API-Key": API_KEY}
DATA = Path(__file__).resolve().parent / "data" / "comfyui"


class FakeClock:
    """An injectable clock: tests move time instead of sleeping."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_config(tmp_path):
    """Config for a test: its own state dir, a known key, no rate limit unless asked."""

    def make(**overrides):
        # ComfyUI at a port nothing listens on, unless a test brings its fake:
        # a real ComfyUI on this box's default port must never get test jobs.
        values = {"state_dir": tmp_path / "state", "api_keys": (API_KEY,), "rate_limit": 0,
                  "port": 0, "host": "127.0.0.1", "comfyui_url": "http://127.0.0.1:9"}
        values.update(overrides)
        return comfymgr.Config.defaults(**values)

    return make


@pytest.fixture
async def fake(tmp_path):
    """A fake ComfyUI on a loopback port, its folders in tmp_path/comfy."""
    server = FakeComfyUI(output_dir=tmp_path / "comfy" / "output")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def make_client(aiohttp_client, make_config):
    """Start comfymgr (create_app) on a real loopback socket; returns the client."""

    async def make(config=None, **kwargs):
        app = comfymgr.create_app(config or make_config(), **kwargs)
        return await aiohttp_client(app)

    return make


def workflow(name: str = "simple") -> dict:
    import json

    return json.loads((DATA / "workflows" / f"{name}.json").read_text())


# -- system tools ----------------------------------------------------------------
# nginx, promtool, systemd-nspawn, ... come from the system's packages, listed
# once in .ci/apt-packages. A test that needs one asks need_tool(), which
# skips it with one recognisable reason, so the run can end by saying how many
# tests that cost and how to get them back.

SYSTEM_DEPS = "make system-deps"
_MISSING_TOOL = re.compile(r"(\S+) is not installed \(" + re.escape(SYSTEM_DEPS) + r" installs it\)")


def need_tool(tool: str) -> str:
    """The path of `tool` (on PATH, or in /usr/sbin or /sbin, which a
    non-root PATH may lack); skips the calling test when it is missing."""
    path = shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.access(p, os.X_OK)), None)
    if path is None:
        pytest.skip(f"{tool} is not installed ({SYSTEM_DEPS} installs it)")
    return path


def pytest_unconfigure(config) -> None:
    # After the run's last line ("... passed, ... skipped in ...s"), so it is the last.
    terminalreporter = config.pluginmanager.get_plugin("terminalreporter")
    if terminalreporter is None:
        return
    tools: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        match = _MISSING_TOOL.search(reason)
        if match:
            tools[match.group(1)] = tools.get(match.group(1), 0) + 1
    if tools:
        count = sum(tools.values())
        terminalreporter.write_line(
            f"{count} test{'s' if count > 1 else ''} skipped for missing tools "
            f"({', '.join(sorted(tools))}): `{SYSTEM_DEPS}` installs them", yellow=True, bold=True)
