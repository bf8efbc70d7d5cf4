"""``qrloop status``: the status page's summary in the terminal, on one screen, readable at 80 columns and
in a pipe (rich sizes tables to the console; columns truncate with an ellipsis rather than wrap)."""

from __future__ import annotations

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from qrloop.cli.ui.format import number as _num
from qrloop.settings import Settings
from qrloop.status import Summary

VERDICT_STYLES = {"promote": "green", "rollback": "red"}


def compact_table(title: str, *columns: str) -> Table:
    """A borderless table whose cells never wrap onto a second line (a narrow console truncates them with an
    ellipsis), except the last column, free text, which folds."""
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0)
    )
    for n, column in enumerate(columns):
        last = n == len(columns) - 1
        table.add_column(
            column, no_wrap=not last, overflow="fold" if last else "ellipsis", min_width=16 if last else None
        )
    return table


def _v(version: int | None) -> str:
    return "–" if version is None else f"v{version}"


def lineage_line(summary: Summary, limit: int = 12) -> Text:
    """The newest version's ancestry among the versions shown: ``v9 ← v8 ← ... ← v1``."""
    if not summary.versions:
        return Text("no versions published yet", style="dim")
    by_id = {v.id: v for v in summary.versions}
    chain, current = [], summary.versions[0]
    while True:
        chain.append(current)
        parent = by_id.get(current.parent_id) if current.parent_id is not None else None
        if parent is None or len(chain) >= limit:
            break
        current = parent
    text = Text(f"{len(summary.versions)} versions; lineage of the newest: ")
    for n, version in enumerate(chain):
        style = "red" if version.status == "rejected" else "bold" if version.aliases else ""
        text.append(f"v{version.id}" + (f"[{','.join(version.aliases)}]" if version.aliases else ""), style)
        if n < len(chain) - 1:
            text.append(" ← ")
    if chain[-1].parent_id is not None:
        text.append(" ← …")
    return text


def alias_table(summary: Summary, moves: int = 5) -> Table:
    table = compact_table("aliases (latest moves)", "at (UTC)", "alias", "move", "action", "reason")
    for m in summary.alias_moves[:moves]:
        style = "red" if m.action == "rollback" else ""
        table.add_row(
            m.at.strftime("%m-%d %H:%M:%S"), m.alias, f"{_v(m.from_version)} → {_v(m.to_version)}",
            m.action, m.reason, style=style,
        )  # fmt: skip
    return table


def canary_lines(summary: Summary, settings: Settings, verdicts: int = 3) -> Group:
    c, config = summary.canary, settings.canary
    state = (
        f"live at {c['share']:.0%}, {c.get('analyses', 0)}/{config.max_analyses} analyses"
        if c.get("live")
        else "no canary being served"
    )
    head = Text(f"canary: {config.production_alias} → {_v(c.get('production'))}, ")
    head.append(f"{config.canary_alias} → {_v(c.get('canary'))}; {state}")
    table = compact_table("", "at (UTC)", "ver", "verdict", "n p/c", "reward p/c", "p", "reason")
    for v in c.get("verdicts", [])[:verdicts]:
        verdict = str(v.get("verdict"))
        table.add_row(
            str(v["at"])[11:19], _v(v.get("version")), Text(verdict, VERDICT_STYLES.get(verdict, "yellow")),
            f"{_num(v.get('n_production'), 'd')}/{_num(v.get('n_canary'), 'd')}",
            f"{_num(v.get('mean_production'), '.3g')}/{_num(v.get('mean_canary'), '.3g')}",
            _num(v.get("p_value"), ".2g"), str(v.get("reason", "")),
        )  # fmt: skip
    return Group(head, table) if table.row_count else Group(head)


def kafka_lines(summary: Summary) -> Group:
    lag = compact_table("", "lag", "committed/end", "group", "topic:partition")
    for p in summary.lag:
        committed = "–" if p.committed is None else str(p.committed)
        style = "yellow" if p.lag else ""
        lag.add_row(str(p.lag), f"{committed}/{p.end}", p.group, f"{p.topic}:{p.partition}", style=style)
    rewards = " ".join(f"{_v(r.version)} {r.mean_reward:.3g} (n={r.queries})" for r in summary.rewards[-6:])
    letters = summary.dead_letters
    reasons = ", ".join(f"{k} {n}" for k, n in letters.by_reason.items())
    parts: list[Text | Table] = [
        Text(f"reward per serving version: {rewards or 'no query outcomes yet'}"),
        Text(f"consumer lag: {summary.total_lag} in total"),
    ]
    if lag.row_count:
        parts.append(lag)
    parts.append(
        Text(
            f"dead letters: {letters.total}" + (f" (latest by reason: {reasons})" if reasons else ""),
            style="red" if letters.total else "",
        )
    )
    return Group(*parts)


def render(summary: Summary, settings: Settings, console: Console) -> None:
    console.print(
        f"[bold]qrloop status[/] {summary.generated_at:%Y-%m-%d %H:%M:%S} UTC  store {summary.database}",
        overflow="ellipsis",
        no_wrap=True,
    )
    for error in summary.errors:
        console.print(f"[red]{error}[/]", overflow="ellipsis", no_wrap=True)
    console.print(lineage_line(summary))
    if summary.alias_moves:
        console.print(alias_table(summary))
    else:
        console.print(Text("no alias moves yet", style="dim"))
    console.print(canary_lines(summary, settings))
    console.print(kafka_lines(summary))
