"""One OpenAPI document for the whole platform: the services' documents merged, limited to the
routes the gateway serves, with the platform's security schemes."""

from __future__ import annotations

import copy
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from gateway.routes import DEFAULT_ROUTES, RouteTable

SpecSource = Callable[[], Awaitable[dict[str, Any]]]


def merge_specs(specs: Mapping[str, dict[str, Any]], *, title: str, version: str,
                routes: RouteTable = DEFAULT_ROUTES) -> dict[str, Any]:
    merged: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": (
                "Every route of the platform, served through the gateway. Authenticate with "
                "`Authorization: Bearer <access token>` (from `POST /api/v1/auth/login`) or "
                "with a platform API key (`Authorization: Bearer wbk_…` or `X-API-Key`). "
                "Errors are RFC 9457 problem+json."
            ),
        },
        "paths": {},
        "components": {
            "schemas": {},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT or API key"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
        "tags": [],
    }
    schemas: dict[str, Any] = merged["components"]["schemas"]
    seen_tags: set[str] = set()
    for service, spec in sorted(specs.items()):
        spec = copy.deepcopy(spec)
        renames: dict[str, str] = {}
        for name, schema in spec.get("components", {}).get("schemas", {}).items():
            if name in schemas and schemas[name] != schema:
                renames[name] = f"{service.capitalize()}{name}"
        if renames:
            text = json.dumps(spec)
            for old, new in renames.items():
                text = text.replace(f'"#/components/schemas/{old}"',
                                    f'"#/components/schemas/{new}"')
            spec = json.loads(text)
        for name, schema in spec.get("components", {}).get("schemas", {}).items():
            schemas[renames.get(name, name)] = schema
        for path, ops in spec.get("paths", {}).items():
            if routes.service_for(path) != service:
                continue
            for method, op in ops.items():
                if isinstance(op, dict) and routes.is_public(method.upper(), path):
                    op["security"] = []
            merged["paths"][path] = ops
        for tag in spec.get("tags", []) or []:
            if tag.get("name") not in seen_tags:
                seen_tags.add(tag["name"])
                merged["tags"].append(tag)
    return merged
