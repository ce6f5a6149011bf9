"""Pydantic models of the OpenAI HTTP API subset that ``longkv serve`` speaks.

Requests are validated strictly (a string where a number belongs is an error,
not coerced), so a malformed request is a 400 with an OpenAI-style error object,
never a 500. Fields the OpenAI API defines but longkv cannot honour (tools,
logprobs, penalties, ``n > 1``) are rejected by the app rather than silently
ignored; unknown fields are ignored, as OpenAI does.

Extensions live under one key, ``"longkv"``, which the official client passes
with ``extra_body={"longkv": {...}}``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT_MAX = 2**31 - 1


class LongKVOptions(BaseModel):
    """The ``"longkv"`` extension object of a request."""

    model_config = ConfigDict(strict=True, extra="forbid")

    policy: str | None = Field(
        None,
        max_length=256,
        description="KV policy spec: dense (default), auto, streaming, or NAME:knob=value,... "
        "Only dense (or an eviction policy that evicts nothing) shares the prefix cache.",
    )
    budget: int | None = Field(None, ge=1, le=INT_MAX, description="KV budget in tokens for eviction policies.")
    dry_multiplier: float = Field(
        0.0, ge=0.0, le=100.0,
        description="Loop guard (DRY): a token that would extend a repeat of the generated text loses "
        "dry_multiplier * 1.75 ** (run - 2) from its logit; 0 (default): off, 0.8: what longkv ask uses.",
    )
    session: str | None = Field(
        None, min_length=1, max_length=256, description="Session id: pins this session's latest path in the prefix cache."
    )
    cache: bool = Field(True, description="Read and write the prefix cache (false: compute everything, store nothing).")
    cache_salt: str | None = Field(
        None, max_length=256, description="Requests share cached prefixes only with requests of the same salt."
    )
    top_k: int = Field(0, ge=0, le=INT_MAX, description="Keep the k most likely tokens when sampling (0: all).")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens (benchmarks).")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both completion endpoints."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str = Field(max_length=512, description="A model id from GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, le=INT_MAX, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 for greedy decoding (default 1).")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Nucleus sampling threshold.")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Seed: the same seed reproduces a sample.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the completion.")
    n: int | None = Field(None, ge=1, le=128, description="Only 1 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Only 0 is supported.")
    logprobs: Any = Field(None, description="Not supported.")
    user: str | None = None
    longkv: LongKVOptions | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far (at least one message).")
    max_completion_tokens: int | None = Field(None, ge=1, le=INT_MAX, description="Same as max_tokens.")


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] = Field(description="Text, a list of token ids, or a list of one text.")
    echo: bool | None = False
    suffix: str | None = None


# --------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV came from the prefix cache.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "longkv"
    max_model_len: int = Field(description="The model's trained window in tokens.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    running: int = Field(description="Generations running now (in the batch, at most --max-num-seqs).")
    queued: int = Field(description="Requests waiting for the engine.")
    cache_tokens: int = Field(description="Tokens held by the prefix cache.")
    cache_bytes: int = Field(description="Bytes held by the prefix cache.")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI-style error body. A context overflow adds ``n_prompt_tokens``, ``n_ctx`` and ``max_tokens``."""

    error: ErrorDetail
