"""The schemas the transformers engine refuses because xgrammar would not enforce them: each
rule is proven against the installed xgrammar (it accepts an answer that breaks the schema),
so a new xgrammar that enforces one fails here and the rule can go."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from transformers import AutoTokenizer

from models.errors import InvalidRequestError
from server.api.tools import Function, calls_schema
from server.engines.base import OutputFormat
from server.engines.grammar import Grammars, choice_grammar, mask_off_loop, unenforced

# (schema, an answer that breaks it, what the refusal names)
UNENFORCED = [
    ({"type": "number", "multipleOf": 0.5}, "0.3", "`multipleOf` on a number"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]", "`uniqueItems`"),
    ({"not": {"type": "string"}}, '"a"', "`not`"),
    ({"type": "string", "if": {"type": "string"}, "then": {"minLength": 2}}, '"a"', "`if`"),
    ({"allOf": [{"type": "string"}, {"maxLength": 2}]}, '"aaaa"', "`allOf` of more than one schema"),
    ({"type": "string", "pattern": "a+", "maxLength": 2}, '"aaaa"', "`pattern` with"),
    ({"type": "object", "properties": {}, "required": ["a"]}, "{}", "`required` naming 'a'"),
]


@pytest.fixture(scope="module")
def tokenizer(demo_model_path):
    return AutoTokenizer.from_pretrained(demo_model_path)


@pytest.fixture(scope="module")
def grammars(tokenizer) -> Grammars:
    return Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def _xgrammar_accepts(tokenizer, schema: dict, answer: str) -> bool:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=[tokenizer.eos_token_id])
    matcher = xgrammar.GrammarMatcher(xgrammar.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(schema)))
    return matcher.accept_string(answer) and matcher.accept_token(tokenizer.eos_token_id)  # complete: it may stop here


@pytest.mark.parametrize(("schema", "answer", "named"), UNENFORCED)
def test_each_refused_schema_is_one_xgrammar_does_not_enforce(tokenizer, grammars, schema, answer, named):
    assert _xgrammar_accepts(tokenizer, schema, answer)  # the premise: an answer breaking the schema gets through
    nested = {"type": "object", "properties": {"outer": {"type": "array", "items": schema}}, "required": ["outer"]}
    for where in (schema, nested):
        with pytest.raises(InvalidRequestError, match="cannot enforce") as refused:
            grammars.mask_for(OutputFormat(json.dumps(where), param="tools"))
        assert named in refused.value.message and refused.value.param == "tools"


def test_enforced_keywords_and_properties_named_like_keywords_pass(tokenizer, grammars):
    schema = {
        "type": "object",
        "properties": {"not": {"type": "string"}, "if": {"type": "integer", "minimum": 3}, "multipleOf": {"type": "integer", "multipleOf": 7}},
        "required": ["not", "if", "multipleOf"],
        "additionalProperties": False,
    }
    assert _xgrammar_accepts(tokenizer, schema, '{"not": "x", "if": 3, "multipleOf": 7}')
    assert unenforced(schema) is None and not any(
        _xgrammar_accepts(tokenizer, schema, answer) for answer in ('{"not": "x", "if": 1, "multipleOf": 7}', '{"not": "x", "if": 3, "multipleOf": 8}')
    )
    assert grammars.mask_for(OutputFormat(json.dumps(schema))) is not None
    pydantic_like = {"$defs": {"Pet": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}, "allOf": [{"$ref": "#/$defs/Pet"}]}
    assert unenforced(pydantic_like) is None
    assert unenforced(calls_schema((Function("f", None, schema),))) is None  # what `tool_choice: required` compiles


def test_json_object_is_an_object(tokenizer, grammars):
    """JSON mode answers with an object: "[" was allowed (xgrammar's builtin grammar is any
    JSON value) and a random model answered arrays."""
    bracket, brace = (tokenizer.encode(text, add_special_tokens=False)[0] for text in ("[", "{"))
    with pytest.raises(ValueError, match="does not continue"):
        grammars.mask_for(OutputFormat()).accept(bracket)
    grammars.mask_for(OutputFormat()).accept(brace)


def test_a_schema_xgrammar_cannot_compile_is_named_without_its_log_prefix(grammars):
    with pytest.raises(InvalidRequestError) as refused:
        grammars.mask_for(OutputFormat(json.dumps({"type": "array", "minItems": 5, "maxItems": 1})))
    assert refused.value.message.startswith("The JSON schema cannot be used: ") and "/project/" not in refused.value.message
    assert refused.value.param == "response_format"


def test_a_grammar_that_accepts_no_answer_is_refused_before_generating(grammars):
    """`root ::= root` compiles, but no token can begin an answer: a 400 naming the field,
    where generating made a 500 at its first token."""
    with pytest.raises(InvalidRequestError) as refused:
        grammars.mask_for(OutputFormat("root ::= root", "structured_outputs", kind="grammar"))
    assert refused.value.message == "The grammar accepts no answer: no token can begin one." and refused.value.param == "structured_outputs"


def test_an_endless_grammar_is_taken_since_every_token_continues_it(grammars):
    """`a`s that never end: generated until max_tokens, as vLLM does."""
    assert grammars.mask_for(OutputFormat('root ::= "a" root', "structured_outputs", kind="grammar")).allows_a_token()


def test_a_choice_grammar_allows_exactly_its_choices_even_with_quotes_and_control_characters(grammars, tokenizer):
    import xgrammar

    choices = ('say "hi"', "back\\slash", "two\nlines", "tab\tand\x01")
    grammar = xgrammar.Grammar.from_ebnf(choice_grammar(choices))
    for text in choices:
        assert xgrammar.testing._is_grammar_accept_string(grammar, text), text
    for text in ('say "hi', "backslash", "two lines", ""):
        assert not xgrammar.testing._is_grammar_accept_string(grammar, text), text
    assert grammars.mask_for(OutputFormat(None, "structured_outputs", kind="choice", choices=choices)) is not None


def test_a_grammar_without_rules_written_with_an_ebnf_arrow_is_lark():
    assert OutputFormat('start: "a" | "b"', kind="grammar").is_lark
    assert not OutputFormat('root ::= "a" | "b"', kind="grammar").is_lark
    assert not OutputFormat("a+", kind="regex").is_lark


def test_a_compile_that_outlasts_its_time_is_a_400_naming_the_field():
    class SlowGrammars:
        def mask_for(self, output_format):
            time.sleep(0.5)

    with pytest.raises(InvalidRequestError) as refused:
        asyncio.run(mask_off_loop(SlowGrammars(), OutputFormat("a+", "structured_outputs", kind="regex"), timeout_s=0.05))
    assert refused.value.param == "structured_outputs" and "regular expression took more than 0.05 s" in str(refused.value)
