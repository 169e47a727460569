"""Dispatch across many backends: a new job wakes one dispatcher, not every
one, so the cost per job stays flat from 1 to 64 backends; a burst still
spreads over every free backend."""

from __future__ import annotations

import asyncio

import pytest
from test_bridge import status_is, submit, unique, wait_backends_up, wait_job

import comfymgr
from conftest import workflow
from fake_comfyui import FakeComfyUI


@pytest.fixture
async def eight(tmp_path):
    fakes = [FakeComfyUI(output_dir=tmp_path / f"c{i}" / "output") for i in range(8)]
    for f in fakes:
        await f.start()
    yield fakes
    for f in fakes:
        await f.stop()


@pytest.fixture
def claims(monkeypatch):
    """Every claim a dispatcher makes (in the database thread), with its result."""
    seen = []
    real = comfymgr.Storage.claim

    def counting(self, backend, prompt_id, now, **kwargs):
        job, more = real(self, backend, prompt_id, now, **kwargs)
        seen.append((backend, job.id if job else None))
        return job, more

    monkeypatch.setattr(comfymgr.Storage, "claim", counting)
    return seen


async def test_one_new_job_wakes_one_dispatcher(make_client, make_config, eight, claims):
    for f in eight:
        f.gate("ImageBlur")
    config = make_config(backends=tuple(comfymgr.BackendSpec(f"b{i}", f.url) for i, f in enumerate(eight)),
                         progress_interval=0.0, reconcile_interval=0.2)
    client = await make_client(config)
    await wait_backends_up(client)
    from test_bridge import slow_workflow
    # Seven run a job each and could take one more (prefetch): all eight may take it.
    busy = [await submit(client, unique(slow_workflow(), f"busy{i}")) for i in range(7)]
    running = [await wait_job(client, job["workflowId"], status_is("running")) for job in busy]
    assert len({j["backend"] for j in running}) == 7  # one each: none waits behind another
    [idle] = set(client.app[comfymgr.BRIDGE].backends) - {j["backend"] for j in running}
    claims.clear()
    job = await submit(client, unique(workflow(), "one"))
    done = await wait_job(client, job["workflowId"], status_is("completed"))
    await asyncio.sleep(0.1)
    # The idle backend took it, and no other dispatcher even looked.
    assert done["backend"] == idle
    assert {c[0] for c in claims} == {idle}, claims
    assert [c for c in claims if c[1] is not None] == [(idle, job["workflowId"])]


async def test_a_burst_spreads_over_every_free_backend(make_client, make_config, eight, claims):
    gates = [f.gate("ImageBlur") for f in eight]
    config = make_config(backends=tuple(comfymgr.BackendSpec(f"b{i}", f.url) for i, f in enumerate(eight)),
                         progress_interval=0.0, reconcile_interval=0.2)
    client = await make_client(config)
    await wait_backends_up(client)
    from test_bridge import slow_workflow
    jobs = await asyncio.gather(*(submit(client, unique(slow_workflow(), f"burst{i}")) for i in range(16)))
    running = [await wait_job(client, j["workflowId"], status_is("running", "queued"), timeout=15)
               for j in jobs]

    async def all_busy():
        while True:
            status = await (await client.get("/v1/status", headers={"X-API-Key": "test-key-0123456789"})).json()
            if all(b["runningJob"] for b in status["backends"]):
                return status
            await asyncio.sleep(0.01)

    status = await asyncio.wait_for(all_busy(), 10)  # well before the 1 s look of an idle one
    assert len({b["runningJob"] for b in status["backends"]}) == 8 and running
    for gate in gates:
        gate.set()
    for job in jobs:
        assert (await wait_job(client, job["workflowId"], status_is("completed")))["status"] == "completed"


async def test_one_job_at_a_time_costs_one_claim_each(make_client, make_config, fake, claims):
    """A claim says whether another job waits; with none, the dispatcher
    asks again only once one was queued (no empty claim per job: each is a
    trip to the database thread)."""
    client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0))
    await wait_backends_up(client)
    backend = client.app[comfymgr.BRIDGE].backends["local"]
    while backend.found_nothing is None:  # the look it takes once up, on an empty queue
        await asyncio.sleep(0.01)
    claims.clear()
    done = []
    for i in range(5):
        job = await submit(client, unique(workflow(), f"alone{i}"))
        done.append((await wait_job(client, job["workflowId"], status_is("completed")))["workflowId"])
    assert claims == [("local", job_id) for job_id in done]


async def test_jobs_queued_behind_a_claim_are_all_claimed(make_client, make_config, fake, claims):
    """Five submitted at once: each claim but the last says another waits,
    so none is left behind a claim that found the queue empty."""
    gate = fake.gate("ImageBlur")
    client = await make_client(make_config(comfyui_url=fake.url, progress_interval=0.0))
    await wait_backends_up(client)
    from test_bridge import slow_workflow
    jobs = [await submit(client, unique(slow_workflow(), f"behind{i}")) for i in range(5)]
    gate.set()
    for job in jobs:
        await wait_job(client, job["workflowId"], status_is("completed"))
    assert [c[1] for c in claims if c[1] is not None] == [j["workflowId"] for j in jobs]
