"""Events the inference service publishes (proto/wb/inference/v1/events.proto), written to the
outbox in the transaction of the change they announce."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.inference.models import (
    EVENT_TABLES,
    Deployment,
    ExternalModel,
    Route,
    SafetyRule,
)
from workbench.events.outbox import Outbox


class Events:
    def __init__(self) -> None:
        self.outbox = Outbox(EVENT_TABLES, source="wb/inference")

    async def _record(self, s: AsyncSession, type_: str, data: dict[str, Any], *,
                      org_id: object, actor: str, subject: object) -> None:
        await self.outbox.record(s, type_, data, org_id=str(org_id), actor=actor,
                                 subject=str(subject))

    async def model_registered(self, s: AsyncSession, m: ExternalModel, actor: str) -> None:
        await self._record(s, "wb.inference.model.registered", {
            "model_id": str(m.id), "name": m.name, "kind": m.kind, "base_url": m.base_url},
            org_id=m.org_id, actor=actor, subject=m.id)

    async def model_deleted(self, s: AsyncSession, m: ExternalModel, actor: str) -> None:
        await self._record(s, "wb.inference.model.deleted", {
            "model_id": str(m.id), "name": m.name}, org_id=m.org_id, actor=actor, subject=m.id)

    async def deployment_created(self, s: AsyncSession, d: Deployment, actor: str) -> None:
        await self._record(s, "wb.inference.deployment.created", {
            "deployment_id": str(d.id), "name": d.name, "model": d.model,
            "runtime": d.runtime, "replicas": d.replicas},
            org_id=d.org_id, actor=actor, subject=d.id)

    async def deployment_updated(self, s: AsyncSession, d: Deployment, changed: list[str],
                                 actor: str) -> None:
        await self._record(s, "wb.inference.deployment.updated", {
            "deployment_id": str(d.id), "changed": changed},
            org_id=d.org_id, actor=actor, subject=d.id)

    async def deployment_status(self, s: AsyncSession, d: Deployment, actor: str) -> None:
        await self._record(s, "wb.inference.deployment.status_changed", {
            "deployment_id": str(d.id), "name": d.name, "status": d.status,
            "reason": d.reason}, org_id=d.org_id, actor=actor, subject=d.id)

    async def deployment_scaled(self, s: AsyncSession, d: Deployment, previous: int,
                                actor: str) -> None:
        await self._record(s, "wb.inference.deployment.scaled", {
            "deployment_id": str(d.id), "replicas": d.replicas, "previous": previous},
            org_id=d.org_id, actor=actor, subject=d.id)

    async def deployment_deleted(self, s: AsyncSession, d: Deployment, actor: str) -> None:
        await self._record(s, "wb.inference.deployment.deleted", {
            "deployment_id": str(d.id), "name": d.name},
            org_id=d.org_id, actor=actor, subject=d.id)

    async def route_changed(self, s: AsyncSession, r: Route, type_: str, actor: str) -> None:
        await self._record(s, type_, {"route_id": str(r.id), "name": r.name,
                                      "arms": list(r.arms)},
                           org_id=r.org_id, actor=actor, subject=r.id)

    async def safety_rule_changed(self, s: AsyncSession, rule: SafetyRule, type_: str,
                                  actor: str) -> None:
        await self._record(s, type_, {
            "rule_id": str(rule.id), "name": rule.name, "stage": rule.stage,
            "kind": rule.kind, "action": rule.action},
            org_id=rule.org_id, actor=actor, subject=rule.id)

    async def usage(self, s: AsyncSession, *, org_id: str, actor: str, data: dict[str, Any]
                    ) -> None:
        await self._record(s, "wb.inference.usage.recorded", data, org_id=org_id, actor=actor,
                           subject=data["deployment_id"])

    async def safety_triggered(self, s: AsyncSession, *, org_id: str, actor: str,
                               data: dict[str, Any]) -> None:
        await self._record(s, "wb.inference.safety.triggered", data, org_id=org_id,
                           actor=actor, subject=data["rule_id"])
