"""``GET /v1/models``, ``/health`` and ``/metrics``."""

from __future__ import annotations

import httpx
from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import Authorized, require_metrics_key
from server.proxy import request_json
from server.routes.chat import ERRORS
from server.schemas import Health, ModelList
from server.state import State

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(gw: State, _: Authorized) -> JSONResponse:
    status, data = await request_json(gw.engine, gw.metrics, "GET", "/v1/models")
    return JSONResponse(data, status_code=status)


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(gw: State) -> JSONResponse:
    """200 while the engine answers its own /health (within 2 s), else 503 at once."""
    try:
        ok = (await gw.engine.get("/health", timeout=2.0)).status_code == 200
    except httpx.HTTPError:
        ok = False
    body = Health(status="ok" if ok else "degraded", upstream="ready" if ok else "unavailable")
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    dependencies=[Depends(require_metrics_key)],
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        401: ERRORS[401],
    },
)
async def prometheus(gw: State) -> Response:
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)
