#!/usr/bin/env python3
"""comfymgr's benchmark suite: every hot path against the physical limit of
the same machine, measured in the same run.

    python bench/run.py [--quick] [--only 1,3,...] [--comfyui-url URL] [--update-doc]

For each figure it prints comfymgr's median, the reference's median measured
in the same run (trials alternate between the two, so that the noise of a
shared machine falls on both), their ratio and the target; the whole result
goes to bench/results/<time>.json, bench/results/latest.json and
bench/results/latest.md. --update-doc puts the table into docs/PERFORMANCE.md.

Figures (see docs/PERFORMANCE.md):
  1 durable submits of graphs of 27, 200 and 1,000 nodes (20, 40, 200 KB;
    50 connections) vs bare parse+commit; the event loop's longest hold
    while a 10 MB graph is submitted
  2 GET /v1/comfyui/workflow/{id} vs bare aiohttp GET
  3 dispatch: jobs/s through comfymgr vs straight to a fake ComfyUI with
    0 ms jobs, and the gap between one job's end and the next POST /prompt
  4 stream: commit-to-delivery at the 1,000th subscriber vs bare fan-out
  5 submit and claim latency with 1k, 100k and 1M jobs queued
  6 /metrics with 8 GPUs and every route used
  7 memory: idle, 100,000 finished jobs, 1,000 stream clients, leak check
  8 .pyz cold and warm start to the first answer
  9 one job at a time, submit -> completed at a stream client, vs straight
    to ComfyUI (5 ms jobs on the fake; a real ComfyUI with --comfyui-url)
  10 a drain of 200 jobs vs straight to ComfyUI; the GPU's idle time between
    jobs; comfymgr's CPU per job
  11 1 to 64 backends: idle time between jobs per backend, CPU per job, the
    job rate one comfymgr sustains
  12 1,000 requests waiting (?wait=) on queued jobs: memory, loop lag, answers

comfymgr runs at its defaults (log level info, synchronous=full, prefetch
on); the suite sets only where it listens, its state, key and backends, and
a high rate limit (the default 100/minute would refuse the load itself).
--comfyui-url (make bench COMFYUI_URL=...) adds figures 9 and 10 against
that ComfyUI; nothing else uses it, and nothing needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
from common import (
    API_KEY,
    BENCH,
    HEADERS,
    PY,
    ROOT,
    SETTING_PREFIXES,
    Proc,
    cpu_seconds,
    free_port,
    http_json,
    median,
    percentile,
    raise_fd_limit,
    scratch_dir,
    slope,
    start_comfymgr,
    start_fake,
    wait_backend_up,
    wait_http,
    wrk,
    wrk_script,
)
from perjob import fig_backends, fig_drain, fig_one_job, fig_waiters
from workloads import BIG_GRAPH, GRAPH_SIZES, gate_workflow, graph_workflow, quick_workflow, timed_workflow

RESULTS = BENCH / "results"
DOC = ROOT / "docs" / "PERFORMANCE.md"


class Suite:
    def __init__(self, quick: bool, no_accel: bool = False, comfyui_url: str | None = None,
                 backend_counts: tuple[int, ...] | None = None) -> None:
        self.quick = quick
        self.no_accel = no_accel
        self.comfyui_url = comfyui_url.rstrip("/") if comfyui_url else None
        self.backend_counts = backend_counts or ((1, 64) if quick else (1, 8, 32, 64))
        self.trials = 3 if quick else 5
        self.work = scratch_dir()
        self.logdir = self.work / "logs"
        self.logdir.mkdir()
        self.rows: list[dict[str, Any]] = []
        self.details: dict[str, Any] = {}
        self.errors: list[str] = []
        self._procs: list[Proc] = []

    # -- bookkeeping --------------------------------------------------------------------

    def row(self, fig: str, name: str, unit: str, comfymgr: float | None, reference: float | None = None,
            *, ref_name: str = "", target: str = "", ok: bool | None = None, note: str = "",
            ratio: float | None = None) -> None:
        if ratio is None and comfymgr is not None and reference:
            ratio = comfymgr / reference
        self.rows.append({"figure": fig, "name": name, "unit": unit, "comfymgr": comfymgr,
                          "reference": reference, "reference_name": ref_name, "ratio": ratio,
                          "target": target, "ok": ok, "note": note})
        print(f"  {fig:<3} {name:<46} {fmt(comfymgr):>10} {fmt(reference):>10} {fmt(ratio, 2):>6}  "
              f"{target} {verdict(ok)}", flush=True)

    def proc(self, proc: Proc) -> Proc:
        self._procs.append(proc)
        return proc

    def fake(self, **kw: Any) -> tuple[Proc, str]:
        proc, url = start_fake(self.logdir, self.work, **kw)
        self._procs.append(proc)
        return proc, url

    def comfymgr(self, state: str, comfyui_url: str | None, *, harness: list[str] | tuple[str, ...] = (),
                 **kw: Any) -> tuple[Proc, str]:
        harness = [*harness, *(["--no-accel"] if self.no_accel else [])]
        proc, url = start_comfymgr(self.logdir, self.work / state, comfyui_url, name=state, harness=harness,
                                   **kw)
        self._procs.append(proc)
        return proc, url

    def ref(self, kind: str, *args: str) -> tuple[Proc, str]:
        port = free_port()
        proc = self.proc(Proc(f"ref-{kind}-{port}", [PY, str(BENCH / "ref_server.py"), kind,
                                                     "--port", str(port), *args], self.logdir))
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc=proc.popen)
        return proc, url

    def stop_all(self) -> None:
        while self._procs:
            self._procs.pop().stop()

    def close(self) -> None:
        self.stop_all()
        shutil.rmtree(self.work, ignore_errors=True)


def fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "nan"
    if digits is not None:
        return f"{value:.{digits}f}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "MISSED", None: ""}[ok]


def wait_job(url: str, job_id: str, states: tuple[str, ...], timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = http_json("GET", f"{url}/v1/comfyui/workflow/{job_id}", headers=HEADERS)
        if status == 200 and job["status"] in states:
            return job
        time.sleep(0.01)
    raise TimeoutError(f"{job_id} never reached {states}")


def submit(url: str, workflow: dict[str, Any], **fields: Any) -> dict[str, Any]:
    status, job = http_json("POST", url + "/v1/comfyui/workflow", {"workflow": workflow, **fields}, HEADERS)
    if status != 202:
        raise RuntimeError(f"submit answered {status}: {job}")
    return job


async def submit_many(session: aiohttp.ClientSession, url: str, workflows: list[dict[str, Any]],
                      concurrency: int = 8) -> list[str]:
    ids: list[str] = [""] * len(workflows)
    it = iter(enumerate(workflows))

    async def worker() -> None:
        for i, wf in it:
            async with session.post(url + "/v1/comfyui/workflow", json={"workflow": wf},
                                    headers=HEADERS) as resp:
                body = await resp.json()
                if resp.status != 202:
                    raise RuntimeError(f"submit answered {resp.status}: {body}")
                ids[i] = body["workflowId"]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids


# =====================================================================================
# 1 and 2: submits and GET
# =====================================================================================

def _wrk_trials(s: Suite, targets: dict[str, tuple[str, Path, int]],
                seconds: float, trials: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Trials of every target in turn, the order reversed each round; each
    result also says how much CPU the server spent per request."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for target, script, _ in targets.values():  # warm-up
        wrk(target, script=script, connections=50, seconds=1)
    for trial in range(trials or s.trials):
        for name in list(targets) if trial % 2 == 0 else list(reversed(targets)):
            target, script, pid = targets[name]
            cpu = cpu_seconds(pid)
            result = wrk(target, script=script, connections=50, seconds=seconds)
            result["cpu_us"] = 1e6 * (cpu_seconds(pid) - cpu) / max(1, result.get("requests", 1))
            runs[name].append(result)
    return runs


def fig_http(s: Suite) -> None:
    seconds = 2.0 if s.quick else 3.0
    fake, furl = s.fake()
    cm, url = s.comfymgr("http", furl)
    wait_backend_up(url)
    # The backend is busy with one job that waits at a gate: submits queue up
    # behind it, as they do while a GPU works, and are checked against the
    # backend's /object_info like every real submit.
    http_json("POST", furl + "/__bench__/gate")
    running = submit(url, gate_workflow())
    wait_job(url, running["workflowId"], ("running",))

    # -- 2: GET of the running job, first: the submit load below leaves hundreds of
    # megabytes for the kernel to write back, which would weigh on what follows.
    ref_proc, ref_get = s.ref("get")
    get_cm = wrk_script(s.work, method="GET", headers=HEADERS)
    targets = {"comfymgr": (f"{url}/v1/comfyui/workflow/{running['workflowId']}", get_cm, cm.pid),
               "bare_get": (ref_get + "/job", get_cm, ref_proc.pid)}
    gets = _wrk_trials(s, targets, seconds)
    s.details["get"] = gets
    cm_rps, ref_rps = (median(r["rps"] for r in gets[n]) for n in ("comfymgr", "bare_get"))
    s.row("2", "GET /v1/comfyui/workflow/{id} (50 conns)", "req/s", cm_rps, ref_rps,
          ref_name="bare aiohttp GET -> JSON", target=">= 0.5x", ok=cm_rps / ref_rps >= 0.5)
    s.row("2", "GET latency p99", "ms", 1e3 * median(r["p99"] for r in gets["comfymgr"]),
          1e3 * median(r["p99"] for r in gets["bare_get"]), ref_name="bare aiohttp GET -> JSON")
    s.row("2", "  CPU per GET (server process, all threads)", "us",
          median(r["cpu_us"] for r in gets["comfymgr"]), median(r["cpu_us"] for r in gets["bare_get"]),
          ref_name="bare aiohttp GET -> JSON")

    # -- 1: submits, by graph size -------------------------------------------------------
    commit = {"commit_full": s.ref("commit", "--sync", "full", "--db", str(s.work / "ref-full.db"))}
    extra = {} if s.quick else {
        "parse": s.ref("parse"),
        "commit_normal": s.ref("commit", "--sync", "normal", "--db", str(s.work / "ref-normal.db"))}
    for nodes, size in GRAPH_SIZES:
        body = s.work / f"submit-{nodes}.json"
        body.write_text(json.dumps({"workflow": graph_workflow(nodes, size)}))
        post_cm = wrk_script(s.work, method="POST", body_path=body, headers=HEADERS)
        post_ref = wrk_script(s.work, method="POST", body_path=body)
        refs = {**commit, **(extra if nodes == GRAPH_SIZES[0][0] else {})}
        targets = {"comfymgr": (url + "/v1/comfyui/workflow", post_cm, cm.pid)}
        targets.update({name: (ref_url + "/submit", post_ref, proc.pid) for name, (proc, ref_url) in refs.items()})
        # Quick: the larger graphs get two trials each (a 1,000-node trial
        # is a few dozen submits a second anyway).
        runs = _wrk_trials(s, targets, seconds, 2 if s.quick and nodes != GRAPH_SIZES[0][0] else None)
        s.details[f"submit_{nodes}"] = runs
        bad = {name: sum(r["non_2xx"] + r["errors"] for r in rs) for name, rs in runs.items()}
        note = "" if not any(bad.values()) else f"errors: {bad}"
        cm_rps, ref_rps = (median(r["rps"] for r in runs[n]) for n in ("comfymgr", "commit_full"))
        what = f"{nodes:,} nodes, {size // 1000} KB"
        s.row("1", f"durable submits/s ({what}, 50 conns)", "req/s", cm_rps, ref_rps,
              ref_name="bare parse + commit (FULL)", target=">= 0.9x", ok=cm_rps / ref_rps >= 0.9, note=note)
        for pct in ("p50", "p99"):
            s.row("1", f"  submit latency {pct} ({what})", "ms", 1e3 * median(r[pct] for r in runs["comfymgr"]),
                  1e3 * median(r[pct] for r in runs["commit_full"]), ref_name="bare parse + commit (FULL)")
        s.row("1", f"  CPU per submit ({what}; server process, all threads)", "us",
              median(r["cpu_us"] for r in runs["comfymgr"]), median(r["cpu_us"] for r in runs["commit_full"]),
              ref_name="bare parse + commit (FULL)")
        if "parse" in runs:
            s.row("1", f"  reference: bare parse only ({what})", "req/s", None,
                  median(r["rps"] for r in runs["parse"]), ref_name="bare aiohttp POST + json.loads")
            s.row("1", f"  reference: parse + commit (NORMAL) ({what})", "req/s", None,
                  median(r["rps"] for r in runs["commit_normal"]), ref_name="synchronous=NORMAL")
    http_json("POST", furl + "/__bench__/release")
    s.stop_all()
    fig_big_submit(s)


def _post_raw(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, float]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    return status, time.monotonic() - started


def fig_big_submit(s: Suite) -> None:
    """One submit of a 10 MB graph: the longest comfymgr's event loop is held
    meanwhile (a 1 ms timer on the loop, common.LagProbe, and how late it
    fires), against the bare parse + commit server with the same probe."""
    nodes, size = BIG_GRAPH
    fake, furl = s.fake()
    cm, url = s.comfymgr("submit-10mb", furl, harness=["--lag-probe"])
    wait_backend_up(url)
    http_json("POST", furl + "/__bench__/gate")
    running = submit(url, gate_workflow())
    wait_job(url, running["workflowId"], ("running",))
    ref_proc, ref_url = s.ref("commit", "--sync", "full", "--db", str(s.work / "ref-10mb.db"), "--lag-probe")
    body = json.dumps({"workflow": graph_workflow(nodes, size)}).encode()
    sides = {"comfymgr": (url + "/v1/comfyui/workflow", HEADERS, url), "ref": (ref_url + "/submit", {}, ref_url)}
    runs: dict[str, list[dict[str, float]]] = {"comfymgr": [], "ref": []}
    for trial in range(-1, 2 if s.quick else s.trials):
        for name in (("comfymgr", "ref") if trial % 2 == 0 else ("ref", "comfymgr")):
            target, headers, base = sides[name]
            http_json("GET", base + "/__bench__/lag?reset=1", headers=headers)
            status, took = _post_raw(target, body, headers)
            if status != 202:
                raise RuntimeError(f"{name}: the 10 MB submit answered {status}")
            time.sleep(0.3)
            lag = http_json("GET", base + "/__bench__/lag?reset=1", headers=headers)[1]
            if trial >= 0:
                runs[name].append({"submit_s": took, **lag})
    s.details["submit_10mb"] = runs
    cm_ms, ref_ms = (median(r["max_ms"] for r in runs[n]) for n in ("comfymgr", "ref"))
    s.row("1", f"{size // 1_000_000} MB graph ({nodes:,} nodes): longest event-loop hold", "ms", cm_ms, ref_ms,
          ref_name="bare parse + commit (FULL), same probe", target="<= 50 ms", ok=cm_ms <= 50,
          note=f"1 ms timer on the loop; median of {len(runs['comfymgr'])} submits")
    s.row("1", f"  {size // 1_000_000} MB graph: submit -> 202", "ms",
          1e3 * median(r["submit_s"] for r in runs["comfymgr"]), 1e3 * median(r["submit_s"] for r in runs["ref"]),
          ref_name="bare parse + commit (FULL)")
    http_json("POST", furl + "/__bench__/release")
    s.stop_all()


# =====================================================================================
# 3: dispatch
# =====================================================================================

def _timeline(furl: str, clear: bool = False) -> dict[str, list]:
    return http_json("GET", furl + "/__bench__/timeline" + ("?clear=1" if clear else ""))[1]


def analyse_dispatch(tl: dict[str, list], gate_pid: str | None) -> dict[str, Any]:
    """From the fake's timeline: jobs in execution order, the gap from each
    one's execution_success to the next one's POST /prompt, and the GPU's idle
    time (execution_success to the next execution_start)."""
    starts = sorted((t, pid) for t, kind, pid in tl["emit"] if kind == "execution_start")
    success = {pid: t for t, kind, pid in tl["emit"] if kind == "execution_success"}
    posts = {pid: arrived for arrived, _, pid in tl["post"]}
    order = [pid for _, pid in starts]
    start_at = {pid: t for t, pid in starts}
    if gate_pid is not None and gate_pid in order:
        order = order[order.index(gate_pid):]
    gaps, idles = [], []
    for a, b in zip(order, order[1:]):
        if a not in success:
            continue
        idles.append(start_at[b] - success[a])
        if b in posts:
            gaps.append(posts[b] - success[a])
    done = [success[p] for p in order if p in success]
    jobs = len(order) - 1
    elapsed = done[-1] - done[0] if len(done) > 1 else float("nan")
    return {"jobs": jobs, "elapsed": elapsed, "jobs_per_s": jobs / elapsed if elapsed else float("nan"),
            "gap_median": median(gaps) if gaps else None, "gap_p90": percentile(gaps, 90) if gaps else None,
            "idle_median": median(idles) if idles else None, "idle_p90": percentile(idles, 90) if idles else None,
            "pairs": len(idles), "gaps": gaps, "idles": idles}


async def _dispatch_through(url: str, furl: str, n: int, base: int,
                            make: Callable[[int], dict[str, Any]] = quick_workflow) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        await session.post(furl + "/__bench__/gate")
        gate = submit(url, gate_workflow(base))
        job = wait_job(url, gate["workflowId"], ("running",))
        await submit_many(session, url, [make(base + 1 + i) for i in range(n)])
        _timeline(furl, clear=True)
        await session.post(furl + "/__bench__/release")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            async with session.get(url + "/v1/status", headers=HEADERS) as resp:
                by_status = (await resp.json())["queue"]["byStatus"]
            if by_status["queued"] == 0 and by_status["running"] == 0:
                break
            await asyncio.sleep(0.02)
        else:
            raise TimeoutError("comfymgr did not finish the jobs in 120 s")
    return analyse_dispatch(_timeline(furl), job["promptId"])


async def _dispatch_direct(furl: str, n: int, base: int,
                           make: Callable[[int], dict[str, Any]] = quick_workflow) -> dict[str, Any]:
    """The same jobs posted straight to the fake, as a client of ComfyUI would."""
    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(f"{furl}/ws?clientId={client_id}") as ws:
        await session.post(furl + "/__bench__/gate")
        gate_pid = str(uuid.uuid4())
        await session.post(furl + "/prompt", json={"prompt": gate_workflow(base), "prompt_id": gate_pid,
                                                   "client_id": client_id})
        sem = asyncio.Semaphore(8)

        async def post(i: int) -> None:
            async with sem, session.post(furl + "/prompt", json={
                    "prompt": make(base + 1 + i), "client_id": client_id}) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"POST /prompt answered {resp.status}")

        await asyncio.gather(*(post(i) for i in range(n)))
        _timeline(furl, clear=True)
        await session.post(furl + "/__bench__/release")
        finished = 0
        deadline = time.monotonic() + 120
        while finished < n + 1 and time.monotonic() < deadline:
            msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            if msg.type == aiohttp.WSMsgType.TEXT and '"execution_success"' in msg.data:
                finished += 1
            elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                raise RuntimeError("the fake closed the WebSocket")
    tl = _timeline(furl)
    tl["emit"] = [(time.monotonic() - 1e9, "execution_start", gate_pid)] + tl["emit"]  # the gate ran before
    return analyse_dispatch(tl, gate_pid)


def dispatch_breakdown(tl: dict[str, list], trace: dict[str, Any]) -> dict[str, Any]:
    """Where the time between one job's execution_success and the next POST
    /prompt goes, step by step, from the fake's timeline and comfymgr's trace
    (both on the monotonic clock); medians over consecutive job pairs."""
    steps = trace["steps"]
    by = {}
    for label, t0, t1, key in steps:
        by.setdefault(label, []).append((t0, t1, key))
    finish = {k: (t0, t1) for t0, t1, k in by.get("bridge.finish", [])}
    history = {k: (t0, t1) for t0, t1, k in by.get("http.history", [])}
    end = {k: (t0, t1) for t0, t1, k in by.get("bridge.end", [])}
    post = {k: (t0, t1) for t0, t1, k in by.get("http.post_prompt", [])}
    claim = {k: (t0, t1) for t0, t1, k in by.get("db.claim", [])}
    markers = sorted(t0 for t0, _, _ in by.get("ws.end_marker", []))
    writes = sorted(by.get("db.write", []))
    batches = sorted(by.get("db.batch", []))
    dispatches = sorted(by.get("bridge.dispatch_next", []))
    success = {pid: t for t, kind, pid in tl["emit"] if kind == "execution_success"}
    marker_sent = {pid: t for t, kind, pid in tl["sent"] if kind == "executing"}
    fake_post = {pid: t for t, _, pid in tl["post"]}
    fake_hist = {pid: (a, d) for a, d, pid in tl["history"]}
    order = [pid for _, pid in sorted((t, pid) for t, kind, pid in tl["emit"] if kind == "execution_start")]

    def first_after(seq, t, key=lambda x: x):
        for item in seq:
            if key(item) >= t:
                return item
        return None

    def covering(seq, t0, t1):
        return [x for x in seq if x[0] >= t0 and x[1] <= t1]

    segments: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        segments.setdefault(name, []).append(value)

    for a, b in zip(order, order[1:]):
        try:
            t_succ, t_sent = success[a], marker_sent[a]
            t_recv = first_after(markers, t_sent)
            f0, f1 = finish[a]
            h0, h1 = history[a]
            e0, e1 = end[a]
            c0, c1 = claim[b]
            p0, _ = post[b]
            t_post = fake_post[b]
        except (KeyError, TypeError):
            continue
        if t_recv is None or not (t_succ <= t_sent <= t_recv <= f0 <= h0 <= h1 <= e0 <= e1 <= c0 <= p0 <= t_post):
            continue
        disp = [d for d in dispatches if d[0] <= c0 <= d[1]]
        d0 = disp[0][0] if disp else e1
        end_write = [w for w in covering(writes, e0, e1) if w[2] in ("_end", "_end_locked")]
        claim_write = [w for w in writes if w[0] <= c0 and w[1] >= c1]
        end_batch = [x for x in batches if e0 <= x[0] and x[1] <= e1]
        claim_batch = [x for x in batches if x[0] <= c0 and x[1] >= c1]
        add("a fake: execution_success -> end marker on the socket", t_sent - t_succ)
        add("b WebSocket: end marker written -> read by comfymgr", t_recv - t_sent)
        add("c comfymgr: marker read -> finish() (parse, lock)", f0 - t_recv)
        add("d GET /history round trip", h1 - h0)
        if a in fake_hist:
            add("d' of which the fake's handler", fake_hist[a][1] - fake_hist[a][0])
        add("e history -> _end() starts", e0 - h1)
        add("f _end(): the job's end written (one commit)", e1 - e0)
        if end_write:
            w0, w1, _ = end_write[-1]
            add("f' of which waiting for the DB thread's queue + hop back", (w1 - w0) - sum(
                x[1] - x[0] for x in end_batch))
            add("f'' of which the transaction (COMMIT, fsync)", sum(x[1] - x[0] for x in end_batch))
        add("g _end() -> dispatch_next() runs (wake-up, lock)", d0 - e1)
        add("h dispatch_next() -> claim written (one commit)",
            (claim_write[0][1] if claim_write else c1) - d0)
        if claim_batch:
            add("h' of which the transaction (COMMIT, fsync)", claim_batch[0][1] - claim_batch[0][0])
        add("i claim -> POST /prompt sent (parse workflow, run state)",
            p0 - (claim_write[0][1] if claim_write else c1))
        add("j POST /prompt sent -> arrives at the fake", t_post - p0)
        add("= gap: execution_success -> next POST /prompt", t_post - t_succ)
    return {name: {"median_ms": 1e3 * median(v), "p90_ms": 1e3 * percentile(v, 90), "n": len(v)}
            for name, v in segments.items()}


def prefetch_breakdown(tl: dict[str, list], trace: dict[str, Any]) -> dict[str, Any]:
    """With prefetch, the next job is claimed and posted as soon as the
    current one starts: the path from one job's execution_start to the next
    one's POST /prompt, step by step (medians over job pairs)."""
    by: dict[str, list] = {}
    for label, t0, t1, key in trace["steps"]:
        by.setdefault(label, []).append((t0, t1, key))
    running = {k: (t0, t1) for t0, t1, k in by.get("bridge.mark_running", [])}
    finish = {k: (t0, t1) for t0, t1, k in by.get("bridge.finish", [])}
    history = {k: (t0, t1) for t0, t1, k in by.get("http.history", [])}
    end = {k: (t0, t1) for t0, t1, k in by.get("bridge.end", [])}
    post = {k: (t0, t1) for t0, t1, k in by.get("http.post_prompt", [])}
    claim = {k: (t0, t1) for t0, t1, k in by.get("db.claim", [])}
    reads = sorted(t0 for t0, _, _ in by.get("ws.start", []))
    writes = sorted(by.get("db.write", []))
    dispatches = sorted(by.get("bridge.dispatch_next", []))
    started = {pid: t for t, kind, pid in tl["emit"] if kind == "execution_start"}
    success = {pid: t for t, kind, pid in tl["emit"] if kind == "execution_success"}
    fake_post = {pid: t for t, _, pid in tl["post"]}
    order = [pid for _, pid in sorted((t, pid) for pid, t in started.items())]
    segments: dict[str, list[float]] = {}
    woken_by_end = 0

    def add(name: str, value: float) -> None:
        segments.setdefault(name, []).append(value)

    def overlap(span: tuple[float, float] | None, lo: float, hi: float) -> float:
        return max(0.0, min(span[1], hi) - max(span[0], lo)) if span else 0.0

    for prev, a, b in zip(order, order[1:], order[2:]):
        try:
            t_start, (m0, m1), (c0, c1), (p0, _), t_post = (started[a], running[a], claim[b], post[b],
                                                           fake_post[b])
        except KeyError:
            continue
        t_read = next((t for t in reads if t >= t_start), None)
        disp = [d for d in dispatches if d[0] <= c0 <= d[1]]
        if t_read is None or not disp or not t_start <= t_read <= m0 <= m1 <= c0 <= p0 <= t_post:
            continue
        d0 = disp[0][0]
        claim_write = [w for w in writes if w[0] <= c0 and w[1] >= c1]
        cw1 = claim_write[0][1] if claim_write else c1
        if d0 < m1:
            continue
        if a in success and success[a] < d0 and any(
                label == "bridge.end" and key == a and t1 <= d0 for label, _, t1, key in trace["steps"]):
            woken_by_end += 1  # not prefetched: the job had ended before the claim
        add("a fake: execution_start emitted -> read by comfymgr", t_read - t_start)
        # What the socket's reader was doing meanwhile: the previous job's end.
        if prev in finish and prev in history:
            f0, _ = finish[prev]
            h0, _ = history[prev]
            add("a' of which waiting for the backend lock (dispatch_next holds it)",
                overlap((f0, h0), t_start, t_read))
            add("a'' of which GET /history of the previous job", overlap(history[prev], t_start, t_read))
            add("a''' of which the previous job's end written (one commit)",
                overlap(end.get(prev), t_start, t_read))
        add("b read -> running recorded (one commit)", m1 - t_read)
        add("c -> dispatch_next() runs (wake-up, lock)", d0 - m1)
        add("d dispatch_next() -> claim written (one commit)", cw1 - d0)
        add("e claim -> POST /prompt sent", p0 - cw1)
        add("f POST /prompt sent -> arrives at the fake", t_post - p0)
        add("= execution_start -> next POST /prompt", t_post - t_start)
        if a in success:
            add("  (execution_start -> execution_success of the 0 ms job)", success[a] - t_start)
    out = {name: {"median_ms": 1e3 * median(v), "p90_ms": 1e3 * percentile(v, 90), "n": len(v)}
           for name, v in segments.items()}
    out["pairs where the job had ended before the claim"] = {"median_ms": float("nan"), "p90_ms": float("nan"),
                                                            "n": woken_by_end}
    return out


def ack_prefetch_breakdown(tl: dict[str, list], trace: dict[str, Any]) -> dict[str, Any]:
    """Where the next job is handed over as soon as the current one's POST
    /prompt is acknowledged: for consecutive jobs a, b, the path from a's
    acknowledgement to b's POST arriving at the fake, and how far ahead of
    a's end b arrived (negative: after it; the GPU then waited)."""
    by: dict[str, list] = {}
    for label, t0, t1, key in trace["steps"]:
        by.setdefault(label, []).append((t0, t1, key))
    post = {k: (t0, t1) for t0, t1, k in by.get("http.post_prompt", [])}
    claim = {k: (t0, t1) for t0, t1, k in by.get("db.claim", [])}
    started = {pid: t for t, kind, pid in tl["emit"] if kind == "execution_start"}
    success = {pid: t for t, kind, pid in tl["emit"] if kind == "execution_success"}
    fake_post = {pid: t for t, _, pid in tl["post"]}
    order = [pid for _, pid in sorted((t, pid) for pid, t in started.items())]
    segments: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        segments.setdefault(name, []).append(value)

    for a, b in zip(order, order[1:]):
        try:
            (_, acked), (c0, c1), (p0, _), arrived, ended = post[a], claim[b], post[b], fake_post[b], success[a]
        except KeyError:
            continue
        if not acked <= c0 <= c1 <= p0 <= arrived:
            continue  # b was not claimed after a's acknowledgement (e.g. it queued later)
        add("a POST of one acknowledged -> claim of the next starts", c0 - acked)
        add("b the claim (Storage.claim)", c1 - c0)
        add("c claim -> next POST sent (its commit, the run's state)", p0 - c1)
        add("d next POST in flight to the fake", arrived - p0)
        add("= acknowledged -> next POST arrives", arrived - acked)
        add("  next POST arrived ahead of the current job's end (negative: late)", ended - arrived)
    return {name: {"median_ms": 1e3 * median(v), "p90_ms": 1e3 * percentile(v, 90), "n": len(v)}
            for name, v in segments.items()}


def _print_breakdown(title: str, breakdown: dict[str, Any]) -> None:
    print(f"      {title}")
    for name, v in breakdown.items():
        print(f"        {name:<62} {v['median_ms']:7.3f} ms  (p90 {v['p90_ms']:.3f}, n={v['n']})")


def fig_dispatch(s: Suite) -> None:
    n = 100 if s.quick else 300
    fake, furl = s.fake()
    instances = {"prefetch": s.comfymgr("dispatch-prefetch", furl),
                 "no_prefetch": s.comfymgr("dispatch-noprefetch", furl, COMFYMGR_PREFETCH="false")}
    for _, url in instances.values():
        wait_backend_up(url)
    results: dict[str, list[dict[str, Any]]] = {"direct": [], **{k: [] for k in instances}}
    base = 1000
    names = ["direct", *instances]
    for trial in range(s.trials):
        for name in names if trial % 2 == 0 else list(reversed(names)):
            base += n + 10
            if name == "direct":
                res = asyncio.run(_dispatch_direct(furl, n, base))
            else:
                res = asyncio.run(_dispatch_through(instances[name][1], furl, n, base))
            results[name].append(res)
    s.stop_all()

    # Jobs that take 20 ms: what prefetch is for.
    m = 30 if s.quick else 60
    fake, furl = s.fake(extra=["--node-delay", "ImageInvert=0.02"])
    timed = {"prefetch": s.comfymgr("dispatch20-prefetch", furl),
             "no_prefetch": s.comfymgr("dispatch20-noprefetch", furl, COMFYMGR_PREFETCH="false")}
    for _, url in timed.values():
        wait_backend_up(url)
    slow: dict[str, list[dict[str, Any]]] = {"direct": [], **{k: [] for k in timed}}
    for trial in range(s.trials):
        for name in names if trial % 2 == 0 else list(reversed(names)):
            base += m + 10
            if name == "direct":
                res = asyncio.run(_dispatch_direct(furl, m, base, timed_workflow))
            else:
                res = asyncio.run(_dispatch_through(timed[name][1], furl, m, base, timed_workflow))
            slow[name].append(res)
    s.stop_all()
    strip = lambda rs: [{x: y for x, y in r.items() if x not in ("gaps", "idles")} for r in rs]  # noqa: E731
    s.details["dispatch"] = {"0ms": {k: strip(v) for k, v in results.items()},
                             "20ms": {k: strip(v) for k, v in slow.items()}}

    direct = median(r["jobs_per_s"] for r in results["direct"])
    idle_direct = median(r["idle_median"] for r in results["direct"])
    for name, label in (("prefetch", "prefetch on (default)"), ("no_prefetch", "prefetch off")):
        rs = results[name]
        s.row("3", f"0 ms jobs/s through comfymgr, {label}", "jobs/s", median(r["jobs_per_s"] for r in rs),
              direct, ref_name="POSTed straight to the fake")
        gap = median(r["gap_median"] for r in rs if r["gap_median"] is not None)
        s.row("3", f"gap success -> next POST, {label}", "ms", 1e3 * gap, None, target="<= 2 ms",
              ok=gap <= 0.002)
        s.row("3", f"GPU idle success -> next start, {label}", "ms",
              1e3 * median(r["idle_median"] for r in rs), 1e3 * idle_direct, ref_name="straight to the fake")
    idle_direct = median(r["idle_median"] for r in slow["direct"])
    for name, label in (("prefetch", "prefetch on (default)"), ("no_prefetch", "prefetch off")):
        s.row("3", f"20 ms jobs: GPU idle between jobs, {label}", "ms",
              1e3 * median(r["idle_median"] for r in slow[name]), 1e3 * idle_direct,
              ref_name="straight to the fake")

    # Traced runs: where the time goes, without and with prefetch.
    breakdowns = {}
    for label, env in (("prefetch off", {"COMFYMGR_PREFETCH": "false"}), ("prefetch on", {})):
        fake, furl = s.fake()
        cm, url = s.comfymgr("dispatch-traced-" + label.split()[-1], furl, harness=["--trace"], **env)
        wait_backend_up(url)
        http_json("GET", url + "/__bench__/trace?clear=1", headers=HEADERS)
        res = asyncio.run(_dispatch_through(url, furl, n, 10_000_000))
        trace = http_json("GET", url + "/__bench__/trace", headers=HEADERS)[1]
        tl = _timeline(furl)
        if env:
            breakdowns[label] = dispatch_breakdown(tl, trace)
            _print_breakdown("where the gap goes, prefetch off (traced run; medians over job pairs):",
                             breakdowns[label])
        else:
            # Prefetch at execution_start (comfymgr until the per-job work)
            # or when the current POST is acknowledged (since): whichever
            # path the trace shows.
            at_start = prefetch_breakdown(tl, trace)
            if at_start.get("= execution_start -> next POST /prompt", {}).get("n"):
                breakdowns[label] = at_start
                _print_breakdown("execution_start -> next POST, prefetch on (traced run):", at_start)
            else:
                breakdowns[label] = ack_prefetch_breakdown(tl, trace)
                _print_breakdown("POST acknowledged -> next POST, prefetch on (traced run):", breakdowns[label])
        breakdowns[label + " traced gap median ms"] = 1e3 * (res["gap_median"] or float("nan"))
        s.stop_all()
    s.details["dispatch_breakdown"] = breakdowns


# =====================================================================================
# 4: stream fan-out (and memory with 1,000 clients)
# =====================================================================================

class Listeners:
    """N WebSocket clients in this process; records when each message arrived."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrivals: dict[int, list[float]] = {}
        self.complete: dict[int, asyncio.Event] = {}
        self.completed: asyncio.Queue[int] = asyncio.Queue()  # seqs every client has
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.tasks: list[asyncio.Task] = []

    def waiter(self, seq: int) -> asyncio.Event:
        return self.complete.setdefault(seq, asyncio.Event())

    async def connect(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        sem = asyncio.Semaphore(50)

        async def one() -> None:
            async with sem:
                ws = await session.ws_connect(url, headers=headers, heartbeat=None, autoping=True)
            self.sockets.append(ws)
            self.tasks.append(asyncio.ensure_future(self._read(ws)))

        await asyncio.gather(*(one() for _ in range(self.n)))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            now = time.monotonic()
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            m = re.search(r'"seq":(\d+)', msg.data)
            if not m or '"workflow:queued"' not in msg.data:
                continue
            seq = int(m.group(1))
            got = self.arrivals.setdefault(seq, [])
            got.append(now)
            if len(got) == self.n:
                self.waiter(seq).set()
                self.completed.put_nowait(seq)

    async def close(self) -> None:
        await asyncio.gather(*(ws.close() for ws in self.sockets), return_exceptions=True)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _stream(s: Suite, clients: int, triggers: int) -> None:
    raise_fd_limit()
    cm, url = s.comfymgr("stream", None, harness=["--trace"])
    ref, ref_url = s.ref("fanout")
    time.sleep(1.0)
    rss = {"idle": cm.rss_kb()}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        cm_l, ref_l = Listeners(clients), Listeners(clients)
        await cm_l.connect(session, url.replace("http", "ws") + "/v1/comfyui/stream", HEADERS)
        await ref_l.connect(session, ref_url.replace("http", "ws") + "/ws", {})
        await asyncio.sleep(0.5)
        rss["clients"] = cm.rss_kb()
        lat: dict[str, list[dict[str, float]]] = {"comfymgr": [], "bare": []}
        for i in range(-1, triggers):  # -1: a warm-up round, not counted
            for name in (("comfymgr", "bare") if i % 2 == 0 else ("bare", "comfymgr")):
                if name == "comfymgr":
                    async with session.post(url + "/v1/comfyui/workflow", headers=HEADERS,
                                            json={"workflow": quick_workflow(i + 1)}) as resp:
                        if resp.status != 202:
                            raise RuntimeError(f"submit answered {resp.status}")
                    seq = await asyncio.wait_for(cm_l.completed.get(), 10)
                    async with session.get(url + "/__bench__/trace", headers=HEADERS) as resp:
                        t0 = (await resp.json())["commits"][str(seq)]
                    times = sorted(cm_l.arrivals[seq])
                else:
                    async with session.post(ref_url + "/broadcast") as resp:
                        info = await resp.json()
                    seq, t0 = info["seq"], info["t0"]
                    await asyncio.wait_for(ref_l.waiter(seq).wait(), 10)
                    times = sorted(ref_l.arrivals[seq])
                if i >= 0:
                    lat[name].append({"first": times[0] - t0, "median": times[len(times) // 2] - t0,
                                      "last": times[-1] - t0})
                await asyncio.sleep(0.05)
        rss["clients_after_messages"] = cm.rss_kb()
        await cm_l.close()
        await ref_l.close()
    await asyncio.sleep(1.0)
    rss["after_close"] = cm.rss_kb()
    s.details["stream"] = {"latency": lat, "rss_kb": rss, "clients": clients}
    last_cm, last_ref = (median(x["last"] for x in lat[n]) for n in ("comfymgr", "bare"))
    s.row("4", f"commit -> delivery at the {clients:,}th subscriber", "ms", 1e3 * last_cm, 1e3 * last_ref,
          ref_name="bare aiohttp fan-out, 200 B", target="<= 1.5x", ok=last_cm / last_ref <= 1.5)
    s.row("4", "  commit -> first delivery", "ms", 1e3 * median(x["first"] for x in lat["comfymgr"]),
          1e3 * median(x["first"] for x in lat["bare"]))
    s.row("4", "  per client (last delivery / clients)", "us", 1e6 * last_cm / clients, 1e6 * last_ref / clients)
    s.row("7", f"RSS with {clients:,} stream clients", "MB", rss["clients_after_messages"] / 1024,
          rss["idle"] / 1024, ref_name="the same process idle", note=f"after they closed: {rss['after_close'] / 1024:.1f} MB")
    s.stop_all()


def fig_stream(s: Suite) -> None:
    asyncio.run(_stream(s, 1000, 10 if s.quick else 20))


async def _stream_scale(s: Suite, clients: int, triggers: int, burst: int) -> None:
    """Issue 4's figures for one subscriber count: commit -> delivery at the
    last subscriber (median and p99 over `triggers` events, one at a time),
    then events/s sustained: `burst` submits from 20 concurrent clients, timed
    until every subscriber has every one of their events."""
    raise_fd_limit()
    cm, url = s.comfymgr(f"stream-scale-{clients}", None, harness=["--trace"])
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        listeners = Listeners(clients)
        await listeners.connect(session, url.replace("http", "ws") + "/v1/comfyui/stream", HEADERS)
        await asyncio.sleep(0.5)
        last: list[float] = []
        for i in range(-2, triggers):  # two warm-up rounds, not counted
            async with session.post(url + "/v1/comfyui/workflow", headers=HEADERS,
                                    json={"workflow": quick_workflow(i + 10)}) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"submit answered {resp.status}")
            seq = await asyncio.wait_for(listeners.completed.get(), 30)
            async with session.get(url + "/__bench__/trace", headers=HEADERS) as resp:
                t0 = (await resp.json())["commits"][str(seq)]
            if i >= 0:
                last.append(max(listeners.arrivals[seq]) - t0)
            await asyncio.sleep(0.02)
        while not listeners.completed.empty():
            listeners.completed.get_nowait()
        sem = asyncio.Semaphore(20)

        async def one(k: int) -> None:
            async with sem, session.post(url + "/v1/comfyui/workflow", headers=HEADERS,
                                         json={"workflow": quick_workflow(100_000 + k)}) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"submit answered {resp.status}")

        started = time.monotonic()
        await asyncio.gather(*(one(k) for k in range(burst)))
        for _ in range(burst):
            await asyncio.wait_for(listeners.completed.get(), 60)
        elapsed = time.monotonic() - started
        await listeners.close()
    s.details.setdefault("stream_scale", {})[clients] = {"last_s": last, "burst": burst, "elapsed_s": elapsed}
    s.row("4", f"commit -> last of {clients:,} subscribers, median", "ms", 1e3 * median(last))
    s.row("4", f"commit -> last of {clients:,} subscribers, p99", "ms", 1e3 * percentile(last, 99))
    s.row("4", f"events/s sustained to {clients:,} subscribers", "events/s", burst / elapsed,
          note=f"{burst} submits, 20 at a time, until every subscriber had every event "
               f"({burst * clients / elapsed:,.0f} deliveries/s)")
    s.stop_all()


def fig_stream_scale(s: Suite) -> None:
    for clients, burst in ((100, 1000 if s.quick else 2000), (1000, 300 if s.quick else 500)):
        asyncio.run(_stream_scale(s, clients, 20 if s.quick else 50, burst))


# =====================================================================================
# 5: queue depth
# =====================================================================================

def build_queue(path: Path, depth: int, *, state: str = "queued", events: bool = False) -> float:
    """A comfymgr database with `depth` jobs, written directly (one transaction,
    the counting trigger replaced by one count at the end). Returns seconds."""
    import comfymgr
    started = time.monotonic()
    storage = comfymgr.Storage(path, synchronous="normal")
    storage.close()
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    trigger = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'jobs_counted_insert'").fetchone()[0]
    workflow = json.dumps(quick_workflow(0), separators=(",", ":"))
    now = int(time.time() * 1000) - depth
    conn.execute("BEGIN")
    conn.execute("DROP TRIGGER jobs_counted_insert")
    done = state != "queued"
    conn.executemany(
        "INSERT INTO jobs (id, priority, state, status, target, workflow, created_at, updated_at, "
        "started_at, completed_at, backend, prompt_id, attempts, progress, outputs) "
        "VALUES (?, 1, ?, ?, 'any', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ((str(uuid.uuid4()), state, state, workflow, now + i, now + i,
          now + i if done else None, now + i + 1 if done else None, "local" if done else None,
          str(uuid.uuid4()) if done else None, 1 if done else 0, 100.0 if done else 0.0,
          json.dumps([{"filename": f"q_{i:05d}_.png", "subfolder": "", "type": "output", "nodeId": "2",
                       "kind": "images", "url": f"/v1/comfyui/output/q_{i:05d}_.png"}]) if done else None)
         for i in range(depth)))
    conn.execute("INSERT INTO job_counts (state, priority, n) SELECT state, priority, COUNT(*) FROM jobs "
                 "GROUP BY state, priority")
    if events:
        conn.execute("INSERT INTO events (job_id, type, ts, data) SELECT id, 'workflow:queued', created_at, "
                     "'{\"status\":\"queued\",\"priority\":\"normal\",\"queuePosition\":1}' FROM jobs")
        if done:
            conn.execute("INSERT INTO events (job_id, type, ts, data) SELECT id, 'workflow:started', started_at, "
                         "'{\"status\":\"running\"}' FROM jobs")
            conn.execute("INSERT INTO events (job_id, type, ts, data) SELECT id, 'workflow:completed', "
                         "completed_at, json_object('status', 'completed', 'outputs', json(outputs)) FROM jobs")
    conn.execute(trigger)
    conn.execute("COMMIT")
    conn.close()
    return time.monotonic() - started


def fig_depth(s: Suite) -> None:
    import comfymgr
    # Quick: 200,000 for the deepest (a million takes a minute to build here).
    depths = (1_000, 100_000, 200_000 if s.quick else 1_000_000)
    calls = 200 if s.quick else 400
    per: dict[int, dict[str, Any]] = {}
    stores, last = {}, {}
    for depth in depths:
        path = s.work / f"depth-{depth}" / "comfymgr.db"
        path.parent.mkdir()
        per[depth] = {"build_s": build_queue(path, depth)}
        stores[depth] = comfymgr.Storage(path, synchronous="normal")
        last[depth] = stores[depth]._conn.execute("SELECT id FROM jobs ORDER BY n DESC LIMIT 1").fetchone()[0]
    text = json.dumps(quick_workflow(1), separators=(",", ":"))
    enq: dict[int, list[float]] = {d: [] for d in depths}
    claim: dict[int, list[float]] = {d: [] for d in depths}
    pos_last: dict[int, list[float]] = {d: [] for d in depths}
    for storage in stores.values():
        for _ in range(50):  # warm-up: SQLite's page cache, the statement cache
            storage.enqueue(str(uuid.uuid4()), text, comfymgr.Priority.NORMAL, "any", 1)
            storage.claim("local", str(uuid.uuid4()), 1)
    rounds = 10
    for r in range(rounds):  # the depths take turns, so that the machine's noise falls on all
        for depth in depths if r % 2 == 0 else reversed(depths):
            storage = stores[depth]
            for _ in range(calls // rounds):
                t = time.perf_counter()
                storage.enqueue(str(uuid.uuid4()), text, comfymgr.Priority.NORMAL, "any", 1)
                enq[depth].append(time.perf_counter() - t)
                t = time.perf_counter()
                storage.claim("local", str(uuid.uuid4()), 1)
                claim[depth].append(time.perf_counter() - t)
            if r < (3 if depth >= 1_000_000 else rounds):
                t = time.perf_counter()
                storage.position(storage.get(last[depth]))
                pos_last[depth].append(time.perf_counter() - t)
    for depth, storage in stores.items():
        storage.close()
        per[depth].update(enqueue_us=1e6 * median(enq[depth]), claim_us=1e6 * median(claim[depth]),
                          position_of_last_ms=1e3 * median(pos_last[depth]))
    # Through HTTP: the durable submit (FULL) and a GET of the job at the back, per depth.
    for depth in depths:
        cm, url = s.comfymgr(f"depth-{depth}", None)
        lat = []
        for i in range(60 if s.quick else 120):
            t = time.perf_counter()
            submit(url, quick_workflow(i))
            lat.append(time.perf_counter() - t)
        per[depth]["http_submit_ms"] = 1e3 * median(lat)
        per[depth]["rss_mb"] = cm.rss_kb() / 1024
        s.stop_all()
    s.details["depth"] = per
    base = per[depths[0]]
    for key, label, unit in (("enqueue_us", "enqueue (storage, no fsync)", "us"),
                             ("claim_us", "claim next (storage, no fsync)", "us"),
                             ("http_submit_ms", "HTTP submit, one client (FULL)", "ms")):
        for depth in depths[1:]:
            value = per[depth][key]
            s.row("5", f"{label} @ {depth:,} queued", unit, value, base[key], ref_name="the same @ 1,000",
                  target="<= 2x" if key != "http_submit_ms" or depth == depths[-1] else "",
                  ok=value / base[key] <= 2 if key != "http_submit_ms" or depth == depths[-1] else None)
    for depth in depths:
        s.row("5", f"  queue position of the last job @ {depth:,}", "ms", per[depth]["position_of_last_ms"],
              None, note="block counts + one block's index range (GET of a queued job)")


# =====================================================================================
# 6: /metrics
# =====================================================================================

def exercise_routes(url: str, furl: str) -> None:
    """Every route, with the statuses clients cause, and real jobs on every backend."""
    bad = {"X-API-Key": "wrong"}
    for i in range(16):
        job = submit(url, quick_workflow(500_000 + i), gpu=f"gpu{i % 8}")
    wait_job(url, job["workflowId"], ("completed", "failed"))
    broken = {"1": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "e"}}}
    http_json("POST", url + "/v1/comfyui/workflow", {"workflow": broken}, HEADERS)
    http_json("POST", url + "/v1/comfyui/workflow", {"workflow": {"1": {"class_type": "Nope", "inputs": {}}}}, HEADERS)
    http_json("POST", url + "/v1/comfyui/workflow", {"nope": 1}, HEADERS)
    http_json("POST", url + "/v1/comfyui/workflow", {"workflow": quick_workflow(1)}, bad)
    http_json("POST", furl + "/__bench__/gate")
    gated = submit(url, gate_workflow(77), gpu="gpu0")
    queued = submit(url, quick_workflow(600_001), gpu="gpu0")
    http_json("DELETE", f"{url}/v1/comfyui/workflow/{queued['workflowId']}", headers=HEADERS)
    http_json("DELETE", f"{url}/v1/comfyui/workflow/{queued['workflowId']}", headers=HEADERS)
    http_json("DELETE", f"{url}/v1/comfyui/workflow/{uuid.uuid4()}", headers=HEADERS)
    http_json("POST", furl + "/__bench__/release")
    wait_job(url, gated["workflowId"], ("completed", "failed"))
    for path in ("/v1/comfyui/workflow/" + job["workflowId"], "/v1/comfyui/workflow/" + str(uuid.uuid4()),
                 "/v1/comfyui/workflows", "/v1/comfyui/workflows?limit=0", "/v1/comfyui/models",
                 "/v1/comfyui/outputs", "/v1/comfyui/output/nope.png", "/v1/comfyui/stream",
                 "/health", "/v1/status", "/metrics", "/openapi.json", "/docs", "/docs/init.js",
                 "/docs/assets/nope.js", "/no/such/route"):
        http_json("GET", url + path, headers=HEADERS)
    http_json("POST", url + "/v1/comfyui/inputs", {"x": 1}, HEADERS)
    http_json("PATCH", url + "/v1/comfyui/workflows", {}, HEADERS)
    http_json("GET", url + "/v1/comfyui/workflows", headers=bad)

    async def stream() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url.replace("http", "ws") + "/v1/comfyui/stream", headers=HEADERS) as ws:
                await ws.send_json({"type": "ping"})
                await ws.receive(timeout=5)
    asyncio.run(stream())


def fig_metrics(s: Suite) -> None:
    import urllib.request
    fake, furl = s.fake()
    backends = ",".join(f"gpu{i}={furl}@{i}" for i in range(8))
    cm, url = s.comfymgr("metrics", None, harness=["--fake-gpus", "8"], COMFYUI_BACKENDS=backends)
    wait_backend_up(url)
    exercise_routes(url, furl)
    _, ref_url = s.ref("metrics")

    def scrape(target: str) -> tuple[float, bytes]:
        t = time.perf_counter()
        with urllib.request.urlopen(target, timeout=10) as resp:
            body = resp.read()
        return time.perf_counter() - t, body

    n = 30 if s.quick else 60
    times: dict[str, list[float]] = {"comfymgr": [], "ref": []}
    for _ in range(5):
        scrape(url + "/metrics"), scrape(ref_url + "/metrics")
    for trial in range(s.trials):
        for name in (("comfymgr", "ref") if trial % 2 == 0 else ("ref", "comfymgr")):
            target = url + "/metrics" if name == "comfymgr" else ref_url + "/metrics"
            times[name].extend(scrape(target)[0] for _ in range(n))
    _, body = scrape(url + "/metrics")
    _, ref_body = scrape(ref_url + "/metrics")
    text = body.decode()
    families = len(re.findall(r"^# TYPE ", text, re.M))
    samples = len([line for line in text.splitlines() if line and not line.startswith("#")])
    ref_text = ref_body.decode()
    ref_families = len(re.findall(r"^# TYPE ", ref_text, re.M))
    ref_samples = len([line for line in ref_text.splitlines() if line and not line.startswith("#")])
    s.details["metrics"] = {"families": families, "samples": samples, "bytes": len(body),
                            "ref_families": ref_families, "ref_samples": ref_samples,
                            "p99_ms": 1e3 * percentile(times["comfymgr"], 99)}
    cm_ms, ref_ms = 1e3 * median(times["comfymgr"]), 1e3 * median(times["ref"])
    s.row("6", f"GET /metrics, 8 GPUs ({families} families, {samples} samples)", "ms", cm_ms, ref_ms,
          ref_name=f"bare prometheus-client ({ref_families} families, {ref_samples} samples)",
          target="<= 10 ms", ok=cm_ms <= 10)
    s.stop_all()


# =====================================================================================
# 7: memory
# =====================================================================================

def fig_memory(s: Suite) -> None:
    fake, furl = s.fake()
    cm, url = s.comfymgr("mem-idle", furl)
    wait_backend_up(url)
    ref, _ = s.ref("get")
    time.sleep(2.0)
    idle, ref_idle = cm.rss_kb() / 1024, ref.rss_kb() / 1024
    s.row("7", "RSS idle (backend connected, no jobs)", "MB", idle, ref_idle,
          ref_name="bare aiohttp server", target="<= 60 MB", ok=idle <= 60)
    s.stop_all()

    # 100,000 finished jobs in the database.
    state = s.work / "mem-100k"
    state.mkdir()
    built = build_queue(state / "comfymgr.db", 100_000, state="completed", events=True)
    cm, url = s.comfymgr("mem-100k", None)
    after_start = cm.rss_kb() / 1024
    for path in ("/v1/comfyui/workflows?limit=100", "/v1/status", "/metrics", "/v1/comfyui/outputs",
                 "/v1/comfyui/workflows?status=completed&limit=100"):
        http_json("GET", url + path, headers=HEADERS)
    loaded = cm.rss_kb() / 1024
    s.row("7", "RSS with 100,000 finished jobs (after reads)", "MB", loaded, idle, ref_name="idle, empty database",
          note=f"right after start {after_start:.1f} MB; database built in {built:.1f} s")
    s.stop_all()


async def _feed(url: str, total: int, samples: int, cm: Proc, outstanding: int = 64,
                limit_s: float = 900) -> list[tuple[int, float, float]]:
    """Keep `outstanding` jobs in flight until `total` have finished; sample
    RSS every total/samples jobs: (finished, rss MB, seconds)."""
    points: list[tuple[int, float, float]] = []
    started = time.monotonic()
    submitted = 0
    step = max(1, total // samples)
    next_sample = 0
    async with aiohttp.ClientSession() as session:
        finished = 0
        while finished < total:
            if time.monotonic() - started > limit_s:
                raise TimeoutError(f"only {finished} of {total} jobs in {limit_s:g} s")
            async with session.get(url + "/v1/status", headers=HEADERS) as resp:
                by = (await resp.json())["queue"]["byStatus"]
            finished = by["completed"] + by["failed"] + by["cancelled"]
            in_flight = submitted - finished
            if finished >= next_sample:
                points.append((finished, cm.rss_kb() / 1024, time.monotonic() - started))
                next_sample += step
            want = min(outstanding - in_flight, total - submitted)
            if want > 0:
                await submit_many(session, url, [quick_workflow(submitted + i) for i in range(want)],
                                  concurrency=min(8, want))
                submitted += want
            await asyncio.sleep(0.05)
        points.append((finished, cm.rss_kb() / 1024, time.monotonic() - started))
    return points


def fig_leak(s: Suite) -> None:
    total = int(os.environ.get("BENCH_LEAK_JOBS") or (3_000 if s.quick else 30_000))
    backends = int(os.environ.get("BENCH_LEAK_BACKENDS") or 2)
    fakes = [s.fake()[1] for _ in range(backends)]
    # synchronous=normal and two backends: the leak check is about memory,
    # not disks or one GPU's pace; it lets many jobs run in a few minutes.
    cm, url = s.comfymgr("leak", None, COMFYMGR_DB_SYNCHRONOUS="normal",
                         COMFYUI_BACKENDS=",".join(f"gpu{i}={u}" for i, u in enumerate(fakes)))
    wait_backend_up(url)
    points = asyncio.run(_feed(url, total, 20, cm))
    s.details["leak"] = {"points": points, "total": total}
    # The first jobs fill SQLite's page cache and the allocator's pools: the
    # trend is taken over the second half.
    warm = [p for p in points if p[0] >= total * 0.5]
    per_100k = slope([p[0] for p in warm], [p[1] for p in warm]) * 100_000
    rate = total / points[-1][2]
    s.row("7", f"RSS trend over {total:,} jobs (second half)", "MB/100k", per_100k, None,
          target="no trend (< 2 MB/100k)", ok=per_100k < 2.0,
          note=f"RSS {points[0][1]:.1f} -> {warm[0][1]:.1f} (50%) -> {points[-1][1]:.1f} MB; "
               f"{rate:.0f} jobs/s on {backends} backends")
    s.stop_all()


# =====================================================================================
# 8: .pyz start
# =====================================================================================

REF_APP = '''
import os
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest

def main():
    registry = CollectorRegistry()
    Counter("ref_requests", "Requests.", registry=registry)
    async def health(request):
        return web.json_response({"status": "ok"})
    async def metrics(request):
        return web.Response(body=generate_latest(registry))
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    web.run_app(app, host="127.0.0.1", port=int(os.environ["MANAGEMENT_API_PORT"]), print=None)
'''


def build_ref_pyz(s: Suite) -> Path | None:
    """A shiv .pyz of aiohttp + prometheus-client with a 10-line app, built
    from the packages of this venv (offline, no shiv download), cached in
    build/bench/."""
    out = ROOT / "build" / "bench" / "ref.pyz"
    if out.exists():
        return out
    # The venv's shiv, else the one `make pyz` keeps for itself.
    shiv = next((p for p in (Path(PY).parent / "shiv", ROOT / ".cache" / "pyz-venv" / "bin" / "shiv")
                 if p.exists()), None)
    if shiv is None:
        return None
    import importlib.metadata as md
    site = s.work / "ref-site"
    site.mkdir()
    names = ["aiohttp", "prometheus_client", "multidict", "yarl", "frozenlist", "aiosignal", "propcache",
             "aiohappyeyeballs", "idna", "attrs", "typing_extensions"]
    for dist_name in names:
        try:
            dist = md.distribution(dist_name)
        except md.PackageNotFoundError:
            continue
        for file in dist.files or ():
            src = Path(dist.locate_file(file))
            # .py only, no __pycache__: like `make pyz`, whose first run compiles.
            if (src.is_file() and ".." not in file.parts and "__pycache__" not in file.parts
                    and file.suffix != ".pyc"):
                dst = site / file
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    (site / "bench_ref_app.py").write_text(REF_APP)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(shiv), "--site-packages", str(site), "--entry-point", "bench_ref_app:main",
                    "--python", "/usr/bin/env python3", "--reproducible", "--output-file", str(out)],
                   check=True, capture_output=True, timeout=300)
    return out


def time_start(s: Suite, pyz: Path, shiv_root: Path, name: str) -> float:
    """Seconds from spawn to the first 200 from /health."""
    port = free_port()
    env = {"SHIV_ROOT": str(shiv_root), "MANAGEMENT_API_PORT": str(port), "MANAGEMENT_API_HOST": "127.0.0.1",
           "MANAGEMENT_API_KEY": API_KEY, "COMFYMGR_STATE_DIR": str(s.work / f"pyz-state-{name}"),
           "COMFYUI_URL": "http://127.0.0.1:9", "COMFYMGR_RATE_LIMIT": "100000000"}
    started = time.monotonic()
    proc = Proc(f"pyz-{name}-{port}", [PY, str(pyz)], s.logdir, env=env, scrub=SETTING_PREFIXES)
    try:
        answered = wait_http(f"http://127.0.0.1:{port}/health", timeout=60, proc=proc.popen)
    finally:
        proc.stop()
    return answered - started


def fig_pyz(s: Suite) -> None:
    pyz = ROOT / "dist" / "comfymgr.pyz"
    if not pyz.exists():
        s.row("8", ".pyz start", "s", None, note="dist/comfymgr.pyz missing: run `make pyz` first", ok=None)
        return
    ref = build_ref_pyz(s)
    cold: dict[str, list[float]] = {"comfymgr": [], "ref": []}
    warm: dict[str, list[float]] = {"comfymgr": [], "ref": []}
    targets = {"comfymgr": pyz, "ref": ref}
    roots = {name: s.work / f"shiv-warm-{name}" for name in targets}
    for trial in range(s.trials):
        for name in (("comfymgr", "ref") if trial % 2 == 0 else ("ref", "comfymgr")):
            if targets[name] is None:
                continue
            root = s.work / f"shiv-cold-{name}-{trial}"
            cold[name].append(time_start(s, targets[name], root, f"cold-{name}-{trial}"))
            shutil.rmtree(root, ignore_errors=True)
    for name, target in targets.items():
        if target is not None:
            time_start(s, target, roots[name], f"prime-{name}")
    for trial in range(s.trials):
        for name in (("comfymgr", "ref") if trial % 2 == 0 else ("ref", "comfymgr")):
            if targets[name] is not None:
                warm[name].append(time_start(s, targets[name], roots[name], f"warm-{name}-{trial}"))
    s.details["pyz"] = {"cold": cold, "warm": warm, "size_kb": pyz.stat().st_size // 1024}
    ref_cold = median(cold["ref"]) if cold["ref"] else None
    ref_warm = median(warm["ref"]) if warm["ref"] else None
    s.row("8", ".pyz cold start (first run, extraction)", "s", median(cold["comfymgr"]), ref_cold,
          ref_name="shiv .pyz of aiohttp + prometheus-client")
    s.row("8", ".pyz warm start to first answer", "s", median(warm["comfymgr"]), ref_warm,
          ref_name="shiv .pyz of aiohttp + prometheus-client", target="<= 1 s", ok=median(warm["comfymgr"]) <= 1)


# =====================================================================================
# the run
# =====================================================================================

FIGURES: dict[str, tuple[str, Callable[[Suite], None]]] = {
    "1": ("submits and GET (1, 2)", fig_http),
    "3": ("dispatch", fig_dispatch),
    "4": ("stream and 1,000 clients (4, 7)", fig_stream),
    "4s": ("stream: 100 and 1,000 subscribers, p99, events/s", fig_stream_scale),
    "5": ("queue depth", fig_depth),
    "6": ("/metrics", fig_metrics),
    "7": ("memory", fig_memory),
    "7l": ("leak check", fig_leak),
    "8": (".pyz start", fig_pyz),
    "9": ("one job at a time, vs straight to ComfyUI", fig_one_job),
    "10": ("a drain of 200 jobs, GPU idle between jobs, CPU per job", fig_drain),
    "11": ("many backends", fig_backends),
    "12": ("1,000 waiting requests", fig_waiters),
}


def accelerators() -> list[str]:
    """The optional packages comfymgr uses when installed."""
    import importlib.util
    return [name for name in ("orjson",) if importlib.util.find_spec(name) is not None]


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name")), "")
    mem_kb = 0
    with contextlib.suppress(OSError):
        mem_kb = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
    import importlib.metadata
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gb": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "aiohttp": aiohttp.__version__, "prometheus_client": importlib.metadata.version("prometheus-client"),
            "sqlite": sqlite3.sqlite_version}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Run {result['started']} ({'quick' if result['quick'] else 'full'}, {result['trials']} trials, "
             f"accelerators: {result['accelerators']}"
             f"{', real ComfyUI ' + result['comfyui_url'] if result.get('comfyui_url') else ''}), "
             f"{m['cpus']} CPUs ({m['cpu']}), {m['memory_gb']} GB, Python {m['python']}, aiohttp "
             f"{m['aiohttp']}, SQLite {m['sqlite']}; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, at end "
             f"{', '.join(f'{x:.2f}' for x in result['loadavg_end'])}.", "",
             "| # | figure | unit | comfymgr | reference | ratio | target | |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for r in sorted(result["rows"], key=lambda r: int(r["figure"])):  # stable: a figure's rows stay in order
        ref = fmt(r["reference"]) + (f" ({r['reference_name']})" if r["reference_name"] else "")
        note = f" {r['note']}" if r["note"] else ""
        lines.append(f"| {r['figure']} | {r['name'].strip()}{note} | {r['unit']} | {fmt(r['comfymgr'])} | "
                     f"{ref if r['reference'] is not None else '-'} | {fmt(r['ratio'], 2)} | {r['target']} | "
                     f"{verdict(r['ok'])} |")
    if result["errors"]:
        lines += ["", "Errors:", *[f"- {e}" for e in result["errors"]]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=bool(os.environ.get("BENCH_QUICK")),
                        help="fewer trials, smaller loads (3,000 jobs for the leak check, 200,000 queued for "
                             "the deepest queue, 1 and 64 backends) (also BENCH_QUICK=1)")
    parser.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                        help=f"comma-separated figures to run, of {','.join(FIGURES)}")
    parser.add_argument("--update-doc", action="store_true", help="put the table into docs/PERFORMANCE.md")
    parser.add_argument("--doc-table", default="",
                        help="with --update-doc: the marker of the table to replace (<!-- NAME -->); default "
                             "bench-table (bench-table-no-accel with --no-accel)")
    parser.add_argument("--comfyui-url", default=os.environ.get("BENCH_COMFYUI_URL") or None,
                        help="a real ComfyUI for figures 9 and 10's extra rows (make bench COMFYUI_URL=...)")
    parser.add_argument("--backends", default=os.environ.get("BENCH_BACKENDS", ""),
                        help="backend counts of figure 11 (also BENCH_BACKENDS; default 1,8,32,64, quick 1,64); "
                             "the job rate is the same for all: jobs of N/64 s")
    parser.add_argument("--no-accel", action="store_true", default=bool(os.environ.get("BENCH_NO_ACCEL")),
                        help="run comfymgr without orjson even where installed (also BENCH_NO_ACCEL=1)")
    args = parser.parse_args()
    only = [f.strip() for f in args.only.split(",") if f.strip()] or list(FIGURES)
    unknown = set(only) - set(FIGURES)
    if unknown:
        parser.error(f"unknown figures {sorted(unknown)}; use {','.join(FIGURES)}")
    if not shutil.which("wrk") and any(f in only for f in ("1",)):
        print("bench: wrk is not installed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    raise_fd_limit()
    # SIGTERM (or a timeout's kill) ends the run through the finally below,
    # which stops every server the suite started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    suite = Suite(args.quick, args.no_accel, args.comfyui_url,
                  tuple(int(c) for c in args.backends.split(",") if c.strip()) or None)
    started = datetime.datetime.now(datetime.timezone.utc)
    accel = "none (--no-accel)" if args.no_accel else ", ".join(accelerators()) or "none installed"
    print(f"comfymgr bench ({'quick' if args.quick else 'full'}; {suite.trials} trials per figure; "
          f"accelerators: {accel}; real ComfyUI: {suite.comfyui_url or 'none'}; scratch {suite.work})")
    print(f"  {'#':<3} {'figure':<46} {'comfymgr':>10} {'reference':>10} {'ratio':>6}  target")
    t_all = time.monotonic()
    load_start = os.getloadavg()  # other users of the machine: said in the table's header
    try:
        for key in only:
            title, run = FIGURES[key]
            t = time.monotonic()
            print(f"-- {title}", flush=True)
            try:
                run(suite)
            except Exception as exc:
                suite.errors.append(f"{title}: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                for proc in suite._procs:
                    print(f"   [{proc.name}] {proc.tail(5)}", file=sys.stderr)
                suite.stop_all()
            print(f"   ({time.monotonic() - t:.0f} s)", flush=True)
        result = {"started": started.isoformat(timespec="seconds"), "quick": args.quick, "accelerators": accel,
                  "comfyui_url": suite.comfyui_url,
                  "trials": suite.trials, "seconds": round(time.monotonic() - t_all, 1),
                  "machine": {**machine(), "loadavg_start": load_start}, "loadavg_end": os.getloadavg(),
                  "rows": suite.rows,
                  "details": suite.details, "errors": suite.errors}
        RESULTS.mkdir(exist_ok=True)
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        text = json.dumps(result, indent=1, default=str)
        (RESULTS / f"{stamp}.json").write_text(text)
        (RESULTS / "latest.json").write_text(text)
        md = markdown(result)
        (RESULTS / "latest.md").write_text(md)
        print()
        print(md)
        print(f"written: bench/results/{stamp}.json, bench/results/latest.json, bench/results/latest.md "
              f"({result['seconds']:.0f} s)")
        if args.update_doc and DOC.exists():
            marker = args.doc_table or ("bench-table-no-accel" if args.no_accel else "bench-table")
            doc = DOC.read_text()
            if f"<!-- {marker} -->" not in doc:
                print(f"docs/PERFORMANCE.md has no <!-- {marker} --> table; not updated", file=sys.stderr)
                return 1
            doc = re.sub(rf"(<!-- {marker} -->\n).*?(<!-- /{marker} -->)",
                         lambda m: m.group(1) + md + m.group(2), doc, flags=re.S)
            DOC.write_text(doc)
            print(f"updated docs/PERFORMANCE.md ({marker})")
    finally:
        suite.close()
    return 1 if suite.errors else 0


if __name__ == "__main__":
    sys.exit(main())
