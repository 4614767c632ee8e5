"""A conversation cut to fit its model's context (the Responses API's `truncation: "auto"`):
its oldest turns go until the prompt leaves room for the answer.

Rules: the leading system messages (instructions) always stay; the conversation is cut only
where a user message begins a turn, so no tool output loses the call it answers; the last
user turn always stays. Where even that does not fit, the prompt is the last turn's and the
request fails as any prompt too long does (naming `input`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

SYSTEM_ROLES = ("system", "developer")
MAX_UNSET_ROOM = 1024  # tokens kept for an answer of no set length (a quarter of a smaller context)


def answer_room(max_tokens: int | None, max_model_len: int) -> int:
    """The tokens a fitted prompt leaves for the answer: its max_tokens, else a quarter of the
    context, at most MAX_UNSET_ROOM."""
    return max_tokens if max_tokens is not None else min(MAX_UNSET_ROOM, max_model_len // 4)


def fitted_prompt(tokenize: Callable[[list[dict]], list[int]], messages: list[dict], room: int, max_model_len: int) -> list[int]:
    """The prompt of `messages` from the earliest turn on that leaves `room` tokens of
    `max_model_len` (`tokenize` renders and tokenizes a conversation; a binary search over
    the turns calls it a few times, not once a turn)."""
    whole = tokenize(messages)
    if len(whole) + room <= max_model_len:
        return whole  # the common case: one tokenization
    head = next((i for i, message in enumerate(messages) if message["role"] not in SYSTEM_ROLES), len(messages))
    cuts = turn_starts(messages[head:])
    prompts: dict[int, list[int]] = {0: whole}

    def prompt_from(cut: int) -> list[int]:
        if cut not in prompts:
            prompts[cut] = tokenize(messages[:head] + messages[head + cut :])
        return prompts[cut]

    low, high = 0, len(cuts) - 1  # the earliest cut that fits lies in [low, high], or none does
    while low < high:
        middle = (low + high) // 2
        if len(prompt_from(cuts[middle])) + room <= max_model_len:
            high = middle
        else:
            low = middle + 1
    return prompt_from(cuts[low])


def turn_starts(conversation: Sequence[dict]) -> list[int]:
    """Where the conversation may begin: at its start, and at each later user message."""
    return [0] + [i for i, message in enumerate(conversation) if i > 0 and message["role"] == "user"]
