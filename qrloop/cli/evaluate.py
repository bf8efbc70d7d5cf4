"""``qrloop evaluate``: off-policy evaluation of a policy-store version on logged traffic.

The composition of two components: ``streams.replay`` reads the log and attributes it as the aggregator does
(the reward each logged rewrite earned); ``learner.ope`` scores the candidate on the same rewrites and
estimates its value (IPS, SNIPS).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from learner.ope import CandidateScorer, Evaluation, evaluate_rewrites, model_scorer
from qrloop.models import load_stored_policy
from qrloop.runs import open_store
from qrloop.settings import Settings
from qrloop.vocabulary import output_vocabulary, restrict_output_vocabulary
from streams.aggregator import make_relevance_fn
from streams.attribution import RelevanceFn
from streams.replay import LoggedEvent, attribute, parse, read_source


def evaluate_events(
    events: Iterable[LoggedEvent],
    scorer: CandidateScorer,
    relevance: RelevanceFn,
    settings: Settings,
    candidate: str = "candidate",
) -> Evaluation:
    """IPS/SNIPS of ``scorer``'s policy on a log; rewards per rewrite from the log by ``attribute``."""
    closed = attribute(events, relevance, settings).closed
    if not closed:
        raise ValueError("the log has no query event with a closed window: nothing to evaluate")
    rewards = [(c.scored.first_reward, c.scored.second_reward) for c in closed]
    return evaluate_rewrites([c.event for c in closed], rewards, scorer, candidate)


def evaluate(
    settings: Settings,
    candidate: int | str,
    log_path: str,
    relevance: RelevanceFn | None = None,
    vocabulary_texts: Sequence[str] | None = None,
) -> Evaluation:
    """``qrloop evaluate``: a version (id or alias) from the policy store, on a log file or topic range.

    With ``vocabulary_texts`` the candidate is scored as a rewriter serving over those texts' tokens would
    serve it (``rewriter.vocabulary = catalog``): over the full vocabulary its log-probabilities lack the
    mass the restriction moves onto the kept tokens, and every importance weight read low against a log
    that such a rewriter wrote."""
    store = open_store(settings)
    try:
        version = store.get(int(candidate)) if str(candidate).isdigit() else store.resolve(str(candidate))
        model, tokenizer = load_stored_policy(store, version)
    finally:
        store.close()
    if vocabulary_texts is not None:
        restrict_output_vocabulary(model, output_vocabulary(tokenizer, vocabulary_texts))
    events = parse(read_source(log_path, settings.kafka.bootstrap_servers)).events
    if relevance is None:
        relevance = make_relevance_fn(settings)
    scorer = model_scorer(model, tokenizer, settings.rewriter.max_new_tokens)
    return evaluate_events(events, scorer, relevance, settings, f"version {version.id}")
