"""OpenAI request bodies, validated strictly: unknown fields, wrong JSON types and out-of-range values are a
400 naming the field. OpenAI parameters this server does not implement are accepted only at their no-op
value (``echo: false``, ``frequency_penalty: 0``, ...), so nothing a client asks for is silently ignored."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from lmforge.serve.api_errors import APIError, bad_request

Number = Union[StrictInt, StrictFloat]
Stop = Optional[Union[StrictStr, Annotated[list[StrictStr], Field(max_length=16)]]]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class _Sampling(_Strict):
    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[Number] = Field(None, ge=0, le=2)
    top_p: Optional[Number] = Field(None, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(None, ge=-1)
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Stop = None
    seed: Optional[StrictInt] = None
    user: Optional[StrictStr] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    logit_bias: Optional[dict[StrictStr, Number]] = None

    def unsupported(self) -> Optional[str]:
        if self.presence_penalty not in (None, 0):
            return "presence_penalty"
        if self.frequency_penalty not in (None, 0):
            return "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        if self.top_k == 0:
            return "top_k"
        return None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1)], TokenIds,
                  Annotated[list[TokenIds], Field(min_length=1)]]
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=5)
    echo: StrictBool = False
    best_of: Optional[StrictInt] = Field(None, ge=1)
    suffix: Optional[StrictStr] = None

    def unsupported(self) -> Optional[str]:
        if self.echo:
            return "echo"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, Annotated[list[TextPart], Field(min_length=1)]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None

    def unsupported(self) -> Optional[str]:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            return "max_completion_tokens"
        return super().unsupported()

    def limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse(model_cls, body) -> BaseModel:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    try:
        req = model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(x) for x in err["loc"] if _is_field(x))
        kind = err["type"]
        msg = "unknown field" if kind == "extra_forbidden" else err["msg"]
        raise bad_request(f"invalid value for '{loc}': {msg}" if loc else msg, param=loc or None,
                          code="unknown_field" if kind == "extra_forbidden" else "invalid_value") from None
    field = req.unsupported()
    if field is not None:
        raise bad_request(f"'{field}' is not supported by this server with that value", param=field,
                          code="unsupported_parameter")
    return req


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_field(part) -> bool:
    """pydantic puts union-member tags ('str', 'list[int]', 'TextPart') in error locations; keep only names
    and indices of the request's own fields."""
    if isinstance(part, int):
        return True
    return part.isidentifier() and part.islower() and part not in _TYPE_TAGS


def check_text(value: str, param: str) -> None:
    """Lone surrogates (from JSON escapes like \\udc80) are not text; refuse them before tokenizing."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"'{param}' is not valid Unicode text", param=param) from None


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
