"""Logged traffic on the real broker: export → replay round trip, malformed lines, the same log twice through
the Faust aggregator (identical pairs) and through the learner (identical version digests), and off-policy
evaluation from a log file (the serving policy's estimate is its logged mean; a known candidate value is
inside the confidence intervals)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer

from learner.ope import CandidateScorer
from learner.worker import build
from policy_store import db
from qrloop import rewards
from qrloop.cli.evaluate import evaluate, evaluate_events
from qrloop.events import (
    DeadLetter,
    Interaction,
    PreferencePair,
    QueryEvent,
    Rewrite,
    SessionEnd,
    decode,
)
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import isolate, open_store, run_env
from qrloop.settings import REPO_ROOT, Settings
from qrloop.topics import ensure_topics
from streams.replay import (
    LogFormatError,
    attribute,
    export_log,
    in_event_time_order,
    parse,
    read_source,
    replay,
    write_log,
)
from tests.helpers import feedback

# End to end (real processes, the real model or minutes of traffic): `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

QUERIES = ["angle bracket", "cordless drill", "toungh groove", "paint storage contaiers", "shower faucet"]
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def make_query(
    n: int,
    at: datetime,
    texts: tuple[str, str],
    lists: tuple[list[str], list[str], list[str]],
    logps: Sequence[float],
) -> QueryEvent:
    original, first, second = lists
    return QueryEvent(
        event_id=f"q-{n:04d}-{uuid.uuid4().hex[:6]}",
        event_time=at,
        shopper_id=f"s{n % 7}",
        session_id=f"x{n}",
        query=QUERIES[n % len(QUERIES)],
        policy_version=1,
        original_products=original,
        rewrites=[
            Rewrite(rewrite_id="r1", text=texts[0], logprob=logps[0], products=first),
            Rewrite(rewrite_id="r2", text=texts[1], logprob=logps[1], products=second),
        ],
    )


def traffic_log(ids: Sequence[str], queries: int, seed: int) -> list[QueryEvent | Interaction | SessionEnd]:
    """A few dozen queries a second apart, each rewrite's list clicked a random number of times."""
    rng = random.Random(seed)
    events: list[QueryEvent | Interaction | SessionEnd] = []
    for n in range(queries):
        picks = rng.sample(list(ids), 12)
        lists = (picks[0:4], [picks[0], *picks[4:7]], [picks[1], *picks[7:10]])
        texts = (f"{QUERIES[n % len(QUERIES)]} {rng.choice(['kit', 'steel', 'set'])}", f"rewrite {n}")
        event = make_query(n, T0 + timedelta(seconds=n), texts, lists, (-5.0 - rng.random(), -6.0))
        clicks = {"r1": lists[1][: rng.randint(0, 3)], "r2": lists[2][: rng.randint(0, 3)]}
        events += [event, *feedback(event, clicks)]
    return events


@pytest.fixture(autouse=True)
def plumbing_rewards(base_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay and OPE are about moving and re-scoring logged traffic, not about the reward's shape (that is
    test_rewards.py's): here the reward is the paper's hand-checkable weighted mean, and every new product
    counts for the gain (τ = 0), in this process and in the roles it starts (undone after each test)."""
    monkeypatch.setenv("QRLOOP_REWARDS__RANKING", "paper")
    monkeypatch.setenv("QRLOOP_REWARDS__RELEVANT_ABOVE", "0")
    plumbing = base_settings.rewards.model_copy(update={"ranking": "paper", "relevant_above": 0.0})
    monkeypatch.setattr(base_settings, "rewards", plumbing)


def isolated(base: Settings, name: str, **update: object) -> Settings:
    """An isolated run (``qrloop.runs.isolate``; the store stays ``base``'s unless ``update`` names one) with
    two partitions, a quick watermark and batches of 8."""
    settings = isolate(base, name, None)
    topics = settings.topics.model_copy(update={"partitions": 2})
    streams = settings.streams.model_copy(update={"idle_advance_s": 1.0, "tick_s": 0.2})
    dpo = settings.dpo.model_copy(update={"batch_size": 8, "learning_rate": 1e-4})
    settings = settings.model_copy(update={"topics": topics, "streams": streams, "dpo": dpo, **update})
    ensure_topics(settings)
    return settings


def env_for(settings: Settings) -> dict[str, str]:
    s = settings.streams
    return run_env(settings) | {
        "QRLOOP_STREAMS__IDLE_ADVANCE_S": str(s.idle_advance_s),
        "QRLOOP_STREAMS__TICK_S": str(s.tick_s),
        "QRLOOP_CACHE_DIR": str(settings.cache_dir),
        # The log is from 2025: older than event_time.max_age_s, which a replay of old traffic must raise.
        "QRLOOP_EVENT_TIME__MAX_AGE_S": "1e10",
    }


def read_all(settings: Settings, topic: str, expect: int, timeout_s: float = 60) -> list[bytes]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=500,
    )
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(values) < expect and time.monotonic() < deadline:
        values += [m.value for m in consumer]
    consumer.close()
    return values


def stub_relevance(query: str, products: Sequence[str]) -> list[float]:
    return [0.5 for _ in products]


@pytest.fixture(scope="module")
def product_ids() -> list[str]:
    from qrloop.catalog import Catalog

    return Catalog.open(Settings()).dataset.products["product_id"].head(60).tolist()


# -- the log format ----------------------------------------------------------------------------------------


def test_malformed_lines_are_named_by_line_number_or_dead_lettered(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path, product_ids: list[str]
) -> None:
    settings = isolated(base_settings, unique_topic)
    events = traffic_log(product_ids, 3, seed=1)
    path = write_log(events, tmp_path / "log.jsonl")
    lines = path.read_bytes().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"\n".join([*lines[:2], b'{"schema_version": 1, "type": "click"', *lines[2:], b""]))

    with pytest.raises(LogFormatError, match=r"broken.jsonl: line 3: malformed_json") as info:
        parse(read_source(str(broken), kafka_bootstrap))
    assert info.value.record.position == 3 and info.value.reason == "malformed_json"

    report = replay(settings, str(broken), dead_letter=True)
    assert report.published == len(events) and report.dead_lettered == 1
    letters = [decode(DeadLetter, v) for v in read_all(settings, settings.topics.dead_letter, 1)]
    assert [(x.reason, x.offset, x.source_topic) for x in letters] == [("malformed_json", 3, str(broken))]
    assert letters[0].original_bytes() == b'{"schema_version": 1, "type": "click"'


def test_export_replay_round_trip(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path, product_ids: list[str]
) -> None:
    events = traffic_log(product_ids, 12, seed=2)
    # Written shuffled: the log's order is event time whatever the file's order.
    shuffled = list(events)
    random.Random(0).shuffle(shuffled)
    source = write_log(shuffled, tmp_path / "shuffled.jsonl")
    first = isolated(base_settings, f"{unique_topic}-a")
    report = replay(first, str(source))
    assert report.by_topic == {
        first.topics.query_events: 12,
        first.topics.interactions: len(events) - 12,
    }
    exported = export_log(first, tmp_path / "exported.jsonl")
    assert (exported.queries, exported.interactions + exported.session_ends) == (12, len(events) - 12)
    again = parse(read_source(str(exported.path), kafka_bootstrap)).events
    assert again == in_event_time_order(events)
    assert [e.event_time for e in again] == sorted(e.event_time for e in events)

    # The exported log replays onto fresh topics and exports to the same bytes; Parquet holds the same events.
    second = isolated(base_settings, f"{unique_topic}-b")
    replay(second, str(exported.path), rate=200)
    assert export_log(second, tmp_path / "again.jsonl").path.read_bytes() == exported.path.read_bytes()
    parquet = write_log(again, tmp_path / "log.parquet")
    assert parse(read_source(str(parquet), kafka_bootstrap)).events == again
    # A topic range is a source too: the first two offsets of every partition of the query topic.
    ranged = parse(read_source(f"kafka:{second.topics.query_events}:0-2", kafka_bootstrap)).events
    assert len(ranged) == 4 and all(isinstance(e, QueryEvent) for e in ranged)


# -- determinism -------------------------------------------------------------------------------------------


def run_aggregator(settings: Settings, log_path: Path, expect: int, out: Path) -> dict[str, PreferencePair]:
    """The real Faust worker over the replayed topics until ``expect`` pairs arrived (and 3 s of quiet)."""
    sink = out.open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "qrloop", "aggregate"],
        cwd=REPO_ROOT,
        env=env_for(settings),
        stdout=sink,
        stderr=subprocess.STDOUT,
    )
    pairs: dict[str, PreferencePair] = {}
    consumer = KafkaConsumer(
        settings.topics.preference_pairs,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=500,
    )
    try:
        deadline = time.monotonic() + 150
        while len(pairs) < expect and time.monotonic() < deadline:
            assert worker.poll() is None, out.read_text()[-3000:]
            for message in consumer:
                pair = decode(PreferencePair, message.value)
                pairs[pair.pair_id] = pair
        time.sleep(3)
        for message in consumer:
            pair = decode(PreferencePair, message.value)
            assert pair.pair_id not in pairs or pairs[pair.pair_id] == pair
            pairs[pair.pair_id] = pair
    finally:
        consumer.close()
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        sink.close()
    return pairs


def test_same_log_twice_through_the_aggregator_gives_identical_pairs(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path, product_ids: list[str]
) -> None:
    from streams.aggregator import make_relevance_fn

    events = traffic_log(product_ids, 24, seed=3)
    path = write_log(events, tmp_path / "log.jsonl")
    # The reference: the aggregator's pure functions over the log in event-time order, with the same M1.
    expected = {
        p.pair_id: p for p in attribute(events, make_relevance_fn(base_settings), base_settings).pairs
    }
    assert 8 <= len(expected) < 24, "some queries are ties, most are pairs"

    runs = []
    for name, rate in (("a", 0.0), ("b", 150.0)):  # as fast as possible, then paced: event time decides
        settings = isolated(base_settings, f"{unique_topic}-{name}")
        replay(settings, str(path), rate=rate)
        runs.append(run_aggregator(settings, path, len(expected), tmp_path / f"aggregator-{name}.log"))
    assert runs[0] == runs[1], "the same log gives the same pairs"
    # Against the in-process reference, rewards agree to float32 noise: M1 run in another process (other
    # memory layout) may differ in the 8th digit, while two runs of the worker agree to the bit (above).
    assert set(runs[0]) == set(expected)
    for pair_id, pair in runs[0].items():
        reference = expected[pair_id]
        assert (pair.chosen, pair.rejected, pair.event_time) == (
            reference.chosen,
            reference.rejected,
            reference.event_time,
        )
        assert pair.chosen_reward == pytest.approx(reference.chosen_reward, abs=1e-6)
        assert pair.rejected_reward == pytest.approx(reference.rejected_reward, abs=1e-6)


def digests_of_a_replay(base: Settings, name: str, log_path: Path, tiny: Path, tmp_path: Path) -> list[str]:
    settings = isolated(base, name, database_url=f"sqlite:///{tmp_path / name}.db", blob_dir=tmp_path / name)
    db.upgrade(settings.db_url)
    store = open_store(settings)
    start = store.publish(tiny, base_model="tiny-llama", actor="test")
    store.set_alias("production", start.id, reason="start", actor="test")
    report = replay(settings, str(log_path), in_process=True, relevance=stub_relevance)
    assert report.by_topic == {settings.topics.preference_pairs: report.published}
    learner = build(settings)
    published: list[int] = []
    deadline = time.monotonic() + 120
    while len(published) < report.published // 8 and time.monotonic() < deadline:
        version = learner.run_once(timeout_ms=300)
        if version:
            published.append(version)
    learner.consumer.close()
    learner.producer.close()
    digests = [store.get(v).blob_digest for v in published]
    store.close()
    return digests


def test_same_log_twice_through_the_learner_gives_identical_version_digests(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path, product_ids: list[str]
) -> None:
    tiny = build_tiny_policy(tmp_path / "tiny", require_policy(base_settings))
    path = write_log(traffic_log(product_ids, 40, seed=4), tmp_path / "log.jsonl")
    first = digests_of_a_replay(base_settings, f"{unique_topic}-a", path, tiny, tmp_path)
    second = digests_of_a_replay(base_settings, f"{unique_topic}-b", path, tiny, tmp_path)
    assert len(first) >= 3
    assert len(set(first)) == len(first), "every step changed the weights"
    assert first == second, "the same log gives bit-identical versions"


# -- off-policy evaluation from a log file -----------------------------------------------------------------

SUPPORT = ["bracket", "steel angle bracket", "corner brace", "shelf bracket kit"]
BEHAVIOUR = [0.4, 0.3, 0.2, 0.1]
CANDIDATE = [0.1, 0.2, 0.3, 0.4]
CLICKS = [0, 1, 2, 4]  # clicks each text's list earns, of its four products


def known_reward(clicks: int) -> float:
    # Stub relevance 0.5, diversity 1 (the rewrite's four products are all new), click rate clicks / 4.
    return rewards.RewardComponents(0.5, 1.0, clicks / 4, 0.0, 0.0).combined(Settings().rewards)


def test_ope_covers_an_analytically_known_candidate_value(base_settings: Settings, tmp_path: Path) -> None:
    rng = random.Random(11)
    events: list[QueryEvent | Interaction | SessionEnd] = []
    for n in range(300):
        picks = [rng.choices(range(4), BEHAVIOUR)[0] for _ in range(2)]
        lists = [[f"p{n}-{k}-{j}" for j in range(4)] for k in picks]
        event = make_query(
            n,
            T0 + timedelta(seconds=n),
            (SUPPORT[picks[0]], SUPPORT[picks[1]]),
            ([f"o{n}-{j}" for j in range(4)], lists[0], lists[1]),
            [math.log(BEHAVIOUR[k]) for k in picks],
        )
        clicks = {"r1": lists[0][: CLICKS[picks[0]]], "r2": lists[1][: CLICKS[picks[1]]]}
        events += [event, *feedback(event, clicks)]
    path = write_log(events, tmp_path / "synthetic.jsonl")
    logged = parse(read_source(str(path), "unused")).events

    def scorer_for(probs: list[float]) -> CandidateScorer:
        def score(queries: Sequence[QueryEvent]) -> list[tuple[float, float]]:
            return [tuple(math.log(probs[SUPPORT.index(r.text)]) for r in q.rewrites) for q in queries]  # type: ignore[misc]

        return score

    truth = sum(p * known_reward(c) for p, c in zip(CANDIDATE, CLICKS, strict=True))
    behaviour_value = sum(p * known_reward(c) for p, c in zip(BEHAVIOUR, CLICKS, strict=True))
    result = evaluate_events(logged, scorer_for(CANDIDATE), stub_relevance, base_settings)
    est = result.estimate
    assert result.queries == 300 and est.n == 600
    assert est.ips_ci[0] <= truth <= est.ips_ci[1], (truth, est)
    assert est.snips_ci[0] <= truth <= est.snips_ci[1], (truth, est)
    assert not est.ips_ci[0] <= behaviour_value <= est.ips_ci[1], "the estimate tells the policies apart"
    assert abs(result.logged_mean_reward - behaviour_value) < 0.02
    same = evaluate_events(logged, scorer_for(BEHAVIOUR), stub_relevance, base_settings).estimate
    assert same.ips == pytest.approx(result.logged_mean_reward) and same.ess == pytest.approx(600)


def test_evaluate_command_on_the_serving_policy_gives_its_logged_mean(
    base_settings: Settings, tmp_path: Path, product_ids: list[str]
) -> None:
    """``qrloop evaluate`` with the real M1 and a policy-store version: π = b, so every weight is 1."""
    from qrloop.catalog import Catalog
    from qrloop.models import load_policy
    from qrloop.relevance import RelevanceModel

    tiny = build_tiny_policy(tmp_path / "tiny", require_policy(base_settings))
    other = build_tiny_policy(tmp_path / "other", require_policy(base_settings), seed=1)
    settings = store_in(base_settings, tmp_path)
    with open_store(settings) as store:
        serving = store.publish(tiny, base_model="tiny-llama", actor="test")
        candidate = store.publish(other, base_model="tiny-llama", actor="test")
    events = served_by(*load_policy(tiny), traffic_log(product_ids, 16, seed=5))
    queries = [e for e in events if isinstance(e, QueryEvent)]
    path = write_log(events, tmp_path / "served.jsonl")

    env = dict(os.environ, QRLOOP_DATABASE_URL=settings.db_url, QRLOOP_BLOB_DIR=str(settings.blob_dir))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "qrloop",
            "evaluate",
            "--candidate",
            str(serving.id),
            "--log",
            str(path),
            "--json",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    # Hand-computed rewards: M1 relevance of each list, diversity against the original, click rate.
    m1, catalog = RelevanceModel.load(settings), Catalog.open(settings)
    clicks: dict[tuple[str, str], int] = {}
    for e in events:
        if isinstance(e, Interaction):
            clicks[(e.query_event_id, e.rewrite_id)] = clicks.get((e.query_event_id, e.rewrite_id), 0) + 1
    by_hand = [
        rewards.components(
            q.original_products,
            r.products,
            list(m1.score(q.query, [catalog.text(p) for p in r.products])),
            clicks.get((q.event_id, r.rewrite_id), 0),
            0,
            0,
        ).combined(settings.rewards)
        for q in queries
        for r in q.rewrites
    ]
    mean = sum(by_hand) / len(by_hand)
    assert report["queries"] == 16 and report["n"] == 32
    assert report["logged_mean_reward"] == pytest.approx(mean, abs=1e-5)
    assert report["ips"] == pytest.approx(mean, abs=1e-4) and report["snips"] == pytest.approx(mean, abs=1e-4)
    assert report["ess"] == pytest.approx(32, rel=1e-3) and report["warning"] is None

    # Another version is another policy: its weights are far from 1 and the estimate moves.
    other_eval = evaluate(settings, candidate.id, str(path), relevance=stub_relevance)
    assert other_eval.estimate.ess < 31 and abs(other_eval.estimate.ips - mean) > 1e-3


def test_evaluate_scores_the_candidate_over_the_vocabulary_its_rewriter_serves(
    base_settings: Settings, tmp_path: Path, product_ids: list[str]
) -> None:
    """A log written by a catalog-vocabulary rewriter (``rewriter.vocabulary = catalog``) has the restricted
    policy's log-probabilities. Evaluated over the same vocabulary, the serving version is its own behaviour
    policy (every weight 1); over the full vocabulary every weight read low by the restriction's mass."""
    from qrloop.models import load_policy
    from qrloop.vocabulary import output_vocabulary, restrict_output_vocabulary

    tiny = build_tiny_policy(tmp_path / "tiny", require_policy(base_settings))
    settings = store_in(base_settings, tmp_path)
    with open_store(settings) as store:
        serving = store.publish(tiny, base_model="tiny-llama", actor="test")
    events = traffic_log(product_ids, 16, seed=5)
    queries = [e for e in events if isinstance(e, QueryEvent)]
    texts = [text for q in queries for text in (q.query, *(r.text for r in q.rewrites))]
    model, tokenizer = load_policy(tiny)
    restrict_output_vocabulary(model, output_vocabulary(tokenizer, texts))
    path = write_log(served_by(model, tokenizer, events), tmp_path / "served.jsonl")

    restricted = evaluate(settings, serving.id, str(path), stub_relevance, vocabulary_texts=texts)
    full = evaluate(settings, serving.id, str(path), stub_relevance)
    print(f"mean weight over the served vocabulary {restricted.mean_weight:.4f}, all {full.mean_weight:.4f}")
    assert restricted.mean_weight == pytest.approx(1.0, abs=1e-4)
    assert restricted.estimate.ess == pytest.approx(32, rel=1e-3)
    assert full.mean_weight < 0.9 and full.mean_log_ratio < 0


def store_in(base: Settings, tmp_path: Path) -> Settings:
    """``base`` with a fresh SQLite policy store and blob directory in ``tmp_path``."""
    settings = base.model_copy(
        update={"database_url": f"sqlite:///{tmp_path / 'store.db'}", "blob_dir": tmp_path / "blobs"}
    )
    db.upgrade(settings.db_url)
    return settings


def served_by(model: Any, tokenizer: Any, events: list[Any]) -> list[Any]:
    """``events`` with each rewrite's log-probability as the rewriter logs it under ``model``: the rewrite's
    tokens and the end of turn."""
    import torch

    from learner.dpo import sequence_logprobs, tokenize_pairs
    from qrloop.prompting import end_of_turn

    queries = [e for e in events if isinstance(e, QueryEvent)]
    batch = tokenize_pairs(
        tokenizer,
        [(q.query, q.rewrites[0].text, q.rewrites[1].text) for q in queries],
        None,
        end_of_turn(tokenizer, model.generation_config),
    )
    with torch.no_grad():
        first, second = sequence_logprobs(model, batch)
    logged = {
        q.event_id: q.model_copy(
            update={
                "rewrites": [
                    q.rewrites[0].model_copy(update={"logprob": float(a)}),
                    q.rewrites[1].model_copy(update={"logprob": float(b)}),
                ]
            }
        )
        for q, a, b in zip(queries, first, second, strict=True)
    }
    return [logged.get(e.event_id, e) if isinstance(e, QueryEvent) else e for e in events]
