"""faust-streaming (over aiokafka) on the real broker: an agent consumes one topic and writes another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic

REPO = Path(__file__).resolve().parent.parent


def test_faust_agent_consumes_and_produces(kafka_bootstrap: str, unique_topic: str, tmp_path: Path) -> None:
    source, sink = f"{unique_topic}-in", f"{unique_topic}-out"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in (source, sink)])
    admin.close()

    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, value_serializer=lambda v: json.dumps(v).encode()
    )
    for seq in range(20):
        producer.send(source, {"seq": seq})
    producer.flush()
    producer.close()

    env = dict(
        os.environ,
        ECHO_APP_ID=f"{unique_topic}-app",
        ECHO_BROKER=kafka_bootstrap,
        ECHO_SOURCE=source,
        ECHO_SINK=sink,
        ECHO_DATADIR=str(tmp_path / "faust"),
        PYTHONPATH=str(REPO),
    )
    log = (tmp_path / "faust.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.faust_echo_app", "worker", "-l", "info"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        consumer = KafkaConsumer(
            sink,
            bootstrap_servers=kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            consumer_timeout_ms=1000,
        )
        received: list[dict[str, int]] = []
        deadline = time.monotonic() + 90
        while len(received) < 20 and time.monotonic() < deadline:
            assert worker.poll() is None, f"the Faust worker exited:\n{(tmp_path / 'faust.log').read_text()}"
            received.extend(json.loads(m.value) for m in consumer)
        consumer.close()
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        log.close()

    assert sorted(r["seq"] for r in received) == list(range(20)), (tmp_path / "faust.log").read_text()[-3000:]
    assert all(r["doubled"] == 2 * r["seq"] for r in received)
