"""Embeddings from a language model: its last hidden states (after the final norm), pooled
into one vector per prompt and scaled to unit length, as vLLM's pooling runner makes them.

Rule: the pooling is the one the model folder names in sentence-transformers' layout
(`1_Pooling/config.json`: last token, mean or first token), else the last token's state,
vLLM's rule for a causal language model served for embeddings.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import torch

from server.engines.kv_cache import left_padded, positions_of

log = logging.getLogger(__name__)

Pooling = Literal["last", "mean", "first"]
_SENTENCE_TRANSFORMERS_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "first"}
EMBED_BATCH = 16  # prompts run at once: a request's inputs are embedded a batch at a time, decoding steps between them


def pooling_of(folder: Path) -> Pooling:
    """How a model folder's states become one vector (see the module's rule)."""
    path = Path(folder) / "1_Pooling" / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return "last"
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s): embeddings pool the last token", path, error)
        return "last"
    chosen = [pooling for key, pooling in _SENTENCE_TRANSFORMERS_MODES.items() if config.get(key)]
    if len(chosen) != 1:
        log.warning("%s names %s pooling modes baton knows (%s); embeddings pool the last token", path, len(chosen), ", ".join(_SENTENCE_TRANSFORMERS_MODES))
        return "last"
    return chosen[0]


@torch.inference_mode()
def embed(model, prompts: list[list[int]], pad_token_id: int, pooling: Pooling) -> list[list[float]]:
    """One unit vector per prompt, from one forward pass of the model's base (no LM head)
    over the prompts left-padded together."""
    input_ids, attention_mask = left_padded(prompts, pad_token_id, model.device)
    states = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_of(attention_mask), use_cache=False).last_hidden_state.float()
    if pooling == "last":
        pooled = states[:, -1]
    elif pooling == "first":
        first_columns = torch.tensor([states.shape[1] - len(prompt) for prompt in prompts], device=states.device)
        pooled = states[torch.arange(len(prompts), device=states.device), first_columns]
    else:
        mask = attention_mask[..., None].float()
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1)
    return torch.nn.functional.normalize(pooled, dim=-1).tolist()
