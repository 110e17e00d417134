"""What the gateway's routes share: settings, metrics, the engine client, the media fetcher."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import httpx
from fastapi import Depends, Request

from server.accounting import ModelGeometry
from server.config import Settings
from server.metrics import Metrics
from server.remote import RemoteMedia


@dataclass
class Gateway:
    settings: Settings
    metrics: Metrics
    geometry: ModelGeometry | None
    remote: RemoteMedia
    client: httpx.AsyncClient | None = None  # the engine; opened in the app's lifespan
    in_flight: int = 0
    served: set[str] = field(default_factory=set)  # model names the engine has answered for

    def model_label(self, model: str, status: int) -> str:
        """The metrics label for a client's ``model``: only names the engine has served, so a
        client cannot grow the label set (any string it sends would otherwise become a series)."""
        if status == 200:
            self.served.add(model)
        return model if model in self.served else "unknown"

    @property
    def engine(self) -> httpx.AsyncClient:
        assert self.client is not None, "the gateway's lifespan has not started"
        return self.client


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


State = Annotated[Gateway, Depends(get_gateway)]
