"""Request dependencies: API-key authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.config import Settings
from server.errors import GatewayError

# Declares the bearer scheme in the OpenAPI schema; the check itself is ours (constant-time,
# OpenAI-shaped 401), so FastAPI's own error is off.
bearer = HTTPBearer(auto_error=False, description="A gateway API key, when keys are configured.")


def check_key(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> None:
    """Bearer auth against the configured keys (no keys configured = open)."""
    keys = settings.accepted_keys
    if not keys:
        return
    token = credentials.credentials if credentials is not None else ""
    ok = False
    for key in keys:  # compare with every key: the timing does not reveal which one matched
        ok |= hmac.compare_digest(token.encode(), key.encode())
    if not ok:
        raise GatewayError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")


def require_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    check_key(request.app.state.gateway.settings, credentials)


def require_metrics_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    settings: Settings = request.app.state.gateway.settings
    if settings.metrics_require_key:
        check_key(settings, credentials)


Authorized = Annotated[None, Depends(require_key)]
