"""Request/response models: the OpenAPI schema's single source of truth.

Messages and content parts are typed as the OpenAI chat API defines them (a discriminated union
on ``role`` and on ``type``), so the schema clients and API tools read is the contract the
gateway enforces. Request fields the gateway does not model pass through to vLLM unchanged.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from sparse_plugin.contract import SparsityKnob


class _Strict(BaseModel):
    # strict: a JSON string is not a number here, nor a number a bool (no silent coercion)
    model_config = ConfigDict(extra="forbid", strict=True)


# -- content parts -----------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str = Field(
        min_length=1,
        description="`data:image/...;base64,...`, or an http(s) URL from a host the operator "
        "allows (the gateway fetches it; the engine never does).",
    )
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str = Field(
        min_length=1,
        description="`data:video/...;base64,...` (mp4, webm, avi, mov, mkv), or an http(s) URL "
        "from a host the operator allows (the gateway fetches it; the engine never does).",
    )


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


UserPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


# -- messages ----------------------------------------------------------------------------------
class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI chat completion request. The common sampling fields are typed here (so a
    schema-valid request is one vLLM accepts); other OpenAI / vLLM fields pass through."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=8)
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    user: str | None = None
    sparsity: SparsityKnob | None = Field(
        None,
        description="Visual-token pruning for this request's images and videos. Absent: the "
        "gateway's default. With the openai client: `extra_body={'sparsity': {...}}`.",
    )


# -- responses ---------------------------------------------------------------------------------
class VisualTokenUsage(BaseModel):
    original: int = Field(description="Visual tokens the images and videos take unpruned.")
    kept: int = Field(description="Visual tokens the language model actually processed.")
    saved: int = Field(description="original - kept.")


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int | None = 0
    total_tokens: int
    prompt_tokens_details: dict[str, Any] | None = None
    visual_tokens: VisualTokenUsage | None = None
    sparsity: dict[str, Any] | None = Field(
        None, description="The pruning applied (after the server's default and caps), or null."
    )


class ResponseMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | None = None


class Choice(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    message: ResponseMessage
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: str = "model"


class ModelList(BaseModel):
    model_config = ConfigDict(extra="allow")

    object: str = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    upstream: Literal["ready", "unavailable"]
