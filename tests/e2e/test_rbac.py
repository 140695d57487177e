"""Roles: viewers read, members work on projects, admins manage members but not ownership or the
org's existence, owners do everything — and an org never loses its last owner."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from workbench.testing import ApiUser, add_member, register, switch_org, unique

PROBLEM = "application/problem+json"


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["code"] == code, body
    return body


def new_project(client: httpx.Client, user: ApiUser) -> dict[str, Any]:
    r = client.post("/api/v1/projects", headers=user.headers,
                    json={"name": unique("proj-"), "description": "original"})
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def members(client: httpx.Client, user: ApiUser) -> dict[str, str]:
    r = client.get(f"/api/v1/orgs/{user.org_id}/members", headers=user.headers)
    assert r.status_code == 200, r.text
    return {m["user_id"]: m["role"] for m in r.json()["items"]}


def uid(value: Any) -> uuid.UUID:
    return uuid.UUID(str(value))


# ---- viewer ----------------------------------------------------------------------------------

def test_viewer_cannot_create_a_project(platform: Any, client: httpx.Client) -> None:
    owner = register(client)
    viewer = add_member(client, owner, "viewer")
    name = unique("viewer-proj-")
    r = client.post("/api/v1/projects", headers=viewer.headers, json={"name": name})
    body = assert_problem(r, 403, "permission_denied")
    assert body["permission"] == "projects:write"
    assert platform.db_rows(f"SELECT id FROM projects WHERE name = '{name}'") == []


def test_viewer_cannot_update_a_project(client: httpx.Client) -> None:
    owner = register(client)
    viewer = add_member(client, owner, "viewer")
    project = new_project(client, owner)
    r = client.patch(f"/api/v1/projects/{project['id']}", headers=viewer.headers,
                     json={"name": "renamed by viewer", "description": "changed"})
    assert_problem(r, 403, "permission_denied")
    after = client.get(f"/api/v1/projects/{project['id']}", headers=owner.headers).json()
    assert (after["name"], after["description"]) == (project["name"], "original")


def test_viewer_cannot_delete_a_project(platform: Any, client: httpx.Client) -> None:
    owner = register(client)
    viewer = add_member(client, owner, "viewer")
    project = new_project(client, owner)
    r = client.delete(f"/api/v1/projects/{project['id']}", headers=viewer.headers)
    assert_problem(r, 403, "permission_denied")
    assert len(platform.db_rows(
        f"SELECT id FROM projects WHERE name = '{project['name']}'")) == 1


def test_viewer_can_read_projects(client: httpx.Client) -> None:
    owner = register(client)
    viewer = add_member(client, owner, "viewer")
    project = new_project(client, owner)
    one = client.get(f"/api/v1/projects/{project['id']}", headers=viewer.headers)
    assert one.status_code == 200, one.text
    assert one.json()["name"] == project["name"]
    listed = client.get("/api/v1/projects", headers=viewer.headers)
    assert listed.status_code == 200, listed.text
    assert [p["id"] for p in listed.json()["items"]] == [project["id"]]


# ---- member ----------------------------------------------------------------------------------

def test_member_can_create_a_project_in_the_org(platform: Any, client: httpx.Client) -> None:
    owner = register(client)
    member = add_member(client, owner, "member")
    project = new_project(client, member)
    assert project["org_id"] == owner.org_id and project["owner_id"] == member.user_id
    rows = platform.db_rows(
        f"SELECT org_id, owner_id FROM projects WHERE name = '{project['name']}'")
    assert [(uid(o), uid(w)) for o, w in rows] == [(uid(owner.org_id), uid(member.user_id))]


def test_member_cannot_add_a_member(client: httpx.Client) -> None:
    owner = register(client)
    member = add_member(client, owner, "member")
    outsider = register(client)
    r = client.post(f"/api/v1/orgs/{owner.org_id}/members", headers=member.headers,
                    json={"email": outsider.email, "role": "viewer"})
    assert_problem(r, 403, "permission_denied")
    assert outsider.user_id not in members(client, owner)


def test_member_cannot_remove_another_member(client: httpx.Client) -> None:
    owner = register(client)
    member = add_member(client, owner, "member")
    other = add_member(client, owner, "viewer")
    r = client.delete(f"/api/v1/orgs/{owner.org_id}/members/{other.user_id}",
                      headers=member.headers)
    assert_problem(r, 403, "permission_denied")
    assert members(client, owner)[other.user_id] == "viewer"


def test_member_cannot_change_roles(client: httpx.Client) -> None:
    owner = register(client)
    member = add_member(client, owner, "member")
    other = add_member(client, owner, "viewer")
    for target, role in ((other, "admin"), (member, "admin"), (owner, "viewer")):
        r = client.patch(f"/api/v1/orgs/{owner.org_id}/members/{target.user_id}",
                         headers=member.headers, json={"role": role})
        assert_problem(r, 403, "permission_denied")
    assert members(client, owner) == {owner.user_id: "owner", member.user_id: "member",
                                      other.user_id: "viewer"}


# ---- admin -----------------------------------------------------------------------------------

def test_admin_cannot_delete_the_org(platform: Any, client: httpx.Client) -> None:
    owner = register(client)
    admin = add_member(client, owner, "admin")
    r = client.delete(f"/api/v1/orgs/{owner.org_id}", headers=admin.headers)
    body = assert_problem(r, 403, "permission_denied")
    assert body["permission"] == "org:delete"
    org = client.get(f"/api/v1/orgs/{owner.org_id}", headers=owner.headers)
    assert org.status_code == 200, org.text
    assert len(platform.db_rows(
        f"SELECT id FROM organizations WHERE slug = '{org.json()['slug']}'")) == 1


def test_admin_cannot_add_a_member_as_owner(client: httpx.Client) -> None:
    owner = register(client)
    admin = add_member(client, owner, "admin")
    outsider = register(client)
    r = client.post(f"/api/v1/orgs/{owner.org_id}/members", headers=admin.headers,
                    json={"email": outsider.email, "role": "owner"})
    assert_problem(r, 403, "permission_denied")
    assert outsider.user_id not in members(client, owner)


def test_admin_cannot_promote_anyone_to_owner(client: httpx.Client) -> None:
    owner = register(client)
    admin = add_member(client, owner, "admin")
    member = add_member(client, owner, "member")
    for target in (member, admin):
        r = client.patch(f"/api/v1/orgs/{owner.org_id}/members/{target.user_id}",
                         headers=admin.headers, json={"role": "owner"})
        assert_problem(r, 403, "permission_denied")
    assert members(client, owner) == {owner.user_id: "owner", admin.user_id: "admin",
                                      member.user_id: "member"}


def test_admin_cannot_demote_or_remove_an_owner(client: httpx.Client) -> None:
    owner = register(client)
    admin = add_member(client, owner, "admin")
    r = client.patch(f"/api/v1/orgs/{owner.org_id}/members/{owner.user_id}",
                     headers=admin.headers, json={"role": "viewer"})
    assert_problem(r, 403, "permission_denied")
    r = client.delete(f"/api/v1/orgs/{owner.org_id}/members/{owner.user_id}",
                      headers=admin.headers)
    assert_problem(r, 403, "permission_denied")
    assert members(client, owner)[owner.user_id] == "owner"


def test_admin_can_add_and_remove_members(client: httpx.Client) -> None:
    owner = register(client)
    admin = add_member(client, owner, "admin")
    outsider = register(client)
    r = client.post(f"/api/v1/orgs/{owner.org_id}/members", headers=admin.headers,
                    json={"email": outsider.email, "role": "member"})
    assert r.status_code == 201, r.text
    assert members(client, owner)[outsider.user_id] == "member"
    r = client.delete(f"/api/v1/orgs/{owner.org_id}/members/{outsider.user_id}",
                      headers=admin.headers)
    assert r.status_code == 204, r.text
    assert outsider.user_id not in members(client, owner)


# ---- owner -----------------------------------------------------------------------------------

def test_owner_can_delete_the_org(platform: Any, client: httpx.Client) -> None:
    owner = register(client)
    org = client.post("/api/v1/orgs", headers=owner.headers, json={"name": unique("doomed-")})
    assert org.status_code == 201, org.text
    org_id, slug = org.json()["id"], org.json()["slug"]
    owner = switch_org(client, owner, org_id)
    member = add_member(client, owner, "member")
    project = new_project(client, owner)
    r = client.delete(f"/api/v1/orgs/{org_id}", headers=owner.headers)
    assert r.status_code == 204, r.text
    assert platform.db_rows(f"SELECT id FROM organizations WHERE slug = '{slug}'") == []
    assert platform.db_rows(f"SELECT id FROM projects WHERE name = '{project['name']}'") == []
    orphans = platform.db_rows(
        "SELECT m.id FROM memberships m JOIN users u ON u.id = m.user_id "
        f"WHERE u.email = '{member.email}'")
    assert len(orphans) == 1  # only the member's own personal org is left
    listed = client.get("/api/v1/orgs", headers=owner.headers)
    assert listed.status_code == 200, listed.text
    assert org_id not in [o["id"] for o in listed.json()["items"]]


def test_last_owner_cannot_be_demoted(client: httpx.Client) -> None:
    owner = register(client)
    r = client.patch(f"/api/v1/orgs/{owner.org_id}/members/{owner.user_id}",
                     headers=owner.headers, json={"role": "admin"})
    assert_problem(r, 409, "last_owner")
    assert members(client, owner) == {owner.user_id: "owner"}


def test_last_owner_cannot_leave_the_org(client: httpx.Client) -> None:
    owner = register(client)
    add_member(client, owner, "admin")
    r = client.delete(f"/api/v1/orgs/{owner.org_id}/members/{owner.user_id}",
                      headers=owner.headers)
    assert_problem(r, 409, "last_owner")
    assert members(client, owner)[owner.user_id] == "owner"


def test_owner_can_step_down_once_another_owner_exists(client: httpx.Client) -> None:
    owner = register(client)
    second = add_member(client, owner, "owner")
    r = client.patch(f"/api/v1/orgs/{owner.org_id}/members/{owner.user_id}",
                     headers=owner.headers, json={"role": "admin"})
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "admin"
    assert members(client, second) == {owner.user_id: "admin", second.user_id: "owner"}


# ---- leaving ---------------------------------------------------------------------------------

def test_member_can_leave_the_org(platform: Any, client: httpx.Client) -> None:
    owner = register(client)
    member = add_member(client, owner, "member")
    r = client.delete(f"/api/v1/orgs/{owner.org_id}/members/{member.user_id}",
                      headers=member.headers)
    assert r.status_code == 204, r.text
    assert member.user_id not in members(client, owner)
    rows = platform.db_rows(
        "SELECT m.org_id FROM memberships m JOIN users u ON u.id = m.user_id "
        f"WHERE u.email = '{member.email}'")
    assert uid(owner.org_id) not in [uid(o) for (o,) in rows]
