"""Shared pieces of the benchmark suite: processes, ports, wrk, statistics.

Every server the suite starts binds 127.0.0.1, is started and stopped by
`Proc` (by its own pid, never by name), and every load loop is bounded in
count and in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
API_KEY = "bench-key-0123456789abcdef"
HEADERS = {"X-API-Key": API_KEY}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all held open while they are picked
    (free_port() twice may well give the same port back)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def raise_fd_limit() -> None:
    """1,000 WebSocket clients need more than the usual 1,024 descriptors."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_http(url: str, timeout: float = 30.0, headers: dict[str, str] | None = None,
              proc: subprocess.Popen | None = None) -> float:
    """Poll until `url` answers 200; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic()
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:g} s")
        time.sleep(0.01)


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
              timeout: float = 30.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:  # /metrics, /docs: not JSON
        return status, raw.decode(errors="replace")


class Proc:
    """A server process of the suite: its output goes to a log file, it is
    stopped with SIGTERM (then SIGKILL) by its own pid."""

    def __init__(self, name: str, argv: Sequence[str], logdir: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 scrub: tuple[str, ...] = ()) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        # scrub: prefixes of inherited variables to drop (comfymgr's own
        # settings from the caller's shell would change what is measured).
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(scrub)} if scrub else os.environ
        self.popen = subprocess.Popen(list(argv), stdout=self._log, stderr=subprocess.STDOUT,
                                      env={**inherited, **(env or {})}, cwd=cwd or ROOT,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_fake(logdir: Path, workdir: Path, *, port: int | None = None,
               extra: Sequence[str] = ()) -> tuple[Proc, str]:
    """The timed fake ComfyUI (bench/fake_timed.py) on a free port."""
    port = port or free_port()
    out = workdir / f"fake-out-{port}"
    proc = Proc(f"fake-{port}", [PY, str(BENCH / "fake_timed.py"), "--port", str(port),
                                 "--output-dir", str(out), *extra], logdir)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/__fake__/stats", proc=proc.popen)
    return proc, url


# Inherited variables that would configure comfymgr: dropped, so that the
# suite runs it at its defaults whatever the caller's shell exports.
SETTING_PREFIXES = ("COMFYMGR_", "COMFYUI_", "MANAGEMENT_API_")


def start_fakes(logdir: Path, workdir: Path, count: int, *, per_process: int = 16,
                extra: Sequence[str] = ()) -> tuple[list[Proc], list[str]]:
    """`count` timed fakes, `per_process` to a process (bench/fake_timed.py
    --ports): many backends without a process each."""
    procs, urls, owner = [], [], []
    every = free_ports(count)
    for first in range(0, count, per_process):
        ports = every[first:first + per_process]
        proc = Proc(f"fakes-{ports[0]}", [PY, str(BENCH / "fake_timed.py"), "--ports", ",".join(map(str, ports)),
                                          "--output-dir", str(workdir / f"fakes-out-{ports[0]}"), *extra], logdir)
        procs.append(proc)
        urls += [f"http://127.0.0.1:{port}" for port in ports]
        owner += [proc] * len(ports)
    for url, proc in zip(urls, owner):
        wait_http(url + "/__fake__/stats", timeout=60, proc=proc.popen)
    return procs, urls


def comfymgr_env(state_dir: Path, port: int, comfyui_url: str | None, **settings: str) -> dict[str, str]:
    """comfymgr at its defaults (log level info, synchronous=full, prefetch
    on, ...): only where it listens, its state, its key and its backends are
    set, and the rate limit, which stays on but set high: at its default of
    100 requests a minute per address the load generators would measure 429s."""
    env = {"MANAGEMENT_API_HOST": "127.0.0.1", "MANAGEMENT_API_PORT": str(port),
           "MANAGEMENT_API_KEY": API_KEY, "COMFYMGR_STATE_DIR": str(state_dir),
           "COMFYMGR_RATE_LIMIT": "100000000",
           # Nothing answers here unless a fake ComfyUI is given.
           "COMFYUI_URL": comfyui_url or "http://127.0.0.1:9"}
    env.update(settings)
    return env


def start_comfymgr(logdir: Path, state_dir: Path, comfyui_url: str | None, *, name: str = "comfymgr",
                   harness: Sequence[str] = (), **settings: str) -> tuple[Proc, str]:
    """comfymgr through bench/harness.py (plain `comfymgr.main()` unless
    harness flags ask for tracing or a stand-in NVML)."""
    port = free_port()
    proc = Proc(name, [PY, str(BENCH / "harness.py"), *harness], logdir,
                env=comfymgr_env(state_dir, port, comfyui_url, **settings), scrub=SETTING_PREFIXES)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc=proc.popen)
    return proc, url


def wait_backend_up(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = http_json("GET", url + "/v1/status", headers=HEADERS)
        if status == 200 and body["backends"] and all(b["state"] == "up" for b in body["backends"]):
            return
        time.sleep(0.05)
    raise TimeoutError("comfymgr's backend never came up")


# -- event-loop lag ------------------------------------------------------------------

class LagProbe:
    """How long an event loop is held: a task that asks for a wake-up every
    `interval` seconds and records how late each comes (the time the loop
    spent on something else, a handler that does not yield). Runs inside the
    measured server (harness.py --lag-probe, ref_server.py --lag-probe) and
    is read and reset at GET /__bench__/lag[?reset=1]."""

    def __init__(self, interval: float = 0.001, keep: int = 600_000) -> None:
        self.interval = interval
        self.keep = keep
        self.lags: list[float] = []
        self.worst = 0.0

    def reset(self) -> None:
        self.lags = []
        self.worst = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.interval)
            lag = loop.time() - asked - self.interval
            self.worst = max(self.worst, lag)
            if len(self.lags) < self.keep:
                self.lags.append(lag)

    def report(self) -> dict[str, float]:
        lags = self.lags
        return {"wakeups": len(lags), "max_ms": 1e3 * self.worst,
                "p50_ms": 1e3 * percentile(lags, 50), "p99_ms": 1e3 * percentile(lags, 99),
                "over_10ms": sum(1 for lag in lags if lag > 0.010)}

    def install(self, app: Any) -> None:
        """On an aiohttp Application: the task, and GET /__bench__/lag."""
        from aiohttp import web

        async def lag(request: web.Request) -> web.Response:
            body = self.report()
            if request.query.get("reset"):
                self.reset()
            return web.json_response(body)

        async def task_ctx(app: web.Application):
            task = asyncio.ensure_future(self.run())
            yield
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        app.router.add_get("/__bench__/lag", lag)
        app.cleanup_ctx.append(task_ctx)


# -- wrk -----------------------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk_script(workdir: Path, *, method: str = "GET", body_path: Path | None = None,
               headers: dict[str, str] | None = None) -> Path:
    lines = [f'wrk.method = "{method}"']
    for name, value in (headers or {}).items():
        lines.append(f'wrk.headers["{name}"] = "{value}"')
    if body_path is not None:
        lines += [f'local f = assert(io.open("{body_path}", "rb"))', "wrk.body = f:read(\"*a\")",
                  "f:close()", 'wrk.headers["Content-Type"] = "application/json"']
    path = workdir / f"wrk-{method.lower()}-{abs(hash(tuple(lines)))}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def wrk(url: str, *, script: Path, connections: int, seconds: float, threads: int = 1) -> dict[str, Any]:
    """One bounded wrk run: requests/s, p50/p99 latency, errors."""
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    argv = [exe, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
            "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    result: dict[str, Any] = {"errors": 0, "non_2xx": 0}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Requests/sec:"):
            result["rps"] = float(line.split()[1])
        elif re.match(r"^(50|99)(\.000)?%\s", line):
            pct, value = line.split()[:2]
            result[f"p{pct.split('.')[0].rstrip('%')}"] = _seconds(value)
        elif line.startswith("Non-2xx or 3xx responses:"):
            result["non_2xx"] = int(line.split(":")[1])
        elif line.startswith("Socket errors:"):
            result["errors"] = sum(int(n) for n in re.findall(r"\d+", line))
        elif re.match(r"^\d+ requests in", line):
            result["requests"] = int(line.split()[0])
    if "rps" not in result:
        raise RuntimeError(f"wrk gave no result:\n{out}")
    return result


# -- statistics ------------------------------------------------------------------------

def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def scratch_dir(prefix: str = "comfymgr-bench-") -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
