"""What comfymgr sends out, tried as an attacker holding a valid key would:
webhooks (and input URLs) never reach inward, one poisoned delivery never
blocks another, secrets never show in logs or answers, and uploads never
replace another file of the same name."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket

import aiohttp
import pytest
from aiohttp import web
from test_bridge import status_is, submit, wait_backends_up, wait_job

import comfymgr
from conftest import HEADERS, workflow
from fake_comfyui import FakeComfyUI

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class FakeDNS(aiohttp.abc.AbstractResolver):
    """Names resolving where the test says (a name can be re-pointed between
    submit and send, as a rebinding attacker would)."""

    def __init__(self, names):
        self.names = dict(names)

    async def resolve(self, host, port=0, family=socket.AF_UNSPEC):
        if host not in self.names:
            raise OSError(f"{host}: no such name")
        return [{"hostname": host, "host": address, "port": port,
                 "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                 "proto": 0, "flags": 0} for address in self.names[host]]

    async def close(self):
        pass


INWARD = {  # address -> why it is refused
    "127.0.0.1": "a loopback address", "127.9.9.9": "a loopback address",
    "10.1.2.3": "a private-network address", "172.16.0.1": "a private-network address",
    "172.31.255.254": "a private-network address", "192.168.1.1": "a private-network address",
    "100.64.0.1": "a shared (CGNAT) address", "100.127.255.254": "a shared (CGNAT) address",
    "169.254.169.254": "a cloud metadata address", "169.254.1.1": "a link-local address",
    "fd12:3456::1": "a private-network address", "fc00::1": "a private-network address",
    "::1": "a loopback address", "fe80::1": "a link-local address",
    "::ffff:127.0.0.1": "a loopback address", "::ffff:169.254.169.254": "a cloud metadata address",
    "64:ff9b::a9fe:a9fe": "a cloud metadata address", "2002:7f00:1::": "a loopback address",
    "::127.0.0.1": "a loopback address", "fd00:ec2::254": "a cloud metadata address",
    "224.0.0.1": "a multicast address", "ff02::1": "a multicast address",
    "0.0.0.0": "the unspecified address", "::": "the unspecified address",
    "255.255.255.255": "the broadcast address", "192.0.2.1": "not a public address",
    "240.0.0.1": "not a public address", "2001:db8::1": "not a public address",
}
LITERALS = {  # how the host is written -> the address it means
    "2130706433": "127.0.0.1", "0177.0.0.1": "127.0.0.1", "0x7f.0.0.1": "127.0.0.1",
    "0x7f000001": "127.0.0.1", "127.1": "127.0.0.1", "017700000001": "127.0.0.1",
    "2852039166": "169.254.169.254", "0xa9.0xfe.0xa9.0xfe": "169.254.169.254",
}


def bracket(address):
    return f"[{address}]" if ":" in address else address


@pytest.fixture
def outbound(make_client, make_config):
    async def make(allow="", dns=None, **overrides):
        names = {"public.example": ["93.184.216.34"]}
        names.update({f"to-{n}.example": [a] for n, a in enumerate(INWARD)})
        names.update(dns or {})
        config = make_config(webhook_allow=comfymgr._parse_hosts_and_networks(allow),
                             comfyui_url="http://127.0.0.1:8188", **overrides)
        return await make_client(config, resolver=FakeDNS(names))
    return make


async def hook(client, url):
    resp = await client.post("/v1/comfyui/workflow", headers=HEADERS,
                             json={"workflow": workflow(), "webhook": {"url": url}})
    return resp.status, await resp.json()


async def test_every_inward_address_is_refused_at_submit_written_any_way(outbound):
    client = await outbound()
    refused = {}
    for n, (address, reason) in enumerate(INWARD.items()):
        for url in (f"http://{bracket(address)}/hook", f"https://to-{n}.example/hook"):
            status, body = await hook(client, url)
            refused[url] = (status, body["error"], body["details"].get("reason", "")) if status != 202 \
                else (status,)
            assert status == 400 and body["error"] == "webhook_forbidden", (url, body)
            assert body["details"]["reason"].startswith(reason), (url, body)
    for written, address in LITERALS.items():
        status, body = await hook(client, f"http://{written}:8080/x")
        assert status == 400 and body["details"]["reason"] == INWARD[address], (written, body)
    for url in ("https://public.example/hook", "http://93.184.216.34/hook",
                "https://unresolvable.example/hook"):  # judged at send, when it resolves
        assert (await hook(client, url))[0] == 202, url


async def test_a_refusal_says_why_and_shows_no_secret(outbound):
    client = await outbound()
    status, body = await hook(client, "http://user:pw@127.0.0.1:8080/x?token=s3cret")
    assert (status, body) == (400, {
        "error": "webhook_forbidden",
        "message": "webhook.url: http://***@127.0.0.1:8080/x?token=*** is a loopback address; "
                   "comfymgr sends requests only to public addresses (see COMFYMGR_WEBHOOK_ALLOW)",
        "statusCode": 400, "details": {"field": "webhook.url", "reason": "a loopback address"}})


async def test_the_allowlist_opens_named_hosts_and_networks(outbound):
    client = await outbound(allow="receiver.lan,10.1.0.0/16,127.0.0.1",
                            dns={"receiver.lan": ["192.168.7.7"], "other.lan": ["192.168.7.8"]})
    for url in ("http://receiver.lan/x", "http://10.1.2.3/x", "http://127.0.0.1:9000/x"):
        assert (await hook(client, url))[0] == 202, url
    for url in ("http://other.lan/x", "http://10.2.0.1/x", "http://127.0.0.2:9000/x"):
        assert (await hook(client, url))[0] == 400, url


async def test_a_backend_is_refused_even_when_allowed(outbound):
    client = await outbound(allow="127.0.0.0/8,localhost", dns={"localhost": ["127.0.0.1", "::1"]})
    for url in ("http://127.0.0.1:8188/interrupt", "http://localhost:8188/api/jobs/x/cancel",
                "http://127.0.0.2:8188/free", "http://[::ffff:127.0.0.1]:8188/upload/image"):
        status, body = await hook(client, url)
        assert status == 400 and body["details"]["reason"].startswith("a ComfyUI backend"), (url, body)
    assert (await hook(client, "http://127.0.0.1:8189/x"))[0] == 202  # another port: allowed


async def test_a_name_re_pointed_inward_after_submit_is_refused_at_send(outbound, aiohttp_server):
    received = []

    async def handle(request):
        received.append(await request.read())
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = await aiohttp_server(app)
    dns = {"rebind.example": ["93.184.216.34"]}
    client = await outbound(dns=dns)
    url = f"http://rebind.example:{server.port}/hook"
    job = await submit(client, workflow(), webhook={"url": url, "events": ["cancelled"]})
    client.app[comfymgr.POLICY].resolver.names["rebind.example"] = ["127.0.0.1"]
    await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    done = await wait_job(client, job["workflowId"],
                          lambda j: j["webhook"]["deliveries"] and j["webhook"]["deliveries"][0]["attempts"])
    [delivery] = done["webhook"]["deliveries"]
    assert (delivery["state"], delivery["lastStatus"], delivery["lastError"]) == (
        "failed", None, "refused: not an address comfymgr may send to")
    assert received == []


async def test_the_job_view_shows_no_socket_errors_and_no_token(make_client, make_config, caplog):
    caplog.set_level(logging.INFO, "comfymgr")
    client = await make_client(make_config(
        webhook_allow=comfymgr._parse_hosts_and_networks("127.0.0.1"), webhook_timeout=0.5))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there
    url = f"http://user:hunter2@127.0.0.1:{port}/x?token=s3cret&b=1"
    job = await submit(client, workflow(), webhook={"url": url, "events": ["cancelled"]})
    assert job["webhook"]["url"] == f"http://***@127.0.0.1:{port}/x?token=***&b=***"
    await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    done = await wait_job(client, job["workflowId"],
                          lambda j: j["webhook"]["deliveries"] and j["webhook"]["deliveries"][0]["attempts"])
    [delivery] = done["webhook"]["deliveries"]
    assert (delivery["state"], delivery["lastError"]) == ("pending", "unreachable")
    text = caplog.text
    assert "s3cret" not in text and "hunter2" not in text
    assert f"http://***@127.0.0.1:{port}/x?token=***&b=***" in text


@pytest.mark.parametrize("retry_after", ["²", "١٢", "  12abc", "Wed, 32 Foo 2099", "-5", "1e9"])
async def test_a_poisoned_retry_after_never_stops_deliveries(make_client, make_config, aiohttp_server,
                                                             clock, retry_after):
    seen = []

    async def handle(request):
        seen.append(request.path)
        if request.path == "/poison":
            return web.Response(status=503, headers={"Retry-After": retry_after})
        return web.Response()

    app = web.Application()
    app.router.add_post("/{name}", handle)
    server = await aiohttp_server(app)
    client = await make_client(make_config(
        webhook_allow=comfymgr._parse_hosts_and_networks("127.0.0.1"), webhook_backoff=5.0),
        clock=clock)
    jobs = []
    for name in ("poison", "fine"):
        jobs.append(await submit(client, workflow(), webhook={
            "url": f"http://127.0.0.1:{server.port}/{name}", "events": ["cancelled"]}))
    for job in jobs:
        await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    webhooks = client.app[comfymgr.WEBHOOKS]
    done = await wait_job(client, jobs[1]["workflowId"],
                          lambda j: j["webhook"]["deliveries"] and j["webhook"]["deliveries"][0]["state"] == "delivered")
    poisoned = (await wait_job(client, jobs[0]["workflowId"], lambda j: j["webhook"]["deliveries"]
                               and j["webhook"]["deliveries"][0]["attempts"]))["webhook"]["deliveries"][0]
    assert (poisoned["state"], poisoned["lastStatus"], poisoned["lastError"]) == ("pending", 503, "HTTP 503")
    assert done["webhook"]["deliveries"][0]["state"] == "delivered"
    # The retry comes with the backoff (5 s, the header ignored), and the sender lives on.
    clock.advance(7)
    assert await webhooks.deliver_due() == 1
    assert seen.count("/poison") == 2
    status = await (await client.get("/v1/status", headers=HEADERS)).json()
    [task] = [t for t in status["tasks"] if t["name"] == "webhooks"]
    assert task["failures"] == 0 and task["running"] is True


def test_retry_after_is_parsed_strictly():
    now = 1_800_000_000.0
    assert comfymgr._retry_after("120", now) == 120.0
    assert comfymgr._retry_after(" 7 ", now) == 7.0
    assert comfymgr._retry_after("Thu, 15 Jan 2027 08:00:10 GMT", 1_799_928_000 + 10.0) is not None
    for bad in ("²", "١٢", "12abc", "", None, "-1", "1.5", "Wed, 32 Foo 2099", "tomorrow"):
        assert comfymgr._retry_after(bad, now) is None, bad


async def test_concurrent_uploads_of_one_name_keep_both(make_client, make_config, tmp_path):
    inputs = tmp_path / "inputs"
    client = await make_client(make_config(inputs_dir=inputs))

    async def upload(data):
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("image", data, filename="same.png", content_type="image/png")
        resp = await client.post("/v1/comfyui/inputs", data=form, headers=HEADERS)
        assert resp.status == 201
        return (await resp.json())["name"]

    names = await asyncio.gather(*(upload(PNG + bytes([i])) for i in range(20)))
    assert sorted(names) == sorted(["same.png"] + [f"same ({n}).png" for n in range(1, 20)])
    stored = {p.name: p.read_bytes() for p in inputs.iterdir()}
    assert sorted(stored) == sorted(names)  # no temporary file left, none replaced
    assert sorted(stored.values()) == sorted(PNG + bytes([i]) for i in range(20))


async def test_an_upload_never_replaces_a_file_on_another_backend(make_client, make_config, tmp_path):
    fakes = [FakeComfyUI(output_dir=tmp_path / f"c{i}" / "output") for i in range(2)]
    for f in fakes:
        await f.start()
    try:
        (fakes[1]._dirs.input / "cat.png").write_bytes(PNG + b"b's own cat")
        client = await make_client(make_config(backends=(
            comfymgr.BackendSpec("a", fakes[0].url), comfymgr.BackendSpec("b", fakes[1].url))))
        await wait_backends_up(client)
        form = aiohttp.FormData(default_to_multipart=True)
        form.add_field("image", PNG + b"mine", filename="cat.png", content_type="image/png")
        resp = await client.post("/v1/comfyui/inputs", data=form, headers=HEADERS)
        assert resp.status == 201
        body = await resp.json()
        assert body["name"] == "cat (1).png" and body["backends"] == ["a", "b"]
        assert (fakes[1]._dirs.input / "cat.png").read_bytes() == PNG + b"b's own cat"
        for f in fakes:
            assert (f._dirs.input / "cat (1).png").read_bytes() == PNG + b"mine"
        graph = {"1": {"class_type": "LoadImage", "inputs": {"image": body["workflowValue"]}},
                 "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "u"}}}
        for gpu in ("a", "b"):
            job = await submit(client, graph, gpu=gpu)
            assert (await wait_job(client, job["workflowId"], status_is("completed", "failed")))["status"] \
                == "completed"
    finally:
        for f in fakes:
            await f.stop()


async def test_a_failed_upload_names_no_url_and_no_socket_error(make_client, make_config):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client = await make_client(make_config(comfyui_url=f"http://127.0.0.1:{port}"))
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("image", PNG, filename="cat.png", content_type="image/png")
    resp = await client.post("/v1/comfyui/inputs", data=form, headers=HEADERS)
    assert resp.status == 503
    assert await resp.json() == {"error": "backend_unavailable",
                                 "message": "a ComfyUI server did not take the upload; try again",
                                 "statusCode": 503, "details": {}}


def test_ip_forms_unwrap_to_the_address_they_carry():
    for written, address in [("::ffff:10.0.0.1", "10.0.0.1"), ("64:ff9b::a00:1", "10.0.0.1"),
                             ("2002:a00:1::", "10.0.0.1"), ("::a00:1", "10.0.0.1"),
                             ("2001:4860::1", "2001:4860::1"), ("::1", "::1")]:
        assert str(comfymgr._unwrap_ip(ipaddress.ip_address(written))) == address, written
