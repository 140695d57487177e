"""HTTP routes of the inference management API: the model catalog, deployments ("inference
services") and their lifecycle and metrics, traffic-splitting routes, content-safety rules."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response

from services.inference import schemas as sch
from services.inference.metrics import Metrics
from services.inference.models import Deployment
from services.inference.service import DeploymentRepo, InferenceService, RouteRepo, RuleRepo
from workbench.deps import SessionDep
from workbench.identity.deps import require
from workbench.identity.principal import Principal
from workbench.problems import PROBLEM_RESPONSES
from workbench.schemas import CursorQuery, LimitQuery, Page

router = APIRouter(prefix="/api/v1/inference", tags=["inference"],
                   responses=PROBLEM_RESPONSES)
Reader = Annotated[Principal, require("inference:read")]
Writer = Annotated[Principal, require("inference:write")]
Deleter = Annotated[Principal, require("inference:delete")]


def svc(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.inference_service
    return service


def view(request: Request, d: Deployment) -> dict[str, Any]:
    out = sch.DeploymentRead.model_validate(d).model_dump()
    out["replica_status"] = [
        {"index": r.index, "status": r.status, "restarts": r.restarts, "inflight": r.inflight,
         "queue_depth": r.queue_depth, "last_error": r.last_error[:500]}
        for r in svc(request).supervisor.replicas(str(d.id))]
    return out


# ---- models -----------------------------------------------------------------------------------

@router.get("/models", response_model=list[sch.ModelRead],
            summary="The model catalog: built-in models and the org's external endpoints")
async def list_models(p: Reader, s: SessionDep, request: Request) -> Any:
    return await svc(request).catalog(s, p)


@router.post("/models", status_code=201, response_model=sch.ModelRead,
             summary="Register an external OpenAI-compatible endpoint (its key stored encrypted)")
async def register_model(body: sch.ModelRegister, p: Writer, s: SessionDep,
                         request: Request) -> Any:
    m = await svc(request).register_model(
        s, p, name=body.name, kind=body.kind, base_url=str(body.base_url),
        remote_model=body.remote_model, api_key=body.api_key,
        context_length=body.context_length, description=body.description)
    return svc(request).external_view(m)


@router.get("/models/{model_id}", response_model=sch.ModelRead,
            summary="An external model (built-in ones are in the list)")
async def get_model(model_id: uuid.UUID, p: Reader, s: SessionDep, request: Request) -> Any:
    return svc(request).external_view(await svc(request).get_external(s, p, model_id))


@router.delete("/models/{model_id}", status_code=204, summary="Remove an external model")
async def delete_model(model_id: uuid.UUID, p: Deleter, s: SessionDep,
                       request: Request) -> Response:
    await svc(request).delete_model(s, p, model_id)
    return Response(status_code=204)


# ---- deployments ------------------------------------------------------------------------------

@router.post("/services", status_code=201, response_model=sch.DeploymentRead,
             summary="Create a deployment (pending until started)")
async def create_deployment(body: sch.DeploymentCreate, p: Writer, s: SessionDep,
                            request: Request) -> Any:
    d = await svc(request).create_deployment(
        s, p, name=body.name, model=body.model, runtime=body.runtime, replicas=body.replicas,
        resources=body.resources.model_dump(exclude_none=True), settings=body.settings,
        description=body.description, model_version=body.model_version)
    return view(request, d)


@router.get("/services", response_model=Page[sch.DeploymentRead], summary="List deployments")
async def list_deployments(p: Reader, s: SessionDep, request: Request, limit: LimitQuery = 50,
                           cursor: CursorQuery = None) -> Any:
    rows, nxt = await DeploymentRepo(s, p.org_id).list(limit=limit, cursor=cursor)
    return {"items": [view(request, d) for d in rows], "next_cursor": nxt}


@router.get("/services/{service_id}", response_model=sch.DeploymentRead,
            summary="A deployment, its status and its replicas")
async def get_deployment(service_id: uuid.UUID, p: Reader, s: SessionDep,
                         request: Request) -> Any:
    return view(request, await svc(request).get_deployment(s, p, service_id))


@router.patch("/services/{service_id}", response_model=sch.DeploymentRead,
              summary="Rename or describe a deployment")
async def update_deployment(service_id: uuid.UUID, body: sch.DeploymentUpdate, p: Writer,
                            s: SessionDep, request: Request) -> Any:
    d = await svc(request).update_deployment(s, p, service_id,
                                             body.model_dump(exclude_unset=True))
    return view(request, d)


@router.delete("/services/{service_id}", status_code=204,
               summary="Stop and delete a deployment")
async def delete_deployment(service_id: uuid.UUID, p: Deleter, s: SessionDep,
                            request: Request) -> Response:
    await svc(request).delete_deployment(s, p, service_id)
    return Response(status_code=204)


@router.post("/services/{service_id}/start", response_model=sch.DeploymentRead,
             summary="Start the deployment's replicas (status deploying → running)")
async def start(service_id: uuid.UUID, p: Writer, s: SessionDep, request: Request) -> Any:
    return view(request, await svc(request).start(s, p, service_id))


@router.post("/services/{service_id}/stop", response_model=sch.DeploymentRead,
             summary="Stop the deployment's replicas")
async def stop(service_id: uuid.UUID, p: Writer, s: SessionDep, request: Request) -> Any:
    return view(request, await svc(request).stop(s, p, service_id))


@router.post("/services/{service_id}/scale", response_model=sch.DeploymentRead,
             summary="Change the number of replicas (a running deployment follows at once)")
async def scale(service_id: uuid.UUID, body: sch.ScaleRequest, p: Writer, s: SessionDep,
                request: Request) -> Any:
    return view(request, await svc(request).scale(s, p, service_id, body.replicas))


@router.get("/services/{service_id}/metrics", response_model=sch.MetricsRead,
            summary="Requests, errors, latency and time-to-first-token percentiles, tokens/s, "
                    "queue depth")
async def metrics(service_id: uuid.UUID, p: Reader, s: SessionDep, request: Request) -> Any:
    d = await svc(request).get_deployment(s, p, service_id)
    depth = sum(r.queue_depth for r in svc(request).supervisor.replicas(str(d.id)))
    m: Metrics = request.app.state.metrics
    return m.snapshot(str(d.id), queue_depth=depth)


# ---- routes -----------------------------------------------------------------------------------

@router.post("/routes", status_code=201, response_model=sch.RouteRead,
             summary="A model name that splits traffic between deployments by weight")
async def create_route(body: sch.RouteCreate, p: Writer, s: SessionDep,
                       request: Request) -> Any:
    return await svc(request).create_route(s, p, name=body.name,
                                           arms=[a.model_dump() for a in body.arms])


@router.get("/routes", response_model=Page[sch.RouteRead], summary="List routes")
async def list_routes(p: Reader, s: SessionDep, limit: LimitQuery = 50,
                      cursor: CursorQuery = None) -> Any:
    rows, nxt = await RouteRepo(s, p.org_id).list(limit=limit, cursor=cursor)
    return {"items": rows, "next_cursor": nxt}


@router.get("/routes/{route_id}", response_model=sch.RouteRead, summary="A route")
async def get_route(route_id: uuid.UUID, p: Reader, s: SessionDep, request: Request) -> Any:
    return await svc(request).get_route(s, p, route_id)


@router.put("/routes/{route_id}", response_model=sch.RouteRead,
            summary="Shift a route's weights (the next request follows; nothing restarts)")
async def update_route(route_id: uuid.UUID, body: sch.RouteUpdate, p: Writer, s: SessionDep,
                       request: Request) -> Any:
    return await svc(request).update_route(s, p, route_id, [a.model_dump() for a in body.arms])


@router.delete("/routes/{route_id}", status_code=204, summary="Delete a route")
async def delete_route(route_id: uuid.UUID, p: Deleter, s: SessionDep,
                       request: Request) -> Response:
    await svc(request).delete_route(s, p, route_id)
    return Response(status_code=204)


# ---- safety rules -----------------------------------------------------------------------------

@router.post("/safety-rules", status_code=201, response_model=sch.RuleRead,
             summary="Add a content-safety rule (keywords, regex or PII; block or redact)")
async def create_rule(body: sch.RuleCreate, p: Writer, s: SessionDep, request: Request) -> Any:
    return await svc(request).create_rule(s, p, **body.model_dump())


@router.get("/safety-rules", response_model=Page[sch.RuleRead], summary="List safety rules")
async def list_rules(p: Reader, s: SessionDep, limit: LimitQuery = 50,
                     cursor: CursorQuery = None) -> Any:
    rows, nxt = await RuleRepo(s, p.org_id).list(limit=limit, cursor=cursor)
    return {"items": rows, "next_cursor": nxt}


@router.patch("/safety-rules/{rule_id}", response_model=sch.RuleRead,
              summary="Change or disable a safety rule")
async def update_rule(rule_id: uuid.UUID, body: sch.RuleUpdate, p: Writer, s: SessionDep,
                      request: Request) -> Any:
    return await svc(request).update_rule(s, p, rule_id, body.model_dump(exclude_unset=True))


@router.delete("/safety-rules/{rule_id}", status_code=204, summary="Delete a safety rule")
async def delete_rule(rule_id: uuid.UUID, p: Deleter, s: SessionDep,
                      request: Request) -> Response:
    await svc(request).delete_rule(s, p, rule_id)
    return Response(status_code=204)
