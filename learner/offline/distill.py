"""The student S and its distillation from the teacher T with reverse KL (the paper's eq. 1, after MiniLLM).

**Student.** :func:`make_student` keeps every other decoder layer of T (DistilBERT's initialisation): same
tokenizer, embeddings, norms and head, half the depth. Starting from T's own layers, S begins close to T
instead of from noise, which is what makes a few hundred CPU steps enough. :func:`choose_block` picks the
other cut, one contiguous block dropped, by measuring each candidate; on SmolLM2-135M it starts far closer to
the teacher (8.0 nats against 15.1 for every other layer) and is what ``qrloop offline student`` uses.

**Loss.** :func:`reverse_kl` is the token-level D_KL(P_S ‖ P_T) = Σ_x P_S(x) (log P_S(x) − log P_T(x)),
averaged over the completion tokens. Reverse KL is mode-seeking: S is penalised for putting mass where T has
none, so a small S concentrates on T's main rewrites instead of smearing over everything T finds plausible.

**Data.** T's and S's next-token distributions are compared on the Q2Q training sequences (prompt + target),
and, with probability ``on_policy_fraction`` per step, on completions S samples itself (GKD's λ; MiniLLM's
point that S should be corrected on its own mistakes). T and S are any two causal LMs of one tokenizer given
by path, so the same code distils Llama 3.1 8B → 3.2 1B on a GPU.

**TRL's GKDTrainer, beta=1.0 — measured, and it matches.** ``GKDTrainer.generalized_jsd_loss`` with
``beta == 1`` computes ``F.kl_div(teacher_log_probs, student_log_probs, log_target=True)``, i.e. Σ_x P_S(x)
(log P_S(x) − log P_T(x)) = D_KL(P_S ‖ P_T) per token: beta=1 is *reverse* KL (beta=0 is forward KL
D_KL(P_T ‖ P_S)). With ``reduction="batchmean"`` and labels it sums over the vocabulary and divides by the
number of unmasked tokens, and ``compute_loss`` applies the same one-position shift (``logits[:, :-1]``
against ``labels[:, 1:]``), so on the same batch its loss equals :func:`reverse_kl` over the completion
tokens. :func:`compare_with_gkd` instantiates the real ``GKDTrainer`` (``lmbda=0``, ``beta=1``) and calls its
``compute_loss`` on one of our batches; the absolute difference is at float32 rounding level (≤ 1e-6, see
``tests/test_offline.py`` and the benchmark's output). We keep our own loop anyway: it is twenty lines a
reader can hold in their head, takes the same batches as evaluation, and needs no chat-format collator.
"""

from __future__ import annotations

import random
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from datasets import Dataset
from transformers import AutoTokenizer

from learner.dpo import pad_right
from learner.offline.evaluate import load_for_inference, sampled_rewrites
from learner.offline.q2q import QueryPair
from learner.offline.sft import (
    collate,
    completion_nll,
    prompt_completion_rows,
    quiet_libraries,
    target_mask,
)
from qrloop.models import load_causal_lm
from qrloop.prompting import build_prompt, end_of_turn

Progress = Callable[[int, int, float], None]


# ---------------------------------------------------------------------------------------------- student


def kept_layers(n_layers: int, keep: str | Sequence[int] = "every_other") -> list[int]:
    """Indices of the teacher's decoder layers the student keeps: ``"every_other"`` = 0, 2, 4, … (as
    DistilBERT), or an explicit list."""
    if keep == "every_other":
        return list(range(0, n_layers, 2))
    if isinstance(keep, str):
        raise ValueError(f"unknown keep rule {keep!r}; use 'every_other' or a list of layer indices")
    chosen = sorted(set(int(i) for i in keep))
    if not chosen or chosen[0] < 0 or chosen[-1] >= n_layers:
        raise ValueError(f"layer indices {list(keep)} out of range for {n_layers} layers")
    return chosen


def decoder_layers(model: Any) -> tuple[Any, str]:
    """(parent module, attribute name) of the decoder's layer list: the one ``ModuleList`` whose length is
    ``num_hidden_layers`` (``model.layers`` in Llama, ``transformer.h`` in GPT-2), found without naming the
    architecture."""
    n = model.config.get_text_config().num_hidden_layers
    for _name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return module, attr
    raise ValueError(f"no ModuleList of {n} decoder layers in {type(model).__name__}")


def keep_only(model: Any, chosen: Sequence[int]) -> None:
    """Cut ``model`` down, in place, to the decoder layers at ``chosen`` (their exact weights), renumbered
    and with the config's depth (and per-layer attention kinds, where it has them) to match."""
    parent, attr = decoder_layers(model)
    layers = getattr(parent, attr)
    config = model.config.get_text_config()
    kinds = getattr(config, "layer_types", None)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in chosen]))
    for new_index, layer in enumerate(getattr(parent, attr)):
        # Attention modules index the KV cache by their layer number; renumber so generation works.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config.num_hidden_layers = len(chosen)
    if isinstance(kinds, list):  # per-layer attention kinds (sliding/full)
        config.layer_types = [kinds[i] for i in chosen]


def make_student(teacher_dir: Path, out_dir: Path, keep: str | Sequence[int] = "every_other") -> Path:
    """Save a student of ``teacher_dir`` in ``out_dir``: the kept decoder layers with their exact weights,
    everything else (embeddings, final norm, head, tokenizer) copied, config identical but for the depth."""
    model = load_causal_lm(teacher_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    parent, attr = decoder_layers(model)
    keep_only(model, kept_layers(len(getattr(parent, attr)), keep))
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_libraries():
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    return out_dir


@dataclass(frozen=True)
class BlockChoice:
    """Which contiguous block of the teacher's layers the student drops, and what each choice cost."""

    kept: list[int]
    nll_by_first_dropped: dict[int, float]  # first dropped layer → the cut's completion cross-entropy
    teacher_nll: float


def contiguous_cuts(n_layers: int, depth: int) -> dict[int, list[int]]:
    """Every student of ``depth`` layers that drops one contiguous block of the teacher's: first dropped
    layer → the kept indices. The first and last layer are always kept (they read the embeddings and write
    what the head reads)."""
    if not 2 <= depth < n_layers:
        raise ValueError(f"a student needs 2 to {n_layers - 1} layers, not {depth}")
    dropped = n_layers - depth
    return {
        first: [i for i in range(n_layers) if not first <= i < first + dropped]
        for first in range(1, n_layers - dropped)
    }


def choose_block(teacher_dir: Path, pairs: Sequence[QueryPair], depth: int) -> BlockChoice:
    """The student of ``depth`` layers, among those that drop one contiguous block of the teacher's, whose
    cut (before any training) predicts ``pairs``' completions best: the lowest cross-entropy per token.

    Why a block, and why measured: every other layer (DistilBERT's rule) breaks every residual step of a
    small model at once: SmolLM2-135M's SFT teacher scores 3.76 nats on Home Depot's evaluation pairs, its
    every-other-layer cut 15.1, its best 15-layer block cut 8.0 (dropping layers 7–21), which SFT then heals
    in far fewer steps. Which block is cheapest differs by model and data, so it is measured (a forward pass
    per candidate), after "The Unreasonable Ineffectiveness of the Deeper Layers" (Gromov et al., 2024).
    """
    model, tokenizer = _load(teacher_dir)
    model.eval()
    eos = end_of_turn(tokenizer, model.generation_config)
    batch = collate(tokenizer, prompt_completion_rows(pairs, tokenizer, eos))
    parent, attr = decoder_layers(model)
    full = list(getattr(parent, attr))
    kinds = getattr(model.config.get_text_config(), "layer_types", None)

    def nll_of(chosen: Sequence[int]) -> float:
        setattr(parent, attr, nn.ModuleList(full))  # back to the teacher before each cut
        model.config.get_text_config().num_hidden_layers = len(full)
        if isinstance(kinds, list):
            model.config.get_text_config().layer_types = list(kinds)
        keep_only(model, chosen)
        total, count = completion_nll(model, batch)
        return total / max(count, 1)

    teacher_nll = nll_of(range(len(full)))
    cuts = contiguous_cuts(len(full), depth)
    costs = {first: nll_of(kept) for first, kept in cuts.items()}
    best = min(costs, key=lambda first: (costs[first], first))
    return BlockChoice(cuts[best], costs, teacher_nll)


# ------------------------------------------------------------------------------------------------- loss


def reverse_kl(student_logits: Any, teacher_logits: Any, mask: Any) -> Any:
    """Token-level D_KL(P_S ‖ P_T), averaged over the positions where ``mask`` is true.

    ``*_logits``: [..., vocab] (same shape); ``mask``: the leading dimensions. Gradients flow into the student
    only through its own probabilities; the teacher's logits should come from ``torch.no_grad()``.
    """
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    per_token = (log_s.exp() * (log_s - log_t)).sum(-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def forward_kl(student_logits: Any, teacher_logits: Any, mask: Any) -> Any:
    """D_KL(P_T ‖ P_S), the usual distillation loss (mode-covering); here only to contrast with eq. 1."""
    return reverse_kl(teacher_logits, student_logits, mask)


# ----------------------------------------------------------------------------------------- distillation


@dataclass
class DistillResult:
    out_dir: Path
    steps: int
    on_policy_steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # reverse KL per step


def distill_step(
    student: Any, teacher: Any, batch: dict[str, Any], optimizer: Any, max_grad_norm: float = 1.0
) -> float:
    """One optimiser step of reverse KL on ``batch`` (from :func:`learner.dpo.pad_right`)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[:, :-1]
    student_logits = student(**inputs).logits[:, :-1]
    loss = reverse_kl(student_logits, teacher_logits, target_mask(batch))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def student_batch(
    student: Any, tokenizer: Any, pairs: Sequence[QueryPair], eos_id: int, max_new_tokens: int
) -> dict[str, Any]:
    """A batch whose completions the student samples itself (on-policy), up to and including its first end
    of turn; rebuilt right-padded so positions match the dataset batches."""
    prompts = [tokenizer(build_prompt(tokenizer, p.source))["input_ids"] for p in pairs]
    sequences = []
    with torch.no_grad():
        for ids in prompts:  # one by one: no left padding, so no position shift to correct
            out = student.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=eos_id,
            )[0, len(ids) :].tolist()
            if eos_id in out:
                out = out[: out.index(eos_id) + 1]
            sequences.append((ids + out, len(ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    return pad_right(sequences, pad)


def teacher_pairs(
    teacher_dir: Path,
    queries: Sequence[str],
    *,
    n: int = 2,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
) -> list[QueryPair]:
    """Sequence-level distillation's data (Kim & Rush, 2016): the teacher's own sampled rewrites of
    ``queries``, ``n`` each, sampled as the rewriter serves, as (query → rewrite) pairs (origin "teacher";
    empty rewrites dropped). SFT on them teaches the student what the teacher *serves*, which is what the
    online reward measures; token-level reverse KL on the Q2Q pairs matches the teacher only on sequences it
    would seldom write."""
    model, tokenizer = load_for_inference(teacher_dir)
    torch.manual_seed(seed)
    texts = sampled_rewrites(model, tokenizer, queries, n=n, temperature=temperature, top_p=top_p)
    sources = [query for query in queries for _ in range(n)]
    return [QueryPair(q, t, "teacher", 0, "train") for q, t in zip(sources, texts, strict=True) if t]


def _load(path: Path) -> tuple[Any, Any]:
    return (
        load_causal_lm(path),
        AutoTokenizer.from_pretrained(str(path)),
    )


def check_same_vocabulary(teacher: Any, student: Any) -> None:
    t_vocab = teacher.config.get_text_config().vocab_size
    s_vocab = student.config.get_text_config().vocab_size
    if t_vocab != s_vocab:
        raise ValueError(
            f"teacher vocab {t_vocab} != student vocab {s_vocab}: token-level KL needs one tokenizer"
        )


def distill(
    teacher_dir: Path,
    student_dir: Path,
    pairs: Sequence[QueryPair],
    out_dir: Path,
    *,
    steps: int = 100,
    batch_size: int = 8,
    learning_rate: float = 5e-5,
    on_policy_fraction: float = 0.0,
    max_new_tokens: int = 16,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    progress: Progress | None = None,
) -> DistillResult:
    """Distil ``teacher_dir`` into ``student_dir`` with reverse KL; save the student in ``out_dir``.

    Top to bottom: load both → each step draw a batch of training pairs (or, with probability
    ``on_policy_fraction``, let the student complete them) → teacher forward without gradients → student
    forward → reverse KL on the completion tokens → AdamW step → save.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    teacher, _ = _load(teacher_dir)
    student, tokenizer = _load(student_dir)
    check_same_vocabulary(teacher, student)
    teacher.eval()
    student.train()
    eos = end_of_turn(tokenizer, student.generation_config)
    eos_id = int(tokenizer.convert_tokens_to_ids(eos))
    optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate)
    result = DistillResult(out_dir, 0, 0, 0.0)
    for step in range(1, steps + 1):
        chosen = rng.sample(list(pairs), min(batch_size, len(pairs)))
        if on_policy_fraction > 0 and rng.random() < on_policy_fraction:
            student.eval()
            batch = student_batch(student, tokenizer, chosen, eos_id, max_new_tokens)
            student.train()
            result.on_policy_steps += 1
        else:
            batch = collate(tokenizer, prompt_completion_rows(chosen, tokenizer, eos))
        result.losses.append(distill_step(student, teacher, batch, optimizer, max_grad_norm))
        result.steps = step
        if progress:
            progress(step, steps, result.losses[-1])
    student.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_libraries():
        student.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    result.seconds = time.perf_counter() - started
    return result


def mean_reverse_kl(teacher: Any, student: Any, batch: dict[str, Any]) -> float:
    """Reverse KL of ``student`` against ``teacher`` on ``batch`` without training (for reports and tests)."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        return float(
            reverse_kl(student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1], target_mask(batch))
        )


# --------------------------------------------------------------------------------------- TRL comparison


def compare_with_gkd(teacher_dir: Path, student_dir: Path, pairs: Sequence[QueryPair]) -> dict[str, float]:
    """Our reverse KL and TRL's ``GKDTrainer`` (beta=1, lmbda=0: off-policy, so ``compute_loss`` sees exactly
    our batch) on the same batch of ``pairs``: ``{"ours", "gkd_trainer", "abs_diff"}``."""
    with warnings.catch_warnings():  # "trl.experimental is unstable": known, and this is a measurement
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

    teacher, _ = _load(teacher_dir)
    student, tokenizer = _load(student_dir)
    teacher.eval()
    student.eval()
    eos = end_of_turn(tokenizer, student.generation_config)
    if tokenizer.pad_token is None:  # GKD's default collator insists on one (it is never used here)
        tokenizer.pad_token = eos
    rows = prompt_completion_rows(pairs, tokenizer, eos)
    batch = collate(tokenizer, rows)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # GKD's label convention
    with tempfile.TemporaryDirectory(prefix="qrloop-gkd-") as work, quiet_libraries():
        args = GKDConfig(
            output_dir=work,
            beta=1.0,
            lmbda=0.0,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            report_to="none",
            max_length=128,
        )
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            processing_class=tokenizer,
            # Never iterated: compute_loss is called directly on our batch; the trainer only insists on one.
            train_dataset=Dataset.from_list([{"messages": [{"role": "user", "content": "x"}]}]),
        )
        with torch.no_grad():
            theirs = float(
                trainer.compute_loss(
                    trainer.model,
                    {
                        "input_ids": batch["input_ids"],
                        "attention_mask": batch["attention_mask"],
                        "labels": labels,
                    },
                )
            )
    ours = mean_reverse_kl(teacher, student, batch)
    return {"ours": ours, "gkd_trainer": theirs, "abs_diff": abs(ours - theirs)}


def token_ids_match(dir_a: Path, dir_b: Path, texts: Sequence[str]) -> bool:
    """Whether two model directories tokenize ``texts`` identically (teacher and student must)."""
    a, b = AutoTokenizer.from_pretrained(str(dir_a)), AutoTokenizer.from_pretrained(str(dir_b))
    return all(a(t)["input_ids"] == b(t)["input_ids"] for t in texts)
