#!/usr/bin/env python3
"""Before/after: two versions of comfymgr.py under the same loads, trials
interleaved A B B A ..., so that a shared machine's noise falls on both.

    python bench/ab.py [--a HEAD] [--b .] [--loads submit,get,dispatch] [--pairs 12]

--a/--b are a git revision (its comfymgr.py) or a folder holding a
comfymgr.py ('.' is the working tree). For each load it prints both medians,
the median of the per-pair ratios B/A (the figure to trust on a noisy box),
and the CPU time comfymgr spent per request (user + system, all threads).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HEADERS, ROOT, cpu_seconds, http_json, median, wait_backend_up, wrk, wrk_script
from run import Suite, _dispatch_through, submit, wait_job
from workloads import big_workflow, gate_workflow


def checkout(spec: str, into: Path) -> Path:
    """A folder with the comfymgr.py of `spec` (a folder, or a git revision)."""
    path = (ROOT / spec).resolve()
    if (path / "comfymgr.py").exists():
        return path
    into.mkdir(parents=True, exist_ok=True)
    text = subprocess.run(["git", "show", f"{spec}:comfymgr.py"], cwd=ROOT, check=True,
                          capture_output=True).stdout
    (into / "comfymgr.py").write_bytes(text)
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default="HEAD")
    parser.add_argument("--b", default=".")
    parser.add_argument("--a-flags", default="", help="harness flags for A, e.g. --uvloop")
    parser.add_argument("--b-flags", default="", help="harness flags for B")
    parser.add_argument("--loads", default="submit,get,dispatch")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--seconds", type=int, default=2, help="per wrk trial")
    parser.add_argument("--jobs", type=int, default=150, help="per dispatch trial")
    args = parser.parse_args()
    loads = args.loads.split(",")
    s = Suite(quick=True)
    try:
        dirs = {"A": checkout(args.a, s.work / "a"), "B": checkout(args.b, s.work / "b")}

        starts = iter(range(1000))

        def start() -> dict[str, dict]:
            inst, n = {}, next(starts)  # fresh state directories each time
            for name, folder in dirs.items():
                _, furl = s.fake()
                flags = (args.a_flags if name == "A" else args.b_flags).split()
                cm, url = s.comfymgr(f"ab-{name}-{n}", furl,
                                     harness=["--comfymgr-dir", str(folder), *flags])
                wait_backend_up(url)
                inst[name] = {"proc": cm, "url": url, "fake": furl}
            return inst

        inst = start()
        body = s.work / "submit.json"
        body.write_text(json.dumps({"workflow": big_workflow()}))
        post, get = (wrk_script(s.work, method="POST", body_path=body, headers=HEADERS),
                     wrk_script(s.work, method="GET", headers=HEADERS))
        if "submit" in loads or "get" in loads:
            for v in inst.values():  # a running job keeps the backend busy; submits queue
                http_json("POST", v["fake"] + "/__bench__/gate")
                job = submit(v["url"], gate_workflow())
                v["running"] = wait_job(v["url"], job["workflowId"], ("running",))["workflowId"]
        res: dict[str, dict[str, list[float]]] = {}
        for load in loads:
            if load == "dispatch" and ("submit" in loads or "get" in loads):
                s.stop_all()  # fresh ones: the queue is full of the submit load's jobs
                inst = start()
            for pair in range(args.pairs):
                for name in ("A", "B") if pair % 2 == 0 else ("B", "A"):
                    v = inst[name]
                    r = res.setdefault(f"{load}:{name}", {"value": [], "cpu": []})
                    c0 = cpu_seconds(v["proc"].pid)
                    if load == "dispatch":
                        out = asyncio.run(_dispatch_through(v["url"], v["fake"], args.jobs,
                                                            10_000 + pair * 1000))
                        r["value"].append(out["jobs_per_s"])
                        r.setdefault("gap", []).append(1e3 * (out["gap_median"] or 0))
                        r["cpu"].append(1e6 * (cpu_seconds(v["proc"].pid) - c0) / args.jobs)
                        continue
                    target = (v["url"] + "/v1/comfyui/workflow" if load == "submit"
                              else f"{v['url']}/v1/comfyui/workflow/{v['running']}")
                    out = wrk(target, script=post if load == "submit" else get, connections=50,
                              seconds=args.seconds)
                    if out["non_2xx"] or out["errors"]:
                        raise RuntimeError(f"{load} {name}: errors {out}")
                    r["value"].append(out["rps"])
                    r["cpu"].append(1e6 * (cpu_seconds(v["proc"].pid) - c0) / out["requests"])
            a, b = res[f"{load}:A"], res[f"{load}:B"]
            unit = "jobs/s" if load == "dispatch" else "req/s"
            print(f"{load:9} A {median(a['value']):8.1f} {unit}  B {median(b['value']):8.1f}  "
                  f"B/A paired {median(y / x for x, y in zip(a['value'], b['value'])):.3f}  |  CPU us per "
                  f"{'job' if load == 'dispatch' else 'request'}: A {median(a['cpu']):.0f}  "
                  f"B {median(b['cpu']):.0f}  B/A paired {median(y / x for x, y in zip(a['cpu'], b['cpu'])):.3f}",
                  flush=True)
            if load == "dispatch":
                print(f"{'':9} gap success -> next POST: A {median(a['gap']):.2f} ms  B {median(b['gap']):.2f} ms")
        print(json.dumps({"a": args.a, "b": args.b, "results": res}))
    finally:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
