"""Gateway settings (environment variables ``SPARSEVLM_GATEWAY_*``), validated at start-up.

``load_settings()`` turns every invalid value into one readable ``SettingsError`` that names the
environment variable (``sparsevlm serve`` and ``python -m server`` print it and exit 2, never a
traceback).
"""

from __future__ import annotations

import ipaddress
import json
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sparse_plugin.contract import SparsityKnob

ENV_PREFIX = "SPARSEVLM_GATEWAY_"


def _split_list(value: object) -> object:
    """One value, a comma-separated list, or a JSON list, as operators write them."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"looks like a JSON list but is not valid JSON ({exc.msg})") from None
    return [part.strip() for part in text.split(",") if part.strip()]


StrList = Annotated[list[str], NoDecode]  # NoDecode: the validator below parses the raw string


class Settings(BaseSettings):
    # env_ignore_empty: compose files pass `VAR: ${VAR:-}` through, and empty means "not set".
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    upstream_url: str = Field("http://127.0.0.1:8001", description="vLLM OpenAI server (internal).")
    model_dir: Path | None = Field(
        None, description="Served checkpoint dir: its config.json gives token/FLOP accounting."
    )
    api_keys: StrList = Field(
        default_factory=list, description="Accepted bearer keys: one, comma-separated, or JSON."
    )
    api_keys_file: Path | None = Field(
        None, description="File with one accepted key per line (blank lines and # comments skip)."
    )
    metrics_require_key: bool = False
    default_sparsity: SparsityKnob | None = Field(
        None, description="Applied when a request has no `sparsity` (JSON)."
    )
    max_visual_tokens: int | None = Field(
        None,
        ge=1,
        description="Cap on every image's visual tokens, whatever the request asks "
        "(`visual_tokens`, `keep_ratio`, `off`, no knob).",
    )
    allow_unpruned: bool = Field(
        True,
        description="Whether clients may opt out of pruning with `method: off` (400 if not); "
        "under `max_visual_tokens` an opted-out image still gets at most the cap.",
    )
    max_output_tokens: int | None = Field(
        None,
        ge=1,
        description="Cap on `max_tokens` / `max_completion_tokens` (larger asks are a 400; "
        "unset: the engine's context is the limit).",
    )
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    body_timeout_s: float = Field(
        30.0, gt=0, description="Deadline to receive a request's whole body (else 408)."
    )
    max_images: int = Field(8, ge=1)
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Pixels of an image, and of a video's frame (else 413)."
    )
    # Videos (Qwen2.5-VL, Qwen3-VL): checked from the container's metadata and first frame.
    max_videos: int = Field(1, ge=0, description="Videos per request (0: none accepted).")
    max_video_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1,
        description="Bytes of one video, data URL or remote (else 413). A data URL is also "
        "bound by `max_body_bytes` (base64 adds a third).",
    )
    max_video_frames: int = Field(
        9000, ge=1, description="Frames in the container of one video (else 413)."
    )
    max_video_seconds: float = Field(
        300.0, gt=0, description="Duration of one video, frames / fps (else 413)."
    )
    video_decode_timeout_s: float = Field(
        10.0, gt=0, description="Deadline to read one video's metadata and first frame (else 400)."
    )
    max_concurrency: int = Field(64, ge=1)
    retry_after_s: int = Field(1, ge=0)
    connect_timeout_s: float = Field(1.0, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)
    # Remote media (images and videos): fetched by the gateway (never the engine), off unless an
    # allow-list is set. Videos are capped by max_video_bytes instead of remote_image_max_bytes.
    remote_image_hosts: StrList = Field(
        default_factory=list,
        description="Hosts (exact, or `*.example.com`) remote image and video URLs may name; "
        "empty = off.",
    )
    remote_image_allow_http: bool = Field(False, description="Also plain http:// URLs.")
    remote_image_allowed_networks: StrList = Field(
        default_factory=list,
        description="Non-public networks (CIDR) image hosts may still resolve to; everything "
        "private, loopback, link-local, CGNAT or reserved is refused otherwise. For tests and "
        "trusted internal image stores only: it opens those networks to the gateway's clients.",
    )
    remote_image_max_bytes: int = Field(10 * 1024 * 1024, ge=1)
    remote_image_connect_timeout_s: float = Field(3.0, gt=0)
    remote_image_timeout_s: float = Field(10.0, gt=0, description="Whole fetch, all redirects.")
    remote_image_max_redirects: int = Field(3, ge=0)

    @field_validator(
        "api_keys", "remote_image_hosts", "remote_image_allowed_networks", mode="before"
    )
    @classmethod
    def _lists(cls, v: object) -> object:
        return _split_list(v)

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not key or any(c.isspace() for c in key):
                raise ValueError("an API key must be non-empty and contain no whitespace")
        return keys

    @field_validator("remote_image_allowed_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for net in networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a network (e.g. 10.0.0.0/8)") from None
        return networks

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file(cls, path: Path | None) -> Path | None:
        if path is not None and not read_keys(path):
            raise ValueError(f"{path} holds no key")
        return path

    @cached_property
    def accepted_keys(self) -> tuple[str, ...]:
        return (*self.api_keys, *(read_keys(self.api_keys_file) if self.api_keys_file else []))


def read_keys(path: Path) -> list[str]:
    """The keys in a keys file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class SettingsError(ValueError):
    """Invalid gateway settings; the message names each variable and what is wrong with it."""


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and ``overrides``), or a SettingsError that says why not."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field, *inner = [str(part) for part in err["loc"]] or ["settings"]
            name = f"{ENV_PREFIX}{field.upper()}" + (f" ({'.'.join(inner)})" if inner else "")
            lines.append(f"{name}: {err['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid gateway settings:\n  " + "\n  ".join(lines)) from None
