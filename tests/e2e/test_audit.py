"""The audit log through the gateway, in both run modes: every platform event becomes a record in
its organization's hash chain with the right actor, action and details; records are searchable,
verifiable (tampering and gaps are found), exportable, summarised, archived by retention, and
readable only by those allowed to, only within their own organization."""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

import tests.e2e.test_events_published as events_published
from tests.conftest import Platform
from tests.e2e.test_bad_input import assert_problem
from tests.e2e.test_events_published import exercise_every_change
from workbench.storage import S3ObjectStore
from workbench.testing import ApiUser, add_member, login, register, unique

AUDIT = "/api/v1/audit"
DEADLINE_S = 10.0
GENESIS = "0" * 64
CSV_HEADER = ("id,seq,occurred_at,recorded_at,action,actor,resource_type,resource_id,"
              "event_type,status,ip,request_id,trace_id,details,hash")

# How records.py reads each user-service event type: (action, resource_type).
USER_EVENT_MAPPING: dict[str, tuple[str, str]] = {
    "wb.user.user.registered": ("create", "user.user"),
    "wb.user.user.logged_in": ("login", "user.user"),
    "wb.user.user.logged_out": ("logout", "user.user"),
    "wb.user.login.failed": ("login_failed", "user.login"),
    "wb.user.refresh_token.reuse_detected": ("security", "user.refresh_token"),
    "wb.user.org.created": ("create", "user.org"),
    "wb.user.org.updated": ("update", "user.org"),
    "wb.user.org.deleted": ("delete", "user.org"),
    "wb.user.member.added": ("create", "user.member"),
    "wb.user.member.role_changed": ("update", "user.member"),
    "wb.user.member.removed": ("delete", "user.member"),
    "wb.user.project.created": ("create", "user.project"),
    "wb.user.project.updated": ("update", "user.project"),
    "wb.user.project.deleted": ("delete", "user.project"),
    "wb.user.api_key.created": ("create", "user.api_key"),
    "wb.user.api_key.revoked": ("delete", "user.api_key"),
    "wb.user.quota.updated": ("update", "user.quota"),
    "wb.user.signing_key.rotated": ("update", "user.signing_key"),
}
# Events of the owner's own org in `exercise_every_change`, with how many of each.
OWNER_ORG_EVENTS: Counter[str] = Counter({
    "wb.user.org.created": 1,
    "wb.user.member.added": 2,  # the owner at registration, then the member
    "wb.user.user.registered": 1,
    "wb.user.user.logged_in": 1,
    "wb.user.login.failed": 1,
    "wb.user.member.role_changed": 1,
    "wb.user.member.removed": 1,
    "wb.user.org.updated": 1,
    "wb.user.project.created": 1,
    "wb.user.project.updated": 1,
    "wb.user.project.deleted": 1,
    "wb.user.api_key.created": 1,
    "wb.user.api_key.revoked": 1,
    "wb.user.refresh_token.reuse_detected": 1,
    "wb.user.quota.updated": 1,
})
# Of those, the ones a person did through a request.
USER_ACTED = set(OWNER_ORG_EVENTS) - {"wb.user.refresh_token.reuse_detected",
                                      "wb.user.quota.updated"}


# ---- helpers -----------------------------------------------------------------------------------

def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def records(client: httpx.Client, headers: dict[str, str], *, limit: int = 200,
            **params: Any) -> list[dict[str, Any]]:
    """Every record matching `params`, following next_cursor to the end (newest first)."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        r = client.get(f"{AUDIT}/records", params=query, headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items


def wait_records(client: httpx.Client, headers: dict[str, str],
                 ready: Callable[[list[dict[str, Any]]], bool], what: str,
                 **params: Any) -> list[dict[str, Any]]:
    """Events reach the audit log asynchronously: poll until `ready(records)` holds."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        items = records(client, headers, **params)
        if ready(items):
            return items
        if time.monotonic() > deadline:
            seen = Counter(r["event_type"] for r in items)
            pytest.fail(f"within {DEADLINE_S}s the audit log never had {what}; it has {seen}")
        time.sleep(0.2)


def wait_types(client: httpx.Client, user: ApiUser,
               expected: Counter[str] | dict[str, int]) -> list[dict[str, Any]]:
    """Wait until the org's records include at least `expected[type]` records of each type."""
    def ready(items: list[dict[str, Any]]) -> bool:
        seen = Counter(r["event_type"] for r in items)
        return all(seen[t] >= n for t, n in expected.items())

    return wait_records(client, user.headers, ready, f"records {dict(expected)}")


def of_type(items: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    return [r for r in items if r["event_type"] == event_type]


def one(items: list[dict[str, Any]], event_type: str) -> dict[str, Any]:
    found = of_type(items, event_type)
    assert len(found) == 1, (event_type, found)
    return found[0]


def chain_head(platform: Platform, org_id: str) -> int:
    rows = platform.db_rows(
        f"SELECT last_seq FROM audit_chain_heads WHERE chain = '{org_id}'", service="audit")
    return int(rows[0][0]) if rows else 0


def settle(platform: Platform, org_id: str, quiet_s: float = 1.0) -> int:
    """Wait (reading the database, which adds no access records) until the org's chain stops
    growing; returns its last seq."""
    deadline = time.monotonic() + DEADLINE_S
    last, since = chain_head(platform, org_id), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"the chain of org {org_id} never stopped growing"
        time.sleep(0.1)
        now = chain_head(platform, org_id)
        if now != last:
            last, since = now, time.monotonic()
    return last


def stored_records(platform: Platform, org_id: str) -> list[tuple[str, int]]:
    """(id as the API shows it, seq) of every stored record of the org's chain, by seq."""
    rows = platform.db_rows(
        f"SELECT id, seq FROM audit_records WHERE chain = '{org_id}' ORDER BY seq",
        service="audit")
    return [(str(uuid.UUID(str(i))), int(s)) for i, s in rows]


def sql_id(platform: Platform, record_id: str) -> str:
    """A record id as a SQL literal: SQLite stores 32 hex digits, PostgreSQL a uuid."""
    if platform.mode == "embedded":
        return f"'{uuid.UUID(record_id).hex}'"
    return f"'{record_id}'::uuid"


def verify(client: httpx.Client, user: ApiUser) -> dict[str, Any]:
    r = client.get(f"{AUDIT}/verify", headers=user.headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def create_project(client: httpx.Client, user: ApiUser, name: str) -> dict[str, Any]:
    r = client.post("/api/v1/projects", json={"name": name}, headers=user.headers)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def create_key(client: httpx.Client, user: ApiUser, scopes: list[str]) -> str:
    r = client.post("/api/v1/api-keys", json={"name": unique("key"), "scopes": scopes},
                    headers=user.headers)
    assert r.status_code == 201, r.text
    key: str = r.json()["key"]
    return key


def ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def same_instants(record: dict[str, Any]) -> dict[str, Any]:
    """A record with its timestamps parsed: the API writes `Z`, the export `+00:00`."""
    return {**record, "occurred_at": ts(record["occurred_at"]),
            "recorded_at": ts(record["recorded_at"])}


def user_outbox(platform: Platform, org_id: str) -> list[dict[str, Any]]:
    """The envelopes the user service emitted for an org: what the audit log must hold."""
    rows = platform.db_rows("SELECT payload FROM wb_outbox")
    envelopes = [orjson.loads(bytes(p)) for (p,) in rows]
    return [e for e in envelopes if e["org_id"] == org_id]


# ---- the org that went through every user-service change ---------------------------------------

@dataclass
class Exercised:
    owner: ApiUser
    org_id: str
    records: list[dict[str, Any]]  # the org's records once every expected one arrived
    project_name: str  # of a project created afterwards, for free-text search


@pytest.fixture(scope="module")
def exercised(platform: Platform) -> Exercised:
    owners: list[ApiUser] = []

    def capture(client: httpx.Client, **kw: Any) -> ApiUser:
        user = register(client, **kw)
        owners.append(user)
        return user

    with platform.client() as c:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(events_published, "register", capture)
            org_id = exercise_every_change(c, platform)
        first = owners[0]
        assert first.org_id == org_id
        # The owner's refresh family was revoked by the reuse: sign in again.
        owner = login(c, first.email, first.password, user_id=first.user_id, org_id=org_id)
        name = unique("Ledger ")
        create_project(c, owner, name)
        expected = OWNER_ORG_EVENTS + Counter({"wb.user.project.created": 1,
                                               "wb.user.user.logged_in": 1})
        items = wait_types(c, owner, expected)
    return Exercised(owner, org_id, items, name)


def test_every_user_event_of_the_org_is_recorded_with_its_actor_request_and_data(
    platform: Platform, exercised: Exercised
) -> None:
    by_event = {r["event_id"]: r for r in exercised.records}
    envelopes = user_outbox(platform, exercised.org_id)
    assert Counter(e["type"] for e in envelopes) >= OWNER_ORG_EVENTS
    for e in envelopes:
        record = by_event.get(e["id"])
        assert record is not None, f"event {e['type']} {e['id']} has no audit record"
        assert record["event_type"] == e["type"]
        assert record["org_id"] == exercised.org_id
        assert record["actor"] == e["actor"]
        assert record["resource_id"] == e["subject"]
        assert record["request_id"] == e["request_id"]
        assert record["details"] == e["data"]
        assert ts(record["occurred_at"]) == ts(e["time"])
    owner_actor = f"user:{exercised.owner.user_id}"
    for t in USER_ACTED:
        for record in of_type(exercised.records, t):
            assert record["actor"] == owner_actor, record
            assert record["request_id"], record
    assert one(exercised.records, "wb.user.refresh_token.reuse_detected")["actor"] == "system"
    assert one(exercised.records, "wb.user.quota.updated")["actor"] == "operator"
    failed = one(exercised.records, "wb.user.login.failed")
    assert failed["details"] == {"email": exercised.owner.email, "reason": "invalid_credentials"}


def test_records_map_event_types_to_actions_and_resource_types(exercised: Exercised) -> None:
    for t in OWNER_ORG_EVENTS:
        for record in of_type(exercised.records, t):
            assert (record["action"], record["resource_type"]) == USER_EVENT_MAPPING[t], record


def test_records_of_other_orgs_and_the_platform_stay_out_of_the_org_chain(
    exercised: Exercised,
) -> None:
    types = {r["event_type"] for r in exercised.records}
    # The second org's life (created, signed into, out of, deleted) and the key rotation
    # belong to other chains.
    assert "wb.user.org.deleted" not in types
    assert "wb.user.user.logged_out" not in types
    assert "wb.user.signing_key.rotated" not in types
    assert {r["org_id"] for r in exercised.records} == {exercised.org_id}


def test_gateway_requests_of_the_org_are_recorded_as_access_records(
    exercised: Exercised,
) -> None:
    access = of_type(exercised.records, "wb.gateway.access.recorded")
    created = [r for r in access if r["details"]["method"] == "POST"
               and r["details"]["path"] == "/api/v1/projects"]
    assert created, "no access record of POST /api/v1/projects"
    r = created[0]
    assert (r["action"], r["resource_type"], r["status"]) == ("create", "http:user", 201)
    assert r["actor"] == f"user:{exercised.owner.user_id}"
    assert r["request_id"] and r["resource_id"] == "/api/v1/projects"


def test_one_record_reads_the_same_as_in_search(client: httpx.Client,
                                                exercised: Exercised) -> None:
    record = one(exercised.records, "wb.user.org.updated")
    r = client.get(f"{AUDIT}/records/{record['id']}", headers=exercised.owner.headers)
    assert r.status_code == 200, r.text
    assert r.json() == record


def test_paging_with_the_cursor_visits_every_record_once_newest_first(
    client: httpx.Client, exercised: Exercised
) -> None:
    until = exercised.records[0]["occurred_at"]  # a fixed set while new records arrive
    whole = records(client, exercised.owner.headers, until=until)
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3, "until": until}
        if cursor:
            params["cursor"] = cursor
        r = client.get(f"{AUDIT}/records", params=params, headers=exercised.owner.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert cursor == body["items"][-1]["id"]
    assert len(pages) >= 5
    assert all(len(p) == 3 for p in pages[:-1]) and 1 <= len(pages[-1]) <= 3
    ids = [r["id"] for page in pages for r in page]
    assert len(ids) == len(set(ids))
    assert ids == [r["id"] for r in whole]
    assert ids == sorted(ids, reverse=True)


def test_filter_by_actor_returns_only_that_actors_records(client: httpx.Client,
                                                          exercised: Exercised) -> None:
    h = exercised.owner.headers
    system = records(client, h, actor="system")
    assert [r["event_type"] for r in system] == ["wb.user.refresh_token.reuse_detected"]
    owner_actor = f"user:{exercised.owner.user_id}"
    mine = records(client, h, actor=owner_actor)
    assert mine and all(r["actor"] == owner_actor for r in mine)
    expected = {r["id"] for r in exercised.records if r["actor"] == owner_actor}
    assert expected <= {r["id"] for r in mine}


def test_filter_by_action_returns_only_that_action(client: httpx.Client,
                                                   exercised: Exercised) -> None:
    failed = records(client, exercised.owner.headers, action="login_failed")
    assert [r["event_type"] for r in failed] == ["wb.user.login.failed"]
    deletes = records(client, exercised.owner.headers, action="delete")
    assert {r["event_type"] for r in deletes} >= {
        "wb.user.member.removed", "wb.user.project.deleted", "wb.user.api_key.revoked"}
    assert all(r["action"] == "delete" for r in deletes)


def test_filter_by_resource_type_returns_only_that_resource(client: httpx.Client,
                                                            exercised: Exercised) -> None:
    found = records(client, exercised.owner.headers, resource_type="user.project")
    assert Counter(r["event_type"] for r in found) == Counter({
        "wb.user.project.created": 2, "wb.user.project.updated": 1,
        "wb.user.project.deleted": 1})


def test_filter_by_event_type_returns_only_that_type(client: httpx.Client,
                                                     exercised: Exercised) -> None:
    found = records(client, exercised.owner.headers, event_type="wb.user.member.added")
    assert len(found) == 2 and {r["event_type"] for r in found} == {"wb.user.member.added"}
    assert {r["details"]["role"] for r in found} == {"owner", "member"}


def test_since_is_inclusive_and_until_exclusive(client: httpx.Client,
                                                exercised: Exercised) -> None:
    created = next(r for r in of_type(exercised.records, "wb.user.project.created")
                   if r["details"]["name"] == "Events")
    deleted = one(exercised.records, "wb.user.project.deleted")
    found = records(client, exercised.owner.headers, resource_type="user.project",
                    since=created["occurred_at"], until=deleted["occurred_at"])
    assert [r["event_type"] for r in found] == ["wb.user.project.updated",
                                                 "wb.user.project.created"]
    assert [r["id"] for r in found][-1] == created["id"]
    window = records(client, exercised.owner.headers, since=created["occurred_at"],
                     until=deleted["occurred_at"])
    assert window
    for r in window:
        assert ts(created["occurred_at"]) <= ts(r["occurred_at"]) < ts(deleted["occurred_at"])


def test_free_text_search_finds_the_project_by_name(client: httpx.Client,
                                                    exercised: Exercised) -> None:
    found = records(client, exercised.owner.headers, q=exercised.project_name.upper())
    assert [(r["event_type"], r["details"]["name"]) for r in found] == [
        ("wb.user.project.created", exercised.project_name)]
    events_project = records(client, exercised.owner.headers, q="Events",
                             event_type="wb.user.project.created")
    assert [r["details"]["name"] for r in events_project] == ["Events"]


def test_free_text_search_treats_like_wildcards_literally(client: httpx.Client,
                                                          exercised: Exercised) -> None:
    assert records(client, exercised.owner.headers, q="%_") == []


# ---- verification ------------------------------------------------------------------------------

def test_verify_walks_the_whole_chain(client: httpx.Client, platform: Platform) -> None:
    owner = register(client)
    create_project(client, owner, unique("Chain "))
    wait_types(client, owner, {"wb.user.project.created": 1})
    settle(platform, owner.org_id)
    result = verify(client, owner)
    stored = stored_records(platform, owner.org_id)
    stored = [s for s in stored if s[1] <= result["last_seq"]]
    assert result == {"ok": True, "checked": len(stored), "first_broken": None,
                      "last_seq": len(stored), "anchor_seq": 0}
    assert [s for _, s in stored] == list(range(1, len(stored) + 1))


def test_verify_holds_while_records_are_being_written(client: httpx.Client,
                                                     platform: Platform) -> None:
    """Records keep arriving (here: access records of another client's requests) while the
    chain is verified; an intact chain must verify every time."""
    owner = register(client)
    stop = threading.Event()

    def busy() -> None:
        with platform.client() as other:
            while not stop.is_set():
                other.get("/api/v1/projects", headers=owner.headers)

    workers = [threading.Thread(target=busy, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    results: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            results.append(verify(client, owner))
    finally:
        stop.set()
        for w in workers:
            w.join()
    broken = [(i, r) for i, r in enumerate(results) if not r["ok"]]
    assert not broken, (f"{len(broken)} of {len(results)} verifications of an intact chain "
                        f"failed, first: {broken[:2]}")
    assert results[-1]["checked"] > results[0]["checked"]
    settle(platform, owner.org_id)
    assert verify(client, owner)["ok"] is True


def test_changing_a_stored_record_is_found_at_that_record(client: httpx.Client,
                                                          platform: Platform) -> None:
    owner = register(client)
    create_project(client, owner, unique("Tamper "))
    create_project(client, owner, unique("After "))
    items = wait_types(client, owner, {"wb.user.project.created": 2})
    target = min(of_type(items, "wb.user.project.created"), key=lambda r: r["seq"])
    settle(platform, owner.org_id)
    assert verify(client, owner)["ok"] is True
    platform.db_execute(
        "UPDATE audit_records SET details = '{\"name\": \"forged\"}' "
        f"WHERE id = {sql_id(platform, target['id'])}", service="audit")
    r = client.get(f"{AUDIT}/records/{target['id']}", headers=owner.headers)
    assert r.json()["details"] == {"name": "forged"}
    result = verify(client, owner)
    assert result["ok"] is False
    assert result["checked"] == target["seq"] - 1
    broken = result["first_broken"]
    assert (broken["id"], broken["seq"]) == (target["id"], target["seq"])
    assert "changed" in broken["reason"]


def test_deleting_a_record_in_the_middle_is_found_at_the_next_record(
    client: httpx.Client, platform: Platform
) -> None:
    owner = register(client)
    create_project(client, owner, unique("Gap "))
    create_project(client, owner, unique("After "))
    items = wait_types(client, owner, {"wb.user.project.created": 2})
    target = min(of_type(items, "wb.user.project.created"), key=lambda r: r["seq"])
    following = next(r for r in items if r["seq"] == target["seq"] + 1)
    platform.db_execute(
        f"DELETE FROM audit_records WHERE id = {sql_id(platform, target['id'])}",
        service="audit")
    result = verify(client, owner)
    assert result["ok"] is False
    assert result["checked"] == target["seq"] - 1
    broken = result["first_broken"]
    assert (broken["id"], broken["seq"]) == (following["id"], following["seq"])
    assert "missing" in broken["reason"]


def test_deleting_the_last_record_is_found(client: httpx.Client, platform: Platform) -> None:
    owner = register(client)
    create_project(client, owner, unique("Tail "))
    wait_types(client, owner, {"wb.user.project.created": 1})
    last = settle(platform, owner.org_id)
    stored = stored_records(platform, owner.org_id)
    assert stored[-1][1] == last
    platform.db_execute(
        f"DELETE FROM audit_records WHERE id = {sql_id(platform, stored[-1][0])}",
        service="audit")
    result = verify(client, owner)
    assert result["ok"] is False
    assert result["checked"] == last - 1
    assert result["first_broken"]["id"] is None
    assert result["first_broken"]["seq"] == last
    assert "end" in result["first_broken"]["reason"]


# ---- export ------------------------------------------------------------------------------------

def test_export_streams_csv_and_jsonl_rows_matching_the_records(client: httpx.Client,
                                                                platform: Platform) -> None:
    owner = register(client)
    create_project(client, owner, unique("Export, \"quoted\" "))
    wait_types(client, owner, {"wb.user.project.created": 1})
    settle(platform, owner.org_id)
    until = datetime.now(UTC).isoformat()
    expected = {r["id"]: r for r in records(client, owner.headers, until=until)}
    assert len(expected) >= 5

    with client.stream("GET", f"{AUDIT}/export", params={"format": "csv", "until": until},
                       headers=owner.headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        assert r.headers["content-disposition"].endswith('.csv"')
        csv_body = b"".join(r.iter_bytes()).decode()
    lines = csv_body.split("\n")
    assert lines[0] == CSV_HEADER
    rows = list(csv.DictReader(io.StringIO(csv_body)))
    assert [row["id"] for row in rows] == sorted(expected, key=lambda i: expected[i]["seq"])
    assert [int(row["seq"]) for row in rows] == sorted(r["seq"] for r in expected.values())
    for row in rows:
        record = expected[row["id"]]
        assert orjson.loads(row["details"]) == record["details"]
        assert (row["event_type"], row["action"], row["actor"], row["hash"]) == (
            record["event_type"], record["action"], record["actor"], record["hash"])
        assert row["request_id"] == (record["request_id"] or "")

    with client.stream("GET", f"{AUDIT}/export", params={"format": "jsonl", "until": until},
                       headers=owner.headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        jsonl = [orjson.loads(line) for line in b"".join(r.iter_bytes()).splitlines()]
    assert [x["seq"] for x in jsonl] == sorted(r["seq"] for r in expected.values())
    assert {x["id"]: same_instants(x) for x in jsonl} == {
        i: same_instants(r) for i, r in expected.items()}


def test_exports_are_audited_and_counted_in_the_summary(client: httpx.Client,
                                                        platform: Platform) -> None:
    owner = register(client)
    until = datetime.now(UTC).isoformat()
    for fmt in ("csv", "jsonl"):
        r = client.get(f"{AUDIT}/export", params={"format": fmt, "until": until},
                       headers=owner.headers)
        assert r.status_code == 200, r.text
    items = wait_types(client, owner, {"wb.audit.export.created": 2})
    exports = sorted(of_type(items, "wb.audit.export.created"), key=lambda r: r["seq"])
    assert [r["details"] for r in exports] == [
        {"format": "csv", "filters": {"until": until}},
        {"format": "jsonl", "filters": {"until": until}}]
    for record in exports:
        assert record["actor"] == f"user:{owner.user_id}"
        assert record["request_id"]
        assert (record["action"], record["resource_type"]) == ("create", "audit.export")
    r = client.get(f"{AUDIT}/summary", headers=owner.headers)
    assert r.status_code == 200, r.text
    assert r.json()["data_exports"] == 2


# ---- summary -----------------------------------------------------------------------------------

def test_summary_counts_failed_logins_and_denials_consistently_with_the_records(
    client: httpx.Client, platform: Platform
) -> None:
    owner = register(client)
    for _ in range(3):
        r = client.post("/api/v1/auth/login",
                        json={"email": owner.email, "password": "not the password"})
        assert r.status_code == 401
    member = add_member(client, owner, "member")
    assert client.get(f"{AUDIT}/summary", headers=member.headers).status_code == 403
    wait_records(client, owner.headers,
                 lambda items: len(of_type(items, "wb.user.login.failed")) == 3
                 and any(r["status"] == 403 for r in items), "3 failed logins and a denial")
    settle(platform, owner.org_id)
    r = client.get(f"{AUDIT}/summary", headers=owner.headers)
    assert r.status_code == 200, r.text
    summary = r.json()
    assert ts(summary["until"]) - ts(summary["since"]) == timedelta(days=30)
    assert summary["failed_logins"] == 3
    assert summary["permission_denials"] == 1
    assert summary["data_exports"] == 0
    period = records(client, owner.headers, since=summary["since"], until=summary["until"])
    assert summary["total"] == len(period)
    assert summary["by_action"] == dict(Counter(r["action"] for r in period))
    assert summary["by_actor"] == dict(Counter(r["actor"] for r in period))
    assert summary["by_action"]["login_failed"] == 3
    assert sum(summary["by_action"].values()) == summary["total"]


def test_summary_of_a_given_period_counts_only_that_period(client: httpx.Client) -> None:
    owner = register(client)
    r = client.get(f"{AUDIT}/summary", headers=owner.headers,
                   params={"since": "2001-01-01T00:00:00Z", "until": "2001-02-01T00:00:00Z"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["total"], body["by_action"], body["failed_logins"]) == (0, {}, 0)


def test_summary_with_since_after_until_is_refused(client: httpx.Client) -> None:
    owner = register(client)
    r = client.get(f"{AUDIT}/summary", headers=owner.headers,
                   params={"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"})
    assert_problem(r, 400, "invalid_period")
    r = client.get(f"{AUDIT}/records", headers=owner.headers,
                   params={"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"})
    assert_problem(r, 400, "invalid_period")


# ---- retention ---------------------------------------------------------------------------------

def backdate(platform: Platform, org_id: str, up_to_seq: int) -> None:
    where = f"WHERE chain = '{org_id}' AND seq <= {up_to_seq}"
    if platform.mode == "embedded":
        old = (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%d %H:%M:%S.%f")
        platform.db_execute(f"UPDATE audit_records SET recorded_at = '{old}' {where}",
                            service="audit")
    else:
        platform.db_execute(
            f"UPDATE audit_records SET recorded_at = recorded_at - interval '2 days' {where}",
            service="audit")


def read_archive_object(platform: Platform, object_key: str) -> bytes:
    """The archive's bytes: in embedded mode the file of the local object store whose path ends
    with the key; in distributed mode the object in the platform's S3 bucket."""
    if platform.mode == "embedded":
        objects = platform.workdir / "data" / "objects"
        # The store keeps a JSON sidecar under the same key next to the data file.
        found = [p.read_bytes() for p in objects.rglob("*")
                 if p.is_file() and p.as_posix().endswith(object_key)]
        gzipped = [b for b in found if b.startswith(b"\x1f\x8b")]
        assert len(gzipped) == 1, (object_key, len(found))
        return gzipped[0]

    async def fetch() -> bytes:
        env = platform.env
        store = S3ObjectStore(env["WB_S3_ENDPOINT"], env["WB_S3_ACCESS_KEY"],
                              env["WB_S3_SECRET_KEY"], env["WB_S3_BUCKET"])
        try:
            return b"".join([chunk async for chunk in store.get_stream(object_key)])
        finally:
            await store.close()

    return asyncio.run(fetch())


def test_retention_archives_old_records_and_the_chain_still_verifies(
    client: httpx.Client, platform: Platform
) -> None:
    owner = register(client)
    create_project(client, owner, unique("Retained "))
    r = client.put(f"{AUDIT}/retention", json={"days": 1}, headers=owner.headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"org_id": owner.org_id, "days": 1, "last_run_at": None}
    before = wait_types(client, owner, {"wb.user.project.created": 1,
                                        "wb.audit.retention_policy.updated": 1})
    policy_record = one(before, "wb.audit.retention_policy.updated")
    assert policy_record["details"] == {"org_id": owner.org_id, "days": 1}
    assert policy_record["actor"] == f"user:{owner.user_id}"
    last = settle(platform, owner.org_id)
    archived = {r["id"]: r for r in records(client, owner.headers) if r["seq"] <= last}
    assert sorted(r["seq"] for r in archived.values()) == list(range(1, last + 1))
    backdate(platform, owner.org_id, last)

    # A generous timeout: a run that blocks on a database lock should fail here with its
    # answer, not leave the lock to the tests after this one.
    r = client.post(f"{AUDIT}/retention/run", headers=owner.headers, timeout=90)
    assert r.status_code == 200, r.text
    archive = r.json()
    last_record = next(r for r in archived.values() if r["seq"] == last)
    assert (archive["from_seq"], archive["to_seq"], archive["records"]) == (1, last, last)
    assert archive["first_prev_hash"] == GENESIS
    assert archive["last_hash"] == last_record["hash"]
    assert archive["object_key"].endswith(f"{1:012d}-{last:012d}.jsonl.gz")
    assert owner.org_id in archive["object_key"]

    # Records after the archived prefix (the archive's own event, access records) arrive
    # asynchronously.
    deadline = time.monotonic() + 15
    remaining = records(client, owner.headers)
    while not remaining and time.monotonic() < deadline:
        time.sleep(0.2)
        remaining = records(client, owner.headers)
    assert remaining and all(r["seq"] > last for r in remaining)
    assert not set(archived) & {r["id"] for r in remaining}
    gone = client.get(f"{AUDIT}/records/{last_record['id']}", headers=owner.headers)
    assert_problem(gone, 404, "not_found")
    assert platform.db_rows(
        f"SELECT count(*) FROM audit_records WHERE chain = '{owner.org_id}' AND seq <= {last}",
        service="audit") == [(0,)]

    r = client.get(f"{AUDIT}/archives", headers=owner.headers)
    assert r.status_code == 200, r.text
    assert r.json() == [archive]
    policy = client.get(f"{AUDIT}/retention", headers=owner.headers).json()
    assert policy["days"] == 1 and policy["last_run_at"] is not None

    after = wait_types(client, owner, {"wb.audit.records.archived": 1})
    event = one(after, "wb.audit.records.archived")
    assert event["details"] == {
        "org_id": owner.org_id, "archive_id": archive["id"], "object_key": archive["object_key"],
        "records": last, "from_seq": 1, "to_seq": last}
    head = settle(platform, owner.org_id)
    result = verify(client, owner)
    assert result["ok"] is True, result
    assert result["anchor_seq"] == last
    assert result["checked"] == result["last_seq"] - last
    assert result["last_seq"] >= head

    # Nothing else is old enough: a second run archives nothing.
    r = client.post(f"{AUDIT}/retention/run", headers=owner.headers)
    assert r.status_code == 200, r.text
    assert r.json() is None
    assert len(client.get(f"{AUDIT}/archives", headers=owner.headers).json()) == 1

    # The archive: gzipped JSON Lines, oldest first, each line chained to the one before and
    # hashing to its own `hash`; the last hash is the chain's new anchor.
    raw = read_archive_object(platform, archive["object_key"])
    assert hashlib.sha256(raw).hexdigest() == archive["sha256"]
    lines = [orjson.loads(line) for line in gzip.decompress(raw).splitlines()]
    assert [x["seq"] for x in lines] == list(range(1, last + 1))
    assert {x["id"] for x in lines} == set(archived)
    prev = GENESIS
    for line in lines:
        assert line["prev_hash"] == prev
        body = {k: v for k, v in line.items() if k not in ("hash", "recorded_at")}
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        assert digest == line["hash"], line
        assert line["hash"] == archived[line["id"]]["hash"]
        assert line["details"] == archived[line["id"]]["details"]
        prev = line["hash"]
    assert prev == archive["last_hash"]


@pytest.mark.parametrize("days", [0, 100000])
def test_retention_days_out_of_range_are_refused(client: httpx.Client, days: int) -> None:
    owner = register(client)
    r = client.put(f"{AUDIT}/retention", json={"days": days}, headers=owner.headers)
    assert_problem(r, 422, "validation_failed")
    assert client.get(f"{AUDIT}/retention", headers=owner.headers).json()["days"] is None


def test_running_retention_without_a_policy_is_a_conflict(client: httpx.Client) -> None:
    owner = register(client)
    r = client.post(f"{AUDIT}/retention/run", headers=owner.headers)
    assert_problem(r, 409, "no_retention_policy")
    assert client.get(f"{AUDIT}/archives", headers=owner.headers).json() == []


# ---- access control ----------------------------------------------------------------------------

def audit_routes() -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("GET", f"{AUDIT}/records", None),
        ("GET", f"{AUDIT}/records/{uuid.uuid4()}", None),
        ("GET", f"{AUDIT}/export", None),
        ("GET", f"{AUDIT}/verify", None),
        ("GET", f"{AUDIT}/summary", None),
        ("GET", f"{AUDIT}/retention", None),
        ("PUT", f"{AUDIT}/retention", {"days": 30}),
        ("POST", f"{AUDIT}/retention/run", None),
        ("GET", f"{AUDIT}/archives", None),
    ]


@pytest.mark.parametrize("role", ["member", "viewer"])
def test_members_and_viewers_are_refused_every_audit_route(client: httpx.Client,
                                                           role: str) -> None:
    owner = register(client)
    user = add_member(client, owner, role)
    for method, path, body in audit_routes():
        r = client.request(method, path, json=body, headers=user.headers)
        problem = assert_problem(r, 403, "permission_denied")
        assert problem["permission"] in ("audit:read", "audit:manage"), (path, problem)
    assert client.get(f"{AUDIT}/retention", headers=owner.headers).json()["days"] is None


def test_an_admin_can_read_and_manage_the_audit_log(client: httpx.Client,
                                                    platform: Platform) -> None:
    owner = register(client)
    admin = add_member(client, owner, "admin")
    items = wait_types(client, admin, {"wb.user.member.added": 2})
    assert {r["org_id"] for r in items} == {owner.org_id}
    settle(platform, owner.org_id)
    assert verify(client, admin)["ok"] is True
    r = client.put(f"{AUDIT}/retention", json={"days": 90}, headers=admin.headers)
    assert r.status_code == 200, r.text
    assert r.json()["days"] == 90


def test_a_record_of_another_org_is_not_found(client: httpx.Client) -> None:
    alice, bob = register(client), register(client)
    bob_records = wait_types(client, bob, {"wb.user.user.registered": 1})
    theirs = one(bob_records, "wb.user.user.registered")
    assert client.get(f"{AUDIT}/records/{theirs['id']}", headers=bob.headers).status_code == 200
    r = client.get(f"{AUDIT}/records/{theirs['id']}", headers=alice.headers)
    assert_problem(r, 404, "not_found")


def test_search_never_returns_records_of_another_org(client: httpx.Client) -> None:
    alice, bob = register(client), register(client)
    names = {alice.org_id: unique("Alpha "), bob.org_id: unique("Bravo ")}
    for user in (alice, bob):
        create_project(client, user, names[user.org_id])
    found = {u.org_id: wait_types(client, u, {"wb.user.project.created": 1})
             for u in (alice, bob)}
    for user, other in ((alice, bob), (bob, alice)):
        mine = found[user.org_id]
        assert {r["org_id"] for r in mine} == {user.org_id}
        assert not {r["id"] for r in mine} & {r["id"] for r in found[other.org_id]}
        assert records(client, user.headers, q=names[other.org_id]) == []
        assert records(client, user.headers, actor=f"user:{other.user_id}") == []
        assert len(records(client, user.headers, q=names[user.org_id])) == 1


def test_an_api_key_with_audit_read_can_read_but_not_manage(client: httpx.Client,
                                                            platform: Platform) -> None:
    owner = register(client)
    key = create_key(client, owner, ["audit:read"])
    items = wait_types(client, owner, {"wb.user.api_key.created": 1})
    via_key = records(client, auth(key))
    assert {r["id"] for r in items} <= {r["id"] for r in via_key}
    settle(platform, owner.org_id)
    assert client.get(f"{AUDIT}/verify", headers=auth(key)).json()["ok"] is True
    r = client.put(f"{AUDIT}/retention", json={"days": 30}, headers=auth(key))
    assert_problem(r, 403, "permission_denied")
    public_id = key.split("_", 2)[1]
    wait_records(client, owner.headers,
                 lambda rs: any(r["event_type"] == "wb.gateway.access.recorded"
                                and r["details"]["path"] == f"{AUDIT}/records" for r in rs),
                 "the key's access record", actor=f"key:{public_id}")


def test_an_api_key_without_audit_read_is_refused(client: httpx.Client) -> None:
    owner = register(client)
    key = create_key(client, owner, ["projects:read"])
    r = client.get(f"{AUDIT}/records", headers=auth(key))
    assert_problem(r, 403, "permission_denied")


def test_an_api_key_with_audit_manage_can_set_retention(client: httpx.Client) -> None:
    owner = register(client)
    key = create_key(client, owner, ["audit:read", "audit:manage"])
    r = client.put(f"{AUDIT}/retention", json={"days": 30}, headers=auth(key))
    assert r.status_code == 200, r.text
    assert r.json()["days"] == 30


def test_audit_routes_need_credentials(client: httpx.Client) -> None:
    r = client.get(f"{AUDIT}/records")
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/problem+json")


# ---- bad input ---------------------------------------------------------------------------------

@pytest.fixture
def owner(client: httpx.Client) -> ApiUser:
    return register(client)


def test_a_bad_cursor_is_refused(client: httpx.Client, owner: ApiUser) -> None:
    r = client.get(f"{AUDIT}/records", params={"cursor": "not-a-cursor"},
                   headers=owner.headers)
    assert_problem(r, 400, "invalid_cursor")


@pytest.mark.parametrize("limit", [0, 1000])
def test_a_limit_out_of_range_is_refused(client: httpx.Client, owner: ApiUser,
                                         limit: int) -> None:
    r = client.get(f"{AUDIT}/records", params={"limit": limit}, headers=owner.headers)
    assert_problem(r, 422, "validation_failed")


def test_an_unknown_export_format_is_refused(client: httpx.Client, owner: ApiUser) -> None:
    r = client.get(f"{AUDIT}/export", params={"format": "xml"}, headers=owner.headers)
    assert_problem(r, 422, "validation_failed")


@pytest.mark.parametrize("route", ["records", "export", "summary"])
def test_a_since_that_is_not_a_date_is_refused(client: httpx.Client, owner: ApiUser,
                                               route: str) -> None:
    r = client.get(f"{AUDIT}/{route}", params={"since": "last tuesday"}, headers=owner.headers)
    assert_problem(r, 422, "validation_failed")


def test_a_record_id_that_is_not_a_uuid_is_refused(client: httpx.Client,
                                                   owner: ApiUser) -> None:
    r = client.get(f"{AUDIT}/records/not-a-uuid", headers=owner.headers)
    assert_problem(r, 422, "validation_failed")
