"""What the gateway's routes share: settings, metrics, the engine client, the image fetcher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import httpx
from fastapi import Depends, Request

from server.accounting import ModelGeometry
from server.config import Settings
from server.metrics import Metrics
from server.remote import RemoteImages


@dataclass
class Gateway:
    settings: Settings
    metrics: Metrics
    geometry: ModelGeometry | None
    remote: RemoteImages
    client: httpx.AsyncClient | None = None  # the engine; opened in the app's lifespan
    in_flight: int = 0

    @property
    def engine(self) -> httpx.AsyncClient:
        assert self.client is not None, "the gateway's lifespan has not started"
        return self.client


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


State = Annotated[Gateway, Depends(get_gateway)]
