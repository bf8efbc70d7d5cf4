"""The status page's two pictures, drawn server-side by matplotlib as SVG (text kept as text, so the page is
searchable and a browser test can read the labels): the version lineage as a graph, the reward per version.

``matplotlib.figure.Figure`` directly, never pyplot: pyplot keeps global state, which a web server's threads
would share.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from contextlib import AbstractContextManager

from matplotlib import rc_context
from matplotlib.figure import Figure

from qrloop.status import VersionReward, VersionView

STATUS_COLOURS = {"ready": "#2f6db3", "rejected": "#c0392b", "archived": "#9e9e9e"}
ALIAS_COLOURS = {"production": "#1e8449", "canary": "#d68910"}


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    text = buffer.getvalue()
    # The XML prologue and DOCTYPE are for files; inline SVG in HTML starts at <svg.
    return text[text.index("<svg") :]


def _text_as_text() -> AbstractContextManager[None]:
    # SVG text as <text> elements, not glyph outlines: smaller, searchable, readable by a browser test.
    return rc_context({"svg.fonttype": "none", "font.size": 9})


def lineage_positions(versions: Sequence[VersionView]) -> dict[int, tuple[int, int]]:
    """Version id → (generation, lane). A child continues its parent's lane when it is the first child; a
    second child (a branch: another learner, or a restart from an older version) opens a new lane."""
    shown = {v.id for v in versions}
    positions: dict[int, tuple[int, int]] = {}
    continued: set[int] = set()
    next_lane = 0
    for version in sorted(versions, key=lambda v: v.id):
        parent = version.parent_id if version.parent_id in shown else None
        if parent is not None and parent in positions and parent not in continued:
            generation, lane = positions[parent]
            positions[version.id] = (generation + 1, lane)
            continued.add(parent)
        elif parent is not None and parent in positions:
            positions[version.id] = (positions[parent][0] + 1, next_lane)
            next_lane += 1
        else:
            positions[version.id] = (0, next_lane)
            next_lane += 1
    return positions


def lineage_svg(versions: Sequence[VersionView]) -> str:
    """Nodes are versions (coloured by status), edges run parent → child, aliases stand on their node."""
    positions = lineage_positions(versions)
    lanes = max((lane for _, lane in positions.values()), default=0) + 1
    generations = max((g for g, _ in positions.values()), default=0) + 1
    label_every = max(1, generations // 25)  # beyond ~25 per row the labels would overlap
    with _text_as_text():
        figure = Figure(figsize=(min(12.0, 2.0 + 0.45 * generations), 1.2 + 0.7 * lanes))
        ax = figure.add_subplot()
        for version in versions:
            if version.parent_id in positions:
                (x0, y0), (x1, y1) = positions[version.parent_id], positions[version.id]
                ax.plot([x0, x1], [-y0, -y1], color="#888888", linewidth=1, zorder=1)
        for version in versions:
            x, y = positions[version.id]
            colour = STATUS_COLOURS.get(version.status, "#555555")
            ax.scatter([x], [-y], s=140, color=colour, edgecolor="white", zorder=2)
            if version.aliases or x % label_every == 0 or version.id == max(positions):
                ax.annotate(f"v{version.id}", (x, -y), textcoords="offset points", xytext=(0, -15),
                            ha="center", fontsize=8)  # fmt: skip
            for n, alias in enumerate(version.aliases):
                colour = ALIAS_COLOURS.get(alias, "#333333")
                ax.annotate(alias, (x, -y), textcoords="offset points", xytext=(0, 10 + 11 * n), ha="center",
                            fontsize=8, fontweight="bold", color=colour)  # fmt: skip
        ax.set_xlim(-0.7, generations - 0.3)
        ax.set_ylim(-lanes + 0.3, 1.0)
        ax.axis("off")
        for status, colour in STATUS_COLOURS.items():
            ax.scatter([], [], color=colour, label=status)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
        return _svg(figure)


def rewards_svg(rewards: Sequence[VersionReward]) -> str:
    """Mean reward of the queries each version served, with the number of queries on each bar."""
    with _text_as_text():
        figure = Figure(figsize=(7.0, 2.6))
        ax = figure.add_subplot()
        labels = ["–" if r.version is None else f"v{r.version}" for r in rewards]
        bars = ax.bar(labels, [r.mean_reward for r in rewards], color="#2f6db3")
        for bar, reward in zip(bars, rewards, strict=True):
            ax.annotate(f"n={reward.queries}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)  # fmt: skip
        ax.set_ylabel("mean reward per query")
        ax.set_xlabel("serving version")
        ax.spines[["top", "right"]].set_visible(False)
        return _svg(figure)
