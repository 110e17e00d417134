"""``POST /v1/chat/completions``: resolve the pruning, check images and videos, forward, account."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from server.accounting import visual_totals, visual_usage_by_modality
from server.deps import Authorized
from server.errors import GatewayError
from server.media import Media, check_media
from server.proxy import (
    SESSION_HEADER,
    ClosingStreamingResponse,
    StreamBroken,
    relay_sse,
    request_json,
    send,
    session_key,
    sse_error,
)
from server.schemas import ChatCompletionRequest, ChatCompletionResponse, ErrorResponse
from server.state import Gateway, State
from sparse_plugin.contract import KNOB_KEY, SparsityKnob

logger = logging.getLogger("sparsevlm.gateway")
router = APIRouter()
CHAT = "/v1/chat/completions"
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 429, 502, 503, 504)
}


SSE_EVENT = {  # one server-sent event of a streamed answer
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A JSON `chat.completion.chunk` (the last one with `usage` when "
            'asked), an OpenAI-style `{"error": ...}` if the engine\'s stream broke, or `[DONE]`.',
        }
    },
}


def resolve_knob(gw: Gateway, body: ChatCompletionRequest) -> SparsityKnob | None:
    """The pruning this request gets: its own knob or the default, under the operator's caps
    (and the request's limits that need the served model or the operator's settings)."""
    settings = gw.settings
    if body.model_extra and "mm_processor_kwargs" in body.model_extra:
        raise GatewayError(
            400,
            "mm_processor_kwargs is not accepted here; use the `sparsity` object",
            "mm_processor_kwargs",
        )
    if body.sparsity is not None and not body.sparsity.enabled and not settings.allow_unpruned:
        raise GatewayError(
            400, "sparsity.method: 'off' is not allowed on this server", "sparsity.method"
        )
    limit = settings.max_output_tokens
    for name in ("max_tokens", "max_completion_tokens"):
        asked = getattr(body, name)
        if limit is not None and asked is not None and asked > limit:
            raise GatewayError(400, f"{name}: at most {limit} on this server, got {asked}", name)
    layers = gw.geometry.layers if gw.geometry is not None else None
    if body.sparsity is not None and layers is not None and body.sparsity.score_layer >= layers:
        raise GatewayError(
            400,
            f"sparsity.score_layer: must be below the model's {layers} decoder layers, "
            f"got {body.sparsity.score_layer}",
            "sparsity.score_layer",
        )
    knob = body.sparsity if body.sparsity is not None else settings.default_sparsity
    cap = settings.max_visual_tokens
    if cap is None:
        return knob
    if knob is None or not knob.enabled:  # keep every token, up to the cap
        return SparsityKnob(keep_ratio=1.0, max_visual_tokens=cap)
    return knob.model_copy(update={"max_visual_tokens": min(cap, knob.max_visual_tokens or cap)})


def upstream_body(
    body: ChatCompletionRequest, knob: SparsityKnob | None, max_output_tokens: int | None
) -> dict[str, Any]:
    payload = body.model_dump(exclude={"sparsity"}, exclude_none=True)
    if max_output_tokens is not None and body.max_tokens is None:
        if body.max_completion_tokens is None:  # the cap holds for requests that name none too
            payload["max_tokens"] = max_output_tokens
    if knob is not None:
        payload["mm_processor_kwargs"] = {KNOB_KEY: knob.model_dump(exclude_none=True)}
    if body.stream:
        options = body.stream_options.model_dump(exclude_none=True) if body.stream_options else {}
        payload["stream_options"] = {**options, "include_usage": True}
    return payload


def account(
    gw: Gateway, model: str, media: Media, usage: dict[str, Any], knob: SparsityKnob | None
) -> dict[str, Any]:
    """Usage extended with what pruning did (``visual_tokens``, ``sparsity``); metrics counted."""
    m, model = gw.metrics, gw.model_label(model, 200)  # usage comes with answers only
    pruned = "true" if media and knob is not None and knob.enabled else "false"
    details = usage.get("prompt_tokens_details") or {}
    m.prompt_tokens.labels(model=model, pruned=pruned).inc(usage["prompt_tokens"])
    m.prompt_tokens_cached.labels(model=model, pruned=pruned).inc(
        int(details.get("cached_tokens") or 0)
    )
    usage = {**usage, "sparsity": knob.canonical() if knob is not None and media else None}
    videos = [v.original_tokens for v in media.videos]
    by_modality = visual_usage_by_modality(gw.geometry, media.images, usage, videos)
    if by_modality is not None:
        for modality, counts in by_modality.items():
            m.visual_original.labels(model=model, modality=modality).inc(counts["original"])
            m.visual_kept.labels(model=model, modality=modality).inc(counts["kept"])
            m.visual_saved.labels(model=model, modality=modality).inc(counts["saved"])
        usage["visual_tokens"] = visual = visual_totals(by_modality)
        if gw.geometry is not None and visual["saved"] > 0:
            flops = gw.geometry.flops_saved(visual["saved"], int(usage["prompt_tokens"]))
            m.flops_saved.labels(model=model).inc(flops)
    return usage


@router.post(
    CHAT,
    response_model=ChatCompletionResponse,
    responses={
        **ERRORS,
        200: {
            "description": "JSON, or server-sent events when `stream` is true",
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
    },
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, gw: State, _: Authorized
) -> Response:
    settings, metrics = gw.settings, gw.metrics
    if gw.in_flight >= settings.max_concurrency:
        raise GatewayError(
            429,
            f"too many requests in flight (limit {settings.max_concurrency}); retry later",
            headers={"Retry-After": str(settings.retry_after_s)},
        )
    knob = resolve_knob(gw, body)
    model, started = body.model, time.perf_counter()
    gw.in_flight += 1  # from here on every path ends in finish()
    metrics.in_flight.inc()
    status = 500
    streaming = False

    def finish(final: int) -> None:
        gw.in_flight -= 1
        metrics.in_flight.dec()
        label = gw.model_label(model, final)
        metrics.requests.labels(model=label, status=str(final)).inc()
        metrics.duration.labels(model=label).observe(time.perf_counter() - started)
        _log(request, model, final, started, knob)

    try:
        count_video = gw.geometry.count_video if gw.geometry is not None else None
        media = await check_media(body.messages, settings, gw.remote, count_video)
        payload = upstream_body(body, knob, settings.max_output_tokens)
        headers = {
            "X-Request-Id": request.state.request_id,
            SESSION_HEADER: session_key(body.messages, request.headers.get(SESSION_HEADER)),
        }
        if not body.stream:
            status, data = await request_json(
                gw.engine, metrics, "POST", CHAT, json=payload, headers=headers
            )
            ttft = time.perf_counter() - started
            metrics.ttft.labels(model=gw.model_label(model, status)).observe(ttft)
            if status == 200 and data.get("usage"):
                data["usage"] = account(gw, model, media, data["usage"], knob)
            return JSONResponse(data, status_code=status)
        resp = await send(
            gw.engine, metrics, "POST", CHAT, json=payload, headers=headers, stream=True
        )
        status = resp.status_code
        if status != 200:
            data = json.loads(await resp.aread() or b"{}")
            await resp.aclose()
            return JSONResponse(data, status_code=status)
        streaming = True
    except GatewayError as exc:
        status = exc.status
        raise
    finally:
        if not streaming:
            finish(status)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[bytes]:
        outcome = 200
        try:
            async for event in relay_sse(
                resp,
                keep_usage_chunk=include_usage,
                on_usage=lambda usage: account(gw, model, media, usage, knob),
                on_first_token=lambda: metrics.ttft.labels(model=model).observe(
                    time.perf_counter() - started
                ),
            ):
                yield event
        except StreamBroken as exc:  # the engine failed after the first byte: tell the client
            outcome = 502
            metrics.upstream_errors.labels(kind=exc.kind).inc()
            yield sse_error(502, f"the engine's stream broke off: {exc}")
        except BaseException:
            outcome = 499  # the client went away: upstream was closed, vLLM aborts the request
            raise
        finally:
            finish(outcome)

    return ClosingStreamingResponse(events(), media_type="text/event-stream")


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
