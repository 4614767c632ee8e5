"""Output held to a grammar on the transformers engine, through xgrammar (the grammar
library vLLM uses): a compiler per tokenizer, a token mask per generation. JSON (a schema,
or any object), a regular expression, a choice of strings, or an EBNF or Lark grammar.

Rule: the mask is applied before sampling, so every token drawn keeps the output a prefix
of a valid answer; when the answer is complete only a stop token is allowed. A JSON schema
that asks for what xgrammar compiles but does not enforce is refused, so that no answer
breaks the schema its caller trusts.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Iterable, Iterator

import torch

from models.errors import InvalidRequestError
from server.engines.base import OutputFormat


COMPILE_TIMEOUT_S = 10  # a regular expression can take exponential time to compile (vLLM bounds it too)
ANY_OBJECT = '{"type": "object"}'  # json_object, as vLLM compiles it: xgrammar's builtin JSON grammar also allows arrays and scalars


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int]):
        import xgrammar

        self._xgrammar = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgrammar.GrammarCompiler(info)  # caches compiled grammars
        self._unenforced = functools.lru_cache(maxsize=256)(lambda schema: unenforced(json.loads(schema)))  # and so, beside it, this check
        self._vocab_size = vocab_size

    def mask_for(self, output_format: OutputFormat) -> TokenMask:
        """A fresh mask for one generation. Compiling can take a while (a large schema, a
        regular expression): call it off the event loop."""
        try:
            grammar = self._compile(output_format)
        except (RuntimeError, ValueError) as error:
            raise InvalidRequestError(f"The {_NAMES[output_format.kind]} cannot be used: {_plain(error)}", param=output_format.param) from error
        if output_format.kind == "json" and output_format.spec is not None and (what := self._unenforced(output_format.spec)):
            raise InvalidRequestError(f"The JSON schema uses {what}, which this engine's grammar cannot enforce: answers could break the schema.", param=output_format.param)
        mask = TokenMask(self._xgrammar, grammar, self._vocab_size)
        if not mask.allows_a_token():  # `root ::= root`: it compiles, and nothing can begin an answer
            raise InvalidRequestError(f"The {_NAMES[output_format.kind]} accepts no answer: no token can begin one.", param=output_format.param)
        return mask

    def _compile(self, output_format: OutputFormat):
        compiler, spec = self._compiler, output_format.spec
        if output_format.kind == "regex":
            return compiler.compile_regex(spec)
        if output_format.kind == "choice":
            return compiler.compile_grammar(choice_grammar(output_format.choices))
        if output_format.kind == "grammar":
            return compiler.compile_lark(spec) if output_format.is_lark else compiler.compile_grammar(spec)
        return compiler.compile_json_schema(spec or ANY_OBJECT)


async def mask_off_loop(grammars: Grammars, output_format: OutputFormat, timeout_s: float = COMPILE_TIMEOUT_S) -> TokenMask:
    """`grammars.mask_for` on a worker thread (xgrammar releases the GIL as it compiles),
    within `timeout_s`, else a 400. The thread runs on to its end: the bounds on a request's
    size keep that short."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(grammars.mask_for, output_format), timeout_s)
    except TimeoutError:
        raise InvalidRequestError(f"The {_NAMES[output_format.kind]} took more than {timeout_s} s to compile.", param=output_format.param) from None


_NAMES = {"json": "JSON schema", "regex": "regular expression", "choice": "choice", "grammar": "grammar"}
_EBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def choice_grammar(choices) -> str:
    """An EBNF grammar whose only sentences are `choices`, each a string literal (quotes,
    backslashes and control characters escaped)."""

    def escaped(char: str) -> str:
        if char in _EBNF_ESCAPES:
            return _EBNF_ESCAPES[char]
        return f"\\u{ord(char):04x}" if ord(char) < 0x20 or ord(char) == 0x7F else char

    return "root ::= " + " | ".join('"' + "".join(map(escaped, choice)) + '"' for choice in choices)


# Where a schema holds schemas (JSON Schema 2020-12, and the older `definitions` and list
# `items`): only these are walked, so a property named like a keyword is no keyword.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMAS = ("items", "additionalItems", "additionalProperties", "unevaluatedItems", "unevaluatedProperties", "contains", "propertyNames", "not", "if", "then", "else")


def unenforced(schema: dict) -> str | None:
    """The first assertion in `schema` that xgrammar compiles and then ignores, said
    plainly (tests/unit/test_grammar.py proves each against the installed xgrammar).
    `format` and `contentEncoding` are annotations in JSON Schema 2020-12: not refused."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if what := _unenforced_here(node):
            return what
        stack.extend(_subschemas(node))
    return None


def _unenforced_here(node: dict) -> str | None:
    for keyword in ("not", "if"):
        if keyword in node:
            return f"`{keyword}`"
    if "multipleOf" in node and not (node.get("type") == "integer" and isinstance(node["multipleOf"], int)):
        return "`multipleOf` on a number (on an integer it is enforced)"
    if node.get("uniqueItems") is True:
        return "`uniqueItems`"
    if isinstance(node.get("allOf"), list) and len(node["allOf"]) > 1:
        return "`allOf` of more than one schema"
    if "pattern" in node and ("minLength" in node or "maxLength" in node):
        return "`pattern` with `minLength` or `maxLength`"
    properties = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    required = node.get("required") if isinstance(node.get("required"), list) else []
    if undefined := [name for name in required if name not in properties]:
        return f"`required` naming {undefined[0]!r}, which `properties` does not define"
    return None


def _subschemas(node: dict) -> Iterator:
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            yield from node[key].values()
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            yield from node[key]
    for key in _SCHEMAS:
        if isinstance(node.get(key), dict):
            yield node[key]


def _plain(error: Exception) -> str:
    """xgrammar's message without its log prefix (`[09:28:07] /project/cpp/x.cc:4944: `)."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error).strip().splitlines()[0])


class TokenMask:
    """Which tokens may come next, for one generation; used on the engine's worker thread."""

    def __init__(self, xgrammar, grammar, vocab_size: int):
        self._xgrammar = xgrammar
        self._matcher = xgrammar.GrammarMatcher(grammar)
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        self._vocab_size = vocab_size

    def allows_a_token(self) -> bool:
        """Some token (a stop token included) may come next."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        return bool(self._bitmask.any())

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of the row of logits with every token the grammar forbids at -inf."""
        self._matcher.fill_next_token_bitmask(self._bitmask)
        row = logits.float().clone().unsqueeze(0)
        self._xgrammar.apply_token_bitmask_inplace(row, self._bitmask.to(row.device), vocab_size=self._vocab_size)
        return row[0]

    def accept(self, token_id: int) -> None:
        if not self._matcher.accept_token(token_id):
            raise ValueError(f"token {token_id} does not continue the answer its grammar allows")
