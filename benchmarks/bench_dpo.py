"""One online DPO step on the real SmolLM2-135M (fp32, CPU): ours vs TRL's ``training_step`` vs LoRA.

    .venv/bin/python benchmarks/bench_dpo.py [--repeats 5] [--threads 0] [--no-lora]
    .venv/bin/python benchmarks/bench_dpo.py --reference-only | --gradient-only   # the learner's chunks

All variants train on the *same* 16 Home Depot-like (query, chosen, rejected) pairs, tokenised once by
``learner.dpo.tokenize_pairs`` (which ``tests/test_dpo.py`` shows equals TRL's own tokenisation). A step is
everything an update costs on the learner's critical path, from the 16th pair to new weights:

- ours:  ``DPOLearnerCore.step``: the policy forward in the prompt-tree layout (the system message once per
         batch, each pair's prompt once, only completions per row), loss, backward, clip, AdamW. The reference
         terms were computed as the pairs arrived (``prepare_reference``, as the learner does while the batch
         gathers); that cost is timed separately and shown as "ours + reference";
- ours (plain): the same step in TRL's layout (every prompt twice, padded rows; ``DPOConfig.prompt_tree``
         off), so the tree's share of the gain is measured, not assumed;
- TRL:   ``DPOTrainer.training_step`` (policy and reference forwards over the concatenated, padded layout,
         loss, backward through accelerate), then the clip + ``optimizer.step`` + ``zero_grad`` of
         ``Trainer``'s loop;
- LoRA:  ours with a peft adapter r=16 on q/k/v/o (reference = the adapter disabled, one copy of the weights).

Each variant gets one untimed warm-up step, then ``--repeats`` timed steps; ours (tree), ours (plain) and TRL
take theirs in turns, one of each per round, so a shared machine's drifting load weighs on all three alike.
Medians are quoted and TRL/ours is the ratio of medians measured in the same run. FLOPs are counted for
what each variant computes: 6·N_body per token position that goes through the transformer (padding
included: it is computed), plus 6·N_head per position whose logits are computed (the LM head, tied to the
embedding, is 28 M of the 134.5 M parameters); a reference forward is a third of that; LoRA skips the
weight gradients (4·N instead of 6·N). The bound is torch's fp32 matmul rate measured here on a 1024×1024
product. After timing, ours's weights are copied into TRL's model and both losses are computed on the
batch (policy ≠ reference by then): they must agree to 1e-4.
The machine is shared: the load average is printed before and after.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer

from learner.dpo import (
    Batch,
    DPOConfig,
    DPOLearnerCore,
    Pair,
    PromptTree,
    prompt_tree,
    tokenize_pairs,
    tree_logprobs,
)
from qrloop.models import load_policy, require_policy
from qrloop.prompting import end_of_turn
from qrloop.settings import DPOSettings, get_settings

PAIRS: list[Pair] = [
    ("cordless drill", "20v cordless drill driver kit", "drill"),
    ("angle bracket", "metal angle bracket", "angle"),
    ("toungh groove", "tongue and groove boards", "groove music"),
    ("paint storage contaiers", "paint storage containers", "paint it black"),
    ("led shop light", "4 ft led shop light fixture", "shop"),
    ("deck screws", "exterior wood deck screws 3 inch", "screws for decks and fences and patios"),
    ("ceiling fan with light", "indoor ceiling fan with led light kit", "fan"),
    ("garden hose 50", "50 ft garden hose", "hose"),
    ("pvc pipe 2in", "2 in pvc schedule 40 pipe", "pvc"),
    ("outdoor paint", "exterior latex paint satin", "painting outdoors"),
    ("kitchen faucet pull down", "pull down kitchen faucet stainless steel", "kitchen"),
    ("ryobi battery", "ryobi 18v lithium ion battery", "battery charger for phones"),
    ("weed killer", "concentrate weed and grass killer", "killer"),
    ("shower head", "high pressure rain shower head", "head"),
    ("smoke detecter", "smoke detector battery operated", "smoke"),
    ("door knob", "interior privacy door knob satin nickel", "knob"),
]


@dataclass
class Timing:
    name: str
    seconds: list[float]
    flops: float  # estimated, forward + backward of the trained path

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    """torch's fp32 matmul rate on this machine (2n³ FLOPs per product), median of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times) / 1e9


def timed(step: Callable[[], object]) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def trl_trainer(model_dir: Path, eos: str, config: DPOConfig, reference: Any = None) -> Any:
    """TRL's DPOTrainer on the bench's pairs, with its optimizer created; ``reference``: a frozen copy of the
    starting weights to share (default: a copy of its own)."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from qrloop.prompting import build_prompt

    model, tokenizer = load_policy(model_dir)
    reference = reference if reference is not None else copy.deepcopy(model)
    tokenizer.eos_token = eos  # TRL appends tokenizer.eos_token; make it the end of turn (see learner.dpo)
    rows = [{"prompt": build_prompt(tokenizer, q), "chosen": c, "rejected": r} for q, c, r in PAIRS]
    args = TRLConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-dpo-"),
        beta=config.beta,
        learning_rate=config.learning_rate,
        max_grad_norm=config.max_grad_norm,
        loss_type=["sigmoid"],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=len(PAIRS),
        max_length=config.max_length,
        logging_strategy="no",
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we do not run
    return trainer


def trl_step(trainer: Any, batch: Batch) -> Callable[[], object]:
    """A closure doing one full TRL update on ``batch``."""
    trained, optimizer = trainer.model, trainer.optimizer

    def step() -> object:
        loss = trainer.training_step(trained, dict(batch))
        torch.nn.utils.clip_grad_norm_(trained.parameters(), trainer.args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def time_core_steps(core: DPOLearnerCore, repeats: int) -> tuple[list[float], list[float]]:
    """(step seconds, reference-preparation seconds) of ``repeats`` steps after one warm-up step.

    As in the learner, the reference terms of a batch are computed before its step, one pair at a time."""
    steps, references = [], []
    for i in range(repeats + 1):
        step, reference = timed_core_step(core)
        if i:  # the first is the warm-up
            steps.append(step)
            references.append(reference)
    return steps, references


def timed_core_step(core: DPOLearnerCore) -> tuple[float, float]:
    """(step seconds, reference-preparation seconds) of one step of ``core`` on the bench's pairs."""
    reference = timed(lambda: core.prepare_reference(PAIRS))
    return timed(lambda: core.step(PAIRS)), reference


def interleaved_steps(
    tree: DPOLearnerCore, plain: DPOLearnerCore, trl: Callable[[], object], repeats: int
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(tree, reference preparation, plain, TRL) step seconds, timed in turns: one step of each per round
    after one untimed warm-up round (allocator, optimizer state, lazy inits), so a load that drifts during
    the run (the machine is shared) weighs on the three alike and their ratio stays meaningful."""
    tree_s, reference_s, plain_s, trl_s = [], [], [], []
    for i in range(repeats + 1):
        tree_step, reference = timed_core_step(tree)
        release_memory()
        plain_step, _ = timed_core_step(plain)
        release_memory()
        trl_step_s = timed(trl)
        release_memory()
        if i:
            tree_s.append(tree_step)
            reference_s.append(reference)
            plain_s.append(plain_step)
            trl_s.append(trl_step_s)
        print(
            f"  round {i}: tree {tree_step:.2f} s, plain {plain_step:.2f} s, TRL {trl_step_s:.2f} s",
            flush=True,
        )
    return tree_s, reference_s, plain_s, trl_s


def release_memory() -> None:
    """Hand the freed activations of a step back to the OS between variants (glibc keeps them otherwise):
    three models side by side on a shared machine must not hold each one's peak at once."""
    gc.collect()
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def core_of(model_dir: Path, dpo: DPOSettings, reference: Any = None, **config: Any) -> DPOLearnerCore:
    """Ours from the starting weights; ``reference``: a frozen copy of them to share (the variants' reference
    is the same model; sharing it saves a copy of the weights per variant)."""
    policy, tokenizer = load_policy(model_dir)
    settings = DPOConfig.from_settings(dpo, **config)
    if reference is None:
        return DPOLearnerCore.from_model(policy, tokenizer, settings)
    return DPOLearnerCore(policy, reference, tokenizer, settings)


REFERENCE_VARIANTS = ("from scratch, 1 a forward", "1 pair a forward", "in chunks (8, 4, 2, 1, 1)")


def reference_terms_side_by_side(core: DPOLearnerCore, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds to compute the reference terms of the bench's 16 pairs, per variant and arrival: a "burst"
    (all 16 waiting at once) and "16th alone" (15 prepared as they came; what the 16th pair then waits for).

    Variants: each pair in its own forward from scratch (no system-message cache), each pair in its own
    forward over the cache (``dpo.reference_batching`` off), and the position chunks the learner uses (on).
    In turns, one round of each per repeat after an untimed round, so drifting load weighs on all alike."""
    assert core.reference is not None
    reference = core.reference
    times: dict[str, dict[str, list[float]]] = {
        name: {"burst": [], "16th alone": []} for name in REFERENCE_VARIANTS
    }

    def prepared(batching: bool, pairs: list[Pair]) -> None:
        core.config.reference_batching = batching
        core.prepare_reference(pairs)

    def scratch(pairs: list[Pair]) -> None:
        with torch.no_grad():
            for pair in pairs:
                tree_logprobs(reference, prompt_tree(core.tokenize([pair])))

    runs: dict[str, Callable[[list[Pair]], None]] = {
        REFERENCE_VARIANTS[0]: scratch,
        REFERENCE_VARIANTS[1]: lambda pairs: prepared(False, pairs),
        REFERENCE_VARIANTS[2]: lambda pairs: prepared(True, pairs),
    }
    for i in range(repeats + 1):
        for name, run in runs.items():
            burst, last = burst_and_last(run, core, alone=name == REFERENCE_VARIANTS[0])
            if i:
                times[name]["burst"].append(burst)
                times[name]["16th alone"].append(last)
    return times


def burst_and_last(
    run: Callable[[list[Pair]], None], core: DPOLearnerCore, alone: bool
) -> tuple[float, float]:
    """(all 16 pairs at once, the 16th after the other 15 were prepared) seconds of one variant ``run``;
    ``alone``: each pair is independent of the others, so the 16th is timed by itself."""
    burst = timed(lambda: run(PAIRS))
    core.forget_reference(PAIRS)
    if alone:
        return burst, timed(lambda: run(PAIRS[-1:]))
    for arrived in range(1, len(PAIRS)):
        run(PAIRS[:arrived])
    last = timed(lambda: run(PAIRS))
    core.forget_reference(PAIRS)
    return burst, last


def gradient_batching_side_by_side(model_dir: Path, dpo: DPOSettings, repeats: int) -> dict[str, list[float]]:
    """Seconds of a step's policy work (forward, backward, update; reference terms prepared beforehand and
    not counted) with the whole batch in one pass at the 16th pair (``dpo.gradient_batching`` off) and in the
    learner's chunks (on): for the chunks, the part that ran as pairs 1–15 arrived ("ahead") and the part left
    when the 16th came ("after the 16th"). In turns, one step of each per round after an untimed round."""
    one_pass = core_of(model_dir, dpo, gradient_batching=False)
    chunked = core_of(model_dir, dpo, one_pass.reference, gradient_batching=True)
    times: dict[str, list[float]] = {
        "one pass": [],
        "chunks: ahead": [],
        "chunks: after the 16th": [],
    }
    for i in range(repeats + 1):
        one_pass.prepare_reference(PAIRS)
        whole = timed(lambda: one_pass.step(PAIRS))
        release_memory()
        chunked.prepare_reference(PAIRS)
        ahead = sum(timed(functools.partial(chunked.prepare_step, PAIRS[:n])) for n in range(1, len(PAIRS)))
        after = timed(lambda: chunked.step(PAIRS))
        release_memory()
        print(
            f"  round {i}: one pass {whole:.2f} s, chunks {ahead:.2f} s ahead + {after:.2f} s after",
            flush=True,
        )
        if i:
            times["one pass"].append(whole)
            times["chunks: ahead"].append(ahead)
            times["chunks: after the 16th"].append(after)
    return times


def time_lora_steps(model_dir: Path, dpo: DPOSettings, repeats: int) -> tuple[list[float], int]:
    """(step seconds, trainable parameters) of ours with a LoRA adapter r=16."""
    lora_core = core_of(model_dir, dpo, lora_r=16, prompt_tree=True, gradient_batching=False)
    trained = sum(p.numel() for p in lora_core.trainable_parameters())
    steps, _ = time_core_steps(lora_core, repeats)
    del lora_core
    gc.collect()
    return steps, trained


def step_flops(body: int, head: int, positions: int, logits: int, weight_grads: bool = True) -> float:
    """Forward + backward FLOPs: 2 (forward) + 2 (input grads) + 2 (weight grads) per parameter use."""
    per_use = 6 if weight_grads else 4
    return per_use * (body * positions + head * logits)


def forward_flops(body: int, head: int, positions: int, logits: int) -> float:
    return 2 * (body * positions + head * logits)


def plain_positions(batch: Batch) -> tuple[int, int]:
    """The same for the plain layout: every padded position; logits from the position before the earliest
    completion token on (``learner.dpo.completion_logprobs``)."""
    rows, width = batch["input_ids"].shape
    first = int(batch["completion_mask"].argmax(dim=1).min())
    return rows * width, rows * (width - 1 - max(first - 1, 0))


def tree_positions(tree: PromptTree) -> tuple[int, int]:
    """(positions through the transformer, padding included; positions whose logits are computed)."""
    positions = tree.prefix_ids.numel() + tree.rest_ids.numel() + tree.tail_ids.numel()
    return positions, tree.tail_ids.shape[0] * (tree.tail_ids.shape[1] - 1)


def loss_gap_to_trl(core: DPOLearnerCore, trainer: Any, batch: Batch) -> tuple[float, float]:
    """(ours, |ours − TRL|) on ``batch`` with ours's current weights in TRL's model (policy ≠ reference)."""
    trainer.model.load_state_dict(core.policy.state_dict())
    with torch.no_grad():
        ours = float(core.loss(batch).loss)
        theirs = float(trainer.compute_loss(trainer.model, dict(batch)))
    return ours, abs(ours - theirs)


def main(
    repeats: int = 5,
    threads: int = 0,
    policy_dir: Path | None = None,
    lora: bool = True,
    reference_only: bool = False,
    gradient_only: bool = False,
) -> None:
    """``--policy-dir`` runs on another HF directory (e.g. a tiny model, to check the script quickly);
    ``--no-lora`` leaves the LoRA variant out (a shorter run on a busy machine); ``--reference-only`` times
    only the reference terms of the pairs: from scratch, one pair a forward, and in the learner's chunks;
    ``--gradient-only`` times the step in one pass against the learner's chunks (``dpo.gradient_batching``).
    The main comparison times every variant of ours in one pass, the work TRL's step does."""
    settings = get_settings()
    threads = threads or settings.models.torch_threads
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(settings.seed)
    model_dir = policy_dir or require_policy(settings)
    print(f"policy {model_dir}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load_average()}")
    bound = matmul_gflops()
    print(f"fp32 matmul 1024×1024: {bound:.1f} GFLOP/s")

    if reference_only:
        times = reference_terms_side_by_side(core_of(model_dir, settings.dpo), repeats)
        print(f"reference terms of {len(PAIRS)} pairs (medians of {repeats}; seconds, then per pair)")
        for name, arrivals in times.items():
            burst, last = statistics.median(arrivals["burst"]), statistics.median(arrivals["16th alone"])
            print(
                f"  {name:<28} burst of 16: {burst:.2f} s ({burst / len(PAIRS):.3f} s a pair); "
                f"the 16th after 15 prepared: {last:.2f} s"
            )
        print(f"load average {load_average()}")
        return
    if gradient_only:
        steps = gradient_batching_side_by_side(model_dir, settings.dpo, repeats)
        whole, ahead, after = (statistics.median(v) for v in steps.values())
        print(f"policy work of a step on {len(PAIRS)} pairs, reference prepared (medians of {repeats})")
        print(f"  {'one pass at the 16th':<32} {whole:.2f} s, all of it after the 16th pair")
        print(
            f"  {'in chunks as the pairs arrive':<32} {ahead + after:.2f} s in all "
            f"({(ahead + after) / whole:.2f}× one pass): {ahead:.2f} s as pairs 1-15 arrived, "
            f"{after:.2f} s after the 16th "
            f"({after / whole:.2f}× one pass)"
        )
        print(f"load average {load_average()}")
        return
    config = DPOConfig.from_settings(settings.dpo)
    policy, tokenizer = load_policy(model_dir)
    params = sum(p.numel() for p in policy.parameters())
    head = policy.get_output_embeddings().weight.numel()
    body = params - head
    eos = end_of_turn(tokenizer, policy.generation_config)
    batch = tokenize_pairs(tokenizer, PAIRS, config.max_length, eos)  # what DPOLearnerCore.step builds
    tree = prompt_tree(batch)
    del policy
    real, padded = int(batch["attention_mask"].sum()), batch["input_ids"].numel()
    completion = int(batch["completion_mask"].sum())
    rows, width = batch["input_ids"].shape
    tree_pos, tree_logits = tree_positions(tree)
    plain_pos, plain_logits = plain_positions(batch)
    print(
        f"batch: {len(PAIRS)} pairs → {rows}×{width}, {real} real tokens ({padded} with padding), "
        f"{completion} completion tokens, prompt share {1 - completion / real:.0%}, terminator {eos!r}"
    )
    print(
        f"prompt tree: shared prefix {tree.prefix_ids.shape[1]} tokens once, prompt rests "
        f"{tuple(tree.rest_ids.shape)}, tails {tuple(tree.tail_ids.shape)}: {tree_pos} positions "
        f"({tree_pos / padded:.0%} of TRL's {padded}), logits at {tree_logits}"
    )
    print(f"parameters N = {params / 1e6:.1f} M (body {body / 1e6:.1f} M, LM head {head / 1e6:.1f} M)")

    # Ours (tree), ours (plain) and TRL side by side, in turns (three models + optimizers, ~8 GB); LoRA after.
    core = core_of(model_dir, settings.dpo, prompt_tree=True, gradient_batching=False)
    plain_core = core_of(model_dir, settings.dpo, core.reference, prompt_tree=False, gradient_batching=False)
    trainer = trl_trainer(model_dir, eos, config, core.reference)
    ours_s, ref_s, plain_s, trl_s = interleaved_steps(core, plain_core, trl_step(trainer, batch), repeats)
    loss, gap = loss_gap_to_trl(core, trainer, batch)
    del trainer, core, plain_core
    gc.collect()
    lora_s, trained = time_lora_steps(model_dir, settings.dpo, repeats) if lora else ([], 0)

    # TRL computes logits at every position of the padded rows (policy and reference).
    trl_flops = step_flops(body, head, padded, padded) + forward_flops(body, head, padded, padded)
    timings = [
        Timing("ours (full FT, prompt tree)", ours_s, step_flops(body, head, tree_pos, tree_logits)),
        Timing(
            "ours + reference preparation",
            [a + b for a, b in zip(ours_s, ref_s, strict=True)],
            step_flops(body, head, tree_pos, tree_logits) + forward_flops(body, head, tree_pos, tree_logits),
        ),
        Timing("ours (full FT, plain layout)", plain_s, step_flops(body, head, plain_pos, plain_logits)),
        Timing("TRL training_step", trl_s, trl_flops),
    ]
    if lora:
        timings.append(
            Timing(
                f"LoRA r=16 q,k,v,o ({trained / 1e6:.2f} M)",
                lora_s,
                step_flops(body, head, tree_pos, tree_logits, weight_grads=False),
            )
        )
    print(f"\nload average after: {load_average()}\n")
    header = f"{'variant':<32} {'median s':>9} {'runs s':>32} {'tokens/s':>9} {'GFLOP/s':>8} {'of bound':>9}"
    print(header)
    print("-" * len(header))
    for t in timings:
        achieved = t.flops / t.median / 1e9
        runs = ", ".join(f"{s:.2f}" for s in t.seconds)
        print(
            f"{t.name:<32} {t.median:>9.2f} {runs:>32} {real / t.median:>9.0f} {achieved:>8.1f} "
            f"{achieved / bound:>9.0%}"
        )
    ours, with_ref, plain, trl = timings[:4]
    print(
        f"\nTRL / ours: {trl.median / ours.median:.2f}×   TRL / (ours + reference): "
        f"{trl.median / with_ref.median:.2f}×   TRL / ours (plain): {trl.median / plain.median:.2f}×   "
        f"plain / tree: {plain.median / ours.median:.2f}×"
        + (f"   LoRA / ours: {timings[4].median / ours.median:.2f}×" if lora else "")
    )
    print(f"loss after {repeats + 1} steps (policy ≠ reference): ours {loss:.6f}, |ours − TRL| = {gap:.2e}")
    print(
        "tokens/s: the batch's real tokens in TRL's layout per second, the same work unit for every variant; "
        "FLOPs: see the module docstring."
    )


if __name__ == "__main__":
    typer.run(main)
