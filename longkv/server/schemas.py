"""Pydantic models of the OpenAI HTTP API subset that ``longkv serve`` speaks.

Requests are validated strictly (a string where a number belongs is an error,
not coerced), so a malformed request is a 400 with an OpenAI-style error object,
never a 500. Fields the OpenAI API defines but longkv cannot honour (logprobs,
penalties, ``n > 1``, the legacy ``functions``) are rejected by the app rather than
silently ignored; unknown fields are accepted, as OpenAI does, and named back in
the response's ``longkv.ignored_fields``.

Extensions live under one key, ``"longkv"``, which the official client passes
with ``extra_body={"longkv": {...}}``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

INT_MAX = 2**31 - 1


class MemoryOptions(BaseModel):
    """``longkv.memory``: keep the session's context as KV spans across requests (see docs/memory.md)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    tool_keep: float | None = Field(
        0.5, gt=0.0, lt=1.0,
        description="Share of a tool result's KV kept once the step after it has read it whole "
        "(question-agnostic compression; the text stays with the client). null: keep tool results whole.",
    )  # fmt: skip
    drop: list[int] = Field(
        default_factory=list, max_length=4096,
        description="Span ids to cut out of the session before this request (their KV freed, no prefill).",
    )  # fmt: skip
    save: bool = Field(False, description="Write the session to the server's --memory-dir after this request (fsynced).")


class LongKVOptions(BaseModel):
    """The ``"longkv"`` extension object of a request."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    policy: str | None = Field(
        None,
        max_length=256,
        description="KV policy spec: dense (default), auto, streaming, or NAME:knob=value,... "
        "Only dense (or an eviction policy that evicts nothing) shares the prefix cache.",
    )
    budget: int | None = Field(None, ge=1, le=INT_MAX, description="KV budget in tokens for eviction policies.")
    question: str | None = Field(
        None, min_length=1, max_length=65536,
        description="The question the request asks: the text that ends the last user message (chat) or the prompt. "
        "block_topk chooses the pages it reads from the question's own tokens (and the template's tail) instead of "
        "the prompt's last 32, as longkv ask does; eviction policies that score with queries compress for it "
        "(question-aware).",
    )  # fmt: skip
    dry_multiplier: float = Field(
        0.0, ge=0.0, le=100.0,
        description="Loop guard (DRY): a token that would extend a repeat of the generated text loses "
        "dry_multiplier * 1.75 ** (run - 2) from its logit; 0 (default): off, 0.8: what longkv ask uses.",
    )
    session: str | None = Field(
        None, min_length=1, max_length=256,
        description="Session id: pins this session's latest path in the prefix cache; "
        "with memory, names the session's KV spans.",
    )  # fmt: skip
    memory: MemoryOptions | None = Field(
        None, description="KV memory for the session (needs session): the context lives on as spans of KV that "
        "later requests reuse, compress and edit without a new prefill.",
    )  # fmt: skip
    cache: bool = Field(True, description="Read and write the prefix cache (false: compute everything, store nothing).")
    cache_salt: str | None = Field(
        None, max_length=256, description="Requests share cached prefixes only with requests of the same salt."
    )
    top_k: int = Field(0, ge=0, le=INT_MAX, description="Keep the k most likely tokens when sampling (0: all).")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens (benchmarks).")
    grammar: bool = Field(
        True,
        description="Constrain tool calls and response_format JSON with a grammar (default). false: the model "
        "writes freely; calls are parsed leniently and those that do not parse or fit their schema are reported.",
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both completion endpoints."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: str = Field(max_length=512, description="A model id from GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, le=INT_MAX, description="Most tokens to generate.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 for greedy decoding (default 1).")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Nucleus sampling threshold.")
    top_k: int | None = Field(None, ge=-1, le=INT_MAX, description="Keep the k most likely tokens (as vLLM; -1 or 0: all).")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Keep tokens at least min_p times as likely as the best (as vLLM; 0: off).")
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=100.0, description="> 1 makes tokens already generated less likely (as vLLM; 1: off)."
    )
    ignore_eos: bool | None = Field(None, description="Keep generating past end-of-sequence tokens (as vLLM; benchmarks).")
    seed: int | None = Field(
        None, ge=-(2**63), le=2**64 - 1, description="Seed: the same seed reproduces a sample; -1 (as llama.cpp) or none: a fresh one."
    )
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


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str = Field(max_length=64)
    arguments: str = Field(description="The arguments as a JSON object text.")


class ToolCall(BaseModel):
    """A call the assistant made (in a request's history and in a response)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="Calls an assistant message made.")
    tool_call_id: str | None = Field(None, max_length=256, description="The call a tool message answers.")

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        """An image or audio part is named as such, not as a failed match of every content form."""
        for i, part in enumerate(value if isinstance(value, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise ValueError(f"part {i} is {kind!r}: longkv serves text models, so content takes text parts only (send the text)")
        return value


class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str = Field(description="1-64 letters, digits, _ or -.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments (an object).")
    strict: bool | None = Field(None, description="Accepted; calls are always constrained to the schema under the grammar.")


class ToolDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["function"]
    function: NamedFunction


class AllowedTools(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    mode: Literal["auto", "required"] = Field(description="auto: a call or words; required: at least one call.")
    tools: list[NamedToolChoice] = Field(min_length=1, description="The tools the reply may call, by name (all are still shown).")


class AllowedToolsChoice(BaseModel):
    """``{"type": "allowed_tools", "allowed_tools": {"mode": ..., "tools": [...]}}``: every tool stays in the prompt
    (so its prefix, and the KV cached for it, do not change) while the reply may call only these."""

    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


def _tool_choice_kind(value: Any) -> str | None:
    """Which form of ``tool_choice`` a value is meant to be, so that a bad one is judged against that form alone."""
    if isinstance(value, str):
        return "<mode>"
    if isinstance(value, AllowedToolsChoice) or (isinstance(value, dict) and value.get("type") == "allowed_tools"):
        return "<allowed_tools>"
    if isinstance(value, (dict, NamedToolChoice)):
        return "<function>"
    return None


# a tagged union: an error names the one form the value was meant as (its tag, in <>, is left out of the field name)
ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("<mode>")]
    | Annotated[NamedToolChoice, Tag("<function>")]
    | Annotated[AllowedToolsChoice, Tag("<allowed_tools>")],
    Discriminator(_tool_choice_kind, custom_error_type="tool_choice",
                  custom_error_message="Input should be 'none', 'auto', 'required', a function object or an allowed_tools object"),
]  # fmt: skip


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema the reply follows.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far (at least one message).")
    max_completion_tokens: int | None = Field(None, ge=1, le=INT_MAX, description="Same as max_tokens.")
    tools: list[ToolDef] | None = Field(None, max_length=128, description="Functions the model may call.")
    tool_choice: ToolChoice | None = Field(
        None,
        description="none, auto (default with tools), required, {'type': 'function', 'function': {'name': ...}}, or "
        "{'type': 'allowed_tools', 'allowed_tools': {'mode': 'auto'|'required', 'tools': [{'type': 'function', 'function': "
        "{'name': ...}}, ...]}} (only those may be called; all stay in the prompt).",
    )
    parallel_tool_calls: bool | None = Field(None, description="More than one call per reply (default true).")
    response_format: ResponseFormat | None = Field(None, description="text, json_object, or json_schema (grammar-constrained).")


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
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    longkv: dict[str, Any] | None = Field(
        None,
        description="With tools or response_format: grammar (on/off), mask_ms_per_token, tool_call_errors, "
        "truncated_tool_call (a call cut off by max_tokens, never returned as a call), recovered_tool_calls. "
        "With memory: memory (session, spans, kv_tokens, logical_tokens, kv_bytes, edits). ignored_fields: "
        "top-level request fields longkv does not read (accepted, not acted on).",
    )


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
    longkv: dict[str, Any] | None = Field(
        None, description="With memory: memory (session, spans, kv_tokens, logical_tokens, kv_bytes, edits). ignored_fields: "
        "top-level request fields longkv does not read."
    )


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
