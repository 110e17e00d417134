"""The gateway: OpenAI chat completions with per-request visual-token sparsity, in front of vLLM.

``create_app(settings)`` builds the app; ``uvicorn server.main:app`` serves one with settings
from the environment.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.accounting import ModelGeometry, Size, visual_usage
from server.config import Settings
from server.deps import Authorized, require_metrics_key
from server.errors import GatewayError, error_response, install_error_handlers
from server.images import validate_images
from server.metrics import Metrics
from server.proxy import relay_sse, request_json, send
from server.schemas import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse, Health
from sparse_plugin.contract import KNOB_KEY, SparsityKnob

logger = logging.getLogger("sparsevlm.gateway")

CHAT = "/v1/chat/completions"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 413, 429, 503, 504)
}


class BodyLimit:
    """ASGI middleware: 413 for bodies over the limit, by Content-Length or by bytes received."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise GatewayError(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body larger than the limit of {self.max_bytes} bytes"

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(413, self._message())(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    geometry = ModelGeometry.from_dir(settings.model_dir) if settings.model_dir else None
    in_flight = 0

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = httpx.AsyncClient(
            base_url=settings.upstream_url,
            timeout=httpx.Timeout(settings.request_timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=settings.max_concurrency + 8,
                max_keepalive_connections=settings.max_concurrency,
                # below the engine's (uvicorn's) 5 s keep-alive, so an idle connection is never
                # reused just as the engine closes it (a spurious 502 under bursty load)
                keepalive_expiry=2.0,
            ),
        )
        try:
            yield
        finally:
            await app.state.client.aclose()

    app = FastAPI(
        title="SparseVLM gateway",
        version="0.1.0",
        description="OpenAI-compatible chat completions for vision-language models, with "
        "per-request SparseVLM visual-token pruning (`sparsity`).",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    app.state.settings, app.state.metrics = settings, metrics

    @app.middleware("http")
    async def request_id(request: Request, call_next: Any) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid
        try:
            response = await call_next(request)
        except GatewayError as exc:  # raised inside the body-limit receive wrapper
            response = error_response(exc.status, exc.message, exc.param, exc.headers)
        response.headers["X-Request-ID"] = rid
        return response

    def resolve_knob(body: ChatCompletionRequest) -> SparsityKnob | None:
        if body.model_extra and "mm_processor_kwargs" in body.model_extra:
            raise GatewayError(
                400,
                "mm_processor_kwargs is not accepted here; use the `sparsity` object",
                "mm_processor_kwargs",
            )
        knob = body.sparsity if body.sparsity is not None else settings.default_sparsity
        cap = settings.max_visual_tokens
        if knob is not None and knob.enabled and cap is not None:
            if knob.visual_tokens is not None and knob.visual_tokens > cap:
                knob = knob.model_copy(update={"visual_tokens": cap})
        return knob

    def upstream_body(body: ChatCompletionRequest, knob: SparsityKnob | None) -> dict[str, Any]:
        payload = body.model_dump(exclude={"sparsity"}, exclude_none=True)
        if knob is not None:
            payload["mm_processor_kwargs"] = {KNOB_KEY: knob.model_dump(exclude_none=True)}
        if body.stream:
            payload["stream_options"] = {**(body.stream_options or {}), "include_usage": True}
        return payload

    def account(
        model: str, sizes: list[Size | None], usage: dict[str, Any], knob: SparsityKnob | None
    ) -> dict[str, Any]:
        pruned = "true" if sizes and knob is not None and knob.enabled else "false"
        details = usage.get("prompt_tokens_details") or {}
        metrics.prompt_tokens.labels(model=model, pruned=pruned).inc(usage["prompt_tokens"])
        cached = int(details.get("cached_tokens") or 0)
        metrics.prompt_tokens_cached.labels(model=model, pruned=pruned).inc(cached)
        visual = visual_usage(geometry, sizes, usage)
        if visual is not None:
            usage = {**usage, "visual_tokens": visual}
            metrics.visual_original.labels(model=model).inc(visual["original"])
            metrics.visual_kept.labels(model=model).inc(visual["kept"])
            metrics.visual_saved.labels(model=model).inc(visual["saved"])
            if geometry is not None and visual["saved"] > 0:
                flops = geometry.flops_saved(visual["saved"], int(usage["prompt_tokens"]))
                metrics.flops_saved.labels(model=model).inc(flops)
        return usage

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**ERRORS, 200: {"description": "JSON, or SSE when `stream` is true"}},
    )
    async def chat_completions(
        body: ChatCompletionRequest, request: Request, _: Authorized
    ) -> Response:
        nonlocal in_flight
        if in_flight >= settings.max_concurrency:
            raise GatewayError(
                429,
                f"too many requests in flight (limit {settings.max_concurrency}); retry later",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        knob = resolve_knob(body)
        sizes = validate_images(body.messages, settings)
        model, started = body.model, time.perf_counter()
        headers = {"X-Request-Id": request.state.request_id}
        payload = upstream_body(body, knob)
        in_flight += 1
        metrics.in_flight.inc()
        status = 500
        try:
            if not body.stream:
                status, data = await request_json(
                    request.app.state.client, metrics, "POST", CHAT, json=payload, headers=headers
                )
                metrics.ttft.labels(model=model).observe(time.perf_counter() - started)
                if status == 200 and data.get("usage"):
                    data["usage"] = account(model, sizes, data["usage"], knob)
                _log(request, model, status, started, knob)
                return JSONResponse(data, status_code=status)
            resp = await send(
                request.app.state.client, metrics, "POST", CHAT, json=payload, headers=headers,
                stream=True,
            )  # fmt: skip
            status = resp.status_code
            if status != 200:
                data = json.loads(await resp.aread() or b"{}")
                await resp.aclose()
                _log(request, model, status, started, knob)
                return JSONResponse(data, status_code=status)
        except GatewayError as exc:
            status = exc.status
            raise
        finally:
            if body.stream is False or status != 200:
                _finish(model, status, started)

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            outcome = 200
            try:
                async for event in relay_sse(
                    resp,
                    keep_usage_chunk=include_usage,
                    on_usage=lambda usage: account(model, sizes, usage, knob),
                    on_first_token=lambda: metrics.ttft.labels(model=model).observe(
                        time.perf_counter() - started
                    ),
                ):
                    yield event
            except BaseException:
                outcome = 499  # client went away (or the stream broke): upstream was closed
                raise
            finally:
                _finish(model, outcome, started)
                _log(request, model, outcome, started, knob)

        return StreamingResponse(events(), media_type="text/event-stream")

    def _finish(model: str, status: int, started: float) -> None:
        nonlocal in_flight
        in_flight -= 1
        metrics.in_flight.dec()
        metrics.requests.labels(model=model, status=str(status)).inc()
        metrics.duration.labels(model=model).observe(time.perf_counter() - started)

    @app.get("/v1/models", responses=ERRORS)
    async def models(request: Request, _: Authorized) -> JSONResponse:
        status, data = await request_json(request.app.state.client, metrics, "GET", "/v1/models")
        return JSONResponse(data, status_code=status)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health(request: Request) -> JSONResponse:
        try:
            r = await request.app.state.client.get("/health", timeout=2.0)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        body = Health(status="ok" if ok else "degraded", upstream="ready" if ok else "unavailable")
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=[Depends(require_metrics_key)])
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _log(
    request: Request, model: str, status: int, started: float, knob: SparsityKnob | None
) -> None:
    logger.info(
        json.dumps(
            {
                "event": "chat_completion",
                "request_id": request.state.request_id,
                "model": model,
                "status": status,
                "seconds": round(time.perf_counter() - started, 4),
                "sparsity": knob.canonical() if knob is not None else None,
            }
        )
    )


def app_from_env() -> FastAPI:
    return create_app(Settings())
