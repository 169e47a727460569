#!/usr/bin/env python3
"""Run comfymgr for the benchmark suite: `comfymgr.main()`, configured by the
environment like the real service, with optional instruments.

    python bench/harness.py [--trace] [--lag-probe] [--fake-gpus N] [--no-accel] [--comfymgr-dir DIR]

Without flags this is exactly `python comfymgr.py`. With --trace, the time of
every commit (per event seq, taken in the database thread right after COMMIT)
and the steps of the bridge's dispatch path are recorded on the system-wide
monotonic clock and served at GET /__bench__/trace (API key required), so the
suite can measure commit-to-delivery latency and break the dispatch gap
down. --lag-probe runs common.LagProbe on comfymgr's event loop (a 1 ms
timer; how late it fires is how long the loop was held), read and reset at
GET /__bench__/lag[?reset=1] (API key required). --fake-gpus gives comfymgr a stand-in NVML with N GPUs (the /metrics
figure); --no-accel hides orjson from it (comfymgr uses it when
it is installed).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import resource
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

# --comfymgr-dir DIR: run the comfymgr.py in DIR instead (A/B of two versions).
_DIR = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--comfymgr-dir"), None)
sys.path.insert(0, _DIR or str(Path(__file__).resolve().parent.parent))
if "--no-accel" in sys.argv:  # as if orjson were not installed
    sys.modules["orjson"] = None  # type: ignore[assignment]
    sys.modules["uvloop"] = None  # type: ignore[assignment]

import comfymgr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LagProbe  # noqa: E402

_KEEP = 200_000
COMMITS: collections.OrderedDict[int, float] = collections.OrderedDict()
STEPS: collections.deque = collections.deque(maxlen=_KEEP)
_lock = threading.Lock()


def _trace_commits() -> None:
    """Storage.on_commit runs in the database thread right after COMMIT."""

    class TracedStorage(comfymgr.Storage):
        @property
        def on_commit(self):
            return self._bench_on_commit

        @on_commit.setter
        def on_commit(self, fn):
            def traced(events, fn=fn):
                now = time.monotonic()
                with _lock:
                    for event in events:
                        COMMITS[event.seq] = now
                    while len(COMMITS) > _KEEP:
                        COMMITS.popitem(last=False)
                fn(events)
            self._bench_on_commit = traced

        def run_batch(self, ops):
            started = time.monotonic()
            try:
                return super().run_batch(ops)
            finally:
                STEPS.append(("db.batch", started, time.monotonic(), len(ops)))

        def claim(self, *args, **kwargs):
            started = time.monotonic()
            try:
                return super().claim(*args, **kwargs)
            finally:
                pid = kwargs.get("prompt_id", args[1] if len(args) > 1 else None)
                STEPS.append(("db.claim", started, time.monotonic(), pid))

        def claim_next(self, *args, **kwargs):  # comfymgr before Storage.claim (comparisons)
            started = time.monotonic()
            try:
                return super().claim_next(*args, **kwargs)
            finally:
                pid = kwargs.get("prompt_id", args[1] if len(args) > 1 else None)
                STEPS.append(("db.claim", started, time.monotonic(), pid))

    comfymgr.Storage = TracedStorage


def _wrap_async(label: str, key, *where: tuple[str, str]) -> None:
    """Trace the first of `where` (class name, method name) that comfymgr
    has: the bridge's methods move as it changes, and a trace that lacks a
    step still serves the others (the breakdowns skip what they miss)."""
    for cls_name, name in where:
        cls = getattr(comfymgr, cls_name, None)
        original = getattr(cls, name, None) if cls is not None else None
        if original is not None:
            break
    else:
        print(f"harness: --trace: no {' or '.join(f'{c}.{n}' for c, n in where)} in comfymgr; "
              f"{label} not traced", file=sys.stderr, flush=True)
        return

    @functools.wraps(original)
    async def traced(*args, **kwargs):
        started, what = time.monotonic(), key(*args, **kwargs)
        try:
            return await original(*args, **kwargs)
        finally:
            STEPS.append((label, started, time.monotonic(), what))

    setattr(cls, name, traced)


def _run_pid(*args, **kwargs):
    """The prompt id of the run among a bridge method's arguments."""
    for arg in args[1:]:
        pid = getattr(arg, "prompt_id", None)
        if isinstance(pid, str):
            return pid
    return None


def _trace_dispatch() -> None:
    _wrap_async("bridge.finish", _run_pid, ("_Backend", "_finish_locked"), ("_Bridge", "finish"))
    _wrap_async("bridge.end", _run_pid, ("_Backend", "_end_locked"), ("_Bridge", "_end"))
    _wrap_async("bridge.dispatch_next", lambda *a, **k: None, ("_Backend", "dispatch_next"),
                ("_Bridge", "dispatch_next"))
    _wrap_async("bridge.mark_running", _run_pid, ("_Backend", "_mark_running"), ("_Bridge", "mark_running"))
    _wrap_async("http.history", lambda self, pid, *a, **k: pid, ("_ComfyClient", "history"))
    _wrap_async("http.post_prompt", lambda self, prompt, pid, *a, **k: pid, ("_ComfyClient", "post_prompt"))
    _wrap_async("db.write", lambda self, fn, *a, **k: getattr(sys._getframe(2).f_code, "co_name", "?"),
                ("_Database", "write"))

    original = getattr(comfymgr._Backend, "_on_text", None)
    if original is None:
        print("harness: --trace: no _Backend._on_text in comfymgr; socket reads not traced", file=sys.stderr)
        return

    async def on_text(self, text):
        if '"executing"' in text and '"node": null' in text:
            STEPS.append(("ws.end_marker", time.monotonic(), time.monotonic(), None))
        elif '"execution_success"' in text:
            STEPS.append(("ws.success", time.monotonic(), time.monotonic(), None))
        elif '"execution_start"' in text:
            STEPS.append(("ws.start", time.monotonic(), time.monotonic(), None))
        return await original(self, text)

    comfymgr._Backend._on_text = on_text


class FakeNVML:
    """The slice of pynvml comfymgr calls, with fixed plausible values."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, count: int) -> None:
        self.count = count

    def nvmlInit(self): pass
    def nvmlShutdown(self): pass
    def nvmlDeviceGetCount(self): return self.count
    def nvmlDeviceGetHandleByIndex(self, index): return index
    def nvmlDeviceGetName(self, h): return "NVIDIA H100 80GB HBM3"
    def nvmlDeviceGetUUID(self, h): return f"GPU-{h:08d}-0000-0000-0000-000000000000"
    def nvmlDeviceGetUtilizationRates(self, h): return SimpleNamespace(gpu=50 + h, memory=10)
    def nvmlDeviceGetMemoryInfo(self, h): return SimpleNamespace(used=(10 + h) << 30, total=80 << 30, free=0)
    def nvmlDeviceGetTemperature(self, h, sensor): return 60 + h
    def nvmlDeviceGetPowerUsage(self, h): return 300_000 + h


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--lag-probe", action="store_true", help="GET /__bench__/lag: the event loop's lag")
    parser.add_argument("--fake-gpus", type=int, default=0)
    parser.add_argument("--no-accel", action="store_true",
                        help="run without orjson even where it is installed")
    parser.add_argument("--comfymgr-dir", help="import comfymgr.py from this folder (A/B runs)")
    parser.add_argument("--switch-interval", type=float,
                        help="sys.setswitchinterval (seconds) for comfymgr's threads (experiments)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000 stream clients
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.trace:
        _trace_commits()
        _trace_dispatch()
    create_app = comfymgr.create_app

    def bench_create_app(config, **kwargs):
        if args.fake_gpus:
            kwargs["nvml"] = FakeNVML(args.fake_gpus)
        app = create_app(config, **kwargs)

        async def trace(request):
            with _lock:
                commits = {str(k): v for k, v in COMMITS.items()}
            steps = list(STEPS)
            if request.query.get("clear"):
                STEPS.clear()
            return comfymgr.web.json_response({"commits": commits, "steps": steps, "pid": os.getpid()})

        app.router.add_get("/__bench__/trace", trace)
        if args.lag_probe:
            LagProbe().install(app)
        return app

    comfymgr.create_app = bench_create_app
    return comfymgr.main([])


if __name__ == "__main__":
    sys.exit(main())
