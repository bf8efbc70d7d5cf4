"""The aggregator's pure decisions: join, window, duplicates, late and early events, scoring."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from qrloop import rewards
from qrloop.events import Interaction, QueryEvent, Rewrite, SessionEnd, pair_id_for
from qrloop.settings import RewardSettings
from streams import attribution

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
WINDOW = 30.0
GRACE = 10.0


def query_event(event_id: str = "q-1") -> QueryEvent:
    return QueryEvent(
        event_id=event_id,
        event_time=T0,
        shopper_id="s-1",
        session_id="sess-1",
        query="angle bracket",
        policy_version=3,
        arm="production",
        original_products=["p1", "p2", "p3", "p4"],
        rewrites=[
            Rewrite(
                rewrite_id="r1", text="metal angle bracket", logprob=-4.0, products=["p1", "p5", "p6", "p7"]
            ),
            Rewrite(rewrite_id="r2", text="bracket", logprob=-2.5, products=["p1", "p2", "p8", "p9"]),
        ],
    )


def interaction(rewrite_id: str, product_id: str, kind: str, after_s: float, n: int = 0) -> Interaction:
    return Interaction(
        event_id=f"i-{rewrite_id}-{product_id}-{kind}-{n}",
        query_event_id="q-1",
        rewrite_id=rewrite_id,
        product_id=product_id,
        position=0,
        kind=kind,
        event_time=T0 + timedelta(seconds=after_s),
    )


def relevance_table(_query: str, product_ids: Sequence[str]) -> list[float]:
    # p1..p4 relevant to the query, the rest not: a hand-checkable M1.
    return [1.0 if pid in {"p1", "p2", "p3", "p4", "p5"} else 0.0 for pid in product_ids]


def open_state() -> attribution.State:
    return attribution.apply_query(attribution.new_state(now_wall=0.0), query_event(), WINDOW)


def test_counts_within_the_window_and_drops_duplicates() -> None:
    state = open_state()
    assert attribution.apply_interaction(state, interaction("r1", "p5", "click", 3), WINDOW) == "counted"
    assert (
        attribution.apply_interaction(state, interaction("r1", "p5", "click", 4, n=1), WINDOW) == "duplicate"
    )
    assert (
        attribution.apply_interaction(state, interaction("r1", "p6", "click", WINDOW + 1), WINDOW)
        == "outside_window"
    )
    assert (
        attribution.apply_interaction(state, interaction("r1", "p6", "click", -1), WINDOW) == "outside_window"
    )
    feedback = attribution.feedback_by_list(state)
    assert feedback["r1"].clicks == frozenset({"p5"})
    assert state["counts"] == {"duplicate": 1, "outside_window": 2, "late": 0}


def test_interactions_before_their_query_wait_for_it() -> None:
    state = attribution.new_state(now_wall=0.0)
    assert attribution.apply_interaction(state, interaction("r2", "p8", "click", 5), WINDOW) == "counted"
    assert attribution.apply_interaction(state, interaction("r2", "p9", "click", 99), WINDOW) == "counted"
    assert not attribution.is_due(state, watermark=1e12, window_s=WINDOW, grace_s=GRACE), "no query yet"
    assert attribution.is_orphan(state, now_wall=121.0, orphan_after_s=120.0)
    attribution.apply_query(state, query_event(), WINDOW)
    assert attribution.feedback_by_list(state)["r2"].clicks == frozenset({"p8"})
    assert state["counts"]["outside_window"] == 1, (
        "the one past the window is dropped once the query is known"
    )
    assert not attribution.is_orphan(state, now_wall=1e9, orphan_after_s=120.0)


def test_closes_by_watermark_after_window_plus_grace() -> None:
    state = open_state()
    t_query = T0.timestamp()
    assert not attribution.is_due(state, t_query + WINDOW + GRACE - 0.1, WINDOW, GRACE)
    assert attribution.is_due(state, t_query + WINDOW + GRACE + 0.1, WINDOW, GRACE)


def test_closes_early_when_all_announced_feedback_is_in() -> None:
    state = open_state()
    attribution.apply_interaction(state, interaction("r1", "p5", "impression", 1), WINDOW)
    end = SessionEnd(query_event_id="q-1", shopper_id="s-1", interactions_sent=2, event_time=T0)
    attribution.apply_session_end(state, end)
    assert not attribution.is_complete(state)
    attribution.apply_interaction(state, interaction("r1", "p5", "click", 2), WINDOW)
    assert attribution.is_complete(state)


def test_late_events_after_close_are_counted_and_dropped() -> None:
    state = attribution.close(open_state(), now_wall=10.0)
    assert attribution.apply_interaction(state, interaction("r1", "p5", "click", 3), WINDOW) == "late"
    assert state["counts"]["late"] == 1
    assert not attribution.tombstone_expired(state, now_wall=100.0, keep_s=300.0)
    assert attribution.tombstone_expired(state, now_wall=400.0, keep_s=300.0)
    # A tombstone has no query either, but it is not an orphan: purging it early would let a re-delivered
    # query event open the window again and emit a second pair for the same query.
    assert not attribution.is_orphan(state, now_wall=400.0, orphan_after_s=120.0)


def test_score_matches_hand_computed_rewards() -> None:
    state = open_state()
    for item in (
        interaction("r1", "p5", "click", 1),
        interaction("r1", "p5", "add_to_cart", 2),
        interaction("r1", "p6", "click", 3),
        interaction("r2", "p1", "click", 2),
        interaction("r2", "p7", "click", 2),  # p7 is not in r2's list: not attributable to r2
    ):
        attribution.apply_interaction(state, item, WINDOW)
    weights = RewardSettings(
        relevance=1, diversity=1, click=1, add2cart=1, purchase=1, margin=0.01, relevant_above=0.5
    )
    scored = attribution.score(state, relevance_table, weights)
    # r1: products p1,p5,p6,p7 -> relevance 2/4; diversity (4 - |{p1}|)/4 = 0.75; clicks 2/4; a2c 1/4.
    # Gain: new p5 (1.0), p6, p7 (0.0): novelty 1/4; engagement on new products: p5 click + cart, p6 click.
    assert scored.first == rewards.RewardComponents(0.5, 0.75, 0.5, 0.25, 0.0, 0.25, 3 / 3 / 4)
    # r2: p1,p2,p8,p9 -> relevance 2/4; diversity (4 - 2)/4 = 0.5; clicks 1/4 (p7 ignored). Its new products
    # p8, p9 are irrelevant and its click was on p1, which the original showed: it adds nothing.
    assert scored.second == rewards.RewardComponents(0.5, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0)
    assert scored.first_reward == pytest.approx((0.25 + 0.25) / 2), "DPO ranks by the gain"
    assert scored.second_reward == 0.0
    assert scored.preference == "first"
    pair = scored.pair
    assert pair is not None
    assert (pair.chosen, pair.rejected) == ("metal angle bracket", "bracket")
    assert pair.pair_id == pair_id_for("q-1")
    assert pair.chosen_components["diversity"] == 0.75 and pair.chosen_components["novelty"] == 0.25
    assert pair.policy_version == 3
    paper = attribution.score(state, relevance_table, weights.model_copy(update={"ranking": "paper"}))
    assert paper.first_reward == pytest.approx((0.5 + 0.75 + 0.5 + 0.25) / 5), "the paper's scalar on request"


def test_tie_emits_no_pair() -> None:
    state = open_state()
    weights = RewardSettings(diversity=0, margin=0.05, relevant_above=0.5, ranking="paper")
    scored = attribution.score(state, relevance_table, weights)
    assert scored.preference == "tie" and scored.pair is None


def scored_with(texts: tuple[str, str], weights: RewardSettings) -> attribution.Scored:
    """Score the standard event with other rewrite texts (the same lists, no interactions)."""
    event = query_event()
    rewrites = [r.model_copy(update={"text": t}) for r, t in zip(event.rewrites, texts, strict=True)]
    state = attribution.apply_query(
        attribution.new_state(now_wall=0.0), event.model_copy(update={"rewrites": rewrites}), WINDOW
    )
    return attribution.score(state, relevance_table, weights)


def test_an_echo_is_never_chosen() -> None:
    weights = RewardSettings(relevant_above=0.5, margin=0.0)
    # r1 adds a relevant product (p5): chosen over the echo, which gains exactly 0.
    scored = scored_with(("metal angle bracket", "Angle Bracket"), weights)
    assert scored.second_reward == 0.0 and scored.preference == "first"
    assert scored.pair is not None and scored.pair.rejected == "Angle Bracket"
    # Even where a rewrite *would* score above: under the paper's scalar r1 (relevance 2/4, diversity 3/4)
    # beats r2 (2/4, 2/4), but r1's text is the query itself, so it is no lesson: a tie, not a pair.
    paper = weights.model_copy(update={"ranking": "paper"})
    assert scored_with(("metal angle bracket", "bracket"), paper).preference == "first"
    echo_first = scored_with(("angle  BRACKET", "bracket"), paper)
    assert echo_first.first_reward > echo_first.second_reward
    assert echo_first.preference == "tie" and echo_first.pair is None
    # Under the gain an echo cannot even score above anything (all gains are >= 0, an echo's is 0).
    assert scored_with(("angle bracket", "bracket"), weights).preference == "tie"


def test_two_rewrites_of_the_same_text_are_no_pair() -> None:
    weights = RewardSettings(relevant_above=0.5, margin=0.0, ranking="paper")
    # Different lists (a stale index, say), so different rewards, but the same text: DPO learns nothing.
    scored = scored_with(("Metal angle bracket", "metal  angle bracket"), weights)
    assert scored.first_reward != scored.second_reward and scored.pair is None


def test_an_unset_threshold_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="relevant_above"):
        attribution.score(open_state(), relevance_table, RewardSettings())


def test_watermark_follows_event_time_then_the_clock_when_idle() -> None:
    mark = attribution.Watermark(idle_after_s=2.0)
    mark.observe(1000.0, now_wall=50.0)
    mark.observe(990.0, now_wall=51.0)  # out of order: never moves back
    assert mark.current(now_wall=52.0) == 1000.0
    assert mark.current(now_wall=56.0) == pytest.approx(1003.0), "idle for 5 s: 3 s past the idle threshold"
