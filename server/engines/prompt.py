"""Prompt rendering shared by every engine, so that all give the same prompt tokens."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from models.errors import InvalidRequestError


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Render messages with the tokenizer's chat template, then tokenize without adding
    special tokens again (the template already holds them). vLLM's server does the same."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "This model has no chat template; use /v1/completions instead.", param="messages"
        )
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # a template may reject a conversation shape (jinja raise_exception)
        raise InvalidRequestError(f"The chat template rejected these messages: {error}", param="messages") from error
    return text_prompt_ids(tokenizer, text)


def text_prompt_ids(tokenizer, text: str) -> list[int]:
    """An empty prompt starts from the beginning-of-sequence token, as OpenAI's models do:
    no engine can run zero tokens."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start] if start is not None else []
    return ids


def with_chat_template_of(tokenizer, folder: Path):
    """`tokenizer` (the same vocabulary: a reload checks it) with `folder`'s chat template,
    without loading a tokenizer again (a few hundred milliseconds, in a swap's hold)."""
    swapped = copy.copy(tokenizer)
    swapped.chat_template = _chat_template(folder)
    return swapped


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
