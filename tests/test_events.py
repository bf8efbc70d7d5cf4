"""Event schemas: round trips, keys, and every way a message can be wrong gives a SchemaError and reason."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from qrloop.events import (
    DeadLetter,
    Event,
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
EVENT_ID = "0b7e6a52-3c1f-4d57-9b55-2f0d3f3c9a10"


def rewrites(n: int = 2) -> list[Rewrite]:
    return [
        Rewrite(rewrite_id=f"r{i + 1}", text=f"rewrite {i}", logprob=-1.5 - i, products=[f"p{i}", "p9"])
        for i in range(n)
    ]


def query_event(**changes: Any) -> QueryEvent:
    fields: dict[str, Any] = {
        "event_id": EVENT_ID,
        "event_time": NOW,
        "shopper_id": "shopper-1",
        "session_id": "session-1",
        "query": "angle bracket",
        "policy_version": 1,
        "arm": "canary",
        "original_products": ["p1", "p2"],
        "rewrites": rewrites(),
    }
    fields.update(changes)
    return QueryEvent(**fields)


def pair(**changes: Any) -> PreferencePair:
    fields: dict[str, Any] = {
        "pair_id": pair_id_for(EVENT_ID),
        "prompt": "cordless drill",
        "chosen": "20v cordless drill driver kit",
        "rejected": "drill",
        "chosen_reward": 0.61,
        "rejected_reward": 0.2,
        "chosen_components": {
            "relevance": 0.9,
            "diversity": 0.5,
            "click": 0.3,
            "add2cart": 0.1,
            "purchase": 0,
        },
        "rejected_components": {
            "relevance": 0.4,
            "diversity": 0.0,
            "click": 0.0,
            "add2cart": 0.0,
            "purchase": 0,
        },
        "policy_version": None,
        "arm": "production",
        "source_event_id": EVENT_ID,
        "event_time": NOW,
    }
    fields.update(changes)
    return PreferencePair(**fields)


INTERACTION = Interaction(
    event_id="i-1",
    query_event_id=EVENT_ID,
    rewrite_id="original",
    product_id="p1",
    position=0,
    kind="add_to_cart",
    event_time=NOW + timedelta(seconds=3),
)
SESSION_END = SessionEnd(query_event_id=EVENT_ID, shopper_id="shopper-1", interactions_sent=3, event_time=NOW)
ANNOUNCEMENT = PolicyAnnouncement(
    kind="canary_verdict", version=3, alias="canary", previous_version=2, details={"pass": True}, at=NOW
)
LETTER = DeadLetter.of("qrloop.interactions", 2, 41, "malformed_json", "Expecting value", b"\x00{not json")
EXAMPLES: list[Event] = [query_event(), INTERACTION, SESSION_END, pair(), ANNOUNCEMENT, LETTER]


def with_field(event: Event, **changes: Any) -> bytes:
    """The event's JSON with fields replaced (or removed, for a value of ...), bypassing construction."""
    payload = json.loads(encode(event))
    for name, value in changes.items():
        if value is ...:
            payload.pop(name)
        else:
            payload[name] = value
    return json.dumps(payload).encode()


def reason_of(cls: type[Event], raw: bytes | None) -> str:
    with pytest.raises(SchemaError) as err:
        decode(cls, raw)
    return err.value.reason


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip(event: Event) -> None:
    raw = encode(event)
    assert json.loads(raw)["schema_version"] == 1
    back = decode(type(event), raw)
    assert back == event
    assert encode(back) == raw, "re-encoding is byte-identical"


def test_keys_put_a_query_and_its_feedback_on_one_partition() -> None:
    assert query_event().kafka_key() == EVENT_ID.encode()
    assert INTERACTION.kafka_key() == EVENT_ID.encode()
    assert SESSION_END.kafka_key() == EVENT_ID.encode()
    assert pair().kafka_key() == pair_id_for(EVENT_ID).encode()
    assert ANNOUNCEMENT.kafka_key() == b"3"
    letter: Event = LETTER  # DeadLetter.kafka_key is typed "-> None"; ask through the base class's signature
    assert letter.kafka_key() is None


def test_dead_letter_keeps_the_original_bytes() -> None:
    assert decode(DeadLetter, encode(LETTER)).original_bytes() == b"\x00{not json"
    with pytest.raises(ValidationError, match="base64"):
        DeadLetter(source_topic="t", partition=0, offset=0, reason="x", error="y", original="not base64!")


def test_timestamps_are_normalised_to_utc_and_must_be_aware() -> None:
    plus_two = timezone(timedelta(hours=2))
    raw = with_field(INTERACTION, event_time=datetime(2026, 11, 23, 14, 0, 3, tzinfo=plus_two).isoformat())
    decoded = decode(Interaction, raw)
    assert decoded.event_time == INTERACTION.event_time
    assert decoded.event_time.utcoffset() == timedelta(0)
    assert (
        reason_of(Interaction, with_field(INTERACTION, event_time="2026-11-23T12:00:03")) == "invalid_schema"
    )
    with pytest.raises(ValidationError, match="timezone"):
        query_event(event_time=datetime(2026, 11, 23, 12, 0))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"schema_version": 1, "event_id": ', "malformed_json"),
        (b"\xff\xfe\x00", "malformed_json"),
        (b"", "malformed_json"),
        (None, "malformed_json"),
        (b"[1, 2]", "invalid_schema"),
        (b'"a string"', "invalid_schema"),
        (with_field(query_event(), schema_version=...), "invalid_schema"),
        (with_field(query_event(), rewrites=...), "invalid_schema"),
        (with_field(query_event(), surprise=1), "invalid_schema"),
        (with_field(query_event(), policy_version="1"), "invalid_schema"),
        (with_field(query_event(), arm="staging"), "invalid_schema"),
        (
            with_field(query_event(), rewrites=[json.loads(rewrites(1)[0].model_dump_json())]),
            "invalid_schema",
        ),
        (with_field(query_event(), schema_version=99), "unsupported_version"),
        (with_field(query_event(), schema_version="1"), "unsupported_version"),
        (with_field(query_event(), schema_version=True), "unsupported_version"),
    ],
    ids=[
        "truncated",
        "binary",
        "empty",
        "none",
        "array",
        "string",
        "no-version",
        "missing-field",
        "extra-field",
        "string-for-int",
        "unknown-arm",
        "one-rewrite",
        "future-version",
        "string-version",
        "bool-version",
    ],
)
def test_bad_query_events(raw: bytes | None, reason: str) -> None:
    assert reason_of(QueryEvent, raw) == reason


def test_nan_is_refused_on_the_wire_and_at_construction() -> None:
    raw = encode(pair()).replace(b'"chosen_reward":0.61', b'"chosen_reward":NaN')
    assert b"NaN" in raw
    assert reason_of(PreferencePair, raw) == "invalid_schema"
    with pytest.raises(ValidationError):
        pair(chosen_reward=float("nan"))


def test_wrong_schema_for_the_topic_is_invalid() -> None:
    assert reason_of(QueryEvent, encode(pair())) == "invalid_schema"
    assert reason_of(PreferencePair, encode(INTERACTION)) == "invalid_schema"
    assert reason_of(Interaction, with_field(INTERACTION, position=-1)) == "invalid_schema"
    assert reason_of(Interaction, with_field(INTERACTION, kind="stare")) == "invalid_schema"


def test_schema_error_carries_reason_and_detail() -> None:
    with pytest.raises(SchemaError) as err:
        decode(QueryEvent, with_field(query_event(), surprise=1))
    assert err.value.reason == "invalid_schema"
    assert "surprise" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_feedback_topic_tells_interactions_from_session_ends() -> None:
    assert decode_feedback(encode(INTERACTION)) == INTERACTION
    assert decode_feedback(encode(SESSION_END)) == SESSION_END
    with pytest.raises(SchemaError) as err:
        decode_feedback(encode(query_event()))  # a query event on the wrong topic
    assert err.value.reason == "invalid_schema"
    with pytest.raises(SchemaError) as err:
        decode_feedback(b"{oops")
    assert err.value.reason == "malformed_json"


@pytest.mark.parametrize("n", [0, 1, 3])
def test_query_event_needs_exactly_two_rewrites(n: int) -> None:
    with pytest.raises(ValidationError, match="rewrites"):
        query_event(rewrites=rewrites(n))


def test_unknown_reward_components_are_refused() -> None:
    with pytest.raises(ValidationError, match="unknown reward components"):
        pair(chosen_components={"clicks": 1.0})
    assert pair(chosen_components={}, rejected_components={}).chosen_components == {}


def test_pair_ids_are_deterministic_and_distinct() -> None:
    assert pair_id_for(EVENT_ID) == pair_id_for(EVENT_ID)
    assert uuid.UUID(pair_id_for(EVENT_ID)).version == 5
    ids = {pair_id_for(str(uuid.uuid4())) for _ in range(1000)}
    assert len(ids) == 1000
    assert pair_id_for(EVENT_ID) != pair_id_for(EVENT_ID.upper()), "ids are case-sensitive strings"
