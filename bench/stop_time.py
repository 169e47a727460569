#!/usr/bin/env python3
"""How long a stop takes while a big model is being hashed (issue "never
wedged", case 9: it took 17.8 s with an 8 GB file before hashing heard the
stop).

    python bench/stop_time.py [--gib 10] [--runs 5]

Each run: a sparse file of --gib GiB as the only checkpoint, comfymgr
started on it (`python comfymgr.py`, its own state directory, ComfyUI at a
closed port), GET /v1/comfyui/models (the hash starts in the background),
1 s later SIGTERM; the time from the signal to the exit (status 0, and the
log saying the hash stopped). Prints each run, the median and the slowest.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "stop-time-key-0123456789"


def one_run(gib: int) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        models = tmp / "checkpoints"
        models.mkdir()
        with open(models / "big.safetensors", "wb") as handle:
            handle.truncate(gib * 2**30)  # sparse: nothing on disk, minutes to read
        port = free_port()
        env = dict(os.environ, MANAGEMENT_API_PORT=str(port), MANAGEMENT_API_HOST="127.0.0.1",
                   MANAGEMENT_API_KEY=KEY, COMFYMGR_STATE_DIR=str(tmp / "state"),
                   COMFYUI_URL=f"http://127.0.0.1:{free_port()}",
                   COMFYUI_MODELS_CHECKPOINTS=str(models))
        proc = subprocess.Popen([sys.executable, str(ROOT / "comfymgr.py")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise SystemExit("comfymgr did not start:\n" + proc.stdout.read()) from None
                    time.sleep(0.05)
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/comfyui/models?type=checkpoints", headers={"X-API-Key": KEY})
            listing = json.loads(urllib.request.urlopen(request, timeout=5).read())
            if listing["models"][0]["hash"] is not None:
                raise SystemExit("the model was hashed already: not a stop during a hash")
            time.sleep(1.0)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(120)
            took = time.monotonic() - started
            log = proc.stdout.read()
            if code != 0 or "stopped: comfymgr is stopping" not in log:
                raise SystemExit(f"exit status {code}, or the hash was not stopped:\n{log}")
            return took
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=int, default=10, help="size of the model being hashed")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times = []
    for run in range(args.runs):
        times.append(one_run(args.gib))
        print(f"run {run + 1}: SIGTERM -> exit {times[-1] * 1000:.0f} ms")
    print(f"stop with a {args.gib} GiB model being hashed: median {statistics.median(times) * 1000:.0f} ms, "
          f"slowest {max(times) * 1000:.0f} ms over {args.runs} runs")


if __name__ == "__main__":
    main()
