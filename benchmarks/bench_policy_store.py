"""Policy store: publish/load times of a 135M-parameter policy and a LoRA adapter, SQLite vs PostgreSQL.

    .venv/bin/python benchmarks/bench_policy_store.py [--reps 5]

The policy is the prepared SmolLM2-135M-Instruct directory when it exists (and holds safetensors), else a
randomly initialised LlamaForCausalLM with SmolLM2-135M's shape in bf16 (the size the real checkpoint has on
disk). The adapter is LoRA r=8 on q_proj/v_proj. PostgreSQL gets a fresh database for the run
(``QRLOOP_BENCH_PG_URL`` names the server, default the test server), dropped afterwards.

Per backend and artifact, each repetition changes a few bytes of the weights first, so every publish writes a
new blob, then measures:
- publish: validate + canonical tar + sha256 + fsync + rename, then the insert transaction;
- publish again: the same content (the dedup path still reads and hashes everything);
- materialise: extract a fresh copy with ``load_dir(v, dest)``, verifying sha256 on the way;
- cached load: ``load_dir(v)`` on an existing checkout, which re-hashes it in place;
- set_alias: the database-only part, one locked alias move + audit row.
Medians over the repetitions, after one untimed warm-up. ``os.sync()`` runs before each timed write: on
this kind of virtual disk a large fsync right after another one is several times slower, and without the
sync whichever measurement comes first would be charged for the previous one's write-back. Source files are
in the page cache, so reads are memory-bound, not cold-disk.
"""

from __future__ import annotations

import os
import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console
from rich.table import Table

from policy_store import ADAPTER_BASE_TAG, PolicyStore
from policy_store.db import scratch_postgres_database, upgrade
from qrloop.models import load_causal_lm
from qrloop.settings import default_password_file, get_settings, with_stored_password

T = TypeVar("T")
# The password comes from scripts/postgres.sh's 0600 secret file, never from the source.
DEFAULT_PG_URL = with_stored_password(
    "postgresql+psycopg://qrloop@127.0.0.1:5432/qrloop_test", default_password_file()
)


@dataclass
class Result:
    backend: str
    artifact: str
    size_bytes: int
    publish_s: float
    dedup_s: float
    materialise_s: float
    cached_s: float
    set_alias_s: float


# ------------------------------------------------------------------------------------------------ artifacts


def build_policy_dir(root: Path, *, random_weights: bool) -> tuple[Path, str]:
    """A 135M-parameter HF model directory: the real SmolLM2 when prepared, else a random one of its shape."""
    real = get_settings().models.policy_dir
    if not random_weights and real is not None and (real / "model.safetensors").is_file():
        dest = root / "policy"
        shutil.copytree(real, dest, symlinks=False)
        return dest, f"SmolLM2-135M-Instruct ({real})"

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).bfloat16()
    dest = root / "policy"
    model.save_pretrained(dest, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    return dest, f"random LlamaForCausalLM, SmolLM2-135M shape, {params / 1e6:.1f}M params, bf16"


def build_lora_dir(policy_dir: Path, root: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    base = load_causal_lm(policy_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    dest = root / "lora"
    get_peft_model(base, config).save_pretrained(str(dest), safe_serialization=True)
    return dest


def change_weights(directory: Path, rep: int) -> None:
    """Overwrite the last 4 bytes of the weights so the next publish is new content (two bf16 values near 1.0,
    or one fp32 near 1.0: valid numbers either way)."""
    weights = next(p for p in sorted(directory.glob("*.safetensors")))
    with weights.open("r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(struct.pack("<HH", 0x3F80 + rep, 0x3F80))


# ------------------------------------------------------------------------------------------------- backends


def timed(fn: Callable[[], T], *, sync: bool = False) -> tuple[float, T]:
    """Seconds ``fn`` took, and what it returned."""
    if sync:
        os.sync()  # start from no pending write-back (see the module docstring)
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_backend(backend: str, url: str, artifacts: dict[str, tuple[Path, str]], reps: int) -> list[Result]:
    upgrade(url)
    results = []
    with tempfile.TemporaryDirectory(prefix="qrloop-bench-blobs-") as blobs:
        store = PolicyStore(url, Path(blobs))
        base: int | None = None  # an adapter is published over the last full version (the store checks it)
        for artifact, (directory, kind) in artifacts.items():
            samples: dict[str, list[float]] = {k: [] for k in ("publish", "dedup", "mat", "cached", "alias")}
            alias = f"bench-{kind}"
            size = 0
            for rep in range(-1, reps):  # rep -1: warm-up, not recorded
                change_weights(directory, rep + 1)
                tags = {ADAPTER_BASE_TAG: base} if kind == "lora" else {}
                publish = partial(store.publish, directory, base_model="smollm2-135m", kind=kind, tags=tags)
                seconds, v = timed(publish, sync=True)
                base = v.id if kind == "full" else base
                samples["publish"].append(seconds)
                size = v.size_bytes
                samples["dedup"].append(timed(publish, sync=True)[0])  # same content again
                dest = Path(blobs) / f"dest-{artifact}-{rep}"
                samples["mat"].append(timed(partial(store.load_dir, v, dest=dest))[0])
                shutil.rmtree(dest)
                store.load_dir(v)  # create the shared checkout, then time the verified cache hit
                samples["cached"].append(timed(partial(store.load_dir, v))[0])
                samples["alias"].append(timed(partial(store.set_alias, alias, v))[0])
            med = {k: statistics.median(vals[1:]) for k, vals in samples.items()}  # drop the warm-up
            results.append(
                Result(
                    backend,
                    artifact,
                    size,
                    med["publish"],
                    med["dedup"],
                    med["mat"],
                    med["cached"],
                    med["alias"],
                )
            )
        store.close()
    return results


# ----------------------------------------------------------------------------------------------------- main


def render(results: list[Result], reps: int, description: str) -> Table:
    table = Table(title=f"policy store, median of {reps} — {description}")
    for column in ("backend", "artifact", "blob size", "publish", "publish again", "materialise+verify"):
        table.add_column(column, justify="right" if column != "backend" else "left")
    table.add_column("cached load (verify)", justify="right")
    table.add_column("set_alias", justify="right")
    table.add_column("publish MB/s", justify="right")
    for r in results:
        mb = r.size_bytes / 1e6
        table.add_row(
            r.backend,
            r.artifact,
            f"{mb:,.1f} MB" if mb >= 1 else f"{r.size_bytes / 1e3:,.1f} kB",
            f"{r.publish_s * 1e3:,.0f} ms",
            f"{r.dedup_s * 1e3:,.0f} ms",
            f"{r.materialise_s * 1e3:,.0f} ms",
            f"{r.cached_s * 1e3:,.0f} ms",
            f"{r.set_alias_s * 1e3:,.1f} ms",
            f"{mb / r.publish_s:,.0f}",
        )
    return table


def main(
    reps: int = typer.Option(5, help="Repetitions per measurement (median reported)."),
    random_weights: bool = typer.Option(
        False, "--random", help="Use a random model of SmolLM2-135M's shape even if the real one is prepared."
    ),
) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    console = Console(width=160)  # wide enough for the table when piped to a file
    pg_server = os.environ.get("QRLOOP_BENCH_PG_URL", DEFAULT_PG_URL)
    with tempfile.TemporaryDirectory(prefix="qrloop-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        policy_dir, description = build_policy_dir(root, random_weights=random_weights)
        lora_dir = build_lora_dir(policy_dir, root)
        console.print(f"built artifacts in {time.perf_counter() - start:.1f} s: {description}")
        artifacts = {"135M full": (policy_dir, "full"), "LoRA r=8 q,v": (lora_dir, "lora")}
        results = bench_backend("sqlite", f"sqlite:///{root / 'bench.db'}", artifacts, reps)
        with scratch_postgres_database(pg_server, "qrloop_bench") as pg_url:
            results += bench_backend("postgresql", pg_url, artifacts, reps)
    console.print(render(results, reps, description))


if __name__ == "__main__":
    typer.run(main)
