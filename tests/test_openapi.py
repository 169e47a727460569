"""openapi: /openapi.json is a valid OpenAPI 3.1 document generated from the
route table and the handlers' own schemas; /docs is served with no external
URL, and every file it refers to is served too."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from openapi_spec_validator import validate

import comfymgr
from conftest import HEADERS, workflow

# Serve the docs and the dashboard, not in the document.
DOC_ROUTES = {"openapi", "docs", "docs_init", "docs_assets", "ui", "ui_files"}


@pytest.fixture
async def client(make_client):
    return await make_client()


@pytest.fixture
async def doc(client):
    resp = await client.get("/openapi.json")  # no key: it is open
    assert resp.status == 200
    assert resp.content_type == "application/json"
    return await resp.json()


def openapi_path(path):
    """A route path as OpenAPI writes it: `{name:regex}` becomes `{name}`."""
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)


def schema_validator(doc, name):
    """A validator for one components/schemas entry, $refs resolved in the document."""
    schema = {**doc["components"]["schemas"][name], "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema)


async def test_the_document_is_valid_openapi_3_1(doc):
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["version"] == comfymgr.__version__
    assert doc["components"]["securitySchemes"] == {
        "ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    assert doc["security"] == [{"ApiKeyAuth": []}]
    assert json.dumps(doc)  # what is served is plain JSON
    assert doc == json.loads(json.dumps(comfymgr._openapi_document(comfymgr._routes())))


async def test_every_route_of_the_table_is_documented_with_its_method(doc):
    table = comfymgr._routes()
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    assert documented == {(openapi_path(r.path), r.method) for r in table}
    for route in table:
        operation = doc["paths"][openapi_path(route.path)][route.method.lower()]
        assert operation["operationId"] == route.name
        assert operation["summary"] == route.summary
        for status in route.responses:
            assert str(status) in operation["responses"], (route.name, status)
        assert "default" in operation["responses"]
        path_params = [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"]
        assert path_params == re.findall(r"\{(\w+)", route.path)


async def test_every_route_the_app_serves_is_in_the_table(client):
    served = {(route.method, route.name) for route in client.app.router.routes()
              if route.name not in DOC_ROUTES and route.method != "HEAD"}
    assert served == {(r.method, r.name) for r in comfymgr._routes()}


async def test_the_submit_request_schema_is_the_one_the_handler_validates_with(client, doc):
    in_app = client.app[comfymgr.OPENAPI]["paths"]["/v1/comfyui/workflow"]["post"]
    assert in_app["requestBody"]["content"]["application/json"]["schema"] is comfymgr.SUBMIT_SCHEMA
    served = doc["paths"]["/v1/comfyui/workflow"]["post"]["requestBody"]
    assert served["required"] is True
    assert served["content"]["application/json"]["schema"] == json.loads(
        json.dumps(comfymgr.SUBMIT_SCHEMA))


async def test_the_list_query_parameters_are_the_validated_ones(doc):
    parameters = doc["paths"]["/v1/comfyui/workflows"]["get"]["parameters"]
    assert {p["name"]: p["schema"] for p in parameters if p["in"] == "query"} == json.loads(
        json.dumps(comfymgr.LIST_QUERY_SCHEMA["properties"]))


async def test_open_routes_have_no_security_and_the_rest_document_401(doc):
    for route in comfymgr._routes():
        operation = doc["paths"][openapi_path(route.path)][route.method.lower()]
        if route.name in comfymgr._OPEN_ROUTES:
            assert operation["security"] == [], route.name
            assert "401" not in operation["responses"], route.name
        else:
            assert "security" not in operation, route.name  # the document-wide key applies
            assert "401" in operation["responses"], route.name
        limited = route.name not in comfymgr._UNLIMITED_ROUTES
        assert ("429" in operation["responses"]) is limited, route.name


async def test_error_responses_are_the_envelope(doc):
    assert doc["components"]["schemas"]["Error"]["required"] == ["error", "message", "statusCode",
                                                                 "details"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status == "default" or int(status) >= 400:
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"}, (path, method, status)


async def test_what_the_handlers_answer_matches_the_documented_schemas(client, doc):
    resp = await client.post("/v1/comfyui/workflow", json={"workflow": workflow()}, headers=HEADERS)
    job = await resp.json()
    schema_validator(doc, "Job").validate(job)
    resp = await client.get(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    schema_validator(doc, "Job").validate(await resp.json())
    resp = await client.get("/v1/comfyui/workflows", headers=HEADERS)
    schema_validator(doc, "JobList").validate(await resp.json())
    resp = await client.get("/health")
    schema_validator(doc, "Health").validate(await resp.json())
    resp = await client.get("/v1/status", headers=HEADERS)
    schema_validator(doc, "Status").validate(await resp.json())
    resp = await client.delete(f"/v1/comfyui/workflow/{job['workflowId']}", headers=HEADERS)
    schema_validator(doc, "CancelResult").validate(await resp.json())
    for method, path, headers in (("GET", "/v1/status", {}), ("GET", "/nope", HEADERS),
                                  ("PUT", "/v1/status", HEADERS),
                                  ("POST", "/v1/comfyui/workflow", HEADERS)):
        resp = await client.request(method, path, headers=headers)
        assert resp.status >= 400
        schema_validator(doc, "Error").validate(await resp.json())


###############################################################################
# /docs
###############################################################################


def assert_no_external_url(text):
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(?:["'(=]|url\()\s*//""", text), "protocol-relative URL"


async def test_docs_are_served_without_a_key_and_refer_to_no_external_url(client):
    resp = await client.get("/docs")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    html = await resp.text()
    assert_no_external_url(html)
    referenced = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert set(referenced) == {"/docs/assets/swagger-ui.css", "/docs/assets/swagger-ui-bundle.js",
                               "/docs/init.js"}
    for path in referenced:
        assert path.startswith("/") and not path.startswith("//")
        resp = await client.get(path)  # no key
        assert resp.status == 200, path
        assert len(await resp.read()) > 0, path
    css = await client.get("/docs/assets/swagger-ui.css")
    assert css.content_type == "text/css"
    js = await client.get("/docs/assets/swagger-ui-bundle.js")
    assert js.content_type in ("application/javascript", "text/javascript")


async def test_docs_init_loads_the_local_document_without_the_online_validator(client):
    resp = await client.get("/docs/init.js")
    assert resp.status == 200
    assert resp.content_type == "application/javascript"
    script = await resp.text()
    assert_no_external_url(script)
    assert 'url: "/openapi.json"' in script
    assert "validatorUrl: null" in script
