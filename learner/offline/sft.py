"""Supervised fine-tuning on Q2Q pairs (the paper's "P" models): TRL's ``SFTTrainer`` on CPU, in minutes.

Each pair becomes a *prompt-completion* example: the prompt is exactly what the rewriter samples from
(``qrloop.prompting.build_prompt``, the model's chat template with the rewrite instruction) and the completion
is the target query followed by the token that ends the assistant's turn. ``completion_only_loss=True``: the
prompt is context, not something to learn, and counting its ~35 tokens would drown the ~5 that matter.

The turn-ending token is read from the model's *generation config* (what ``generate`` stops on), not from
``tokenizer.eos_token``: the SmolLM2 tokenizer converted from GGUF names ``<|im_start|>`` as its EOS while the
model stops on ``<|im_end|>``. Passing that token as ``SFTConfig.eos_token`` also makes TRL write it into the
saved tokenizer and configs, so the fine-tuned directory is self-consistent for serving.

Training settings that matter on this CPU-only project: fp32 (no bf16 on CPU), no gradient checkpointing
(TRL defaults it on; it only trades compute for memory we have), ``use_cpu``, ``report_to="none"``, no
checkpoints (``save_strategy="no"``: the result is saved once, at the end, into ``out_dir``).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset
from transformers import AutoTokenizer, PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging
from trl import SFTConfig, SFTTrainer

from learner.dpo import common_prefix_length, completion_logprobs, pad_right
from learner.offline.q2q import QueryPair
from qrloop.models import load_causal_lm
from qrloop.prompting import build_prompt, end_of_turn

# progress(step, total_steps, last_loss)
Progress = Callable[[int, int, float], None]


def prompt_completion_rows(pairs: Sequence[QueryPair], tokenizer: Any, eos: str) -> list[dict[str, str]]:
    """TRL's standard (not conversational) prompt-completion format: the prompt is already templated."""
    return [
        {"prompt": build_prompt(tokenizer, p.source), "completion": p.target.strip() + eos} for p in pairs
    ]


def sample_pairs(pairs: Sequence[QueryPair], limit: int | None, seed: int) -> list[QueryPair]:
    """At most ``limit`` pairs, a seeded random subset (pairs are stored sorted, so the head is biased)."""
    chosen = list(pairs)
    if limit is not None and len(chosen) > limit:
        chosen = random.Random(seed).sample(chosen, limit)
    return chosen


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence the progress bars of datasets ("Tokenizing...") and transformers ("Writing model shards")
    while inside: the CLI draws its own rich bars and these would interleave with them."""
    datasets_was_on = not datasets.are_progress_bars_disabled()
    hf_was_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_was_on:
            datasets.enable_progress_bars()
        if hf_was_on:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------ tensors shared with distil/eval


def encode(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], int]:
    """(token ids of prompt+completion, number of prompt tokens), tokenized jointly like TRL does: the
    completion starts where the prompt's own tokenization stops agreeing with the joint one."""
    full = tokenizer(prompt + completion)["input_ids"]
    return full, common_prefix_length(tokenizer(prompt)["input_ids"], full)


def collate(tokenizer: Any, rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """A training/scoring batch from prompt-completion rows (see :func:`learner.dpo.pad_right`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pad_right([encode(tokenizer, r["prompt"], r["completion"]) for r in rows], pad)


def target_mask(batch: dict[str, Any]) -> Any:
    """Which positions of ``logits[:, :-1]`` predict a completion token (the causal shift by one)."""
    return batch["completion_mask"][:, 1:].bool()


def completion_nll(model: Any, batch: dict[str, Any]) -> tuple[float, int]:
    """(sum of token negative log-likelihoods over completion tokens, number of such tokens)."""
    with torch.no_grad():
        return float(-completion_logprobs(model, batch).sum()), int(target_mask(batch).sum())


def completion_loss(
    model: Any, tokenizer: Any, pairs: Sequence[QueryPair], eos: str, batch_size: int = 16
) -> float:
    """Mean per-token cross-entropy of the targets given the prompts (the paper's XEntropy)."""
    rows = prompt_completion_rows(pairs, tokenizer, eos)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        nll, n = completion_nll(model, collate(tokenizer, rows[start : start + batch_size]))
        total, count = total + nll, count + n
    return total / max(count, 1)


# --------------------------------------------------------------------------------------------- training


@dataclass
class SFTResult:
    out_dir: Path
    steps: int
    examples: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # training loss per logged step


def sft_config(
    work_dir: Path, *, max_steps: int, batch_size: int, learning_rate: float, eos: str, seed: int
) -> Any:
    return SFTConfig(
        output_dir=str(work_dir),  # nothing is written there (no checkpoints, no reports)
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=0,
        completion_only_loss=True,  # loss on the target query + end of turn only
        max_length=128,  # prompt ~35 tokens + a query; nothing legitimate comes close
        eos_token=eos,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,  # the caller shows a rich progress bar through ``progress``
        dataloader_pin_memory=False,
        seed=seed,
        data_seed=seed,
    )


def _progress_callback(progress: Progress | None, losses: list[float], max_steps: int) -> Any:
    class _Report(TrainerCallback):  # type: ignore[misc,unused-ignore]
        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
        ) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
                if progress:
                    progress(state.global_step, max_steps, losses[-1])

    return _Report()


def train_sft(
    model_dir: Path,
    pairs: Sequence[QueryPair],
    out_dir: Path,
    *,
    max_steps: int = 100,
    max_examples: int | None = None,
    batch_size: int = 8,
    learning_rate: float = 5e-5,
    seed: int = 0,
    progress: Progress | None = None,
) -> SFTResult:
    """Fine-tune the causal LM in ``model_dir`` on ``pairs``; save model and tokenizer in ``out_dir``."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_causal_lm(model_dir)
    eos = end_of_turn(tokenizer, model.generation_config)
    chosen = sample_pairs(pairs, max_examples, seed)
    args = sft_config(
        Path(tempfile.mkdtemp(prefix="qrloop-sft-")),
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        eos=eos,
        seed=seed,
    )
    losses: list[float] = []
    try:
        with quiet_libraries():
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=Dataset.from_list(prompt_completion_rows(chosen, tokenizer, eos)),
                processing_class=tokenizer,
                callbacks=[_progress_callback(progress, losses, max_steps)],
            )
            trainer.remove_callback(PrinterCallback)  # it prints every log dict; ``progress`` reports instead
            trainer.train()
            model.eval()
            out_dir.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out_dir, safe_serialization=True)
            tokenizer.save_pretrained(out_dir)
    finally:
        shutil.rmtree(args.output_dir, ignore_errors=True)
    return SFTResult(out_dir, trainer.state.global_step, len(chosen), time.perf_counter() - started, losses)
