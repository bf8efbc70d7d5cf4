"""A served policy's output vocabulary: the tokens a rewrite may be written in.

A rewrite is a search query for *this* catalog, yet the policy scores all 49,152 tokens of its tokenizer at
every step. For a small model that tied output head is a large share of each token's compute (about a third
of a 15-layer SmolLM2 student's), so serving only scores the tokens the catalog's texts and the training
queries are written in (about 15,500 on Home Depot). It is a serving-time restriction, not a new model: the
head keeps the policy's own rows for those tokens, so their logits are unchanged and every other token gets
−inf, i.e. probability zero. The log-probabilities the rewriter logs are then those of the distribution it
actually sampled from, which is what off-policy evaluation needs.

Held-out queries are never read here: the vocabulary comes from the catalog and the training queries only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


def output_vocabulary(tokenizer: Any, texts: Iterable[str]) -> list[int]:
    """Sorted ids of every token the texts are written in, with and without a leading space (a BPE word
    after a space is a different token than at the start), plus the special tokens."""
    ids: set[int] = set(tokenizer.all_special_ids)
    for text in texts:
        ids.update(tokenizer(text, add_special_tokens=False).input_ids)
        ids.update(tokenizer(" " + text, add_special_tokens=False).input_ids)
    return sorted(ids)


class VocabularyHead(torch.nn.Module):
    """The output head over a subset of the vocabulary: the same logits for kept tokens, −inf elsewhere.

    It returns full-vocabulary logits so that ``generate``, its logits processors and the rewriter's logged
    log-probabilities need no id mapping; filling a −inf row costs nothing next to the matmul it saves.
    """

    def __init__(self, head: Any, keep: Sequence[int]) -> None:
        super().__init__()
        weight = head.weight.detach()
        vocab_size = weight.shape[0]
        if not keep:
            raise ValueError("an output vocabulary needs at least one token")
        if min(keep) < 0 or max(keep) >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got {min(keep)}…{max(keep)}")
        self.vocab_size = vocab_size
        self.keep: torch.Tensor
        self.register_buffer("keep", torch.tensor(sorted(set(keep)), dtype=torch.long))
        self.weight = torch.nn.Parameter(weight[self.keep].clone(), requires_grad=False)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach()[self.keep].clone(), False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        kept = torch.nn.functional.linear(hidden, self.weight, self.bias)
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.keep, kept)


def stop_ids(model: Any) -> set[int]:
    """The tokens ``generate`` stops on or pads with: a rewrite must be able to end."""
    config = model.generation_config
    ids: set[int] = set()
    for value in (config.eos_token_id, config.pad_token_id):
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


def restrict_output_vocabulary(model: Any, keep: Iterable[int]) -> Any:
    """``model`` (for inference only: its head is no longer tied to the embedding) writing only ``keep``
    and the tokens that end a rewrite."""
    kept = sorted(set(keep) | stop_ids(model))
    head = model.get_output_embeddings()
    if isinstance(head, VocabularyHead):  # a loaded policy handed on (canary → production) keeps its head
        if head.keep.tolist() != kept:
            raise ValueError("the model is already restricted to another output vocabulary")
        return model
    model.set_output_embeddings(VocabularyHead(head, kept))
    return model
