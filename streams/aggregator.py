"""The aggregator's agents: small ``async for`` loops that hand every decision to ``streams.attribution``.

Three agents share one changelog-backed table of attribution windows keyed by query event id:

- ``on_query``        a QueryEvent opens (or completes) its window;
- ``on_interaction``  an Interaction or SessionEnd is counted into its window, which may complete it;
- ``on_close``        a close request (from the timer) scores a due window, or dead-letters an orphan.

No record may stop an agent: Faust restarts a crashed agent at the same offset, so one poison record would
be re-read forever. A record that is not a valid event, or whose event time is outside the bounds against
this process's clock (``settings.event_time``: a year-9999 stamp would move the watermark and close every
window at the next tick), goes to the dead-letter topic with its reason; so does whatever else one record
makes fail ("unprocessable"), and a query whose window cannot be scored (a product the catalog does not know)
is dead-lettered once and its window closed, instead of being closed again at every tick.

The query-event and interaction topics are keyed by query event id and have the same partition count, so a
query and its feedback meet on the same partition, where the table's changelog partition also is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka.errors import KafkaError
from kafka import KafkaConsumer, TopicPartition

from qrloop import health, logs, metrics, topics
from qrloop.catalog import Catalog
from qrloop.events import (
    DeadLetter,
    Interaction,
    QueryEvent,
    SchemaError,
    SessionEnd,
    check_event_time,
    decode,
    decode_feedback,
    encode,
)
from qrloop.relevance import RelevanceModel
from qrloop.relevance_threshold import relevant_above
from qrloop.reload import reload_on_sighup
from qrloop.settings import Settings, get_settings
from streams import attribution
from streams.app import AggregatorApp, create_app

log = logging.getLogger("qrloop.aggregator")


def make_relevance_fn(settings: Settings) -> attribution.CalibratedRelevance:
    """M1 over the catalog's product texts (the fine-tuned model, or the logged cosine fallback), with the
    gain's relevance threshold that belongs to this M1 (``rewards.relevant_above`` when configured, else
    calibrated once per model on training labels and cached): whoever scores with M1 scores with its τ."""
    catalog = Catalog.open(settings)
    model = RelevanceModel.load(settings, catalog)  # with the catalog's precomputed embeddings, if built

    def relevance(query: str, product_ids: Sequence[str]) -> Sequence[float]:
        if not product_ids:
            return []
        return [float(s) for s in model.score(query, [catalog.text(pid) for pid in product_ids])]

    return attribution.CalibratedRelevance(
        relevance, relevant_above(settings, model, catalog.dataset), model.prepare
    )


class ModelLoadError(RuntimeError):
    """M1 (or the encoder it scores with) could not load: a worker that cannot score must not consume."""


def load_relevance(settings: Settings) -> attribution.CalibratedRelevance:
    """M1, loaded before the worker consumes anything. Loaded on the first window instead, a model that fails
    to load failed that window's valid query (dead-lettered, and its close request again at every tick), and
    a slow load stalled every agent of the event loop for its 10-20 s."""
    try:
        return make_relevance_fn(settings)
    except Exception as exc:
        raise ModelLoadError(
            f"the aggregator cannot score without its relevance model M1: {type(exc).__name__}: {exc}. "
            f"Nothing was consumed; check `qrloop doctor` (`qrloop run` restarts this role with backoff)."
        ) from exc


class WindowWrites:
    """The window table's changes made by the records being handled, written to its changelog once per window.

    Faust writes a table's changelog at every assignment, and a query's window changes with each of its ~35
    feedback records: a JSON encoding of the whole window and a produce per record, about 45% of an unscored
    worker's time (``bench_online.py speed``). Here a change goes to the table's memory at once (the next
    record and the timer see it) and to the changelog when the batch is handled, before its records are
    acked, so no record is committed before its window's change is in the changelog (Faust's commit flushes
    the producer first; ``streams.kafka_transport`` makes that flush wait for every buffered write).
    The partition is the record's own: the inputs and the changelog are co-partitioned by the window's key.
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self.dirty: dict[str, int] = {}

    def put(self, key: str, partition: int, state: attribution.State) -> None:
        self.table.data[key] = state  # the table's memory, without Faust's changelog write per assignment
        self.dirty[key] = partition

    def flush(self) -> None:
        for key, partition in self.dirty.items():
            state = self.table.data.get(key)
            if state is not None:  # else deleted since (a purge or an orphan's end), its tombstone written
                self.table.send_changelog(partition, key, state)
        self.dirty.clear()


async def until_the_broker_takes_it(
    handle: Callable[[], Awaitable[None]],
    where: str,
    first_pause_s: float = 0.5,
    max_pause_s: float = 10.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Handle one record, again after a growing pause for as long as the broker refuses a send (a
    ``KafkaError``: the broker's fault, not the record's). Raising instead would end the agent's batch, and
    Faust acks every record of a batch whose iteration ends, handled or not: they would be committed unread.
    A repeat is harmless: a closed window ignores its records, and pair ids are deterministic."""
    pause = first_pause_s
    while True:
        try:
            await handle()
            return
        except KafkaError as exc:
            log.warning(
                "the broker refused a send for the record at %s (%r); again in %.1f s", where, exc, pause
            )
            await sleep(pause)
            pause = min(pause * 2, max_pause_s)


def install_agents(built: AggregatorApp, relevance: attribution.CalibratedRelevance) -> None:
    app, settings, windows = built.app, built.settings, built.windows
    writes = WindowWrites(windows)
    batch_max, batch_within_s = settings.streams.batch_max, settings.streams.batch_within_s
    window_s, grace_s = settings.streams.attribution_window_s, settings.streams.grace_s
    skew_s = settings.event_time.attribution_skew_s
    watermark = attribution.Watermark(settings.streams.idle_advance_s)
    close_requested: set[str] = set()
    finalizing: set[str] = set()  # keys whose window is being scored and emitted right now

    async def dead_letter(event: Any, reason: str, error: str) -> None:
        message = event.message
        await built.dead_letter.send(
            key=message.key, value=encode(topics.dead_letter(message, reason, error))
        )

    def within_bounds(when: Any) -> None:
        bounds = settings.event_time
        check_event_time(when, max_future_s=bounds.max_future_s, max_age_s=bounds.max_age_s)

    async def safely(event: Any, handle: Any) -> None:
        """Run one record's handler; whatever it raises sends the record to the dead-letter topic."""
        try:
            await handle(event)
        except SchemaError as exc:
            await dead_letter(event, exc.reason, str(exc))
        except KafkaError:
            raise  # the broker, not the record: handled again (until_the_broker_takes_it), not dead-lettered
        except Exception as exc:
            log.exception("unprocessable record at %s", event.message.offset)
            await dead_letter(event, "unprocessable", f"{type(exc).__name__}: {exc}")

    async def finalize(key: str, partition: int, state: attribution.State, reason: str) -> None:
        # The sends below yield to the event loop before the window is tombstoned; meanwhile the timer may
        # request the same close again or a late event may complete the window. One finalize per key at a
        # time, or the pair is emitted twice. (The tombstone is written after the sends, so a crash in between
        # re-emits the same pair id on redelivery instead of losing it.)
        if key in finalizing:
            return
        finalizing.add(key)
        try:
            await _finalize(key, partition, state, reason)
        finally:
            finalizing.discard(key)

    async def _finalize(key: str, partition: int, state: attribution.State, reason: str) -> None:
        try:
            scored = attribution.score(state, relevance, settings.rewards)
        except Exception as exc:
            # Retrying cannot help (the same products, the same catalog): dead-letter the query, close it.
            await dead_letter_unscorable(key, state, exc)
            writes.put(key, partition, attribution.close(state))
            close_requested.discard(key)
            return
        if scored.pair is None:
            metrics.TIES.inc()
        else:
            await built.pairs.send(key=scored.pair.pair_id.encode(), value=encode(scored.pair))
            metrics.PAIRS_EMITTED.inc()
        metrics.WINDOWS_CLOSED.labels(reason).inc()
        writes.put(key, partition, attribution.close(state))
        close_requested.discard(key)
        if built.outcomes is not None:
            # Every scored query, ties included, is a sample of its arm for the canary's analysis. Sent after
            # the tombstone, so a redelivery after a crash never counts a query twice in the canary's
            # statistics; the price is at most one lost sample, never a lost pair.
            outcome = attribution.outcome(state, scored)
            await built.outcomes.send(key=outcome.kafka_key(), value=encode(outcome))
        log.info(
            "closed %s (%s): rewards %.3f / %.3f -> %s",
            key,
            reason,
            scored.first_reward,
            scored.second_reward,
            scored.preference,
        )

    async def take_query(event: Any) -> None:
        query = decode(QueryEvent, event.value)
        within_bounds(query.event_time)
        watermark.observe(query.event_time.timestamp())
        key = query.event_id
        state = windows.get(key) or attribution.new_state()
        if state["status"] == "closed":
            return  # a re-delivered query event after its window closed
        state = attribution.apply_query(state, query, window_s, skew_s)
        if attribution.is_complete(state):
            await finalize(key, event.message.partition, state, "complete")
        else:
            writes.put(key, event.message.partition, state)

    async def take_feedback(event: Any) -> None:
        item = decode_feedback(event.value)
        within_bounds(item.event_time)
        watermark.observe(item.event_time.timestamp())
        key = item.query_event_id
        state = windows.get(key) or attribution.new_state()
        if isinstance(item, SessionEnd):
            attribution.apply_session_end(state, item)
        elif isinstance(item, Interaction):
            outcome = attribution.apply_interaction(state, item, window_s, skew_s)
            metrics.INTERACTIONS.labels(outcome).inc()
        if attribution.is_complete(state) and state["status"] == "open":
            await finalize(key, event.message.partition, state, "complete")
        else:
            writes.put(key, event.message.partition, state)

    async def handle_one(event: Any, handle: Any) -> None:
        message = event.message
        where = f"{message.topic}[{message.partition}]@{message.offset}"
        await until_the_broker_takes_it(lambda: safely(event, handle), where)
        built.progress.record(message.tp, message.offset)

    async def handle_batches(
        stream: Any, handle: Any, prepare: Callable[[Sequence[Any]], None] | None = None
    ) -> None:
        # take_events acks a batch's records only after this body has handled them and flushed their writes.
        async for batch in stream.take_events(batch_max, within=batch_within_s):
            if prepare is not None:
                prepare(batch)
            for event in batch:
                await handle_one(event, handle)
            writes.flush()

    def prepare_queries(batch: Sequence[Any]) -> None:
        """Encode the batch's queries for M1 together, before their windows are opened: a window scores
        against its query when it closes, and one forward per query, alone, was most of a scoring worker's
        time (a batch of them costs ~3x less a query; the vectors are the same bits either way). A record
        that does not decode is left to its handler (the dead-letter topic)."""
        queries = []
        for event in batch:
            try:
                queries.append(decode(QueryEvent, event.value).query)
            except SchemaError:
                continue  # take_query dead-letters it, with the reason
        try:
            relevance.prepare(queries)
        except Exception:  # only a head start: scoring encodes the query itself, and dead-letters what fails
            log.exception("could not encode %d queries ahead of their windows", len(queries))

    @app.agent(built.query_events)
    async def on_query(stream: Any) -> None:
        await handle_batches(stream, take_query, prepare_queries)

    @app.agent(built.interactions)
    async def on_interaction(stream: Any) -> None:
        await handle_batches(stream, take_feedback)

    @app.agent(built.closes)
    async def on_close(stream: Any) -> None:
        # One record at a time: a close deletes windows (``del windows[key]``), which Faust writes to the
        # changelog partition of the record being iterated.
        async for event in stream.events():
            await handle_one(event, take_close)
            writes.flush()

    async def take_close(event: Any) -> None:
        """A close request from the timer (see ``request_closes``)."""
        request = json.loads(event.value)
        key, reason = request["key"], request["reason"]
        state = windows.get(key)
        close_requested.discard(key)
        if state is None:
            return
        if reason == "purge" and state["status"] == "closed":
            del windows[key]
        elif reason == "orphan" and state["status"] == "open" and state["query"] is None:
            for pending_key in state.get("pending", {}):
                await dead_letter_orphan(key, pending_key)
            del windows[key]
        elif reason == "due" and state["status"] == "open" and state["query"] is not None:
            await finalize(key, event.message.partition, state, "window")

    async def dead_letter_unscorable(key: str, state: attribution.State, exc: Exception) -> None:
        reason = "unknown_product" if isinstance(exc, KeyError) else "unscorable"
        log.warning("query %s cannot be scored (%s: %s): dead-lettered, window closed", key, reason, exc)
        letter = DeadLetter.of(
            settings.topics.query_events,
            -1,
            -1,
            reason,
            f"{type(exc).__name__}: {exc}",
            json.dumps(state["query"]).encode(),
        )
        metrics.DEAD_LETTERS.labels(reason).inc()
        await built.dead_letter.send(key=key.encode(), value=encode(letter))

    async def dead_letter_orphan(key: str, pending_key: str) -> None:
        letter = DeadLetter.of(
            settings.topics.interactions,
            -1,
            -1,
            "orphan_interaction",
            f"no query event {key} arrived within {settings.streams.orphan_after_s} s",
            pending_key.encode(),
        )
        metrics.DEAD_LETTERS.labels("orphan_interaction").inc()
        await built.dead_letter.send(key=key.encode(), value=encode(letter))

    @app.on_partitions_assigned.connect
    async def log_assignment(_app: Any, /, *args: Any, **_kwargs: Any) -> None:
        # Each rebalance of the group (a worker joined, left or died): what this worker now owns.
        assigned = args[0]
        mine = sorted(tp.partition for tp in assigned if tp.topic == settings.topics.query_events)
        log.info("assigned partitions of %s: %s", settings.topics.query_events, mine)
        built.progress.restart()  # read from the committed offsets again

    @app.timer(settings.streams.tick_s)
    async def request_closes() -> None:
        # Tables may only be *read* here; the close itself happens in on_close, inside stream iteration.
        now = time.time()
        stream_time = watermark.current(now)
        for key, state in list(windows.items()):
            if state is None or key in close_requested or key in finalizing:
                continue
            reason = None
            if attribution.is_due(state, stream_time, window_s, grace_s):
                reason = "due"
            elif attribution.is_orphan(state, now, settings.streams.orphan_after_s):
                reason = "orphan"
            elif attribution.tombstone_expired(state, now, settings.streams.tombstone_s):
                reason = "purge"
            if reason:
                close_requested.add(key)
                await built.closes.send(
                    key=key.encode(), value=json.dumps({"key": key, "reason": reason}).encode()
                )


def default_app() -> AggregatorApp:
    """The app of the configured settings with M1 loaded and its agents installed."""
    built = create_app(get_settings())
    install_agents(built, load_relevance(built.settings))
    return built


def run() -> None:
    """Start the aggregator worker (``qrloop aggregate``): its endpoints first (not ready while M1 loads),
    then M1, then the agents. A model that cannot load stops the worker with the reason before it consumes."""
    settings = get_settings()
    built = create_app(settings)
    model = ModelState()
    heartbeat = health.Heartbeat(settings.daemon.liveness_max_age_s, settings.daemon.liveness_start_grace_s)

    # Beaten on the event loop itself: an agent that blocks the loop (or a loop that stops) stops it, and so
    # does a worker that no longer handles the records waiting for it (streams.progress).
    @built.app.timer(settings.streams.tick_s)
    async def beat() -> None:
        if not built.progress.wedged:
            heartbeat.beat()

    watch_progress(built)

    health.serve(
        settings.streams.metrics_port,
        {
            "broker": health.kafka_check(settings.kafka.bootstrap_servers),
            "model": model.check,
            "agents": lambda: agents_check(built),
        },
        role="aggregator",
        heartbeat=heartbeat,
    )
    # SIGHUP (Faust handles TERM/INT itself): reward weights and margin act from the next scored window.
    reload_on_sighup("aggregator", lambda fresh: reload(built, fresh))
    try:
        install_agents(built, model.load(settings))
    except ModelLoadError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    built.app.main()


def watch_progress(built: AggregatorApp) -> None:
    """Check the input partitions' end offsets against the records handled (``streams.progress``) a few
    times per ``streams.stall_after_s``, and how long a rebalance lasts; log what a wedged worker sees."""
    app, progress, streams = built.app, built.progress, built.settings.streams
    end_offsets = EndOffsets(built.settings)

    @app.timer(min(5.0, streams.stall_after_s / 4))
    async def check_progress() -> None:
        consumer: Any = app.consumer
        now = time.monotonic()
        if app.rebalancing:
            was_stuck = progress.rebalance_stuck
            lasted = progress.rebalancing(now, streams.rebalance_stall_after_s)
            if progress.rebalance_stuck and not was_stuck:
                report_wedge(built, f"a rebalance has lasted {lasted:.0f} s")
            metrics.STALLED_PARTITIONS.set(0)
            return
        try:
            inputs = [tp for tp in consumer.assignment() if tp.topic in app.topics.acking_topics]
            ends = await asyncio.to_thread(end_offsets.read, inputs) if inputs else {}
        except Exception as exc:  # a consumer not started yet, the broker: the worker's clocks start again
            log.warning("could not read the input partitions' end offsets (%r): progress not checked", exc)
            progress.restart()
            return
        already = set(progress.stalled)
        committed = consumer._committed_offset  # Faust's (next offset to read); no public accessor
        stalled = progress.observe(now, ends, {tp: committed.get(tp) for tp in inputs}, streams.stall_after_s)
        metrics.STALLED_PARTITIONS.set(len(stalled))
        if set(stalled) - already:
            waiting = ", ".join(
                f"{tp.topic}[{tp.partition}] (records {progress.next_offset(tp, committed.get(tp))}.."
                f"{ends[tp] - 1} waiting {waited:.0f} s)"
                for tp, waited in sorted(stalled.items())
            )
            report_wedge(built, f"no record handled on {waiting}")


class EndOffsets:
    """The input partitions' end offsets from a client of its own (kafka-python, no group), called from a
    thread. Asked through Faust's consumer thread (``consumer.highwaters``), the requests every few seconds
    queued behind its fetches and slowed its shutdown: 3 of 4 test runs left a worker unstopped after 60 s."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.consumer: KafkaConsumer | None = None

    def read(self, partitions: Sequence[Any]) -> dict[Any, int]:
        """End offsets by partition; Faust's ``TP`` and kafka-python's ``TopicPartition`` are equal tuples."""
        if self.consumer is None:
            kafka = self.settings.kafka
            self.consumer = KafkaConsumer(
                bootstrap_servers=kafka.bootstrap_servers,
                client_id=f"{kafka.client_id}-aggregator-progress",
                group_id=None,
                enable_auto_commit=False,
                request_timeout_ms=15_000,
            )
        ends = self.consumer.end_offsets([TopicPartition(tp.topic, tp.partition) for tp in partitions])
        return {tp: ends[TopicPartition(tp.topic, tp.partition)] for tp in partitions}


def report_wedge(built: AggregatorApp, what: str) -> None:
    """Log a wedge with what the worker sees of it; details that cannot be read (Faust's and aiokafka's
    internals) never keep the headline from the log, nor crash the timer that reports it."""
    try:
        log.error("%s", describe_wedge(built, what))
    except Exception:
        log.exception("%s: this worker fails /healthz, its supervisor restarts it (details unreadable)", what)


def describe_wedge(built: AggregatorApp, what: str) -> str:
    """What the worker can see of a wedge, for whoever reads the log: Faust's flow and paused inputs, its
    agents, and where every task of the event loop waits."""
    app: Any = built.app
    consumer = app.consumer
    try:
        agents = agents_check(built)
    except RuntimeError as exc:
        agents = str(exc)
    inputs = app.topics.acking_topics
    paused = sorted(f"{tp.topic}[{tp.partition}]" for tp in consumer._paused_partitions if tp.topic in inputs)
    lines = [
        f"{what}: this worker fails /healthz, so its supervisor restarts it (nothing was committed past the "
        f"records waiting)",
        f"flow active: app {app.flow_control.is_active()}, consumer {consumer.flow_active}; generation "
        f"{app.consumer_generation_id}; paused inputs: {', '.join(paused) or 'none'}; {agents}",
    ]
    lines.extend(f"  partition {line}" for line in partition_states(app))
    for task in asyncio.all_tasks():
        lines.append(f"  task {task.get_name()}: {' > '.join(awaiting(task.get_coro())[-6:])}")
    return "\n".join(lines)


def partition_states(app: Any) -> list[str]:
    """Each assigned partition as Faust and aiokafka see it: paused or delivered, the fetch position, and for
    a changelog partition under recovery the last offset applied and the offset recovery waits for. Read
    from the event loop while aiokafka's thread runs: a snapshot for a log line, not a consistent state."""
    consumer = app.consumer
    recovery = app.tables.recovery
    try:
        assignment = consumer._thread._ensure_consumer()._subscription.subscription.assignment
    except Exception:  # no consumer or no assignment yet: positions unknown
        assignment = None
    states = []
    for tp in sorted(consumer.assignment()):
        state = assignment.state_value(tp) if assignment is not None else None
        position = getattr(state, "_position", None) if state is not None else None
        flags = "paused" if tp in consumer._paused_partitions else "delivered"
        if tp in recovery.active_tps:
            applied, highwater = recovery.active_offsets.get(tp), recovery.active_highwaters.get(tp)
            flags += f", recovering: applied {applied} of {highwater}"
        states.append(f"{tp.topic}[{tp.partition}]: {flags}; fetch position {position}")
    return states


def awaiting(coroutine: Any) -> list[str]:
    """Where a coroutine waits, outermost first (``Task.get_stack`` stops at a suspended one's outer frame)"""
    chain: list[str] = []
    while coroutine is not None and len(chain) < 30:
        frame = first_attribute(coroutine, "cr_frame", "ag_frame", "gi_frame")
        if frame is None:
            break
        chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coroutine = first_attribute(coroutine, "cr_await", "ag_await", "gi_yieldfrom")
    return chain


def first_attribute(thing: Any, *names: str) -> Any:
    return next((getattr(thing, name) for name in names if hasattr(thing, name)), None)


class ModelState:
    """Readiness of M1 for ``/readyz``: not ready while it loads or when it failed, then what was loaded."""

    def __init__(self) -> None:
        self.state = "M1 is loading"
        self.loaded = False

    def load(self, settings: Settings) -> attribution.CalibratedRelevance:
        started = time.monotonic()
        try:
            relevance = load_relevance(settings)
        except ModelLoadError as exc:
            self.state = str(exc)
            raise
        self.state = f"M1 loaded in {time.monotonic() - started:.1f} s (τ = {relevance.relevant_above:.3f})"
        self.loaded = True
        return relevance

    def check(self) -> str:
        if not self.loaded:
            raise RuntimeError(self.state)
        return self.state


def agents_check(built: AggregatorApp) -> str:
    """Every agent has a running actor: one that crashed (or has not started yet) makes the role not ready."""
    if not built.app.agents:
        raise RuntimeError("agents not installed yet (M1 loads first)")
    problems = []
    for name, agent in built.app.agents.items():
        actors = list(agent._actors)  # Faust keeps no public list of an agent's running actors
        if agent.crashed or not actors or any(a.actor_task is None or a.actor_task.done() for a in actors):
            problems.append(name.rsplit(".", 1)[-1])
    if problems:
        raise RuntimeError(f"agents not running: {', '.join(problems)}")
    return f"{len(built.app.agents)} agents running"


def reload(built: AggregatorApp, fresh: Settings) -> None:
    """Reload what is safe mid-stream: reward weights and tie margin, and the log level. Windows, grace and
    topics are not reloaded: open windows were opened under the old ones."""
    built.settings.rewards = fresh.rewards
    logs.set_level(fresh.logging.level)
    log.info("settings reloaded: rewards %s, log level %s", fresh.rewards.model_dump(), fresh.logging.level)


if __name__ == "__main__":  # pragma: no cover
    default_app().app.main()
