"""Completions' `echo`: each choice's answer starts with its prompt, and with `logprobs` its
logprobs start with the prompt tokens', which the engine scores as it reads the prompt
(`SamplingParams.prompt_logprobs`; the first token has none). With max_tokens 0 the prompt
is the whole answer: the one token an engine must generate is dropped. Scoring a text this
way is what evaluation harnesses send (lm-evaluation-harness's loglikelihood tasks)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

from server.api.generation import ChoiceChunk


def echo_texts(prompts: list[str] | list[list[int]], tokenizer) -> list[str]:
    """What each prompt echoes as: its text as sent, or its token ids decoded."""
    return [prompt if isinstance(prompt, str) else tokenizer.decode(prompt) for prompt in prompts]


async def echoed(choices: AsyncIterator[ChoiceChunk], texts: list[str], n: int, generates: bool) -> AsyncIterator[ChoiceChunk]:
    """Choice i echoes prompt i // n (choices are prompt-major) in its first chunk, the one
    that carries the prompt's logprobs. Without `generates`, nothing generated is kept: no
    text, token or logprob, and the finish reason is the length's."""
    has_echoed: set[int] = set()
    async with aclosing(choices) as stream:
        async for item in stream:
            chunk = item.chunk
            if not generates:
                chunk = replace(chunk, text="", num_tokens=0, token_ids=(), logprobs=(), finish_reason=chunk.finish_reason and "length")
            if item.index not in has_echoed:
                has_echoed.add(item.index)
                chunk = replace(chunk, text=texts[item.index // n] + chunk.text, logprobs=chunk.prompt_logprobs + chunk.logprobs)
            yield replace(item, chunk=chunk)
