"""RFC 9457 problem+json: the one error format of every service and the gateway."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from workbench import context

PROBLEM_CONTENT_TYPE = "application/problem+json"


class Problem(BaseModel):
    """An error. `code` is stable and machine-readable; `detail` says what to do."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "type": "/problems/not_found",
                    "title": "Not found",
                    "status": 404,
                    "detail": "project 5f0c… does not exist",
                    "code": "not_found",
                    "request_id": "9b1d2c3e4f",
                }
            ]
        },
    )

    type: str
    title: str
    status: int
    detail: str
    code: str
    request_id: str | None = None


def problem_body(
    status: int, code: str, title: str, detail: str, **extra: Any
) -> dict[str, Any]:
    ctx = context.current()
    body: dict[str, Any] = {
        "type": f"/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "request_id": ctx.request_id if ctx else None,
    }
    body.update(extra)
    return body


def problem_bytes(status: int, code: str, title: str, detail: str, **extra: Any) -> bytes:
    return orjson.dumps(problem_body(status, code, title, detail, **extra))


PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def problem_response(description: str) -> dict[str, Any]:
    """The OpenAPI entry of an error response of a route (PROBLEM_RESPONSES has the usual ones).
    The schema sits under the media type actually served; the app factory adds `Problem` to the
    components (FastAPI would file a `model` under application/json)."""
    return {"description": description,
            "content": {PROBLEM_CONTENT_TYPE: {"schema": PROBLEM_REF}}}


# Added to every router so the OpenAPI documents the error shape of each route.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: problem_response("Missing or invalid credentials"),
    403: problem_response("The caller lacks the permission"),
    404: problem_response("Not found, or not in the caller's organization"),
    422: problem_response("The request did not validate; `errors` names each field"),
    429: problem_response("Rate limit or quota exceeded; see Retry-After"),
}


# ---- OpenAI-compatible routes (/v1/…) answer errors in OpenAI's shape -------------------------

OPENAI_PREFIX = "/v1/"
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "invalid_request_error",
                 409: "invalid_request_error", 413: "invalid_request_error",
                 415: "invalid_request_error", 422: "invalid_request_error",
                 429: "rate_limit_error"}


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def openai_error_body(status: int, code: str, message: str, *, param: str | None = None,
                      type_: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}` as OpenAI's API (and its clients)
    expect; the request id rides along for support."""
    if type_ is None:
        type_ = _OPENAI_TYPES.get(status, "api_error" if status >= 500 else
                                  "invalid_request_error")
        if status == 429 and code == "quota_exceeded":
            type_ = "insufficient_quota"
    ctx = context.current()
    return {"error": {"message": message, "type": type_, "param": param, "code": code,
                      "request_id": ctx.request_id if ctx else None}}


def openai_error_bytes(status: int, code: str, message: str, **kw: Any) -> bytes:
    return orjson.dumps(openai_error_body(status, code, message, **kw))
