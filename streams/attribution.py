"""The aggregator's decisions as pure functions: join, attribution window, de-duplication, scoring.

Nothing here touches Kafka or Faust, so every rule is tested with plain values. The Faust agents in
``streams/aggregator.py`` only move these JSON-able states in and out of a changelog-backed table.

Semantics (all times are *event* times, so a replay at any speed decides exactly as the live run did):

- A query's **attribution window** is ``[t_query − skew, t_query + window]``. An interaction whose event time
  falls outside it is not attributed to the query (counted as ``outside_window``, dropped). The small
  ``skew`` (``event_time.attribution_skew_s``) forgives the front end's clock being a little behind the
  rewriter's: a click stamped a second before its query was still caused by it.
- The window **closes** when the stream's watermark (the largest event time seen, see ``Watermark``) passes
  ``t_query + window + grace``; the grace lets out-of-order deliveries still count. It closes **early** when
  the shopper's ``SessionEnd`` has arrived and every interaction it announced is in.
- An interaction arriving after its query closed is **late**: counted and dropped (the pair is already out).
- The same (list, product, kind) counts once, whatever the transport duplicated.
- Interactions may arrive before their query event (the two topics are independent); they wait in the
  state until it arrives. A state whose query never arrives is an *orphan* and goes to the dead-letter topic
  when it expires.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qrloop import rewards
from qrloop.events import Interaction, PreferencePair, QueryEvent, QueryOutcome, SessionEnd, pair_id_for
from qrloop.settings import RewardSettings

State = dict[str, Any]
Outcome = Literal["counted", "duplicate", "outside_window", "late"]
ORIGINAL = "original"
KINDS = ("impression", "click", "add_to_cart", "purchase")


def new_state(now_wall: float | None = None) -> State:
    return {
        "status": "open",
        "query": None,
        "seen": {},
        "expected": None,
        "created_wall": time.time() if now_wall is None else now_wall,
        "counts": {"duplicate": 0, "outside_window": 0, "late": 0},
    }


def _ts(when: Any) -> float:
    return float(when.timestamp())


def apply_query(state: State, event: QueryEvent, window_s: float, skew_s: float = 0.0) -> State:
    """Attach the query event. A duplicated query event changes nothing (the first one wins)."""
    if state["query"] is None:
        state["query"] = event.model_dump(mode="json")
        state["t_query"] = _ts(event.event_time)
        # Interactions that came first were held without a window to test; test them now.
        pending = state.pop("pending", {})
        for key, t_event in pending.items():
            if _within(state, t_event, window_s, skew_s):
                state["seen"][key] = t_event
            else:
                state["counts"]["outside_window"] += 1
    return state


def _key(interaction: Interaction) -> str:
    return f"{interaction.rewrite_id}|{interaction.product_id}|{interaction.kind}"


def _within(state: State, t_event: float, window_s: float, skew_s: float = 0.0) -> bool:
    t_query = state["t_query"]
    return t_query - skew_s <= t_event <= t_query + window_s


def apply_interaction(
    state: State, interaction: Interaction, window_s: float, skew_s: float = 0.0
) -> Outcome:
    """Count one interaction into the state; say what happened to it."""
    if state["status"] == "closed":
        state["counts"]["late"] += 1
        return "late"
    key = _key(interaction)
    t_event = _ts(interaction.event_time)
    if key in state["seen"] or key in state.get("pending", {}):
        state["counts"]["duplicate"] += 1
        return "duplicate"
    if state["query"] is None:
        state.setdefault("pending", {})[key] = t_event
        return "counted"
    if not _within(state, t_event, window_s, skew_s):
        state["counts"]["outside_window"] += 1
        return "outside_window"
    state["seen"][key] = t_event
    return "counted"


def apply_session_end(state: State, end: SessionEnd) -> State:
    state["expected"] = end.interactions_sent
    return state


def received(state: State) -> int:
    """Distinct interactions received for this query, whether attributed or outside its window."""
    return len(state["seen"]) + len(state.get("pending", {})) + state["counts"]["outside_window"]


def is_complete(state: State) -> bool:
    return (
        state["query"] is not None and state["expected"] is not None and received(state) >= state["expected"]
    )


def is_due(state: State, watermark: float, window_s: float, grace_s: float) -> bool:
    """Closed by time: the watermark has passed the window plus the grace period."""
    if state["query"] is None or state["status"] == "closed":
        return False
    return watermark > state["t_query"] + window_s + grace_s


def is_orphan(state: State, now_wall: float, orphan_after_s: float) -> bool:
    """Interactions whose query event never came, after waiting long enough in wall-clock time.

    Only an *open* window can be an orphan: a closed window's tombstone also has no query (it is dropped to
    keep the tombstone small), and purging it as an orphan let a re-delivered query event open the window
    again and emit a second, different pair for the same query.
    """
    return (
        state["status"] == "open"
        and state["query"] is None
        and now_wall - state["created_wall"] > orphan_after_s
    )


@dataclass(frozen=True)
class ListFeedback:
    """Distinct products of one list that received each kind of interaction."""

    impressions: frozenset[str] = field(default_factory=frozenset)
    clicks: frozenset[str] = field(default_factory=frozenset)
    add_to_carts: frozenset[str] = field(default_factory=frozenset)
    purchases: frozenset[str] = field(default_factory=frozenset)


def feedback_by_list(state: State) -> dict[str, ListFeedback]:
    grouped: dict[str, dict[str, set[str]]] = {}
    for key in state["seen"]:
        list_key, product_id, kind = key.split("|", 2)
        grouped.setdefault(list_key, {k: set() for k in KINDS})[kind].add(product_id)
    return {
        list_key: ListFeedback(
            frozenset(kinds["impression"]),
            frozenset(kinds["click"]),
            frozenset(kinds["add_to_cart"]),
            frozenset(kinds["purchase"]),
        )
        for list_key, kinds in grouped.items()
    }


RelevanceFn = Callable[[str, Sequence[str]], Sequence[float]]


def _nothing_to_prepare(_queries: Sequence[str]) -> None:
    return None


@dataclass(frozen=True)
class CalibratedRelevance:
    """A relevance function with the gain's threshold that belongs to its scale (M1 and its calibration),
    and ``prepare``, which encodes a batch of queries ahead of their windows' scoring (M1's
    :meth:`~qrloop.relevance.RelevanceModel.prepare`; a no-op for a function that encodes nothing)."""

    score: RelevanceFn
    relevant_above: float
    prepare: Callable[[Sequence[str]], None] = _nothing_to_prepare

    def __call__(self, query: str, product_ids: Sequence[str]) -> Sequence[float]:
        return self.score(query, product_ids)


@dataclass(frozen=True)
class Scored:
    """What closing one query produced: a pair, or a tie (counted, never emitted)."""

    event_id: str
    first: rewards.RewardComponents
    second: rewards.RewardComponents
    first_reward: float
    second_reward: float
    preference: rewards.Preference
    pair: PreferencePair | None


def _components(
    event: QueryEvent,
    index: int,
    feedback: dict[str, ListFeedback],
    relevance: RelevanceFn,
    relevant_above: float,
) -> rewards.RewardComponents:
    rewrite = event.rewrites[index]
    got = feedback.get(rewrite.rewrite_id, ListFeedback())
    return rewards.rewrite_components(
        query=event.query,
        rewrite=rewrite.text,
        original_products=event.original_products,
        rewrite_products=rewrite.products,
        relevance_scores=list(relevance(event.query, rewrite.products)),
        feedback=rewards.Feedback(got.clicks, got.add_to_carts, got.purchases),
        relevant_above=relevant_above,
    )


def threshold(weights: RewardSettings, relevance: RelevanceFn) -> float:
    """τ of the gain: ``rewards.relevant_above`` when configured, else the one calibrated with M1."""
    if weights.relevant_above is not None:
        return weights.relevant_above
    if isinstance(relevance, CalibratedRelevance):
        return relevance.relevant_above
    raise ValueError(
        "rewards.relevant_above is not set and the relevance function has no calibrated threshold: "
        "streams.aggregator.make_relevance_fn calibrates one for M1; another relevance function needs "
        "RewardSettings(relevant_above=...) or CalibratedRelevance(fn, relevant_above)"
    )


def score(state: State, relevance: RelevanceFn, weights: RewardSettings) -> Scored:
    """Score both rewrites and decide the preference by ``weights.ranking``'s scalar (default: the gain).

    Not a pair: two rewrites that normalise to the same text (DPO would learn nothing), and, by the gain's
    construction, never one whose chosen side is an echo of the query (its gain is 0, the floor of all gains;
    checked here too, so a 'paper' ranking cannot teach the echo either).
    """
    event = QueryEvent.model_validate(state["query"])
    feedback = feedback_by_list(state)
    tau = threshold(weights, relevance)
    first, second = (_components(event, i, feedback, relevance, tau) for i in (0, 1))
    first_reward, second_reward = first.scalar(weights), second.scalar(weights)
    preference = rewards.prefer(first_reward, second_reward, weights.margin)
    texts = [r.text for r in event.rewrites]
    if rewards.same_text(*texts):
        preference = "tie"  # the same text as chosen and rejected teaches DPO nothing
    elif preference != "tie" and rewards.is_echo(event.query, texts[0 if preference == "first" else 1]):
        preference = "tie"  # the query itself is never the lesson: copying it adds nothing
    pair = None
    if preference != "tie":
        chosen_i = 0 if preference == "first" else 1
        chosen, rejected = event.rewrites[chosen_i], event.rewrites[1 - chosen_i]
        chosen_c, rejected_c = (first, second) if chosen_i == 0 else (second, first)
        chosen_r, rejected_r = (
            (first_reward, second_reward) if chosen_i == 0 else (second_reward, first_reward)
        )
        pair = PreferencePair(
            pair_id=pair_id_for(event.event_id),
            prompt=event.query,
            hints=event.hints,
            chosen=chosen.text,
            rejected=rejected.text,
            chosen_reward=chosen_r,
            rejected_reward=rejected_r,
            chosen_components=chosen_c.as_dict(),
            rejected_components=rejected_c.as_dict(),
            policy_version=event.policy_version,
            arm=event.arm,
            source_event_id=event.event_id,
            event_time=event.event_time,
        )
    return Scored(event.event_id, first, second, first_reward, second_reward, preference, pair)


def outcome(state: State, scored: Scored) -> QueryOutcome:
    """The query's per-arm sample for the canary: emitted for every scored query, ties included.

    Built from the state's JSON form of the query event (``score`` has validated it already).
    """
    query = state["query"]
    rewrites = query["rewrites"]
    logprobs = [float(r["logprob"]) for r in rewrites]
    references = [r.get("reference_logprob") for r in rewrites]
    # log π_served − log π_production of the served tokens: its mean estimates KL(canary ‖ production).
    kl = (
        sum(lp - ref for lp, ref in zip(logprobs, references, strict=True)) / len(logprobs)
        if all(ref is not None for ref in references)
        else None
    )
    return QueryOutcome(
        query_event_id=scored.event_id,
        event_time=query["event_time"],
        policy_version=query["policy_version"],
        arm=query.get("arm", "production"),
        reward=(scored.first_reward + scored.second_reward) / 2,
        relevance=(scored.first.relevance + scored.second.relevance) / 2,
        rewards=[scored.first_reward, scored.second_reward],
        logprobs=logprobs,
        kl_to_reference=kl,
        tie=scored.pair is None,
    )


def close(state: State, now_wall: float | None = None) -> State:
    """Turn a scored state into a tombstone that still recognises late interactions for a while."""
    return {
        "status": "closed",
        "query": None,
        "seen": {},
        "expected": None,
        "created_wall": state["created_wall"],
        "closed_wall": time.time() if now_wall is None else now_wall,
        "counts": state["counts"],
    }


def tombstone_expired(state: State, now_wall: float, keep_s: float) -> bool:
    return state["status"] == "closed" and now_wall - state["closed_wall"] > keep_s


class Watermark:
    """Stream time: the largest event time seen, advanced by wall-clock time while the stream is idle.

    Idle advancement closes the last windows of a finished stream (the end of a demo, a quiet night) without
    waiting for the next event; while events flow, only their own times move the watermark, so a fast
    replay closes windows exactly where the live run did.
    """

    def __init__(self, idle_after_s: float = 2.0) -> None:
        self.event_time = 0.0
        self.wall_at_last_event = time.time()
        self.idle_after_s = idle_after_s

    def observe(self, event_time: float, now_wall: float | None = None) -> None:
        self.event_time = max(self.event_time, event_time)
        self.wall_at_last_event = time.time() if now_wall is None else now_wall

    def current(self, now_wall: float | None = None) -> float:
        now = time.time() if now_wall is None else now_wall
        idle = now - self.wall_at_last_event
        return self.event_time + (idle - self.idle_after_s if idle > self.idle_after_s else 0.0)
