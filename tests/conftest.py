"""Shared fixtures: a comfymgr app on a real socket, a fake clock, keys."""

from __future__ import annotations

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
