"""The Responses API's `truncation: "auto"`: which turns go, and how few renders find it."""

from __future__ import annotations

from server.api.truncation import answer_room, fitted_prompt, turn_starts


def _tokenizer(calls: list):
    """One token per word, each the number of the message it came from (so a prompt shows
    which messages it kept); every rendering is noted in `calls`."""

    def tokenize(messages: list[dict]) -> list[int]:
        calls.append(messages)
        return [message["number"] for message in messages for _ in message["content"].split()]

    return tokenize


def _conversation(num_turns: int, words: int = 10) -> list[dict]:
    """Instructions, then turns of a question and an answer of `words` words each, then a last question."""
    messages = [{"role": "system", "content": "Be brief."}]
    for _ in range(num_turns):
        messages += [{"role": "user", "content": "q " * words}, {"role": "assistant", "content": "a " * words}]
    messages.append({"role": "user", "content": "last question"})
    return [{**message, "number": number} for number, message in enumerate(messages)]


def test_a_conversation_that_fits_is_rendered_once_and_whole():
    calls = []
    prompt = fitted_prompt(_tokenizer(calls), _conversation(1), room=5, max_model_len=100)
    assert sorted(set(prompt)) == [0, 1, 2, 3] and len(calls) == 1


def test_the_oldest_turns_go_the_instructions_stay_and_few_renders_find_the_cut():
    calls, messages = [], _conversation(64)  # 2 + 64 x 20 + 2 words
    prompt = fitted_prompt(_tokenizer(calls), messages, room=50, max_model_len=254)  # room for 10 turns
    kept = sorted(set(prompt))
    assert kept[0] == 0 and messages[kept[1]]["role"] == "user" and kept[-1] == len(messages) - 1
    assert kept[1:] == list(range(kept[1], len(messages)))  # one cut, the rest whole
    assert len(prompt) + 50 <= 254 < len(prompt) + 50 + 20  # as many turns as fit, not fewer
    assert len(calls) <= 1 + 7  # the whole, then a binary search over 65 cuts


def test_a_tool_output_keeps_the_call_it_answers():
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1"}]}
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "weather?"}, call, {"role": "tool", "content": "21 C"}, {"role": "user", "content": "thanks"}]
    assert turn_starts(conversation) == [0, 2, 5]  # never at the tool message or its call


def test_where_not_even_the_last_turn_fits_its_prompt_is_given_to_fail_as_too_long():
    messages = _conversation(3)
    messages[-1]["content"] = "w " * 500
    prompt = fitted_prompt(_tokenizer([]), messages, room=10, max_model_len=100)
    assert sorted(set(prompt)) == [0, len(messages) - 1]  # the instructions and the last turn, too long


def test_an_answer_of_no_set_length_keeps_a_quarter_of_the_context_at_most_1024_tokens():
    assert (answer_room(64, 8192), answer_room(None, 8192), answer_room(None, 2048)) == (64, 1024, 512)
