#!/usr/bin/env python3
"""The reference servers: what the machine allows with nothing of comfymgr
in the way. Each is the least code that does the job correctly.

    python bench/ref_server.py --port N get       # GET /job -> a job-sized JSON answer
    python bench/ref_server.py --port N parse     # POST /submit: json.loads the body, 202
    python bench/ref_server.py --port N commit --sync full|normal --db PATH
                                                  # parse, then one INSERT committed per
                                                  # request (WAL) in one DB thread, then 202
    python bench/ref_server.py --port N fanout    # GET /ws: WebSocket clients;
                                                  # POST /broadcast: one 200-byte message to all
    python bench/ref_server.py --port N metrics   # GET /metrics: ~50 families rendered

--lag-probe adds GET /__bench__/lag (common.LagProbe: how long the event
loop was held). The fan-out message carries the monotonic time it was sent at ("t0"), so a
client in another process can compute delivery latency on the same clock.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import resource
import sqlite3
import sys
import time
import uuid

from aiohttp import web

JOB = {
    "workflowId": "3f1c2a9e-8d4b-4c1e-9a7f-2b6d5e8c1a40", "status": "queued", "priority": "normal",
    "queuePosition": 17, "progress": 0.0, "currentNode": None, "createdAt": 1764131234567,
    "startTime": None, "completionTime": None, "outputs": [], "error": None, "state": "queued",
    "gpu": "any", "backend": None, "promptId": None, "attempts": 0, "timeout": 3600.0,
    "cancelRequested": False,
}


def _dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def get_app() -> web.Application:
    async def job(request: web.Request) -> web.Response:
        return web.Response(body=_dumps(JOB), content_type="application/json")

    app = web.Application()
    app.router.add_get("/job", job)
    return app


def parse_app() -> web.Application:
    async def submit(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        return web.Response(body=_dumps({"workflowId": str(uuid.uuid4()), "nodes": len(body["workflow"])}),
                            status=202, content_type="application/json")

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/submit", submit)
    return app


def commit_app(db_path: str, sync: str) -> web.Application:
    # One thread owns the connection (as in comfymgr); one transaction per request.
    executor = concurrent.futures.ThreadPoolExecutor(1)
    conn: sqlite3.Connection | None = None

    def open_db() -> None:
        nonlocal conn
        conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {sync.upper()}")
        conn.execute("CREATE TABLE IF NOT EXISTS jobs (n INTEGER PRIMARY KEY, id TEXT, workflow TEXT)")

    def insert(job_id: str, text: str) -> None:
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO jobs (id, workflow) VALUES (?, ?)", (job_id, text))
        conn.execute("COMMIT")

    async def submit(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        job_id = str(uuid.uuid4())
        text = json.dumps(body["workflow"], separators=(",", ":"))
        await asyncio.get_running_loop().run_in_executor(executor, insert, job_id, text)
        return web.Response(body=_dumps({"workflowId": job_id}), status=202, content_type="application/json")

    async def lifecycle(app: web.Application):
        await asyncio.get_running_loop().run_in_executor(executor, open_db)
        yield
        executor.shutdown()

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/submit", submit)
    app.cleanup_ctx.append(lifecycle)
    return app


def fanout_app() -> web.Application:
    clients: set[web.WebSocketResponse] = set()
    seq = 0

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        clients.add(ws)
        try:
            async for _ in ws:
                pass
        finally:
            clients.discard(ws)
        return ws

    async def broadcast(request: web.Request) -> web.Response:
        nonlocal seq
        seq += 1
        t0 = time.monotonic()
        head = {"type": "workflow:queued", "seq": seq, "t0": t0,
                "workflowId": "3f1c2a9e-8d4b-4c1e-9a7f-2b6d5e8c1a40"}
        text = json.dumps(head, separators=(",", ":"))
        text = text[:-1] + ',"pad":"' + "x" * max(0, 200 - len(text) - 10) + '"}'
        for ws in list(clients):
            await ws.send_str(text)
        return web.json_response({"seq": seq, "clients": len(clients), "t0": t0,
                                  "bytes": len(text), "sent_in": time.monotonic() - t0})

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"clients": len(clients)})

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_post("/broadcast", broadcast)
    app.router.add_get("/clients", count)
    return app


def metrics_app() -> web.Application:
    """~50 families with few histogram series, rendered on every scrape."""
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        disable_created_metrics,
        generate_latest,
    )
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    disable_created_metrics()  # as comfymgr does: no *_created series

    registry = CollectorRegistry()
    for i in range(22):
        counter = Counter(f"ref_counter_{i}", "A counter.", ["kind"], registry=registry)
        gauge = Gauge(f"ref_gauge_{i}", "A gauge.", ["kind"], registry=registry)
        for kind in ("a", "b", "c"):
            counter.labels(kind).inc(i)
            gauge.labels(kind).set(i)
    buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    for i in range(6):
        histogram = Histogram(f"ref_histogram_{i}_seconds", "A histogram.", ["route"],
                              buckets=buckets, registry=registry)
        for route in ("/a", "/b"):
            histogram.labels(route).observe(0.01 * i)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("get", "parse", "commit", "fanout", "metrics"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sync", choices=("full", "normal"), default="full")
    parser.add_argument("--db", default="ref.db")
    parser.add_argument("--lag-probe", action="store_true", help="GET /__bench__/lag: the event loop's lag")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    app = {"get": get_app, "parse": parse_app, "fanout": fanout_app, "metrics": metrics_app,
           "commit": lambda: commit_app(args.db, args.sync)}[args.kind]()

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_get("/health", ready)
    if args.lag_probe:
        from common import LagProbe
        LagProbe().install(app)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
