"""Topics are created by the project with the configured layout (the broker does not auto-create)."""

from __future__ import annotations

import pytest
from kafka import KafkaAdminClient

from qrloop.settings import Settings
from qrloop.topics import TopicLayoutError, declared_topics, ensure_topics


def test_creates_with_configured_partitions_and_is_idempotent(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str
) -> None:
    topics = base_settings.topics.model_copy(
        update={
            "query_events": f"{unique_topic}.q",
            "interactions": f"{unique_topic}.i",
            "preference_pairs": f"{unique_topic}.p",
            "policy_versions": f"{unique_topic}.v",
            "dead_letter": f"{unique_topic}.d",
            "partitions": 3,
        }
    )
    settings = base_settings.model_copy(update={"topics": topics})
    created = ensure_topics(settings)
    assert sorted(created) == sorted(declared_topics(settings))
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    layout = {t["topic"]: len(t["partitions"]) for t in admin.describe_topics(created)}
    admin.close()
    assert layout[f"{unique_topic}.q"] == 3 and layout[f"{unique_topic}.i"] == 3
    assert layout[f"{unique_topic}.v"] == 1
    assert ensure_topics(settings) == created, "a second call is a no-op"

    wrong = settings.model_copy(update={"topics": topics.model_copy(update={"partitions": 5})})
    with pytest.raises(TopicLayoutError, match="has 3 partitions, settings say 5"):
        ensure_topics(wrong)
