"""HTTP routes of the user service: parse, authorize, call the domain, shape the response."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Request, Response, status
from fastapi.responses import JSONResponse

from services.user import schemas as sch
from services.user.service import Refused, UserService
from workbench.app import problem
from workbench.deps import SessionDep
from workbench.identity.deps import PrincipalDep, require
from workbench.identity.principal import Principal
from workbench.internal import InternalDep
from workbench.problems import PROBLEM_RESPONSES
from workbench.schemas import CursorQuery, LimitQuery, Page

auth = APIRouter(prefix="/api/v1/auth", tags=["auth"], responses=PROBLEM_RESPONSES)
orgs = APIRouter(prefix="/api/v1/orgs", tags=["orgs"], responses=PROBLEM_RESPONSES)
projects = APIRouter(prefix="/api/v1/projects", tags=["projects"], responses=PROBLEM_RESPONSES)
keys = APIRouter(prefix="/api/v1/api-keys", tags=["api-keys"], responses=PROBLEM_RESPONSES)
wellknown = APIRouter(tags=["auth"])
internal = APIRouter(prefix="/internal/v1", tags=["internal"], include_in_schema=False,
                     dependencies=[InternalDep])


def svc(request: Request) -> UserService:
    service: UserService = request.app.state.user_service
    return service


def refused(r: Refused) -> JSONResponse:
    e = r.error
    return problem(e.status, e.code, e.title, e.detail, headers=e.headers)


# ---- auth -----------------------------------------------------------------------------------

@auth.post("/register", status_code=201, response_model=sch.RegisterResponse,
           summary="Create an account and its personal organization")
async def register(body: sch.RegisterRequest, s: SessionDep, request: Request) -> Any:
    user, org = await svc(request).register(
        s, email=body.email, username=body.username, password=body.password,
        display_name=body.display_name)
    return {"user": user, "org": org}


@auth.post("/login", response_model=sch.TokenPair, summary="Sign in with email and password",
           description="Returns a short-lived access token and a rotating refresh token.")
async def login(body: sch.LoginRequest, s: SessionDep, request: Request) -> Any:
    result = await svc(request).login(s, login=body.email, password=body.password,
                                      org_id=body.org_id)
    return refused(result) if isinstance(result, Refused) else result


@auth.post("/refresh", response_model=sch.TokenPair,
           summary="Rotate a refresh token (optionally switching organization)",
           description="Each refresh token works once. Presenting a spent one revokes the "
                       "whole session (all tokens of that login).")
async def refresh(body: sch.RefreshRequest, s: SessionDep, request: Request) -> Any:
    result = await svc(request).refresh(s, token=body.refresh_token, org_id=body.org_id)
    return refused(result) if isinstance(result, Refused) else result


@auth.post("/logout", status_code=204, summary="End the session of this refresh token")
async def logout(p: PrincipalDep, s: SessionDep, request: Request,
                 body: sch.LogoutRequest | None = None) -> Response:
    await svc(request).logout(s, p, body.refresh_token if body else None)
    return Response(status_code=204)


@auth.get("/me", response_model=sch.MeResponse, summary="The caller, its org, role and rights")
async def me(p: PrincipalDep, s: SessionDep, request: Request) -> Any:
    return await svc(request).me(s, p)


@wellknown.get("/.well-known/jwks.json", summary="Public keys that verify access tokens",
               response_description="JSON Web Key Set")
async def jwks(request: Request) -> Any:
    return await svc(request).keyring.jwks()


# ---- organizations --------------------------------------------------------------------------

def _org_with_role(org: Any, role: str) -> dict[str, Any]:
    return {**sch.OrgRead.model_validate(org).model_dump(), "role": role}


@orgs.get("", response_model=Page[sch.OrgWithRole], summary="Organizations you belong to")
async def list_orgs(p: PrincipalDep, s: SessionDep, request: Request) -> Any:
    rows = await svc(request).list_orgs(s, p)
    return {"items": [_org_with_role(o, r) for o, r in rows], "next_cursor": None}


@orgs.post("", status_code=201, response_model=sch.OrgWithRole,
           summary="Create an organization (you become its owner)")
async def create_org(body: sch.OrgCreate, p: Annotated[Principal, require("orgs:create")],
                     s: SessionDep, request: Request) -> Any:
    org = await svc(request).create_org(s, p, body.name, body.slug)
    return _org_with_role(org, "owner")


@orgs.get("/{org_id}", response_model=sch.OrgRead, summary="Get the current organization")
async def get_org(org_id: uuid.UUID, p: Annotated[Principal, require("org:read")],
                  s: SessionDep, request: Request) -> Any:
    return await svc(request).get_org(s, p, org_id)


@orgs.patch("/{org_id}", response_model=sch.OrgRead, summary="Update the organization")
async def update_org(org_id: uuid.UUID, body: sch.OrgUpdate,
                     p: Annotated[Principal, require("org:write")], s: SessionDep,
                     request: Request) -> Any:
    return await svc(request).update_org(s, p, org_id, body.model_dump(exclude_unset=True))


@orgs.delete("/{org_id}", status_code=204, summary="Delete the organization (owners only)")
async def delete_org(org_id: uuid.UUID, p: Annotated[Principal, require("org:delete")],
                     s: SessionDep, request: Request) -> Response:
    await svc(request).delete_org(s, p, org_id)
    return Response(status_code=204)


@orgs.get("/{org_id}/members", response_model=Page[sch.MemberRead], summary="List members")
async def list_members(org_id: uuid.UUID, p: Annotated[Principal, require("members:read")],
                       s: SessionDep, request: Request, limit: LimitQuery = 50,
                       cursor: CursorQuery = None) -> Any:
    items, nxt = await svc(request).list_members(s, p, org_id, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": nxt}


@orgs.post("/{org_id}/members", status_code=201, response_model=sch.MemberRead,
           summary="Add a registered user as a member")
async def add_member(org_id: uuid.UUID, body: sch.MemberAdd,
                     p: Annotated[Principal, require("members:write")], s: SessionDep,
                     request: Request) -> Any:
    return await svc(request).add_member(s, p, org_id, body.email, body.role)


@orgs.patch("/{org_id}/members/{user_id}", response_model=sch.MemberRead,
            summary="Change a member's role")
async def change_member(org_id: uuid.UUID, user_id: uuid.UUID, body: sch.MemberUpdate,
                        p: Annotated[Principal, require("members:write")], s: SessionDep,
                        request: Request) -> Any:
    return await svc(request).change_member_role(s, p, org_id, user_id, body.role)


@orgs.delete("/{org_id}/members/{user_id}", status_code=204,
             summary="Remove a member (or leave, with your own id)")
async def remove_member(org_id: uuid.UUID, user_id: uuid.UUID, p: PrincipalDep, s: SessionDep,
                        request: Request) -> Response:
    await svc(request).remove_member(s, p, org_id, user_id)
    return Response(status_code=204)


@orgs.get("/{org_id}/quotas", response_model=list[sch.QuotaRead],
          summary="Quota limits and usage of the organization")
async def get_quotas(org_id: uuid.UUID, p: Annotated[Principal, require("org:read")],
                     s: SessionDep, request: Request) -> Any:
    return await svc(request).quotas(s, p, org_id)


# ---- projects -------------------------------------------------------------------------------

@projects.get("", response_model=Page[sch.ProjectRead], summary="List projects")
async def list_projects(p: Annotated[Principal, require("projects:read")], s: SessionDep,
                        request: Request, limit: LimitQuery = 50,
                        cursor: CursorQuery = None) -> Any:
    items, nxt = await svc(request).list_projects(s, p, limit=limit, cursor=cursor)
    return {"items": items, "next_cursor": nxt}


@projects.post("", status_code=201, response_model=sch.ProjectRead, summary="Create a project")
async def create_project(body: sch.ProjectCreate,
                         p: Annotated[Principal, require("projects:write")], s: SessionDep,
                         request: Request) -> Any:
    return await svc(request).create_project(s, p, name=body.name, slug=body.slug,
                                             description=body.description,
                                             settings=body.settings)


@projects.get("/{project_id}", response_model=sch.ProjectRead, summary="Get a project")
async def get_project(project_id: uuid.UUID, p: Annotated[Principal, require("projects:read")],
                      s: SessionDep, request: Request) -> Any:
    return await svc(request).get_project(s, p, project_id)


@projects.patch("/{project_id}", response_model=sch.ProjectRead, summary="Update a project")
async def update_project(project_id: uuid.UUID, body: sch.ProjectUpdate,
                         p: Annotated[Principal, require("projects:write")], s: SessionDep,
                         request: Request) -> Any:
    return await svc(request).update_project(s, p, project_id,
                                             body.model_dump(exclude_unset=True))


@projects.delete("/{project_id}", status_code=204, summary="Delete a project")
async def delete_project(project_id: uuid.UUID,
                         p: Annotated[Principal, require("projects:delete")], s: SessionDep,
                         request: Request) -> Response:
    await svc(request).delete_project(s, p, project_id)
    return Response(status_code=204)


# ---- API keys -------------------------------------------------------------------------------

def _key_view(row: Any) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "prefix": f"wbk_{row.public_id}",
            "user_id": row.user_id, "scopes": row.scopes, "expires_at": row.expires_at,
            "last_used_at": row.last_used_at, "revoked_at": row.revoked_at,
            "created_at": row.created_at}


@keys.get("", response_model=Page[sch.ApiKeyRead],
          summary="List API keys (yours; admins see the org's)")
async def list_keys(p: Annotated[Principal, require("api_keys:read")], s: SessionDep,
                    request: Request, limit: LimitQuery = 50, cursor: CursorQuery = None) -> Any:
    rows, nxt = await svc(request).list_api_keys(s, p, limit=limit, cursor=cursor)
    return {"items": [_key_view(r) for r in rows], "next_cursor": nxt}


@keys.post("", status_code=201, response_model=sch.ApiKeyCreated,
           summary="Create an API key (the secret is shown once)")
async def create_key(body: sch.ApiKeyCreate, p: Annotated[Principal, require("api_keys:write")],
                     s: SessionDep, request: Request) -> Any:
    row, key = await svc(request).create_api_key(s, p, name=body.name, scopes=body.scopes,
                                                 expires_in_days=body.expires_in_days)
    return {**_key_view(row), "key": key}


@keys.get("/{key_id}", response_model=sch.ApiKeyRead, summary="Get an API key")
async def get_key(key_id: uuid.UUID, p: Annotated[Principal, require("api_keys:read")],
                  s: SessionDep, request: Request) -> Any:
    return _key_view(await svc(request).get_api_key(s, p, key_id))


@keys.delete("/{key_id}", status_code=204, summary="Revoke an API key")
async def revoke_key(key_id: uuid.UUID, p: Annotated[Principal, require("api_keys:write")],
                     s: SessionDep, request: Request) -> Response:
    await svc(request).revoke_api_key(s, p, key_id)
    return Response(status_code=204)


# ---- internal (service to service) ----------------------------------------------------------

@internal.post("/api-keys/introspect", response_model=sch.KeyIntrospection)
async def introspect(body: sch.KeyIntrospect, s: SessionDep, request: Request) -> Any:
    return await svc(request).introspect_key(s, body.key)


@internal.get("/orgs/{org_id}/projects/{project_id}", response_model=sch.ProjectRead)
async def internal_project(org_id: uuid.UUID, project_id: uuid.UUID, s: SessionDep,
                           request: Request) -> Any:
    """For services that keep things in projects: 404 unless the project is the org's."""
    return await svc(request).project_of_org(s, org_id, project_id)


@internal.post("/quotas/consume", response_model=sch.QuotaRead)
async def consume(body: sch.QuotaConsume, s: SessionDep, request: Request) -> Any:
    return await svc(request).consume(s, body.org_id, body.resource, body.amount)


@internal.post("/quotas/record", response_model=sch.QuotaRead)
async def record_usage(body: sch.QuotaConsume, s: SessionDep, request: Request) -> Any:
    """Add usage that already happened (metered after the fact, e.g. model tokens): never
    refused; the next check sees the org over its limit."""
    return await svc(request).record_usage(s, body.org_id, body.resource, body.amount)


@internal.get("/orgs/{org_id}/quotas/{resource}", response_model=sch.QuotaRead)
async def read_quota(org_id: uuid.UUID, resource: str, s: SessionDep, request: Request) -> Any:
    return await svc(request).quota_of(s, org_id, resource)


@internal.post("/quotas/release", response_model=sch.QuotaRead)
async def release(body: sch.QuotaConsume, s: SessionDep, request: Request) -> Any:
    return await svc(request).release(s, body.org_id, body.resource, body.amount)


@internal.put("/orgs/{org_id}/quotas", status_code=status.HTTP_204_NO_CONTENT)
async def set_quotas(org_id: uuid.UUID, body: sch.QuotaLimits, s: SessionDep,
                     request: Request) -> Response:
    await svc(request).set_limits(s, org_id, body.limits, actor="operator")
    return Response(status_code=204)


@internal.post("/signing-keys/rotate")
async def rotate_keys(s: SessionDep, request: Request,
                      background: BackgroundTasks) -> dict[str, str | None]:
    service = svc(request)
    kid, previous = await service.keyring.rotate(s)
    await service.events.signing_key_rotated(s, kid, previous, actor="operator")
    # Runs after the commit (the session closes before the response is sent).
    background.add_task(service.keyring.load)
    return {"kid": kid, "previous_kid": previous}


ROUTERS = [auth, orgs, projects, keys, wellknown, internal]
