"""Who is calling: the Principal every request is resolved into, roles and their permissions."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"


# Resources that members work on day to day; each has read/write/delete.
WORK_RESOURCES = (
    "projects", "data", "kb", "training", "inference", "workflow", "marketplace",
    "scheduler", "agent",
)
_READ = {f"{r}:read" for r in WORK_RESOURCES} | {"org:read", "members:read", "orgs:create"}
_WRITE = {f"{r}:{a}" for r in WORK_RESOURCES for a in ("write", "delete")}
_SELF = {"api_keys:read", "api_keys:write"}
_ADMIN = {"org:write", "members:write", "quotas:write", "audit:read", "audit:manage",
          "api_keys:manage",
          "inference:execute", "workflow:execute", "agent:execute"}

ROLE_PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.VIEWER: frozenset(_READ | _SELF),  # read-only keys: scopes never exceed the role
    Role.MEMBER: frozenset(
        _READ | _WRITE | _SELF | {"inference:execute", "workflow:execute", "agent:execute"}
    ),
    Role.ADMIN: frozenset(_READ | _WRITE | _SELF | _ADMIN),
    Role.OWNER: frozenset(_READ | _WRITE | _SELF | _ADMIN | {"org:delete"}),
}
ALL_PERMISSIONS: frozenset[str] = ROLE_PERMISSIONS[Role.OWNER]
ROLE_RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller. `scopes` narrows the role's permissions (API keys); None: no narrowing."""

    user_id: uuid.UUID
    org_id: uuid.UUID
    role: Role
    scopes: frozenset[str] | None = None
    key_id: str | None = None
    session_id: str | None = None
    permissions: frozenset[str] = field(default=frozenset(), compare=False)

    @classmethod
    def build(
        cls,
        user_id: uuid.UUID,
        org_id: uuid.UUID,
        role: Role,
        scopes: frozenset[str] | None = None,
        key_id: str | None = None,
        session_id: str | None = None,
    ) -> Principal:
        perms = ROLE_PERMISSIONS[role]
        if scopes is not None:
            perms = perms & scopes
        return cls(user_id, org_id, role, scopes, key_id, session_id, perms)

    def can(self, permission: str) -> bool:
        return permission in self.permissions

    @property
    def actor(self) -> str:
        """How events and audit records name this caller."""
        return f"key:{self.key_id}" if self.key_id else f"user:{self.user_id}"
