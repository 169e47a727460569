#!/usr/bin/env python3
"""Profile comfymgr under one benchmark load with py-spy (sampling, from
outside the process, so comfymgr runs unmodified).

    python bench/profile.py submit|get|dispatch|metrics [--seconds 8] [--idle]

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

from common import HEADERS, PY, http_json, wait_backend_up, wrk, wrk_script
from run import RESULTS, Suite, _dispatch_through, exercise_routes, submit, wait_job
from workloads import big_workflow, gate_workflow


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
    parser.add_argument("load", choices=("submit", "get", "dispatch", "metrics"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--idle", action="store_true")
    parser.add_argument("--gil", action="store_true", help="only the thread holding the GIL (CPU time)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    s = Suite(quick=True)
    out_dir = RESULTS / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{args.load}{'-gil' if args.gil else ''}.txt"
    try:
        fake, furl = s.fake()
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
                body.write_text(json.dumps({"workflow": big_workflow()}))
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
