"""OpenAI request schemas (pydantic: validation and the OpenAPI document) and error bodies.

Field names, types and ranges are OpenAI's (temperature in [0, 2], penalties in [-2, 2], top_logprobs
<= 20, ...). Unknown fields are ignored, as OpenAI-compatible servers do. Booleans are strict: JSON
true or false only, as OpenAI checks them (pydantic's lax mode would read "yes", "off", 1 and 0 as
booleans). A few extensions use vLLM's names: top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, skip_special_tokens,
chat_template_kwargs ({"thinking": true} opens the DeepSeek-R1 reasoning block), and
return_token_ids (adds prompt_token_ids / token_ids to each choice).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

MAX_N = 16
MAX_STOP = 8
MAX_PROMPTS = 64
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1

NonNegInt = Annotated[int, Field(ge=0)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


def _null_allowed(schema: dict, cls: type) -> None:
    """The OpenAPI document says what `_null_is_the_default` accepts: null for every optional field."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        branches = prop.get("anyOf", [prop])
        if name in required or any(b.get("type") == "null" for b in branches):
            continue
        meta = {k: prop[k] for k in ("title", "description", "default") if k in prop}
        core = {k: v for k, v in prop.items() if k not in meta}
        if core:
            schema["properties"][name] = {**meta, "anyOf": [core, {"type": "null"}]}


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, json_schema_extra=_null_allowed)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """An explicit null for an optional field means its default, as OpenAI reads it: the openai
        client sends `"n": null` for n=None, and `"max_tokens": null` asks completions for 16."""
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
        return data


class StreamOptions(_Base):
    include_usage: StrictBool = False


class TextPart(_Base):
    type: Literal["text"]
    text: str


class FunctionCall(_Base):
    name: str
    arguments: str = Field(description="the arguments as JSON text, as the model wrote them")


class ToolCallItem(_Base):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCallItem], Field(min_length=1)] | None = None
    tool_call_id: str | None = None
    prefix: StrictBool = Field(False, description="DeepSeek's chat prefix completion: on the last message, an assistant "
                                            "turn, the model goes on writing it (the reply holds the rest only)")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDefinition(_Base):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Base):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: dict[str, str]


class ChatTemplateKwargs(_Base):
    thinking: StrictBool = False
    enable_thinking: StrictBool = False  # the name other servers' clients send (Qwen3-style templates); same effect

    @property
    def wants_thinking(self) -> bool:
        return self.thinking or self.enable_thinking


class ThinkingToggle(_Base):
    """DeepSeek's API switch for thinking mode: {"type": "enabled"} or {"type": "disabled"}."""
    type: Literal["enabled", "disabled"]


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in a JSON value that is not valid Unicode text, or None."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, BaseModel):
            stack.append(v.model_dump())
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate ("\ud800" is legal JSON)
                return v
    return None


def _unicode_only(v):
    bad = _lone_surrogate(v)
    if bad is not None:
        at = next(i for i, ch in enumerate(bad) if "\ud800" <= ch <= "\udfff")
        excerpt = bad[max(0, at - 20):at + 20]  # (the string may be megabytes long)
        raise ValueError(f"a string holds a lone surrogate at character {at} ({excerpt!r}): not valid Unicode text")
    return v


class _Sampling(_Base):
    model: str = Field(description="any name: this server serves one model (see GET /v1/models)")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=1024)] | None = None
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: StrictBool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    skip_special_tokens: StrictBool = True
    return_token_ids: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _stop_is_text(cls, v):  # no text can match a lone surrogate
        return _unicode_only(v)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=0, description="deprecated by OpenAI; max_completion_tokens wins")
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: StrictBool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: ChatTemplateKwargs | None = None
    thinking: ThinkingToggle | None = Field(None, description="DeepSeek's name for chat_template_kwargs.thinking")
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    response_format: dict[str, Any] | None = None
    # vLLM's names for the same: render the last (assistant) message open, or no assistant opening at all
    continue_final_message: StrictBool = False
    add_generation_prompt: StrictBool = True

    @field_validator("tools", "tool_choice", "response_format")
    @classmethod
    def _tools_are_text(cls, v):  # the template renders them into the prompt, the schema into constraints
        return _unicode_only(v)


class CompletionRequest(_Sampling):
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)


# ---- errors ---------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
               415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
