"""Event payload contracts: proto/ declares every event type, and data is checked against it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

from workbench.events.contracts import (
    ContractViolation,
    declared_event_type,
    descriptor_files,
    known_event_types,
    validate_event_data,
)

REPO = Path(__file__).resolve().parents[3]
GEN_PROTO = REPO / "scripts" / "gen_proto.py"

# One valid payload per event type of the user service, with every field the contract has.
USER_EVENTS: dict[str, dict[str, Any]] = {
    "wb.user.user.registered": {
        "user_id": "u1",
        "email": "ada@example.com",
        "username": "ada",
        "org_id": "o1",
    },
    "wb.user.user.logged_in": {"user_id": "u1", "org_id": "o1", "method": "password"},
    "wb.user.login.failed": {"email": "ada@example.com", "reason": "bad_credentials"},
    "wb.user.user.logged_out": {"user_id": "u1", "session_id": "s1"},
    "wb.user.refresh_token.reuse_detected": {"user_id": "u1", "session_id": "s1"},
    "wb.user.org.created": {"org_id": "o1", "name": "Acme", "slug": "acme", "owner_id": "u1"},
    "wb.user.org.updated": {"org_id": "o1", "changed_fields": ["name", "slug"]},
    "wb.user.org.deleted": {"org_id": "o1"},
    "wb.user.member.added": {"org_id": "o1", "user_id": "u2", "role": "member"},
    "wb.user.member.role_changed": {
        "org_id": "o1",
        "user_id": "u2",
        "old_role": "member",
        "new_role": "admin",
    },
    "wb.user.member.removed": {"org_id": "o1", "user_id": "u2"},
    "wb.user.project.created": {
        "project_id": "p1",
        "name": "Churn",
        "slug": "churn",
        "owner_id": "u1",
    },
    "wb.user.project.updated": {"project_id": "p1", "changed_fields": ["name"]},
    "wb.user.project.deleted": {"project_id": "p1"},
    "wb.user.api_key.created": {
        "key_id": "k1",
        "name": "ci",
        "scopes": ["kb:read", "kb:write"],
        "expires_at": "2030-01-01T00:00:00Z",
    },
    "wb.user.api_key.revoked": {"key_id": "k1"},
    "wb.user.quota.updated": {"org_id": "o1", "limits": {"gpu_hours": 100, "storage_gb": 50}},
    "wb.user.signing_key.rotated": {"kid": "k2", "previous_kid": "k1"},
}


def test_every_user_event_type_has_a_contract() -> None:
    assert set(USER_EVENTS) <= known_event_types()


@pytest.mark.parametrize("event_type", sorted(USER_EVENTS))
def test_payload_with_every_contract_field_is_valid(event_type: str) -> None:
    validate_event_data(event_type, USER_EVENTS[event_type])


def test_optional_field_may_be_left_out() -> None:
    validate_event_data("wb.user.api_key.created", {"key_id": "k1", "name": "ci", "scopes": []})


def test_unknown_event_type_is_rejected() -> None:
    with pytest.raises(ContractViolation, match=r"no contract in proto/ declares event type "):
        validate_event_data("wb.user.user.teleported", {"user_id": "u1"})


def test_unknown_field_is_rejected_with_its_name() -> None:
    with pytest.raises(ContractViolation, match=r"unknown field 'password'.*UserRegistered"):
        validate_event_data("wb.user.user.registered", {"user_id": "u1", "password": "x"})


def test_json_camel_case_name_is_rejected() -> None:
    # ParseDict alone would accept it, but consumers read data["user_id"].
    with pytest.raises(ContractViolation, match=r"unknown field 'userId'"):
        validate_event_data("wb.user.user.logged_out", {"userId": "u1"})


def test_list_for_string_field_is_rejected() -> None:
    with pytest.raises(ContractViolation, match=r"user_id"):
        validate_event_data("wb.user.user.logged_out", {"user_id": ["u1"]})


def test_number_for_string_field_is_rejected() -> None:
    with pytest.raises(ContractViolation, match=r"org_id"):
        validate_event_data("wb.user.org.deleted", {"org_id": 42})


def test_non_numeric_string_for_int64_map_value_is_rejected() -> None:
    with pytest.raises(ContractViolation, match=r"limits"):
        validate_event_data("wb.user.quota.updated", {"org_id": "o1", "limits": {"gpu": "lots"}})


def test_fraction_for_int64_map_value_is_rejected() -> None:
    with pytest.raises(ContractViolation, match=r"limits"):
        validate_event_data("wb.user.quota.updated", {"org_id": "o1", "limits": {"gpu": 1.5}})


def test_string_for_repeated_field_is_rejected() -> None:
    with pytest.raises(ContractViolation, match=r"scopes"):
        validate_event_data("wb.user.api_key.created", {"key_id": "k1", "scopes": "kb:read"})


def test_contract_violation_is_a_value_error() -> None:
    assert issubclass(ContractViolation, ValueError)


def test_every_message_in_events_proto_declares_an_event_type() -> None:
    events_files = [f for f in descriptor_files() if fnmatch(f.name, "wb/*/v1/events.proto")]
    assert "wb/user/v1/events.proto" in {f.name for f in events_files}
    undeclared = [
        f"{f.name}: {message.full_name}"
        for f in events_files
        for message in f.message_types_by_name.values()
        if declared_event_type(message) is None
    ]
    assert undeclared == [], "add option (wb.events.v1.event_type) to: " + ", ".join(undeclared)


def test_committed_descriptor_set_matches_proto_sources() -> None:
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, str(GEN_PROTO), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


UNDECLARED_IN_DESCRIPTOR_SET = """
message UserRenamed {
  option (wb.events.v1.event_type) = "wb.user.user.renamed";
}
"""


def test_check_fails_when_a_proto_changed_after_generation(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    (tmp_path / "scripts").mkdir()
    shutil.copy(GEN_PROTO, tmp_path / "scripts" / "gen_proto.py")
    shutil.copytree(REPO / "proto", tmp_path / "proto")
    with (tmp_path / "proto" / "wb" / "user" / "v1" / "events.proto").open("a") as f:
        f.write(UNDECLARED_IN_DESCRIPTOR_SET)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "proto/descriptors.binpb is out of date" in result.stderr
