"""Helpers shared by the tests (so that no test module imports another): HTTP probes, waiting, an isolated
daemon environment and store, and the events several tests build."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from learner.ledger import SqlTrainingRecord
from policy_store import db
from qrloop.events import (
    DeadLetter,
    Interaction,
    PreferencePair,
    QueryEvent,
    QueryOutcome,
    Rewrite,
    SessionEnd,
    encode,
    pair_id_for,
    utcnow,
)
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import isolate, open_store, run_env
from qrloop.settings import Settings
from qrloop.topics import ensure_topics
from streams import attribution

# Every name unique_topic_name handed out this session: the session's topics all contain one, and
# tests/conftest.py deletes them when the session ends.
ISSUED_TOPIC_NAMES: set[str] = set()


def unique_topic_name() -> str:
    """A fresh name for a test's topics (their prefix or a part of them)."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    ISSUED_TOPIC_NAMES.add(name)
    return name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def metric(port: int, name: str) -> float:
    """Sum of a metric's samples (over its labels) on a role's /metrics."""
    _, body = get(f"http://127.0.0.1:{port}/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith(name) and (line[len(name)] in " {")
    )


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log else ""
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{tail}")
        time.sleep(0.3)


def isolated_env(settings: Settings, name: str) -> dict[str, str]:
    """The environment of a role of the run ``settings`` describe (see :func:`store_settings`), with the
    tests' small batches, a quick idle watermark and no canary."""
    return run_env(settings) | {
        "QRLOOP_STREAMS__IDLE_ADVANCE_S": "1",
        "QRLOOP_DPO__BATCH_SIZE": "4",
        "QRLOOP_DPO__LEARNING_RATE": "1e-4",
        "QRLOOP_REWARDS__MARGIN": "0",
        "QRLOOP_CANARY__ENABLED": "false",
    }


def store_settings(base: Settings, name: str, tmp_path: Path, start_dir: Path) -> Settings:
    """An isolated run named ``name`` in ``tmp_path`` (own topics, store, consumer groups), its topics created
    and its ``production`` alias on ``start_dir``."""
    isolated = isolate(base, name, tmp_path)
    dpo = isolated.dpo.model_copy(update={"batch_size": 4, "learning_rate": 1e-4})
    settings = isolated.model_copy(update={"dpo": dpo})
    ensure_topics(settings)
    db.upgrade(settings.db_url)
    with open_store(settings) as store:
        start = store.publish(start_dir, base_model="start", actor="test")
        store.set_alias("production", start.id, reason="start", actor="test")
    return settings


PAIR_QUERIES = [
    "angle bracket",
    "cordless drill",
    "toungh groove",
    "paint storage contaiers",
    "shower faucet trim",
]


def pair(n: int, event_time: datetime | None = None) -> PreferencePair:
    """The n-th test pair: a known query, "<query> kit" chosen over "<query> <n>" (its id from its event)."""
    query = PAIR_QUERIES[n % len(PAIR_QUERIES)]
    event_id = f"event-{n}"
    return PreferencePair(
        pair_id=pair_id_for(event_id),
        prompt=query,
        chosen=f"{query} kit",
        rejected=f"{query} {n}",
        chosen_reward=0.6,
        rejected_reward=0.3,
        chosen_components={},
        rejected_components={},
        policy_version=1,
        source_event_id=event_id,
        event_time=event_time or datetime.now(UTC),
    )


def clicked_state(event: QueryEvent, clicks: int) -> attribution.State:
    """What the aggregator holds for ``event`` after the shopper clicked the first ``clicks`` products of each
    rewrite's list and ended the session (the real attribution logic, ready to score)."""
    state = attribution.apply_query(attribution.new_state(), event, window_s=30)
    for rewrite in event.rewrites:
        for product in rewrite.products[:clicks]:
            item = Interaction(
                event_id=str(uuid.uuid4()),
                query_event_id=event.event_id,
                rewrite_id=rewrite.rewrite_id,
                product_id=product,
                position=0,
                kind="click",
                event_time=event.event_time,
            )
            attribution.apply_interaction(state, item, window_s=30)
    attribution.apply_session_end(
        state,
        SessionEnd(
            query_event_id=event.event_id, shopper_id="s", interactions_sent=0, event_time=event.event_time
        ),
    )
    return state


def feedback(
    event: QueryEvent, clicks: dict[str, list[str]], after_s: float = 1.0, end: bool = True
) -> list[Interaction | SessionEnd]:
    """Clicks on the given products of each list, one second apart, then the session end."""
    items: list[Interaction | SessionEnd] = []
    for list_key, products in clicks.items():
        for product in products:
            items.append(
                Interaction(
                    event_id=f"i-{uuid.uuid4().hex[:10]}",
                    query_event_id=event.event_id,
                    rewrite_id=list_key,
                    product_id=product,
                    position=0,
                    kind="click",
                    event_time=event.event_time + timedelta(seconds=after_s + len(items)),
                )
            )
    if end:
        last = max((i.event_time for i in items), default=event.event_time)
        items.append(
            SessionEnd(
                query_event_id=event.event_id,
                shopper_id=event.shopper_id,
                interactions_sent=len(items),
                event_time=last,
            )
        )
    return items


def publish_pairs(settings: Settings, pairs: list[PreferencePair], extra: Sequence[bytes] = ()) -> None:
    """Pairs (then raw ``extra`` records) on the run's pair topic, flushed."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    for p in pairs:
        producer.send(settings.topics.preference_pairs, key=p.pair_id.encode(), value=encode(p))
    for raw in extra:
        producer.send(settings.topics.preference_pairs, key=b"bad", value=raw)
    producer.flush()
    producer.close()


# The stream's plumbing is checked against the paper's hand-checkable scalar, with every new product counted
# by the gain's components (τ = 0), whichever M1 this machine has.
PAPER_SCALAR = {"QRLOOP_REWARDS__RANKING": "paper", "QRLOOP_REWARDS__RELEVANT_ABOVE": "0"}


def aggregator_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """The environment of a `qrloop aggregate` subprocess on the run's topics and stream timings."""
    s = settings.streams
    return run_env(settings) | {
        "QRLOOP_STREAMS__ATTRIBUTION_WINDOW_S": str(s.attribution_window_s),
        "QRLOOP_STREAMS__GRACE_S": str(s.grace_s),
        "QRLOOP_STREAMS__IDLE_ADVANCE_S": str(s.idle_advance_s),
        "QRLOOP_STREAMS__TICK_S": str(s.tick_s),
        "QRLOOP_STREAMS__ORPHAN_AFTER_S": str(s.orphan_after_s),
        "QRLOOP_CACHE_DIR": str(settings.cache_dir),
    }


def bracket_query(
    ids: list[str],
    now: datetime,
    rewrite_texts: tuple[str, str] = ("metal angle bracket", "bracket"),
    lists: tuple[list[str], list[str], list[str]] | None = None,
) -> QueryEvent:
    """A query event for "angle bracket" over catalog products ``ids`` (original list and two rewrites)."""
    original, first, second = lists or (ids[0:4], [ids[0], ids[4], ids[5], ids[6]], [*ids[0:3], ids[7]])
    return QueryEvent(
        event_id=str(uuid.uuid4()),
        event_time=now,
        shopper_id="s1",
        session_id="x",
        query="angle bracket",
        policy_version=7,
        arm="production",
        original_products=original,
        rewrites=[
            Rewrite(rewrite_id="r1", text=rewrite_texts[0], logprob=-3.0, products=first),
            Rewrite(rewrite_id="r2", text=rewrite_texts[1], logprob=-2.0, products=second),
        ],
    )


def interaction(
    event: QueryEvent, rewrite_id: str, product_id: str, kind: str, after_s: float
) -> Interaction:
    """One interaction with a list of ``event``, ``after_s`` seconds after the query."""
    return Interaction(
        event_id=str(uuid.uuid4()),
        query_event_id=event.event_id,
        rewrite_id=rewrite_id,
        product_id=product_id,
        position=0,
        kind=kind,
        event_time=event.event_time + timedelta(seconds=after_s),
    )


# --- a short run's leftovers, for the operator's view (tests/test_status*.py) ---------------------------

# Version → (queries served, reward of each): what the outcome topic says each version earned.
SERVED = {1: (6, 0.20), 2: (5, 0.30), 3: (4, 0.10)}
DEAD = ["malformed_json", "malformed_json", "schema_invalid"]
PAIRS, CONSUMED = 10, 4


def isolated(base: Settings, name: str, db_url: str, blob_dir: Path) -> Settings:
    """``base`` with its own topics, Faust app id, learner name, store and blob directory."""
    topics = base.topics.model_copy(
        update={
            "query_events": f"{name}.query-events",
            "interactions": f"{name}.interactions",
            "preference_pairs": f"{name}.preference-pairs",
            "policy_versions": f"{name}.policy-versions",
            "dead_letter": f"{name}.dead-letter",
            "query_outcomes": f"{name}.query-outcomes",
        }
    )
    return base.model_copy(
        update={
            "topics": topics,
            "streams": base.streams.model_copy(update={"app_id": f"{name}-agg"}),
            "dpo": base.dpo.model_copy(update={"learner_name": name}),
            "database_url": db_url,
            "blob_dir": blob_dir,
        }
    )


def env_of(settings: Settings) -> dict[str, str]:
    """The environment that makes a ``qrloop`` subprocess see ``settings``'s store and topics."""
    t = settings.topics
    return {
        "QRLOOP_DATABASE_URL": settings.db_url,
        "QRLOOP_BLOB_DIR": str(settings.blob_dir),
        "QRLOOP_TOPICS__QUERY_EVENTS": t.query_events,
        "QRLOOP_TOPICS__INTERACTIONS": t.interactions,
        "QRLOOP_TOPICS__PREFERENCE_PAIRS": t.preference_pairs,
        "QRLOOP_TOPICS__POLICY_VERSIONS": t.policy_versions,
        "QRLOOP_TOPICS__DEAD_LETTER": t.dead_letter,
        "QRLOOP_TOPICS__QUERY_OUTCOMES": t.query_outcomes,
        "QRLOOP_STREAMS__APP_ID": settings.streams.app_id,
        "QRLOOP_DPO__LEARNER_NAME": settings.dpo.learner_name,
        "QRLOOP_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
    }


def outcome(n: int, version: int, reward: float) -> QueryOutcome:
    arm = "canary" if version == 3 else "production"
    return QueryOutcome(
        query_event_id=f"q-{version}-{n}",
        event_time=utcnow() - timedelta(seconds=100 - n),
        policy_version=version,
        arm=arm,
        reward=reward,
        relevance=0.6,
        rewards=[reward, reward],
        logprobs=[-5.0, -6.0],
        tie=False,
    )


def short_run(settings: Settings, tmp_path: Path) -> dict[str, int]:
    """What a short run leaves behind, written through the same APIs the loop's roles use.

    v1 starts production; the learner publishes v2 (canary), the canary promotes it; v3 becomes the canary,
    is analysed once (inconclusive), then rolled back (canary → v2, v3 rejected); the learner goes on from
    v2 with v4, which the canary judges with an outcome name this code has never seen. Then the outcome,
    dead-letter and pair topics get their records, and the learner's group commits 4 of the 10 pairs.
    """
    ensure_topics(settings)
    db.upgrade(settings.db_url)
    weights = build_tiny_policy(tmp_path / "tiny", require_policy(settings))
    tags = {"learner": settings.dpo.learner_name}
    with open_store(settings) as store:
        v1 = store.publish(weights, base_model="start", actor="demo").id
        store.set_alias("production", v1, reason="start", actor="demo")
        v2 = store.publish(weights, parent=v1, base_model="start", train_steps=1, tags=tags,
                           metrics={"loss": 0.69, "margin": 0.01}).id  # fmt: skip
        store.set_alias("canary", v2, reason="DPO step 1", actor="learner")
        store.conclude_canary(
            v2, "promote", production_version=v1, reason="better", details={"p_value": 0.01}
        )
        v3 = store.publish(weights, parent=v2, base_model="start", train_steps=2, tags=tags,
                           metrics={"loss": 0.65, "margin": 0.05}).id  # fmt: skip
        store.set_alias("canary", v3, reason="DPO step 2", actor="learner")
        store.record_canary_verdict(
            v3, passed=False, alias="canary", details={"verdict": "continue", "n_canary": 12, "share": 0.1}
        )
        store.conclude_canary(v3, "rollback", production_version=v2, reason="worse: reward -0.2",
                              details={"p_value": 0.002, "n_production": 30, "n_canary": 31,
                                       "mean_production": 0.3, "mean_canary": 0.1})  # fmt: skip
        v4 = store.publish(weights, parent=v2, base_model="start", train_steps=3, tags=tags,
                           metrics={"loss": 0.6, "margin": 0.1}).id  # fmt: skip
        store.record_canary_verdict(v4, passed=False, alias="canary", details={"verdict": "inconclusive"})
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    for version, (queries, reward) in SERVED.items():
        for n in range(queries):
            producer.send(settings.topics.query_outcomes, encode(outcome(n, version, reward)))
    for n, reason in enumerate(DEAD):
        letter = DeadLetter.of(settings.topics.interactions, 0, n, reason, f"bad record {n}", b"{oops")
        producer.send(settings.topics.dead_letter, encode(letter))
    for _ in range(PAIRS):
        producer.send(settings.topics.preference_pairs, key=b"k", value=b"{}", partition=0)
    producer.flush()
    producer.close()
    pairs = TopicPartition(settings.topics.preference_pairs, 0)
    group = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=f"{settings.dpo.learner_name}-learner",
        enable_auto_commit=False,
    )
    group.commit({pairs: OffsetAndMetadata(CONSUMED, "", -1)})
    group.close()
    return {"v1": v1, "v2": v2, "v3": v3, "v4": v4}


# --- learner subprocesses ----------------------------------------------------------------------------


def learner_env(settings: Settings, lease_s: float = 3.0) -> dict[str, str]:
    """The environment of a `qrloop learn` subprocess on the test's topics and store."""
    return run_env(settings) | {
        "QRLOOP_DPO__LEARNING_RATE": str(settings.dpo.learning_rate),
        "QRLOOP_DPO__RPO_ALPHA": str(settings.dpo.rpo_alpha),
        # A killed learner's lease must lapse before another may train: keep that wait short.
        "QRLOOP_DPO__LEASE_S": str(lease_s),
    }


def serve_and_click(port: int, interactions_topic: str, bootstrap: str, queries: int = 16) -> None:
    """Queries through a running `qrloop serve` on ``port``; each shopper then clicks a different number
    of products on the two lists (0, 1, 2 of the first rewrite's, one of the original's), so with margin 0
    every query whose lists differ makes a pair."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for n in range(queries):
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/rewrite",
            data=json.dumps({"query": ["angle bracket", "cordless drill", "led bulb"][n % 3]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            event = QueryEvent.model_validate_json(response.read())
        clicks = {"r1": event.rewrites[0].products[: n % 3], "original": event.original_products[:1]}
        for item in feedback(event, clicks):
            producer.send(interactions_topic, key=item.kafka_key(), value=encode(item))
    producer.flush()
    producer.close()


def ledger_counts(settings: Settings) -> dict[str, int]:
    """Pair id → how many times a training record trained it (exactly-once means every value is 1)."""
    engine = db.make_engine(settings.db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(SqlTrainingRecord.pair_id, sa.func.count()).group_by(SqlTrainingRecord.pair_id)
        ).all()
    engine.dispose()
    return {pid: n for pid, n in rows}
