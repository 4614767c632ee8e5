"""OpenAI request bodies that baton accepts.

Rule: a field baton does not implement is rejected (extra="forbid") so that a caller never
believes a setting took effect when it did not; `user` and `metadata` are accepted because
they change nothing about the output.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


def _as_list(value):
    """OpenAI accepts a string where a list of one is meant; validating lists only keeps
    error locations plain (`stop`, not `stop.list[str]`)."""
    return [value] if isinstance(value, str) else value


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_as_part(cls, content):
        return [{"type": "text", "text": content}] if isinstance(content, str) else content

    def as_template_input(self) -> dict:
        """Templates expect plain strings; `developer` is the newer name for `system`."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": "".join(part.text for part in self.content)}


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerationBody(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None

    _stop_as_list = field_validator("stop", mode="before")(_as_list)

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_GenerationBody):
    prompt: list[str] = Field(min_length=1)

    _prompt_as_list = field_validator("prompt", mode="before")(_as_list)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
