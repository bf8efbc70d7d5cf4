"""Helpers shared by the tests (so that no test module imports another): HTTP probes, waiting, an isolated
daemon environment and store, and the events several tests build."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaProducer

from policy_store import db
from qrloop.events import Interaction, PreferencePair, QueryEvent, Rewrite, SessionEnd, encode, pair_id_for
from qrloop.runs import isolate, open_store, run_env
from qrloop.settings import Settings
from qrloop.topics import ensure_topics


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


def pair(n: int) -> PreferencePair:
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
        event_time=datetime.now(UTC),
    )


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
        kind=kind,  # type: ignore[arg-type]
        event_time=event.event_time + timedelta(seconds=after_s),
    )
