"""One mini-batch DPO step as plain functions (TRL's loss, nanoGPT's readability).

The paper's eq. 2 writes the loss with the policy's log-ratio of chosen to rejected alone. Standard DPO
(Rafailov et al.), which the paper cites and TRL implements, measures that log-ratio *relative to a frozen
reference policy*:

    L = −mean log σ( β [ (log π(y⁺|x) − log π_ref(y⁺|x)) − (log π(y⁻|x) − log π_ref(y⁻|x)) ] )

Eq. 2 is the special case of a uniform reference; keeping the reference (the version the run started from)
is what stops an online learner from drifting arbitrarily far on a few hundred noisy pairs.

Tokenisation matches TRL's ``DPOTrainer`` for a plain-text dataset exactly, so the loss equals TRL's on the
same batch (``tests/test_dpo.py`` checks to 1e-4): the completion is the text plus the EOS token, prompt and
prompt+completion are tokenised as one string each, and the completion starts where the two diverge.
TRL 1.16 has no public one-step API and its ``training_step`` carries Trainer machinery (accelerate, logging,
fused heads) that cost 60% more per step on CPU in our measurement, so the loop here is our own.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qrloop.prompting import build_prompt
from qrloop.settings import DPOSettings

Pair = tuple[str, str, str]  # (query, chosen rewrite, rejected rewrite)


@dataclass
class DPOConfig:
    beta: float = field(default=0.1, metadata={"help": "DPO temperature β."})
    learning_rate: float = field(default=5e-6, metadata={"help": "AdamW learning rate."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    max_completion_tokens: int = field(default=24, metadata={"help": "Rewrites longer than this are cut."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})

    @classmethod
    def from_settings(cls, dpo: DPOSettings) -> DPOConfig:
        return cls(beta=dpo.beta, learning_rate=dpo.learning_rate, max_grad_norm=dpo.max_grad_norm)


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize_pairs(
    tokenizer: Any, pairs: Sequence[Pair], max_completion_tokens: int = 24
) -> dict[str, torch.Tensor]:
    """A right-padded batch of 2B sequences: every chosen, then every rejected (TRL's layout)."""
    eos = tokenizer.eos_token
    sequences: list[list[int]] = []
    masks: list[list[int]] = []
    chosen_rows, rejected_rows = [], []
    for query, chosen, rejected in pairs:
        prompt = build_prompt(tokenizer, query)
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = {
            name: tokenizer(prompt + text + eos)["input_ids"]
            for name, text in (("c", chosen), ("r", rejected))
        }
        prompt_len = min(
            common_prefix_length(prompt_ids, full["c"]), common_prefix_length(prompt_ids, full["r"])
        )
        for name, rows in (("c", chosen_rows), ("r", rejected_rows)):
            completion = full[name][prompt_len:][:max_completion_tokens]
            rows.append((full[name][:prompt_len] + completion, [0] * prompt_len + [1] * len(completion)))
    for ids, mask in chosen_rows + rejected_rows:
        sequences.append(ids)
        masks.append(mask)
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(sequences, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        completion[i, : len(mask)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def sequence_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each completion; one forward over chosen and rejected together."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logits = logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].to(logits.dtype)
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    logps = (token_logps * mask).sum(dim=1)
    chosen, rejected = logps.chunk(2, dim=0)
    return chosen, rejected


@dataclass(frozen=True)
class LossOutput:
    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    @property
    def margin(self) -> float:
        return float((self.chosen_rewards - self.rejected_rewards).mean())


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> LossOutput:
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return LossOutput(loss, chosen_rewards.detach(), rejected_rewards.detach())


@dataclass(frozen=True)
class StepStats:
    loss: float
    margin: float
    chosen_reward: float
    rejected_reward: float
    accuracy: float
    seconds: float
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


class DPOLearnerCore:
    """Policy + frozen reference + a persistent AdamW: ``step(pairs)`` is one DPO update."""

    def __init__(
        self, policy: Any, reference: Any, tokenizer: Any, config: DPOConfig, base_model: str = ""
    ) -> None:
        self.policy = policy
        self.reference = reference
        self.tokenizer = tokenizer
        self.config = config
        self.base_model = base_model
        for param in self.reference.parameters():
            param.requires_grad_(False)
        self.reference.eval()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )

    @classmethod
    def from_model(
        cls, policy: Any, tokenizer: Any, config: DPOConfig, base_model: str = ""
    ) -> DPOLearnerCore:
        """Reference = a frozen copy of the starting policy."""
        return cls(policy, copy.deepcopy(policy), tokenizer, config, base_model)

    @classmethod
    def from_versions(
        cls, settings: Any, store: Any, *, policy_version: int, reference_version: int
    ) -> DPOLearnerCore:
        from qrloop.models import load_policy

        policy, tokenizer = load_policy(store.load_dir(policy_version))
        if reference_version == policy_version:
            reference = copy.deepcopy(policy)
        else:
            reference, _ = load_policy(store.load_dir(reference_version))
        tokenizer.padding_side = "right"
        base_model = store.get(policy_version).base_model
        return cls(policy, reference, tokenizer, DPOConfig.from_settings(settings.dpo), base_model)

    def loss_on(self, pairs: Sequence[Pair]) -> tuple[LossOutput, dict[str, torch.Tensor]]:
        batch = tokenize_pairs(self.tokenizer, pairs, self.config.max_completion_tokens)
        policy_chosen, policy_rejected = sequence_logprobs(self.policy, batch)
        with torch.no_grad():
            ref_chosen, ref_rejected = sequence_logprobs(self.reference, batch)
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.config.beta), batch

    def step(self, pairs: Sequence[Pair]) -> StepStats:
        started = time.perf_counter()
        self.policy.train()
        out, batch = self.loss_on(pairs)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.policy.eval()
        return StepStats(
            loss=float(out.loss.detach()),
            margin=out.margin,
            chosen_reward=float(out.chosen_rewards.mean()),
            rejected_reward=float(out.rejected_rewards.mean()),
            accuracy=float((out.chosen_rewards > out.rejected_rewards).float().mean()),
            seconds=time.perf_counter() - started,
            tokens=int(batch["attention_mask"].sum()),
        )

    def save(self, out_dir: Path) -> None:
        """A standard HF directory (config, safetensors, tokenizer) that stock transformers loads."""
        self.policy.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)
