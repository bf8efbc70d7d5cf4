"""The offline phase's Table 2, beside the paper's GPT-2 rows, and the T vs S serving-time ratio.

Runs ``learner.offline.build.build_minielm`` with modest caps (a quarter of an hour on a shared 2-core CPU),
or, with ``--report``, prints the figures of a build that already ran. ``--publish`` also publishes the result
as ``production`` (the benchmark does not touch the policy store otherwise).

    .venv/bin/python benchmarks/bench_offline.py [--teacher-steps 60 ...] [--publish]
    .venv/bin/python benchmarks/bench_offline.py --report ~/.cache/qrloop/offline/report.json

The paper's numbers are on ESCI with GPT2-large → GPT2 (and Llama 3.1 8B → 3.2 1B); ours are on Home Depot
with SmolLM2-135M-Instruct → its 15-layer half, after minutes of CPU training instead of full fine-tuning.
Compare directions (does SFT shorten rewrites and cut cross-entropy? does distillation move S towards T?),
not absolute values.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from learner.offline.build import MiniELMReport, OfflineConfig, build_minielm
from learner.offline.evaluate import format_table2
from qrloop.settings import get_settings

# The paper's Table 2 (ESCI), copied as published: (model, variant) → (ExactMatch %, ROUGE-L %, XEntropy,
# Mean Length). For T→S, V is the SFT student and P the distilled student.
PAPER_GPT2: dict[tuple[str, str], tuple[float, float, float, float]] = {
    ("S", "V"): (0.0, 0.692, 9.567, 213.228),
    ("S", "P"): (2.833, 34.817, 8.08, 2.993),
    ("T", "V"): (0.0, 0.831, 8.454, 211.98),
    ("T", "P"): (1.75, 38.982, 4.684, 3.318),
    ("T→S", "V"): (2.833, 34.817, 8.08, 2.993),
    ("T→S", "P"): (2.875, 35.577, 3.739, 3.081),
}
PAPER_LLAMA3: dict[tuple[str, str], tuple[float, float, float, float]] = {
    ("S", "V"): (0.0, 4.453, 8.1314, 217.196),
    ("S", "P"): (3.125, 42.256, 4.632, 4.265),
    ("T", "V"): (0.042, 6.592, 7.433, 147.187),
    ("T", "P"): (5.0, 44.996, 4.204, 9.257),
    ("T→S", "V"): (3.125, 42.256, 4.632, 4.265),
    ("T→S", "P"): (4.5, 43.217, 4.764, 4.296),
}


def _report_from_file(path: Path) -> MiniELMReport:
    return MiniELMReport(**json.loads(path.read_text()))


def _run(args: argparse.Namespace) -> MiniELMReport:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    config = OfflineConfig(
        teacher_steps=args.teacher_steps,
        student_steps=args.student_steps,
        distill_steps=args.distill_steps,
        batch_size=args.batch_size,
        eval_pairs=args.eval_pairs,
        serving_queries=args.serving_queries,
        publish=args.publish,
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        return build_minielm(get_settings(), config=config, progress=progress)


def print_report(report: MiniELMReport) -> None:
    q2q = report.q2q
    print(f"Q2Q ({q2q['dataset']}, {q2q['rule']}, k={q2q['k']}, verifier: {q2q['verifier']})")
    for stage, count in q2q["stages"].items():
        print(f"  {stage:<40}{count:>8,}")
    print()
    print("Table 2 — ExactMatch %, ROUGE-L %, XEntropy (nats/token), Mean Length (tokens)")
    print(f"  ({int(report.table2['T/P']['n'])} evaluation pairs, greedy, max 16 new tokens)")
    print(
        format_table2(
            report.measured(), {"paper: ESCI, GPT2": PAPER_GPT2, "paper: ESCI, Llama 3": PAPER_LLAMA3}
        )
    )
    print()
    t, s = report.serving["T"], report.serving["S"]
    print(
        f"serving: generate(num_return_sequences=2), median of {int(t['queries'])} queries, "
        "T and S interleaved\n"
        f"  T {t['median_s'] * 1000:7.1f} ms  ({t['mean_new_tokens']:.1f} tokens/rewrite)\n"
        f"  S {s['median_s'] * 1000:7.1f} ms  ({s['mean_new_tokens']:.1f} tokens/rewrite)\n"
        f"  T/S time ratio {t['median_s'] / s['median_s']:.2f}x"
    )
    gkd = report.gkd
    print(
        f"GKDTrainer(beta=1) vs our reverse KL on one batch: ours {gkd['ours']:.6f}, "
        f"TRL {gkd['gkd_trainer']:.6f}, |diff| {gkd['abs_diff']:.2e}"
    )
    print("training:", json.dumps(report.training, ensure_ascii=False))
    print("stage seconds:", json.dumps(report.stages_s, ensure_ascii=False))
    if report.version is not None:
        print(f"published version {report.version} as '{report.config.get('alias', 'production')}'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", type=Path, help="Print this report.json instead of building.")
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--student-steps", type=int, default=60)
    parser.add_argument("--distill-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-pairs", type=int, default=48)
    parser.add_argument("--serving-queries", type=int, default=30)
    parser.add_argument("--publish", action="store_true", help="Publish MiniELM and move 'production'.")
    args = parser.parse_args()
    print_report(_report_from_file(args.report) if args.report else _run(args))


if __name__ == "__main__":
    main()
