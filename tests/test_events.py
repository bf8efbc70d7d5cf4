"""Event schemas: round trips, and every way a message can be wrong gives a SchemaError with its reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from qrloop.events import (
    DeadLetter,
    Interaction,
    PolicyAnnouncement,
    PreferencePair,
    QueryEvent,
    Rewrite,
    SchemaError,
    SessionEnd,
    decode,
    decode_feedback,
    encode,
    pair_id_for,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def query_event(**changes: object) -> QueryEvent:
    fields: dict[str, object] = {
        "event_id": "e1",
        "event_time": NOW,
        "shopper_id": "s",
        "session_id": "x",
        "query": "angle bracket",
        "policy_version": 1,
        "arm": "production",
        "original_products": ["1", "2"],
        "rewrites": [
            Rewrite(rewrite_id="r1", text="a", logprob=-1.0, products=["1"]),
            Rewrite(rewrite_id="r2", text="b", logprob=-2.0, products=[]),
        ],
    }
    fields.update(changes)
    return QueryEvent(**fields)  # type: ignore[arg-type]


EXAMPLES = [
    query_event(),
    Interaction(
        event_id="i",
        query_event_id="e1",
        rewrite_id="r1",
        product_id="1",
        position=0,
        kind="click",
        event_time=NOW,
    ),
    SessionEnd(query_event_id="e1", shopper_id="s", interactions_sent=3, event_time=NOW),
    PreferencePair(
        pair_id=pair_id_for("e1"),
        prompt="q",
        chosen="a",
        rejected="b",
        chosen_reward=0.5,
        rejected_reward=0.2,
        chosen_components={"click": 0.5},
        rejected_components={"click": 0.0},
        policy_version=1,
        source_event_id="e1",
        event_time=NOW,
    ),
    PolicyAnnouncement(kind="alias_moved", version=3, alias="production", previous_version=2, at=NOW),
    DeadLetter(
        source_topic="t", partition=0, offset=5, reason="malformed_json", error="x", original="e30=", at=NOW
    ),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip(event: object) -> None:
    assert decode(type(event), encode(event)) == event  # type: ignore[arg-type]


def test_feedback_topic_tells_interactions_from_session_ends() -> None:
    assert isinstance(decode_feedback(encode(EXAMPLES[1])), Interaction)  # type: ignore[arg-type]
    assert isinstance(decode_feedback(encode(EXAMPLES[2])), SessionEnd)  # type: ignore[arg-type]
    with pytest.raises(SchemaError) as err:
        decode_feedback(encode(EXAMPLES[0]))  # a query event on the wrong topic
    assert err.value.reason == "invalid_schema"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (None, "malformed_json"),
        (b"[1, 2]", "invalid_schema"),
        (json.dumps({"event_id": "e1"}).encode(), "invalid_schema"),
        (json.dumps({**json.loads(encode(EXAMPLES[0])), "surprise": 1}).encode(), "invalid_schema"),
        (
            json.dumps({**json.loads(encode(EXAMPLES[0])), "schema_version": 99}).encode(),
            "unsupported_version",
        ),
    ],
    ids=["truncated", "binary", "empty", "array", "missing-fields", "extra-field", "future-version"],
)
def test_bad_messages(raw: bytes | None, reason: str) -> None:
    with pytest.raises(SchemaError) as err:
        decode(QueryEvent, raw)
    assert err.value.reason == reason


def test_query_event_needs_exactly_two_rewrites() -> None:
    one = [Rewrite(rewrite_id="r1", text="a", logprob=-1.0, products=[])]
    with pytest.raises(ValueError, match="rewrites"):
        query_event(rewrites=one)
    with pytest.raises(ValueError, match="rewrites"):
        query_event(rewrites=one * 3)


def test_pair_ids_are_deterministic_and_distinct() -> None:
    assert pair_id_for("e1") == pair_id_for("e1")
    assert len({pair_id_for(f"e{i}") for i in range(1000)}) == 1000
