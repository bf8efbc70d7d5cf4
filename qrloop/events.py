"""Event schemas: the one module every component imports. JSON on the wire, validated at every edge.

| event               | topic             | key              | producer        | consumers                  |
|---------------------|-------------------|------------------|-----------------|----------------------------|
| QueryEvent          | query-events      | event_id         | rewriter        | aggregator, export/replay  |
| Interaction         | interactions      | query_event_id   | shoppers        | aggregator                 |
| SessionEnd          | interactions      | query_event_id   | shoppers        | aggregator (early close)   |
| PreferencePair      | preference-pairs  | pair_id          | aggregator      | learner                    |
| PolicyAnnouncement  | policy-versions   | version          | learner, canary | rewriter, dashboards       |
| DeadLetter          | dead-letter       | original key     | every consumer  | operators                  |

Query events and their feedback share a key, so with equal partition counts they meet on one partition,
where the aggregator's table keeps their join state. Every event carries ``schema_version``; a consumer
refuses versions it does not know (``SchemaError("unsupported_version")``) instead of guessing.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SCHEMA_VERSION = 1
# A fixed namespace: pair ids are uuid5(namespace, query event id), the same on every re-emission.
PAIR_NAMESPACE = uuid.UUID("6f1d2c3e-8a4b-4e1f-9c2d-7b5a3e9f1c0d")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION


class Rewrite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rewrite_id: str
    text: str
    logprob: float = Field(description="Sequence log-probability under the serving policy (for OPE).")
    products: list[str] = Field(description="Product ids retrieved for the rewrite, in rank order.")


class QueryEvent(Event):
    type: Literal["query"] = "query"
    event_id: str
    event_time: datetime
    shopper_id: str
    session_id: str
    query: str = Field(min_length=1)
    policy_version: int | None
    arm: Literal["production", "canary"] = "production"
    original_products: list[str]
    rewrites: list[Rewrite] = Field(min_length=2, max_length=2)


InteractionKind = Literal["impression", "click", "add_to_cart", "purchase"]


class Interaction(Event):
    type: Literal["interaction"] = "interaction"
    event_id: str
    query_event_id: str
    rewrite_id: str = Field(description="Which list the product was shown in: a rewrite id or 'original'.")
    product_id: str
    position: int = Field(ge=0)
    kind: InteractionKind
    event_time: datetime


class SessionEnd(Event):
    """The shopper left: ``interactions_sent`` distinct interactions belong to this query (early close)."""

    type: Literal["session_end"] = "session_end"
    query_event_id: str
    shopper_id: str
    interactions_sent: int = Field(ge=0)
    event_time: datetime


class PreferencePair(Event):
    type: Literal["pair"] = "pair"
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_reward: float
    rejected_reward: float
    chosen_components: dict[str, float]
    rejected_components: dict[str, float]
    policy_version: int | None
    arm: Literal["production", "canary"] = "production"
    source_event_id: str
    event_time: datetime


class PolicyAnnouncement(Event):
    type: Literal["announcement"] = "announcement"
    kind: Literal["version_published", "alias_moved", "canary_verdict"]
    version: int
    alias: str | None = None
    previous_version: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    at: datetime = Field(default_factory=utcnow)


class DeadLetter(Event):
    type: Literal["dead_letter"] = "dead_letter"
    source_topic: str
    partition: int
    offset: int
    reason: str
    error: str
    original: str = Field(description="The original message bytes, base64.")
    at: datetime = Field(default_factory=utcnow)


class SchemaError(ValueError):
    """A message that is not a valid event; ``reason`` is a short machine-readable label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


E = TypeVar("E", bound=Event)


def encode(event: Event) -> bytes:
    return event.model_dump_json().encode("utf-8")


def _parse_json(raw: bytes | str | None) -> dict[str, Any]:
    if raw is None:
        raise SchemaError("malformed_json", "empty message")
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SchemaError("malformed_json", str(exc)) from exc
    if not isinstance(payload, dict):
        raise SchemaError("invalid_schema", f"expected a JSON object, got {type(payload).__name__}")
    version = payload.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise SchemaError(
            "unsupported_version", f"schema_version {version!r}, this build reads {SCHEMA_VERSION}"
        )
    return payload


def decode(cls: type[E], raw: bytes | str | None) -> E:
    payload = _parse_json(raw)
    try:
        return cls.model_validate(payload)
    except ValidationError as exc:
        raise SchemaError("invalid_schema", _short(exc)) from exc


Feedback = Annotated[Interaction | SessionEnd, Field(discriminator="type")]
_FEEDBACK = TypeAdapter(Feedback)


def decode_feedback(raw: bytes | str | None) -> Interaction | SessionEnd:
    """The interactions topic carries interactions and the shopper's session end, told apart by ``type``."""
    payload = _parse_json(raw)
    try:
        return _FEEDBACK.validate_python(payload)
    except ValidationError as exc:
        raise SchemaError("invalid_schema", _short(exc)) from exc


def _short(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])


def pair_id_for(query_event_id: str) -> str:
    return str(uuid.uuid5(PAIR_NAMESPACE, query_event_id))
