#!/usr/bin/env python3
"""Profile comfymgr under one benchmark load with py-spy (sampling, from
outside the process, so comfymgr runs unmodified).

    python bench/profile.py submit|get|dispatch|metrics|one|drain [--seconds 8] [--idle] [--gil]
                            [--nodes 27|200|1000]

Loads: submit (figure 1: wrk, 50 connections, the graph of --nodes nodes),
get (figure 2), dispatch (figure 3: 0 ms jobs), metrics (figure 6), one
(figure 9: one 5 ms job at a time, submit -> workflow:completed at a stream
client), drain (figure 10: 200 5 ms jobs posted one after another, then
awaited, again and again).

Starts the fake ComfyUI and comfymgr as the suite does, applies the load,
records with `py-spy record --format raw` (collapsed stacks) and prints the
functions with the most samples, by own time and including callees. The raw
stacks stay in bench/results/profiles/<load>.txt (flamegraph.pl or
speedscope read them). --idle also samples threads waiting (off-CPU time).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from common import HEADERS, PY, http_json, wait_backend_up, wrk, wrk_script
from perjob import FIVE_MS, StreamWatch, post_job
from run import RESULTS, Suite, _dispatch_through, exercise_routes, submit, wait_job
from workloads import GRAPH_SIZES, gate_workflow, graph_workflow, timed_workflow


async def _jobs_for(url: str, seconds: float, batch: int) -> tuple[int, float]:
    """`batch` jobs posted one after another, then awaited at a stream
    client, again until `seconds` have passed: (jobs, seconds taken)."""
    done, started = 0, time.monotonic()
    async with aiohttp.ClientSession() as session:
        stream = await StreamWatch.open(session, url)
        while time.monotonic() - started < seconds:
            ids = [await post_job(session, url, timed_workflow(done + i)) for i in range(batch)]
            await asyncio.gather(*(stream.ends.wait(i, 60) for i in ids))
            done += batch
        await stream.close()
    return done, time.monotonic() - started


def _function(frame: str) -> str:
    """'name (file.py:123)' -> 'name (file.py)': one entry per function."""
    return re.sub(r":\d+\)$", ")", frame.strip())


def summarise(raw: Path, top: int = 30) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_function(f) for f in stack.split(";") if f.strip()]
        if frames:
            own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    out = [f"{total} samples", "", "own time (by function):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "including callees (by function):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("load", choices=("submit", "get", "dispatch", "metrics", "one", "drain"))
    parser.add_argument("--nodes", type=int, default=GRAPH_SIZES[0][0], choices=[n for n, _ in GRAPH_SIZES],
                        help="submit: the graph's size (figure 1)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--idle", action="store_true")
    parser.add_argument("--gil", action="store_true", help="only the thread holding the GIL (CPU time)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    s = Suite(quick=True)
    out_dir = RESULTS / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    load = f"{args.load}-{args.nodes}" if args.load == "submit" else args.load
    raw = out_dir / f"{load}{'-gil' if args.gil else ''}.txt"
    try:
        fake, furl = s.fake(extra=FIVE_MS if args.load in ("one", "drain") else ())
        if args.load == "metrics":
            backends = ",".join(f"gpu{i}={furl}@{i}" for i in range(8))
            cm, url = s.comfymgr("profile", None, harness=["--fake-gpus", "8"], COMFYUI_BACKENDS=backends)
        else:
            cm, url = s.comfymgr("profile", furl)
        wait_backend_up(url)
        record = [pyspy, "record", "--pid", str(cm.pid), "--format", "raw", "--rate", str(args.rate),
                  "--duration", str(int(args.seconds)), "--output", str(raw)]
        if args.idle:
            record.append("--idle")
        if args.gil:
            record.append("--gil")
        if args.load in ("submit", "get"):
            http_json("POST", furl + "/__bench__/gate")
            running = submit(url, gate_workflow())
            wait_job(url, running["workflowId"], ("running",))
            if args.load == "submit":
                body = s.work / "submit.json"
                body.write_text(json.dumps({"workflow": graph_workflow(args.nodes, dict(GRAPH_SIZES)[args.nodes])}))
                script, target = wrk_script(s.work, method="POST", body_path=body, headers=HEADERS), \
                    url + "/v1/comfyui/workflow"
            else:
                script, target = wrk_script(s.work, method="GET", headers=HEADERS), \
                    f"{url}/v1/comfyui/workflow/{running['workflowId']}"
            spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            result = wrk(target, script=script, connections=50, seconds=args.seconds + 1)
            print(f"load: {result['rps']:.0f} req/s, p50 {1e3 * result['p50']:.1f} ms, "
                  f"p99 {1e3 * result['p99']:.1f} ms")
        elif args.load == "dispatch":
            spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            stop = threading.Event()
            t_end = time.monotonic() + args.seconds
            n = 0
            while time.monotonic() < t_end and not stop.is_set():
                res = asyncio.run(_dispatch_through(url, furl, 200, 1000 + n * 300))
                n += 1
                print(f"load: {res['jobs_per_s']:.0f} jobs/s, gap {1e3 * (res['gap_median'] or 0):.2f} ms")
        elif args.load in ("one", "drain"):
            spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            jobs, took = asyncio.run(_jobs_for(url, args.seconds, 1 if args.load == "one" else 200))
            print(f"load: {jobs} jobs in {took:.1f} s ({jobs / took:.0f} jobs/s)")
        else:
            exercise_routes(url, furl)
            spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            t_end = time.monotonic() + args.seconds
            while time.monotonic() < t_end:
                http_json("GET", url + "/metrics")
        _, err = spy.communicate(timeout=args.seconds + 60)
        if not raw.exists():
            print(err.decode(errors="replace"), file=sys.stderr)
            return 1
        print(summarise(raw))
        print(f"\nraw stacks: {raw}")
    finally:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
