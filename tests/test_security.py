"""Security: API keys on every route of the router, the generated key, the
rate limit (FakeClock, no sleeping), trusted proxies, CORS and body limits."""

from __future__ import annotations

import ipaddress
import logging
import re
import stat
import uuid

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

import comfymgr
from conftest import API_KEY, HEADERS, workflow

SUBMIT = "/v1/comfyui/workflow"
STATUS = "/v1/status"
ORIGIN = "https://app.example.com"


def envelope(error, message, status, details=None):
    return {"error": error, "message": message, "statusCode": status, "details": details or {}}


MISSING_KEY = envelope("unauthorized", "a valid X-API-Key header is required", 401)
WRONG_KEY = envelope("unauthorized", "the API key is not valid", 401)


def one_byte_off(key: str) -> str:
    return key[:-1] + chr(ord(key[-1]) ^ 1)


WRONG_KEYS = {
    "wrong": "not-the-key",
    "one byte off": one_byte_off(API_KEY),
    "first byte off": chr(ord(API_KEY[0]) ^ 1) + API_KEY[1:],
    "prefix": API_KEY[:-1],
    "longer": API_KEY + "0",
    "empty": "",
}


async def status_of(client, path=STATUS, **headers):
    resp = await client.get(path, headers=headers)
    return resp.status


###############################################################################
# API keys on every route
###############################################################################


def test_the_open_routes_are_exactly_these():
    """Opening a route must be a conscious change: update this set too."""
    assert comfymgr._OPEN_ROUTES == {"health", "metrics", "openapi", "docs", "docs_init",
                                     "docs_assets", "ui", "ui_files"}
    assert comfymgr._UNLIMITED_ROUTES == {"health", "metrics"}


async def is_envelope(resp, expected):
    if resp.content_type != "application/json":
        return False
    if resp.method == "HEAD":  # no body by definition; the headers still say JSON
        return await resp.read() == b""
    return await resp.json() == expected


def walk(app, job_id):
    """(name, method, concrete path) for every route the router has."""
    for route in app.router.routes():
        if route.name == "docs_assets":
            path = "/docs/assets/swagger-ui.css"
        elif route.name == "ui_files":
            path = "/ui/app.js"
        else:
            path = re.sub(r"\{[^}]+\}", job_id, route.resource.canonical)
        yield route.name, route.method, path


async def test_every_route_but_the_open_ones_needs_a_valid_key(make_client):
    client = await make_client()
    resp = await client.post(SUBMIT, json={"workflow": workflow()}, headers=HEADERS)
    job_id = (await resp.json())["workflowId"]
    routes = list(walk(client.app, job_id))
    names = {name for name, _, _ in routes}
    assert {"submit", "job", "cancel", "jobs", "status"} <= names
    assert comfymgr._OPEN_ROUTES <= names
    refused, opened = {}, {}
    for name, method, path in routes:
        if name in comfymgr._OPEN_ROUTES:
            resp = await client.request(method, path)
            opened[(method, path)] = resp.status
            continue
        attempts = [("no key", {}, MISSING_KEY),
                    ("other header", {"Authorization": f"Bearer {API_KEY}"}, MISSING_KEY)]
        attempts += [(label, {"X-API-Key": key}, WRONG_KEY) for label, key in WRONG_KEYS.items()]
        for label, headers, expected in attempts:
            resp = await client.request(method, path, headers=headers,
                                        json={"workflow": workflow()} if method == "POST" else None)
            refused[(method, path, label)] = (resp.status, await is_envelope(resp, expected))
        # A key in the query string is accepted only where clients cannot set headers.
        if name not in comfymgr._QUERY_KEY_ROUTES:
            resp = await client.request(method, path, params={"api_key": API_KEY})
            refused[(method, path, "query key")] = (resp.status, await is_envelope(resp, MISSING_KEY))
    assert refused and all(v == (401, True) for v in refused.values()), \
        {k: v for k, v in refused.items() if v != (401, True)}
    assert opened and all(status == 200 for status in opened.values()), opened
    # Nothing the refused requests asked for happened.
    resp = await client.get("/v1/comfyui/workflows", headers=HEADERS)
    jobs = (await resp.json())["workflows"]
    assert [(j["workflowId"], j["status"]) for j in jobs] == [(job_id, "queued")]
    # The right key passes the gate (whatever the route then answers).
    for _, method, path in routes:
        resp = await client.request(method, path, headers=HEADERS)
        assert resp.status != 401, (method, path)


async def test_the_query_key_of_query_key_routes_is_checked_too(make_client):
    client = await make_client()
    checked = set()
    for route in client.app.router.routes():
        if route.name in comfymgr._QUERY_KEY_ROUTES:
            checked.add(route.name)
            for key in WRONG_KEYS.values():
                resp = await client.request(route.method, route.resource.canonical,
                                            params={"api_key": key})
                assert resp.status == 401
                if route.method != "HEAD":  # a HEAD answer has no body
                    assert await resp.json() == WRONG_KEY
    assert checked == comfymgr._QUERY_KEY_ROUTES


async def test_unknown_routes_and_wrong_methods_need_the_key_too(make_client):
    client = await make_client()
    for method, path in (("GET", "/v1/nope"), ("PUT", "/v1/comfyui/workflow/x"), ("POST", "/health")):
        resp = await client.request(method, path)
        assert resp.status == 401
        assert await resp.json() == MISSING_KEY


async def test_several_keys_all_work_for_rotation(make_client, make_config):
    client = await make_client(make_config(api_keys=("old-key-0123", "new-key-4567", "third")))
    for key in ("old-key-0123", "new-key-4567", "third"):
        assert await status_of(client, **{"X-API-Key": key}) == 200
    for key in ("old-key-0123,new-key-4567", "old-key-012", "new-key-4566", API_KEY, "thirds"):
        resp = await client.get(STATUS, headers={"X-API-Key": key})
        assert resp.status == 401
        assert await resp.json() == WRONG_KEY


async def test_keys_from_the_environment_rotate(make_client, make_config, tmp_path):
    loaded = comfymgr.load_config([], environ={"MANAGEMENT_API_KEY": "first-key, second-key"})
    client = await make_client(make_config(api_keys=loaded.api_keys))
    assert await status_of(client, **{"X-API-Key": "first-key"}) == 200
    assert await status_of(client, **{"X-API-Key": "second-key"}) == 200
    assert await status_of(client, **{"X-API-Key": " first-key, second-key"}) == 401


async def test_no_configured_key_generates_one_stored_0600_and_logs_only_its_path(
        make_client, make_config, caplog):
    caplog.set_level(logging.DEBUG)
    config = make_config(api_keys=())
    key_file = config.state_dir / "api-key"
    client = await make_client(config)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.state_dir.stat().st_mode) == 0o700
    key = key_file.read_text().strip()
    assert len(key) >= 32
    assert await status_of(client, **{"X-API-Key": key}) == 200
    assert await status_of(client, **HEADERS) == 401
    assert await status_of(client) == 401
    assert str(key_file) in caplog.text
    await client.close()
    # Started again on the same state directory: the same key.
    client = await make_client(config)
    assert key_file.read_text().strip() == key
    assert await status_of(client, **{"X-API-Key": key}) == 200
    assert await status_of(client, **{"X-API-Key": one_byte_off(key)}) == 401
    messages = [r.getMessage() for r in caplog.records]
    assert sum(str(key_file) in m for m in messages) == 2  # generated, then reused
    assert key not in caplog.text
    assert not any(key in repr(r.args) or key in str(r.msg) for r in caplog.records)


async def test_a_configured_key_writes_no_key_file(make_client, make_config):
    config = make_config()
    await make_client(config)
    assert not (config.state_dir / "api-key").exists()


async def test_an_empty_key_file_stops_startup(make_client, make_config):
    config = make_config(api_keys=())
    config.state_dir.mkdir(parents=True)
    (config.state_dir / "api-key").write_text("\n")
    with pytest.raises(comfymgr.ConfigError, match="is empty; delete it to generate a new key"):
        await make_client(config)


###############################################################################
# rate limit
###############################################################################


def rate_limited(limit, retry_after):
    return envelope("rate_limited", f"too many requests; the limit is {limit} a minute", 429,
                    {"limit": limit, "retryAfter": retry_after})


async def expect_429(client, retry_after, limit=3, path=STATUS, **headers):
    resp = await client.get(path, headers={**HEADERS, **headers})
    assert resp.status == 429
    assert resp.headers["Retry-After"] == str(retry_after)
    assert await resp.json() == rate_limited(limit, retry_after)


async def test_the_fourth_request_in_a_minute_is_429_until_tokens_refill(make_client, make_config,
                                                                         clock):
    client = await make_client(make_config(rate_limit=3), clock=clock)
    for _ in range(3):
        assert await status_of(client, **HEADERS) == 200
    await expect_429(client, 20)  # one token every 20 s
    clock.advance(10)
    await expect_429(client, 10)
    clock.advance(9.5)
    await expect_429(client, 1)
    clock.advance(1)
    assert await status_of(client, **HEADERS) == 200
    await expect_429(client, 20)
    clock.advance(3600)  # refills to the burst, not beyond
    for _ in range(3):
        assert await status_of(client, **HEADERS) == 200
    await expect_429(client, 20)


async def test_refused_requests_count_too_and_every_limited_route_shares_the_bucket(
        make_client, make_config, clock):
    client = await make_client(make_config(rate_limit=3), clock=clock)
    assert await status_of(client) == 401  # no key: still a request from this address
    assert await status_of(client, "/v1/nope", **HEADERS) == 404
    assert await status_of(client, "/openapi.json") == 200
    resp = await client.post(SUBMIT, json={"workflow": workflow()}, headers=HEADERS)
    assert resp.status == 429
    assert await resp.json() == rate_limited(3, 20)
    resp = await client.get("/v1/comfyui/workflows", headers=HEADERS)
    assert resp.status == 429
    clock.advance(60)
    resp = await client.get("/v1/comfyui/workflows", headers=HEADERS)
    assert (await resp.json())["workflows"] == []  # the refused submit stored nothing


async def test_health_and_metrics_are_never_limited(make_client, make_config, clock):
    client = await make_client(make_config(rate_limit=3), clock=clock)
    for _ in range(10):
        assert await status_of(client, "/health") == 200
        assert await status_of(client, "/metrics") == 200
    for _ in range(3):  # they used no tokens
        assert await status_of(client, **HEADERS) == 200
    await expect_429(client, 20)
    for _ in range(5):
        assert await status_of(client, "/health") == 200
        assert await status_of(client, "/metrics") == 200


async def test_the_limit_is_per_client_address(make_client, make_config, clock):
    client = await make_client(make_config(rate_limit=3), clock=clock)
    for _ in range(3):
        assert await status_of(client, **HEADERS) == 200
    await expect_429(client, 20)
    url = str(client.make_url(STATUS))
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as other:
        for expected in (200, 200, 200, 429):
            async with other.get(url, headers=HEADERS) as resp:
                assert resp.status == expected
    await expect_429(client, 20)


async def test_rate_limit_off_when_zero(make_client, make_config, clock):
    client = await make_client(make_config(rate_limit=0), clock=clock)
    for _ in range(150):
        assert await status_of(client, **HEADERS) == 200


###############################################################################
# X-Forwarded-For and trusted proxies
###############################################################################


def networks(*items):
    return tuple(ipaddress.ip_network(item) for item in items)


def xff(*values):
    return CIMultiDict([*HEADERS.items(), *(("X-Forwarded-For", v) for v in values)])


async def get(client, headers):
    resp = await client.get(STATUS, headers=headers)
    return resp.status


async def test_a_trusted_proxy_limits_per_forwarded_address(make_client, make_config, clock):
    client = await make_client(make_config(rate_limit=3, trusted_proxies=networks("127.0.0.1/32")),
                               clock=clock)
    assert [await get(client, xff("203.0.113.5")) for _ in range(4)] == [200, 200, 200, 429]
    assert [await get(client, xff("203.0.113.6")) for _ in range(4)] == [200, 200, 200, 429]
    assert await get(client, HEADERS) == 200  # the proxy's own requests: its own bucket
    resp = await client.get(STATUS, headers=xff("203.0.113.5"))
    assert resp.headers["Retry-After"] == "20"


async def test_an_untrusted_peer_cannot_pick_its_address(make_client, make_config, clock):
    client = await make_client(make_config(rate_limit=3, trusted_proxies=networks("10.0.0.0/8")),
                               clock=clock)
    statuses = [await get(client, xff(f"198.51.100.{i}")) for i in range(1, 5)]
    assert statuses == [200, 200, 200, 429]
    assert await get(client, HEADERS) == 429


async def test_without_trusted_proxies_forwarded_for_is_ignored(make_client, make_config, clock):
    client = await make_client(make_config(rate_limit=3), clock=clock)
    statuses = [await get(client, xff(f"198.51.100.{i}")) for i in range(1, 5)]
    assert statuses == [200, 200, 200, 429]


async def test_the_rightmost_untrusted_forwarded_address_is_the_client(make_client, make_config,
                                                                        clock):
    trusted = networks("127.0.0.1/32", "10.0.0.0/8")
    client = await make_client(make_config(rate_limit=3, trusted_proxies=trusted), clock=clock)
    # 203.0.113.9 came through an inner proxy 10.1.2.3; what it claims on the left is a lie.
    for spoofed in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        assert await get(client, xff(f"{spoofed}, 203.0.113.9, 10.1.2.3")) == 200
    assert await get(client, xff("192.0.2.77, 203.0.113.9")) == 429
    assert await get(client, xff("192.0.2.77", "203.0.113.9", "10.0.0.1")) == 429  # several headers
    assert await get(client, xff("203.0.113.9, 198.51.100.7")) == 200  # client 198.51.100.7
    assert await get(client, xff("not-an-ip, 203.0.113.9")) == 429


async def test_an_all_trusted_chain_uses_the_first_address(make_client, make_config, clock):
    trusted = networks("127.0.0.1/32", "10.0.0.0/8")
    client = await make_client(make_config(rate_limit=3, trusted_proxies=trusted), clock=clock)
    for _ in range(3):
        assert await get(client, xff("10.0.0.1, 10.0.0.2")) == 200
    assert await get(client, xff("10.0.0.1")) == 429
    assert await get(client, xff("10.0.0.2")) == 200


###############################################################################
# CORS
###############################################################################


def preflight_headers(origin=ORIGIN, method="POST"):
    return {"Origin": origin, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "x-api-key, content-type"}


CORS_HEADERS = ("Access-Control-Allow-Origin", "Access-Control-Allow-Methods",
                "Access-Control-Allow-Headers", "Access-Control-Expose-Headers",
                "Access-Control-Max-Age")


def no_cors(resp):
    return not any(h in resp.headers for h in CORS_HEADERS)


async def test_cors_is_off_by_default(make_client):
    client = await make_client()
    resp = await client.options(SUBMIT, headers=preflight_headers())
    assert resp.status == 403
    assert await resp.json() == envelope("cors_forbidden", f"origin {ORIGIN} is not allowed", 403)
    assert no_cors(resp)
    for path, headers in (("/health", {}), (STATUS, HEADERS)):
        resp = await client.get(path, headers={"Origin": ORIGIN, **headers})
        assert resp.status == 200
        assert no_cors(resp)


async def test_a_configured_origin_gets_preflight_and_cors_headers(make_client, make_config):
    client = await make_client(make_config(cors_origins=(ORIGIN, "http://localhost:3000")))
    for path, method in ((SUBMIT, "POST"), ("/v1/comfyui/workflow/x", "DELETE"), (STATUS, "GET")):
        resp = await client.options(path, headers=preflight_headers(method=method))
        assert resp.status == 204
        assert await resp.read() == b""
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert resp.headers["Access-Control-Allow-Methods"] == "GET, HEAD, POST, DELETE, OPTIONS"
        allowed_headers = {h.strip().lower() for h in
                           resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"x-api-key", "content-type"} <= allowed_headers
        assert resp.headers["Access-Control-Max-Age"] == "600"
        assert "Origin" in resp.headers.getall("Vary")
    # Actual requests, answered or refused, carry the headers so the page can read them.
    resp = await client.post(SUBMIT, json={"workflow": workflow()},
                             headers={"Origin": ORIGIN, **HEADERS})
    assert resp.status == 202
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    exposed = {h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Location", "Retry-After"} <= exposed
    assert "Origin" in resp.headers.getall("Vary")
    for headers, status in ((HEADERS, 200), ({}, 401)):
        resp = await client.get(STATUS, headers={"Origin": "http://localhost:3000", **headers})
        assert resp.status == status
        assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
        assert "Origin" in resp.headers.getall("Vary")


async def test_other_origins_get_no_cors_headers(make_client, make_config):
    client = await make_client(make_config(cors_origins=(ORIGIN,)))
    for origin in ("https://evil.example", "https://app.example.com.evil.example",
                   "http://app.example.com", "null"):
        resp = await client.options(SUBMIT, headers=preflight_headers(origin=origin))
        assert resp.status == 403
        assert await resp.json() == envelope("cors_forbidden", f"origin {origin} is not allowed", 403)
        resp = await client.get(STATUS, headers={"Origin": origin, **HEADERS})
        assert resp.status == 200
        assert no_cors(resp)
    resp = await client.get(STATUS, headers=HEADERS)  # no Origin: not a CORS request
    assert no_cors(resp)


async def test_a_wildcard_allows_any_origin(make_client, make_config):
    client = await make_client(make_config(cors_origins=("*",)))
    resp = await client.options(STATUS, headers=preflight_headers(origin="https://x.example",
                                                                  method="GET"))
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    resp = await client.get(STATUS, headers={"Origin": "https://x.example", **HEADERS})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_an_options_request_that_is_not_a_preflight_is_not_answered_by_cors(make_client,
                                                                                   make_config):
    client = await make_client(make_config(cors_origins=(ORIGIN,)))
    resp = await client.options(SUBMIT, headers={"Origin": ORIGIN})
    assert resp.status == 401
    assert await resp.json() == MISSING_KEY


###############################################################################
# body limits and static files
###############################################################################


def body_of_size(size: int) -> bytes:
    """A valid submit body of exactly `size` bytes."""
    head = b'{"workflow": {"1": {"class_type": "X", "inputs": {"s": "'
    tail = b'"}}}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_a_body_of_exactly_the_limit_is_accepted_one_byte_more_is_413(make_client,
                                                                            make_config):
    client = await make_client(make_config(max_body_bytes=1000))
    resp = await client.post(SUBMIT, data=body_of_size(1000), headers=HEADERS)
    assert resp.status == 202
    resp = await client.post(SUBMIT, data=body_of_size(1001), headers=HEADERS)
    assert resp.status == 413
    assert await resp.json() == envelope("payload_too_large",
                                         "the body is 1001 bytes; the limit is 1000", 413,
                                         {"limit": 1000})
    # The server is fine afterwards, and the refused body stored nothing.
    resp = await client.get("/v1/comfyui/workflows", headers=HEADERS)
    assert len((await resp.json())["workflows"]) == 1


async def test_a_chunked_body_over_the_limit_is_413(make_client, make_config):
    client = await make_client(make_config(max_body_bytes=1000))

    async def chunks():
        data = body_of_size(3000)
        for i in range(0, len(data), 500):
            yield data[i:i + 500]

    resp = await client.post(SUBMIT, data=chunks(), headers=HEADERS)
    assert resp.status == 413
    assert await resp.json() == envelope("payload_too_large",
                                         "the body is over the limit of 1000 bytes", 413,
                                         {"limit": 1000})
    resp = await client.get("/v1/comfyui/workflows", headers=HEADERS)
    assert (await resp.json())["workflows"] == []


async def test_a_big_body_without_a_key_is_refused_before_it_is_read(make_client, make_config):
    client = await make_client(make_config(max_body_bytes=1000))
    resp = await client.post(SUBMIT, data=body_of_size(5000))
    assert resp.status == 401
    assert await resp.json() == MISSING_KEY


@pytest.mark.parametrize("raw, decoded", [
    ("/docs/assets/%2e%2e/%2e%2e/%2e%2e/comfymgr.py", "/docs/assets/../../../comfymgr.py"),
    ("/docs/assets/..%2f..%2f__init__.py", "/docs/assets/../../__init__.py"),
])
async def test_docs_assets_do_not_escape_their_directory(make_client, raw, decoded):
    client = await make_client()
    resp = await client.get(URL(raw, encoded=True), headers=HEADERS)
    assert resp.status == 404
    body = await resp.json()
    assert (body["error"], body["statusCode"], body["details"]) == ("not_found", 404,
                                                                    {"path": decoded})


async def test_a_missing_docs_asset_is_a_404_envelope(make_client):
    # Once aiohttp's static FileResponse: a bare 404 with an empty body.
    client = await make_client()
    resp = await client.get("/docs/assets/no-such-file.css")
    assert resp.status == 404
    assert await resp.json() == envelope("not_found", "no docs asset 'no-such-file.css'", 404,
                                         {"path": "/docs/assets/no-such-file.css"})


async def test_job_ids_in_paths_are_not_interpreted(make_client):
    client = await make_client()
    job_id = f"{uuid.uuid4()}' OR '1'='1"
    resp = await client.get(f"{SUBMIT}/{job_id}", headers=HEADERS)
    assert resp.status == 404
    assert await resp.json() == envelope("not_found", f"workflow {job_id} not found", 404,
                                         {"workflowId": job_id})
