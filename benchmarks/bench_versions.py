"""What a published version costs: full fine-tuning vs LoRA adapters, side by side (issue #17).

    .venv/bin/python benchmarks/bench_versions.py [--reps 5] [--lora-r 16] [--threads 2]

From the prepared SmolLM2-135M-Instruct, published as version 1 of a fresh SQLite store in a temporary
folder, each variant (``dpo.lora_r`` 0, then ``--lora-r``) takes one DPO step on ``bench_dpo``'s 16 pairs,
then per repetition one more step and the learner's own publish path, timed piece by piece:

- save: ``DPOLearnerCore.save`` (the whole model and tokenizer, or the adapter alone), with and without
  AdamW's moments (``dpo.keep_optimizer_state``; the demo keeps them off);
- store: ``PolicyStore.publish(give_away=True)``, what the learner calls (validate, canonical tar, sha256,
  fsync, the insert transaction);
- load: ``qrloop.models.load_stored_policy``, what a rewriter's swap does (a LoRA version: its base's
  checkout loaded and the adapter merged in).

The step itself is reported too, because the point of a cheap publish is the step → served latency: the
publish should cost nothing next to the step. Each repetition's loaded model is checked against the learner's
policy (the largest logit difference on a fixed prompt), so a fast load that serves something else would
show. Medians over ``--reps``.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import typer
from bench_dpo import PAIRS
from bench_policy_store import timed
from rich.console import Console
from rich.table import Table

from learner.dpo import DPOLearnerCore
from policy_store import ADAPTER_BASE_TAG, BlobStore, PolicyStore, db
from qrloop.models import load_stored_policy, require_policy
from qrloop.settings import Settings, get_settings

PROBE = [[1, 2282, 5, 9, 13, 17, 21, 480]]


@dataclass
class Figures:
    name: str
    step: list[float] = field(default_factory=list)
    save: list[float] = field(default_factory=list)
    store: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    size_with_optimizer: list[int] = field(default_factory=list)
    worst_logit_gap: float = 0.0


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.tensor(PROBE)).logits


def run_variant(
    settings: Settings, store: PolicyStore, start: int, lora_r: int, reps: int, tmp: Path
) -> Figures:
    tuned = settings.model_copy(update={"dpo": settings.dpo.model_copy(update={"lora_r": lora_r})})
    core = DPOLearnerCore.from_versions(tuned, store, policy_version=start, reference_version=start)
    figures = Figures(f"LoRA r={lora_r}" if lora_r else "full")
    core.step(PAIRS)  # AdamW's moments exist from here on, as in a running learner
    parent = start
    for rep in range(reps):
        step_s, _ = timed(partial(core.step, PAIRS))
        with_optimizer = tmp / f"{figures.name}-{rep}-opt"
        core.save(with_optimizer, optimizer=True)
        optimizer_bytes = BlobStore.size_of(with_optimizer)
        shutil.rmtree(with_optimizer)
        weights = tmp / f"{figures.name}-{rep}"
        save_s, _ = timed(partial(core.save, weights, optimizer=False))
        tags = {ADAPTER_BASE_TAG: start} if core.kind == "lora" else {}
        publish = partial(
            store.publish,
            weights,
            parent=parent,
            base_model="bench",
            kind=core.kind,
            tags=tags,
            actor="bench",
            give_away=True,
        )
        publish_s, version = timed(publish)
        load_s, (served, _) = timed(partial(load_stored_policy, store, version))
        parent = version.id
        figures.step.append(step_s)
        figures.save.append(save_s)
        figures.store.append(publish_s)
        figures.load.append(load_s)
        figures.size.append(version.size_bytes)
        figures.size_with_optimizer.append(optimizer_bytes)
        gap = float((logits(served) - logits(core.policy)).abs().max())
        figures.worst_logit_gap = max(figures.worst_logit_gap, gap)
        core.policy.train()
    return figures


def render(results: list[Figures], reps: int) -> Table:
    table = Table(title=f"a published version, full vs LoRA (medians of {reps})")
    table.add_column("")
    for r in results:
        table.add_column(r.name, justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("DPO step (s)", [f"{statistics.median(r.step):.2f}" for r in results]),
        ("version size (MB)", [f"{statistics.median(r.size) / 1e6:.2f}" for r in results]),
        (
            "with AdamW's moments (MB)",
            [f"{statistics.median(r.size_with_optimizer) / 1e6:.2f}" for r in results],
        ),
        ("save (ms)", [f"{1000 * statistics.median(r.save):.0f}" for r in results]),
        ("store.publish (ms)", [f"{1000 * statistics.median(r.store):.0f}" for r in results]),
        (
            "save + publish (ms)",
            [
                f"{1000 * statistics.median(a + b for a, b in zip(r.save, r.store, strict=True)):.0f}"
                for r in results
            ],
        ),
        (
            "save + publish / step",
            [
                f"{(statistics.median(r.save) + statistics.median(r.store)) / statistics.median(r.step):.1%}"
                for r in results
            ],
        ),
        ("load for serving (ms)", [f"{1000 * statistics.median(r.load):.0f}" for r in results]),
        ("largest logit gap, loaded vs trained", [f"{r.worst_logit_gap:.1e}" for r in results]),
    ]
    for name, cells in rows:
        table.add_row(name, *cells)
    return table


def main(
    reps: int = typer.Option(5, help="repetitions per variant (medians)"),
    lora_r: int = typer.Option(16, help="the LoRA variant's rank (dpo.lora_r)"),
    threads: int = typer.Option(2, help="torch threads"),
) -> None:
    torch.set_num_threads(threads)
    settings = get_settings()
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as tmp_name:
        tmp = Path(tmp_name)
        url = f"sqlite:///{tmp / 'store.db'}"
        db.upgrade(url)
        store = PolicyStore(url, tmp / "blobs")
        start = store.publish(require_policy(settings), base_model="SmolLM2-135M-Instruct", actor="bench").id
        results = [run_variant(settings, store, start, r, reps, tmp) for r in (0, lora_r)]
        store.close()
    Console().print(render(results, reps))


if __name__ == "__main__":
    typer.run(main)
