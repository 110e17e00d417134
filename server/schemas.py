"""Request/response models: the OpenAPI schema's single source of truth."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sparse_plugin.contract import SparsityKnob


class ChatCompletionRequest(BaseModel):
    """OpenAI chat completion request; unknown OpenAI fields pass through to vLLM unchanged."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    sparsity: SparsityKnob | None = Field(
        None,
        description="Visual-token pruning for this request's images. Absent: the gateway's "
        "default. With the openai client: `extra_body={'sparsity': {...}}`.",
    )


class VisualTokenUsage(BaseModel):
    original: int = Field(description="Visual tokens the images take without pruning.")
    kept: int = Field(description="Visual tokens the language model actually processed.")
    saved: int = Field(description="original - kept.")


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int | None = 0
    total_tokens: int
    visual_tokens: VisualTokenUsage | None = None


class ChatCompletionResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    upstream: str
