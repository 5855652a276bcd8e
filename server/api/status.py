"""GET /health and GET /metrics: what load balancers and Prometheus read."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    state = request.app.state.loraplex
    engine = state.engine
    if state.draining:
        return JSONResponse({"status": "draining", "running": engine.num_running}, status_code=503)
    if engine.load_error is not None:
        return JSONResponse({"status": "failed", "error": str(engine.load_error)}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    router_state = "ready" if state.router.classifier is not None else state.router.unavailable_reason
    health = {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting, "router": router_state}
    if state.replicas is not None:  # Ray Serve: each engine replica as it last reported
        health["replicas"] = state.replicas.replicas()
    return health


@router.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.loraplex.metrics.registry), media_type=CONTENT_TYPE_LATEST)
