"""The aggregator's agents: small ``async for`` loops that hand every decision to ``streams.attribution``.

Three agents share one changelog-backed table of attribution windows keyed by query event id:

- ``on_query``        a QueryEvent opens (or completes) its window;
- ``on_interaction``  an Interaction or SessionEnd is counted into its window, which may complete it;
- ``on_close``        a close request (from the timer) scores a due window, or dead-letters an orphan.

The query-event and interaction topics are keyed by query event id and have the same partition count, so a
query and its feedback meet on the same partition, where the table's changelog partition also is.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Sequence
from typing import Any

from qrloop import health, metrics
from qrloop.events import (
    DeadLetter,
    Interaction,
    QueryEvent,
    SchemaError,
    SessionEnd,
    decode,
    decode_feedback,
    encode,
)
from streams import attribution
from streams.app import AggregatorApp

log = logging.getLogger("qrloop.aggregator")


def make_relevance_fn(settings: Any) -> attribution.RelevanceFn:
    """M1 over the catalog's product texts (the fine-tuned model, or the logged cosine fallback)."""
    from qrloop.relevance import RelevanceModel
    from simulators.catalog import Catalog

    catalog = Catalog.open(settings)
    model = RelevanceModel.load(settings)

    def relevance(query: str, product_ids: Sequence[str]) -> Sequence[float]:
        if not product_ids:
            return []
        return [float(s) for s in model.score(query, [catalog.text(pid) for pid in product_ids])]

    return relevance


def install_agents(built: AggregatorApp, relevance: attribution.RelevanceFn | None = None) -> None:
    app, settings, windows = built.app, built.settings, built.windows
    window_s, grace_s = settings.streams.attribution_window_s, settings.streams.grace_s
    watermark = attribution.Watermark(settings.streams.idle_advance_s)
    close_requested: set[str] = set()
    scorer: dict[str, attribution.RelevanceFn] = {}
    finalizing: set[str] = set()  # keys whose window is being scored and emitted right now

    def relevance_fn() -> attribution.RelevanceFn:
        # Loaded on first use: the worker joins its group quickly and pays for M1 only when it scores.
        if "fn" not in scorer:
            scorer["fn"] = relevance or make_relevance_fn(settings)
        return scorer["fn"]

    async def dead_letter(event: Any, reason: str, error: str) -> None:
        message = event.message
        letter = DeadLetter.of(message.topic, message.partition, message.offset, reason, error, message.value)
        metrics.DEAD_LETTERS.labels(reason).inc()
        await built.dead_letter.send(key=message.key, value=encode(letter))

    async def finalize(key: str, state: attribution.State, reason: str) -> None:
        # The sends below yield to the event loop before the window is tombstoned; meanwhile the timer may
        # request the same close again or a late event may complete the window. One finalize per key at a
        # time, or the pair is emitted twice. (The tombstone is written after the sends, so a crash in between
        # re-emits the same pair id on redelivery instead of losing it.)
        if key in finalizing:
            return
        finalizing.add(key)
        try:
            await _finalize(key, state, reason)
        finally:
            finalizing.discard(key)

    async def _finalize(key: str, state: attribution.State, reason: str) -> None:
        scored = attribution.score(state, relevance_fn(), settings.rewards)
        if scored.pair is None:
            metrics.TIES.inc()
        else:
            await built.pairs.send(key=scored.pair.pair_id.encode(), value=encode(scored.pair))
            metrics.PAIRS_EMITTED.inc()
        metrics.WINDOWS_CLOSED.labels(reason).inc()
        windows[key] = attribution.close(state)
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

    @app.agent(built.query_events)
    async def on_query(stream: Any) -> None:
        async for event in stream.events():
            try:
                query = decode(QueryEvent, event.value)
            except SchemaError as exc:
                await dead_letter(event, exc.reason, str(exc))
                continue
            watermark.observe(query.event_time.timestamp())
            key = query.event_id
            state = windows.get(key) or attribution.new_state()
            if state["status"] == "closed":
                continue  # a re-delivered query event after its window closed
            state = attribution.apply_query(state, query, window_s)
            if attribution.is_complete(state):
                await finalize(key, state, "complete")
            else:
                windows[key] = state

    @app.agent(built.interactions)
    async def on_interaction(stream: Any) -> None:
        async for event in stream.events():
            try:
                item = decode_feedback(event.value)
            except SchemaError as exc:
                await dead_letter(event, exc.reason, str(exc))
                continue
            watermark.observe(item.event_time.timestamp())
            key = item.query_event_id
            state = windows.get(key) or attribution.new_state()
            if isinstance(item, SessionEnd):
                attribution.apply_session_end(state, item)
            elif isinstance(item, Interaction):
                outcome = attribution.apply_interaction(state, item, window_s)
                metrics.INTERACTIONS.labels(outcome).inc()
            if attribution.is_complete(state) and state["status"] == "open":
                await finalize(key, state, "complete")
            else:
                windows[key] = state

    @app.agent(built.closes)
    async def on_close(stream: Any) -> None:
        async for event in stream.events():
            request = json.loads(event.value)
            key, reason = request["key"], request["reason"]
            state = windows.get(key)
            close_requested.discard(key)
            if state is None:
                continue
            if reason == "purge" and state["status"] == "closed":
                del windows[key]
            elif reason == "orphan" and state["status"] == "open" and state["query"] is None:
                for pending_key in state.get("pending", {}):
                    await dead_letter_orphan(key, pending_key)
                del windows[key]
            elif reason == "due" and state["status"] == "open" and state["query"] is not None:
                await finalize(key, state, "window")

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


def run() -> None:
    """Start the aggregator worker (``qrloop aggregate``)."""
    from streams.app import default_app

    built = default_app()
    settings = built.settings
    health.serve(
        settings.streams.metrics_port,
        {
            "broker": health.kafka_check(settings.kafka.bootstrap_servers),
            "model": lambda: relevance_model_check(settings),
        },
        role="aggregator",
    )
    # SIGHUP (Faust handles TERM/INT itself): reward weights and margin act from the next scored window.
    signal.signal(signal.SIGHUP, lambda *_: reload(built))
    built.app.main()


def relevance_model_check(settings: Any) -> str:
    """M1 loads on the first window scored; ready means its files (or the fallback encoder's) are there."""
    from qrloop.models import encoder_dir

    m1 = settings.models.relevance_dir
    if m1 is not None and m1.is_dir():
        return f"M1 at {m1}"
    fallback = encoder_dir(settings)
    if not fallback.is_dir():
        raise FileNotFoundError(f"neither M1 ({m1}) nor the encoder ({fallback}) is there")
    return f"cosine fallback at {fallback}"


def reload(built: AggregatorApp) -> None:
    """Reload what is safe mid-stream: reward weights and tie margin, and the log level. Windows, grace and
    topics are not reloaded: open windows were opened under the old ones."""
    from qrloop import logs
    from qrloop.settings import Settings

    fresh = Settings()
    built.settings.rewards = fresh.rewards
    logs.set_level(fresh.logging.level)
    log.info("settings reloaded: rewards %s, log level %s", fresh.rewards.model_dump(), fresh.logging.level)
