"""What the data service asks the user service: whether a project is the org's, and the org's
storage quota (reserved before bytes are stored, released when they are removed)."""

from __future__ import annotations

import uuid

from workbench.client import ServiceClient, raise_for_problem
from workbench.errors import NotFound, PayloadTooLarge, QuotaExceeded

STORAGE = "storage_bytes"


class UserDirectory:
    def __init__(self, client: ServiceClient) -> None:
        self.client = client

    async def check_project(self, org_id: uuid.UUID, project_id: uuid.UUID) -> None:
        resp = await self.client.get(f"/internal/v1/orgs/{org_id}/projects/{project_id}")
        if resp.status_code == 404:
            raise NotFound(f"project {project_id} does not exist",
                           extra={"field": "project_id"})
        raise_for_problem(resp)

    async def reserve_storage(self, org_id: uuid.UUID, amount: int) -> None:
        """Take `amount` bytes of the org's storage quota, or raise PayloadTooLarge saying
        how much is left."""
        if amount <= 0:
            return
        resp = await self.client.post("/internal/v1/quotas/consume", json={
            "org_id": str(org_id), "resource": STORAGE, "amount": amount}, idempotent=False)
        try:
            raise_for_problem(resp)
        except QuotaExceeded as exc:
            limit, used = exc.extra.get("limit"), exc.extra.get("used")
            left = max(0, int(limit) - int(used)) if limit is not None and used is not None \
                else None
            raise PayloadTooLarge(
                f"this file ({amount:,} bytes) would exceed the organization's storage quota"
                + (f" ({used:,} of {limit:,} bytes used, {left:,} left)" if left is not None
                   else "") + "; delete and purge datasets or ask an operator to raise it",
                code="storage_quota_exceeded",
                extra={"limit": limit, "used": used, "requested": amount}) from exc

    async def release_storage(self, org_id: uuid.UUID, amount: int) -> None:
        if amount <= 0:
            return
        resp = await self.client.post("/internal/v1/quotas/release", json={
            "org_id": str(org_id), "resource": STORAGE, "amount": amount}, idempotent=False)
        raise_for_problem(resp)
