"""Request dependencies: API-key authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from server.config import Settings
from server.errors import GatewayError


def require_key(request: Request) -> None:
    """Bearer auth against the configured keys (constant-time; no keys configured = open)."""
    settings: Settings = request.app.state.settings
    keys = settings.accepted_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    token = auth[7:] if auth.lower().startswith("bearer ") else ""
    ok = False
    for key in keys:  # compare with every key: the timing does not reveal which one matched
        ok |= hmac.compare_digest(token.encode(), key.encode())
    if not ok:
        raise GatewayError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")


def require_metrics_key(request: Request) -> None:
    if request.app.state.settings.metrics_require_key:
        require_key(request)


Authorized = Annotated[None, Depends(require_key)]
