#!/usr/bin/env python3
"""Crash harness: comfymgr killed again and again under load, then audited.

comfymgr runs as a real process (`python comfymgr.py`, state in a temporary
directory) in front of the fake ComfyUI (tests/fake_comfyui.py, another
process, with a node delay so that jobs take some milliseconds). Client
tasks submit jobs (mixed priorities, some with an Idempotency-Key that is
retried across crashes), cancel some, and follow the event stream, resuming
with `?since=<last seq>` after every restart. comfymgr is killed with
SIGKILL at random moments (SIGTERM at others) and started again, many times.
After every kill the database must pass `PRAGMA integrity_check`; once the
load stops every job must end, and then the audit checks that:

- every job that got a 202 exists exactly once, with its original priority;
- every job reached a terminal state;
- the fake ComfyUI executed each prompt at most once, and no job twice;
- no job is `completed` unless the fake's history says success for its prompt;
- event seqs are strictly increasing, and each stream client, resuming with
  `since`, saw every event exactly once (compared with the events table, read
  through comfymgr.Storage from a copy of the database once comfymgr is gone).

    python3 bench/crash_harness.py                   # the long run: 60 kills, 20 SIGTERMs
    python3 bench/crash_harness.py --kills 4 --sigterms 1 --seed 7

The figures are printed and written as JSON (--out). tests/test_reliability.py
runs a short version of the same code in CI and reuses the process helpers
below (FakeComfy, Comfymgr, Api, HealthProbe).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import comfymgr  # noqa: E402

API_KEY = "reliability-key-0123456789abcdef"
PRIORITIES = ("high", "normal", "low")
TERMINAL = ("completed", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_workflow(tag: str, *, blur: bool = True) -> dict[str, Any]:
    """EmptyImage -> (ImageBlur) -> SaveImage whose prefix is `tag`: the tag
    lets the audit map each prompt the fake executed back to the submit that
    asked for it, and sets the colour, so that ComfyUI's cache never serves
    the blur (each job really takes the fake's node delay)."""
    graph: dict[str, Any] = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1,
                         "color": zlib.crc32(tag.encode()) & 0xFFFFFF}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": tag}},
    }
    if blur:
        graph["5"] = {"class_type": "ImageBlur",
                      "inputs": {"image": ["1", 0], "blur_radius": 1, "sigma": 1.0}}
        graph["9"]["inputs"]["images"] = ["5", 0]
    return graph


def prompt_tag(prompt: Any) -> str | None:
    """The SaveImage prefix of a prompt ComfyUI ran (see job_workflow)."""
    if isinstance(prompt, dict):
        for node in prompt.values():
            if isinstance(node, dict) and node.get("class_type") == "SaveImage":
                return str((node.get("inputs") or {}).get("filename_prefix"))
    return None


# -- processes ---------------------------------------------------------------------------

class _LogPump(threading.Thread):
    """Copies a child's output into a file from this process, so that a
    file-size limit put on the child never blocks or truncates its log."""

    def __init__(self, stream, path: Path, first_line: threading.Event | None = None):
        super().__init__(daemon=True)
        self.stream, self.path, self.first_line = stream, path, first_line
        self.lines: list[str] = []

    def run(self) -> None:
        with open(self.path, "a", encoding="utf-8", errors="replace") as out:
            for raw in iter(self.stream.readline, b""):
                line = raw.decode("utf-8", "replace")
                self.lines.append(line)
                out.write(line)
                out.flush()
                if self.first_line is not None:
                    self.first_line.set()


class FakeComfy:
    """tests/fake_comfyui.py as its own process; driven through /__fake__/."""

    def __init__(self, workdir: Path, *, port: int | None = None,
                 node_delay: dict[str, float] | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.node_delay = node_delay or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "fake.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> FakeComfy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, str(ROOT / "tests" / "fake_comfyui.py"), "--port", str(self.port),
                "--output-dir", str(self.workdir / "output")]
        for cls, delay in self.node_delay.items():
            args += ["--node-delay", f"{cls}={delay}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        ready = threading.Event()
        _LogPump(self.proc.stdout, self.log_path, ready).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"the fake ComfyUI did not start: {self.log_path.read_text()}")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict[str, Any]:
        return self._control("GET", "/__fake__/stats")

    def history(self) -> dict[str, Any]:
        """The full /history, prompts included (only valid in mode ok)."""
        return self._control("GET", "/history")

    def set_mode(self, mode: str = "ok", **knobs: Any) -> dict[str, Any]:
        return self._control("POST", "/__fake__/mode", {"mode": mode, **knobs})


class Comfymgr:
    """One `python comfymgr.py` process on a loopback port, settings by env."""

    def __init__(self, state_dir: Path, comfyui_url: str, *, port: int | None = None,
                 env: dict[str, str] | None = None, log_path: Path | None = None,
                 wrapper: list[str] | None = None, preexec=None) -> None:
        self.state_dir = Path(state_dir)
        self.port = port or free_port()
        self.comfyui_url = comfyui_url
        self.extra_env = env or {}
        self.log_path = log_path or self.state_dir.parent / "comfymgr.log"
        self.wrapper = wrapper or []
        self.preexec = preexec
        self.proc: subprocess.Popen | None = None
        self.pump: _LogPump | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "comfymgr.db"

    def env(self) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONDONTWRITEBYTECODE": "1",
            "MANAGEMENT_API_HOST": "127.0.0.1",
            "MANAGEMENT_API_PORT": str(self.port),
            "MANAGEMENT_API_KEY": API_KEY,
            "COMFYMGR_STATE_DIR": str(self.state_dir),
            "COMFYUI_URL": self.comfyui_url,
            "COMFYMGR_RATE_LIMIT": "0",
            "COMFYMGR_RECONCILE_INTERVAL": "0.2s",
            "COMFYMGR_SHUTDOWN_TIMEOUT": "3s",
            "COMFYMGR_BACKEND_TIMEOUT": "3s",
        }
        env.update(self.extra_env)
        return env

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> Comfymgr:
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')}\n")
        self.proc = subprocess.Popen([*self.wrapper, sys.executable, str(ROOT / "comfymgr.py")],
                                     env=self.env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=self.preexec)
        self.pump = _LogPump(self.proc.stdout, self.log_path)
        self.pump.start()
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 30.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.alive():
                raise RuntimeError(f"comfymgr exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    return time.monotonic() - started
                conn.close()
            time.sleep(0.02)
        raise RuntimeError(f"comfymgr did not answer /health within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        """Send sig and wait; returns the exit status (negative: killed by a signal)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.pump is not None:
            self.pump.join(5)
        return self.proc.returncode

    def rss_kib(self) -> int:
        """Resident memory of the comfymgr process, KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


class Api:
    """A small blocking JSON client (urllib; a new connection per call)."""

    def __init__(self, base: str, key: str | None = API_KEY) -> None:
        self.base, self.key = base, key

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None, key: str | None = "", timeout: float = 30.0
             ) -> tuple[int, Any, dict[str, str]]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        all_headers = {"Content-Type": "application/json"}
        key = self.key if key == "" else key
        if key is not None:
            all_headers["X-API-Key"] = key
        all_headers.update(headers or {})
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=all_headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                status, payload, got = resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            status, payload, got = exc.code, exc.read(), dict(exc.headers)
        try:
            return status, json.loads(payload) if payload else None, got
        except ValueError:
            return status, payload, got

    def submit(self, workflow: dict[str, Any], **fields: Any) -> tuple[int, Any]:
        status, body, _ = self.call("POST", "/v1/comfyui/workflow", {"workflow": workflow, **fields})
        return status, body

    def job(self, job_id: str) -> dict[str, Any]:
        status, body, _ = self.call("GET", f"/v1/comfyui/workflow/{job_id}")
        assert status == 200, (status, body)
        return body

    def wait_job(self, job_id: str, statuses=TERMINAL, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"{job_id} never reached {statuses}: {job}")
            time.sleep(0.02)

    def status(self) -> dict[str, Any]:
        return self.call("GET", "/v1/status")[1]

    def wait_backend(self, state: str = "up", timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            backend = self.status()["backends"][0]
            if backend["state"] == state:
                return backend
            if time.monotonic() > deadline:
                raise AssertionError(f"backend never {state}: {backend}")
            time.sleep(0.02)


class HealthProbe(threading.Thread):
    """GET /health every `interval` seconds on one kept-alive connection,
    timing each answer, until stop(). Runs in its own thread so that it
    measures comfymgr, not the caller's event loop."""

    def __init__(self, port: int, interval: float = 0.02, timeout: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.port, self.interval, self.timeout = port, interval, timeout
        self.samples: list[float] = []
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        conn = None
        while not self._stop_event.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                    conn.connect()  # not timed: the probe times answers, not the handshake
                started = time.perf_counter()
                conn.request("GET", "/health")
                resp = conn.getresponse()
                resp.read()
                self.samples.append(time.perf_counter() - started)
                self.statuses[resp.status] += 1
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
            self._stop_event.wait(self.interval)
        if conn is not None:
            conn.close()

    def stop(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join(10)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        ms = sorted(s * 1000 for s in self.samples)
        return {"count": len(ms), "max_ms": round(ms[-1], 2) if ms else None,
                "p50_ms": round(statistics.median(ms), 2) if ms else None,
                "p99_ms": round(ms[int(len(ms) * 0.99) - 1], 2) if ms else None,
                "statuses": dict(self.statuses), "errors": self.errors[:5]}


def snapshot_db(db_path: Path, into: Path) -> Path:
    """Copy the database with its WAL (comfymgr must be gone), so that checks
    never write to, checkpoint or recover the original."""
    into.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{db_path}{suffix}")
        target = into / f"{db_path.name}{suffix}"
        if target.exists():
            target.unlink()
        if source.exists():
            shutil.copyfile(source, target)
    return into / db_path.name


def integrity_check(db_path: Path, scratch: Path) -> str:
    """PRAGMA integrity_check of the database as comfymgr left it."""
    copy = snapshot_db(db_path, scratch)
    conn = sqlite3.connect(str(copy))
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _all_jobs(storage: comfymgr.Storage) -> list[comfymgr.Job]:
    jobs: list[comfymgr.Job] = []
    before = None
    while page := storage.list_jobs(before=before, limit=500):
        jobs.extend(page)
        before = page[-1].n
    return jobs


def read_db(db_path: Path, scratch: Path) -> tuple[list[comfymgr.Job], list[comfymgr.Event], str]:
    """Every job and event, through comfymgr's own Storage, opened on a copy."""
    storage = comfymgr.Storage(snapshot_db(db_path, scratch))
    try:
        jobs = _all_jobs(storage)
        events: list[comfymgr.Event] = []
        seq = 0
        while page := storage.events_since(seq, limit=5000):
            events.extend(page)
            seq = page[-1].seq
        return jobs, events, storage._conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        storage.close()
        shutil.rmtree(scratch, ignore_errors=True)


def read_db_live(db_path: Path) -> tuple[list[comfymgr.Job], list[comfymgr.Event], str]:
    """Every job and event while comfymgr runs: a read-only connection (WAL
    readers never block the writer) wrapped in comfymgr.Storage's read verbs."""
    storage = comfymgr.Storage.__new__(comfymgr.Storage)
    storage.path = Path(db_path)
    storage._conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    storage._conn.row_factory = sqlite3.Row
    try:
        jobs = _all_jobs(storage)
        return jobs, storage.events_since(0, limit=1_000_000), "unchecked"
    finally:
        storage.close()


# -- the crash run ------------------------------------------------------------------------

class _Load:
    """The clients' shared record of what comfymgr told them."""

    def __init__(self) -> None:
        self.acked: dict[str, dict[str, Any]] = {}          # job id -> tag, priority, key
        self.tags: dict[str, str] = {}                       # tag -> job id (acked)
        self.unknown_tags: set[str] = set()                  # submit outcome never heard
        self.refused: collections.Counter[int] = collections.Counter()
        self.key_answers: dict[str, set[str]] = collections.defaultdict(set)
        self.replays = 0
        self.submits = 0
        self.keyed_retries = 0
        self.must_be_cancelled: set[str] = set()
        self.cancel_answers: collections.Counter[int] = collections.Counter()
        self.problems: list[str] = []
        self.outstanding: set[str] = set()
        self.finished: set[str] = set()


class _Follower:
    """One stream client: follows everything, resumes with since=<last seq>."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[tuple[int, str, str]] = []
        self.last = 0
        self.connects = 0
        self.problems: list[str] = []
        self.closes: collections.Counter[str] = collections.Counter()


async def _crash_run(args: argparse.Namespace, work: Path, log, owned: list) -> dict[str, Any]:
    import aiohttp

    rng = random.Random(args.seed)
    fake = FakeComfy(work / "comfy", node_delay={"ImageBlur": args.node_delay})
    service = Comfymgr(work / "state", fake.url, env={
        "COMFYMGR_PROGRESS_INTERVAL": "20ms", "COMFYMGR_CANCEL_GRACE": "5s"})
    owned += [service, fake]  # stopped by run() whatever happens
    fake.start()
    load = _Load()
    followers = [_Follower(f"follower{i}") for i in range(args.followers)]
    stopping = asyncio.Event()
    headers = {"X-API-Key": API_KEY}
    timeout = aiohttp.ClientTimeout(total=10)
    figures: dict[str, Any] = {"kills": 0, "sigterms": 0, "kills_during_startup": 0,
                               "sigterm_exit_codes": collections.Counter(),
                               "sigterm_seconds": [], "restart_seconds": [],
                               "integrity_checks": 0, "integrity_ok": 0}

    async def submitter(index: int, http: aiohttp.ClientSession) -> None:
        n = 0
        while not stopping.is_set():
            if len(load.outstanding) >= args.max_outstanding:
                await asyncio.sleep(0.05)
                continue
            n += 1
            tag = f"c{index}n{n}"
            priority = rng.choices(PRIORITIES, weights=(2, 5, 3))[0]
            key = f"key-{tag}-{args.seed}" if rng.random() < args.keyed else None
            body = {"workflow": job_workflow(tag), "priority": priority}
            load.submits += 1
            answered = None
            for _ in range(200):
                try:
                    async with http.post(f"{service.base}/v1/comfyui/workflow", json=body,
                                         headers={**headers, **({"Idempotency-Key": key} if key else {})}) as resp:
                        answered = (resp.status, await resp.json(), resp.headers.get("Idempotent-Replayed"))
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                    if key is None or stopping.is_set():
                        break
                    load.keyed_retries += 1
                    await asyncio.sleep(0.1)
                    continue
                if answered[0] in (200, 202) or key is None:
                    break
                await asyncio.sleep(0.1)  # a keyed submit refused (503): try again
            if answered is None or answered[0] not in (200, 202):
                if answered is not None:
                    load.refused[answered[0]] += 1
                load.unknown_tags.add(tag)
                continue
            status, job, replayed = answered
            job_id = job["workflowId"]
            if status == 200 and replayed != "true":
                load.problems.append(f"{tag}: 200 without Idempotent-Replayed")
            load.replays += status == 200
            if key:
                load.key_answers[key].add(job_id)
                if rng.random() < 0.2:  # a client that retries though it got its answer
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                        async with http.post(f"{service.base}/v1/comfyui/workflow", json=body,
                                             headers={**headers, "Idempotency-Key": key}) as resp:
                            again = await resp.json()
                            if resp.status == 200:
                                load.replays += 1
                                load.key_answers[key].add(again["workflowId"])
                            elif resp.status != 503:
                                load.problems.append(f"{tag}: replay answered {resp.status}")
            if job_id in load.acked and load.acked[job_id]["tag"] != tag:
                load.problems.append(f"{job_id} answered for {tag} and {load.acked[job_id]['tag']}")
            if job["priority"] != priority:
                load.problems.append(f"{tag}: asked {priority}, answered {job['priority']}")
            load.acked.setdefault(job_id, {"tag": tag, "priority": priority, "key": key})
            load.tags[tag] = job_id
            if job_id not in load.finished:
                load.outstanding.add(job_id)
            await asyncio.sleep(rng.uniform(0.0, args.submit_pause))

    async def canceller(http: aiohttp.ClientSession) -> None:
        while not stopping.is_set():
            await asyncio.sleep(rng.uniform(0.05, 0.25))
            if not load.acked:
                continue
            job_id = rng.choice(list(load.acked)[-30:])
            try:
                if rng.random() < 0.3:  # the job ComfyUI runs now: an interrupt
                    async with http.get(f"{service.base}/v1/status", headers=headers) as resp:
                        job_id = (await resp.json())["backends"][0]["runningJob"] or job_id
                if rng.random() < args.cancel:
                    async with http.delete(f"{service.base}/v1/comfyui/workflow/{job_id}",
                                           headers=headers) as resp:
                        load.cancel_answers[resp.status] += 1
                        if resp.status == 200:
                            load.must_be_cancelled.add(job_id)
                            answer = await resp.json()
                            if answer.get("status") != "cancelled":
                                load.problems.append(f"DELETE {job_id}: 200 with {answer}")
                        elif resp.status == 404:
                            load.problems.append(f"DELETE {job_id}: 404 for an acknowledged job")
                else:
                    async with http.get(f"{service.base}/v1/comfyui/workflow/{job_id}",
                                        headers=headers) as resp:
                        if resp.status == 404:
                            load.problems.append(f"GET {job_id}: 404 for an acknowledged job")
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
                pass

    async def follow(follower: _Follower, http: aiohttp.ClientSession) -> None:
        while True:  # until cancelled, once it has caught up with the last event
            try:
                async with http.ws_connect(f"{service.base}/v1/comfyui/stream?since={follower.last}",
                                           headers=headers, heartbeat=None) as ws:
                    follower.connects += 1
                    async for message in ws:
                        if message.type != aiohttp.WSMsgType.TEXT:
                            break
                        data = json.loads(message.data)
                        kind = data.get("type", "")
                        if kind == "error":
                            follower.problems.append(f"stream error: {data}")
                        if not kind.startswith("workflow:"):
                            continue
                        seq = data["seq"]
                        if seq <= follower.last:
                            follower.problems.append(f"seq {seq} after {follower.last}")
                        follower.received.append((seq, kind, data["workflowId"]))
                        follower.last = max(follower.last, seq)
                        if kind in ("workflow:completed", "workflow:error", "workflow:cancelled"):
                            load.finished.add(data["workflowId"])
                            load.outstanding.discard(data["workflowId"])
                    follower.closes[str(ws.close_code)] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                follower.closes["refused"] += 1
            await asyncio.sleep(0.05)

    loop = asyncio.get_running_loop()
    scratch = work / "scratch"
    started = time.monotonic()
    kinds = ["kill"] * args.kills + ["term"] * args.sigterms
    rng.shuffle(kinds)
    await loop.run_in_executor(None, service.start)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        tasks = [asyncio.create_task(submitter(i, http)) for i in range(args.clients)]
        tasks.append(asyncio.create_task(canceller(http)))
        watchers = [asyncio.create_task(follow(f, http)) for f in followers]
        for cycle, kind in enumerate(kinds, 1):
            early = kind == "kill" and rng.random() < 0.1
            if not early:
                await asyncio.sleep(rng.uniform(args.min_up, args.max_up))
            if kind == "kill":
                figures["kills"] += 1
                figures["kills_during_startup"] += early
                rc = await loop.run_in_executor(None, service.stop, signal.SIGKILL)
            else:
                figures["sigterms"] += 1
                t0 = time.monotonic()
                rc = await loop.run_in_executor(None, service.stop, signal.SIGTERM)
                figures["sigterm_seconds"].append(round(time.monotonic() - t0, 3))
                figures["sigterm_exit_codes"][str(rc)] += 1
            result = await loop.run_in_executor(None, integrity_check, service.db_path, scratch)
            figures["integrity_checks"] += 1
            figures["integrity_ok"] += result == "ok"
            if result != "ok":
                load.problems.append(f"cycle {cycle}: integrity_check says {result}")
            log(f"cycle {cycle}/{len(kinds)}: {kind}{' (during startup)' if early else ''} rc={rc} "
                f"integrity={result} acked={len(load.acked)} outstanding={len(load.outstanding)}")
            t0 = time.monotonic()
            await loop.run_in_executor(None, functools.partial(service.start, wait=not early))
            if early:  # kill it again while it starts: before, during or after opening the database
                await asyncio.sleep(rng.uniform(0.05, 0.6))
                figures["kills"] += 1
                figures["kills_during_startup"] += 1
                rc = await loop.run_in_executor(None, service.stop, signal.SIGKILL)
                result = await loop.run_in_executor(None, integrity_check, service.db_path, scratch)
                figures["integrity_checks"] += 1
                figures["integrity_ok"] += result == "ok"
                if result != "ok":
                    load.problems.append(f"cycle {cycle}: integrity_check says {result} (startup kill)")
                t0 = time.monotonic()
                await loop.run_in_executor(None, service.start)
            figures["restart_seconds"].append(round(time.monotonic() - t0, 3))
        # The load stops; the last incarnation finishes every job.
        stopping.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        load_seconds = time.monotonic() - started
        drain_started = time.monotonic()
        api = Api(service.base)
        while True:
            counts = (await loop.run_in_executor(None, api.status))["queue"]["byStatus"]
            if counts["queued"] + counts["running"] == 0:
                break
            if time.monotonic() - drain_started > args.drain_timeout:
                load.problems.append(f"jobs still unfinished {args.drain_timeout} s after the load: {counts}")
                break
            await asyncio.sleep(0.1)
        figures["drain_seconds"] = round(time.monotonic() - drain_started, 2)
        status = await loop.run_in_executor(None, api.status)
        latest = status["stream"]["latestSeq"]
        caught_up = time.monotonic() + args.drain_timeout
        while any(f.last < latest for f in followers) and time.monotonic() < caught_up:
            await asyncio.sleep(0.05)
        if any(f.last < latest for f in followers):
            load.problems.append(f"stream clients did not catch up to seq {latest}: "
                                 f"{[f.last for f in followers]}")
        for watcher in watchers:
            watcher.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    figures["final_rss_kib"] = service.rss_kib()
    rc = await loop.run_in_executor(None, service.stop, signal.SIGTERM)
    figures["final_exit_code"] = rc
    fake_stats = fake.stats()
    fake_history = fake.history()
    fake.kill(signal.SIGTERM)
    jobs, events, final_integrity = read_db(service.db_path, scratch)
    figures["integrity_checks"] += 1
    figures["integrity_ok"] += final_integrity == "ok"
    figures["seconds"] = round(time.monotonic() - started, 1)
    figures["load_seconds"] = round(load_seconds, 1)
    return audit(load, followers, jobs, events, fake_stats, fake_history, figures)


def audit(load: _Load, followers: list[_Follower], jobs: list[comfymgr.Job],
          events: list[comfymgr.Event], fake_stats: dict[str, Any], fake_history: dict[str, Any],
          figures: dict[str, Any]) -> dict[str, Any]:
    """Every promise, checked against the database and the fake's record."""
    problems = list(load.problems)
    by_id = {job.id: job for job in jobs}
    by_tag: dict[str, list[comfymgr.Job]] = collections.defaultdict(list)
    for job in jobs:
        tag = prompt_tag(json.loads(job.workflow))
        by_tag[tag or "?"].append(job)
    # Every 202 exists, once, with its priority.
    lost = [j for j in load.acked if j not in by_id]
    wrong_priority = [j for j, a in load.acked.items()
                      if j in by_id and by_id[j].priority.label != a["priority"]]
    duplicated = {t: [j.id for j in js] for t, js in by_tag.items() if len(js) > 1}
    known = set(load.tags) | load.unknown_tags
    phantom = [j.id for t, js in by_tag.items() if t not in known for j in js]
    split_keys = {k: sorted(ids) for k, ids in load.key_answers.items() if len(ids) > 1}
    unfinished = [j.id for j in jobs if not j.terminal]
    not_cancelled = [j for j in load.must_be_cancelled if j in by_id and by_id[j].status != "cancelled"]
    # What the fake ran.
    executions = fake_stats["execution_count"]
    ran_twice = {pid: n for pid, n in executions.items() if n > 1}
    posted = fake_stats["posted_prompt_ids"]
    posted_twice = [pid for pid, n in collections.Counter(posted).items() if n > 1]
    prompts_per_tag: collections.Counter[str] = collections.Counter()
    for pid, entry in fake_history.items():
        prompts_per_tag[prompt_tag(entry["prompt"][2]) or "?"] += executions.get(pid, 0) > 0
    jobs_run_twice = {t: n for t, n in prompts_per_tag.items() if n > 1}
    completed_without_success = []
    for job in jobs:
        if job.status == "completed":
            status = (fake_history.get(job.prompt_id or "") or {}).get("status") or {}
            if not (status.get("status_str") == "success" and status.get("completed")):
                completed_without_success.append(job.id)
    # Events: seqs, one ending per finished job, matching its state.
    seqs = [e.seq for e in events]
    seq_problems = sum(1 for a, b in zip(seqs, seqs[1:]) if b <= a)
    endings: dict[str, list[str]] = collections.defaultdict(list)
    firsts: dict[str, str] = {}
    for event in events:
        firsts.setdefault(event.job_id, event.type)
        if event.type in ("workflow:completed", "workflow:error", "workflow:cancelled"):
            endings[event.job_id].append(event.type)
    expected_end = {"completed": "workflow:completed", "failed": "workflow:error",
                    "cancelled": "workflow:cancelled"}
    bad_endings = [j.id for j in jobs if j.terminal and endings.get(j.id) != [expected_end[j.status]]]
    bad_firsts = [j.id for j in jobs if firsts.get(j.id) != "workflow:queued"]
    # The stream, as each client saw it across every restart.
    db_events = {e.seq: (e.type, e.job_id) for e in events}
    stream: list[dict[str, Any]] = []
    for follower in followers:
        got = collections.Counter(seq for seq, _, _ in follower.received)
        seen = {seq: (kind, job) for seq, kind, job in follower.received}
        missing = [s for s, (kind, _) in db_events.items()
                   if s not in seen and kind != comfymgr.EVENT_PROGRESS]
        # A progress event may be superseded in a slow client's queue by a
        # newer one of the same job (decision 5): allowed when a later event
        # of that job was delivered.
        delivered_after: dict[str, int] = {}
        for seq, _, job in follower.received:
            delivered_after[job] = max(delivered_after.get(job, 0), seq)
        progress_skipped = [s for s, (kind, job) in db_events.items()
                            if s not in seen and kind == comfymgr.EVENT_PROGRESS]
        progress_unexplained = [s for s in progress_skipped
                                if delivered_after.get(db_events[s][1], 0) <= s]
        stream.append({
            "client": follower.name, "events": len(follower.received), "connects": follower.connects,
            "duplicates": sum(n - 1 for n in got.values() if n > 1),
            "out_of_order": sum(1 for a, b in zip(follower.received, follower.received[1:])
                                if b[0] <= a[0]),
            "missing": len(missing), "progress_superseded": len(progress_skipped) - len(progress_unexplained),
            "progress_missing": len(progress_unexplained),
            "not_in_db": sum(1 for s in seen if s not in db_events),
            "mismatched": sum(1 for s, v in seen.items() if s in db_events and db_events[s] != v),
            "closes": dict(follower.closes), "problems": follower.problems[:5],
        })
    states = collections.Counter(j.status for j in jobs)
    errors = collections.Counter((j.error or {}).get("code") for j in jobs if j.status == "failed")
    report = {
        **{k: (dict(v) if isinstance(v, collections.Counter) else v) for k, v in figures.items()
           if k not in ("sigterm_seconds", "restart_seconds")},
        "sigterm_seconds_max": max(figures["sigterm_seconds"], default=None),
        "restart_seconds_mean": round(statistics.mean(figures["restart_seconds"]), 3)
        if figures["restart_seconds"] else None,
        "restart_seconds_max": max(figures["restart_seconds"], default=None),
        "submits": load.submits, "acknowledged": len(load.acked), "replays": load.replays,
        "keyed_retries": load.keyed_retries, "unknown_outcome": len(load.unknown_tags),
        "unknown_outcome_stored": sum(1 for t in load.unknown_tags if t in by_tag),
        "refused": dict(load.refused), "jobs_in_db": len(jobs), "states": dict(states),
        "failed_codes": dict(errors), "cancel_answers": dict(load.cancel_answers),
        "lost": len(lost), "wrong_priority": len(wrong_priority), "duplicated": len(duplicated),
        "phantom": len(phantom), "idempotency_keys": len(load.key_answers),
        "idempotency_split": len(split_keys), "unfinished": len(unfinished),
        "cancel_200_not_cancelled": len(not_cancelled),
        "prompts_posted": len(posted), "prompts_executed": len(executions),
        "prompts_executed_twice": len(ran_twice), "prompts_posted_twice": len(posted_twice),
        "jobs_executed_twice": len(jobs_run_twice),
        "completed_without_success": len(completed_without_success),
        "events": len(events), "event_seq_not_increasing": seq_problems,
        "bad_event_endings": len(bad_endings), "bad_first_events": len(bad_firsts),
        "stream": stream,
    }
    for name, items in (("lost", lost), ("wrong priority", wrong_priority),
                        ("duplicated", list(duplicated.items())), ("phantom", phantom),
                        ("idempotency key answered with several jobs", list(split_keys.items())),
                        ("unfinished", unfinished), ("cancel 200 but not cancelled", not_cancelled),
                        ("prompt executed twice", list(ran_twice.items())),
                        ("prompt posted twice", posted_twice),
                        ("job executed twice", list(jobs_run_twice.items())),
                        ("completed without success in ComfyUI's history", completed_without_success),
                        ("wrong ending events", bad_endings), ("first event not queued", bad_firsts)):
        if items:
            problems.append(f"{name}: {len(items)}, e.g. {items[:3]}")
    if seq_problems:
        problems.append(f"event seqs not increasing: {seq_problems}")
    for entry in stream:
        for field in ("duplicates", "out_of_order", "missing", "progress_missing", "not_in_db",
                      "mismatched"):
            if entry[field]:
                problems.append(f"{entry['client']}: {field} {entry[field]}")
        problems.extend(f"{entry['client']}: {p}" for p in entry["problems"])
    failed = [(j.id, (j.error or {}).get("code")) for j in jobs if j.status == "failed"]
    if failed:  # the fake never restarts nor fails a node here: no job has a reason to fail
        problems.append(f"failed jobs: {len(failed)}, e.g. {failed[:3]}")
    if figures["integrity_ok"] != figures["integrity_checks"]:
        problems.append(f"integrity checks: {figures['integrity_ok']} of {figures['integrity_checks']} ok")
    bad_exits = {k: v for k, v in figures["sigterm_exit_codes"].items() if k != "0"}
    if bad_exits:
        problems.append(f"SIGTERM exit codes other than 0: {bad_exits}")
    report["problems"] = problems
    return report


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    """One crash run in a fresh temporary directory; returns the report.
    With --logs, comfymgr's and the fake's logs are kept there."""
    with tempfile.TemporaryDirectory(prefix="comfymgr-crash-") as tmp:
        work = Path(tmp)
        owned: list[Comfymgr | FakeComfy] = []
        try:
            return asyncio.run(_crash_run(args, work, log, owned))
        except BaseException:
            for name in ("comfymgr.log", "comfy/fake.log"):
                path = work / name
                if path.exists():
                    log(f"--- {name} (tail)\n{path.read_text(errors='replace')[-6000:]}")
            raise
        finally:
            for process in owned:
                if isinstance(process, Comfymgr):
                    process.stop(signal.SIGKILL)
                else:
                    process.kill(signal.SIGTERM)
            if getattr(args, "logs", None):
                args.logs.mkdir(parents=True, exist_ok=True)
                for name in ("comfymgr.log", "comfy/fake.log"):
                    if (work / name).exists():
                        shutil.copyfile(work / name, args.logs / Path(name).name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=60, help="SIGKILLs (default 60)")
    p.add_argument("--sigterms", type=int, default=20, help="SIGTERMs (default 20)")
    p.add_argument("--clients", type=int, default=4, help="concurrent submitters")
    p.add_argument("--followers", type=int, default=2, help="stream clients")
    p.add_argument("--keyed", type=float, default=0.3, help="share of submits with an Idempotency-Key")
    p.add_argument("--cancel", type=float, default=0.3, help="share of client actions that cancel")
    p.add_argument("--max-outstanding", type=int, default=40, help="unfinished jobs before submitters wait")
    p.add_argument("--submit-pause", type=float, default=0.15, help="most seconds between two submits")
    p.add_argument("--node-delay", type=float, default=0.1, help="seconds per ImageBlur in the fake")
    p.add_argument("--min-up", type=float, default=0.3, help="least seconds between start and kill")
    p.add_argument("--max-up", type=float, default=2.5, help="most seconds between start and kill")
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the report here as JSON")
    p.add_argument("--logs", type=Path, default=None, help="keep comfymgr's and the fake's logs here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    print(f"crash run: {args.kills} SIGKILLs, {args.sigterms} SIGTERMs, seed {args.seed}", flush=True)
    report = run(args, log=lambda line: print(line, flush=True))
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "seed": args.seed, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **report}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if report["problems"]:
        print(f"FAILED: {len(report['problems'])} problem(s)", file=sys.stderr)
        return 1
    print("OK: nothing lost, nothing duplicated, nothing run twice", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
