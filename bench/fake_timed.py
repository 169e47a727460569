#!/usr/bin/env python3
"""The fake ComfyUI of the tests (tests/fake_comfyui.py), with a timeline.

It records, on the system-wide monotonic clock (time.monotonic(), the same
in every process), when each prompt's messages were emitted and written to
a socket, when POST /prompt and GET /history requests arrived and were
answered, so that the suite can say where the time between one job's end and
the next job's POST goes. It also keeps its own records bounded (the test
fake keeps every message it ever sent, which 100,000 jobs would turn into
gigabytes), and adds a gate the suite can open from another process.

    python bench/fake_timed.py --port N --output-dir D [--node-delay CLASS=SECONDS]
    python bench/fake_timed.py --ports N,M,... --output-dir D   # several in one process

Extra routes: GET /__bench__/timeline[?clear=1], POST /__bench__/gate (jobs
with an ImageBlur node now wait), POST /__bench__/release (they go on).
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import fake_comfyui

_KEEP = 50_000
_WATCHED = ("execution_start", "execution_success", "execution_error", "executing")


class TimedFake(fake_comfyui.FakeComfyUI):
    def __init__(self, **kwargs) -> None:
        self.timeline: dict[str, collections.deque] = {
            name: collections.deque(maxlen=_KEEP) for name in ("emit", "sent", "post", "history")}
        self._bench_gate: asyncio.Event | None = None
        super().__init__(**kwargs)

    # -- recording --------------------------------------------------------------------

    def _send(self, event, data, sid=None):
        if event in _WATCHED and (event != "executing" or data.get("node") is None):
            self.timeline["emit"].append((time.monotonic(), event, data.get("prompt_id")))
        super()._send(event, data, sid)

    async def _send_to(self, conn, text):
        # As the test fake's, without keeping every message in ws_sent.
        try:
            await conn.ws.send_str(text)
        except Exception:
            return
        if text.startswith(('{"type": "execution_', '{"type": "executing"')):
            message = json.loads(text)
            data = message.get("data") or {}
            if message["type"] != "executing" or data.get("node") is None:
                self.timeline["sent"].append((time.monotonic(), message["type"], data.get("prompt_id")))

    @web.middleware
    async def _timing_middleware(self, request: web.Request, handler):
        arrived = time.monotonic()
        response = await handler(request)
        path = request.path.removeprefix("/api")
        if request.method == "POST" and path == "/prompt":
            try:
                pid = json.loads(response.body).get("prompt_id")
            except (ValueError, AttributeError, TypeError):
                pid = None
            self.timeline["post"].append((arrived, time.monotonic(), pid))
        elif request.method == "GET" and path.startswith("/history/"):
            self.timeline["history"].append((arrived, time.monotonic(), request.match_info.get("prompt_id")))
        return response

    def _build_app(self) -> web.Application:
        app = super()._build_app()
        app.middlewares.insert(0, self._timing_middleware)
        app.router.add_get("/__bench__/timeline", self._bench_timeline)
        app.router.add_post("/__bench__/gate", self._bench_gate_on)
        app.router.add_post("/__bench__/release", self._bench_release)
        app.cleanup_ctx.append(self._trim_ctx)
        return app

    async def _trim_ctx(self, app: web.Application):
        task = asyncio.ensure_future(self._trim_loop())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _trim_loop(self) -> None:
        """The test fake's records grow with every request; keep the recent ones."""
        while True:
            await asyncio.sleep(1.0)
            for records in (self.posted_prompt_ids, self.requests, self.ws_connects):
                if len(records) > _KEEP:
                    del records[:-1000]
            if len(self.execution_count) > _KEEP:
                self.execution_count = dict(list(self.execution_count.items())[-1000:])
            for sent in self.ws_sent:
                sent.clear()

    # -- control ----------------------------------------------------------------------

    async def _bench_timeline(self, request: web.Request) -> web.Response:
        body = {name: list(records) for name, records in self.timeline.items()}
        if request.query.get("clear"):
            for records in self.timeline.values():
                records.clear()
        return web.json_response(body)

    async def _bench_gate_on(self, request: web.Request) -> web.Response:
        self._bench_gate = self.gate("ImageBlur", interruptible=False)
        self._bench_gate.clear()
        return web.json_response({"gated": True})

    async def _bench_release(self, request: web.Request) -> web.Response:
        self.ungate("ImageBlur")
        return web.json_response({"released": True, "at": time.monotonic()})


async def _serve(args) -> None:
    # Several fakes (--ports) share one process and one event loop, as many
    # backends as the suite wants without a process each; each is its own
    # ComfyUI (queue, history, timeline) on its own port and output folder.
    ports = [args.port] if args.port else [int(p) for p in args.ports.split(",") if p]
    fakes = []
    for port in ports:
        fake = TimedFake(output_dir=args.output_dir if len(ports) == 1 else args.output_dir / str(port))
        fake.node_delay.update(fake_comfyui._parse_pairs(args.node_delay, float))
        await fake.start("127.0.0.1", port)
        fakes.append(fake)
    print(f"listening on {', '.join(fake.url for fake in fakes)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for fake in fakes:
        await fake.stop()


def main() -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int)
    where.add_argument("--ports", help="comma-separated: one fake per port, in one process")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--node-delay", action="append", default=[], metavar="CLASS=SECONDS",
                        help="every node of CLASS takes SECONDS")
    asyncio.run(_serve(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
