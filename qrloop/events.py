"""Event schemas: the one module every component imports. JSON on the wire, validated at every edge.

| event               | topic             | key              | producer        | consumers                  |
|---------------------|-------------------|------------------|-----------------|----------------------------|
| QueryEvent          | query-events      | event_id         | rewriter        | aggregator, export/replay  |
| Interaction         | interactions      | query_event_id   | shoppers        | aggregator                 |
| SessionEnd          | interactions      | query_event_id   | shoppers        | aggregator (early close)   |
| PreferencePair      | preference-pairs  | pair_id          | aggregator      | learner                    |
| QueryOutcome        | query-outcomes    | query_event_id   | aggregator      | canary job                 |
| PolicyAnnouncement  | policy-versions   | version          | learner, canary | rewriter, dashboards       |
| DeadLetter          | dead-letter       | original key     | every consumer  | operators                  |

Query events and their feedback share a key, so with equal partition counts they meet on one partition,
where the aggregator's table keeps their join state. ``kafka_key()`` on each event is that key.

Validation is lax where our own code builds an event (an ``int`` where a ``float`` is declared is fine) and
strict where bytes arrive (:func:`decode`): no ``"3"`` for ``3``, no naive timestamps, no NaN, no unknown
fields. Every message carries ``schema_version``; a consumer refuses versions it does not know
(``SchemaError("unsupported_version")``) instead of guessing. Timestamps are timezone-aware and normalised to
UTC, so event-time arithmetic never mixes clocks.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({SCHEMA_VERSION})
# A fixed namespace: pair ids are uuid5(namespace, query event id), the same on every re-emission, so the
# learner's ledger recognises a pair the aggregator sent twice.
PAIR_NAMESPACE = uuid.UUID("6f1d2c3e-8a4b-4e1f-9c2d-7b5a3e9f1c0d")
# The list of products shown for the shopper's own query, as opposed to one of the two rewrites.
ORIGINAL_LIST = "original"
# The reward signals of qrloop.rewards.RewardComponents (the paper's five and the gain's two); a pair may
# carry a subset (or none in tests).
REWARD_COMPONENTS = frozenset(
    {"relevance", "diversity", "click", "add2cart", "purchase", "novelty", "engagement"}
)

Arm = Literal["production", "canary"]
InteractionKind = Literal["impression", "click", "add_to_cart", "purchase"]
SchemaErrorReason = Literal[
    "malformed_json", "invalid_schema", "unsupported_version", "event_time_out_of_range"
]


def utcnow() -> datetime:
    return datetime.now(UTC)


# Aware (a naive datetime is refused: whose clock would it be?) and converted to UTC.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(lambda t: t.astimezone(UTC))]
NonEmpty = Annotated[str, Field(min_length=1)]


class Event(BaseModel):
    # frozen: an event is a fact; allow_inf_nan=False: NaN would serialise as null and poison consumers.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: int = SCHEMA_VERSION

    def kafka_key(self) -> bytes | None:
        """The record key this event is produced with (see the table above)."""
        raise NotImplementedError


def _empty(value: list[str]) -> bool:
    return not value


class Rewrite(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rewrite_id: NonEmpty
    text: str = Field(description="The rewritten query; may be empty when the policy produced nothing.")
    logprob: float = Field(description="Sequence log-probability under the serving policy (for OPE).")
    products: list[str] = Field(description="Product ids retrieved for the rewrite, in rank order.")
    reference_logprob: float | None = Field(
        None,
        description="Log-probability of the same tokens under the production policy, logged when the canary "
        "arm served the rewrite (the canary's KL guard); None otherwise.",
    )
    draw: int = Field(
        1,
        ge=1,
        description="The sampling round that produced it: 1 is the first; more means the rewriter resampled "
        "because earlier rewrites repeated each other or echoed the query (rewriter.max_resamples).",
    )


class QueryEvent(Event):
    type: Literal["query"] = "query"
    event_id: NonEmpty = Field(description="A uuid4 string from the rewriter; the record key.")
    event_time: UtcDatetime
    shopper_id: str
    session_id: str
    query: str = Field(min_length=1)
    policy_version: int | None = Field(description="Version that wrote the rewrites; None: the base model.")
    arm: Arm = "production"
    original_products: list[str] = Field(description="Product ids for the query itself, in rank order.")
    # Left out of the JSON when empty, so a plain policy's events are byte for byte what they were before
    # hinted prompts existed (consumers of that schema forbid unknown fields).
    hints: list[str] = Field(
        default_factory=list,
        exclude_if=_empty,
        description="The words of the query's results its policy's prompt showed beside the query (a hinted "
        "policy, qrloop.prompting); empty: the prompt was the query alone. Logged so that the learner and "
        "off-policy evaluation score each rewrite under the prompt it was sampled from.",
    )
    rewrites: list[Rewrite] = Field(
        min_length=2, max_length=2, description="Exactly the two sampled rewrites."
    )

    def kafka_key(self) -> bytes:
        return self.event_id.encode()


class Interaction(Event):
    type: Literal["interaction"] = "interaction"
    event_id: NonEmpty
    query_event_id: NonEmpty
    rewrite_id: NonEmpty = Field(
        description=f"The list the product was shown in: a rewrite id or {ORIGINAL_LIST!r}."
    )
    product_id: NonEmpty
    position: int = Field(ge=0, description="0-based rank of the product in that list.")
    kind: InteractionKind
    event_time: UtcDatetime

    def kafka_key(self) -> bytes:
        # Keyed by the query, not the interaction: all feedback of one query lands on its partition.
        return self.query_event_id.encode()


class SessionEnd(Event):
    """The shopper left: ``interactions_sent`` distinct interactions belong to this query (early close)."""

    type: Literal["session_end"] = "session_end"
    query_event_id: NonEmpty
    shopper_id: str
    interactions_sent: int = Field(ge=0)
    event_time: UtcDatetime

    def kafka_key(self) -> bytes:
        return self.query_event_id.encode()


def _known_components(components: dict[str, float]) -> dict[str, float]:
    unknown = set(components) - REWARD_COMPONENTS
    if unknown:
        raise ValueError(f"unknown reward components {sorted(unknown)}; known: {sorted(REWARD_COMPONENTS)}")
    return components


Components = Annotated[dict[str, float], AfterValidator(_known_components)]


class PreferencePair(Event):
    type: Literal["pair"] = "pair"
    pair_id: NonEmpty = Field(description="pair_id_for(source_event_id): stable across re-emissions.")
    prompt: str = Field(min_length=1, description="The shopper's original query (not the templated prompt).")
    hints: list[str] = Field(
        default_factory=list,
        exclude_if=_empty,
        description="The query event's hints: the result words its prompt showed.",
    )
    chosen: str
    rejected: str
    chosen_reward: float
    rejected_reward: float
    chosen_components: Components
    rejected_components: Components
    policy_version: int | None
    arm: Arm = "production"
    source_event_id: NonEmpty
    event_time: UtcDatetime

    def kafka_key(self) -> bytes:
        return self.pair_id.encode()


class QueryOutcome(Event):
    """What one scored query earned, per arm: the canary's samples (ties included, which pairs omit)."""

    type: Literal["outcome"] = "outcome"
    query_event_id: NonEmpty
    event_time: UtcDatetime = Field(description="The query's event time (the canary's windows use it).")
    policy_version: int | None
    arm: Arm
    reward: float = Field(description="Mean reward (rewards.ranking's scalar) of the two rewrites.")
    relevance: float = Field(description="Mean relevance component of the two rewrites (the hacking guard).")
    rewards: list[float] = Field(min_length=2, max_length=2, description="Each rewrite's reward.")
    logprobs: list[float] = Field(
        min_length=2, max_length=2, description="Each rewrite's logged log-probability under its policy."
    )
    kl_to_reference: float | None = Field(
        None, description="Mean log π(rewrite) − log π_production(rewrite) when logged (canary arm)."
    )
    tie: bool = Field(description="The two rewards were within the margin: no pair was emitted.")

    def kafka_key(self) -> bytes:
        return self.query_event_id.encode()


class PolicyAnnouncement(Event):
    type: Literal["announcement"] = "announcement"
    kind: Literal["version_published", "alias_moved", "canary_verdict"]
    version: int
    alias: str | None = None
    previous_version: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    at: UtcDatetime = Field(default_factory=utcnow)

    def kafka_key(self) -> bytes:
        return str(self.version).encode()


def _base64(value: str) -> str:
    try:
        base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"not base64: {exc}") from exc
    return value


class DeadLetter(Event):
    type: Literal["dead_letter"] = "dead_letter"
    source_topic: str
    partition: int = Field(ge=-1, description="-1 when the message never had one (e.g. an orphan).")
    offset: int = Field(ge=-1)
    reason: str
    error: str
    original: Annotated[str, AfterValidator(_base64)] = Field(description="The original bytes, base64.")
    at: UtcDatetime = Field(default_factory=utcnow)

    @classmethod
    def of(
        cls, source_topic: str, partition: int, offset: int, reason: str, error: str, raw: bytes | None
    ) -> DeadLetter:
        """Wrap a message that could not be processed; the error text is capped so a letter stays small."""
        return cls(
            source_topic=source_topic,
            partition=partition,
            offset=offset,
            reason=reason,
            error=error[:2000],
            original=base64.b64encode(raw or b"").decode("ascii"),
        )

    def original_bytes(self) -> bytes:
        return base64.b64decode(self.original)

    def kafka_key(self) -> None:
        # Producers pass the original record's key through, so a letter sits beside its source's partition.
        return None


class SchemaError(ValueError):
    """A message that is not a valid event; ``reason`` is a short machine-readable label for metrics."""

    def __init__(self, reason: SchemaErrorReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: SchemaErrorReason = reason
        self.detail = detail


E = TypeVar("E", bound=Event)


def encode(event: Event) -> bytes:
    return event.model_dump_json().encode("utf-8")


def _check_envelope(raw: bytes | str | None) -> None:
    """Classify what pydantic cannot: not JSON at all, not an object, or a version this build cannot read."""
    if raw is None or raw in (b"", ""):
        raise SchemaError("malformed_json", "empty message")
    try:
        payload = json.loads(raw)
    except RecursionError as exc:  # deeply nested arrays or objects
        raise SchemaError("malformed_json", "nested too deeply") from exc
    except ValueError as exc:  # bad UTF-8, not JSON, or an integer of more than 4,300 digits
        raise SchemaError("malformed_json", str(exc)[:200]) from exc
    if not isinstance(payload, dict):
        raise SchemaError("invalid_schema", f"expected a JSON object, got {type(payload).__name__}")
    if "schema_version" not in payload:
        raise SchemaError("invalid_schema", "schema_version is missing")
    version = payload["schema_version"]
    # type() rather than isinstance(): JSON true is a bool, and True == 1 in Python.
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise SchemaError(
            "unsupported_version",
            f"schema_version {version!r}, this build reads {sorted(SUPPORTED_VERSIONS)}",
        )


def decode(cls: type[E], raw: bytes | str | None) -> E:
    """Bytes from Kafka → a validated event of type ``cls``, or :class:`SchemaError` saying why not."""
    _check_envelope(raw)
    assert raw is not None
    try:
        return cls.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise SchemaError("invalid_schema", _short(exc)) from exc
    except (ValueError, ArithmeticError, RecursionError) as exc:  # e.g. a year-9999 time moved to UTC
        raise SchemaError("invalid_schema", f"{type(exc).__name__}: {exc}"[:200]) from exc


Feedback = Annotated[Interaction | SessionEnd, Field(discriminator="type")]
_FEEDBACK: TypeAdapter[Interaction | SessionEnd] = TypeAdapter(Feedback)


def decode_feedback(raw: bytes | str | None) -> Interaction | SessionEnd:
    """The interactions topic carries interactions and the shopper's session end, told apart by ``type``."""
    _check_envelope(raw)
    assert raw is not None
    try:
        return _FEEDBACK.validate_json(raw, strict=True)
    except ValidationError as exc:
        raise SchemaError("invalid_schema", _short(exc)) from exc
    except (ValueError, ArithmeticError, RecursionError) as exc:  # e.g. a year-9999 time moved to UTC
        raise SchemaError("invalid_schema", f"{type(exc).__name__}: {exc}"[:200]) from exc


def _short(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])


def check_event_time(
    event_time: datetime, *, max_future_s: float, max_age_s: float | None, now: datetime | None = None
) -> None:
    """Refuse an event time too far ahead of ``now`` (the consumer's clock) or, with ``max_age_s``, too old.

    A consumer that keeps a watermark (the largest event time seen) must call this before it lets an event
    move it: one message stamped 9999-12-31 would otherwise close every window at the next tick.
    """
    ahead = (event_time - (now or utcnow())).total_seconds()
    if ahead > max_future_s:
        raise SchemaError(
            "event_time_out_of_range",
            f"event_time {event_time.isoformat()} is {ahead:.0f} s ahead of this clock "
            f"(max {max_future_s:.0f})",
        )
    if max_age_s is not None and -ahead > max_age_s:
        raise SchemaError(
            "event_time_out_of_range",
            f"event_time {event_time.isoformat()} is {-ahead:.0f} s old (max {max_age_s:.0f})",
        )


def pair_id_for(query_event_id: str) -> str:
    """The pair id of the pair built from one query event: deterministic, so re-emissions are recognisable."""
    return str(uuid.uuid5(PAIR_NAMESPACE, query_event_id))


# The traffic log of export/replay/evaluate: query events and their feedback, one JSON object per line, told
# apart by ``type`` (the schema's own JSON, so a log line is byte-for-byte what the topic carried).
Logged = Annotated[QueryEvent | Interaction | SessionEnd, Field(discriminator="type")]
_LOGGED: TypeAdapter[QueryEvent | Interaction | SessionEnd] = TypeAdapter(Logged)


def decode_logged(raw: bytes | str | None) -> QueryEvent | Interaction | SessionEnd:
    """One line of a traffic log → a query event, an interaction or a session end (strict, as on the wire)."""
    _check_envelope(raw)
    assert raw is not None
    try:
        return _LOGGED.validate_json(raw, strict=True)
    except ValidationError as exc:
        raise SchemaError("invalid_schema", _short(exc)) from exc
    except (ValueError, ArithmeticError, RecursionError) as exc:  # e.g. a year-9999 time moved to UTC
        raise SchemaError("invalid_schema", f"{type(exc).__name__}: {exc}"[:200]) from exc
