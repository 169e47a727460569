"""Per-job overhead figures of the suite (run.py imports them): what a job
costs going through comfymgr rather than straight to ComfyUI.

  9  one job at a time: submit -> `workflow:completed` at a stream client,
     against posting to ComfyUI and waiting on its WebSocket (5 ms jobs on
     the fake; a real ComfyUI's rows with --comfyui-url)
  10 a drain of 200 jobs posted one after another: first submit -> last
     end, the GPU's idle time between jobs (execution_success of one ->
     execution_start of the next) and comfymgr's CPU per job
  11 many backends: 1 to 64 fake ComfyUIs, idle time between jobs per
     backend, CPU per job at the same job rate, and the job rate one
     comfymgr sustains when the backends are not the limit
  12 1,000 requests waiting (?wait=) on 1,000 queued jobs: memory per
     waiter, the event loop's lag while they wait, the answers at the end

Every figure alternates comfymgr's trials with its reference's. comfymgr
runs at its defaults (common.comfymgr_env).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
from common import HEADERS, cpu_seconds, http_json, median, percentile, start_fakes, wait_backend_up
from workloads import gate_workflow, quick_workflow, real_job, timed_workflow

FIVE_MS = ["--node-delay", "ImageInvert=0.005"]  # timed_workflow takes 5 ms on the fake
_END_TYPES = ("workflow:completed", "workflow:error", "workflow:cancelled")


# =====================================================================================
# clients: comfymgr's stream, ComfyUI's WebSocket
# =====================================================================================

class _Ends:
    """When (time.monotonic() in this process) each id's end was heard;
    wait() returns at once for an end heard before it was asked for."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.how: dict[str, str] = {}
        self._waiting: dict[str, asyncio.Future[float]] = {}

    def heard(self, key: str, when: float, how: str) -> None:
        if key in self.at:
            return
        self.at[key], self.how[key] = when, how
        future = self._waiting.pop(key, None)
        if future is not None and not future.done():
            future.set_result(when)

    async def wait(self, key: str, timeout: float = 60.0) -> float:
        if key in self.at:
            return self.at[key]
        future = self._waiting.setdefault(key, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(future, timeout)


class StreamWatch:
    """One client of comfymgr's stream (GET /v1/comfyui/stream, following
    every job, as a dashboard does): when each job's end event arrived."""

    def __init__(self) -> None:
        self.ends = _Ends()
        self.events = 0
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task | None = None

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, url: str) -> StreamWatch:
        watch = cls()
        watch._ws = await session.ws_connect(url.replace("http", "ws", 1) + "/v1/comfyui/stream",
                                             headers=HEADERS, heartbeat=None, max_msg_size=0)
        watch._task = asyncio.ensure_future(watch._read())
        return watch

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            now = time.monotonic()
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            self.events += 1
            if '"workflow:' not in msg.data:
                continue
            event = json.loads(msg.data)
            if event.get("type") in _END_TYPES:
                self.ends.heard(event["workflowId"], now, event["type"])

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class ComfyWatch:
    """A client of ComfyUI itself: its own clientId on /ws, prompts posted
    with it; when each prompt's execution_start, execution_success and
    `executing: null` (ComfyUI's "this prompt is done", sent after its history
    is written) arrived."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client_id = uuid.uuid4().hex
        self.ends = _Ends()  # executing: null (or an error/interrupt)
        self.success: dict[str, float] = {}
        self.start: dict[str, float] = {}
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._task: asyncio.Task | None = None

    @classmethod
    async def open(cls, session: aiohttp.ClientSession, url: str) -> ComfyWatch:
        watch = cls(url)
        watch._ws = await session.ws_connect(f"{url}/ws?clientId={watch.client_id}", heartbeat=None,
                                             max_msg_size=0)
        watch._task = asyncio.ensure_future(watch._read())
        return watch

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            now = time.monotonic()
            if msg.type != aiohttp.WSMsgType.TEXT or '"execut' not in msg.data:
                continue
            message = json.loads(msg.data)
            kind, data = message.get("type"), message.get("data") or {}
            pid = data.get("prompt_id")
            if kind == "execution_start":
                self.start.setdefault(pid, now)
            elif kind == "execution_success":
                self.success.setdefault(pid, now)
            elif kind == "executing" and data.get("node") is None and pid:
                self.ends.heard(pid, now, "done")
            elif kind in ("execution_error", "execution_interrupted"):
                self.ends.heard(pid, now, kind)

    async def post(self, session: aiohttp.ClientSession, workflow: dict[str, Any]) -> str:
        async with session.post(self.url + "/prompt", json={"prompt": workflow, "client_id": self.client_id}) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"POST /prompt answered {resp.status}: {body}")
            return body["prompt_id"]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def post_job(session: aiohttp.ClientSession, url: str, workflow: dict[str, Any]) -> str:
    async with session.post(url + "/v1/comfyui/workflow", json={"workflow": workflow}, headers=HEADERS) as resp:
        body = await resp.json()
        if resp.status != 202:
            raise RuntimeError(f"submit answered {resp.status}: {body}")
        return body["workflowId"]


def fake_timeline(furl: str, clear: bool = False) -> dict[str, list]:
    return http_json("GET", furl + "/__bench__/timeline" + ("?clear=1" if clear else ""))[1]


def idle_gaps(tl: dict[str, list], lo: float = float("-inf"), hi: float = float("inf")) -> list[float]:
    """From a fake's timeline: for consecutive prompts in the order they
    started, execution_success of one -> execution_start of the next (the
    GPU's idle time between them), for pairs that fall within [lo, hi]."""
    starts = sorted((t, pid) for t, kind, pid in tl["emit"] if kind == "execution_start")
    success = {pid: t for t, kind, pid in tl["emit"] if kind == "execution_success"}
    gaps = []
    for (_, a), (t_b, _) in zip(starts, starts[1:]):
        if a in success and lo <= success[a] and t_b <= hi:
            gaps.append(t_b - success[a])
    return gaps


def busy_seconds(tl: dict[str, list], lo: float, hi: float) -> float:
    """How long the fake was running a prompt within [lo, hi]."""
    starts = {pid: t for t, kind, pid in tl["emit"] if kind == "execution_start"}
    ends = {pid: t for t, kind, pid in tl["emit"] if kind in ("execution_success", "execution_error")}
    return sum(max(0.0, min(ends.get(pid, hi), hi) - max(t, lo)) for pid, t in starts.items())


def history_gaps(comfy_url: str, prompt_ids: list[str]) -> list[float]:
    """A real ComfyUI keeps each prompt's execution_start and
    execution_success times in its history (milliseconds): the idle time
    between consecutive prompts, in seconds, at that resolution."""
    spans = []
    for pid in prompt_ids:
        status, hist = http_json("GET", f"{comfy_url}/history/{pid}")
        entry = (hist or {}).get(pid) if status == 200 else None
        if not entry:
            continue
        stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
        if stamps.get("execution_start") is not None and stamps.get("execution_success") is not None:
            spans.append((stamps["execution_start"], stamps["execution_success"]))
    spans.sort()
    return [(b[0] - a[1]) / 1000 for a, b in zip(spans, spans[1:])]


def _order(trial: int, names: tuple[str, str] = ("comfymgr", "ref")) -> tuple[str, ...]:
    return names if trial % 2 == 0 else names[::-1]


# =====================================================================================
# 9: one job at a time
# =====================================================================================

async def _one_job(url: str, comfy_url: str, make: Callable[[int], dict[str, Any]], n: int, base: int,
                   cm_pid: int, warm: int = 10) -> dict[str, Any]:
    """n jobs through comfymgr and n straight to ComfyUI, one at a time,
    taking turns job by job (the order flips every pair)."""
    lat: dict[str, list[float]] = {"comfymgr": [], "ref": []}
    ack: list[float] = []
    ref_success: list[float] = []
    async with aiohttp.ClientSession() as session:
        stream = await StreamWatch.open(session, url)
        comfy = await ComfyWatch.open(session, comfy_url)
        cpu_start, t_start = cpu_seconds(cm_pid), time.monotonic()
        for i in range(-warm, n):
            for side in _order(i):
                k = base + 2 * (i + warm) + (side == "ref")
                t0 = time.monotonic()
                if side == "comfymgr":
                    job_id = await post_job(session, url, make(k))
                    t_ack = time.monotonic()
                    t1 = await stream.ends.wait(job_id, 60)
                    if stream.ends.how[job_id] != "workflow:completed":
                        raise RuntimeError(f"job {job_id} ended with {stream.ends.how[job_id]}")
                    if i >= 0:
                        lat["comfymgr"].append(t1 - t0)
                        ack.append(t_ack - t0)
                else:
                    pid = await comfy.post(session, make(k))
                    t1 = await comfy.ends.wait(pid, 60)
                    if comfy.ends.how[pid] != "done":
                        raise RuntimeError(f"prompt {pid} ended with {comfy.ends.how[pid]}")
                    if i >= 0:
                        lat["ref"].append(t1 - t0)
                        if pid in comfy.success:
                            ref_success.append(comfy.success[pid] - t0)
                await asyncio.sleep(0.002)
        cpu = cpu_seconds(cm_pid) - cpu_start
        elapsed = time.monotonic() - t_start
        await stream.close()
        await comfy.close()
    return {"latency": lat, "ack": ack, "ref_success": ref_success, "cpu_s": cpu, "elapsed_s": elapsed,
            "jobs": n + warm}


def _one_job_rows(s: Any, res: dict[str, Any], where: str, ref_name: str) -> None:
    cm, ref = res["latency"]["comfymgr"], res["latency"]["ref"]
    n = len(cm)
    for pct, target in ((50, 1.3), (90, 1.5)):
        a, b = percentile(cm, pct), percentile(ref, pct)
        s.row("9", f"one job, submit -> completed at a stream client, p{pct} ({where})", "ms", 1e3 * a, 1e3 * b,
              ref_name=ref_name, target=f"<= {target}x", ok=a / b <= target,
              note=f"{n} jobs each, one at a time, alternating" if pct == 50 else "")
    s.row("9", f"  submit -> 202 p50 ({where})", "ms", 1e3 * median(res["ack"]))
    s.row("9", f"  comfymgr CPU per job ({where})", "ms", 1e3 * res["cpu_s"] / res["jobs"], None,
          note="all of the run's CPU, idle turns included, over its jobs")
    if res["ref_success"]:
        s.row("9", f"  reference: POST -> execution_success p50 ({where})", "ms", None,
              1e3 * median(res["ref_success"]), ref_name="straight to ComfyUI, its first end message")


def fig_one_job(s: Any) -> None:
    n = 200 if s.quick else 400
    fake_cm, furl_cm = s.fake(extra=FIVE_MS)
    fake_ref, furl_ref = s.fake(extra=FIVE_MS)  # its own fake: comfymgr's socket must not see these prompts
    cm, url = s.comfymgr("one-job", furl_cm)
    wait_backend_up(url)
    res = asyncio.run(_one_job(url, furl_ref, timed_workflow, n, 1_000, cm.pid))
    s.details["one_job"] = res
    _one_job_rows(s, res, "fake, 5 ms jobs", "POST /prompt + its WebSocket, a twin fake")
    s.stop_all()
    if s.comfyui_url:
        cm, url = s.comfymgr("one-job-real", s.comfyui_url)
        wait_backend_up(url, timeout=60)
        prefix = f"comfymgr-bench/{time.strftime('%Y%m%dT%H%M%S')}"
        res = asyncio.run(_one_job(url, s.comfyui_url, lambda k: real_job(k, prefix), 200, 0, cm.pid))
        s.details["one_job_real"] = res
        _one_job_rows(s, res, "real ComfyUI", f"POST /prompt + its WebSocket, {s.comfyui_url}")
        s.stop_all()


# =====================================================================================
# 10: a drain of 200 jobs
# =====================================================================================

async def _drain(url: str, comfy_url: str, make: Callable[[int], dict[str, Any]], n: int, base: int,
                 side: str, cm_pid: int) -> dict[str, Any]:
    """n jobs posted one after another (each POST awaited, none of the jobs),
    then every end awaited: first submit -> last end as the client hears it."""
    async with aiohttp.ClientSession() as session:
        if side == "comfymgr":
            watch: StreamWatch | ComfyWatch = await StreamWatch.open(session, url)
        else:
            watch = await ComfyWatch.open(session, comfy_url)
        await asyncio.sleep(0.05)
        cpu0 = cpu_seconds(cm_pid)
        keys = []
        t0 = time.monotonic()
        for i in range(n):
            if side == "comfymgr":
                keys.append(await post_job(session, url, make(base + i)))
            else:
                keys.append(await watch.post(session, make(base + i)))  # type: ignore[union-attr]
        posted = time.monotonic() - t0
        ends = await asyncio.gather(*(watch.ends.wait(k, 120) for k in keys))
        elapsed = max(ends) - t0
        await asyncio.sleep(0.1)  # what comfymgr does after the last end counts too
        cpu = cpu_seconds(cm_pid) - cpu0
        bad = [watch.ends.how[k] for k in keys if watch.ends.how[k] not in ("workflow:completed", "done")]
        await watch.close()
    if bad:
        raise RuntimeError(f"{len(bad)} of {n} jobs did not complete: {bad[:3]}")
    return {"elapsed_s": elapsed, "posting_s": posted, "cpu_s": cpu, "keys": keys}


def _drain_trials(s: Any, url: str, comfy_cm: str, comfy_ref: str, make: Callable[[int], dict[str, Any]],
                  n: int, cm_pid: int, *, timeline: bool) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {"comfymgr": [], "ref": []}
    base = 10_000
    for trial in range(-1, s.trials):  # -1: a warm-up round, not counted
        for side in _order(trial):
            base += n
            furl = comfy_cm if side == "comfymgr" else comfy_ref
            if timeline:
                fake_timeline(furl, clear=True)
            res = asyncio.run(_drain(url, comfy_ref, make, n, base, side, cm_pid))
            if timeline:
                res["gaps"] = idle_gaps(fake_timeline(furl))
            elif side == "comfymgr":
                pids = [http_json("GET", f"{url}/v1/comfyui/workflow/{k}", headers=HEADERS)[1]["promptId"]
                        for k in res["keys"]]
                res["gaps"] = history_gaps(furl, pids)
            else:
                res["gaps"] = history_gaps(furl, res["keys"])
            del res["keys"]
            if trial >= 0:
                runs[side].append(res)
            time.sleep(0.2)
    return runs


def _drain_rows(s: Any, runs: dict[str, list[dict[str, Any]]], n: int, where: str, ref_name: str,
                resolution: str = "") -> None:
    cm, ref = (median(r["elapsed_s"] for r in runs[k]) for k in ("comfymgr", "ref"))
    s.row("10", f"drain of {n} jobs, first submit -> last end ({where})", "s", cm, ref, ref_name=ref_name,
          target="<= 1.15x", ok=cm / ref <= 1.15, note=f"median of {len(runs['comfymgr'])} trials each")
    gaps = {k: [g for r in runs[k] for g in r["gaps"]] for k in runs}
    gap_cm = median(median(r["gaps"]) for r in runs["comfymgr"] if r["gaps"])
    gap_ref = median(median(r["gaps"]) for r in runs["ref"] if r["gaps"])
    # The target is the fake's (5 ms jobs, timed to the microsecond); a real
    # ComfyUI's history has whole milliseconds, so its rows only report.
    s.row("10", f"GPU idle between jobs, median ({where})", "ms", 1e3 * gap_cm, 1e3 * gap_ref,
          ref_name="execution_success -> next execution_start, straight to ComfyUI",
          target="" if resolution else "<= 0.5 ms", ok=None if resolution else gap_cm <= 0.0005, note=resolution)
    s.row("10", f"  GPU idle between jobs, p90 ({where})", "ms", 1e3 * percentile(gaps["comfymgr"], 90),
          1e3 * percentile(gaps["ref"], 90))
    cpu = median(r["cpu_s"] / n for r in runs["comfymgr"])
    s.row("10", f"comfymgr CPU per job, end to end ({where})", "ms", 1e3 * cpu, None, target="<= 1.5 ms",
          ok=cpu <= 0.0015, note="submit, dispatch, events, completion, one stream client; all threads")


def fig_drain(s: Any) -> None:
    n = 200
    fake_cm, furl_cm = s.fake(extra=FIVE_MS)
    fake_ref, furl_ref = s.fake(extra=FIVE_MS)
    cm, url = s.comfymgr("drain", furl_cm)
    wait_backend_up(url)
    runs = _drain_trials(s, url, furl_cm, furl_ref, timed_workflow, n, cm.pid, timeline=True)
    s.details["drain"] = runs
    _drain_rows(s, runs, n, "fake, 5 ms jobs", "all posted to the fake's own queue")
    s.stop_all()
    if s.comfyui_url:
        cm, url = s.comfymgr("drain-real", s.comfyui_url)
        wait_backend_up(url, timeout=60)
        prefix = f"comfymgr-bench/{time.strftime('%Y%m%dT%H%M%S')}"
        runs = _drain_trials(s, url, s.comfyui_url, s.comfyui_url, lambda k: real_job(k, prefix), n, cm.pid,
                             timeline=False)
        s.details["drain_real"] = runs
        _drain_rows(s, runs, n, "real ComfyUI", "all posted to ComfyUI's own queue",
                    resolution="from ComfyUI's history: 1 ms resolution")
        s.stop_all()


# =====================================================================================
# 11: many backends
# =====================================================================================

async def _keep_busy(url: str, make: Callable[[int], dict[str, Any]], depth: int, warm: float, window: float,
                     cm_pid: int) -> dict[str, Any]:
    """Keep `depth` jobs submitted and not yet ended (one stream client
    counts the ends); after `warm` seconds, measure `window` seconds: jobs
    ended, comfymgr's CPU."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        stream = await StreamWatch.open(session, url)
        submitted: list[str] = []
        stop = asyncio.Event()
        woken = asyncio.Event()
        original = stream.ends.heard

        def heard(key: str, when: float, how: str) -> None:
            original(key, when, how)
            woken.set()

        stream.ends.heard = heard  # type: ignore[method-assign]

        async def feeder() -> None:
            while not stop.is_set():
                want = depth - (len(submitted) - len(stream.ends.at))
                if want > 0:
                    batch = min(want, 16)
                    ids = await asyncio.gather(*(post_job(session, url, make(len(submitted) + j))
                                                 for j in range(batch)))
                    submitted.extend(ids)
                    continue
                woken.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(woken.wait(), 0.5)

        task = asyncio.ensure_future(feeder())
        await asyncio.sleep(warm)
        cpu0, t0 = cpu_seconds(cm_pid), time.monotonic()
        await asyncio.sleep(window)
        cpu1, t1 = cpu_seconds(cm_pid), time.monotonic()
        ended = sum(1 for t in stream.ends.at.values() if t0 <= t < t1)
        stop.set()
        woken.set()
        await asyncio.gather(task, return_exceptions=True)
        if task.done() and task.exception():
            raise task.exception()  # type: ignore[misc]
        bad = sum(1 for how in stream.ends.how.values() if how != "workflow:completed")
        await stream.close()
    return {"t0": t0, "t1": t1, "cpu_s": cpu1 - cpu0, "ended": ended, "failed": bad,
            "submitted": len(submitted)}


def _backends_run(s: Any, count: int, job_s: float | None, warm: float, window: float) -> dict[str, Any]:
    extra = ["--node-delay", f"ImageInvert={job_s}"] if job_s else []
    procs, urls = start_fakes(s.logdir, s.work, count, extra=extra)
    for proc in procs:
        s.proc(proc)
    backends = ",".join(f"gpu{i}={u}" for i, u in enumerate(urls))
    cm, url = s.comfymgr(f"backends-{count}-{job_s or 0}", None, COMFYUI_BACKENDS=backends)
    wait_backend_up(url, timeout=60)
    make = timed_workflow if job_s else quick_workflow
    res = asyncio.run(_keep_busy(url, make, 2 * count + 8, warm, window, cm.pid))
    lo, hi = res["t0"], res["t1"]
    gaps: list[float] = []
    busy = 0.0
    for furl in urls:
        tl = fake_timeline(furl)
        gaps += idle_gaps(tl, lo, hi)
        busy += busy_seconds(tl, lo, hi)
    res.update(backends=count, job_s=job_s, gaps=gaps, busy=busy / (count * (hi - lo)),
               jobs_per_s=res["ended"] / (hi - lo), cpu_per_job=res["cpu_s"] / max(1, res["ended"]),
               rss_mb=cm.rss_kb() / 1024)
    s.stop_all()
    return res


def fig_backends(s: Any) -> None:
    """The same job rate (64 jobs/s) on 1, 8, 32 and 64 backends (jobs of
    N/64 s, 1 s on 64): the idle time of each backend between its jobs, and
    comfymgr's CPU per job, which should not grow with the backends. Then
    64 backends with 0 ms jobs: the job rate comfymgr sustains when the
    backends are not the limit."""
    window = 4.0 if s.quick else 6.0
    counts = [int(c) for c in s.backend_counts]
    results = {}
    for count in counts:
        job_s = count / 64
        results[count] = _backends_run(s, count, job_s, warm=max(1.5, 2.5 * job_s), window=window)
    base = results[counts[0]]["cpu_per_job"]
    for count in counts:
        r = results[count]
        gaps = r["gaps"]
        top = count == max(counts)
        s.row("11", f"{count} backend{'s' if count > 1 else ''}, {r['job_s'] * 1e3:.0f} ms jobs: GPU idle between jobs, median", "ms",
              1e3 * median(gaps), None, target="<= 1 ms" if top else "", ok=median(gaps) <= 0.001 if top else None,
              note=f"p99 {1e3 * percentile(gaps, 99):.2f} ms over {len(gaps)} job pairs; backends busy "
                   f"{100 * r['busy']:.1f}% of the window; {r['jobs_per_s']:.1f} jobs/s")
        s.row("11", f"  {count} backend{'s' if count > 1 else ''}: comfymgr CPU per job", "ms", 1e3 * r["cpu_per_job"], 1e3 * base,
              ref_name=f"the same at {counts[0]} backend(s)", target="flat" if count != counts[0] else "",
              ok=(r["cpu_per_job"] / base <= 1.25) if count != counts[0] else None,
              note=f"{r['ended']} jobs in {window:g} s, RSS {r['rss_mb']:.0f} MB")
    top = max(counts)
    if not s.quick:
        # Twice as many backends, 1 s jobs each: twice the job rate.
        r = results[f"{2 * top}x1s"] = _backends_run(s, 2 * top, 1.0, warm=2.5, window=window)
        s.row("11", f"{2 * top} backends, 1000 ms jobs: GPU idle between jobs, median", "ms",
              1e3 * median(r["gaps"]), None,
              note=f"p99 {1e3 * percentile(r['gaps'], 99):.2f} ms over {len(r['gaps'])} job pairs; backends busy "
                   f"{100 * r['busy']:.1f}% of the window; {r['jobs_per_s']:.1f} jobs/s; comfymgr CPU per job "
                   f"{1e3 * r['cpu_per_job']:.2f} ms")
    sat = results["saturated"] = _backends_run(s, top, None, warm=1.5, window=window)
    one_core = 1 / sat["cpu_per_job"] if sat["cpu_per_job"] else float("nan")
    s.row("11", f"{top} backends, 0 ms jobs: jobs/s sustained", "jobs/s", sat["jobs_per_s"], None,
          note=f"comfymgr CPU per job {1e3 * sat['cpu_per_job']:.2f} ms: one core's worth is "
               f"{one_core:.0f} jobs/s, {one_core:.0f} backends running 1 s jobs; the fakes and the "
               f"load share the same 2 cores")
    s.details["backends"] = {str(k): {x: y for x, y in v.items() if x != "gaps"} | {
        "gap_median": median(v["gaps"]), "gap_p99": percentile(v["gaps"], 99), "pairs": len(v["gaps"])}
        for k, v in results.items()}


# =====================================================================================
# 12: 1,000 waiting requests
# =====================================================================================

async def _waiters(url: str, furl: str, cm: Any, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sent = 0
    all_sent = asyncio.Event()

    async def headers_sent(session: Any, ctx: Any, params: Any) -> None:
        nonlocal sent
        if "wait=" in str(params.url):
            sent += 1
            if sent == n:
                all_sent.set()

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(headers_sent)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trace_configs=[trace]) as session:
        await session.post(furl + "/__bench__/gate")
        gate = await post_job(session, url, gate_workflow(7))
        for _ in range(500):
            async with session.get(f"{url}/v1/comfyui/workflow/{gate}", headers=HEADERS) as resp:
                if (await resp.json())["status"] == "running":
                    break
            await asyncio.sleep(0.01)
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> str:
            async with sem:
                return await post_job(session, url, quick_workflow(2_000_000 + i))

        ids = await asyncio.gather(*(one(i) for i in range(n)))
        await asyncio.sleep(1.0)
        out["rss_before_kb"] = cm.rss_kb()
        answers: dict[str, tuple[float, float, int, dict[str, Any]]] = {}

        async def wait(job_id: str) -> None:
            async with session.get(f"{url}/v1/comfyui/workflow/{job_id}?wait=60", headers=HEADERS,
                                   timeout=aiohttp.ClientTimeout(total=120)) as resp:
                body = await resp.json()
                answers[job_id] = (time.monotonic(), time.time(), resp.status, body)

        http_json("GET", url + "/__bench__/lag?reset=1", headers=HEADERS)
        opened = time.monotonic()
        tasks = [asyncio.ensure_future(wait(i)) for i in ids]
        await asyncio.wait_for(all_sent.wait(), 60)
        out["all_sent_s"] = time.monotonic() - opened
        await asyncio.sleep(1.0)  # every request read and parked
        lag_arriving = http_json("GET", url + "/__bench__/lag?reset=1", headers=HEADERS)[1]
        await asyncio.sleep(3.0)
        lag_waiting = http_json("GET", url + "/__bench__/lag?reset=1", headers=HEADERS)[1]
        out["rss_waiting_kb"] = cm.rss_kb()
        out["answered_before_release"] = len(answers)
        # Their jobs end: each is cancelled (DELETE, 16 at a time), which
        # ends it at once, so what is timed is waking the waiters, not
        # running 1,000 jobs.
        released = time.monotonic()
        cancel_sem = asyncio.Semaphore(16)

        async def cancel(job_id: str) -> int:
            async with cancel_sem, session.delete(f"{url}/v1/comfyui/workflow/{job_id}", headers=HEADERS) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(cancel(i) for i in ids))
        cancelled = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        last = max(a[0] for a in answers.values())
        lag_ending = http_json("GET", url + "/__bench__/lag?reset=1", headers=HEADERS)[1]
        late = [a[1] - a[3]["completionTime"] / 1000 for a in answers.values()
                if a[2] == 200 and a[3].get("completionTime")]
        bad = [a[2] for a in answers.values() if a[2] != 200 or a[3].get("status") != "cancelled"]
        out.update(lag_arriving=lag_arriving, lag_waiting=lag_waiting, lag_ending=lag_ending,
                   cancels_s=cancelled - released, release_to_last_s=last - released, answer_after_end=late,
                   not_cancelled=len(bad), cancel_statuses=sorted(set(statuses)))
        await session.post(furl + "/__bench__/release")
    return out


def fig_waiters(s: Any) -> None:
    n = 1000
    fake, furl = s.fake()
    cm, url = s.comfymgr("waiters", furl, harness=["--lag-probe"])
    wait_backend_up(url)
    res = asyncio.run(_waiters(url, furl, cm, n))
    late = res.pop("answer_after_end")
    s.details["waiters"] = {**res, "answer_after_end_p50": median(late), "answer_after_end_p99": percentile(late, 99)}
    per = (res["rss_waiting_kb"] - res["rss_before_kb"]) / n
    s.row("12", f"RSS with {n:,} requests waiting (?wait=60)", "MB", res["rss_waiting_kb"] / 1024,
          res["rss_before_kb"] / 1024, ref_name=f"the same process, {n:,} jobs queued, none waiting",
          note=f"{per:.1f} KB per waiter (connection included)")
    la, lw, le = res["lag_arriving"], res["lag_waiting"], res["lag_ending"]
    s.row("12", f"  event-loop lag while the {n:,} requests arrive, max", "ms", la["max_ms"], None,
          note=f"p99 {la['p99_ms']:.2f} ms; all sent in {1e3 * res['all_sent_s']:.0f} ms, measured until 1 s later")
    s.row("12", f"  event-loop lag while {n:,} wait (3 s), max", "ms", lw["max_ms"], None,
          note=f"p99 {lw['p99_ms']:.2f} ms over {lw['wakeups']} wake-ups of a 1 ms timer")
    s.row("12", f"  {n:,} jobs cancelled, every waiter answered: first DELETE -> last answer", "s",
          res["release_to_last_s"], None,
          note=f"the DELETEs (16 at a time) took {res['cancels_s']:.2f} s; event-loop lag meanwhile max "
               f"{le['max_ms']:.1f} ms, p99 {le['p99_ms']:.2f} ms; {res['not_cancelled']} answers not "
               f"200/cancelled, {res['answered_before_release']} before their job ended")
    s.row("12", "  a job's end -> its waiter answered, p50", "ms", 1e3 * median(late), None,
          note=f"p99 {1e3 * percentile(late, 99):.1f} ms (completionTime to the answer, wall clocks, 1 ms)")
    s.stop_all()
