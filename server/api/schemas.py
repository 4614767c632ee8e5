"""OpenAI request bodies that baton accepts.

Rule: a field baton does not implement is rejected (extra="forbid") so that a caller never
believes a setting took effect when it did not; `user` and `safety_identifier` (which keep
a user on one side of a canary), `prompt_cache_key` and `metadata` are accepted because they
change nothing about the output, and so is any value that asks for nothing (`tools: null`,
`response_format: {"type": "text"}`, `echo: false`): clients send their defaults. vLLM's
own sampling and output fields (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `include_stop_str_in_output`, `skip_special_tokens`; the OpenAI
SDK sends them in `extra_body`) are implemented on both engines, so clients written for vLLM's
server work.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cached_property
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, PrivateAttr, StringConstraints, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from server.api.tools import Function, ToolPlan
from server.engines.base import OutputFormat
from models.names import unicode_text

MAX_STOP_SEQUENCES = 4
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]  # what vLLM's server takes
NULL_MEANS_DEFAULT = ("n", "stream", "echo", "return_token_ids", "return_tokens_as_token_ids")  # the sampling fields take null as unset already


def invalid_field(field: str, value, message: str, kind: str = "value_error") -> ValidationError:
    """A rule between fields, broken: the error names the field to change (the error's
    `param`), where a plain ValueError in a model validator would name the whole body.
    `kind` "missing": the field was not sent."""
    return ValidationError.from_exception_data("request", [InitErrorDetails(type=PydanticCustomError(kind, message), loc=(field,), input=value)])


Priority = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]  # vLLM's: lower is sooner; never sooner than the key's own (keys.py)
# OpenAI's bounds on `metadata`: 16 pairs, keys of up to 64 characters, values of up to 512.
Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)], Annotated[str, StringConstraints(max_length=512)]], Field(max_length=16)]


class Strict(BaseModel):
    """A request body part: a field it does not know is refused, not dropped."""

    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


def _as_list(value):
    """OpenAI accepts a string where a list of one is meant; validating lists only keeps
    error locations plain (`stop`, not `stop.list[str]`)."""
    return [value] if isinstance(value, str) else value


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text


class ToolCallIn(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: list[TextPart] = Field(default_factory=list)
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer names the call it answers
    reasoning: str | None = None  # an assistant's earlier thinking, as baton and vLLM answer it
    reasoning_content: str | None = None  # its older name

    @model_validator(mode="before")
    @classmethod
    def _text_as_part(cls, message):
        """`content` may be null (or absent) only where an assistant message calls tools."""
        if not isinstance(message, dict):
            return message
        content = message.get("content")
        if content is None:
            if message.get("role") != "assistant" or not message.get("tool_calls"):
                raise ValueError("content is required, unless an assistant message calls tools")
            return {**message, "content": []}
        return {**message, "content": [{"type": "text", "text": content}]} if isinstance(content, str) else message

    @model_validator(mode="after")
    def _tool_fields_where_they_belong(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool messages, and only they, carry tool_call_id")
        if (self.reasoning or self.reasoning_content) and self.role != "assistant":
            raise ValueError("only assistant messages carry reasoning")
        return self

    def as_template_input(self) -> dict:
        """Templates expect plain strings; `developer` is the newer name for `system`;
        templates that show tool calls take their arguments as objects."""
        role = "system" if self.role == "developer" else self.role
        message = {"role": role, "content": "".join(part.text for part in self.content)}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _as_object(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if reasoning := self.reasoning or self.reasoning_content:
            message["reasoning_content"] = reasoning  # the name templates read (Qwen3's shows or drops it)
        return message


def _as_object(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


# Rule: a grammar is compiled from each new schema, so the work a schema can ask for is
# bounded: its size, and the counts a grammar grows with. vLLM checks a schema in the event
# loop (a minItems of 10^8 held every request for 28 s); xgrammar took 5 s for a{10000}.
MAX_SCHEMA_CHARS = 32_768
MAX_SCHEMA_DEPTH = 64  # objects and arrays within each other (500 levels overflowed jsonschema's recursion: a 500)
MAX_SCHEMA_COUNT = 10_000  # minItems, maxLength and the like
MAX_PATTERN_REPEAT = 1_000  # n and m in a pattern's {n}, {n,}, {n,m}
MAX_STOP_CHARS = 1_024
MAX_STOP_TOKEN_IDS = 64
MAX_PROMPT_LOGPROBS = 20  # vLLM's engines take at most max_logprobs (20 by default) most likely tokens a position
MAX_LOGIT_BIAS = 1_024  # tokens a request may bias (40,000 cost 21 ms a token in the batch's step)
COUNT_KEYWORDS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minContains", "maxContains")
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def _check_json_schema(schema: dict) -> dict:
    from jsonschema import Draft202012Validator, SchemaError

    if (size := len(json.dumps(schema))) > MAX_SCHEMA_CHARS:
        raise ValueError(f"the schema is {size} characters of JSON; at most {MAX_SCHEMA_CHARS} are accepted")
    if problem := _unbounded_work(schema):  # before anything recursive reads it
        raise ValueError(problem)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        raise ValueError(f"not a valid JSON schema: {error.message}") from error
    return schema


def _unbounded_work(schema: dict) -> str | None:
    """What in `schema` would grow its grammar past a bound, said plainly: nesting (objects
    and arrays within each other) first, then the first count or pattern repetition over
    its bound. One walk, without recursion: deep nesting is what it guards against."""
    deepest, problem, stack = 0, None, [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            problem = problem or _over_bounds(node)
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    if deepest > MAX_SCHEMA_DEPTH:
        return f"the schema nests {deepest} levels deep; at most {MAX_SCHEMA_DEPTH} are accepted"
    return problem


def _over_bounds(node: dict) -> str | None:
    for keyword in COUNT_KEYWORDS:
        if isinstance(count := node.get(keyword), int) and count > MAX_SCHEMA_COUNT:
            return f"{keyword} is {count}; at most {MAX_SCHEMA_COUNT} is accepted"
    patterns = [node["pattern"]] if isinstance(node.get("pattern"), str) else []
    patterns += list(node["patternProperties"]) if isinstance(node.get("patternProperties"), dict) else []
    for pattern in patterns:
        if (most := max(_repeat_counts(pattern), default=0)) > MAX_PATTERN_REPEAT:
            return f"the pattern {pattern[:40]!r} repeats {most} times; at most {MAX_PATTERN_REPEAT} is accepted"
    return None


def _repeat_counts(pattern: str) -> Iterator[int]:
    """The n and m of each {n}, {n,}, {n,m} quantifier; an escaped brace (an odd run of
    backslashes before it) is a literal, not a quantifier."""
    for match in _REPEAT.finditer(pattern):
        before = pattern[: match.start()]
        if (len(before) - len(before.rstrip("\\"))) % 2 == 0:
            yield from (int(n) for n in match.groups() if n)


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None

    _parameters_are_a_schema = field_validator("parameters")(_check_json_schema)


class ToolDef(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # usage on every chunk, not only the last


class JsonSchemaSpec(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    _is_a_schema = field_validator("json_schema")(_check_json_schema)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self

    @property
    def output_format(self) -> OutputFormat | None:
        """What the engine must produce: None for free text."""
        if self.type == "text":
            return None
        return OutputFormat(json.dumps(self.json_schema.json_schema) if self.json_schema else None)


MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1_024
MAX_REGEX_CHARS = 4_096


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs` (chat and completions): exactly one constraint, held to
    token by token on both engines (xgrammar). `grammar` is EBNF (`root ::= ...`) or Lark."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_schema: dict | str | None = Field(None, alias="json")  # a schema, or its JSON text
    regex: str | None = Field(None, min_length=1, max_length=MAX_REGEX_CHARS)
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    grammar: str | None = Field(None, min_length=1, max_length=MAX_SCHEMA_CHARS)
    json_object: Literal[True] | None = None

    @field_validator("json_schema")
    @classmethod
    def _is_a_schema(cls, schema):
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as error:
                raise ValueError(f"not JSON: {error}") from error
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema is an object")
        return _check_json_schema(schema)

    @field_validator("choice")
    @classmethod
    def _check_choices(cls, choices):
        for choice in choices or ():
            if not 0 < len(choice) <= MAX_CHOICE_CHARS:
                raise ValueError(f"each choice is 1 to {MAX_CHOICE_CHARS} characters")
            unicode_text(choice, "a choice")
        return choices

    @field_validator("regex", "grammar")
    @classmethod
    def _is_text(cls, text):
        return text if text is None else unicode_text(text, "it")

    @model_validator(mode="after")
    def _one_constraint(self):
        if (count := len(self.model_dump(exclude_none=True))) != 1:
            raise ValueError(f"name exactly one of json, regex, choice, grammar, json_object ({count} given)")
        return self

    @property
    def output_format(self) -> OutputFormat:
        param = "structured_outputs"
        if self.regex is not None:
            return OutputFormat(self.regex, param, kind="regex")
        if self.choice is not None:
            return OutputFormat(None, param, kind="choice", choices=tuple(self.choice))
        if self.grammar is not None:
            return OutputFormat(self.grammar, param, kind="grammar")
        return OutputFormat(json.dumps(self.json_schema) if self.json_schema is not None else None, param)


class _GenerationBody(Strict):
    model: str
    # Sampling left unset (None) is the serving version's default, else OpenAI's (generation.py).
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's: the k most likely tokens; -1 or 0: all
    min_p: float | None = Field(None, ge=0.0, le=1.0)  # vLLM's: tokens at least this fraction as likely as the best
    repetition_penalty: float | None = Field(None, gt=0.0, allow_inf_nan=False)  # vLLM's (and transformers'): 1 is none
    min_tokens: int = Field(0, ge=0)  # vLLM's: no end of sequence, stop token or stop string before this many tokens
    ignore_eos: bool = False  # vLLM's: generate to max_tokens whatever the model says (benchmarks)
    priority: Priority = 0
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)  # vLLM's: tokens that end it as an end of sequence does
    include_stop_str_in_output: bool = False  # vLLM's: the stop string that ended it is sent too
    skip_special_tokens: bool = True  # vLLM's: false sends special tokens' text
    max_tokens: int | None = Field(None, ge=1)
    stop: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in -100..100
    user: str | None = None
    safety_identifier: str | None = None  # OpenAI's newer name for the end user
    prompt_cache_key: str | None = None  # a caching hint: prefixes are cached whatever it says
    metadata: dict[str, str] | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's: output held to a schema, regex, choice or grammar
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_PROMPT_LOGPROBS)  # vLLM's: each prompt token's logprob and rank, and the k most likely there
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids beside the text
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name each token "token_id:N"
    # vLLM's: at most this many tokens in each thought of a reasoning model (-1: no limit)
    thinking_token_budget: int | None = Field(None, ge=-1)
    _thinking_budget_is_target: bool = PrivateAttr(False)  # set by another API's route (thinking.py's `budget_held`)

    _stop_as_list = field_validator("stop", mode="before")(_as_list)

    @property
    def end_user(self) -> str | None:
        """Who the request is for, where the caller says (routes a canary's requests)."""
        return self.safety_identifier or self.user

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, body):
        """OpenAI's API takes null for these and means its default; clients send it."""
        if isinstance(body, dict):
            return {field: value for field, value in body.items() if not (value is None and field in NULL_MEANS_DEFAULT)}
        return body

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        if stop and "" in stop:
            raise ValueError("a stop sequence cannot be empty")
        for sequence in stop or ():  # vLLM failed to send a lone surrogate to its engine: a 500
            unicode_text(sequence, "a stop sequence")
        if stop and (longest := max(map(len, stop))) > MAX_STOP_CHARS:  # each is looked for at every token
            raise ValueError(f"a stop sequence is {longest} characters long; at most {MAX_STOP_CHARS} are accepted")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias):
        if bias and len(bias) > MAX_LOGIT_BIAS:  # the transformers engine applies it at every step of the shared batch
            raise ValueError(f"{len(bias)} tokens are biased; at most {MAX_LOGIT_BIAS} are accepted")
        for token, value in (bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys must be token ids; {token!r} is not")
            if not -100 <= value <= 100:
                raise ValueError(f"the bias for token {token} is {value}; biases are between -100 and 100")
        return bias

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise invalid_field("stream_options", self.stream_options, "stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:  # as vLLM's server: they come with the whole answer
            raise invalid_field("prompt_logprobs", self.prompt_logprobs, "prompt_logprobs are not available when stream is true")
        return self

    @property
    def num_prompts(self) -> int:
        return 1

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and (self.stream_options.include_usage or self.stream_options.continuous_usage_stats))

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), value) for token, value in (self.logit_bias or {}).items())

    @property
    def thinking_budget(self) -> int | None:
        """None: no limit on thinking."""
        return None if self.thinking_token_budget == -1 else self.thinking_token_budget

    @property
    def thinking_budget_is_target(self) -> bool:
        return self._thinking_budget_is_target

    def with_thinking_budget_as_target(self) -> Self:
        """The budget as Anthropic's `budget_tokens`: held where the engine can, else let go."""
        self._thinking_budget_is_target = True
        return self

    @property
    def num_prompt_logprobs(self) -> int | None:
        """None: no logprobs for the prompt's tokens; k: each one's and the k most likely there."""
        return self.prompt_logprobs

    @property
    def output_format(self) -> OutputFormat | None:
        """What the engine must produce: None for free text."""
        return self.structured_outputs.output_format if self.structured_outputs else None


def _functions(tools: list[ToolDef]) -> tuple[Function, ...]:
    return tuple(Function(t.function.name, t.function.description, t.function.parameters) for t in tools)


def _answers_follow_calls(messages: list[ChatMessage] | None) -> list[ChatMessage] | None:
    """A tool message answers a call an earlier assistant message made: as OpenAI, for a
    template would otherwise show the model an answer to no question."""
    called = set()
    for message in messages or ():
        called |= {call.id for call in message.tool_calls or ()}
        if message.role == "tool" and message.tool_call_id not in called:
            raise ValueError(f"the tool output for call {message.tool_call_id!r} answers no call made before it")
    return messages


# apply_chat_template's own parameters: a template variable may not set how the template is applied
TEMPLATE_PARAMETERS = frozenset(
    {"conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message", "tokenize", "padding",
     "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
)  # fmt: skip
MAX_TEMPLATE_KWARGS_CHARS = 16_384


class ChatTemplateFields(Strict):
    """How messages are rendered through the chat template (vLLM's fields): variables for
    the template (`chat_template_kwargs`: `enable_thinking`, say), and whether the prompt
    opens the assistant's turn or continues its last message (a prefilled answer)."""

    messages: list[ChatMessage] | None = None  # what the template renders; each request type says whether it is required
    chat_template_kwargs: dict[str, JsonValue] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    reasoning_effort: ReasoningEffort | None = None  # a template variable too, and thinking on unless "none" (vLLM's rule)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _variables_only(cls, kwargs):
        """Names a template can read, none of apply_chat_template's own, JSON of bounded size."""
        for name in kwargs or {}:
            if not name.isidentifier():
                raise ValueError(f"{name!r} is not a name a template can read")
            if name in TEMPLATE_PARAMETERS:
                raise ValueError(f"{name!r} is how the template is applied, not a variable of it")
        if kwargs and (size := len(json.dumps(kwargs))) > MAX_TEMPLATE_KWARGS_CHARS:
            raise ValueError(f"the template variables are {size} characters of JSON; at most {MAX_TEMPLATE_KWARGS_CHARS} are accepted")
        return kwargs

    @model_validator(mode="after")
    def _continue_an_assistant_message(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise invalid_field("continue_final_message", True, "continue_final_message and add_generation_prompt cannot both be true (set add_generation_prompt to false)")
        if self.continue_final_message and (not self.messages or self.messages[-1].role != "assistant"):
            raise invalid_field("continue_final_message", True, "continue_final_message continues the last message, which must be the assistant's")
        return self

    @property
    def template_kwargs(self) -> dict:
        """What apply_chat_template takes beside the messages and tools. `reasoning_effort`
        reaches the template as a variable and sets `enable_thinking` (off for "none"), as
        vLLM passes it; variables the request names in chat_template_kwargs win. A template
        that reads neither ignores them."""
        effort = {} if self.reasoning_effort is None else {"reasoning_effort": self.reasoning_effort, "enable_thinking": self.reasoning_effort != "none"}
        kwargs = {**effort, **(self.chat_template_kwargs or {}), "add_generation_prompt": self.add_generation_prompt}
        return kwargs | ({"continue_final_message": True} if self.continue_final_message else {})


class ChatCompletionRequest(_GenerationBody, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None  # true: the completion is kept (OpenAI's stored completions; completion_store.py)
    # What SDKs send as their defaults, accepted where it asks for nothing.
    modalities: list[Literal["text"]] | None = None
    service_tier: Literal["auto", "default"] | None = None

    _tool_answers_follow_their_calls = field_validator("messages")(_answers_follow_calls)

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_the_tools(cls, choice, info):
        names = [tool.function.name for tool in info.data.get("tools") or []]
        if choice in ("required", "auto") and not names:
            raise ValueError(f"tool_choice {choice} needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"the function {choice.function.name!r} is not among the tools ({', '.join(names) or 'none given'})")
        return choice

    @model_validator(mode="after")
    def _check_combinations(self):
        if self.top_logprobs and not self.logprobs:
            raise invalid_field("top_logprobs", self.top_logprobs, "top_logprobs needs logprobs set to true")
        plan = self.tool_plan
        constraints = [
            name
            for name, is_set in (
                ("a forced tool call (tool_choice required or a function)", plan is not None and plan.output_format() is not None),
                ("a JSON response_format", self.response_format is not None and self.response_format.type != "text"),
                ("structured_outputs", self.structured_outputs is not None),
            )
            if is_set
        ]
        if len(constraints) > 1:
            raise ValueError(f"{' and '.join(constraints)} cannot be combined: the output follows one grammar")
        return self

    @cached_property
    def tool_plan(self) -> ToolPlan | None:
        """None: no tools, or tool_choice none (the model answers in text)."""
        if not self.tools or self.tool_choice == "none":
            return None
        functions = _functions(self.tools)
        choice = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else (self.tool_choice or "auto")
        return ToolPlan(functions, choice)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_top_logprobs(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the k most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def output_format(self) -> OutputFormat | None:
        """A forced tool call's arguments, else the response format's JSON, else the
        structured outputs' constraint, else None (at most one is set)."""
        if self.tool_plan is not None and (forced := self.tool_plan.output_format()) is not None:
            return forced
        if self.response_format is not None and (json_format := self.response_format.output_format) is not None:
            return json_format
        return super().output_format


PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a non-empty list of such lists"


def _is_token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompts(value, name: str) -> list:
    """One of PROMPT_SHAPES, as a list of prompts. Checked here, whole, so that a wrong
    shape is named as such, not as the first of the union's failed branches."""
    if isinstance(value, str) or _is_token_ids(value):
        value = [value]
    if not isinstance(value, list) or not value or not (all(isinstance(p, str) for p in value) or all(map(_is_token_ids, value))):
        raise ValueError(f"{name} is {PROMPT_SHAPES}")
    if [] in value:
        raise ValueError(f"{name} of token ids cannot be empty")
    return value


class CompletionRequest(_GenerationBody):
    prompt: list[str] | list[list[int]]  # token ids are checked against the vocabulary later
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; null: the context's room; 0: with echo only
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False  # the answer starts with its prompt (and its logprobs, with the prompt's tokens' scored)
    best_of: Literal[1] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_as_list(cls, prompt):
        return _prompts(prompt, "a prompt")

    @model_validator(mode="after")
    def _nothing_to_generate_needs_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise invalid_field("max_tokens", 0, "max_tokens 0 generates nothing: it is accepted with echo only (the answer is then the prompt)")
        if self.prompt_logprobs is not None and self.echo and self.logprobs is not None:  # two counts of the prompt's most likely tokens
            raise invalid_field("prompt_logprobs", self.prompt_logprobs, "echo with logprobs scores the prompt already; send prompt_logprobs or echo with logprobs, not both")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def generates(self) -> bool:
        """False: echo with max_tokens 0, where the prompt (scored) is the whole answer."""
        return self.max_tokens != 0

    @property
    def num_prompts(self) -> int:
        return len(self.prompt)

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo and self.logprobs is not None else self.prompt_logprobs

    @property
    def num_top_logprobs(self) -> int | None:
        return self.logprobs



class EmbeddingRequest(Strict):
    """`POST /v1/embeddings`: OpenAI's body. `dimensions` is not taken: no model baton
    serves is trained to have its vectors shortened."""

    model: str
    input: list[str] | list[list[int]]  # token ids are checked against the vocabulary later
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 (what the OpenAI SDK asks for)
    user: str | None = None
    priority: Priority = 0

    @field_validator("input", mode="before")
    @classmethod
    def _input_as_list(cls, value):
        inputs = _prompts(value, "an input")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"{len(inputs)} inputs; at most {MAX_EMBEDDING_INPUTS} are accepted in one request")
        if "" in inputs:
            raise ValueError("an input cannot be an empty string")
        for text in inputs:
            if isinstance(text, str):
                unicode_text(text, "an input")
        return inputs


def _texts(value, name: str) -> list[str]:
    """A text or a list of texts (what scoring and reranking take), each non-empty Unicode."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"{name} is a string or a non-empty list of strings")
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise ValueError(f"{len(texts)} texts; at most {MAX_EMBEDDING_INPUTS} are accepted in one request")
    if "" in texts:
        raise ValueError("a text cannot be an empty string")
    for text in texts:
        unicode_text(text, "a text")
    return texts


SCORE_FIELD_PAIRS = (("queries", "documents"), ("queries", "items"), ("text_1", "text_2"), ("data_1", "data_2"))  # vLLM's names


def _sent_texts(body: dict, field: str) -> list[str]:
    """The texts of a scoring field, or an error under the name it was sent as."""
    try:
        return _texts(body[field], field)
    except ValueError as error:
        raise invalid_field(field, body[field], str(error)) from None


def _odd_field_out(named: list[str]) -> str:
    """Of the scoring fields sent, the one that makes no pair: the partner a lone field lacks,
    or a field beyond the first pair."""
    for first, second in SCORE_FIELD_PAIRS:
        if first in named and second in named:
            return next(field for field in named if field not in (first, second))
    for first, second in SCORE_FIELD_PAIRS:
        if first in named or second in named:
            return second if first in named else first
    return "queries"


class ScoreRequest(Strict):
    """`POST /score` (vLLM's route): each query against the document at its place (N:N), or
    one query against every document (1:N). Any of vLLM's field pairs is taken."""

    model: str
    queries: list[str]
    documents: list[str]
    user: str | None = None
    priority: Priority = 0

    @model_validator(mode="before")
    @classmethod
    def _one_pair_of_fields(cls, body):
        if not isinstance(body, dict):
            return body
        named = [field for field in dict.fromkeys(sum(SCORE_FIELD_PAIRS, ())) if field in body]
        whole = [pair for pair in SCORE_FIELD_PAIRS if set(pair) == set(named)]
        if not whole:
            pairs = " or ".join(f"{first} and {second}" for first, second in SCORE_FIELD_PAIRS)
            field = _odd_field_out(named)
            raise invalid_field(field, body.get(field), f"send one pair of fields: {pairs}", "value_error" if field in body else "missing")
        first, second = whole[0]
        return {**{k: v for k, v in body.items() if k not in (first, second)}, "queries": _sent_texts(body, first), "documents": _sent_texts(body, second)}

    @model_validator(mode="after")
    def _one_query_or_one_per_document(self):
        if len(self.queries) not in (1, len(self.documents)):
            raise invalid_field("queries", None, f"{len(self.queries)} queries for {len(self.documents)} documents: send one query, or one per document")
        return self


class RerankRequest(Strict):
    """`POST /rerank` (vLLM's, Jina's and Cohere's shape): the documents ordered by their
    relevance to the query, the `top_n` first (0: all)."""

    model: str
    query: str
    documents: list[str]
    top_n: int = Field(0, ge=0)
    return_documents: bool = True  # Jina's and Cohere's; vLLM always returns them
    user: str | None = None
    priority: Priority = 0

    @field_validator("query")
    @classmethod
    def _query_is_text(cls, query):
        return _texts(query, "query")[0]

    @field_validator("documents", mode="before")
    @classmethod
    def _as_texts(cls, value):
        return _texts(value, "documents")


class TokenizeRequest(ChatTemplateFields):
    """`POST /tokenize` (vLLM's route): a text `prompt`, or chat `messages` (with the `tools`
    shown to the model) read as a chat completion reads them."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    user: str | None = None

    _tool_answers_follow_their_calls = field_validator("messages")(_answers_follow_calls)

    @field_validator("prompt")
    @classmethod
    def _prompt_is_text(cls, prompt):
        return prompt if prompt is None else unicode_text(prompt, "the prompt")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either a prompt or messages")
        if self.tools and self.messages is None:
            raise invalid_field("tools", None, "tools are shown with messages, not with a prompt")
        return self

    @property
    def template_tools(self) -> list[dict] | None:
        return [function.as_tool() for function in _functions(self.tools)] if self.tools else None


class DetokenizeRequest(Strict):
    """`POST /detokenize` (vLLM's route): token ids back to text."""

    model: str
    tokens: list[int]
    user: str | None = None
