"""The inference domain: the model catalog (built-in models and the org's external endpoints,
their API keys sealed), deployments and their lifecycle, routes that split traffic, and the
org's content-safety rules. Functions take a session and a principal and flush; deployments'
replicas are the supervisor's, which reports their status back here."""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.inference import safety
from services.inference.catalog import BUILTINS
from services.inference.events import Events
from services.inference.models import Deployment, ExternalModel, Route, SafetyRule
from services.inference.runtimes.base import DeploymentSpec
from services.inference.settings import InferenceSettings
from services.inference.supervisor import Supervisor
from workbench.cache import TtlCache
from workbench.db import Database, utcnow
from workbench.errors import BadRequest, Conflict, NotFound, ValidationFailed
from workbench.identity.principal import Principal
from workbench.repository import Repository

RUNTIMES_FOR = {"builtin": ("local", "triton", "rayserve"), "external": ("openai", "vllm")}


class DeploymentRepo(Repository[Deployment]):
    model = Deployment
    noun = "inference service"


class ExternalRepo(Repository[ExternalModel]):
    model = ExternalModel
    noun = "model"


class RouteRepo(Repository[Route]):
    model = Route
    noun = "route"


class RuleRepo(Repository[SafetyRule]):
    model = SafetyRule
    noun = "safety rule"


class Sealer:
    """API keys of external endpoints at rest: AES-GCM under a key derived from the platform
    secret, the org id bound in as associated data."""

    def __init__(self, secret: str) -> None:
        self._key = HKDF(SHA256(), 32, b"xai-workbench", b"wb-inference-keys-v1").derive(
            secret.encode())

    def seal(self, org_id: uuid.UUID, value: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(self._key).encrypt(nonce, value.encode(), str(org_id).encode())

    def open(self, org_id: uuid.UUID, sealed: bytes) -> str:
        return AESGCM(self._key).decrypt(sealed[:12], sealed[12:], str(org_id).encode()).decode()


@dataclass(frozen=True, slots=True)
class _Target:
    """What a model name resolves to: a route's arms with weight, or one deployment;
    (deployment id, weight, kind — None when the arm's deployment is gone)."""

    route: str | None
    arms: list[tuple[uuid.UUID, int, str | None]]


class InferenceService:
    def __init__(self, settings: InferenceSettings, db: Database, supervisor: Supervisor,
                 events: Events) -> None:
        self.settings = settings
        self.db = db
        self.supervisor = supervisor
        self.events = events
        self.sealer = Sealer(settings.secret_key.get_secret_value())
        # Per-org lookups of the request path, kept for `inference_lookup_cache_s`: an org's
        # safety policy, and what a model name resolves to. A change made here forgets the
        # org's entries at once (and again at its commit); other replicas of the service see
        # it within the cache time.
        ttl = settings.inference_lookup_cache_s
        self._policies: TtlCache[uuid.UUID, safety.Policy] = TtlCache(ttl)
        self._targets: TtlCache[tuple[uuid.UUID, str], _Target] = TtlCache(ttl)

    def _forget(self, s: AsyncSession, org_id: uuid.UUID) -> None:
        self._policies.forget(s, lambda k: k == org_id)
        self._targets.forget(s, lambda k: k[0] == org_id)

    # ---- catalog -----------------------------------------------------------------------------

    async def catalog(self, s: AsyncSession, p: Principal) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"id": f"builtin:{m.name}", "name": m.name, "kind": m.kind, "source": "builtin",
             "description": m.description, "context_length": m.context_length,
             "dimensions": m.dimensions, "runtimes": list(RUNTIMES_FOR["builtin"]),
             "base_url": None,
             "has_api_key": False} for m in BUILTINS.values()]
        rows, _ = await ExternalRepo(s, p.org_id).list(limit=1000)
        out += [self.external_view(m) for m in rows]
        return out

    def external_view(self, m: ExternalModel) -> dict[str, Any]:
        return {"id": f"external:{m.id}", "name": m.name, "kind": m.kind, "source": "external",
                "description": m.description, "context_length": m.context_length,
                "dimensions": None, "runtimes": ["openai", "vllm"], "base_url": m.base_url,
                "remote_model": m.remote_model, "has_api_key": m.api_key is not None}

    async def register_model(self, s: AsyncSession, p: Principal, *, name: str, kind: str,
                             base_url: str, remote_model: str, api_key: str | None,
                             context_length: int, description: str) -> ExternalModel:
        if name in BUILTINS:
            raise Conflict(f"{name!r} is the name of a built-in model", code="name_taken")
        await self._name_free(s, ExternalModel, p, name)
        m = ExternalModel(org_id=p.org_id, name=name, kind=kind, base_url=base_url.rstrip("/"),
                          remote_model=remote_model, context_length=context_length,
                          description=description, created_by=p.actor,
                          api_key=self.sealer.seal(p.org_id, api_key) if api_key else None)
        await ExternalRepo(s, p.org_id).add(m)
        await self.events.model_registered(s, m, p.actor)
        return m

    async def get_external(self, s: AsyncSession, p: Principal, model_id: uuid.UUID
                           ) -> ExternalModel:
        return await ExternalRepo(s, p.org_id).get(model_id)

    async def delete_model(self, s: AsyncSession, p: Principal, model_id: uuid.UUID) -> None:
        m = await ExternalRepo(s, p.org_id).get(model_id)
        used = (await s.execute(select(Deployment.name).where(
            Deployment.org_id == p.org_id, Deployment.model == f"external:{m.id}"))).scalars()
        names = list(used)
        if names:
            raise Conflict(f"deployments use this model: {', '.join(names)}; delete them first",
                           code="model_in_use")
        await ExternalRepo(s, p.org_id).delete(m)
        await self.events.model_deleted(s, m, p.actor)

    async def _name_free(self, s: AsyncSession, model: Any, p: Principal, name: str) -> None:
        row = (await s.execute(select(model.id).where(model.org_id == p.org_id,
                                                      model.name == name))).first()
        if row is not None:
            raise Conflict(f"the name {name!r} is taken", code="name_taken",
                           extra={"field": "name"})

    # ---- deployments -------------------------------------------------------------------------

    async def create_deployment(self, s: AsyncSession, p: Principal, *, name: str, model: str,
                                runtime: str | None, replicas: int, resources: dict[str, Any],
                                settings: dict[str, Any], description: str,
                                model_version: str) -> Deployment:
        if name in BUILTINS:
            raise Conflict(f"{name!r} is the name of a built-in model", code="name_taken")
        await self._name_free(s, Deployment, p, name)
        await self._name_free(s, Route, p, name)
        kind, source = await self._model_kind(s, p, model)
        runtime = runtime or RUNTIMES_FOR[source][0]
        if runtime not in RUNTIMES_FOR[source]:
            raise ValidationFailed(f"a {source} model runs on {' or '.join(RUNTIMES_FOR[source])}"
                                   f", not {runtime!r}", extra={"field": "runtime"})
        if runtime == "vllm" and not (settings.get("model") or settings.get("base_url")):
            raise ValidationFailed("a vllm deployment needs settings.model (a model id or "
                                   "path to serve) or settings.base_url (a running vLLM)",
                                   extra={"field": "settings"})
        d = Deployment(org_id=p.org_id, name=name, model=model, kind=kind, runtime=runtime,
                       replicas=replicas, resources=resources, settings=settings,
                       description=description, model_version=model_version,
                       created_by=p.actor, status="pending")
        await DeploymentRepo(s, p.org_id).add(d)
        await self.events.deployment_created(s, d, p.actor)
        return d

    async def _model_kind(self, s: AsyncSession, p: Principal, model: str) -> tuple[str, str]:
        source, _, ref = model.partition(":")
        if source == "builtin" and ref in BUILTINS:
            return BUILTINS[ref].kind, source
        if source == "external":
            try:
                row = await ExternalRepo(s, p.org_id).get(uuid.UUID(ref))
            except ValueError:
                row = None
            if row is not None:
                return row.kind, source
        raise NotFound(f"model {model!r} is not in the catalog (see GET "
                       "/api/v1/inference/models)", extra={"field": "model"})

    async def get_deployment(self, s: AsyncSession, p: Principal,
                             deployment_id: uuid.UUID) -> Deployment:
        return await DeploymentRepo(s, p.org_id).get(deployment_id)

    async def spec_of(self, s: AsyncSession, d: Deployment) -> DeploymentSpec:
        spec = DeploymentSpec(id=str(d.id), org_id=str(d.org_id), name=d.name, kind=d.kind,
                              runtime=d.runtime, replicas=d.replicas, model=d.model,
                              settings=dict(d.settings), resources=dict(d.resources))
        if d.model.startswith("builtin:"):
            spec.context_length = int(d.settings.get("n_ctx") or
                                      self.settings.inference_default_n_ctx)
        else:
            ext = (await s.execute(select(ExternalModel).where(
                ExternalModel.id == uuid.UUID(d.model.removeprefix("external:")),
                ExternalModel.org_id == d.org_id))).scalar_one()
            spec.base_url, spec.remote_model = ext.base_url, ext.remote_model
            spec.api_key = self.sealer.open(d.org_id, ext.api_key) if ext.api_key else None
            spec.context_length = ext.context_length
        return spec

    async def start(self, s: AsyncSession, p: Principal, deployment_id: uuid.UUID
                    ) -> Deployment:
        d = await self.get_deployment(s, p, deployment_id)
        spec = await self.spec_of(s, d)
        d.status, d.reason, d.started_at = "deploying", "", utcnow()
        await s.flush()
        await self.events.deployment_status(s, d, p.actor)
        try:
            await self.supervisor.deploy(spec)
        except (ValueError, RuntimeError) as exc:
            raise BadRequest(f"cannot start {d.name!r}: {exc}", code="start_failed") from exc
        return d

    async def stop(self, s: AsyncSession, p: Principal, deployment_id: uuid.UUID) -> Deployment:
        d = await self.get_deployment(s, p, deployment_id)
        await self.supervisor.stop(str(d.id), report=False)
        if d.status != "stopped":
            d.status, d.reason = "stopped", ""
            await s.flush()
            await self.events.deployment_status(s, d, p.actor)
        return d

    async def scale(self, s: AsyncSession, p: Principal, deployment_id: uuid.UUID,
                    replicas: int) -> Deployment:
        d = await self.get_deployment(s, p, deployment_id)
        previous, d.replicas = d.replicas, replicas
        await s.flush()
        await self.supervisor.scale(str(d.id), replicas)
        if previous != replicas:
            await self.events.deployment_scaled(s, d, previous, p.actor)
        return d

    async def update_deployment(self, s: AsyncSession, p: Principal, deployment_id: uuid.UUID,
                                changes: dict[str, Any]) -> Deployment:
        self._forget(s, p.org_id)
        d = await self.get_deployment(s, p, deployment_id)
        if "name" in changes and changes["name"] != d.name:
            await self._name_free(s, Deployment, p, changes["name"])
            await self._name_free(s, Route, p, changes["name"])
        changed = [k for k, v in changes.items() if getattr(d, k) != v]
        for k in changed:
            setattr(d, k, changes[k])
        await s.flush()
        if changed:
            await self.events.deployment_updated(s, d, changed, p.actor)
        return d

    async def delete_deployment(self, s: AsyncSession, p: Principal,
                                deployment_id: uuid.UUID) -> None:
        self._forget(s, p.org_id)
        d = await self.get_deployment(s, p, deployment_id)
        routes = [r.name for r in (await s.execute(RouteRepo(s, p.org_id).scoped())).scalars()
                  if any(a["deployment_id"] == str(d.id) for a in r.arms)]
        if routes:
            raise Conflict(f"routes send traffic to this deployment: {', '.join(routes)}; "
                           "change them first", code="deployment_in_use")
        await self.supervisor.stop(str(d.id), report=False)
        await DeploymentRepo(s, p.org_id).delete(d)
        await self.events.deployment_deleted(s, d, p.actor)

    async def record_status(self, deployment_id: str, status: str, reason: str) -> None:
        """The supervisor's report: persisted, announced."""
        async with self.db.transaction() as s:
            d = (await s.execute(select(Deployment).where(
                Deployment.id == uuid.UUID(deployment_id)))).scalar_one_or_none()
            if d is None or (d.status == "stopped" and status != "deploying"):
                return
            if (d.status, d.reason) == (status, reason):
                return
            d.status, d.reason = status, reason[:2000]
            await s.flush()
            await self.events.deployment_status(s, d, "system")

    async def resume(self) -> None:
        """After a restart: bring back what was running."""
        async with self.db.transaction() as s:
            rows = list((await s.execute(select(Deployment).where(
                Deployment.status.in_(("deploying", "running"))))).scalars())
            specs = [await self.spec_of(s, d) for d in rows]
        for spec in specs:
            await self.supervisor.deploy(spec)

    # ---- routes ------------------------------------------------------------------------------

    async def _check_arms(self, s: AsyncSession, p: Principal, arms: list[dict[str, Any]]
                          ) -> list[dict[str, Any]]:
        kinds = set()
        for i, arm in enumerate(arms):
            try:
                d = await DeploymentRepo(s, p.org_id).get(uuid.UUID(str(arm["deployment_id"])))
            except NotFound as exc:
                raise ValidationFailed(f"arms[{i}]: deployment {arm['deployment_id']} does not "
                                       "exist", extra={"field": f"arms[{i}].deployment_id"}
                                       ) from exc
            kinds.add(d.kind)
        if len(kinds) > 1:
            raise ValidationFailed("all arms of a route must serve the same kind of model",
                                   extra={"field": "arms"})
        if len({str(a["deployment_id"]) for a in arms}) != len(arms):
            raise ValidationFailed("a deployment appears in two arms", extra={"field": "arms"})
        return [{"deployment_id": str(a["deployment_id"]), "weight": int(a["weight"])}
                for a in arms]

    async def create_route(self, s: AsyncSession, p: Principal, *, name: str,
                           arms: list[dict[str, Any]]) -> Route:
        self._forget(s, p.org_id)
        await self._name_free(s, Route, p, name)
        await self._name_free(s, Deployment, p, name)
        r = Route(org_id=p.org_id, name=name, arms=await self._check_arms(s, p, arms),
                  created_by=p.actor)
        await RouteRepo(s, p.org_id).add(r)
        await self.events.route_changed(s, r, "wb.inference.route.created", p.actor)
        return r

    async def update_route(self, s: AsyncSession, p: Principal, route_id: uuid.UUID,
                           arms: list[dict[str, Any]]) -> Route:
        self._forget(s, p.org_id)
        r = await RouteRepo(s, p.org_id).get(route_id)
        r.arms = await self._check_arms(s, p, arms)
        await s.flush()
        await self.events.route_changed(s, r, "wb.inference.route.updated", p.actor)
        return r

    async def get_route(self, s: AsyncSession, p: Principal, route_id: uuid.UUID) -> Route:
        return await RouteRepo(s, p.org_id).get(route_id)

    async def delete_route(self, s: AsyncSession, p: Principal, route_id: uuid.UUID) -> None:
        self._forget(s, p.org_id)
        r = await RouteRepo(s, p.org_id).get(route_id)
        await RouteRepo(s, p.org_id).delete(r)
        await self.events.route_changed(s, r, "wb.inference.route.deleted", p.actor)

    async def resolve(self, p: Principal, name: str, kind: str
                      ) -> tuple[uuid.UUID, str | None, safety.Policy]:
        """The deployment a request for `name` goes to — a route's arm picked by weight, or
        the deployment of that name — its route's name (or None) and the org's safety policy.
        Read from the database only when not cached."""
        target = self._targets.get((p.org_id, name))
        policy = self._policies.get(p.org_id)
        if target is None or policy is None:
            async with self.db.transaction() as s:
                if target is None:
                    target = await self._lookup(s, p, name)
                    self._targets.put((p.org_id, name), target)
                if policy is None:
                    policy = await self.policy(s, p.org_id)
        if not target.arms:
            raise NotFound(f"route {name!r} has no arm with weight", code="model_not_found")
        if len(target.arms) == 1:
            deployment_id, found_kind = target.arms[0][0], target.arms[0][2]
        else:
            deployment_id, _, found_kind = random.choices(
                target.arms, weights=[w for _, w, _ in target.arms])[0]
        if found_kind is None:
            raise NotFound(f"the model {name!r} does not exist or is not deployed in this "
                           "organization (GET /v1/models lists what is)",
                           code="model_not_found")
        if found_kind != kind:
            raise BadRequest(f"{name!r} serves {found_kind}, not {kind}",
                             code="wrong_model_kind")
        return deployment_id, target.route, policy

    async def _lookup(self, s: AsyncSession, p: Principal, name: str) -> _Target:
        route = (await s.execute(RouteRepo(s, p.org_id).scoped().where(Route.name == name))
                 ).scalar_one_or_none()
        if route is None:
            d = (await s.execute(DeploymentRepo(s, p.org_id).scoped().where(
                Deployment.name == name))).scalar_one_or_none()
            if d is None:  # not kept: a deployment created on another replica is found at once
                raise NotFound(f"the model {name!r} does not exist or is not deployed in this "
                               "organization (GET /v1/models lists what is)",
                               code="model_not_found")
            return _Target(None, [(d.id, 1, d.kind)])
        arms = [a for a in route.arms if a["weight"] > 0]
        ids = [uuid.UUID(a["deployment_id"]) for a in arms]
        kinds = dict((await s.execute(select(Deployment.id, Deployment.kind).where(
            Deployment.org_id == p.org_id, Deployment.id.in_(ids)))).all()) if ids else {}
        return _Target(route.name, [(i, int(a["weight"]), kinds.get(i))
                                    for i, a in zip(ids, arms, strict=True)])

    async def served_models(self, s: AsyncSession, p: Principal) -> list[dict[str, Any]]:
        deployments, _ = await DeploymentRepo(s, p.org_id).list(limit=1000)
        routes, _ = await RouteRepo(s, p.org_id).list(limit=1000)
        return ([{"id": d.name, "object": "model", "created": int(d.created_at.timestamp()),
                  "owned_by": str(d.org_id), "kind": d.kind, "status": d.status}
                 for d in deployments] +
                [{"id": r.name, "object": "model", "created": int(r.created_at.timestamp()),
                  "owned_by": str(r.org_id), "kind": "route", "status": "running"}
                 for r in routes])

    # ---- safety ------------------------------------------------------------------------------

    async def create_rule(self, s: AsyncSession, p: Principal, **fields: Any) -> SafetyRule:
        rule = SafetyRule(org_id=p.org_id, created_by=p.actor, **fields)
        self._compile_one(rule)
        await RuleRepo(s, p.org_id).add(rule)
        self._forget(s, p.org_id)
        await self.events.safety_rule_changed(s, rule, "wb.inference.safety_rule.created",
                                              p.actor)
        return rule

    async def update_rule(self, s: AsyncSession, p: Principal, rule_id: uuid.UUID,
                          changes: dict[str, Any]) -> SafetyRule:
        rule = await RuleRepo(s, p.org_id).get(rule_id)
        for k, v in changes.items():
            setattr(rule, k, v)
        self._compile_one(rule)
        await s.flush()
        self._forget(s, p.org_id)
        await self.events.safety_rule_changed(s, rule, "wb.inference.safety_rule.updated",
                                              p.actor)
        return rule

    async def delete_rule(self, s: AsyncSession, p: Principal, rule_id: uuid.UUID) -> None:
        rule = await RuleRepo(s, p.org_id).get(rule_id)
        await RuleRepo(s, p.org_id).delete(rule)
        self._forget(s, p.org_id)
        await self.events.safety_rule_changed(s, rule, "wb.inference.safety_rule.deleted",
                                              p.actor)

    def _as_rule(self, row: SafetyRule) -> safety.Rule:
        return safety.Rule(id=str(row.id), name=row.name, stage=row.stage, kind=row.kind,
                           patterns=tuple(row.patterns), action=row.action,
                           replacement=row.replacement)

    def _compile_one(self, row: SafetyRule) -> None:
        try:
            safety.compile_rule(self._as_rule(row))
        except safety.RuleError as exc:
            raise ValidationFailed(str(exc), code="invalid_rule",
                                   extra={"field": "patterns"}) from exc

    async def policy(self, s: AsyncSession, org_id: uuid.UUID) -> safety.Policy:
        if (cached := self._policies.get(org_id)) is not None:
            return cached
        rows = (await s.execute(select(SafetyRule).where(
            SafetyRule.org_id == org_id, SafetyRule.enabled.is_(True))
            .order_by(SafetyRule.id))).scalars()
        policy = safety.Policy([self._as_rule(r) for r in rows])
        self._policies.put(org_id, policy)
        return policy


