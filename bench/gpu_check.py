#!/usr/bin/env python3
"""GPU check: comfymgr's GPU figures against nvidia-smi, on a machine with an
NVIDIA GPU. Starts comfymgr (no ComfyUI needed), scrapes /metrics and
/v1/status, reads `nvidia-smi --query-gpu`, and prints each figure with
PASS/FAIL. Exit status 0 only when every check passes.

    python3 bench/gpu_check.py [--python python3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "gpu-check-key"
FIELDS = "index,name,uuid,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, key: bool = False) -> str:
    request = urllib.request.Request(url, headers={"X-API-Key": KEY} if key else {})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.read().decode()


def smi() -> list[dict[str, str]]:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    names = FIELDS.split(",")
    return [dict(zip(names, (v.strip() for v in line.split(",")))) for line in out.strip().splitlines()]


def metric(text: str, name: str, gpu: str) -> float | None:
    prefix = f'{name}{{gpu_id="{gpu}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    port = free_port()
    state = tempfile.mkdtemp(prefix="comfymgr-gpu-check-")
    env = dict(os.environ, MANAGEMENT_API_HOST="127.0.0.1", MANAGEMENT_API_PORT=str(port),
               MANAGEMENT_API_KEY=KEY, COMFYMGR_STATE_DIR=state, COMFYMGR_GPU_POLL_INTERVAL="1s",
               COMFYUI_URL=f"http://127.0.0.1:{free_port()}")
    proc = subprocess.Popen([args.python, str(ROOT / "comfymgr.py")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    failures = 0

    def check(label: str, ours, theirs, ok: bool) -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {label:<34} comfymgr={ours!s:<28} nvidia-smi={theirs}")

    try:
        for _ in range(100):
            try:
                get(base + "/health")
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.5)  # one more NVML poll, close in time to nvidia-smi's
        status = json.loads(get(base + "/v1/status", key=True))["gpu"]
        text = get(base + "/metrics")
        try:
            cards = smi()
        except (OSError, subprocess.CalledProcessError) as exc:
            print(f"FAIL  nvidia-smi could not be run ({exc}); this check needs an NVIDIA GPU")
            print(f"      comfymgr says: {json.dumps(status)}")
            return 2
        check("NVML available", status["available"], f"{len(cards)} GPU(s)",
              status["available"] and len(status["devices"]) == len(cards))
        for card in cards:
            gpu = card["index"]
            device = next((d for d in status["devices"] if str(d["index"]) == gpu), {})
            mib = 2 ** 20
            check(f"gpu {gpu} name", device.get("name"), card["name"], device.get("name") == card["name"])
            check(f"gpu {gpu} uuid", device.get("uuid"), card["uuid"], device.get("uuid") == card["uuid"])
            util = metric(text, "comfyui_gpu_utilization", gpu)
            check(f"gpu {gpu} utilization %", util, card["utilization.gpu"],
                  util is not None and abs(util - float(card["utilization.gpu"])) <= 10)
            used = metric(text, "comfyui_vram_usage_bytes", gpu)
            check(f"gpu {gpu} memory used MiB", used and round(used / mib), card["memory.used"],
                  used is not None and abs(used / mib - float(card["memory.used"])) <= 256)
            total = metric(text, "comfymgr_gpu_memory_total_bytes", gpu)
            check(f"gpu {gpu} memory total MiB", total and round(total / mib), card["memory.total"],
                  total is not None and abs(total / mib - float(card["memory.total"])) <= 1)
            temp = metric(text, "comfymgr_gpu_temperature_celsius", gpu)
            check(f"gpu {gpu} temperature C", temp, card["temperature.gpu"],
                  temp is not None and abs(temp - float(card["temperature.gpu"])) <= 3)
            power = metric(text, "comfymgr_gpu_power_watts", gpu)
            if card["power.draw"] not in ("[N/A]", "N/A", ""):
                check(f"gpu {gpu} power W", power, card["power.draw"],
                      power is not None and abs(power - float(card["power.draw"])) <= 30)
    finally:
        proc.terminate()
        proc.wait(15)
    print(f"\n{'ALL PASS' if not failures else f'{failures} FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
