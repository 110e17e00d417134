"""The gateway: OpenAI chat completions with per-request visual-token sparsity, in front of vLLM.

``create_app(settings)`` is the one assembly point: shared state, middleware, error handlers and
the routers (``server/routes/``). ``python -m server`` (or ``uvicorn server.main:app_from_env
--factory``) serves one with settings from the environment.
"""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.accounting import ModelGeometry
from server.config import Settings, load_settings
from server.errors import GatewayError, error_response, install_error_handlers
from server.metrics import Metrics
from server.remote import RemoteMedia
from server.routes import chat, service
from server.state import Gateway


class BodyLimit:
    """ASGI middleware for request bodies: 413 over the byte limit (by Content-Length or by bytes
    received), 408 when the whole body has not arrived within the deadline (a client trickling
    it cannot hold a connection and a task for ever). Later receives (the disconnect listener of
    a streaming response) pass through untouched."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, self._too_large())(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        seen, done = 0, False

        async def limited() -> Message:
            nonlocal seen, done
            if done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except TimeoutError:
                raise GatewayError(
                    408, f"the request body did not arrive within {self.timeout_s:g} s"
                ) from None
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise GatewayError(413, self._too_large())
            done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> str:
        return f"request body larger than the limit of {self.max_bytes} bytes"


def remote_media(settings: Settings) -> RemoteMedia:
    return RemoteMedia(
        settings.remote_image_hosts,
        allow_http=settings.remote_image_allow_http,
        allowed_networks=[
            ipaddress.ip_network(n, strict=False) for n in settings.remote_image_allowed_networks
        ],
        max_bytes=settings.remote_image_max_bytes,
        connect_timeout_s=settings.remote_image_connect_timeout_s,
        timeout_s=settings.remote_image_timeout_s,
        max_redirects=settings.remote_image_max_redirects,
    )


async def learn_served_models(gateway: Gateway) -> None:
    """The engine's model names, if it answers now: they label metrics and, in the schema, the
    values `model` takes. (An engine that is still starting is simply asked nothing more.)"""
    try:
        r = await gateway.engine.get("/v1/models", timeout=2.0)
        gateway.served.update(m["id"] for m in r.json().get("data", []) if "id" in m)
    except (httpx.HTTPError, ValueError, AttributeError, TypeError):
        pass


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    gateway = Gateway(
        settings=settings,
        metrics=Metrics(),
        geometry=ModelGeometry.from_dir(settings.model_dir) if settings.model_dir else None,
        remote=remote_media(settings),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway.client = httpx.AsyncClient(
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
        await learn_served_models(gateway)
        try:
            yield
        finally:
            await gateway.client.aclose()
            await gateway.remote.aclose()

    app = FastAPI(
        title="SparseVLM gateway",
        version="0.2.0",
        description="OpenAI-compatible chat completions for vision-language models, with "
        "per-request SparseVLM visual-token pruning (`sparsity`).",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    install_error_handlers(app)

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

    app.include_router(chat.router)
    app.include_router(service.router)
    app.openapi = lambda: openapi_contract(app)  # type: ignore[method-assign]
    return app


def openapi_contract(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, minus the 422 it documents by default (invalid requests get a 400 with
    an OpenAI-shaped error, ``server/errors.py``), plus the limits this deployment enforces that
    depend on its settings and served model (so the schema states them)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        gateway: Gateway = app.state.gateway
        if not gateway.settings.metrics_require_key:  # open: it takes no credentials
            schema["paths"]["/metrics"]["get"].pop("security", None)
        limit = gateway.settings.max_output_tokens
        request = components.get("ChatCompletionRequest", {}).get("properties", {})
        if gateway.served and "model" in request:
            request["model"]["enum"] = sorted(gateway.served)
        for name in ("max_tokens", "max_completion_tokens"):
            if limit is not None and name in request:
                for branch in request[name].get("anyOf", [request[name]]):
                    if branch.get("type") == "integer":
                        branch["maximum"] = limit
        knob = components.get("SparsityKnob", {}).get("properties", {})
        if gateway.geometry is not None and "score_layer" in knob:
            knob["score_layer"]["maximum"] = gateway.geometry.layers - 1
        app.openapi_schema = schema
    return app.openapi_schema


def app_from_env() -> FastAPI:
    return create_app(load_settings())
