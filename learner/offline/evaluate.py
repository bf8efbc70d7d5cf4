"""The paper's Table 2 on our Q2Q evaluation pairs, and the serving time that justifies the student.

Per model: **ExactMatch** (% of greedy rewrites equal to the reference after normalisation), **ROUGE-L**
(% F-measure of the longest common subsequence, ``rouge-score``), **XEntropy** (mean per-token cross-entropy,
nats, of reference + end-of-turn given the prompt: teacher-forced, no generation) and **Mean Length** (tokens
of the greedy rewrite before its end of turn, capped by ``max_new_tokens``). Rows follow the paper: S and T,
each Vanilla (V) and fine-tuned (P), and T → S where V is the SFT student and P the distilled one.

Serving time: what the rewriter does per query, ``generate(num_return_sequences=2)`` with sampling, timed for
T and S *interleaved* query by query (the box is shared; interleaving exposes both to the same load), median
per query. Mean generated tokens are reported beside it: a model that stops earlier is faster for that reason
too.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rouge_score import rouge_scorer
from transformers import AutoTokenizer

from learner.offline.q2q import QueryPair
from learner.offline.sft import completion_loss
from qrloop.data import normalise_query
from qrloop.models import load_causal_lm
from qrloop.prompting import build_prompt, end_of_turn

# Table 2's rows (model, variant): V = vanilla, P = fine-tuned; for T→S, V = the SFT student, P = distilled.
ROWS: tuple[tuple[str, str], ...] = (
    ("S", "V"),
    ("S", "P"),
    ("T", "V"),
    ("T", "P"),
    ("T→S", "V"),
    ("T→S", "P"),
)


@dataclass(frozen=True)
class OfflineMetrics:
    exact_match: float  # %
    rouge_l: float  # % (F-measure)
    xentropy: float  # nats per reference token
    mean_length: float  # tokens per greedy rewrite
    n: int  # evaluation pairs

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def load_for_inference(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode, left padding for batched generation, a pad token set."""
    model = load_causal_lm(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = end_of_turn(tokenizer, model.generation_config)
    return model, tokenizer


def _stop_ids(model: Any) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])] if eos is not None else []


def _cut(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """Tokens before the first end of turn (or all of them)."""
    out = []
    for token in ids:
        if token in stops:
            break
        out.append(int(token))
    return out


def generate_rewrites(
    model: Any, tokenizer: Any, queries: Sequence[str], *, max_new_tokens: int = 16, batch_size: int = 16
) -> tuple[list[str], list[int]]:
    """Greedy rewrites of ``queries`` and their lengths in tokens."""
    return _generate(model, tokenizer, queries, {"do_sample": False}, max_new_tokens, batch_size)


def sampled_rewrites(
    model: Any,
    tokenizer: Any,
    queries: Sequence[str],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[str]:
    """``n`` sampled rewrites of each query, query by query (``n`` per query, in order); seed torch first."""
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "num_return_sequences": n}
    return _generate(model, tokenizer, queries, sampling, max_new_tokens, batch_size)[0]


def _generate(
    model: Any,
    tokenizer: Any,
    queries: Sequence[str],
    options: dict[str, Any],
    max_new_tokens: int,
    batch_size: int,
) -> tuple[list[str], list[int]]:
    """Batched, left-padded ``generate`` over ``queries``' prompts: the decoded texts up to the first end of
    turn, and their lengths in tokens."""
    stops = _stop_ids(model)
    texts, lengths = [], []
    for start in range(0, len(queries), batch_size):
        prompts = [build_prompt(tokenizer, q) for q in queries[start : start + batch_size]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **inputs, **options, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
            )
        for row in out[:, inputs["input_ids"].shape[1] :].tolist():
            ids = _cut(row, stops)
            lengths.append(len(ids))
            texts.append(
                tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
            )
    return texts, lengths


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    hits = sum(normalise_query(p) == normalise_query(r) for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / max(len(references), 1)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return 100.0 * sum(scores) / max(len(scores), 1)


def evaluate_model(
    model_dir: Path, pairs: Sequence[QueryPair], *, max_new_tokens: int = 16, batch_size: int = 16
) -> OfflineMetrics:
    """Table 2's four numbers for the model in ``model_dir`` on ``pairs``."""
    model, tokenizer = load_for_inference(model_dir)
    predictions, lengths = generate_rewrites(
        model, tokenizer, [p.source for p in pairs], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    references = [p.target for p in pairs]
    tokenizer.padding_side = "right"  # teacher forcing: real tokens at their natural positions
    xent = completion_loss(
        model, tokenizer, pairs, end_of_turn(tokenizer, model.generation_config), batch_size=batch_size
    )
    return OfflineMetrics(
        exact_match=exact_match(predictions, references),
        rouge_l=rouge_l(predictions, references),
        xentropy=xent,
        mean_length=sum(lengths) / max(len(lengths), 1),
        n=len(pairs),
    )


# ------------------------------------------------------------------------------------------ serving time


@dataclass(frozen=True)
class ServingTime:
    median_s: float  # per query, two sampled rewrites
    mean_new_tokens: float  # per returned sequence
    queries: int


def serving_times(
    model_dirs: dict[str, Path],
    queries: Sequence[str],
    *,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
) -> dict[str, ServingTime]:
    """Median wall time per query of ``generate(num_return_sequences=2)`` for each model, interleaved."""
    loaded = {name: load_for_inference(path) for name, path in model_dirs.items()}
    times: dict[str, list[float]] = {name: [] for name in loaded}
    tokens: dict[str, list[int]] = {name: [] for name in loaded}
    torch.manual_seed(seed)
    for query in queries:
        for name, (model, tokenizer) in loaded.items():
            inputs = tokenizer([build_prompt(tokenizer, query)], return_tensors="pt")
            started = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **inputs,
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    num_return_sequences=2,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
            times[name].append(time.perf_counter() - started)
            stops = _stop_ids(model)
            tokens[name].extend(len(_cut(r, stops)) for r in out[:, inputs["input_ids"].shape[1] :].tolist())
    return {
        name: ServingTime(statistics.median(times[name]), sum(tokens[name]) / len(tokens[name]), len(queries))
        for name in loaded
    }


# ------------------------------------------------------------------------------------------------ table


Row = tuple[float, float, float, float]  # ExactMatch %, ROUGE-L %, XEntropy, Mean Length


def format_table2(
    measured: dict[tuple[str, str], OfflineMetrics],
    references: Mapping[str, Mapping[tuple[str, str], Row]] | None = None,
) -> str:
    """Measured rows, and beside them each named reference table (e.g. the paper's GPT-2 rows), as text."""
    references = references or {}
    names = ("qrloop: Home Depot, SmolLM2", *references)
    title = f"{'':<9}" + "".join(f"{name:^33} | " for name in names)
    header = f"{'model':<9}" + "".join(f"{'EM':>7}{'ROUGE-L':>9}{'XEnt':>8}{'Len':>7} | " for _ in names)
    lines = [title, header]
    for model, variant in ROWS:
        m = measured.get((model, variant))
        ours: Row | None = (m.exact_match, m.rouge_l, m.xentropy, m.mean_length) if m else None
        cells = [ours, *(table.get((model, variant)) for table in references.values())]
        text = "".join(
            f"{c[0]:7.3f}{c[1]:9.3f}{c[2]:8.3f}{c[3]:7.2f} | "
            if c
            else f"{'–':>7}{'–':>9}{'–':>8}{'–':>7} | "
            for c in cells
        )
        lines.append(f"{model:<6}{variant:<3}{text}")
    return "\n".join(lines)
