"""The canary job deciding between two real models that differ by construction, end to end on the real broker.

A tiny policy, and a deliberately damaged copy of it whose every rewrite is empty: its weights are edited so
that the end-of-turn token wins the first step whatever the prompt (a constant residual dimension read by the
language-model head only for that token). An empty rewrite retrieves nothing, so it earns nothing (relevance
0 by definition, nothing to click): the damaged copy is worse by construction and the intact policy better.
Every outcome comes from the rewriter actually serving both arms (``ArmedRewriter``), scored by the
aggregator's own attribution code, published to the outcome topic and judged by ``CanaryJob.tick``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kafka import KafkaProducer
from transformers import AutoModelForCausalLM, AutoTokenizer

from policy_store import PolicyStore, db
from qrloop.canary_job import CanaryJob, Decision
from qrloop.events import encode
from qrloop.models import build_tiny_policy, require_policy
from qrloop.prompting import end_of_turn
from qrloop.runs import open_store
from qrloop.serving import Rewriter, load_version, start_arms
from qrloop.settings import CanarySettings, RewriterSettings, Settings
from qrloop.topics import ensure_topics
from streams import attribution
from tests.helpers import clicked_state

# End to end (real processes, the real model or minutes of traffic): `pytest -m 'not slow'` leaves them out.
pytestmark = pytest.mark.slow

CONFIG = CanarySettings(share_steps=[0.5], interval_s=1.0)
QUERIES = ["drill bit", "paint roller", "garden hose", "wood screws", "led bulb", "door hinge"]


def search(text: str) -> list[str]:
    return [f"p{abs(hash(w)) % 50}" for w in text.split()][:10]


def damaged_copy(source: Path, out: Path) -> Path:
    """``source`` edited so that generation stops at once: residual dimension 0 is 1 for every token and no
    layer writes to it, and the head weighs it a thousandfold for the end-of-turn token."""
    model = AutoModelForCausalLM.from_pretrained(str(source))
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    stop = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer, model.generation_config))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        embeddings = model.get_input_embeddings().weight
        assert isinstance(embeddings, torch.Tensor)  # nn.Module's __getattr__ is typed "Tensor | Module"
        embeddings[:, 0] = 1.0  # the residual's constant
        head = model.get_output_embeddings().weight
        if head.data_ptr() != embeddings.data_ptr():  # untied: the head reads dimension 0 for one token only
            head[:, 0] = 0.0
        # Tied: every token's logit also gets the same +constant, which softmax ignores.
        head[stop, 0] = 1000.0
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    intact = build_tiny_policy(tmp_path_factory.mktemp("intact"), require_policy(Settings()), seed=0)
    return intact, damaged_copy(intact, tmp_path_factory.mktemp("damaged"))


def test_the_damaged_copy_rewrites_to_nothing_and_the_intact_policy_does_not(
    policies: tuple[Path, Path],
) -> None:
    intact, damaged = (
        Rewriter(load_version(p, v), search, RewriterSettings(max_new_tokens=4))
        for v, p in enumerate(policies)
    )
    for query in QUERIES:
        assert all(
            r.text == "" and r.products == []
            for r in damaged.serve(query, shopper_id="s", session_id="x").rewrites
        )
    served = [intact.serve(q, shopper_id="s", session_id="x") for q in QUERIES]
    assert sum(bool(r.products) for e in served for r in e.rewrites) >= len(QUERIES)


def run_canary(
    settings: Settings, store: PolicyStore, production: int, canary: int, max_queries: int = 600
) -> Decision:
    """Serve real queries from both arms in rounds of 40, publish their outcomes, tick the job after each."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers, acks="all")
    armed = start_arms(
        settings,
        Rewriter(load_version(store.load_dir(production), production), search, settings.rewriter),
        store,
    )
    job = CanaryJob(settings, store, producer)
    relevance = lambda _query, products: [0.6] * len(products)  # noqa: E731
    # That stand-in M1 finds every product relevant (0.6 above the gain's threshold of 0.5): a rewrite earns
    # by what it retrieves beyond the query's own list; the empty rewrites of the damaged copy earn nothing.
    weights = settings.rewards.model_copy(update={"relevant_above": 0.5})
    try:
        served = 0
        while served < max_queries:
            for i in range(served, served + 40):
                event = armed.serve(QUERIES[i % len(QUERIES)], shopper_id=f"shopper-{i}", session_id="x")
                state = clicked_state(event, 1)  # the first product of every non-empty list
                outcome = attribution.outcome(state, attribution.score(state, relevance, weights))
                producer.send(settings.topics.query_outcomes, key=outcome.kafka_key(), value=encode(outcome))
            producer.flush()
            served += 40
            decision = job.tick()
            assert decision is not None
            if decision.action != "continue":
                return decision
        raise AssertionError(f"no verdict after {served} queries")
    finally:
        job.close()
        producer.close()


@pytest.mark.parametrize("canary_is", ["intact", "damaged"])
def test_the_job_promotes_the_better_model_and_rolls_back_the_worse_one(
    canary_is: str, settings: Settings, kafka_bootstrap: str, unique_topic: str, policies: tuple[Path, Path]
) -> None:
    topics = settings.topics.model_copy(
        update={
            "query_outcomes": f"{unique_topic}.o",
            "policy_versions": f"{unique_topic}.v",
            "dead_letter": f"{unique_topic}.d",
        }
    )
    # The damaged copy gives the intact policy's text a probability of about e^-8000, so with it as
    # production the KL guard would (rightly) call any candidate far from it: lifted here, where the
    # question is whether the reward test tells the two models apart.
    canary_config = CONFIG if canary_is == "damaged" else CONFIG.model_copy(update={"max_kl": 1e9})
    configured = settings.model_copy(
        update={"topics": topics, "canary": canary_config, "rewriter": RewriterSettings(max_new_tokens=4)}
    )
    ensure_topics(configured, {topics.query_outcomes: 1, topics.policy_versions: 1, topics.dead_letter: 1})
    db.upgrade(configured.db_url)
    with open_store(configured) as store:
        intact = store.publish(policies[0], base_model="tiny").id
        damaged = store.publish(policies[1], base_model="tiny", parent=intact).id
        production, canary = (damaged, intact) if canary_is == "intact" else (intact, damaged)
        store.set_alias("production", production)
        store.set_alias("canary", canary, actor="learner")

        decision = run_canary(configured, store, production, canary)

        assert decision.analysis is not None
        if canary_is == "intact":
            assert decision.action == "promote", decision.reason
            assert decision.analysis.effect_low is not None and decision.analysis.effect_low > 0
            assert store.resolve("production").id == intact
        else:
            assert decision.action == "rollback", decision.reason
            assert decision.details["outcome"] == "rolled back as worse"
            assert store.resolve("canary").id == intact and store.get(damaged).status == "rejected"
        assert decision.analysis.mean_production != decision.analysis.mean_canary
        assert min(decision.analysis.mean_production, decision.analysis.mean_canary) == 0.0, "nothing earns 0"
