"""Forwarding to the vLLM OpenAI server: one shared client, explicit timeouts, SSE passthrough."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import httpx
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import GatewayError
from server.metrics import Metrics

# The routing key of a conversation, for a router in front of several engines (vllm-router's
# consistent_hash reads it before any other header, X-Request-Id included).
SESSION_HEADER = "X-Session-Id"


def session_key(messages: Sequence[BaseModel], client_key: str | None = None) -> str:
    """One key per conversation: a digest of its opening (system prompt and first user turn,
    images included), which a chat client resends unchanged with every follow-up; or of the
    client's own ``X-Session-Id`` where it sends one (e.g. when it trims early turns)."""
    digest = hashlib.sha256()
    if client_key:
        digest.update(b"client:" + client_key.encode())
    else:
        for message in messages:
            dumped = message.model_dump(mode="json", exclude_none=True)
            digest.update(json.dumps(dumped, sort_keys=True).encode())
            if dumped.get("role") == "user":
                break
    return digest.hexdigest()[:32]


def classify(exc: httpx.HTTPError) -> tuple[str, GatewayError]:
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return "timeout", GatewayError(504, "the engine did not answer in time")
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return "connect", GatewayError(503, "the engine is unavailable; retry shortly")
    return "protocol", GatewayError(502, f"bad answer from the engine: {type(exc).__name__}")


async def send(
    client: httpx.AsyncClient,
    metrics: Metrics,
    method: str,
    path: str,
    *,
    stream: bool = False,
    **kwargs: Any,
) -> httpx.Response:
    """One upstream call; transport failures become 503/504/502, error statuses are counted.

    With ``stream=True`` the response is returned as soon as its status is known (the caller
    closes it).
    """
    request = client.build_request(method, path, **kwargs)
    try:
        try:
            resp = await client.send(request, stream=stream)
        except httpx.RemoteProtocolError:
            # A pooled connection closed by the engine before it read the request: resend once.
            resp = await client.send(client.build_request(method, path, **kwargs), stream=stream)
    except httpx.HTTPError as exc:
        kind, err = classify(exc)
        metrics.upstream_errors.labels(kind=kind).inc()
        raise err from None
    if resp.status_code >= 400:
        metrics.upstream_errors.labels(kind=f"http_{resp.status_code // 100}xx").inc()
    return resp


async def request_json(
    client: httpx.AsyncClient, metrics: Metrics, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    resp = await send(client, metrics, method, path, **kwargs)
    try:
        return resp.status_code, resp.json()
    except ValueError:
        metrics.upstream_errors.labels(kind="protocol").inc()
        raise GatewayError(502, "the engine sent a non-JSON answer") from None


class StreamBroken(Exception):
    """The engine's stream failed after its first byte (``kind`` labels the upstream error)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def sse_error(status: int, message: str) -> bytes:
    """An OpenAI-style error object as one SSE event (the stream's last)."""
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": status}}
    return f"data: {json.dumps(body)}\n\n".encode()


async def relay_sse(
    resp: httpx.Response,
    *,
    keep_usage_chunk: bool,
    on_usage: Callable[[dict[str, Any]], dict[str, Any]],
    on_first_token: Callable[[], None],
) -> AsyncIterator[bytes]:
    """Pass SSE events through; extend the usage chunk; drop it if the client did not ask.

    Raises StreamBroken if the engine's stream breaks, carries garbage, reports an error, or ends
    without ``[DONE]``. Closing the upstream response (also when the client disconnects and this
    generator is cancelled) makes vLLM abort the request and free its KV cache.
    """
    first = True
    try:
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    yield b"data: [DONE]\n\n"
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise StreamBroken("protocol", "the engine sent a malformed event") from None
                if isinstance(chunk, dict) and chunk.get("error"):
                    error = chunk["error"]
                    text = error.get("message") if isinstance(error, dict) else str(error)
                    raise StreamBroken("http_5xx", f"the engine reported: {text}")
                if chunk.get("usage") and not chunk.get("choices"):
                    chunk["usage"] = on_usage(chunk["usage"])
                    if not keep_usage_chunk:
                        continue
                elif first and chunk.get("choices"):
                    first = False
                    on_first_token()
                yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
        except httpx.HTTPError as exc:
            kind, _ = classify(exc)
            raise StreamBroken(kind, type(exc).__name__) from None
        raise StreamBroken("protocol", "the engine's stream ended without [DONE]")
    finally:
        await resp.aclose()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body generator when the client goes away.

    Starlette stops iterating on a disconnect but leaves the generator suspended at its ``yield``
    until the garbage collector finalises it; until then the upstream stream stays open and vLLM
    keeps generating for nobody. Closing it here makes the abort (and its metrics) immediate.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):  # closing upstream must survive a cancel
                    await aclose()
