"""The platform's one API document and its docs page, served by the gateway in both run modes:
the services' public routes, the security schemes, examples, the error shape, and a Swagger UI
that needs no CDN."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import Platform

PROBLEM_REF = "#/components/schemas/Problem"
PROBLEM_CONTENT_TYPE = "application/problem+json"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
PUBLIC = {("post", "/api/v1/auth/register"), ("post", "/api/v1/auth/login"),
          ("post", "/api/v1/auth/refresh"), ("get", "/.well-known/jwks.json")}
USER_API_PATHS = {
    "/api/v1/auth/register", "/api/v1/auth/login", "/api/v1/auth/refresh",
    "/api/v1/auth/logout", "/api/v1/auth/me",
    "/api/v1/orgs", "/api/v1/orgs/{org_id}", "/api/v1/orgs/{org_id}/members",
    "/api/v1/orgs/{org_id}/members/{user_id}", "/api/v1/orgs/{org_id}/quotas",
    "/api/v1/projects", "/api/v1/projects/{project_id}",
    "/api/v1/api-keys", "/api/v1/api-keys/{key_id}",
}


@pytest.fixture
def spec(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    return body


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                yield method, path, op


def refs(schema: dict[str, Any]) -> list[str]:
    """The component references a body schema points at (directly or through anyOf/oneOf)."""
    if "$ref" in schema:
        return [schema["$ref"]]
    found: list[str] = []
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            found += refs(sub)
    return found


def component(spec: dict[str, Any], ref: str) -> dict[str, Any]:
    prefix = "#/components/schemas/"
    assert ref.startswith(prefix), ref
    schemas: dict[str, Any] = spec["components"]["schemas"]
    assert ref[len(prefix):] in schemas, f"{ref} is referenced but not defined"
    schema: dict[str, Any] = schemas[ref[len(prefix):]]
    return schema


# ---- paths ----------------------------------------------------------------------------------

# Path prefixes of the services other than the user service.
OTHER_SERVICES = ("/api/v1/audit", "/api/v1/datasets", "/api/v1/inference", "/api/v1/kb")


def test_spec_lists_the_user_service_api_paths(spec: dict[str, Any]) -> None:
    paths = set(spec["paths"])

    assert spec["openapi"].startswith("3.")
    assert spec["info"]["title"] == "xai-workbench API"
    user_paths = {p for p in paths
                  if p.startswith("/api/v1/") and not p.startswith(OTHER_SERVICES)}
    assert user_paths == USER_API_PATHS
    assert {"/v1/chat/completions", "/v1/embeddings", "/api/v1/inference/services"} <= paths
    assert "/api/v1/audit/records" in paths and "/api/v1/audit/verify" in paths
    assert {"/api/v1/datasets", "/api/v1/datasets/{dataset_id}/versions",
            "/api/v1/datasets/{dataset_id}/versions/{number}/download"} <= paths
    assert {"/api/v1/kb", "/api/v1/kb/{kb_id}/documents", "/api/v1/kb/{kb_id}/retrieve",
            "/api/v1/kb/{kb_id}/chat"} <= paths
    assert "/.well-known/jwks.json" in paths
    assert {m for m, p, _ in operations(spec) if p == "/api/v1/projects"} == {"get", "post"}


def test_spec_lists_no_internal_or_ops_paths(spec: dict[str, Any]) -> None:
    paths = set(spec["paths"])

    assert not [p for p in paths if p.startswith("/internal") or "/internal/" in p]
    assert not paths & {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"}
    assert "internal" not in {t for _, _, op in operations(spec) for t in op.get("tags", [])}


def test_spec_matches_the_user_service_own_document(spec: dict[str, Any],
                                                    platform: Platform) -> None:
    if platform.user_url is None:
        pytest.skip("the user service is reachable on its own only in distributed mode")
    own = httpx.get(platform.user_url + "/openapi.json", timeout=10).json()

    own_api = {p for p in own["paths"] if p.startswith("/api/v1/")}
    assert own_api == {p for p in spec["paths"]
                       if p.startswith("/api/v1/") and not p.startswith(OTHER_SERVICES)}
    assert not [p for p in own["paths"] if p.startswith("/internal")]


# ---- security -------------------------------------------------------------------------------

def test_spec_declares_bearer_and_api_key_security_schemes(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]

    assert schemes["bearer"]["type"] == "http"
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert {"bearer": []} in spec["security"]
    assert {"apiKey": []} in spec["security"]


def test_public_routes_need_no_security(spec: dict[str, Any]) -> None:
    for method, path in PUBLIC:
        op = spec["paths"][path][method]
        assert op.get("security") == [], f"{method.upper()} {path} should declare security: []"


def test_protected_routes_keep_the_global_security(spec: dict[str, Any]) -> None:
    protected = [(m, p, op) for m, p, op in operations(spec) if (m, p) not in PUBLIC]
    assert len(protected) > 15
    for method, path, op in protected:
        # No override: the document-wide bearer-or-API-key requirement applies.
        assert op.get("security") in (None, spec["security"]), f"{method.upper()} {path}"


# ---- request bodies -------------------------------------------------------------------------

def test_every_post_request_body_schema_has_an_example(spec: dict[str, Any]) -> None:
    missing: list[str] = []
    checked = 0
    for method, path, op in operations(spec):
        if method != "post" or "requestBody" not in op or file_body(op):
            continue
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        targets = refs(schema)
        assert targets, f"POST {path}: request body is not a component schema"
        for ref in targets:
            checked += 1
            examples = component(spec, ref).get("examples")
            if not examples:
                missing.append(f"POST {path} ({ref.rsplit('/', 1)[-1]})")
    assert checked >= 7
    assert not missing, f"request body schemas without `examples`: {missing}"


def file_body(op: dict[str, Any]) -> bool:
    """A body that is not one of our JSON schemas: a file upload (every media type it takes is
    documented as binary), or an OpenAI-compatible request (documented by an example; the
    format is OpenAI's)."""
    content = op["requestBody"]["content"]
    if "openai-compatible" in op.get("tags", []):
        assert content["application/json"].get("example"), op.get("summary")
        return True
    if "application/json" in content:
        return False
    for media, entry in content.items():
        schema = entry["schema"]
        binary = schema.get("format") == "binary" or any(
            p.get("format") == "binary" for p in schema.get("properties", {}).values())
        assert binary, f"{media} body of {op.get('summary')} is neither JSON nor a file"
    return True


def test_file_upload_routes_document_their_bodies(spec: dict[str, Any]) -> None:
    uploads = [(m, p) for m, p, op in operations(spec)
               if "requestBody" in op and file_body(op)]
    assert ("post", "/api/v1/datasets/{dataset_id}/versions") in uploads
    assert ("put", "/api/v1/datasets/{dataset_id}/uploads/{upload_id}") in uploads


def test_request_body_examples_fit_their_schema(spec: dict[str, Any]) -> None:
    for method, path, op in operations(spec):
        if "requestBody" not in op or file_body(op):
            continue
        for ref in refs(op["requestBody"]["content"]["application/json"]["schema"]):
            schema = component(spec, ref)
            for example in schema.get("examples", []):
                where = f"{method.upper()} {path} example {example}"
                assert set(example) <= set(schema["properties"]), where
                assert set(schema.get("required", [])) <= set(example), where


# ---- errors ---------------------------------------------------------------------------------

def test_problem_schema_describes_the_error_shape(spec: dict[str, Any]) -> None:
    problem = component(spec, PROBLEM_REF)

    assert {"type", "title", "status", "detail", "code", "request_id"} <= set(
        problem["properties"])
    assert {"type", "title", "status", "detail", "code"} <= set(problem["required"])
    assert problem["examples"][0]["status"] == 404


def test_error_responses_reference_the_problem_schema(spec: dict[str, Any]) -> None:
    wrong: list[str] = []
    api_ops = [(m, p, op) for m, p, op in operations(spec) if p.startswith("/api/v1/")]
    for method, path, op in api_ops:
        errors = {code: r for code, r in op["responses"].items() if code.startswith("4")}
        assert {"401", "403", "404", "422", "429"} <= set(errors), f"{method.upper()} {path}"
        for code, response in errors.items():
            # Errors are served as application/problem+json: that is where the schema belongs.
            schema = response.get("content", {}).get(PROBLEM_CONTENT_TYPE, {}).get("schema", {})
            if schema.get("$ref") != PROBLEM_REF:
                wrong.append(f"{method.upper()} {path} {code}: {response.get('content')}")
    assert not wrong, f"{len(wrong)} error responses lack the Problem schema, e.g. {wrong[:3]}"


def test_no_error_response_uses_the_default_validation_schema(spec: dict[str, Any]) -> None:
    for method, path, op in operations(spec):
        for code, response in op["responses"].items():
            text = str(response)
            assert "HTTPValidationError" not in text, f"{method.upper()} {path} {code}"


# ---- docs page ------------------------------------------------------------------------------

def test_docs_page_loads_swagger_ui_from_the_gateway(client: httpx.Client) -> None:
    r = client.get("/docs")

    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "/docs/static/swagger-ui-bundle.js" in html
    assert "/docs/static/swagger-ui.css" in html
    assert "/openapi.json" in html
    for cdn in ("cdn.jsdelivr.net", "unpkg.com", "cdnjs", "https://"):
        assert cdn not in html, f"/docs loads from {cdn}"


def test_swagger_ui_bundle_is_served_locally(client: httpx.Client) -> None:
    r = client.get("/docs/static/swagger-ui-bundle.js")

    assert r.status_code == 200
    assert "javascript" in r.headers["content-type"]
    assert len(r.content) > 100_000
    assert b"SwaggerUIBundle" in r.content


def test_swagger_ui_stylesheet_is_served_locally(client: httpx.Client) -> None:
    r = client.get("/docs/static/swagger-ui.css")

    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/css")
    assert b".swagger-ui" in r.content
