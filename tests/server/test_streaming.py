"""The SSE response closes its generator (and so the engine's stream) when the client leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from server.proxy import ClosingStreamingResponse


def _disconnect_after_two_chunks(response_type: type[StreamingResponse]) -> list[str]:
    """Stream to a client that goes away after two chunks; what the generator saw by the time
    the response returned."""
    seen: list[str] = []

    async def events() -> AsyncIterator[bytes]:
        try:
            for i in range(1000):
                yield f"data: {i}\n\n".encode()
        finally:
            seen.append("closed")  # the gateway closes the upstream stream here

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)
        if len(sent) > 2:  # response start + two chunks, then the socket is gone
            raise OSError("client went away")

    async def receive() -> dict:
        await asyncio.Event().wait()
        return {}

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    response = response_type(events(), media_type="text/event-stream")

    async def run() -> None:
        with pytest.raises(ClientDisconnect):
            await response(scope, receive, send)
        seen.append("returned")

    asyncio.run(run())
    return seen


def test_a_disconnect_closes_the_stream_before_the_response_returns():
    assert _disconnect_after_two_chunks(ClosingStreamingResponse) == ["closed", "returned"]


def test_starlette_alone_leaves_it_open_until_garbage_collection():
    """Why the subclass exists: plain StreamingResponse returns with the generator suspended."""
    assert _disconnect_after_two_chunks(StreamingResponse)[0] == "returned"
