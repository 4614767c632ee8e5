from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engines.detokenizer import IncrementalDetokenizer, held_back_length


@pytest.fixture(scope="module")
def tokenizer(demo_model_path):
    return AutoTokenizer.from_pretrained(demo_model_path)


def _stream(tokenizer, text: str, stop: tuple[str, ...] = (), min_tokens: int = 0) -> tuple[list[str], IncrementalDetokenizer]:
    detokenizer = IncrementalDetokenizer(tokenizer, stop, min_tokens)
    deltas = []
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        deltas.append(detokenizer.add(token_id))
        if detokenizer.is_stopped:
            break
    deltas.append(detokenizer.flush())
    return deltas, detokenizer


def test_detokenizer_deltas_rebuild_the_text(tokenizer):
    text = "Grüße, 世界! Spaces  and\nnew lines 🙂 stay."
    deltas, _ = _stream(tokenizer, text)
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_detokenizer_cuts_at_the_first_stop_string(tokenizer):
    deltas, detokenizer = _stream(tokenizer, "one two three four", stop=("four", "three"))
    assert "".join(deltas) == "one two "
    assert detokenizer.is_stopped


def test_detokenizer_holds_back_a_possible_stop_prefix(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, stop=("END!",))
    sent = "".join(detokenizer.add(t) for t in tokenizer.encode("the END", add_special_tokens=False))
    assert sent == "the "  # " END" could still become "END!"
    assert detokenizer.flush() == "END"


def test_detokenizer_stop_string_spanning_tokens(tokenizer):
    deltas, detokenizer = _stream(tokenizer, "alpha beta gamma", stop=("a b",))
    assert "".join(deltas) == "alph"
    assert detokenizer.is_stopped


def test_held_back_length_is_the_longest_end_that_starts_a_marker():
    """Against the rule itself, by every prefix, over seeded random texts and markers."""
    import random

    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("ab<") for _ in range(rng.randint(0, 12)))
        markers = tuple("".join(rng.choice("ab<") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3)))
        by_prefixes = max((n for marker in markers for n in range(1, len(marker)) if text.endswith(marker[:n])), default=0)
        assert held_back_length(text, markers) == by_prefixes, (text, markers)


def test_detokenizer_looks_for_stop_strings_only_after_min_tokens(tokenizer):
    text = "one two one two one"
    assert len(tokenizer.encode("one two", add_special_tokens=False)) == 2
    deltas, detokenizer = _stream(tokenizer, text, stop=("one",), min_tokens=2)
    assert "".join(deltas) == "one two " and detokenizer.is_stopped  # the first "one" is within min_tokens
    deltas, _ = _stream(tokenizer, text, stop=("one",), min_tokens=5)
    assert "".join(deltas) == text


def test_detokenizer_can_keep_the_stop_string_and_special_tokens(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, ("two",), includes_stop=True)
    sent = "".join(detokenizer.add(t) for t in tokenizer.encode("one two three", add_special_tokens=False)) + detokenizer.flush()
    assert sent == "one two" and detokenizer.is_stopped
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    kept, skipped = IncrementalDetokenizer(tokenizer, skips_special=False), IncrementalDetokenizer(tokenizer)
    assert (kept.add(end) + kept.flush(), skipped.add(end) + skipped.flush()) == ("<|im_end|>", "")
