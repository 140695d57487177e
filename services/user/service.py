"""The user service's domain: accounts and sessions, orgs and members, projects, API keys,
quotas. Functions take a session and a principal; they flush, never commit."""

from __future__ import annotations

import re
import secrets
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.user import credentials
from services.user.events import Events
from services.user.keys import Keyring
from services.user.models import (
    ApiKey,
    Membership,
    Organization,
    OrgQuota,
    Project,
    RefreshToken,
    User,
)
from services.user.settings import DEFAULT_QUOTAS, UserSettings
from workbench.db import utcnow
from workbench.errors import (
    Conflict,
    Forbidden,
    NotFound,
    QuotaExceeded,
    Unauthorized,
    ValidationFailed,
)
from workbench.identity.principal import ALL_PERMISSIONS, ROLE_PERMISSIONS, Principal, Role
from workbench.repository import Repository

COUNTED = {"members": Membership, "projects": Project, "api_keys": ApiKey}


class Refused:
    """An authentication failure whose side effects (a failed-login record, a revoked session)
    must be committed although the request is refused; the route commits, then answers 401."""

    def __init__(self, error: Unauthorized) -> None:
        self.error = error


class ProjectRepo(Repository[Project]):
    model = Project
    noun = "project"


class ApiKeyRepo(Repository[ApiKey]):
    model = ApiKey
    noun = "API key"


class MembershipRepo(Repository[Membership]):
    model = Membership
    noun = "member"


def slugify(text: str) -> str:
    """A readable slug; names with too few usable characters get a random one."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:50].strip("-")
    return slug if len(slug) >= 2 else f"{slug or 'x'}-{secrets.token_hex(3)}"


class UserService:
    def __init__(self, settings: UserSettings, keyring: Keyring, events: Events) -> None:
        self.settings = settings
        self.keyring = keyring
        self.events = events
        self.passwords = credentials.PasswordHashing(settings.password_time_cost,
                                                     settings.password_memory_kib)

    # ---- accounts and sessions -------------------------------------------------------------

    async def register(
        self, s: AsyncSession, *, email: str, username: str, password: str,
        display_name: str | None,
    ) -> tuple[User, Organization]:
        email = email.lower()
        taken = (await s.execute(
            select(User.email, User.username).where(
                (func.lower(User.email) == email) | (User.username == username)
            )
        )).first()
        if taken is not None:
            field = "email" if taken.email.lower() == email else "username"
            raise Conflict(f"that {field} is already registered", code=f"{field}_taken")
        user = User(email=email, username=username, display_name=display_name,
                    password_hash=await self.passwords.hash(password))
        s.add(user)
        try:
            await s.flush()
        except IntegrityError as exc:
            raise Conflict("that email or username is already registered",
                           code="account_taken") from exc
        org = await self._create_org(s, user, f"{display_name or username}'s workspace",
                                     slug=None, base_slug=username)
        user.default_org_id = org.id
        await self.events.user_registered(s, user, org)
        return user, org

    async def login(self, s: AsyncSession, *, login: str, password: str,
                    org_id: uuid.UUID | None) -> dict[str, Any] | Refused:
        ident = login.strip().lower()
        user = (await s.execute(
            select(User).where((func.lower(User.email) == ident) | (User.username == ident))
        )).scalar_one_or_none()
        ok = await self.passwords.verify(user.password_hash if user else None, password)
        if user is None or not ok or not user.is_active:
            reason = "inactive" if user is not None and ok else "invalid_credentials"
            await self.events.login_failed(s, ident, reason, user)
            return Refused(Unauthorized("email or password is incorrect",
                                        code="invalid_credentials"))
        membership = await self._membership_for_login(s, user, org_id)
        user.last_login_at = utcnow()
        tokens = await self._issue(s, user, membership, family_id=uuid.uuid4())
        await self.events.logged_in(s, user, membership.org_id)
        return tokens

    async def _membership_for_login(
        self, s: AsyncSession, user: User, org_id: uuid.UUID | None
    ) -> Membership:
        if org_id is not None:
            m = await self._membership(s, org_id, user.id)
            if m is None:
                raise NotFound(f"organization {org_id} does not exist")
            return m
        rows = list((await s.execute(
            select(Membership).where(Membership.user_id == user.id).order_by(Membership.id)
        )).scalars())
        for m in rows:
            if m.org_id == user.default_org_id:
                return m
        if rows:
            return rows[0]
        # Every org of this user was deleted: give them a fresh workspace to land in.
        org = await self._create_org(s, user, f"{user.username}'s workspace", slug=None,
                                     base_slug=user.username)
        user.default_org_id = org.id
        m = await self._membership(s, org.id, user.id)
        assert m is not None
        return m

    async def _issue(self, s: AsyncSession, user: User, m: Membership,
                     family_id: uuid.UUID) -> dict[str, Any]:
        refresh, digest = credentials.new_refresh_token()
        s.add(RefreshToken(
            family_id=family_id, user_id=user.id, org_id=m.org_id, token_hash=digest,
            expires_at=utcnow() + timedelta(seconds=self.settings.refresh_ttl_s),
        ))
        await s.flush()
        access = await self.access_token(user.id, m.org_id, Role(m.role), sid=str(family_id))
        return {
            "access_token": access, "refresh_token": refresh, "token_type": "bearer",
            "expires_in": self.settings.access_ttl_s,
            "refresh_expires_in": self.settings.refresh_ttl_s,
            "org_id": m.org_id, "role": m.role,
        }

    async def access_token(
        self, user_id: uuid.UUID, org_id: uuid.UUID, role: Role, *, sid: str | None = None,
        scopes: list[str] | None = None, key_id: str | None = None, ttl_s: int | None = None,
    ) -> str:
        now = int(utcnow().timestamp())
        claims: dict[str, Any] = {
            "iss": self.settings.jwt_issuer, "aud": self.settings.jwt_audience,
            "sub": str(user_id), "org": str(org_id), "role": role.value, "typ": "access",
            "iat": now, "nbf": now, "exp": now + (ttl_s or self.settings.access_ttl_s),
            "jti": secrets.token_hex(8),
        }
        if sid:
            claims["sid"] = sid
        if scopes is not None:
            claims["scp"] = scopes
        if key_id:
            claims["kid_api"] = key_id
        return await self.keyring.sign(claims)

    async def refresh(self, s: AsyncSession, *, token: str,
                      org_id: uuid.UUID | None) -> dict[str, Any] | Refused:
        row = (await s.execute(
            select(RefreshToken).where(RefreshToken.token_hash == credentials.digest(token))
            .with_for_update()
        )).scalar_one_or_none()
        if row is None or row.revoked_at is not None:
            raise Unauthorized("refresh token is not valid; sign in again", code="invalid_refresh")
        if row.used_at is not None:
            # A spent token came back: someone holds a copy. End the whole session.
            await self._revoke_family(s, row.family_id)
            await self.events.refresh_reuse(s, row.user_id, row.org_id, row.family_id)
            return Refused(Unauthorized(
                "refresh token was already used; the session has been revoked — sign in again",
                code="refresh_reused"))
        if row.expires_at <= utcnow():
            raise Unauthorized("refresh token has expired; sign in again", code="invalid_refresh")
        row.used_at = utcnow()
        user = await s.get(User, row.user_id)
        if user is None or not user.is_active:
            raise Unauthorized("account is disabled", code="invalid_refresh")
        target = org_id or row.org_id
        m = await self._membership(s, target, user.id)
        if m is None:
            if org_id is not None:
                raise NotFound(f"organization {org_id} does not exist")
            raise Unauthorized("you are no longer a member of this organization; sign in again",
                               code="invalid_refresh")
        return await self._issue(s, user, m, family_id=row.family_id)

    async def logout(self, s: AsyncSession, p: Principal, refresh_token: str | None) -> None:
        family: uuid.UUID | None = None
        if refresh_token:
            row = (await s.execute(select(RefreshToken).where(
                RefreshToken.token_hash == credentials.digest(refresh_token),
                RefreshToken.user_id == p.user_id,
            ))).scalar_one_or_none()
            if row is None:
                raise NotFound("refresh token does not exist")
            family = row.family_id
        elif p.session_id:
            family = uuid.UUID(p.session_id)
        if family is not None:
            await self._revoke_family(s, family)
        await self.events.logged_out(s, p, str(family) if family else "")

    async def _revoke_family(self, s: AsyncSession, family_id: uuid.UUID) -> None:
        await s.execute(update(RefreshToken).where(
            RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None)
        ).values(revoked_at=utcnow()))

    async def me(self, s: AsyncSession, p: Principal) -> dict[str, Any]:
        user = await s.get(User, p.user_id)
        org = await s.get(Organization, p.org_id)
        if user is None or org is None:
            raise NotFound("account or organization no longer exists")
        memberships = (await s.execute(
            select(Membership.org_id, Organization.name, Membership.role)
            .join(Organization, Organization.id == Membership.org_id)
            .where(Membership.user_id == p.user_id).order_by(Membership.id)
        )).all()
        return {
            "user": user, "org": org, "role": p.role,
            "permissions": sorted(p.permissions),
            "scopes": sorted(p.scopes) if p.scopes is not None else None,
            "memberships": [{"org_id": o, "org_name": n, "role": r} for o, n, r in memberships],
        }

    # ---- organizations ---------------------------------------------------------------------

    async def _create_org(self, s: AsyncSession, owner: User, name: str, *, slug: str | None,
                          base_slug: str) -> Organization:
        if slug is not None:
            exists = (await s.execute(select(Organization.id).where(Organization.slug == slug)))
            if exists.first() is not None:
                raise Conflict(f"organization slug '{slug}' is taken", code="slug_taken")
        else:
            slug = slugify(base_slug)
            while (await s.execute(select(Organization.id).where(Organization.slug == slug))
                   ).first() is not None:
                slug = f"{slugify(base_slug)[:40]}-{secrets.token_hex(3)}"
        org = Organization(name=name, slug=slug, plan="free", settings={})
        s.add(org)
        await s.flush()
        s.add(Membership(org_id=org.id, user_id=owner.id, role=Role.OWNER.value))
        for resource, limit in DEFAULT_QUOTAS.items():
            s.add(OrgQuota(org_id=org.id, resource=resource, limit=limit, used=0))
        await s.flush()
        await self.events.org_created(s, org, owner.id)
        await self.events.member_added(s, org.id, owner.id, Role.OWNER, actor=f"user:{owner.id}")
        return org

    async def list_orgs(self, s: AsyncSession, p: Principal) -> list[tuple[Organization, str]]:
        rows = (await s.execute(
            select(Organization, Membership.role)
            .join(Membership, Membership.org_id == Organization.id)
            .where(Membership.user_id == p.user_id).order_by(Organization.id)
        )).all()
        return [(o, r) for o, r in rows]

    async def create_org(self, s: AsyncSession, p: Principal, name: str,
                         slug: str | None) -> Organization:
        user = await s.get(User, p.user_id)
        if user is None:
            raise NotFound("account no longer exists")
        return await self._create_org(s, user, name, slug=slug, base_slug=slug or name)

    async def get_org(self, s: AsyncSession, p: Principal, org_id: uuid.UUID) -> Organization:
        # Org-scoped routes act on the org of the token; any other id is as good as absent.
        org = await s.get(Organization, org_id) if org_id == p.org_id else None
        if org is None:
            raise NotFound(f"organization {org_id} does not exist")
        return org

    async def update_org(self, s: AsyncSession, p: Principal, org_id: uuid.UUID,
                         changes: dict[str, Any]) -> Organization:
        org = await self.get_org(s, p, org_id)
        changed = [k for k, v in changes.items() if getattr(org, k) != v]
        for k in changed:
            setattr(org, k, changes[k])
        await s.flush()
        if changed:
            await self.events.org_updated(s, p, org.id, changed)
        return org

    async def delete_org(self, s: AsyncSession, p: Principal, org_id: uuid.UUID) -> None:
        org = await self.get_org(s, p, org_id)
        await s.execute(update(RefreshToken).where(
            RefreshToken.org_id == org.id, RefreshToken.revoked_at.is_(None)
        ).values(revoked_at=utcnow()))
        await s.execute(update(User).where(User.default_org_id == org.id)
                        .values(default_org_id=None))
        for model in (ApiKey, Project, Membership, OrgQuota):
            for row in (await s.execute(select(model).where(model.org_id == org.id))).scalars():
                await s.delete(row)
        await s.flush()
        await s.delete(org)
        await s.flush()
        await self.events.org_deleted(s, p, org_id)

    # ---- members ---------------------------------------------------------------------------

    async def _membership(self, s: AsyncSession, org_id: uuid.UUID,
                          user_id: uuid.UUID) -> Membership | None:
        return (await s.execute(select(Membership).where(
            Membership.org_id == org_id, Membership.user_id == user_id
        ))).scalar_one_or_none()

    async def list_members(
        self, s: AsyncSession, p: Principal, org_id: uuid.UUID, *, limit: int,
        cursor: str | None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        await self.get_org(s, p, org_id)
        rows, nxt = await MembershipRepo(s, p.org_id).list(limit=limit, cursor=cursor)
        users = {u.id: u for u in (await s.execute(
            select(User).where(User.id.in_([m.user_id for m in rows]))
        )).scalars()}
        return [self._member_view(m, users[m.user_id]) for m in rows], nxt

    @staticmethod
    def _member_view(m: Membership, u: User) -> dict[str, Any]:
        return {"user_id": u.id, "email": u.email, "username": u.username,
                "display_name": u.display_name, "role": m.role, "joined_at": m.created_at}

    def _check_role_change(self, p: Principal, target_role: Role | None,
                           new_role: Role | None) -> None:
        if Role.OWNER in (target_role, new_role) and p.role is not Role.OWNER:
            raise Forbidden("only an owner can grant, change or remove the owner role",
                            code="permission_denied")

    async def add_member(self, s: AsyncSession, p: Principal, org_id: uuid.UUID, email: str,
                         role: Role) -> dict[str, Any]:
        await self.get_org(s, p, org_id)
        self._check_role_change(p, None, role)
        user = (await s.execute(select(User).where(func.lower(User.email) == email.lower())
                                )).scalar_one_or_none()
        if user is None:
            raise NotFound(f"no account is registered with {email}; ask them to sign up first",
                           code="user_not_found")
        if await self._membership(s, org_id, user.id) is not None:
            raise Conflict(f"{email} is already a member", code="already_member")
        await self.consume_counted(s, org_id, "members")
        m = Membership(org_id=org_id, user_id=user.id, role=role.value)
        s.add(m)
        await s.flush()
        await self.events.member_added(s, org_id, user.id, role, actor=p.actor)
        return self._member_view(m, user)

    async def _target_member(self, s: AsyncSession, p: Principal, org_id: uuid.UUID,
                             user_id: uuid.UUID) -> tuple[Membership, User]:
        await self.get_org(s, p, org_id)
        m = await self._membership(s, org_id, user_id)
        user = await s.get(User, user_id) if m else None
        if m is None or user is None:
            raise NotFound(f"member {user_id} does not exist")
        return m, user

    async def _ensure_other_owner(self, s: AsyncSession, org_id: uuid.UUID,
                                  user_id: uuid.UUID) -> None:
        owners = (await s.execute(select(func.count()).select_from(Membership).where(
            Membership.org_id == org_id, Membership.role == Role.OWNER.value,
            Membership.user_id != user_id,
        ))).scalar_one()
        if owners == 0:
            raise Conflict("an organization needs at least one owner; make someone else owner "
                           "first", code="last_owner")

    async def change_member_role(self, s: AsyncSession, p: Principal, org_id: uuid.UUID,
                                 user_id: uuid.UUID, role: Role) -> dict[str, Any]:
        m, user = await self._target_member(s, p, org_id, user_id)
        old = Role(m.role)
        self._check_role_change(p, old, role)
        if old is Role.OWNER and role is not Role.OWNER:
            await self._ensure_other_owner(s, org_id, user_id)
        if old is not role:
            m.role = role.value
            await s.flush()
            await self.events.member_role_changed(s, p, org_id, user_id, old, role)
        return self._member_view(m, user)

    async def remove_member(self, s: AsyncSession, p: Principal, org_id: uuid.UUID,
                            user_id: uuid.UUID) -> None:
        # Anyone may leave an org — but an API key acts for its scopes, not as the person.
        leaving_self = user_id == p.user_id and p.key_id is None
        if not leaving_self and not p.can("members:write"):
            raise Forbidden("removing members needs the 'members:write' permission",
                            code="permission_denied")
        m, _ = await self._target_member(s, p, org_id, user_id)
        if not leaving_self:
            self._check_role_change(p, Role(m.role), None)
        if m.role == Role.OWNER.value:
            await self._ensure_other_owner(s, org_id, user_id)
        await s.delete(m)
        for key in (await s.execute(select(ApiKey).where(
            ApiKey.org_id == org_id, ApiKey.user_id == user_id, ApiKey.revoked_at.is_(None)
        ))).scalars():
            key.revoked_at = utcnow()
            await self.events.api_key_revoked(s, p, key)
        await s.execute(update(RefreshToken).where(
            RefreshToken.org_id == org_id, RefreshToken.user_id == user_id,
            RefreshToken.revoked_at.is_(None),
        ).values(revoked_at=utcnow()))
        await s.flush()
        await self.events.member_removed(s, p, org_id, user_id)

    # ---- projects --------------------------------------------------------------------------

    async def create_project(self, s: AsyncSession, p: Principal, *, name: str,
                             slug: str | None, description: str | None,
                             settings: dict[str, Any]) -> Project:
        slug = slug or slugify(name)
        repo = ProjectRepo(s, p.org_id)
        if (await s.execute(repo.scoped().where(Project.slug == slug))).first() is not None:
            raise Conflict(f"a project with slug '{slug}' already exists", code="slug_taken")
        await self.consume_counted(s, p.org_id, "projects")
        project = await repo.add(Project(org_id=p.org_id, owner_id=p.user_id, name=name,
                                         slug=slug, description=description, settings=settings))
        await self.events.project_created(s, p, project)
        return project

    async def list_projects(self, s: AsyncSession, p: Principal, *, limit: int,
                            cursor: str | None) -> tuple[list[Project], str | None]:
        return await ProjectRepo(s, p.org_id).list(limit=limit, cursor=cursor)

    async def get_project(self, s: AsyncSession, p: Principal, project_id: uuid.UUID) -> Project:
        return await ProjectRepo(s, p.org_id).get(project_id)

    async def project_of_org(self, s: AsyncSession, org_id: uuid.UUID,
                             project_id: uuid.UUID) -> Project:
        return await ProjectRepo(s, org_id).get(project_id)

    async def update_project(self, s: AsyncSession, p: Principal, project_id: uuid.UUID,
                             changes: dict[str, Any]) -> Project:
        project = await ProjectRepo(s, p.org_id).get(project_id)
        changed = [k for k, v in changes.items() if getattr(project, k) != v]
        for k in changed:
            setattr(project, k, changes[k])
        await s.flush()
        if changed:
            await self.events.project_updated(s, p, project.id, changed)
        return project

    async def delete_project(self, s: AsyncSession, p: Principal, project_id: uuid.UUID) -> None:
        repo = ProjectRepo(s, p.org_id)
        await repo.delete(await repo.get(project_id))
        await self.events.project_deleted(s, p, project_id)

    # ---- API keys --------------------------------------------------------------------------

    def _key_repo_filter(self, p: Principal) -> list[Any]:
        return [] if p.can("api_keys:manage") else [ApiKey.user_id == p.user_id]

    async def create_api_key(self, s: AsyncSession, p: Principal, *, name: str,
                             scopes: list[str], expires_in_days: int | None) -> tuple[ApiKey, str]:
        unknown = sorted(set(scopes) - ALL_PERMISSIONS)
        if unknown:
            raise ValidationFailed(
                f"unknown scopes: {', '.join(unknown)}; see GET /api/v1/auth/me for the "
                "permissions your role grants", code="unknown_scope",
                extra={"errors": [{"field": "scopes", "message": f"unknown scope {u}",
                                   "type": "unknown_scope"} for u in unknown]})
        beyond = sorted(set(scopes) - p.permissions)
        if beyond:
            raise Forbidden(f"a key cannot have permissions you do not have: {', '.join(beyond)}",
                            code="scope_exceeds_role")
        await self.consume_counted(s, p.org_id, "api_keys")
        key, public_id, digest = credentials.new_api_key()
        expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
        row = await ApiKeyRepo(s, p.org_id).add(ApiKey(
            org_id=p.org_id, user_id=p.user_id, name=name, public_id=public_id,
            secret_hash=digest, scopes=sorted(set(scopes)), expires_at=expires,
        ))
        await self.events.api_key_created(s, p, row)
        return row, key

    async def list_api_keys(self, s: AsyncSession, p: Principal, *, limit: int,
                            cursor: str | None) -> tuple[list[ApiKey], str | None]:
        return await ApiKeyRepo(s, p.org_id).list(limit=limit, cursor=cursor,
                                                  where=self._key_repo_filter(p))

    async def get_api_key(self, s: AsyncSession, p: Principal, key_id: uuid.UUID) -> ApiKey:
        row = await ApiKeyRepo(s, p.org_id).get(key_id)
        if not p.can("api_keys:manage") and row.user_id != p.user_id:
            raise NotFound(f"API key {key_id} does not exist")
        return row

    async def revoke_api_key(self, s: AsyncSession, p: Principal, key_id: uuid.UUID) -> None:
        row = await self.get_api_key(s, p, key_id)
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            await s.flush()
            await self.events.api_key_revoked(s, p, row)

    async def introspect_key(self, s: AsyncSession, key: str) -> dict[str, Any]:
        """Exchange a valid API key for a short-lived access token that carries its scopes;
        downstream services then verify one kind of credential only."""
        parsed = credentials.parse_api_key(key)
        invalid = Unauthorized("API key is not valid", code="invalid_api_key")
        if parsed is None:
            raise invalid
        public_id, secret = parsed
        row = (await s.execute(select(ApiKey).where(ApiKey.public_id == public_id))
               ).scalar_one_or_none()
        if row is None or not credentials.secret_matches(secret, row.secret_hash):
            raise invalid
        if row.revoked_at is not None:
            raise Unauthorized("API key has been revoked", code="api_key_revoked")
        now = utcnow()
        expires = row.expires_at
        if expires is not None and expires <= now:
            raise Unauthorized("API key has expired", code="api_key_expired")
        m = await self._membership(s, row.org_id, row.user_id)
        if m is None:
            raise invalid
        last = row.last_used_at
        if last is None or now - last > timedelta(seconds=30):
            row.last_used_at = now
        ttl = self.settings.key_exchange_ttl_s
        if expires is not None:
            ttl = max(1, min(ttl, int((expires - now).total_seconds())))
        role = Role(m.role)
        scopes = sorted(set(row.scopes) & ROLE_PERMISSIONS[role])
        token = await self.access_token(row.user_id, row.org_id, role, scopes=scopes,
                                        key_id=row.public_id, ttl_s=ttl)
        return {"access_token": token, "expires_in": ttl, "user_id": row.user_id,
                "org_id": row.org_id, "key_id": row.public_id, "scopes": scopes}

    # ---- quotas ----------------------------------------------------------------------------

    async def quotas(
        self, s: AsyncSession, p: Principal, org_id: uuid.UUID
    ) -> list[dict[str, Any]]:
        await self.get_org(s, p, org_id)
        rows = (await s.execute(select(OrgQuota).where(OrgQuota.org_id == org_id)
                                .order_by(OrgQuota.resource))).scalars()
        out = []
        for q in rows:
            used = await self._counted_usage(s, org_id, q.resource)
            out.append({"resource": q.resource, "limit": q.limit,
                        "used": q.used if used is None else used})
        return out

    async def _counted_usage(self, s: AsyncSession, org_id: uuid.UUID,
                             resource: str) -> int | None:
        model = COUNTED.get(resource)
        if model is None:
            return None
        stmt = select(func.count()).select_from(model).where(model.org_id == org_id)
        if model is ApiKey:
            stmt = stmt.where(ApiKey.revoked_at.is_(None)).where(
                ApiKey.expires_at.is_(None) | (ApiKey.expires_at > utcnow()))
        return int((await s.execute(stmt)).scalar_one())

    async def _quota_row(self, s: AsyncSession, org_id: uuid.UUID, resource: str) -> OrgQuota:
        q = (await s.execute(select(OrgQuota).where(
            OrgQuota.org_id == org_id, OrgQuota.resource == resource).with_for_update()
        )).scalar_one_or_none()
        if q is None:
            if await s.get(Organization, org_id) is None:
                raise NotFound(f"organization {org_id} does not exist")
            q = OrgQuota(org_id=org_id, resource=resource,
                         limit=DEFAULT_QUOTAS.get(resource, 0), used=0)
            s.add(q)
            await s.flush()
        return q

    async def consume_counted(self, s: AsyncSession, org_id: uuid.UUID, resource: str) -> None:
        q = await self._quota_row(s, org_id, resource)
        used = await self._counted_usage(s, org_id, resource) or 0
        if used + 1 > q.limit:
            raise QuotaExceeded(f"the organization's {resource} quota ({q.limit}) is used up",
                                extra={"resource": resource, "limit": q.limit, "used": used})

    async def consume(self, s: AsyncSession, org_id: uuid.UUID, resource: str,
                      amount: int) -> dict[str, Any]:
        """Atomically take `amount` of a metered resource for another service."""
        q = await self._quota_row(s, org_id, resource)
        if q.used + amount > q.limit:
            raise QuotaExceeded(
                f"the organization's {resource} quota would be exceeded "
                f"({q.used} + {amount} > {q.limit})",
                extra={"resource": resource, "limit": q.limit, "used": q.used},
            )
        q.used += amount
        await s.flush()
        return {"resource": resource, "limit": q.limit, "used": q.used}

    async def record_usage(self, s: AsyncSession, org_id: uuid.UUID, resource: str,
                           amount: int) -> dict[str, Any]:
        q = await self._quota_row(s, org_id, resource)
        q.used += amount
        await s.flush()
        return {"resource": resource, "limit": q.limit, "used": q.used}

    async def quota_of(self, s: AsyncSession, org_id: uuid.UUID,
                       resource: str) -> dict[str, Any]:
        q = await self._quota_row(s, org_id, resource)
        return {"resource": resource, "limit": q.limit, "used": q.used}

    async def release(self, s: AsyncSession, org_id: uuid.UUID, resource: str,
                      amount: int) -> dict[str, Any]:
        q = await self._quota_row(s, org_id, resource)
        q.used = max(0, q.used - amount)
        await s.flush()
        return {"resource": resource, "limit": q.limit, "used": q.used}

    async def set_limits(self, s: AsyncSession, org_id: uuid.UUID, limits: dict[str, int],
                         actor: str) -> None:
        for resource, limit in limits.items():
            q = await self._quota_row(s, org_id, resource)
            q.limit = limit
        await s.flush()
        await self.events.quota_updated(s, org_id, limits, actor)
