"""From events to audit records: how an event's type reads as an action on a resource, and the
hash that chains each record to the one before."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC
from types import SimpleNamespace
from typing import Any

import orjson

from services.audit.models import PLATFORM_CHAIN, AuditRecord
from workbench.db import utcnow, uuid7
from workbench.events.envelope import EventEnvelope

# The last word of an event type says what happened; anything unknown is kept as it is, so a
# new event type needs no change here.
VERB_ACTIONS: dict[str, str] = {
    "created": "create", "added": "create", "registered": "create", "issued": "create",
    "uploaded": "create", "installed": "create", "published": "create",
    "updated": "update", "changed": "update", "role_changed": "update", "rotated": "update",
    "renamed": "update", "scaled": "update",
    "deleted": "delete", "removed": "delete", "revoked": "delete", "purged": "delete",
    "archived": "delete", "uninstalled": "delete",
    "logged_in": "login", "logged_out": "logout", "failed": "fail",
    "exported": "export", "downloaded": "read", "viewed": "read",
    "started": "execute", "succeeded": "execute", "completed": "execute", "stopped": "execute",
    "cancelled": "execute", "executed": "execute", "reuse_detected": "security",
}
METHOD_ACTIONS = {"GET": "read", "HEAD": "read", "OPTIONS": "read", "POST": "create",
                  "PUT": "update", "PATCH": "update", "DELETE": "delete"}
ACCESS_EVENT = "wb.gateway.access.recorded"


def chain_of(org_id: str | None) -> str:
    return org_id or PLATFORM_CHAIN


def classify(event: EventEnvelope) -> tuple[str, str]:
    """(action, resource type) of an event: `wb.user.api_key.revoked` → (delete, user.api_key);
    `wb.user.login.failed` → (login_failed, user.login)."""
    _, service, entity, verb = event.type.split(".", 3)
    if event.type == ACCESS_EVENT:
        return METHOD_ACTIONS.get(str(event.data.get("method", "")).upper(), "access"), \
            f"http:{event.data.get('service') or 'gateway'}"
    action = VERB_ACTIONS.get(verb, verb)
    if entity == "login" and verb == "failed":
        action = "login_failed"
    return action, f"{service}.{entity}"


def trace_id_of(traceparent: str | None) -> str | None:
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def record_values(event: EventEnvelope, *, chain: str, seq: int,
                  prev_hash: str) -> dict[str, Any]:
    """The column values of the record of `event`, its hash included (plain values: bulk
    inserts are far cheaper than ORM objects)."""
    action, resource_type = classify(event)
    is_access = event.type == ACCESS_EVENT
    status = event.data.get("status") if is_access else None
    resource_id = event.subject
    if is_access and resource_id is None:
        resource_id = str(event.data.get("path", ""))[:300] or None
    values: dict[str, Any] = dict(
        id=uuid7(),
        org_id=uuid.UUID(event.org_id) if event.org_id else None,
        chain=chain,
        seq=seq,
        event_id=event.id,
        event_type=event.type,
        action=action,
        actor=event.actor,
        resource_type=resource_type,
        resource_id=resource_id,
        status=int(status) if isinstance(status, int | float) else None,
        ip=event.ip or (str(event.data.get("client_ip")) if is_access else None),
        request_id=event.request_id,
        trace_id=trace_id_of(event.traceparent),
        details=event.data,
        occurred_at=event.time.astimezone(UTC),
        prev_hash=prev_hash,
        recorded_at=utcnow(),
    )
    values["hash"] = record_hash(SimpleNamespace(**values))
    return values


def canonical(record: AuditRecord | SimpleNamespace) -> dict[str, Any]:
    """What the hash covers: every column but `hash` and `recorded_at`."""
    return {
        "id": str(record.id),
        "org_id": str(record.org_id) if record.org_id else None,
        "chain": record.chain,
        "seq": record.seq,
        "event_id": record.event_id,
        "event_type": record.event_type,
        "action": record.action,
        "actor": record.actor,
        "resource_type": record.resource_type,
        "resource_id": record.resource_id,
        "status": record.status,
        "ip": record.ip,
        "request_id": record.request_id,
        "trace_id": record.trace_id,
        "details": record.details,
        "occurred_at": record.occurred_at.isoformat(),
        "prev_hash": record.prev_hash,
    }


def record_hash(record: AuditRecord | SimpleNamespace) -> str:
    body = orjson.dumps(canonical(record), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(body).hexdigest()
