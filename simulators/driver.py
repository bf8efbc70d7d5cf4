"""The shoppers process: simulated shoppers search through the rewriter and their feedback goes to Kafka.

For each query the driver draws a training-split query and a profile, asks the rewriter service (HTTP, as a
search front end would) for the QueryEvent, lets the judge decide what the shopper does with each of the three
lists, and publishes the resulting interactions keyed by the query event id, followed by a ``SessionEnd`` that
says how many distinct interactions were sent (so the aggregator can close the window early).

Event times are the query's time plus each interaction's simulated delay; delivery is in the simulator's
(jittered, occasionally duplicated) order and immediate, so a demo does not wait out real shopping delays
while the aggregator still judges everything by event time.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta

from kafka import KafkaProducer

from qrloop.catalog import Catalog
from qrloop.events import Interaction, QueryEvent, SessionEnd, encode
from qrloop.settings import Settings, get_settings
from qrloop.topics import make_producer
from simulators.judge import ClickModelJudge
from simulators.shoppers import ShopperTraffic, SimInteraction

log = logging.getLogger("qrloop.shoppers")


def ask_rewriter(
    url: str, query: str, shopper_id: str, session_id: str, timeout_s: float = 120.0
) -> QueryEvent:
    body = json.dumps({"query": query, "shopper_id": shopper_id, "session_id": session_id}).encode()
    request = urllib.request.Request(
        f"{url}/rewrite", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return QueryEvent.model_validate_json(response.read())


def feedback_events(
    event: QueryEvent, simulated: list[SimInteraction]
) -> tuple[list[Interaction], SessionEnd]:
    """Map the simulator's interactions onto the wire schema, in the simulator's delivery order."""
    interactions = [
        Interaction(
            event_id=str(uuid.uuid4()),
            query_event_id=event.event_id,
            rewrite_id=s.list_key,
            product_id=s.product_id,
            position=s.position,
            kind=s.kind,
            event_time=event.event_time + timedelta(seconds=s.delay_s),
        )
        for s in simulated
    ]
    distinct = {(i.rewrite_id, i.product_id, i.kind) for i in interactions}
    last = max((i.event_time for i in interactions), default=event.event_time)
    end = SessionEnd(
        query_event_id=event.event_id,
        shopper_id=event.shopper_id,
        interactions_sent=len(distinct),
        event_time=last,
    )
    return interactions, end


def lists_of(event: QueryEvent) -> dict[str, list[str]]:
    lists = {"original": list(event.original_products)}
    lists.update({r.rewrite_id: list(r.products) for r in event.rewrites})
    return lists


class ShopperDriver:
    def __init__(
        self, settings: Settings, rewriter_url: str, producer: KafkaProducer, traffic: ShopperTraffic
    ) -> None:
        self.settings = settings
        self.rewriter_url = rewriter_url
        self.producer = producer
        self.traffic = traffic

    def one(self) -> QueryEvent:
        _query_id, query, profile = self.traffic.next_query()
        event = ask_rewriter(self.rewriter_url, query, profile.shopper_id, str(uuid.uuid4()))
        simulated = self.traffic.interactions(profile, query, lists_of(event))
        interactions, end = feedback_events(event, simulated)
        topic = self.settings.topics.interactions
        key = event.event_id.encode()
        for interaction in interactions:
            self.producer.send(topic, key=key, value=encode(interaction))
        self.producer.send(topic, key=key, value=encode(end))
        return event

    def run(self, queries: int, rate_per_s: float = 0.0) -> Iterator[QueryEvent]:
        for _ in range(queries):
            started = time.perf_counter()
            yield self.one()
            if rate_per_s > 0:
                time.sleep(max(0.0, 1.0 / rate_per_s - (time.perf_counter() - started)))
        self.producer.flush()


def build(settings: Settings, rewriter_url: str) -> ShopperDriver:
    catalog = Catalog.open(settings)
    traffic = ShopperTraffic(
        settings, catalog, ClickModelJudge.default(settings, catalog), seed=settings.seed
    )
    producer = make_producer(settings)
    return ShopperDriver(settings, rewriter_url, producer, traffic)


def run(queries: int, rewriter_url: str, rate_per_s: float = 0.0) -> None:
    """``qrloop shop``: send ``queries`` simulated shoppers through the rewriter."""
    driver = build(get_settings(), rewriter_url)
    for n, event in enumerate(driver.run(queries, rate_per_s), start=1):
        log.info(
            "query %d/%d %r -> %r / %r",
            n,
            queries,
            event.query,
            event.rewrites[0].text,
            event.rewrites[1].text,
        )


def wait_until_ready(url: str, timeout_s: float) -> None:
    """Block until the rewriter answers /readyz (it loads a model first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the rewriter at {url} was not ready within {timeout_s} s")
        time.sleep(0.5)
