"""Per-query outcomes, the canary's samples: built by the pure attribution logic, emitted by the real Faust
aggregator for every scored query, ties included (which the pair topic never carries)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from qrloop.catalog import Catalog
from qrloop.events import Interaction, QueryEvent, QueryOutcome, Rewrite, SessionEnd, decode, encode
from qrloop.settings import REPO_ROOT, RewardSettings, Settings
from qrloop.topics import ensure_topics
from streams import attribution


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def query_event(
    products: list[str], arm: str, version: int, references: tuple[float | None, float | None]
) -> QueryEvent:
    return QueryEvent(
        event_id=str(uuid.uuid4()),
        event_time=datetime.now(UTC),
        shopper_id="s1",
        session_id="x",
        query="angle bracket",
        policy_version=version,
        arm=arm,
        original_products=products[0:4],
        rewrites=[
            Rewrite(
                rewrite_id="r1",
                text="metal angle bracket",
                logprob=-3.0,
                products=products[4:8],
                reference_logprob=references[0],
            ),
            Rewrite(
                rewrite_id="r2",
                text="bracket",
                logprob=-2.0,
                products=products[0:4],
                reference_logprob=references[1],
            ),
        ],
    )


def click(event: QueryEvent, rewrite_id: str, product_id: str) -> Interaction:
    return Interaction(
        event_id=str(uuid.uuid4()),
        query_event_id=event.event_id,
        rewrite_id=rewrite_id,
        product_id=product_id,
        position=0,
        kind="click",
        event_time=event.event_time + timedelta(seconds=1),
    )


def test_outcome_carries_arm_version_mean_reward_relevance_and_kl() -> None:
    products = [f"p{i}" for i in range(8)]
    event = query_event(products, "canary", 4, (-3.5, -1.0))
    state = attribution.apply_query(attribution.new_state(), event, window_s=30)
    attribution.apply_interaction(state, click(event, "r1", "p4"), window_s=30)
    relevance = {"p4": 0.9, "p5": 0.7, "p6": 0.5, "p7": 0.3, "p0": 0.2, "p1": 0.2, "p2": 0.2, "p3": 0.2}
    weights = RewardSettings(relevant_above=0.5)
    scored = attribution.score(state, lambda _q, ps: [relevance[p] for p in ps], weights)
    outcome = attribution.outcome(state, scored)
    assert (outcome.arm, outcome.policy_version, outcome.query_event_id) == ("canary", 4, event.event_id)
    assert outcome.rewards == [scored.first_reward, scored.second_reward]
    assert outcome.reward == pytest.approx((scored.first_reward + scored.second_reward) / 2)
    assert outcome.relevance == pytest.approx((0.6 + 0.2) / 2)
    assert outcome.logprobs == [-3.0, -2.0]
    assert outcome.kl_to_reference == pytest.approx(((-3.0 + 3.5) + (-2.0 + 1.0)) / 2)
    assert outcome.tie is False and outcome.event_time == event.event_time
    assert decode(QueryOutcome, encode(outcome)) == outcome, "round-trips strictly"

    production = query_event(products, "production", 3, (None, None))
    state = attribution.apply_query(attribution.new_state(), production, window_s=30)
    tied = attribution.outcome(
        state, attribution.score(state, lambda _q, ps: [0.5] * len(ps), RewardSettings(relevant_above=0.5))
    )
    assert tied.tie is True and tied.kl_to_reference is None and tied.arm == "production"


def test_the_faust_aggregator_emits_an_outcome_per_query_ties_included(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path
) -> None:
    topics = base_settings.topics.model_copy(
        update={
            "query_events": f"{unique_topic}.q",
            "interactions": f"{unique_topic}.i",
            "preference_pairs": f"{unique_topic}.p",
            "policy_versions": f"{unique_topic}.v",
            "dead_letter": f"{unique_topic}.d",
            "query_outcomes": f"{unique_topic}.o",
            "partitions": 1,
        }
    )
    settings = base_settings.model_copy(update={"topics": topics})
    ensure_topics(settings)
    ids = Catalog.open(settings).dataset.products["product_id"].head(8).tolist()
    canary = query_event(ids, "canary", 9, (-2.5, -2.5))
    production = query_event(ids, "production", 8, (None, None))
    tie = production.model_copy(
        update={
            "event_id": str(uuid.uuid4()),
            "rewrites": [r.model_copy(update={"products": ids[0:4]}) for r in production.rewrites],
        }
    )
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    feedback = {canary.event_id: [click(canary, "r1", ids[4])], production.event_id: [], tie.event_id: []}
    for event in (canary, production, tie):
        producer.send(topics.query_events, key=event.kafka_key(), value=encode(event))
        for item in feedback[event.event_id]:
            producer.send(topics.interactions, key=item.kafka_key(), value=encode(item))
        end = SessionEnd(
            query_event_id=event.event_id,
            shopper_id="s1",
            interactions_sent=len(feedback[event.event_id]),
            event_time=event.event_time + timedelta(seconds=2),
        )
        producer.send(topics.interactions, key=end.kafka_key(), value=encode(end))
    producer.flush()
    producer.close()

    env = dict(
        os.environ,
        QRLOOP_TOPICS__QUERY_EVENTS=topics.query_events,
        QRLOOP_TOPICS__INTERACTIONS=topics.interactions,
        QRLOOP_TOPICS__PREFERENCE_PAIRS=topics.preference_pairs,
        QRLOOP_TOPICS__POLICY_VERSIONS=topics.policy_versions,
        QRLOOP_TOPICS__DEAD_LETTER=topics.dead_letter,
        QRLOOP_TOPICS__QUERY_OUTCOMES=topics.query_outcomes,
        QRLOOP_TOPICS__PARTITIONS="1",
        QRLOOP_STREAMS__APP_ID=f"{unique_topic}-agg",
        QRLOOP_CACHE_DIR=str(settings.cache_dir),
        # Every new product counts for the gain (τ = 0), whichever M1 this machine has: the canary's click
        # on a new product is then in its reward by construction.
        QRLOOP_REWARDS__RELEVANT_ABOVE="0",
        PYTHONUNBUFFERED="1",
        # A free port for Faust's worker web server: another aggregator may hold the default 6066.
        FAUST_WEB_PORT=str(free_port()),
    )
    log_path = tmp_path / "aggregator.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "qrloop", "aggregate"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
        )
        consumer = KafkaConsumer(
            topics.query_outcomes,
            bootstrap_servers=kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            consumer_timeout_ms=500,
        )
        outcomes: dict[str, QueryOutcome] = {}
        try:
            deadline = time.monotonic() + 120
            while len(outcomes) < 3 and time.monotonic() < deadline:
                assert worker.poll() is None, log_path.read_text()[-3000:]
                for message in consumer:
                    outcome = decode(QueryOutcome, message.value)
                    outcomes[outcome.query_event_id] = outcome
        finally:
            consumer.close()
            worker.terminate()
            worker.wait(timeout=60)
    assert set(outcomes) == {canary.event_id, production.event_id, tie.event_id}, log_path.read_text()[-3000:]
    assert (outcomes[canary.event_id].arm, outcomes[canary.event_id].policy_version) == ("canary", 9)
    # (-3.0 − -2.5 + -2.0 − -2.5) / 2: the rewriter's logged log-ratios, averaged.
    assert outcomes[canary.event_id].kl_to_reference == pytest.approx(0.0)
    assert outcomes[production.event_id].kl_to_reference is None
    assert outcomes[tie.event_id].tie is True, "a tie is a sample too, though never a pair"
    # The same lists as the production query, plus one click: the click is in the canary's reward.
    assert outcomes[canary.event_id].reward > outcomes[production.event_id].reward
