"""`qrloop smoke`: prove the real parts work together, in under a minute.

One JSON event makes a round trip through the Kafka broker, one row through SQLAlchemy into the configured
database, and the real SmolLM2 policy rewrites one real query from the catalog.
"""

from __future__ import annotations

import json
import time
import uuid

import torch
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from rich.console import Console
from sqlalchemy import Column, Integer, MetaData, String, Table, select

from policy_store.db import make_engine
from qrloop import data, models
from qrloop.prompting import build_prompt
from qrloop.settings import Settings
from qrloop.topics import make_producer


def kafka_round_trip(settings: Settings) -> float:
    servers = settings.kafka.bootstrap_servers
    topic = "qrloop.smoke"
    admin = KafkaAdminClient(bootstrap_servers=servers)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        admin.close()
    started = time.perf_counter()
    marker = str(uuid.uuid4())
    producer = make_producer(settings)
    metadata = producer.send(topic, json.dumps({"smoke": marker}).encode()).get(timeout=30)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, consumer_timeout_ms=15000)
    partition = TopicPartition(topic, metadata.partition)
    consumer.assign([partition])
    consumer.seek(partition, metadata.offset)
    for message in consumer:
        if json.loads(message.value)["smoke"] == marker:
            consumer.close()
            return time.perf_counter() - started
    consumer.close()
    raise RuntimeError(f"the smoke event never came back from {topic}")


def database_round_trip(settings: Settings) -> str:
    metadata = MetaData()
    table = Table(
        "qrloop_smoke", metadata, Column("id", Integer, primary_key=True), Column("note", String(64))
    )
    engine = make_engine(settings.db_url)
    note = f"smoke {uuid.uuid4().hex[:8]}"
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            inserted = conn.execute(table.insert().values(note=note)).inserted_primary_key
            assert inserted is not None  # an INSERT always has a primary key
            row_id = inserted[0]
        with engine.connect() as conn:
            read = conn.execute(select(table.c.note).where(table.c.id == row_id)).scalar_one()
        if read != note:
            raise RuntimeError("the row read back differs from the row written")
        return engine.dialect.name
    finally:
        metadata.drop_all(engine)
        engine.dispose()


def one_rewrite(settings: Settings, query: str) -> tuple[str, float]:
    model, tokenizer = models.load_policy(models.require_policy(settings))
    prompt = build_prompt(tokenizer, query)
    inputs = tokenizer(prompt, return_tensors="pt")
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=settings.rewriter.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True).strip()
    return text, time.perf_counter() - started


def run_smoke(settings: Settings, console: Console) -> bool:
    ok = True
    try:
        seconds = kafka_round_trip(settings)
        console.print(f"[green]kafka[/]    one event produced and consumed back in {seconds * 1000:.0f} ms")
    except Exception as exc:
        ok = False
        console.print(f"[red]kafka[/]    {exc} (start the broker: scripts/kafka.sh start)")
    try:
        dialect = database_round_trip(settings)
        console.print(f"[green]database[/] one row written and read back through SQLAlchemy ({dialect})")
    except Exception as exc:
        ok = False
        console.print(f"[red]database[/] {exc}")
    try:
        dataset = data.load_prepared(settings)
        query = str(dataset.train_queries.iloc[0]["query"])
        rewrite, seconds = one_rewrite(settings, query)
        console.print(f"[green]policy[/]   {query!r} -> {rewrite!r} ({seconds * 1000:.0f} ms, greedy)")
    except Exception as exc:
        ok = False
        console.print(f"[red]policy[/]   {exc}")
    return ok
