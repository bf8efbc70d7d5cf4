"""One mini-batch DPO step as plain functions (TRL's loss, nanoGPT's readability).

Read top to bottom: pairs → :func:`tokenize_pairs` → :func:`sequence_logprobs` (policy and frozen
reference) → :func:`dpo_loss` → :meth:`DPOLearnerCore.step` (backward, clip, AdamW). Kafka, the ledger and
publishing live in ``learner.worker``; nothing here knows about them.

**The loss.** The paper's eq. 2 writes it with the policy's log-ratio of chosen to rejected alone:

    L = −1/B Σᵢ log σ( β log π(Q̃⁺ᵢ|Qᵢ) / π(Q̃⁻ᵢ|Qᵢ) )

Standard DPO (Rafailov et al.), which the paper cites and TRL implements, measures that log-ratio *relative to
a frozen reference policy* π_ref:

    L = −1/B Σᵢ log σ( β [ (log π(Q̃⁺ᵢ|Qᵢ) − log π_ref(Q̃⁺ᵢ|Qᵢ)) − (log π(Q̃⁻ᵢ|Qᵢ) − log π_ref(Q̃⁻ᵢ|Qᵢ)) ] )

Eq. 2 is the special case of a uniform reference (its terms cancel). Keeping the reference — the version
the run started from — is what stops an online learner from drifting arbitrarily far on a few hundred noisy
pairs; β sets how far. ``β (log π − log π_ref)`` of a completion is its *implicit reward*; the margin is
chosen − rejected.

**Equality with TRL** (``tests/test_dpo.py`` checks token ids, loss, rewards and gradients against
``trl.DPOTrainer`` 1.16 with ``loss_type=["sigmoid"]``): the batch layout is TRL's
``DataCollatorForPreference`` — 2B right-padded rows, every chosen then every rejected, with a
``completion_mask`` — and the tokenisation is TRL's for a plain-text (already templated) prompt: prompt and
prompt+completion are tokenised as one string each, and the completion starts where the two token lists
diverge. Two deliberate differences:

- TRL terminates completions with ``tokenizer.eos_token``. The converted SmolLM2 tokenizer reports
  ``<|im_start|>`` there, while ``generate`` stops on ``<|im_end|>`` (see ``qrloop.prompting.end_of_turn``);
  we terminate with the token the rewriter actually samples. The test hands TRL a tokenizer whose EOS is that
  token, and then both produce identical ``input_ids``.
- TRL drops examples whose prompt alone fills ``max_length``; an online step never drops a pair silently —
  such a pair keeps no completion tokens, contributes log σ(0) to the loss and no gradient.

**Against likelihood displacement: RPO** (``rpo_alpha``, Pang et al. 2024, "Iterative Reasoning Preference
Optimization"). DPO only widens the gap between chosen and rejected; on small, noisy online batches it lowers
*both* likelihoods, and the mass that leaves them goes to whatever the policy already favours — here, echoing
the query (issue #12). RPO adds the negative log-likelihood of the chosen completions:

    L_RPO = L + α · (−Σ log π(chosen tokens) / #chosen tokens)

the token mean over every chosen completion token of the batch, exactly TRL's ``loss_type=["sigmoid", "sft"],
loss_weights=[1.0, α]`` (TRL ≤ 0.x called it ``rpo_alpha``). α = 0 is the plain loss above, bit for bit.

**Against length drift: LD-DPO** (``ld_alpha``, Liu et al. 2024, "Length Desensitization in Direct Preference
Optimization"). A completion's log-probability is a sum over its tokens, so DPO's margin moves with the
rewrites' lengths, and an online run drifts towards longer ones (the served rewrites grew from 3.7 to 6.6
words over a 1,000-query run, a third of the added words units and numbers that retrieve nothing new). LD-DPO
splits each pair's completions at the shorter one's length ℓ and counts the longer one's tokens past ℓ α
times, in the policy's and the reference's terms alike:

    log π(y) → Σ_{t ≤ ℓ} log π(y_t | ·) + α Σ_{t > ℓ} log π(y_t | ·)

exactly TRL's ``ld_alpha`` (``loss_type=["sigmoid"]``). Unset (or α = 1) is the plain loss, bit for bit. It
is a per-pair weighting of tokens (:func:`completion_weights`), so every layout and chunking below applies it
unchanged. Not with RPO: its term is the chosen rewrites' likelihood over all their tokens.

Only the completion positions need the vocabulary projection, so :func:`sequence_logprobs` asks the model for
logits from the first completion position on (``logits_to_keep``); prompts are most of a step's tokens.
By default (``DPOConfig.prompt_tree``, the ``dpo.prompt_tree`` setting) the step goes further and computes
every prompt token once: :func:`prompt_tree` re-lays the same batch and :func:`tree_logprobs` replaces
:func:`sequence_logprobs`, with the same numbers to float rounding.

**Off the 16th pair's path.** The reference is frozen for a lineage and the policy does not change between
steps, so a batch's work need not wait for its last pair: :meth:`DPOLearnerCore.prepare_step` computes each
chunk of :func:`chunk_spans` (8, 4, 2, 1, 1 pairs of 16) as soon as its last pair is queued, the reference
terms and (``gradient_batching``) the policy's forward and backward, summing each chunk's share of the
batch-mean gradient into ``.grad``. The step is then the last pair's chunk, the clip and AdamW.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from policy_store import PolicyStore
from qrloop.models import adapter_base, load_adapter, load_policy
from qrloop.prompting import build_prompt, end_of_turn
from qrloop.settings import DPOSettings, Settings

Pair = tuple[str, str, str]  # (query, chosen rewrite, rejected rewrite)
Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, completion_mask: (2B, T), chosen rows first


def _default(name: str) -> Any:
    return DPOSettings.model_fields[name].default


def _help(name: str) -> str:
    return str(DPOSettings.model_fields[name].description)


@dataclass
class DPOConfig:
    """Everything one DPO step depends on; defaults are ``DPOSettings``'s, so the two cannot drift apart."""

    beta: float = field(default=_default("beta"), metadata={"help": _help("beta")})
    learning_rate: float = field(default=_default("learning_rate"), metadata={"help": _help("learning_rate")})
    max_grad_norm: float = field(default=_default("max_grad_norm"), metadata={"help": _help("max_grad_norm")})
    rpo_alpha: float = field(default=_default("rpo_alpha"), metadata={"help": _help("rpo_alpha")})
    ld_alpha: float | None = field(default=_default("ld_alpha"), metadata={"help": _help("ld_alpha")})
    max_length: int | None = field(
        default=128,
        metadata={
            "help": "Tokens kept per prompt+completion sequence, from the start (TRL's max_length, "
            "keep_start); prompts are ~40 tokens and rewrites ≤ 16, so this only cuts runaway inputs. "
            "None: no cut."
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (TRL's default, 0)."})
    prompt_tree: bool = field(default=_default("prompt_tree"), metadata={"help": _help("prompt_tree")})
    lora_r: int = field(default=_default("lora_r"), metadata={"help": _help("lora_r")})
    batch_size: int = field(default=_default("batch_size"), metadata={"help": _help("batch_size")})
    reference_batching: bool = field(
        default=_default("reference_batching"), metadata={"help": _help("reference_batching")}
    )
    gradient_batching: bool = field(
        default=_default("gradient_batching"), metadata={"help": _help("gradient_batching")}
    )
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_target_modules: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj"), metadata={"help": "Modules that get an adapter."}
    )

    def __post_init__(self) -> None:
        # The same rules as DPOSettings', for a config built directly (benchmarks, tests).
        DPOSettings(rpo_alpha=self.rpo_alpha, ld_alpha=self.ld_alpha)

    def loss_summary(self) -> str:
        """The loss and update in one line, for the learner's start-up log (what a run trained with)."""
        parts = [f"DPO β {self.beta:g}", f"lr {self.learning_rate:g}"]
        parts.append(f"LoRA r {self.lora_r}" if self.lora_r else "full fine-tuning")
        if self.rpo_alpha:
            parts.append(f"RPO α {self.rpo_alpha:g}")
        if self.ld_alpha is not None:
            parts.append(f"LD-DPO α {self.ld_alpha:g}")
        return ", ".join(parts)

    @classmethod
    def from_settings(cls, dpo: DPOSettings, **overrides: Any) -> DPOConfig:
        values = {
            "beta": dpo.beta,
            "learning_rate": dpo.learning_rate,
            "max_grad_norm": dpo.max_grad_norm,
            "prompt_tree": dpo.prompt_tree,
            "rpo_alpha": dpo.rpo_alpha,
            "ld_alpha": dpo.ld_alpha,
            "lora_r": dpo.lora_r,
            "batch_size": dpo.batch_size,
            "reference_batching": dpo.reference_batching,
            "gradient_batching": dpo.gradient_batching,
        }
        return cls(**(values | overrides))


# -- data: pairs → one padded tensor batch ------------------------------------------------------------------


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_pairs(
    tokenizer: Any, pairs: Sequence[Pair], max_len: int | None = None, eos_token: str | None = None
) -> Batch:
    """2B right-padded rows, every chosen then every rejected (TRL's layout), with a completion mask.

    A row is prompt ids + completion ids, the completion being the rewrite followed by ``eos_token``
    (default: the tokenizer's; the learner passes :func:`qrloop.prompting.end_of_turn`). Padding is always on
    the right, whatever ``tokenizer.padding_side`` says (the rewriter's left padding is for generation): with
    right padding real tokens keep positions 0..n-1 and causal attention never looks at the pads, so no
    position ids are needed.
    ``max_len`` keeps the first tokens of each row, like TRL's ``truncation_mode="keep_start"``.
    """
    if not pairs:
        raise ValueError("tokenize_pairs needs at least one pair")
    eos = eos_token if eos_token is not None else str(tokenizer.eos_token)
    chosen_rows, rejected_rows = [], []
    for query, chosen, rejected in pairs:
        prompt = build_prompt(tokenizer, query)
        prompt_ids = tokenizer(prompt)["input_ids"]
        chosen_ids = tokenizer(prompt + _terminated(chosen, eos))["input_ids"]
        rejected_ids = tokenizer(prompt + _terminated(rejected, eos))["input_ids"]
        # Tokens may merge across the prompt/completion boundary: the completion starts where the ids differ.
        prompt_len = min(
            common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids)
        )
        chosen_rows.append(_row(chosen_ids, prompt_len, max_len))
        rejected_rows.append(_row(rejected_ids, prompt_len, max_len))
    pad = tokenizer.pad_token_id
    if pad is None:  # any id will do: pads are masked out of attention and of the completion
        pad = tokenizer.convert_tokens_to_ids(eos)
    return pad_right(chosen_rows + rejected_rows, int(pad))


def _terminated(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _row(ids: list[int], prompt_len: int, max_len: int | None) -> tuple[list[int], int]:
    return (ids if max_len is None else ids[:max_len]), prompt_len


def pad_right(
    rows: Sequence[tuple[Sequence[int], int]], pad_id: int, device: torch.device | None = None
) -> Batch:
    """Right-padded ``input_ids``/``attention_mask`` and ``completion_mask`` (1 on completion tokens) from
    rows of (token ids, number of prompt tokens). Right padding keeps every real token at its natural
    position. The one padding of every teacher-forced batch: DPO's pairs, offline SFT and distillation.

    ``device``: where the tensors go (default the CPU, where tokenising happens); :func:`prompt_tree` passes
    its batch's, which is the model's under data parallelism on GPUs."""
    width = max(len(ids) for ids, _ in rows)
    # Always an explicit device: no tensor of a batch depends on what the default device happens to be.
    device = device if device is not None else torch.device("cpu")
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, (ids, prompt_len) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(list(ids), dtype=torch.long, device=device)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, prompt_len : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


# -- model: log-probabilities of the completions ------------------------------------------------------------


def completion_weights(completion_mask: torch.Tensor, ld_alpha: float | None = None) -> torch.Tensor:
    """How much each position's log-probability counts in its row's sum: 1 on completion tokens, 0 elsewhere;
    with ``ld_alpha`` (LD-DPO), α on the completion tokens past the shorter completion of the row's pair.

    ``completion_mask``: (2B, T) with every chosen row, then every rejected row (TRL's layout), so row i and
    row i + B are one pair; positions may be shifted (targets) as long as both rows are shifted alike.
    """
    weights = completion_mask.float()
    if ld_alpha is None:
        return weights
    position = completion_mask.cumsum(dim=1)  # 1, 2, … along each row's completion
    chosen_len, rejected_len = completion_mask.sum(dim=1).chunk(2, dim=0)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
    past_shared = completion_mask.bool() & (position > shared)
    return weights.masked_fill(past_shared, ld_alpha)


def sequence_logprobs(
    model: Any, batch: Batch, ld_alpha: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's completion tokens → (chosen (B,), rejected (B,)).

    One forward over chosen and rejected together, like TRL's concatenated forward; ``ld_alpha``: LD-DPO's
    weighting of each pair's tokens past its shorter completion (see the module docstring).
    """
    chosen, rejected = completion_logprobs(model, batch, ld_alpha).chunk(2, dim=0)
    return chosen, rejected


def completion_logprobs(model: Any, batch: Batch, ld_alpha: float | None = None) -> torch.Tensor:
    """Summed log-probabilities of each row's completion tokens (rows,), teacher-forced, in one forward: the
    DPO step, the off-policy scorer and the offline evaluation's cross-entropy all score completions with it.

    The token at position t is predicted by the logits at t − 1, so logits are only computed from the position
    before the earliest completion token on.
    """
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
    width = input_ids.shape[1]
    has_completion = completion_mask.any(dim=1)
    # First completion position over all rows (a row cut to no completion does not hold the others back).
    starts = completion_mask.argmax(dim=1)[has_completion]
    first = int(starts.min()) if starts.numel() else width - 1
    start = max(first - 1, 0)
    logits = model(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"],
        use_cache=False,
        logits_to_keep=torch.arange(start, width - 1, device=input_ids.device),
    ).logits  # (2B, width − 1 − start, V): predictions for tokens start + 1 .. width − 1
    targets = input_ids[:, start + 1 :]
    weights = completion_weights(completion_mask[:, start + 1 :], ld_alpha)
    # log softmax at the target only: logit − logsumexp, without materialising the full log-softmax tensor.
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
    return weighted_sum(token_logps, weights)


def weighted_sum(token_logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ weight × log-probability per row. Positions of weight 0 are selected out before the product: a
    prompt or pad token outside a served policy's output vocabulary (``qrloop.vocabulary``) has
    log-probability −inf, and −inf × 0 would make the whole row NaN."""
    return (token_logps.masked_fill(weights == 0, 0.0) * weights.to(token_logps.dtype)).sum(dim=1)


# -- the same log-probabilities with every prompt token computed once ---------------------------------------


class PromptTree(NamedTuple):
    """A TRL batch re-laid so that no prompt token goes through the model twice.

    In a DPO batch the prompt is most of the tokens (the system message alone is ~29 of ~40 prompt tokens,
    a rewrite 5–10), and TRL's layout runs every prompt twice (chosen row, rejected row). Here a batch is a
    tree: the prefix every prompt shares (the system message) runs once, each pair's remaining prompt tokens
    once, and only the completions run per row, attending to the prompt through the key/value cache.
    Gradients flow through the cache, so the step is the same step, to float rounding.

    A pair's *tail* is its last prompt token followed by its completion: the last prompt position predicts the
    first completion token, so every logit the loss needs comes out of the tail forward.
    """

    prefix_ids: torch.Tensor  # (1, S) prompt tokens shared by every pair
    rest_ids: torch.Tensor  # (B, R) each pair's prompt tokens after the prefix, but its last; right-padded
    rest_mask: torch.Tensor  # (B, R) 1 on real tokens
    tail_ids: torch.Tensor  # (2B, C) last prompt token + completion; chosen rows, then rejected; right-padded
    tail_mask: torch.Tensor  # (2B, C) 1 on real tokens
    target_mask: torch.Tensor  # (2B, C − 1) 1 where tail_ids[:, 1:] is a completion token
    prompt_lens: torch.Tensor  # (B,) tokens of each pair's prompt

    @property
    def tokens(self) -> int:
        """Tokens that go through the model (against TRL's ``attention_mask.sum()`` for the same pairs)."""
        return int(self.prefix_ids.numel() + self.rest_mask.sum() + self.tail_mask.sum())


def prompt_tree(batch: Batch) -> PromptTree:
    """Re-lay a :func:`tokenize_pairs` batch as a :class:`PromptTree` (the same ids, not re-tokenised)."""
    input_ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    pairs = input_ids.shape[0] // 2
    lengths = attention.sum(dim=1)
    # A row cut to no completion (its prompt filled max_length) is all prompt, as far as it goes.
    starts = torch.where(completion.any(dim=1), completion.argmax(dim=1), lengths)
    prompt_lens = torch.minimum(starts[:pairs], starts[pairs:])
    if int(prompt_lens.min()) < 1:
        raise ValueError("every pair needs at least one prompt token")
    prompts = [input_ids[i, : int(prompt_lens[i])].tolist() for i in range(pairs)]
    # The shared prefix stops one token short of the shortest prompt: every pair keeps its last prompt token
    # for its tail.
    shared = min(common_prefix_length(prompts[0], p) for p in prompts)
    shared = min(shared, int(prompt_lens.min()) - 1)
    # Rows of (ids, prompt tokens): a rest is all "prompt" (only its attention mask is used); a tail's first
    # token is its pair's last prompt token and every later one is completion.
    rests = [(p[shared:-1], 0) for p in prompts]
    tails = [
        (input_ids[row, int(prompt_lens[row % pairs]) - 1 : int(lengths[row])].tolist(), 1)
        for row in range(2 * pairs)
    ]
    pad = int(input_ids[0, -1]) if input_ids.numel() else 0  # any id: pads are masked everywhere
    rest = pad_right(rests, pad, input_ids.device)
    tail = pad_right(tails, pad, input_ids.device)
    return PromptTree(
        prefix_ids=torch.tensor([prompts[0][:shared]], dtype=torch.long, device=input_ids.device),
        rest_ids=rest["input_ids"],
        rest_mask=rest["attention_mask"],
        tail_ids=tail["input_ids"],
        tail_mask=tail["attention_mask"],
        target_mask=tail["completion_mask"][:, 1:],
        prompt_lens=prompt_lens,
    )


def _cache_of(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class KnownPrefix(NamedTuple):
    """Leading prompt tokens and their key/value cache under one frozen model, computed once and reused."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]


def known_prefix(model: Any, ids: Sequence[int]) -> KnownPrefix:
    """The cache of ``ids`` under ``model``. Call it under ``no_grad``: it is kept, so it holds no graph."""
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, logits_to_keep=1)
    return KnownPrefix(list(ids), _layers(out.past_key_values))


def _prefix_layers(
    model: Any, prefix_ids: torch.Tensor, known: KnownPrefix | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The cache of the tree's shared prefix: over ``known``'s cache when the prefix starts with its tokens
    (only the tokens after it go through the model), else from scratch."""
    head = len(known.ids) if known is not None else 0
    if known is None or not 0 < head <= prefix_ids.shape[1] or prefix_ids[0, :head].tolist() != known.ids:
        return _layers(model(input_ids=prefix_ids, use_cache=True, logits_to_keep=1).past_key_values)
    if head == prefix_ids.shape[1]:
        return known.layers
    positions = torch.arange(head, prefix_ids.shape[1], device=prefix_ids.device).unsqueeze(0)
    out = model(
        input_ids=prefix_ids[:, head:],
        position_ids=positions,
        past_key_values=_cache_of(known.layers),  # a new cache: the forward appends to it, not to ``known``
        use_cache=True,
        logits_to_keep=1,
    )
    return _layers(out.past_key_values)


def tree_logprobs(
    model: Any, tree: PromptTree, known: KnownPrefix | None = None, ld_alpha: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sequence_logprobs` of the same pairs, each prompt token computed once (see :class:`PromptTree`).

    Three forwards: the shared prefix (one row), the rest of each prompt (B rows, over the prefix's cache),
    the tails (2B rows, over the prompt caches). Padding sits *between* a prompt and its tail, so positions
    are given explicitly and the 2-D attention mask has holes there; causal masking is by cache index, which
    keeps every token's view of its own prompt exactly as in the plain layout. ``known``: a cache of the
    prefix's first tokens under this same model, kept from an earlier call (a frozen reference's system
    message), so that those tokens are not computed again; never for a model that is being trained.
    ``ld_alpha``: as for :func:`sequence_logprobs`.
    """
    pairs, shared = tree.rest_ids.shape[0], tree.prefix_ids.shape[1]
    layers: list[tuple[torch.Tensor, torch.Tensor]] = []
    if shared:
        prefix = _prefix_layers(model, tree.prefix_ids, known)
        layers = [(k.expand(pairs, -1, -1, -1), v.expand(pairs, -1, -1, -1)) for k, v in prefix]
    device = tree.rest_ids.device
    seen = torch.ones((pairs, shared), dtype=torch.long, device=device)
    if tree.rest_ids.shape[1]:
        rest_positions = shared + torch.arange(tree.rest_ids.shape[1], device=device).expand(pairs, -1)
        seen = torch.cat([seen, tree.rest_mask], dim=1)
        out = model(
            input_ids=tree.rest_ids,
            attention_mask=seen,
            position_ids=rest_positions,
            past_key_values=_cache_of(layers) if layers else None,
            use_cache=True,
            logits_to_keep=1,
        )
        layers = _layers(out.past_key_values)
    width = tree.tail_ids.shape[1]
    tail_positions = (tree.prompt_lens - 1).repeat(2).unsqueeze(1) + torch.arange(width, device=device)
    logits = model(
        input_ids=tree.tail_ids,
        attention_mask=torch.cat([seen.repeat(2, 1), tree.tail_mask], dim=1),
        position_ids=tail_positions,
        past_key_values=_cache_of([(k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1)) for k, v in layers])
        if layers
        else None,
        use_cache=True,
        logits_to_keep=torch.arange(0, width - 1, device=device),
    ).logits  # (2B, C − 1, V): predictions for tail tokens 1 .. C − 1
    targets = tree.tail_ids[:, 1:]
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
    weights = completion_weights(tree.target_mask, ld_alpha)
    chosen, rejected = weighted_sum(token_logps, weights).chunk(2, dim=0)
    return chosen, rejected


# -- loss ---------------------------------------------------------------------------------------------------


class DPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    chosen_rewards: torch.Tensor  # (B,) β (log π − log π_ref) of the chosen rewrites, detached
    rejected_rewards: torch.Tensor  # (B,) the same for the rejected ones
    margin: torch.Tensor  # (B,) chosen − rejected implicit reward
    nll: torch.Tensor  # scalar, differentiable: mean negative log-likelihood per chosen completion token
    preference: torch.Tensor  # scalar, differentiable: the sigmoid term alone (``loss`` when rpo_alpha = 0)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    rpo_alpha: float = 0.0,
    chosen_tokens: int = 1,
) -> DPOLoss:
    """The sigmoid DPO loss, mean over the batch (see the module docstring for eq. 2), plus ``rpo_alpha``
    times the chosen completions' NLL per token (RPO); ``chosen_tokens``: completion tokens of chosen rows."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    preference = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    nll = -policy_chosen.sum() / max(chosen_tokens, 1)
    # α = 0 adds nothing, not even 0 · nll: the plain loss stays TRL's bit for bit.
    loss = preference + rpo_alpha * nll if rpo_alpha else preference
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    margin = chosen_rewards - rejected_rewards
    return DPOLoss(loss, chosen_rewards, rejected_rewards, margin, nll, preference)


def chosen_token_count(batch: Batch) -> int:
    """Completion tokens of the batch's chosen rows (its first half): the NLL term's denominator."""
    return int(batch["completion_mask"].chunk(2, dim=0)[0].sum())


# -- the step -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepStats:
    loss: float
    margin: float  # mean over the batch
    chosen_reward: float
    rejected_reward: float
    accuracy: float  # share of pairs whose chosen reward exceeds the rejected one
    seconds: float
    tokens: int  # non-pad tokens of the batch in TRL's layout (prompt + completion, chosen + rejected rows)
    grad_norm: float = 0.0  # before clipping
    computed_tokens: int = 0  # tokens through the policy in the prompt-tree layout (each prompt token once)
    nll: float = 0.0  # mean NLL per chosen completion token (what RPO's term adds, times rpo_alpha)
    # Of ``seconds``, what ran in the step call: with gradient batching the update (and any chunk not yet
    # prepared); the rest ran as the pairs arrived, the last pair's chunk included. Without: all of it.
    final_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def _is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def disable_dropout(model: Any) -> None:
    """As TRL's default ``disable_dropout=True``: dropout would make policy and reference differ at step 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def add_lora(model: Any, config: DPOConfig) -> Any:
    from peft import LoraConfig, get_peft_model  # only LoRA runs pay for peft's import

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.lora_target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def reference_chunks(batch_size: int) -> list[int]:
    """Sizes of the chunks of a batch's reference terms, halving towards its end: 16 → 8, 4, 2, 1, 1.

    Why: one forward over several pairs shares the weight reads and fills the matrix products, which pays
    when pairs arrive in a burst or a backlog (a replay); the last pair, which the step waits for when pairs
    trickle in, is still computed alone, so that wait is never longer than with one pair a forward."""
    sizes: list[int] = []
    left = batch_size
    while left:
        sizes.append(max(left // 2, 1))
        left -= sizes[-1]
    return sizes


def chunk_spans(count: int, batch_size: int, batching: bool = True) -> list[tuple[int, int]]:
    """(start, end) of the chunks that cover positions 0 .. ``count`` − 1: :func:`reference_chunks` of
    ``batch_size``, repeated every ``batch_size`` positions (pairs queued past a full batch belong to the
    next one), or one position each when not ``batching``. The last span may end past ``count``."""
    sizes = itertools.cycle(reference_chunks(batch_size) if batching else [1])
    spans: list[tuple[int, int]] = []
    start = 0
    while start < count:
        size = next(sizes)
        spans.append((start, start + size))
        start += size
    return spans


class ChunkPart(NamedTuple):
    """What one chunk's forward and backward leaves for the step's statistics (all detached)."""

    preference_sum: float  # Σ over its pairs of −log σ(β · margin)
    nll_sum: float  # −Σ log π of its chosen completion tokens
    chosen_tokens: int
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    tokens: int  # as StepStats.tokens
    computed_tokens: int  # as StepStats.computed_tokens
    seconds: float


@dataclass
class AccumulatedGradient:
    """The gradient of a batch's first pairs, summed into the policy's ``.grad`` chunk by chunk as they
    arrived (:meth:`DPOLearnerCore.prepare_gradients`). Valid only for these pairs, in this order, at this β,
    over the weights as they are until the next update."""

    beta: float
    pairs: list[Pair] = field(default_factory=list)
    parts: list[ChunkPart] = field(default_factory=list)

    def holds_start_of(self, pairs: Sequence[Pair], beta: float) -> bool:
        return beta == self.beta and list(pairs[: len(self.pairs)]) == self.pairs


def step_stats(
    parts: Sequence[ChunkPart], grad_norm: float, final_seconds: float, update_s: float
) -> StepStats:
    """A step's statistics from its chunks' (what the one-pass step computes from the whole batch)."""
    chosen = torch.cat([part.chosen_rewards for part in parts])
    rejected = torch.cat([part.rejected_rewards for part in parts])
    margin = chosen - rejected
    return StepStats(
        loss=sum(part.preference_sum for part in parts) / len(margin),
        margin=float(margin.mean()),
        chosen_reward=float(chosen.mean()),
        rejected_reward=float(rejected.mean()),
        accuracy=float((margin > 0).float().mean()),
        seconds=sum(part.seconds for part in parts) + update_s,
        tokens=sum(part.tokens for part in parts),
        grad_norm=grad_norm,
        computed_tokens=sum(part.computed_tokens for part in parts),
        nll=sum(part.nll_sum for part in parts) / max(sum(part.chosen_tokens for part in parts), 1),
        final_seconds=final_seconds,
    )


class DPOLearnerCore:
    """Policy + frozen reference + a persistent AdamW: ``step(pairs)`` is one DPO update.

    ``reference`` is a separate frozen model (full fine-tuning), or None when ``policy`` is a peft LoRA model:
    then the reference is the policy with its adapter disabled, i.e. the weights the run started from.
    fp32 on CPU, no mixed precision, no gradient checkpointing: at 135M parameters and ~1.4k tokens a step,
    activations are small and checkpointing would only add a third forward.
    """

    def __init__(
        self, policy: Any, reference: Any | None, tokenizer: Any, config: DPOConfig, base_model: str = ""
    ) -> None:
        if reference is None and not _is_peft(policy):
            raise ValueError("a reference model is required unless the policy is a peft (LoRA) model")
        if reference is policy:
            raise ValueError("the reference must be a separate copy: freezing it would freeze the policy")
        self.policy = policy
        self.reference = reference
        self.tokenizer = tokenizer
        self.config = config
        self.base_model = base_model
        self.eos_token = end_of_turn(tokenizer, getattr(policy, "generation_config", None))
        self.steps = 0
        disable_dropout(policy)
        if reference is not None:
            disable_dropout(reference)
            reference.eval()
            for param in reference.parameters():
                param.requires_grad_(False)
        # fused: one kernel over all parameters instead of a dozen elementwise passes over each; the same
        # update to float rounding, and on CPU 0.09 s instead of 0.50 s a step for SmolLM2's 135M weights
        # (one thread), 6% of a full fine-tuning step that the step's FLOPs did not count.
        self.optimizer = torch.optim.AdamW(
            self.trainable_parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, fused=True
        )
        # Reference log-probabilities of pairs that arrived but are not trained yet (see prepare_reference).
        self._reference_cache: dict[Pair, tuple[torch.Tensor, torch.Tensor]] = {}
        self._known_prefix: KnownPrefix | None = None  # the reference's system-message cache
        self._accumulated = AccumulatedGradient(beta=config.beta)  # see prepare_gradients

    @classmethod
    def from_model(
        cls, policy: Any, tokenizer: Any, config: DPOConfig, base_model: str = ""
    ) -> DPOLearnerCore:
        """Start a run from ``policy``: it is the reference (a frozen copy, or the adapter-disabled base)."""
        if config.lora_r > 0:
            return cls(add_lora(policy, config), None, tokenizer, config, base_model)
        return cls(policy, copy.deepcopy(policy), tokenizer, config, base_model)

    @classmethod
    def from_versions(
        cls, settings: Settings, store: PolicyStore, *, policy_version: int, reference_version: int
    ) -> DPOLearnerCore:
        """Resume a lineage: weights of ``policy_version``, reference = the version the run started from.

        A lineage keeps the kind it started with: from a ``full`` start it trains a LoRA adapter when
        ``dpo.lora_r`` > 0, and a lineage of adapters resumes its adapter (its stored rank) over the start.
        """
        config = DPOConfig.from_settings(settings.dpo)
        stored = store.get(policy_version)
        if stored.kind == "lora":
            if adapter_base(stored) != reference_version:
                raise ValueError(
                    f"version {policy_version} is an adapter over {adapter_base(stored)}, "
                    f"not over the lineage's reference {reference_version}"
                )
            base, tokenizer = load_policy(store.load_dir(reference_version))
            policy = load_adapter(base, store.load_dir(stored), trainable=True)
            core = cls(policy, None, tokenizer, config, stored.base_model)
        else:
            policy, tokenizer = load_policy(store.load_dir(stored))
            if reference_version == policy_version:
                core = cls.from_model(policy, tokenizer, config, stored.base_model)
            else:
                reference, _ = load_policy(store.load_dir(reference_version))
                core = cls(policy, reference, tokenizer, config, stored.base_model)
        core.resume_optimizer(store.load_dir(stored))
        return core

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def tokenize(self, pairs: Sequence[Pair]) -> Batch:
        return tokenize_pairs(self.tokenizer, pairs, self.config.max_length, self.eos_token)

    @contextmanager
    def _reference_model(self) -> Iterator[Any]:
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy.disable_adapter():
                yield self.policy

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with self._reference_model() as model:
            return tree_logprobs(model, prompt_tree(batch), self._system_prefix(model), self.config.ld_alpha)

    def _system_prefix(self, reference: Any) -> KnownPrefix:
        """The reference's cache of the tokens every prompt starts with (the system message, ~27 of a
        prompt's ~40 tokens), computed once per core: the reference is frozen for a lineage, and a batch's
        reference terms are computed a few pairs at a time as they arrive (:meth:`prepare_reference`), so
        without it every chunk would run the system message through the model again."""
        if self._known_prefix is None:
            probes = [
                self.tokenize([(query, "a", "b")])["input_ids"][0].tolist() for query in ("alpha", "7 zeta")
            ]
            shared = common_prefix_length(*probes)
            self._known_prefix = known_prefix(reference, probes[0][:shared])
        return self._known_prefix

    def prepare_reference(self, pairs: Sequence[Pair], *, final: bool = False) -> None:
        """Compute the reference log-probabilities of a batch's pairs as they arrive, off the step's path.

        ``pairs``: the batch as gathered so far, in order (the learner calls this after every pair it
        queues). The reference is frozen for a lineage, so a pair's terms do not depend on when they are
        computed; they are computed in the chunks of :func:`reference_chunks`, fixed by position, each in one
        forward once its last pair is there (``final``: the step's call, which also computes a chunk the batch
        leaves short). So a pair's terms depend only on the pairs at the positions of its chunk, never on how
        the polls grouped the arrivals or on timing: a resumed learner takes bit-identical steps.
        """
        for start, end in chunk_spans(len(pairs), self.config.batch_size, self.config.reference_batching):
            chunk = pairs[start:end]
            if len(chunk) < end - start and not final:
                break  # its last pair has not arrived yet
            if all(pair in self._reference_cache for pair in chunk):
                continue
            chosen, rejected = self.reference_logprobs(self.tokenize(chunk))
            for i, pair in enumerate(chunk):
                # A pair seen at an earlier position (the same texts twice) keeps its first terms.
                self._reference_cache.setdefault(pair, (chosen[i], rejected[i]))

    def forget_reference(self, pairs: Sequence[Pair]) -> None:
        """Drop prepared terms of pairs that will not be trained (already trained: a redelivery), or were
        (the step's; the same texts may come twice in one batch)."""
        for pair in pairs:
            self._reference_cache.pop(pair, None)

    def _prepared_reference(self, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = zip(*(self._reference_cache[pair] for pair in pairs), strict=True)
        return torch.stack(chosen), torch.stack(rejected)

    def _take_reference(self, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
        self.prepare_reference(pairs, final=True)
        reference = self._prepared_reference(pairs)
        self.forget_reference(pairs)
        return reference

    # -- the gradient, chunk by chunk as the pairs arrive ---------------------------------------------------

    @property
    def gradient_batching(self) -> bool:
        """Whether steps accumulate their gradient in chunks (:meth:`prepare_gradients`). Not with RPO's
        term: its denominator is the whole batch's chosen tokens, unknown until the last pair."""
        return self.config.gradient_batching and not self.config.rpo_alpha

    def prepare_step(self, pairs: Sequence[Pair]) -> None:
        """All of the next step that the pairs gathered so far allow: their reference terms and, with
        gradient batching, the policy's forward and backward of each chunk of the batch that is complete.

        ``pairs``: as for :meth:`prepare_reference` (the learner's queue, in order). Only the first
        ``batch_size`` belong to the next step; the gradient of the ones after them needs its weights."""
        self.prepare_reference(pairs)
        if self.gradient_batching:
            self.prepare_gradients(pairs[: self.config.batch_size])

    def prepare_gradients(self, pairs: Sequence[Pair], *, final: bool = False) -> None:
        """Accumulate the batch-mean gradient of ``pairs`` (the next step's, in order) in the chunks of
        :func:`chunk_spans`, each once its last pair is there (``final``: the step's call, which also takes a
        chunk the batch leaves short). The weights do not change before the step, so the sum is the one-pass
        gradient to float rounding, and since the chunks are fixed by position it is the same bits however
        the arrivals were polled. What was accumulated for another start of the batch (a pair dropped as
        already trained, a new β) is discarded and computed again."""
        self.prepare_reference(pairs, final=final)  # a complete chunk's terms are there already
        if not self._accumulated.holds_start_of(pairs, self.config.beta):
            self._discard_gradient()
        done = len(self._accumulated.pairs)
        for start, end in chunk_spans(len(pairs), self.config.batch_size):
            chunk = list(pairs[start:end])
            if start < done:
                continue
            if len(chunk) < end - start and not final:
                break  # its last pair has not arrived yet
            try:
                self._accumulated.parts.append(self._backward_chunk(chunk))
            except BaseException:
                self._discard_gradient()  # a backward cut short leaves part of a chunk in .grad
                raise
            self._accumulated.pairs += chunk

    def _discard_gradient(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._accumulated = AccumulatedGradient(beta=self.config.beta)

    def _backward_chunk(self, chunk: Sequence[Pair]) -> ChunkPart:
        """One chunk's forward and backward, its loss weighted as its share of a full batch's mean."""
        started = time.perf_counter()
        batch = self.tokenize(chunk)
        tree = prompt_tree(batch) if self.config.prompt_tree else None
        self.policy.train()
        out = self.loss(batch, self._prepared_reference(chunk), tree)
        (out.preference * (len(chunk) / self.config.batch_size)).backward()
        self.policy.eval()
        chosen_tokens = chosen_token_count(batch)
        return ChunkPart(
            preference_sum=float(out.preference.detach()) * len(chunk),
            nll_sum=float(out.nll.detach()) * max(chosen_tokens, 1),
            chosen_tokens=chosen_tokens,
            chosen_rewards=out.chosen_rewards,
            rejected_rewards=out.rejected_rewards,
            tokens=int(batch["attention_mask"].sum()),
            computed_tokens=tree.tokens if tree is not None else int(batch["attention_mask"].sum()),
            seconds=time.perf_counter() - started,
        )

    def _accumulated_step(self, pairs: Sequence[Pair]) -> StepStats:
        """The step over the accumulated gradient: the chunks still missing, then clip and AdamW."""
        started = time.perf_counter()
        self.prepare_gradients(pairs, final=True)
        update_started = time.perf_counter()
        if len(pairs) != self.config.batch_size:  # the chunks were weighted for a full batch
            for param in self.trainable_parameters():
                if param.grad is not None:
                    param.grad.mul_(self.config.batch_size / len(pairs))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        parts = self._accumulated.parts
        self._discard_gradient()
        self.forget_reference(pairs)
        self.steps += 1
        ended = time.perf_counter()
        return step_stats(parts, float(grad_norm), ended - started, ended - update_started)

    def loss(
        self,
        batch: Batch,
        reference: tuple[torch.Tensor, torch.Tensor] | None = None,
        tree: PromptTree | None = None,
    ) -> DPOLoss:
        """The DPO loss of a batch.

        ``reference``: precomputed (chosen, rejected) reference log-probabilities; ``tree``: the batch's
        :func:`prompt_tree` if the caller has it already."""
        if self.config.prompt_tree:
            tree = tree if tree is not None else prompt_tree(batch)
            policy_chosen, policy_rejected = tree_logprobs(self.policy, tree, ld_alpha=self.config.ld_alpha)
        else:
            policy_chosen, policy_rejected = sequence_logprobs(self.policy, batch, self.config.ld_alpha)
        ref_chosen, ref_rejected = reference if reference is not None else self.reference_logprobs(batch)
        return dpo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            self.config.beta,
            self.config.rpo_alpha,
            chosen_token_count(batch),
        )

    def step(self, pairs: Sequence[Pair]) -> StepStats:
        """One update on one mini-batch: policy forward (reference precomputed), loss, backward, AdamW; with
        gradient batching, over what :meth:`prepare_gradients` accumulated as the pairs arrived."""
        if self.gradient_batching:
            return self._accumulated_step(pairs)
        started = time.perf_counter()
        batch = self.tokenize(pairs)
        tree = prompt_tree(batch) if self.config.prompt_tree else None
        reference = self._take_reference(pairs)
        self.policy.train()
        out = self.loss(batch, reference, tree)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.policy.eval()
        self.steps += 1
        took = time.perf_counter() - started
        return StepStats(
            loss=float(out.loss.detach()),
            margin=float(out.margin.mean()),
            chosen_reward=float(out.chosen_rewards.mean()),
            rejected_reward=float(out.rejected_rewards.mean()),
            accuracy=float((out.margin > 0).float().mean()),
            seconds=took,
            tokens=int(batch["attention_mask"].sum()),
            grad_norm=float(grad_norm),
            computed_tokens=tree.tokens if tree is not None else int(batch["attention_mask"].sum()),
            nll=float(out.nll.detach()),
            final_seconds=took,
        )

    # -- resuming -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a restart needs besides the weights: AdamW's moments and step counts, and ours."""
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])

    @property
    def kind(self) -> str:
        """The policy store's kind of what :meth:`save` writes: ``full`` or ``lora``."""
        return "lora" if _is_peft(self.policy) else "full"

    def save(self, out_dir: Path, optimizer: bool = True) -> None:
        """What a version stores, plus AdamW's state in ``optimizer.safetensors`` unless ``optimizer`` is off.

        Full fine-tuning: a standard HF directory (config, safetensors, tokenizer) that stock transformers
        loads. LoRA: the adapter alone (peft's ``adapter_config.json`` + ``adapter_model.safetensors``),
        megabytes instead of the whole model; it means something only over the lineage's start, which is
        why the learner publishes it with ``tags['base_version']`` (``qrloop.models.load_stored_policy``).
        """
        self.policy.save_pretrained(out_dir, safe_serialization=True)
        if not _is_peft(self.policy):
            self.tokenizer.save_pretrained(out_dir)
        if optimizer:
            save_optimizer_state(self.optimizer, Path(out_dir) / OPTIMIZER_FILE)

    def save_merged(self, out_dir: Path) -> None:
        """A standard HF directory of the policy as it serves (a LoRA adapter merged into a copy)."""
        model = copy.deepcopy(self.policy).merge_and_unload() if _is_peft(self.policy) else self.policy
        model.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)

    def resume_optimizer(self, model_dir: Path) -> bool:
        """Load AdamW's state stored beside ``model_dir``'s weights, if any; the hyperparameters (learning
        rate, …) stay the current settings'. False when there is none or it does not fit these parameters."""
        path = Path(model_dir) / OPTIMIZER_FILE
        if not path.is_file():
            return False
        try:
            load_optimizer_state(self.optimizer, path)
        except (ValueError, KeyError) as exc:
            logging.getLogger("qrloop.learner").warning("optimizer state in %s not used: %s", path, exc)
            return False
        return True


# -- optimizer state as safetensors (never pickle: torch.save of a state dict is a pickle) ----------------

OPTIMIZER_FILE = "optimizer.safetensors"


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Per-parameter tensors (AdamW: step, exp_avg, exp_avg_sq) as ``state.<index>.<name>``."""
    from safetensors.torch import save_file

    tensors = {
        f"state.{index}.{name}": value.detach().contiguous()
        for index, state in optimizer.state_dict()["state"].items()
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    save_file(tensors, str(path), metadata={"format": "qrloop-optimizer-1"})


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Put the stored per-parameter state into ``optimizer``, keeping its current parameter groups."""
    from safetensors.torch import load_file

    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        _, position, name = key.split(".", 2)
        state.setdefault(int(position), {})[name] = value
    current = optimizer.state_dict()
    count = sum(len(group["params"]) for group in current["param_groups"])
    params: list[torch.Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
    if state and max(state) >= count:
        raise ValueError(f"state for {max(state) + 1} parameters, the optimizer has {count}")
    for number, entry in state.items():
        moment = entry.get("exp_avg")
        if moment is not None and moment.shape != params[number].shape:
            raise ValueError(
                f"parameter {number}: stored {tuple(moment.shape)}, model {tuple(params[number].shape)}"
            )
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
