"""One online DPO step on the real SmolLM2-135M (fp32, CPU): ours vs TRL's ``training_step`` vs LoRA.

    .venv/bin/python benchmarks/bench_dpo.py [--repeats 3] [--threads 0]

All three variants train on the *same* tensor batch: 16 Home Depot-like (query, chosen, rejected) pairs,
tokenised once by ``learner.dpo.tokenize_pairs`` (which ``tests/test_dpo.py`` shows equals TRL's own
tokenisation). A step is everything an update costs: policy forward, reference forward, loss, backward,
gradient clipping and the AdamW update.

- ours:  ``DPOLearnerCore.step`` (full fine-tuning, frozen deep-copied reference);
- TRL:   ``DPOTrainer.training_step`` (forward, reference forward, loss, backward through accelerate)
         followed by the clip + ``optimizer.step`` + ``zero_grad`` that ``Trainer``'s loop does after it;
- LoRA:  ``DPOLearnerCore.step`` with a peft adapter r=16 on q/k/v/o; the reference is the same model with
         the adapter disabled, so there is one copy of the weights.

Each variant gets one untimed warm-up step (allocator, AdamW state), then the median of ``--repeats`` timed
steps. The bound: torch's fp32 matmul rate measured here on a 1024×1024 product, against the step's
estimated FLOPs (6 × parameters × tokens for full fine-tuning, the usual forward + backward estimate; the
reference forward adds 2 × parameters × tokens on top, printed separately). The machine is shared: the load
average is printed before and after, and timings move with it.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import typer

from learner.dpo import Batch, DPOConfig, DPOLearnerCore, Pair, tokenize_pairs
from qrloop.models import load_policy, require_policy
from qrloop.prompting import end_of_turn
from qrloop.settings import get_settings

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


def time_steps(step: Callable[[], object], repeats: int) -> list[float]:
    step()  # warm-up: allocator, optimizer state, lazy inits
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return seconds


def trl_step(model_dir: Path, batch: Batch, eos: str, config: DPOConfig) -> Callable[[], object]:
    """TRL's DPOTrainer on the same batch; returns a closure doing one full update."""
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from qrloop.prompting import build_prompt

    model, tokenizer = load_policy(model_dir)
    reference = copy.deepcopy(model)
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
    optimizer = trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which we do not run
    trained = trainer.model
    assert trained is not None

    def step() -> object:
        loss = trainer.training_step(trained, dict(batch))
        torch.nn.utils.clip_grad_norm_(trained.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def bench_ours(model_dir: Path, config: DPOConfig, repeats: int) -> list[float]:
    policy, tokenizer = load_policy(model_dir)
    core = DPOLearnerCore.from_model(policy, tokenizer, config)
    return time_steps(lambda: core.step(PAIRS), repeats)


def bench_trl(model_dir: Path, batch: Batch, eos: str, config: DPOConfig, repeats: int) -> list[float]:
    return time_steps(trl_step(model_dir, batch, eos, config), repeats)


def bench_lora(model_dir: Path, config: DPOConfig, repeats: int) -> tuple[list[float], int]:
    """Step times and the number of trained (adapter) parameters."""
    policy, tokenizer = load_policy(model_dir)
    core = DPOLearnerCore.from_model(policy, tokenizer, config)
    trained = sum(p.numel() for p in core.trainable_parameters())
    return time_steps(lambda: core.step(PAIRS), repeats), trained


def main(repeats: int = 3, threads: int = 0, policy_dir: Path | None = None) -> None:
    """``--policy-dir`` runs on another HF directory (e.g. a tiny model, to check the script quickly)."""
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

    config = DPOConfig.from_settings(settings.dpo)
    policy, tokenizer = load_policy(model_dir)
    params = sum(p.numel() for p in policy.parameters())
    eos = end_of_turn(tokenizer, policy.generation_config)
    batch = tokenize_pairs(tokenizer, PAIRS, config.max_length, eos)  # what DPOLearnerCore.step builds
    del policy
    real, padded = int(batch["attention_mask"].sum()), batch["input_ids"].numel()
    completion = int(batch["completion_mask"].sum())
    rows, width = batch["input_ids"].shape
    print(
        f"batch: {len(PAIRS)} pairs → {rows}×{width}, {real} real tokens ({padded} with padding), "
        f"{completion} completion tokens, prompt share {1 - completion / real:.0%}, terminator {eos!r}"
    )
    print(f"parameters N = {params / 1e6:.1f} M; FLOPs are estimated on the T = {padded} padded tokens")

    # One variant at a time: each one's models and optimizer state are freed before the next one loads.
    ours = Timing("ours (full FT)", bench_ours(model_dir, config, repeats), 6 * params * padded)
    print(f"  {ours.name}: {ours.seconds}", flush=True)
    gc.collect()
    trl = Timing("TRL training_step", bench_trl(model_dir, batch, eos, config, repeats), 6 * params * padded)
    print(f"  {trl.name}: {trl.seconds}", flush=True)
    gc.collect()
    lora_config = DPOConfig.from_settings(settings.dpo, lora_r=16)
    lora_seconds, trained = bench_lora(model_dir, lora_config, repeats)
    # LoRA still back-propagates activations through every frozen matmul (2NT) but skips weight grads (2NT).
    lora = Timing(f"LoRA r=16 q,k,v,o ({trained / 1e6:.2f} M trained)", lora_seconds, 4 * params * padded)
    timings = [ours, trl, lora]

    print(f"\nload average after: {load_average()}\n")
    header = (
        f"{'variant':<38} {'median s':>9} {'runs s':>20} {'tokens/s':>9} {'GFLOP/s':>8} "
        f"{'of bound':>9} {'+ref fwd':>9}"
    )
    print(header)
    print("-" * len(header))
    reference_fwd = 2 * params * padded
    for t in timings:
        achieved = t.flops / t.median / 1e9
        with_ref = (t.flops + reference_fwd) / t.median / 1e9
        runs = ", ".join(f"{s:.2f}" for s in t.seconds)
        print(
            f"{t.name:<38} {t.median:>9.2f} {runs:>20} {real / t.median:>9.0f} {achieved:>8.1f} "
            f"{achieved / bound:>9.0%} {with_ref / bound:>9.0%}"
        )
    print(f"\nTRL / ours: {trl.median / ours.median:.2f}×   LoRA / ours: {lora.median / ours.median:.2f}×")
    print(
        "FLOPs: full FT 6·N·T, LoRA 4·N·T (no weight gradients); "
        "'+ref fwd' also counts the reference forward, 2·N·T."
    )


if __name__ == "__main__":
    typer.run(main)
