"""Gateway settings (environment variables ``SPARSEVLM_GATEWAY_*``), validated at start-up."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sparse_plugin.contract import SparsityKnob


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPARSEVLM_GATEWAY_", extra="ignore")

    upstream_url: str = Field("http://127.0.0.1:8001", description="vLLM OpenAI server (internal).")
    model_dir: Path | None = Field(
        None, description="Served checkpoint dir: its config.json gives token/FLOP accounting."
    )
    api_keys: list[str] = Field(default_factory=list, description="Accepted bearer keys.")
    api_keys_file: Path | None = Field(None, description="File with one accepted key per line.")
    metrics_require_key: bool = False
    default_sparsity: SparsityKnob | None = Field(
        None, description="Applied when a request has no `sparsity` (JSON)."
    )
    max_visual_tokens: int | None = Field(
        None, ge=1, description="Cap on a request's per-image budget (larger asks are lowered)."
    )
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_images: int = Field(8, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    allow_remote_images: bool = False
    max_concurrency: int = Field(64, ge=1)
    retry_after_s: int = Field(1, ge=0)
    connect_timeout_s: float = Field(1.0, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        return [k.strip() for k in v.split(",") if k.strip()] if isinstance(v, str) else v

    @cached_property
    def accepted_keys(self) -> tuple[str, ...]:
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            keys += [k.strip() for k in self.api_keys_file.read_text().splitlines() if k.strip()]
        return tuple(keys)
