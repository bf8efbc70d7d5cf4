"""``qrloop offline ...``: build the Q2Q data set alone, or the whole MiniELM. A thin shell over ``build``.

Mounted by ``qrloop/cli/main.py`` (``app.add_typer(offline_app, name="offline")``); also runnable on its own
as ``python -m learner.offline.cli``. Each command imports its module inside the function: those load torch,
transformers and trl, and this app is mounted into every ``qrloop`` invocation (``--help`` included).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qrloop.settings import get_settings

app = typer.Typer(
    help="The offline phase: Q2Q pairs, SFT, reverse-KL distillation, MiniELM.", no_args_is_help=True
)
console = Console()


def progress_bars() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _stage_table(stages: dict[str, int]) -> Table:
    table = Table("stage", "pairs")
    for name, count in stages.items():
        table.add_row(name, f"{count:,}")
    return table


@app.command("q2q")
def q2q(
    k: int = typer.Option(1, help="Shared relevant products a candidate pair needs."),
    min_grade: float = typer.Option(None, help="Edge rule on the source's scale (default: the data set's)."),
    min_relevance: float = typer.Option(None, help="Edge rule on the [0, 1] scale, when no grade rule."),
    m1: bool = typer.Option(True, help="Verify graph pairs with the relevance model M1."),
    m1_threshold: float = typer.Option(0.7, help="Mean M1 score the partner's products need."),
    m1_max_products: int = typer.Option(3, help="Products scored per side of a pair."),
) -> None:
    """Build the Q2Q pairs into <cache_dir>/offline/q2q and report each stage's count."""
    from learner.offline.q2q import build_q2q
    from learner.offline.sft import quiet_libraries

    with progress_bars() as progress, quiet_libraries():
        task = progress.add_task("M1 verification", total=None)
        report = build_q2q(
            get_settings(),
            k=k,
            min_grade=min_grade,
            min_relevance=min_relevance,
            use_m1=m1,
            m1_threshold=m1_threshold,
            m1_max_products=m1_max_products,
            progress=lambda _s, done, total: progress.update(task, completed=done, total=total),
        )
    console.print(f"[bold]{report.dataset}[/]: {report.rule}, k={report.k}, verifier: {report.verifier}")
    console.print(_stage_table(report.stages))
    console.print(f"[green]written[/] {report.out_dir}")


@app.command("build")
def build(
    teacher_steps: int = typer.Option(60, help="SFT steps of the teacher."),
    student_steps: int = typer.Option(60, help="SFT steps of the student."),
    distill_steps: int = typer.Option(60, help="Reverse-KL distillation steps."),
    batch_size: int = typer.Option(8, help="Sequences per step (SFT and distillation)."),
    max_train_pairs: int = typer.Option(None, help="Cap on the training pairs sampled from."),
    eval_pairs: int = typer.Option(48, help="Evaluation pairs behind Table 2."),
    serving_queries: int = typer.Option(30, help="Queries timed for the serving-time median."),
    on_policy_fraction: float = typer.Option(0.0, help="Share of distillation steps on student samples."),
    k: int = typer.Option(1, help="Shared relevant products a Q2Q pair needs."),
    m1: bool = typer.Option(True, help="Verify Q2Q graph pairs with M1."),
    rebuild_q2q: bool = typer.Option(False, help="Rebuild Q2Q even when a matching build exists."),
    student_from: str = typer.Option("teacher", help="Cut the student from the SFT 'teacher' or 'vanilla'."),
    publish: bool = typer.Option(True, help="Publish MiniELM and move the alias."),
    publish_model: str = typer.Option(
        "best", help="Publish the 'student', the 'teacher', or the 'best' by evaluation cross-entropy."
    ),
    alias: str = typer.Option("production", help="Alias to point at the published MiniELM."),
    teacher_dir: Path = typer.Option(None, help="Teacher checkpoint (default: the prepared SmolLM2)."),
) -> None:
    """Q2Q → SFT teacher → student → SFT student → distil → evaluate → publish."""
    from learner.offline.build import OfflineConfig, build_minielm

    if student_from not in ("vanilla", "teacher"):
        raise typer.BadParameter("student-from must be 'vanilla' or 'teacher'")
    config = OfflineConfig(
        k=k,
        use_m1=m1,
        rebuild_q2q=rebuild_q2q,
        teacher_steps=teacher_steps,
        student_steps=student_steps,
        batch_size=batch_size,
        max_train_pairs=max_train_pairs,
        student_from=student_from,  # type: ignore[arg-type]
        distill_steps=distill_steps,
        on_policy_fraction=on_policy_fraction,
        eval_pairs=eval_pairs,
        serving_queries=serving_queries,
        publish=publish,
        publish_model=publish_model,  # type: ignore[arg-type]
        alias=alias,
        teacher_dir=teacher_dir,
    )
    with progress_bars() as progress:
        report = build_minielm(get_settings(), config=config, progress=progress)
    console.print(_stage_table(report.q2q["stages"]))
    console.print(report.table(), soft_wrap=True)
    serving = report.serving
    console.print(
        f"serving: T {serving['T']['median_s'] * 1000:.0f} ms, S {serving['S']['median_s'] * 1000:.0f} ms "
        f"per query (x{serving['T']['median_s'] / serving['S']['median_s']:.2f}); "
        f"GKD(beta=1) vs ours |diff| {report.gkd['abs_diff']:.2e}"
    )
    if report.version is not None:
        console.print(f"[green]published[/] {report.published} as version {report.version} ('{alias}')")
    console.print_json(json.dumps({"stages_s": report.stages_s, "training": report.training}))


@app.command("publish")
def publish(
    model: str = typer.Option("best", help="'student', 'teacher', or 'best' by evaluation cross-entropy."),
    alias: str = typer.Option("production", help="Alias to point at the published model."),
) -> None:
    """Publish from the finished build in <cache_dir>/offline without retraining."""
    from learner.offline.build import publish_existing

    report = publish_existing(get_settings(), model, alias)
    console.print(report.table(), soft_wrap=True)
    console.print(f"[green]published[/] {report.published} as version {report.version} ('{alias}')")


if __name__ == "__main__":
    app()
