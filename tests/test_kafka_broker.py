"""The real broker with kafka-python: the producer/consumer guarantees every later component relies on."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

N_EVENTS = 1000
PARTITIONS = 4


def _create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    admin.close()


def _produce(bootstrap: str, topic: str, n: int) -> None:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,  # the broker de-duplicates retried batches: no event twice
        acks="all",
        key_serializer=str.encode,
        value_serializer=lambda v: json.dumps(v).encode(),
    )
    for i in range(n):
        # Keys spread events over partitions; the per-key sequence checks order within a partition.
        producer.send(topic, key=f"shopper-{i % 37}", value={"seq": i, "shopper": i % 37})
    producer.flush()
    producer.close()


def test_thousand_events_arrive_once_and_in_order_per_partition(
    kafka_bootstrap: str, unique_topic: str
) -> None:
    _create_topic(kafka_bootstrap, unique_topic, PARTITIONS)
    _produce(kafka_bootstrap, unique_topic, N_EVENTS)

    consumer = KafkaConsumer(
        unique_topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=f"{unique_topic}-g",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=10000,
    )
    seen: list[int] = []
    per_partition: dict[int, list[int]] = defaultdict(list)
    for message in consumer:
        seq = json.loads(message.value)["seq"]
        seen.append(seq)
        per_partition[message.partition].append(seq)
        if len(seen) >= N_EVENTS:
            break
    consumer.close()

    assert sorted(seen) == list(range(N_EVENTS)), "every event exactly once"
    assert len(per_partition) == PARTITIONS, "keys spread over every partition"
    for partition, seqs in per_partition.items():
        assert seqs == sorted(seqs), f"partition {partition} delivered out of order"


def test_consumer_group_of_two_shares_the_partitions(kafka_bootstrap: str, unique_topic: str) -> None:
    _create_topic(kafka_bootstrap, unique_topic, PARTITIONS)
    group = f"{unique_topic}-shared"
    lock = threading.Lock()
    consumed: dict[str, set[int]] = {"a": set(), "b": set()}
    assigned: dict[str, set[int]] = {"a": set(), "b": set()}
    stop = threading.Event()

    def member(name: str) -> None:
        consumer = KafkaConsumer(
            unique_topic,
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        while not stop.is_set():
            batch = consumer.poll(timeout_ms=200)
            with lock:
                assigned[name] = {tp.partition for tp in consumer.assignment()}
                for messages in batch.values():
                    consumed[name].update(json.loads(m.value)["seq"] for m in messages)
            consumer.commit()
        consumer.close()

    threads = [threading.Thread(target=member, args=(name,), daemon=True) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    # Produce only once the group has settled with both members, so the split is the group's doing.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            settled = (
                assigned["a"] and assigned["b"] and (assigned["a"] | assigned["b"]) == set(range(PARTITIONS))
            )
        if settled:
            break
        time.sleep(0.2)
    assert settled, f"the group never settled with both members: {assigned}"
    _produce(kafka_bootstrap, unique_topic, 400)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with lock:
            if len(consumed["a"] | consumed["b"]) >= 400:
                break
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)

    assert not (assigned["a"] & assigned["b"]), "no partition is assigned to both members"
    assert consumed["a"] and consumed["b"], "both members received events"
    assert not (consumed["a"] & consumed["b"]), "no event went to both members"
    assert consumed["a"] | consumed["b"] == set(range(400)), "together they consumed everything"
