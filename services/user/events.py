"""Events the user service publishes (contracts: proto/wb/user/v1/events.proto). Each is
written to the outbox in the caller's transaction."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from services.user.models import EVENT_TABLES, ApiKey, Organization, Project, User
from workbench.events.outbox import Outbox
from workbench.identity.principal import Principal, Role


class Events:
    def __init__(self) -> None:
        self.outbox = Outbox(EVENT_TABLES, source="wb/user")

    async def _emit(self, s: AsyncSession, type: str, data: dict[str, object], *,
                    org_id: uuid.UUID | None, actor: str | None, subject: str | None) -> None:
        await self.outbox.record(s, type, data, subject=subject,
                                 org_id=str(org_id) if org_id else None, actor=actor)

    async def user_registered(self, s: AsyncSession, user: User, org: Organization) -> None:
        await self._emit(s, "wb.user.user.registered",
                         {"user_id": str(user.id), "email": user.email,
                          "username": user.username, "org_id": str(org.id)},
                         org_id=org.id, actor=f"user:{user.id}", subject=str(user.id))

    async def logged_in(self, s: AsyncSession, user: User, org_id: uuid.UUID) -> None:
        await self._emit(s, "wb.user.user.logged_in",
                         {"user_id": str(user.id), "org_id": str(org_id), "method": "password"},
                         org_id=org_id, actor=f"user:{user.id}", subject=str(user.id))

    async def login_failed(self, s: AsyncSession, login: str, reason: str,
                           user: User | None) -> None:
        await self._emit(s, "wb.user.login.failed", {"email": login[:255], "reason": reason},
                         org_id=user.default_org_id if user else None,
                         actor=f"user:{user.id}" if user else "anonymous",
                         subject=str(user.id) if user else None)

    async def logged_out(self, s: AsyncSession, p: Principal, session_id: str) -> None:
        await self._emit(s, "wb.user.user.logged_out",
                         {"user_id": str(p.user_id), "session_id": session_id},
                         org_id=p.org_id, actor=p.actor, subject=str(p.user_id))

    async def refresh_reuse(self, s: AsyncSession, user_id: uuid.UUID, org_id: uuid.UUID,
                            family_id: uuid.UUID) -> None:
        await self._emit(s, "wb.user.refresh_token.reuse_detected",
                         {"user_id": str(user_id), "session_id": str(family_id)},
                         org_id=org_id, actor="system", subject=str(user_id))

    async def org_created(self, s: AsyncSession, org: Organization, owner_id: uuid.UUID) -> None:
        await self._emit(s, "wb.user.org.created",
                         {"org_id": str(org.id), "name": org.name, "slug": org.slug,
                          "owner_id": str(owner_id)},
                         org_id=org.id, actor=f"user:{owner_id}", subject=str(org.id))

    async def org_updated(self, s: AsyncSession, p: Principal, org_id: uuid.UUID,
                          changed: list[str]) -> None:
        await self._emit(s, "wb.user.org.updated",
                         {"org_id": str(org_id), "changed_fields": changed},
                         org_id=org_id, actor=p.actor, subject=str(org_id))

    async def org_deleted(self, s: AsyncSession, p: Principal, org_id: uuid.UUID) -> None:
        await self._emit(s, "wb.user.org.deleted", {"org_id": str(org_id)},
                         org_id=org_id, actor=p.actor, subject=str(org_id))

    async def member_added(self, s: AsyncSession, org_id: uuid.UUID, user_id: uuid.UUID,
                           role: Role, *, actor: str) -> None:
        await self._emit(s, "wb.user.member.added",
                         {"org_id": str(org_id), "user_id": str(user_id), "role": role.value},
                         org_id=org_id, actor=actor, subject=str(user_id))

    async def member_role_changed(self, s: AsyncSession, p: Principal, org_id: uuid.UUID,
                                  user_id: uuid.UUID, old: Role, new: Role) -> None:
        await self._emit(s, "wb.user.member.role_changed",
                         {"org_id": str(org_id), "user_id": str(user_id),
                          "old_role": old.value, "new_role": new.value},
                         org_id=org_id, actor=p.actor, subject=str(user_id))

    async def member_removed(self, s: AsyncSession, p: Principal, org_id: uuid.UUID,
                             user_id: uuid.UUID) -> None:
        await self._emit(s, "wb.user.member.removed",
                         {"org_id": str(org_id), "user_id": str(user_id)},
                         org_id=org_id, actor=p.actor, subject=str(user_id))

    async def project_created(self, s: AsyncSession, p: Principal, project: Project) -> None:
        await self._emit(s, "wb.user.project.created",
                         {"project_id": str(project.id), "name": project.name,
                          "slug": project.slug, "owner_id": str(project.owner_id)},
                         org_id=p.org_id, actor=p.actor, subject=str(project.id))

    async def project_updated(self, s: AsyncSession, p: Principal, project_id: uuid.UUID,
                              changed: list[str]) -> None:
        await self._emit(s, "wb.user.project.updated",
                         {"project_id": str(project_id), "changed_fields": changed},
                         org_id=p.org_id, actor=p.actor, subject=str(project_id))

    async def project_deleted(self, s: AsyncSession, p: Principal, project_id: uuid.UUID) -> None:
        await self._emit(s, "wb.user.project.deleted", {"project_id": str(project_id)},
                         org_id=p.org_id, actor=p.actor, subject=str(project_id))

    async def api_key_created(self, s: AsyncSession, p: Principal, key: ApiKey) -> None:
        data: dict[str, object] = {"key_id": key.public_id, "name": key.name,
                                   "scopes": list(key.scopes)}
        if key.expires_at is not None:
            data["expires_at"] = key.expires_at.isoformat()
        await self._emit(s, "wb.user.api_key.created", data,
                         org_id=p.org_id, actor=p.actor, subject=key.public_id)

    async def api_key_revoked(self, s: AsyncSession, p: Principal, key: ApiKey) -> None:
        await self._emit(s, "wb.user.api_key.revoked", {"key_id": key.public_id},
                         org_id=p.org_id, actor=p.actor, subject=key.public_id)

    async def quota_updated(self, s: AsyncSession, org_id: uuid.UUID, limits: dict[str, int],
                            actor: str) -> None:
        await self._emit(s, "wb.user.quota.updated",
                         {"org_id": str(org_id), "limits": limits},
                         org_id=org_id, actor=actor, subject=str(org_id))

    async def signing_key_rotated(self, s: AsyncSession, kid: str, previous: str | None,
                                  actor: str) -> None:
        await self._emit(s, "wb.user.signing_key.rotated",
                         {"kid": kid, "previous_kid": previous or ""},
                         org_id=None, actor=actor, subject=kid)
