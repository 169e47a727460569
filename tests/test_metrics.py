"""/metrics after real job lifecycles, GPU figures through a stand-in NVML at
the pynvml boundary, cardinality, and promtool on a live scrape."""

from __future__ import annotations

import asyncio
import random
import shutil
import string
import subprocess
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_bridge import slow_workflow, status_is, submit, wait_backends_up, wait_job

import comfymgr
from conftest import HEADERS, workflow


class FakeNVML:
    """The slice of pynvml comfymgr calls, with values a test sets."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, gpus):
        self.gpus = gpus
        self.calls = []

    def _gpu(self, handle):
        gpu = self.gpus[handle]
        if gpu.get("lost"):
            raise self.NVMLError("GPU is lost")
        return gpu

    def nvmlInit(self):
        self.calls.append("init")

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle)["name"]

    def nvmlDeviceGetUUID(self, handle):
        return self._gpu(handle)["uuid"]

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=self._gpu(handle)["util"], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self._gpu(handle)
        return SimpleNamespace(used=gpu["used"], total=gpu["total"], free=gpu["total"] - gpu["used"])

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._gpu(handle)["temp"]

    def nvmlDeviceGetPowerUsage(self, handle):
        gpu = self._gpu(handle)
        if gpu.get("power_mw") is None:
            raise self.NVMLError("Not Supported")
        return gpu["power_mw"]


class NoNVML:
    class NVMLError(Exception):
        pass

    def nvmlInit(self):
        raise self.NVMLError("NVML Shared Library Not Found")


def two_gpus():
    return FakeNVML([
        {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa", "util": 37, "used": 10 * 2**30,
         "total": 80 * 2**30, "temp": 51, "power_mw": 312_500},
        {"name": b"NVIDIA L4", "uuid": b"GPU-bbbb", "util": 99, "used": 20 * 2**30,
         "total": 24 * 2**30, "temp": 83, "power_mw": None},
    ])


async def scrape(client):
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return await resp.text()


def samples(text):
    """{(name, frozenset(labels)): value} for every sample."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(text, metric, **labels):
    return samples(text).get((metric, frozenset(labels.items())))


async def test_values_after_real_job_lifecycles(make_client, make_config, fake):
    (fake._dirs.input / "corrupt.png").write_bytes(b"not a png")
    gate = fake.gate("ImageBlur")
    client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0,
                                           reconcile_interval=0.2), nvml=NoNVML())
    await wait_backends_up(client)
    text = await scrape(client)
    assert value(text, "comfyui_queue_length") == 0
    assert value(text, "comfymgr_backend_up", backend="local") == 1
    assert value(text, "comfymgr_backend_info", backend="local", comfyui_version="0.3.64", gpu_id="") == 1

    busy = await submit(client, slow_workflow())
    await wait_job(client, busy["workflowId"], status_is("running"))
    waiting = [await submit(client, workflow("simple"), priority=p) for p in ("high", "low", "low")]
    text = await scrape(client)
    assert value(text, "comfyui_queue_length") == 3
    assert value(text, "comfymgr_queue_length", priority="low") == 2
    assert value(text, "comfymgr_queue_length", priority="high") == 1
    assert value(text, "comfymgr_jobs_running", backend="local") == 1
    assert value(text, "comfymgr_queue_oldest_age_seconds") >= 0

    await client.delete(f"/v1/comfyui/workflow/{waiting[2]['workflowId']}", headers=HEADERS)
    broken = {"1": {"class_type": "LoadImage", "inputs": {"image": "corrupt.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "e"}}}
    failing = await submit(client, broken, priority="high")
    gate.set()
    for job in (busy, waiting[0], waiting[1], failing):
        await wait_job(client, job["workflowId"], status_is("completed", "failed"))
    text = await scrape(client)
    assert value(text, "comfyui_queue_length") == 0
    assert value(text, "comfyui_workflow_total", status="queued") == 5
    assert value(text, "comfyui_workflow_total", status="running") == 4
    assert value(text, "comfyui_workflow_total", status="completed") == 3
    assert value(text, "comfyui_workflow_total", status="failed") == 1
    assert value(text, "comfyui_workflow_total", status="cancelled") == 1
    assert value(text, "comfyui_workflow_errors_total", error_type="execution_error") == 1
    # Four jobs ran on a CPU ComfyUI: four observations under gpu_type "cpu".
    assert value(text, "comfyui_workflow_duration_seconds_count", gpu_type="cpu") == 4
    assert value(text, "comfymgr_jobs_running", backend="local") == 0
    route = "/v1/comfyui/workflow/{id}"
    assert value(text, "comfymgr_http_requests_total", route=route, method="GET", status="200") >= 1
    assert value(text, "comfymgr_http_request_duration_seconds_count", route=route, method="GET") >= 1


async def test_gpu_figures_from_nvml_and_status(make_client, make_config, fake):
    nvml = two_gpus()
    config = make_config(backends=(comfymgr.BackendSpec("l4", fake.url, 1),), progress_interval=0.0)
    client = await make_client(config, nvml=nvml)
    await wait_backends_up(client)
    text = await scrape(client)
    assert value(text, "comfyui_gpu_utilization", gpu_id="0") == 37
    assert value(text, "comfyui_gpu_utilization", gpu_id="1") == 99
    assert value(text, "comfyui_vram_usage_bytes", gpu_id="1") == 20 * 2**30
    assert value(text, "comfymgr_gpu_memory_total_bytes", gpu_id="0") == 80 * 2**30
    assert value(text, "comfymgr_gpu_temperature_celsius", gpu_id="1") == 83
    assert value(text, "comfymgr_gpu_power_watts", gpu_id="0") == 312.5
    assert value(text, "comfymgr_gpu_power_watts", gpu_id="1") is None  # board does not report it
    assert value(text, "comfymgr_gpu_info", gpu_id="1", name="NVIDIA L4", uuid="GPU-bbbb") == 1
    assert value(text, "comfymgr_gpu_available") == 1
    status = await (await client.get("/v1/status", headers=HEADERS)).json()
    assert status["gpu"]["available"] is True and status["gpu"]["reason"] is None
    assert status["gpu"]["devices"][1] == {
        "index": 1, "name": "NVIDIA L4", "uuid": "GPU-bbbb", "utilization": 99.0,
        "memoryUsedBytes": 20 * 2**30, "memoryTotalBytes": 24 * 2**30, "temperatureCelsius": 83.0,
        "powerWatts": None, "error": None, "backends": ["l4"]}
    assert status["gpu"]["devices"][0]["backends"] == []
    assert status["backends"][0]["gpu"] == 1
    # A job on the backend mapped to GPU 1 is timed under that GPU's model.
    job = await submit(client, workflow("simple"))
    await wait_job(client, job["workflowId"], status_is("completed"))
    text = await scrape(client)
    assert value(text, "comfyui_workflow_duration_seconds_count", gpu_type="NVIDIA L4") == 1
    # Figures follow the card between polls.
    nvml.gpus[0]["util"] = 5
    await client.app[comfymgr.GPUS].poll()
    assert value(await scrape(client), "comfyui_gpu_utilization", gpu_id="0") == 5


async def test_gpu_that_errors_is_reported_not_fatal(make_client, make_config):
    nvml = two_gpus()
    client = await make_client(make_config(), nvml=nvml)
    nvml.gpus[1]["lost"] = True
    await client.app[comfymgr.GPUS].poll()
    text = await scrape(client)
    assert value(text, "comfymgr_gpu_up", gpu_id="0") == 1
    assert value(text, "comfymgr_gpu_up", gpu_id="1") == 0
    assert value(text, "comfyui_gpu_utilization", gpu_id="1") is None
    assert value(text, "comfyui_gpu_utilization", gpu_id="0") == 37
    status = await (await client.get("/v1/status", headers=HEADERS)).json()
    lost = status["gpu"]["devices"][1]
    assert lost["error"] == "GPU is lost" and lost["name"] == "NVIDIA L4" and lost["utilization"] is None
    assert (await client.get("/health")).status == 200
    nvml.gpus[1]["lost"] = False  # back on the bus
    await client.app[comfymgr.GPUS].poll()
    assert value(await scrape(client), "comfymgr_gpu_up", gpu_id="1") == 1


async def test_nvml_shut_down_on_exit(make_client, make_config):
    nvml = two_gpus()
    client = await make_client(make_config(), nvml=nvml)
    assert nvml.calls == ["init"]
    await client.close()
    assert nvml.calls == ["init", "shutdown"]


async def test_no_nvml_means_no_gpu_series_and_a_reason(make_client, make_config):
    client = await make_client(make_config(), nvml=NoNVML())
    text = await scrape(client)
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {n for n in families if "gpu" in n} == {"comfymgr_gpu_available"}
    [sample] = families["comfymgr_gpu_available"].samples  # always there, for the alert
    assert sample.value == 0.0
    status = await (await client.get("/v1/status", headers=HEADERS)).json()
    assert status["gpu"] == {"available": False,
                             "reason": "NVML unavailable: NVML Shared Library Not Found",
                             "readAt": None, "devices": []}


async def test_real_pynvml_on_this_machine_does_not_crash(make_client, make_config):
    client = await make_client(make_config())  # the real pynvml module
    status = await (await client.get("/v1/status", headers=HEADERS)).json()
    gpu = status["gpu"]
    assert gpu["available"] is (gpu["reason"] is None)
    if not gpu["available"]:
        assert gpu["reason"].startswith("NVML unavailable: ")
        assert "comfyui_gpu_utilization" not in await scrape(client)


async def test_random_404_paths_add_no_series(make_client):
    client = await make_client()
    await scrape(client)
    before = set(samples(await scrape(client)))
    rng = random.Random(7)
    for _ in range(1000):
        path = "/" + "/".join("".join(rng.choices(string.ascii_lowercase + string.digits, k=8))
                              for _ in range(rng.randint(1, 4)))
        resp = await client.get(path, headers=HEADERS)
        assert resp.status == 404
    after = set(samples(await scrape(client)))
    labels = {dict(pairs).get("route") for _, pairs in after - before}
    assert labels <= {"unmatched", None}, labels
    assert len(after - before) <= 20, sorted(after - before)  # one route label, its buckets


async def test_promtool_accepts_a_live_scrape(make_client, make_config, fake):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (.ci/run does)")
    client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0), nvml=two_gpus())
    await wait_backends_up(client)
    job = await submit(client, workflow("simple"))
    await wait_job(client, job["workflowId"], status_is("completed"))
    await client.get("/nope", headers=HEADERS)
    ws = await client.ws_connect("/v1/comfyui/stream", headers=HEADERS)
    text = await scrape(client)
    await ws.close()
    result = await asyncio.to_thread(subprocess.run, [promtool, "check", "metrics"],
                                     input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_filesystems_of_state_and_folders(make_client, make_config, tmp_path):
    outputs = tmp_path / "out"
    outputs.mkdir()
    client = await make_client(make_config(outputs_dir=outputs), nvml=NoNVML())
    files = client.app[comfymgr.FILES]
    await files.measure_filesystems()
    text = await scrape(client)
    state = shutil.disk_usage(tmp_path / "state")
    # Free space moves while the suite writes; the size of a filesystem does not.
    assert value(text, "comfymgr_filesystem_size_bytes", filesystem="state") == state.total
    assert value(text, "comfymgr_filesystem_size_bytes", filesystem="output") == state.total
    assert 0 < value(text, "comfymgr_filesystem_free_bytes", filesystem="output") <= state.total
    assert value(text, "comfymgr_filesystem_free_bytes", filesystem="temp") is None  # not configured
    status = await (await client.get("/v1/status", headers=HEADERS)).json()
    assert set(status["files"]["filesystems"]) == {"state", "output"}
    assert status["files"]["filesystems"]["output"]["path"] == str(outputs)
    assert status["files"]["filesystems"]["state"]["sizeBytes"] == state.total
