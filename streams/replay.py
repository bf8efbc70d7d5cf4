"""Logged traffic: export it from the topics, replay it through the pipeline, evaluate a candidate on it.

A *traffic log* is query events, interactions and session ends, one event per line in the schema's own JSON
(``type`` says which), in event-time order: JSONL, or Parquet with the same JSON in an ``event`` column.

- :func:`export_log` reads both input topics (every partition, from the beginning to the end offsets at the
  start of the export) and writes them as one log, merged into event-time order.
- :func:`replay` publishes a log to the input topics in event-time order, at a rate or as fast as possible.
- :func:`attribute` is the aggregator's decision procedure run here, on a log: the pure functions of
  ``streams.attribution`` applied in event-time order. ``qrloop evaluate`` (``qrloop.cli.evaluate``:
  off-policy evaluation with ``learner.ope``) scores rewrites with it; ``replay --in-process`` publishes its
  pairs instead of the raw events.

**What makes a replay deterministic.** Every decision of the aggregator is taken in *event* time: a window is
``[t_query, t_query + window]``, it closes early when the shopper's ``SessionEnd`` says all feedback is in, or
when the watermark (the largest event time seen) passes the window plus the grace. Replaying at any speed
therefore reproduces every window that ends with a ``SessionEnd`` (the simulated shoppers always send one),
and the events keep their keys, so each lands on the same partition in the same order as before. Nothing
in attribution or in a DPO step is random (no sampling, dropout off, no shuffling), so the seed plays no part.
Two things the Faust worker does *not* make reproducible, and the in-process path does:

- the *order* of pairs on the pair topic: Faust interleaves the input topics and partitions as fetches
  return, so the same pairs can reach the learner in another order, form other batches of 16, and give other
  weights. ``replay --in-process`` attributes in one fixed order (event time, then kind, then id) and
  publishes the pairs in the order their windows closed, so the learner's versions are bit-identical;
- windows closed by the watermark rather than by a session end: the worker's watermark is process-wide, so a
  partition consumed ahead of another can close the other's windows before their feedback is read, and an
  idle stream advances the watermark with the wall clock (``streams.idle_advance_s``), which a slow
  ``--rate`` triggers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from qrloop import metrics
from qrloop.events import (
    Interaction,
    PreferencePair,
    QueryEvent,
    SchemaError,
    SessionEnd,
    decode_logged,
    encode,
)
from qrloop.settings import Settings
from qrloop.topics import make_producer, send_dead_letter
from streams import attribution
from streams.aggregator import make_relevance_fn

log = logging.getLogger("qrloop.replay")

LoggedEvent = QueryEvent | Interaction | SessionEnd
# Within one instant a query precedes its feedback and the session end comes last, as on the live path.
_KIND_RANK = {"query": 0, "interaction": 1, "session_end": 2}


# -- log records --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawRecord:
    """One undecoded log entry and where it came from (a file line, or a topic partition offset)."""

    source: str  # file path or topic name
    partition: int  # -1 for a file
    position: int  # 1-based line (or row) number in a file, the offset in a topic
    value: bytes
    key: bytes | None = None

    @property
    def topic(self) -> str:  # where it came from, as a dead letter names it
        return self.source

    @property
    def offset(self) -> int:
        return self.position

    def where(self) -> str:
        if self.partition < 0:
            return f"{self.source}: line {self.position}"
        return f"{self.source}[{self.partition}]@{self.position}"


class LogFormatError(ValueError):
    """A log entry that is not a valid event; the message names its line (or partition and offset)."""

    def __init__(self, record: RawRecord, error: SchemaError) -> None:
        super().__init__(f"{record.where()}: {error}")
        self.record = record
        self.reason = error.reason


def identity(event: LoggedEvent) -> str:
    return event.event_id if isinstance(event, QueryEvent | Interaction) else f"end:{event.query_event_id}"


def event_time_key(event: LoggedEvent) -> tuple[datetime, int, str]:
    """Total order of a log: event time, then query < interaction < session end, then the event's id."""
    return (event.event_time, _KIND_RANK[event.type], identity(event))


def in_event_time_order(events: Iterable[LoggedEvent]) -> list[LoggedEvent]:
    return sorted(events, key=event_time_key)


@dataclass
class Parsed:
    events: list[LoggedEvent]
    bad: list[tuple[RawRecord, SchemaError]] = field(default_factory=list)


def parse(records: Iterable[RawRecord], keep_bad: bool = False) -> Parsed:
    """Decode every record. A bad one raises :class:`LogFormatError` unless ``keep_bad`` (dead-lettering)."""
    parsed = Parsed([])
    for record in records:
        try:
            parsed.events.append(decode_logged(record.value))
        except SchemaError as exc:
            if not keep_bad:
                raise LogFormatError(record, exc) from exc
            parsed.bad.append((record, exc))
    parsed.events = in_event_time_order(parsed.events)
    return parsed


# -- reading and writing logs -------------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[RawRecord]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():  # blank lines (a trailing newline, an editor's) carry nothing
                yield RawRecord(str(path), -1, number, line.rstrip(b"\r\n"))


def read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq  # here, not at the top: only Parquet logs pay for pyarrow's import

    table = pq.read_table(path, columns=["event"])
    for number, value in enumerate(table.column("event").to_pylist(), start=1):
        raw = value.encode() if isinstance(value, str) else (value or b"")
        yield RawRecord(str(path), -1, number, raw)


def write_log(events: Sequence[LoggedEvent], out: Path) -> Path:
    """JSONL (one event's JSON per line), or Parquet when ``out`` ends in ``.parquet``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "type": [e.type for e in events],
                "event_time": pa.array([e.event_time for e in events], type=pa.timestamp("us", tz="UTC")),
                "event": [encode(e).decode() for e in events],
            }
        )
        pq.write_table(table, out)
        return out
    with out.open("wb") as sink:
        for event in events:
            sink.write(encode(event) + b"\n")
    return out


@dataclass(frozen=True)
class KafkaSource:
    """``kafka:TOPIC[,TOPIC...][:START-END]``: offsets START (inclusive) to END (exclusive) of every
    partition; START defaults to the beginning and END to the end offsets when the read starts."""

    topics: tuple[str, ...]
    start: int | None = None
    end: int | None = None


def parse_source(source: str) -> Path | KafkaSource:
    if not source.startswith("kafka:"):
        return Path(source)
    rest = source.removeprefix("kafka:")
    names, _, span = rest.partition(":")
    topics = tuple(t for t in names.split(",") if t)
    if not topics:
        raise ValueError(f"{source!r}: name a topic, e.g. kafka:qrloop.query-events:0-100")
    start = end = None
    if span:
        low, dash, high = span.partition("-")
        if not dash or (low and not low.isdigit()) or (high and not high.isdigit()):
            raise ValueError(f"{source!r}: the range is START-END offsets, e.g. :0-100 or :50-")
        start, end = (int(low) if low else None), (int(high) if high else None)
    return KafkaSource(topics, start, end)


def read_source(source: str, bootstrap: str) -> list[RawRecord]:
    where = parse_source(source)
    if isinstance(where, KafkaSource):
        return read_topics(bootstrap, where.topics, where.start, where.end)
    if not where.is_file():
        raise FileNotFoundError(f"no log at {where}")
    return list(read_parquet(where) if where.suffix == ".parquet" else read_jsonl(where))


def read_topics(
    bootstrap: str, topics: Sequence[str], start: int | None = None, end: int | None = None
) -> list[RawRecord]:
    """Every record of every partition of ``topics`` from ``start`` up to the end offsets taken now.

    The end is fixed before reading, so an export of a live topic terminates and is a consistent snapshot.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, client_id="qrloop-export"
    )
    try:
        partitions = []
        for topic in topics:
            ids = consumer.partitions_for_topic(topic)
            if not ids:
                raise ValueError(f"topic {topic} does not exist on {bootstrap}")
            partitions += [TopicPartition(topic, p) for p in sorted(ids)]
        consumer.assign(partitions)
        first, last = consumer.beginning_offsets(partitions), consumer.end_offsets(partitions)
        stop: dict[TopicPartition, int] = {}
        for tp in partitions:
            begin = max(first[tp], start) if start is not None else first[tp]
            stop[tp] = min(last[tp], end) if end is not None else last[tp]
            consumer.seek(tp, min(begin, stop[tp]))
        records: list[RawRecord] = []
        pending = {tp for tp in partitions if consumer.position(tp) < stop[tp]}
        deadline = time.monotonic() + 120
        while pending and time.monotonic() < deadline:
            for tp, batch in consumer.poll(timeout_ms=500).items():
                for r in batch:
                    if r.offset < stop[tp]:
                        records.append(RawRecord(tp.topic, tp.partition, r.offset, r.value or b"", r.key))
            pending = {tp for tp in pending if consumer.position(tp) < stop[tp]}
        if pending:
            raise TimeoutError(f"could not read up to the end offsets of {sorted(map(str, pending))}")
        return records
    finally:
        consumer.close()


@dataclass(frozen=True)
class ExportReport:
    path: Path
    queries: int
    interactions: int
    session_ends: int
    skipped: int  # records that were not valid events (the aggregator dead-letters those)


def export_log(settings: Settings, out: Path) -> ExportReport:
    """The input topics as one replayable log, in event-time order."""
    t = settings.topics
    records = read_topics(settings.kafka.bootstrap_servers, [t.query_events, t.interactions])
    parsed = parse(records, keep_bad=True)
    for record, error in parsed.bad:
        log.warning("not exported, not an event: %s: %s", record.where(), error)
    write_log(parsed.events, out)
    kinds = [e.type for e in parsed.events]
    return ExportReport(
        out, kinds.count("query"), kinds.count("interaction"), kinds.count("session_end"), len(parsed.bad)
    )


# -- replay -------------------------------------------------------------------------------------------------


def topic_of(event: LoggedEvent | PreferencePair, settings: Settings) -> str:
    t = settings.topics
    if isinstance(event, QueryEvent):
        return t.query_events
    if isinstance(event, PreferencePair):
        return t.preference_pairs
    return t.interactions


@dataclass(frozen=True)
class ReplayReport:
    published: int
    dead_lettered: int
    seconds: float
    by_topic: dict[str, int]

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else float("inf")


def paced(items: Sequence[Any], rate: float, clock: Callable[[], float] = time.monotonic) -> Iterator[Any]:
    """Yield items at ``rate`` per second (0: as fast as possible), on a fixed schedule, so a slow send is
    caught up rather than drifting the whole replay."""
    started = clock()
    for i, item in enumerate(items):
        if rate > 0:
            wait = started + i / rate - clock()
            if wait > 0:
                time.sleep(wait)
        yield item


def pinned(event: LoggedEvent | PreferencePair) -> int | None:
    """The partition a replayed record must go to, or None for its key's.

    Pairs of an in-process replay all go to partition 0: the learner interleaves partitions as fetches
    return, so pairs spread by key would form other batches of 16 on each replay; one partition is read in
    order and the versions stay bit-identical. Live pairs are spread by key (``topics.pair_partitions``)."""
    return 0 if isinstance(event, PreferencePair) else None


def publish(
    settings: Settings,
    events: Sequence[LoggedEvent | PreferencePair],
    rate: float = 0.0,
    bad: Sequence[tuple[RawRecord, SchemaError]] = (),
    producer: KafkaProducer | None = None,
) -> ReplayReport:
    """Send events in the given order, each with its own key; bad records go to the dead-letter topic.

    The producer is idempotent with acks=all, so records of one partition are stored in send order.
    """
    own = producer is None
    producer = producer or make_producer(settings, linger_ms=5)
    started = time.monotonic()
    by_topic: dict[str, int] = {}
    sent: list[tuple[str, Any]] = []  # (topic, future): every delivery is checked before the report
    try:
        for record, error in bad:
            letter = send_dead_letter(producer, settings, record, error.reason, str(error))
            sent.append((settings.topics.dead_letter, letter))
        for event in paced(events, rate):
            topic = topic_of(event, settings)
            future = producer.send(topic, key=event.kafka_key(), value=encode(event), partition=pinned(event))
            sent.append((topic, future))
            by_topic[topic] = by_topic.get(topic, 0) + 1
        producer.flush()
        check_delivered(sent)
    finally:
        if own:
            producer.close()
    return ReplayReport(len(events), len(bad), time.monotonic() - started, by_topic)


class DeliveryError(RuntimeError):
    """Some records of a replay were not written; the message says how many, where, and the first error."""


def check_delivered(sent: Sequence[tuple[str, Any]]) -> None:
    """After a flush every future is done: raise if any failed (and count them), never report success."""
    failed = [(topic, future.exception) for topic, future in sent if future.failed()]
    for topic, _ in failed:
        metrics.EVENTS_NOT_WRITTEN.labels("replay", topic).inc()
    if failed:
        topics = sorted({topic for topic, _ in failed})
        raise DeliveryError(
            f"{len(failed)} of {len(sent)} records were not written (topics {topics}); first error: "
            f"{failed[0][1]!r}"
        )


def replay(
    settings: Settings,
    source: str,
    rate: float = 0.0,
    dead_letter: bool = False,
    in_process: bool = False,
    relevance: attribution.RelevanceFn | None = None,
) -> ReplayReport:
    """``qrloop replay``: a log's events (or, ``in_process``, the pairs they attribute to) onto the topics."""
    parsed = parse(read_source(source, settings.kafka.bootstrap_servers), keep_bad=dead_letter)
    if not in_process:
        return publish(settings, parsed.events, rate, parsed.bad)
    if relevance is None:
        relevance = make_relevance_fn(settings)
    result = attribute(parsed.events, relevance, settings)
    return publish(settings, result.pairs, rate, parsed.bad)


# -- attribution of a log (the aggregator's pure functions, in one fixed order) -----------------------------


@dataclass(frozen=True)
class Closed:
    event: QueryEvent
    scored: attribution.Scored
    reason: str  # "complete" | "window" | "end_of_log"


@dataclass
class Attributed:
    closed: list[Closed] = field(default_factory=list)
    interactions: dict[str, int] = field(default_factory=dict)  # outcome -> count
    orphans: int = 0  # query event ids whose feedback came without the query event

    @property
    def pairs(self) -> list[PreferencePair]:
        return [c.scored.pair for c in self.closed if c.scored.pair is not None]

    @property
    def ties(self) -> int:
        return sum(1 for c in self.closed if c.scored.pair is None)


def attribute(
    events: Iterable[LoggedEvent], relevance: attribution.RelevanceFn, settings: Settings
) -> Attributed:
    """Join, window and score a log as the aggregator does, in the log's event-time order.

    Each event first advances the watermark; windows it makes due close (in query time order) before the
    event is applied, which is the earliest moment the aggregator's timer could close them. At the end of the
    log every window still open closes, as the aggregator's idle watermark eventually closes them.
    """
    window_s, grace_s = settings.streams.attribution_window_s, settings.streams.grace_s
    skew_s = settings.event_time.attribution_skew_s
    states: dict[str, attribution.State] = {}
    result = Attributed()
    watermark = float("-inf")

    def finalize(key: str, reason: str) -> None:
        state = states[key]
        scored = attribution.score(state, relevance, settings.rewards)
        result.closed.append(Closed(QueryEvent.model_validate(state["query"]), scored, reason))
        states[key] = attribution.close(state, now_wall=0.0)

    def close_due() -> None:
        due = [
            (s["t_query"], k)
            for k, s in states.items()
            if attribution.is_due(s, watermark, window_s, grace_s)
        ]
        for _, key in sorted(due):
            finalize(key, "window")

    for event in in_event_time_order(events):
        watermark = max(watermark, event.event_time.timestamp())
        close_due()
        key = event.event_id if isinstance(event, QueryEvent) else event.query_event_id
        state = states.setdefault(key, attribution.new_state(now_wall=0.0))
        if isinstance(event, QueryEvent):
            if state["status"] == "closed":
                continue
            attribution.apply_query(state, event, window_s, skew_s)
        elif isinstance(event, SessionEnd):
            attribution.apply_session_end(state, event)
        else:
            outcome = attribution.apply_interaction(state, event, window_s, skew_s)
            result.interactions[outcome] = result.interactions.get(outcome, 0) + 1
        if state["status"] == "open" and attribution.is_complete(state):
            finalize(key, "complete")
    for key in sorted(k for k, s in states.items() if s["status"] == "open" and s["query"] is not None):
        finalize(key, "end_of_log")
    result.orphans = sum(1 for s in states.values() if s["status"] == "open" and s["query"] is None)
    return result
