"""Topics are created by the project with the configured layout (the broker does not auto-create)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from kafka import KafkaAdminClient

from qrloop.settings import Settings
from qrloop.topics import TopicLayoutError, declared_topics, ensure_topics, grow_topics


@pytest.fixture
def admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    yield client
    client.close()


@pytest.fixture
def cleanup(admin: KafkaAdminClient) -> Iterator[list[str]]:
    """Topics a test created; deleted afterwards so the shared broker does not accumulate them."""
    created: list[str] = []
    yield created
    present = set(admin.list_topics())
    doomed = [t for t in created if t in present]
    if doomed:
        admin.delete_topics(doomed)


def layout(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    return {t["topic"]: len(t["partitions"]) for t in admin.describe_topics(names)}


def test_creates_the_declared_topics_with_configured_partitions(
    base_settings: Settings, admin: KafkaAdminClient, unique_topic: str, cleanup: list[str]
) -> None:
    topics = base_settings.topics.model_copy(
        update={
            "query_events": f"{unique_topic}.q",
            "interactions": f"{unique_topic}.i",
            "preference_pairs": f"{unique_topic}.p",
            "policy_versions": f"{unique_topic}.v",
            "dead_letter": f"{unique_topic}.d",
            "query_outcomes": f"{unique_topic}.o",
            "partitions": 3,
            "pair_partitions": 2,
        }
    )
    settings = base_settings.model_copy(update={"topics": topics})
    assert not set(declared_topics(settings)) & set(admin.list_topics())
    cleanup.extend(declared_topics(settings))

    created = ensure_topics(settings)

    assert sorted(created) == sorted(declared_topics(settings))
    assert layout(admin, created) == {
        f"{unique_topic}.q": 3,
        f"{unique_topic}.i": 3,
        f"{unique_topic}.p": 2,
        f"{unique_topic}.v": 1,
        f"{unique_topic}.d": 1,
        f"{unique_topic}.o": 1,
    }
    assert ensure_topics(settings) == created, "a second call is a no-op"
    assert layout(admin, created)[f"{unique_topic}.q"] == 3

    wrong = settings.model_copy(update={"topics": topics.model_copy(update={"partitions": 5})})
    with pytest.raises(TopicLayoutError, match=rf"{unique_topic}\.q has 3 partitions, settings say 5"):
        ensure_topics(wrong)
    assert layout(admin, [f"{unique_topic}.q"]) == {f"{unique_topic}.q": 3}, "a mismatch changes nothing"


def test_partitioned_by_default_and_grown_on_request(
    admin: KafkaAdminClient, unique_topic: str, cleanup: list[str]
) -> None:
    # Defaults: every high-volume topic has at least 3 partitions, the unit of consumer parallelism.
    defaults = Settings().topics
    assert min(defaults.partitions, defaults.pair_partitions) >= 3
    names = {
        "query_events": f"{unique_topic}.q",
        "interactions": f"{unique_topic}.i",
        "preference_pairs": f"{unique_topic}.p",
        "policy_versions": f"{unique_topic}.v",
        "dead_letter": f"{unique_topic}.d",
        "query_outcomes": f"{unique_topic}.o",
    }
    settings = Settings(topics=defaults.model_copy(update=names))
    cleanup.extend(declared_topics(settings))
    ensure_topics(settings)
    assert layout(admin, [names["query_events"], names["preference_pairs"]]) == {
        names["query_events"]: defaults.partitions,
        names["preference_pairs"]: defaults.pair_partitions,
    }

    # The documented way up: raise the counts in settings, then `qrloop topics grow` (query events and
    # interactions together, so the join stays co-partitioned).
    more = defaults.model_copy(update={**names, "partitions": 6, "pair_partitions": 5})
    grown = grow_topics(Settings(topics=more))
    assert grown == {
        names["query_events"]: (defaults.partitions, 6),
        names["interactions"]: (defaults.partitions, 6),
        names["preference_pairs"]: (defaults.pair_partitions, 5),
    }
    assert ensure_topics(Settings(topics=more)), "the grown layout is now the checked one"
    with pytest.raises(TopicLayoutError, match="cannot remove partitions"):
        grow_topics(Settings(topics=defaults.model_copy(update=names)))


def test_bootstrap_form_needs_explicit_topics_and_races_are_harmless(
    kafka_bootstrap: str, admin: KafkaAdminClient, unique_topic: str, cleanup: list[str]
) -> None:
    with pytest.raises(ValueError, match="name the topics"):
        ensure_topics(kafka_bootstrap)
    wanted = {f"{unique_topic}.a": 2, f"{unique_topic}.b": 1}
    cleanup.extend(wanted)

    # Several processes start at once (aggregator, learner, rewriter): all succeed, the layout is right.
    results: list[list[str] | BaseException] = []

    def racer() -> None:
        try:
            results.append(ensure_topics(kafka_bootstrap, wanted))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=racer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [list(wanted)] * 3
    assert layout(admin, list(wanted)) == wanted

    with pytest.raises(TopicLayoutError, match="has 2 partitions, settings say 4"):
        ensure_topics(kafka_bootstrap, {f"{unique_topic}.a": 4})
