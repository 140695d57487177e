"""Request and response models of the user service API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, EmailStr, Field, StringConstraints

from workbench.identity.principal import Role
from workbench.schemas import PartialUpdate, RequestModel, ResponseModel, example

Username = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{2,39}$")]
Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]
Password = Annotated[str, StringConstraints(min_length=10, max_length=256)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=255)]



class RegisterRequest(RequestModel):
    model_config = RequestModel.model_config | example(
        {"email": "ada@example.com", "username": "ada", "password": "correct horse battery",
         "display_name": "Ada Lovelace"}
    )

    email: EmailStr
    username: Username
    password: Password
    display_name: Annotated[str, StringConstraints(max_length=255)] | None = None


class LoginRequest(RequestModel):
    model_config = RequestModel.model_config | example(
        {"email": "ada@example.com", "password": "correct horse battery"}
    )

    email: Annotated[str, StringConstraints(min_length=1, max_length=255)] = Field(
        description="Email address or username"
    )
    password: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    org_id: uuid.UUID | None = Field(
        default=None, description="Organization to sign in to (default: the user's default)"
    )


class RefreshRequest(RequestModel):
    model_config = RequestModel.model_config | example({"refresh_token": "wbr_3q2…"})

    refresh_token: Annotated[str, StringConstraints(min_length=10, max_length=200)]
    org_id: uuid.UUID | None = Field(
        default=None, description="Switch to another organization the user belongs to"
    )


class LogoutRequest(RequestModel):
    """Without a refresh token, the session of the access token used is ended."""

    model_config = RequestModel.model_config | example({"refresh_token": "wbr_3q2…"})

    refresh_token: Annotated[str, StringConstraints(min_length=10, max_length=200)] | None = None


class TokenPair(BaseModel):
    model_config = example(
        {"access_token": "eyJhbGciOiJSUzI1NiIs…", "refresh_token": "wbr_3q2…",
         "token_type": "bearer", "expires_in": 300, "refresh_expires_in": 2592000,
         "org_id": "0190d7a4-…", "role": "owner"}
    )

    access_token: str
    refresh_token: str
    token_type: str = "bearer"
    expires_in: int
    refresh_expires_in: int
    org_id: uuid.UUID
    role: Role


class UserRead(ResponseModel):
    model_config = ResponseModel.model_config | example(
        {"id": "0190d7a4-…", "email": "ada@example.com", "username": "ada",
         "display_name": "Ada Lovelace", "created_at": "2026-11-23T09:00:00Z"}
    )

    id: uuid.UUID
    email: str
    username: str
    display_name: str | None
    created_at: datetime


class OrgRead(ResponseModel):
    model_config = ResponseModel.model_config | example(
        {"id": "0190d7a4-…", "name": "Acme", "slug": "acme", "plan": "free", "settings": {},
         "created_at": "2026-11-23T09:00:00Z", "updated_at": "2026-11-23T09:00:00Z"}
    )

    id: uuid.UUID
    name: str
    slug: str
    plan: str
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class OrgWithRole(OrgRead):
    role: Role


class RegisterResponse(BaseModel):
    user: UserRead
    org: OrgRead


class MembershipRead(BaseModel):
    org_id: uuid.UUID
    org_name: str
    role: Role


class MeResponse(BaseModel):
    user: UserRead
    org: OrgRead
    role: Role
    permissions: list[str]
    scopes: list[str] | None
    memberships: list[MembershipRead]


class OrgCreate(RequestModel):
    model_config = RequestModel.model_config | example({"name": "Acme Research", "slug": "acme"})

    name: Name
    slug: Slug | None = None



class OrgUpdate(PartialUpdate):
    model_config = RequestModel.model_config | example({"name": "Acme Labs"})
    _not_null = ("name", "settings")

    name: Name | None = None
    settings: dict[str, Any] | None = None


class MemberAdd(RequestModel):
    model_config = RequestModel.model_config | example(
        {"email": "bob@example.com", "role": "member"})

    email: EmailStr
    role: Role = Role.MEMBER


class MemberUpdate(RequestModel):
    role: Role


class MemberRead(BaseModel):
    user_id: uuid.UUID
    email: str
    username: str
    display_name: str | None
    role: Role
    joined_at: datetime


class ProjectCreate(RequestModel):
    model_config = RequestModel.model_config | example(
        {"name": "Support bot", "slug": "support-bot", "description": "RAG over the manuals"}
    )

    name: Name
    slug: Slug | None = None
    description: Annotated[str, StringConstraints(max_length=5000)] | None = None
    settings: dict[str, Any] = Field(default_factory=dict)


class ProjectUpdate(PartialUpdate):
    model_config = RequestModel.model_config | example(
        {"description": "RAG over manuals and SOPs"})
    _not_null = ("name", "settings")

    name: Name | None = None
    description: Annotated[str, StringConstraints(max_length=5000)] | None = None
    settings: dict[str, Any] | None = None


class ProjectRead(ResponseModel):
    id: uuid.UUID
    org_id: uuid.UUID
    owner_id: uuid.UUID
    name: str
    slug: str
    description: str | None
    settings: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class ApiKeyCreate(RequestModel):
    model_config = RequestModel.model_config | example(
        {"name": "ci pipeline", "scopes": ["data:read", "inference:execute"],
         "expires_in_days": 90}
    )

    name: Name
    scopes: list[Annotated[str, StringConstraints(pattern=r"^[a-z_]+:[a-z_]+$")]] = Field(
        min_length=1, max_length=100,
        description="Permissions the key may use; each must be one your role grants",
    )
    expires_in_days: int | None = Field(default=None, ge=1, le=3650)


class ApiKeyRead(ResponseModel):
    id: uuid.UUID
    name: str
    prefix: str
    user_id: uuid.UUID
    scopes: list[str]
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The secret key. It is shown only in this response.")


class QuotaRead(BaseModel):
    resource: str
    limit: int
    used: int


class QuotaLimits(RequestModel):
    limits: dict[Annotated[str, StringConstraints(pattern=r"^[a-z_]{2,50}$")],
                 Annotated[int, Field(ge=0)]]


class QuotaConsume(RequestModel):
    org_id: uuid.UUID
    resource: Annotated[str, StringConstraints(pattern=r"^[a-z_]{2,50}$")]
    amount: int = Field(ge=0)


class KeyIntrospect(RequestModel):
    key: Annotated[str, StringConstraints(min_length=10, max_length=300)]


class KeyIntrospection(BaseModel):
    access_token: str
    expires_in: int
    user_id: uuid.UUID
    org_id: uuid.UUID
    key_id: str
    scopes: list[str]
