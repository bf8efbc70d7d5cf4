"""The rewriter: serve two sampled rewrites per query from the policy an alias points at, and hot-swap it.

``Rewriter`` is the pure serving core (model in, ``QueryEvent`` out); ``RewriterService`` adds the process
around it: an HTTP endpoint the search front end (here: the simulated shoppers) calls, the Kafka producer of
query events, and the thread that follows policy announcements. A new version is loaded in that background
thread and swapped in under a lock *between* queries, so no query is dropped or served by a half-loaded model.

Canary arms: ``ArmedRewriter`` holds a production and a canary ``Rewriter``. While the ``canary`` alias points
at a version other than production's, a share of shoppers (a stable hash of the shopper id, salted with the
canary version) is served by the canary; every ``QueryEvent`` records its ``arm`` and ``policy_version``, and
canary rewrites also log their log-probability under the production policy (the canary job's KL guard).
``ArmsFollower`` keeps both aliases and the canary job's share steps as the policy store has them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from policy_store import PolicyStore, PolicyVersion
from qrloop import health, logs, metrics
from qrloop.canary_job import canary_share
from qrloop.events import Arm, PolicyAnnouncement, QueryEvent, Rewrite, SchemaError, decode, encode
from qrloop.models import ModelLoadError, load_policy, load_stored_policy
from qrloop.prompting import Hints, build_prompt, end_of_turn, hint_words
from qrloop.reload import reload_on_sighup
from qrloop.rewards import is_echo, same_text
from qrloop.settings import CanarySettings, RewriterSettings, Settings
from qrloop.vocabulary import output_vocabulary, restrict_output_vocabulary

log = logging.getLogger("qrloop.rewriter")
SearchFn = Callable[[str], list[str]]
Ranker = Callable[[str, Sequence[str], Sequence[Sequence[str]]], Sequence[float]]
"""(query, the original's products, each candidate rewrite's products) → one score per candidate, higher
served first: best-of-N serving (``rewriter.samples`` > 2). The root builds it from M1."""


@dataclass(frozen=True)
class LoadedPolicy:
    version: int | None
    model: Any
    tokenizer: Any


def load_version(path: Path, version: int | None) -> LoadedPolicy:
    model, tokenizer = load_policy(path)
    return LoadedPolicy(version, model, tokenizer)


def load_stored_version(store: PolicyStore, version: PolicyVersion) -> LoadedPolicy:
    """A version from the store, of either kind (a LoRA adapter comes merged into its base)."""
    model, tokenizer = load_stored_policy(store, version)
    return LoadedPolicy(version.id, model, tokenizer)


def _completion_logprobs(
    sequences: torch.Tensor, logits: Sequence[torch.Tensor], prompt_len: int, eos_id: int
) -> torch.Tensor:
    """Sum of log-probabilities of each generated completion (up to and including its first EOS).

    ``logits`` are the model's raw next-token logits (``output_logits=True``), so this is the log-probability
    under the policy itself at temperature 1, the quantity off-policy evaluation compares across versions.
    """
    generated = sequences[:, prompt_len:]
    logprobs = torch.log_softmax(torch.stack(list(logits), dim=1).float(), dim=-1)
    token_logprobs = logprobs.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
    # Tokens after the first EOS are padding that generate() appended to a finished sequence.
    is_eos = generated == eos_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return token_logprobs.masked_fill(after_eos, 0.0).sum(dim=1)


def _reference_logprobs(
    reference: LoadedPolicy, sequences: torch.Tensor, prompt_len: int, eos_id: int
) -> torch.Tensor:
    """The same completions' log-probabilities under another policy (one forward pass, no sampling).

    The padding generate() appends after a finished completion needs no attention mask: the model is causal,
    so it cannot influence the tokens up to the EOS, and ``_completion_logprobs`` ignores it.
    """
    with torch.no_grad():
        logits = reference.model(sequences).logits[:, prompt_len - 1 : -1]
    return _completion_logprobs(sequences, list(logits.unbind(dim=1)), prompt_len, eos_id)


class Sampled(NamedTuple):
    text: str
    logprob: float
    reference_logprob: float | None = None
    draw: int = 1  # the sampling round that produced it (1: the first)


def adds_nothing(query: str, text: str) -> bool:
    """An empty rewrite or an echo of the query: it cannot retrieve anything the original did not."""
    return not text.strip() or is_echo(query, text)


def round_temperature(config: RewriterSettings, draw: int) -> float:
    """The sampling temperature of round ``draw`` (1: the first): ``temperature``, each resample hotter by
    ``resample_heat``. Only the sampling is heated: the logged log-probabilities stay π's own at
    temperature 1."""
    return config.temperature * config.resample_heat ** (draw - 1)


def useful_distinct(query: str, candidates: Sequence[Sampled]) -> list[Sampled]:
    """The candidates (in draw order) that differ from each other and from the query."""
    kept: list[Sampled] = []
    for candidate in candidates:
        repeats = any(same_text(candidate.text, k.text) for k in kept)
        if not adds_nothing(query, candidate.text) and not repeats:
            kept.append(candidate)
    return kept


def top_two(candidates: Sequence[Sampled], scores: Sequence[float]) -> list[Sampled]:
    """The two highest-scoring candidates, served in draw order; a tie goes to the earlier draw."""
    ranked = sorted(range(len(candidates)), key=lambda i: -scores[i])  # sorted() is stable
    return [candidates[i] for i in sorted(ranked[:2])]


def complementary_two(
    query: str,
    candidates: Sequence[Sampled],
    original: Sequence[str],
    lists: Sequence[Sequence[str]],
    rank: Ranker,
) -> list[Sampled]:
    """The candidate ``rank`` scores highest, then the one it scores highest against what the original *and*
    that first rewrite already show, served in draw order. Ranked independently, the best two often find the
    same new products, and a product shown twice is found once: the shopper (and the coverage of Table 4)
    gains from what the second adds beyond the first. Ties go to the first ranking, then the earlier draw."""
    scores = rank(query, original, lists)
    first = max(range(len(candidates)), key=lambda i: scores[i])  # max() keeps the earliest of equals
    rest = [i for i in range(len(candidates)) if i != first]
    shown = list(dict.fromkeys([*original, *lists[first]]))
    beyond = dict(zip(rest, rank(query, shown, [lists[i] for i in rest]), strict=True))
    second = max(rest, key=lambda i: (beyond[i], scores[i]))
    return [candidates[i] for i in sorted((first, second))]


def best_two(query: str, candidates: Sequence[Sampled]) -> list[Sampled]:
    """Without two useful, distinct candidates: useful ones first, then distinct texts, then the rest."""
    order = sorted(range(len(candidates)), key=lambda i: adds_nothing(query, candidates[i].text))
    picked: list[int] = []
    for i in order:
        if len(picked) < 2 and not any(same_text(candidates[i].text, candidates[j].text) for j in picked):
            picked.append(i)
    for i in order:  # every candidate says the same: serve two of them anyway
        if len(picked) < 2 and i not in picked:
            picked.append(i)
    return [candidates[i] for i in picked]


class Rewriter:
    """Two distinct rewrites from one ``generate`` call per round (two draws, or N for best-of-N), and their
    products."""

    def __init__(
        self,
        policy: LoadedPolicy,
        search: SearchFn,
        config: RewriterSettings,
        seed: int = 0,
        rank: Ranker | None = None,
        vocabulary: Sequence[int] | None = None,
        hints: Hints | None = None,
    ) -> None:
        self.vocabulary = vocabulary  # token ids every policy served here is restricted to (None: all)
        # The words of a query's results, for a hinted policy's prompt (None: this rewriter serves plain
        # policies only, and refuses a hinted one rather than serve it a prompt it was not trained on).
        self.hints = hints
        self._policy = self._restricted(policy)
        self._lock = threading.Lock()
        self.search = search
        self.config = config
        self._generator_seed = seed
        self.rank = rank

    @property
    def version(self) -> int | None:
        return self._policy.version

    @property
    def policy(self) -> LoadedPolicy:
        return self._policy

    def swap(self, policy: LoadedPolicy) -> None:
        """Replace the policy; waits for the query in flight, so each query sees exactly one version."""
        policy = self._restricted(policy)  # outside the lock: the new model is not serving yet
        with self._lock:
            self._policy = policy

    def _restricted(self, policy: LoadedPolicy) -> LoadedPolicy:
        if hint_words(policy.model) and self.hints is None:
            raise ModelLoadError(
                f"version {policy.version} was trained on a prompt that shows its results' words, and this "
                "rewriter has no catalog to take them from"
            )
        if self.vocabulary is not None:
            restrict_output_vocabulary(policy.model, self.vocabulary)
        return policy

    def reconfigure(self, config: RewriterSettings) -> None:
        """Replace the sampling settings; like ``swap``, between queries, so no query mixes two configs."""
        with self._lock:
            self.config = config

    def hints_for(self, policy: LoadedPolicy, query: str) -> list[str]:
        """What ``policy``'s prompt shows beside ``query``: its results' words if hinted, else nothing."""
        words = hint_words(policy.model)
        if not words or self.hints is None:
            return []
        return self.hints(query)[:words]

    def _sample(
        self,
        policy: LoadedPolicy,
        query: str,
        reference: LoadedPolicy | None = None,
        draw: int = 1,
        hints: Sequence[str] = (),
    ) -> list[Sampled]:
        tokenizer = policy.tokenizer
        inputs = tokenizer(build_prompt(tokenizer, query, hints), return_tensors="pt")
        with torch.no_grad():
            out = policy.model.generate(
                **inputs,
                do_sample=True,
                temperature=round_temperature(self.config, draw),
                top_p=self.config.top_p,
                max_new_tokens=self.config.max_new_tokens,
                num_return_sequences=self.config.samples,
                pad_token_id=tokenizer.pad_token_id,
                return_dict_in_generate=True,
                output_logits=True,
            )
        prompt_len = inputs.input_ids.shape[1]
        # The token generate() stops on, which for the converted SmolLM2 is not the tokenizer's EOS.
        stop_id = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer, policy.model.generation_config))
        logps = _completion_logprobs(out.sequences, out.logits, prompt_len, stop_id)
        texts = tokenizer.batch_decode(out.sequences[:, prompt_len:], skip_special_tokens=True)
        refs: list[float | None] = [None] * len(texts)
        if reference is not None:
            refs = [float(x) for x in _reference_logprobs(reference, out.sequences, prompt_len, stop_id)]
        rows = zip(texts, logps, refs, strict=True)
        return [Sampled(" ".join(t.split()), float(lp), ref, draw) for t, lp, ref in rows]

    def sample_rewrites(
        self,
        policy: LoadedPolicy,
        query: str,
        reference: LoadedPolicy | None = None,
        products: SearchFn | None = None,
        hints: Sequence[str] = (),
    ) -> list[Sampled]:
        """Two rewrites that differ from each other and from the query, resampling a bounded number of times.

        Identical rewrites make no pair and an echo adds nothing, so serving them wastes the query's
        exploration; left alone, a policy drifting towards echoing the query serves ever fewer useful pairs
        (the collapse issue #12 measured). Each round draws ``samples`` more (two by default), each hotter
        than the last by ``resample_heat``: a policy that has collapsed onto one rewrite draws that rewrite
        again at the same temperature however often it is asked (on CrowdFlower, 24 draws at temperature 1
        gave one text for 41 of the last 250 queries). After ``max_resamples`` extra rounds the best available
        pair is served. Every served rewrite keeps the log-probability of its *own* tokens from the round that
        drew it (log π(y | x) at temperature 1, however hot the round), so what is logged is exactly what was
        served. The behaviour distribution is then π conditioned on being accepted (and heated where it was
        resampled), not π itself: the importance weights of off-policy evaluation treat it as π (the rejected
        mass is reported per version through ``Rewrite.draw``); DPO recomputes log-probabilities and is
        unaffected.

        Best-of-N (``rewriter.samples`` > 2, with a ``rank`` and the query's ``products``): each round draws N
        and the two useful, distinct ones that ``rank`` scores highest are served (``rewriter.pick = "top"``),
        or the highest and the one that adds most beyond it (``"complementary"``, :func:`complementary_two`).
        Sampled rewrites mostly find what the original shows; the reward's novelty picks those that add
        products M1 finds relevant (bench_headroom: 1.075 → 1.136 human-label recall ratio from the
        title-pairs start, N = 8).
        ``hints``: the result words a hinted policy's prompt shows (:meth:`hints_for`).
        """
        candidates: list[Sampled] = []
        for draw in range(1, self.config.max_resamples + 2):
            candidates += self._sample(policy, query, reference, draw, hints)
            useful = useful_distinct(query, candidates)
            if len(useful) > 2 and self.rank is not None and products is not None:
                lists = [products(c.text) for c in useful]
                if self.config.pick == "complementary":
                    return complementary_two(query, useful, products(query), lists, self.rank)
                return top_two(useful, self.rank(query, products(query), lists))
            if len(useful) >= 2:
                return useful[:2]
        return best_two(query, candidates)

    def serve(
        self,
        query: str,
        *,
        shopper_id: str,
        session_id: str,
        arm: str = "production",
        event_time: datetime | None = None,
        policy: LoadedPolicy | None = None,
        reference: LoadedPolicy | None = None,
    ) -> QueryEvent:
        """Serve one query. ``policy``: a snapshot the caller already chose (else the current one);
        ``reference``: also log each rewrite's log-probability under that policy."""
        k = self.config.top_k_products
        found: dict[str, list[str]] = {}  # best-of-N searches every candidate: the served ones only once

        def products(text: str) -> list[str]:
            if text not in found:
                found[text] = self.search(text)[:k] if text else []
            return found[text]

        with self._lock:
            policy = policy or self._policy
            hints = self.hints_for(policy, query)
            rewrites = self.sample_rewrites(policy, query, reference, products, hints)
        return QueryEvent(
            event_id=str(uuid.uuid4()),
            event_time=event_time or datetime.now(UTC),
            shopper_id=shopper_id,
            session_id=session_id,
            query=query,
            policy_version=policy.version,
            arm=arm,
            original_products=products(query),
            hints=hints,
            rewrites=[
                Rewrite(
                    rewrite_id=f"r{i + 1}",
                    text=text,
                    logprob=logprob,
                    products=products(text),
                    reference_logprob=reference_logprob,
                    draw=draw,
                )
                for i, (text, logprob, reference_logprob, draw) in enumerate(rewrites)
            ],
        )


class AnnouncementFollower:
    """Keeps ``rewriter`` serving the version ``alias`` holds in the policy store.

    The store is the authority; announcements on the policy-versions topic only make the follower look
    sooner. It reconciles with the store when it starts, on every announcement that concerns it, and every
    ``rewriter.reconcile_s`` in any case, so a move whose announcement never came (an operator's
    ``qrloop policy rollback``, a process that crashed between its commit and its announcement, a follower
    that was down) is still served within seconds, and a stray announcement cannot make it serve a version
    the alias does not hold.
    """

    def __init__(self, settings: Settings, rewriter: Rewriter, alias: str, store: PolicyStore) -> None:
        self.settings = settings
        self.rewriter = rewriter
        self.alias = alias
        self.store = store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="announcement-follower", daemon=True)
        # Beaten once per poll: /readyz fails when this thread died or is stuck (then no swap would happen).
        self.heartbeat = health.Heartbeat(settings.daemon.liveness_max_age_s)
        self.swaps: list[tuple[int, float]] = []  # (version, seconds from noticing the move to serving it)

    def start(self) -> AnnouncementFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> health.Check:
        """The readiness check of this follower: its thread runs and its poll loop goes round."""
        return health.thread_check(self._thread, self.heartbeat)

    def _run(self) -> None:
        consumer = KafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap_servers,
            enable_auto_commit=False,
            client_id=f"{self.settings.kafka.client_id}-rewriter",
        )
        partition = TopicPartition(self.settings.topics.policy_versions, 0)
        consumer.assign([partition])
        consumer.seek_to_end(partition)  # only announcements from now on: the reconcile covers the past
        last_reconcile = 0.0
        try:
            while not self._stop.is_set():
                self.heartbeat.beat()
                if time.monotonic() - last_reconcile >= self.settings.rewriter.reconcile_s:
                    self._safe_reconcile()
                    last_reconcile = time.monotonic()
                for records in consumer.poll(timeout_ms=300).values():
                    for record in records:
                        if self._concerns_me(record.value):
                            self._safe_reconcile()
                            last_reconcile = time.monotonic()
        finally:
            consumer.close()

    def _concerns_me(self, raw: bytes) -> bool:
        try:
            note = decode(PolicyAnnouncement, raw)
        except SchemaError as exc:
            metrics.FOLLOWER_ERRORS.labels(exc.reason).inc()
            log.warning("ignoring an unreadable policy announcement: %s", exc)
            return False
        return note.kind == "alias_moved" and note.alias == self.alias

    def _safe_reconcile(self) -> None:
        try:
            self.reconcile()
        except Exception:  # a database restart or a bad blob must not kill the thread; the next try follows
            log.exception("could not reconcile with the policy store; trying again")

    def reconcile(self) -> None:
        """Serve what the store says ``alias`` holds (a no-op when it already does)."""
        record = self.store.aliases().get(self.alias)
        if record is None or record.version_id == self.rewriter.version:
            return
        started = time.perf_counter()
        version = self.store.get(record.version_id)
        self.rewriter.swap(load_stored_version(self.store, version))
        self.swaps.append((version.id, time.perf_counter() - started))
        metrics.ALIAS_VERSION.labels(self.alias).set(version.id)
        log.info("now serving version %d (loaded in %.2f s)", version.id, time.perf_counter() - started)


def arm_bucket(key: str, salt: str) -> float:
    """A stable point in [0, 1) for ``key``: the same shopper gets the same arm for one canary version.

    Salting with the canary version gives each new canary a fresh sample of shoppers, so the same people
    are not always the ones trying untested policies.
    """
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_arm(shopper_id: str, session_id: str, canary_version: int | None, share: float) -> Arm:
    """``canary`` for a ``share`` of shoppers (anonymous ones by session). Because the bucket is fixed, a
    share stepped up from 10% to 25% keeps every shopper who already was in the canary arm in it."""
    key = shopper_id if shopper_id and shopper_id != "anonymous" else session_id
    return "canary" if arm_bucket(key, f"canary-{canary_version}") < share else "production"


class ArmedRewriter:
    """Production and canary ``Rewriter``s; each query is served by exactly one arm and one version.

    The pair of policies and the share are read together under one lock, then the query is served from
    that snapshot, so a swap of either arm (or a share step) takes effect between queries, never within one.
    The canary arm is live only while it holds another version than production.
    """

    def __init__(self, production: Rewriter, share: float, canary: LoadedPolicy | None = None) -> None:
        self.production = production
        self.canary: Rewriter | None = None
        self._share = share
        self._lock = threading.Lock()
        if canary is not None:
            self.set_canary(canary, share)

    @property
    def version(self) -> int | None:
        return self.production.version

    @property
    def share(self) -> float:
        return self._share

    @property
    def canary_version(self) -> int | None:
        """The version the canary arm serves, or None while it is not live."""
        with self._lock:
            return self._live_canary(self.production.policy)

    def _live_canary(self, production: LoadedPolicy) -> int | None:
        canary = self.canary.policy if self.canary is not None else None
        return canary.version if canary is not None and canary.version != production.version else None

    def loaded(self, version: int) -> LoadedPolicy | None:
        """An already-loaded policy of ``version`` (a promotion or a roll back reuses the other arm's)."""
        for rewriter in (self.production, self.canary):
            if rewriter is not None and rewriter.version == version:
                return rewriter.policy
        return None

    def reconfigure(self, config: RewriterSettings) -> None:
        """New sampling settings for both arms (a canary created later copies production's)."""
        with self._lock:
            for rewriter in (self.production, self.canary):
                if rewriter is not None:
                    rewriter.reconfigure(config)

    def swap_production(self, policy: LoadedPolicy) -> None:
        with self._lock:
            self.production.swap(policy)

    def set_canary(self, policy: LoadedPolicy, share: float) -> None:
        with self._lock:
            if self.canary is None:
                p = self.production
                self.canary = Rewriter(
                    policy, p.search, p.config, p._generator_seed, p.rank, p.vocabulary, p.hints
                )
            else:
                self.canary.swap(policy)
            self._share = share

    def set_share(self, version: int, share: float) -> bool:
        """Step the canary's share; ignored (False) when ``version`` is not the canary being served."""
        with self._lock:
            if self.canary is None or self.canary.version != version:
                return False
            self._share = share
            return True

    def arms(self) -> dict[str, Any]:
        with self._lock:
            return {
                "production_version": self.production.version,
                "canary_version": self._live_canary(self.production.policy),
                "share": self._share,
            }

    def serve(
        self,
        query: str,
        *,
        shopper_id: str,
        session_id: str,
        arm: str | None = None,
        event_time: datetime | None = None,
    ) -> QueryEvent:
        """Serve from the shopper's arm (or from ``arm`` when the caller forces one and it is live)."""
        with self._lock:
            production = self.production.policy
            canary = self.canary.policy if self.canary is not None else None
            live = self._live_canary(production)
            share = self._share
        if arm is None:
            arm = assign_arm(shopper_id, session_id, live, share) if live is not None else "production"
        if arm == "canary" and live is not None and self.canary is not None:
            return self.canary.serve(
                query,
                shopper_id=shopper_id,
                session_id=session_id,
                arm="canary",
                event_time=event_time,
                policy=canary,
                reference=production,
            )
        return self.production.serve(
            query,
            shopper_id=shopper_id,
            session_id=session_id,
            arm="production",
            event_time=event_time,
            policy=production,
        )


class ArmsFollower(AnnouncementFollower):
    """Keeps an ``ArmedRewriter``'s two arms and the canary's share as the store has them (same reconcile
    loop: on start, on every announcement about either alias or a verdict, and every ``reconcile_s``)."""

    def __init__(self, settings: Settings, armed: ArmedRewriter, store: PolicyStore) -> None:
        super().__init__(settings, armed.production, settings.canary.production_alias, store)
        self.armed = armed
        self.config: CanarySettings = settings.canary

    def _concerns_me(self, raw: bytes) -> bool:
        try:
            note = decode(PolicyAnnouncement, raw)
        except SchemaError as exc:
            metrics.FOLLOWER_ERRORS.labels(exc.reason).inc()
            log.warning("ignoring an unreadable policy announcement: %s", exc)
            return False
        aliases = (self.config.production_alias, self.config.canary_alias)
        return note.kind == "canary_verdict" or (note.kind == "alias_moved" and note.alias in aliases)

    def reconcile(self) -> None:
        aliases = self.store.aliases()
        production = aliases.get(self.config.production_alias)
        if production is not None and production.version_id != self.armed.production.version:
            self._swap(production.version_id, self.armed.swap_production, self.config.production_alias)
        canary = aliases.get(self.config.canary_alias)
        if canary is None:
            return
        share = canary_share(self.store, canary.version_id, self.config)
        if self.armed.canary is None or canary.version_id != self.armed.canary.version:
            nothing_to_test = production is not None and canary.version_id == production.version_id
            if self.armed.canary is None and nothing_to_test:
                return  # and no canary arm yet
            self._swap(canary.version_id, lambda p: self.armed.set_canary(p, share), self.config.canary_alias)
        elif share != self.armed.share and self.armed.set_share(canary.version_id, share):
            log.info("canary %d now serves %.0f%% of shoppers", canary.version_id, 100 * share)

    def _swap(self, version_id: int, install: Callable[[LoadedPolicy], None], alias: str) -> None:
        started = time.perf_counter()
        loaded = self.armed.loaded(version_id)
        if loaded is None:
            loaded = load_stored_version(self.store, self.store.get(version_id))
        install(loaded)
        self.swaps.append((version_id, time.perf_counter() - started))
        metrics.ALIAS_VERSION.labels(alias).set(version_id)
        log.info("%s arm now serves version %d (%.2f s)", alias, version_id, time.perf_counter() - started)


def start_arms(settings: Settings, production: Rewriter, store: PolicyStore) -> ArmedRewriter:
    """The production rewriter plus the canary arm as the store has it now (alias and current share)."""
    config = settings.canary
    armed = ArmedRewriter(production, config.share_steps[0])
    holder = store.aliases().get(config.canary_alias)
    if holder is not None and holder.version_id != production.version:
        loaded = load_stored_version(store, store.get(holder.version_id))
        armed.set_canary(loaded, canary_share(store, holder.version_id, config))
        metrics.ALIAS_VERSION.labels(config.canary_alias).set(holder.version_id)
    return armed


class HttpError(Exception):
    """A request the rewriter refuses: answered with ``status`` and ``{"error": reason}``, never a drop."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


class RewriteRequest(BaseModel):
    """The body of ``POST /rewrite``. Strict: ``{"query": null}`` or a number is a 400, never "None"; a lone
    surrogate (``"a\\ud800"``, which no tokenizer or Kafka message could encode) is refused by pydantic."""

    model_config = ConfigDict(strict=True, extra="ignore", hide_input_in_errors=True)

    query: str = Field(min_length=1)
    shopper_id: str = "anonymous"
    session_id: str | None = None
    arm: Arm | None = None  # an explicit arm is honoured (a forced canary query, a test)

    @field_validator("query")
    @classmethod
    def _not_blank(cls, query: str) -> str:
        if not query.strip():
            raise ValueError("must not be blank")
        return query


def parse_rewrite_request(body: bytes, limits: RewriterSettings) -> RewriteRequest:
    """The validated request, or an ``HttpError`` saying what is wrong with it."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 / JSON, a 5,000-digit number, deep nesting
        raise HttpError(400, f"body is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise HttpError(400, f"body must be a JSON object with a 'query', not a JSON {type(data).__name__}")
    try:
        request = RewriteRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise HttpError(400, f"invalid request: {problems}") from None
    if len(request.query) > limits.max_query_chars:
        raise HttpError(
            413, f"query is {len(request.query)} characters; at most {limits.max_query_chars} are served"
        )
    return request


def read_body(handler: BaseHTTPRequestHandler, limits: RewriterSettings) -> bytes:
    """Exactly Content-Length bytes within ``request_timeout_s`` in all, or an ``HttpError``.

    No Content-Length (or a chunked body) is a 411, a negative or malformed one a 400, one above
    ``max_body_bytes`` a 413: nothing is read until the size is known to be acceptable.
    """
    if handler.headers.get("Transfer-Encoding"):
        raise HttpError(411, "chunked bodies are not accepted; send a Content-Length")
    declared = handler.headers.get("Content-Length")
    if declared is None:
        raise HttpError(411, "a Content-Length header is required")
    if not declared.strip().isdigit():
        raise HttpError(400, f"bad Content-Length {declared[:40]!r}")
    size = int(declared)
    if size > limits.max_body_bytes:
        raise HttpError(413, f"body of {size} bytes; at most {limits.max_body_bytes} are accepted")
    deadline = time.monotonic() + limits.request_timeout_s
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HttpError(408, f"body not received within {limits.request_timeout_s:g} s")
        handler.connection.settimeout(left)
        try:
            chunk = handler.rfile.read1(remaining)
        except TimeoutError:
            raise HttpError(408, f"body not received within {limits.request_timeout_s:g} s") from None
        if not chunk:
            raise HttpError(400, f"body ended after {size - remaining} of {size} bytes")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _json_response(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: Any,
    content_type: str = "application/json",
    headers: Mapping[str, str] | None = None,
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)
    except OSError:  # the client went away (or timed out) before reading its answer: nothing left to tell
        log.debug("client %s left before its %d response", handler.client_address, status)


# Safe to change in a running rewriter: they act from the next query and change nothing already served.
# Not the products per list (rewards of lists of other lengths are not comparable), nor topics, aliases or
# the database; the canary's share is the canary job's to step (its audit log is the state), not a setting.
# The HTTP limits are not reloaded either: the server's handler class and semaphore are built with them;
# nor ``samples``: best-of-N's ranker (M1) is built, or not, when the rewriter starts; nor ``vocabulary``:
# its token ids are computed from the catalog once, at start.
RELOADABLE = ("temperature", "top_p", "max_new_tokens", "max_resamples", "resample_heat", "pick")


class _RewriterHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, handler: type[BaseHTTPRequestHandler], heartbeat: health.Heartbeat) -> None:
        super().__init__(("127.0.0.1", port), handler)
        self.heartbeat = heartbeat

    def service_actions(self) -> None:
        # Called by serve_forever on every turn of its loop: the rewriter's main-loop heartbeat.
        self.heartbeat.beat()


# How long a query waits for the broker to acknowledge its event (acks=all) before it is answered with 503.
EVENT_ACK_TIMEOUT_S = 10.0


class EventNotWrittenError(RuntimeError):
    """The broker did not take a query's event; the query is answered with an error (HTTP 503)."""


class RewriterService:
    """The serving process: HTTP in, QueryEvent published to Kafka and returned to the caller.

    ``/readyz`` runs ``checks`` (in ``run``: the broker, the policy store's database and the announcement
    follower thread) plus the model check: ready only when a query could be served *and* its event published.
    ``/rewrite`` answers 503 while not ready, and while ``max_in_flight`` queries are already waiting for
    the model. ``/healthz`` (liveness) fails when the accept loop stops going round or one query has held
    the model for longer than ``daemon.liveness_max_age_s``.
    """

    def __init__(
        self,
        settings: Settings,
        rewriter: Rewriter | ArmedRewriter,
        producer: KafkaProducer,
        checks: Mapping[str, health.Check] | None = None,
    ) -> None:
        self.settings = settings
        self.rewriter = rewriter
        self.producer = producer
        self.probes = health.Probes({**(checks or {}), "model": self._model_check})
        self.heartbeat = health.Heartbeat(settings.daemon.liveness_max_age_s)
        self._slots = threading.BoundedSemaphore(settings.rewriter.max_in_flight)
        self._in_flight: dict[int, float] = {}  # thread id -> when its query started (monotonic)
        self._in_flight_lock = threading.Lock()

    def _model_check(self) -> str:
        if self.rewriter.version is None:
            return "base model loaded"
        return f"version {self.rewriter.version} loaded"

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        ok, checks = self.probes.ready()
        arms = self.rewriter.arms() if isinstance(self.rewriter, ArmedRewriter) else {}
        return ok, {"ok": ok, "role": "rewriter", "version": self.rewriter.version, **arms, "checks": checks}

    def liveness(self) -> tuple[int, dict[str, Any]]:
        status, body = health.liveness(self.heartbeat, "rewriter")
        with self._in_flight_lock:
            oldest = min(self._in_flight.values(), default=None)
        longest = 0.0 if oldest is None else time.monotonic() - oldest
        body["longest_query_s"] = round(longest, 3)
        if longest > self.settings.daemon.liveness_max_age_s:
            body["ok"], status = False, 503
        return status, body

    def reload(self, fresh: Settings) -> dict[str, Any]:
        """SIGHUP: the log level and the ``RELOADABLE`` rewriter settings, from the next query on."""
        logs.set_level(fresh.logging.level)
        current = self.settings.rewriter
        changes = {
            k: getattr(fresh.rewriter, k)
            for k in RELOADABLE
            if getattr(fresh.rewriter, k) != getattr(current, k)
        }
        if changes:
            self.settings.rewriter = current.model_copy(update=changes)
            self.rewriter.reconfigure(self.settings.rewriter)
        log.info("settings reloaded: log level %s, %s", fresh.logging.level, changes or "no rewriter change")
        return changes

    def serve_request(self, request: RewriteRequest) -> QueryEvent:
        """Serve a validated request, or 503 when not ready or already ``max_in_flight`` queries deep."""
        ready, _ = self.probes.ready()
        if not ready:
            raise HttpError(503, "not ready (see /readyz)", {"Retry-After": "5"})
        if not self._slots.acquire(blocking=False):
            metrics.REQUESTS_REFUSED.labels("overloaded").inc()
            raise HttpError(503, "overloaded: too many queries in flight", {"Retry-After": "1"})
        me = threading.get_ident()
        try:
            with self._in_flight_lock:
                self._in_flight[me] = time.monotonic()
            return self.handle(request)
        finally:
            with self._in_flight_lock:
                self._in_flight.pop(me, None)
            self._slots.release()

    def handle(self, request: RewriteRequest) -> QueryEvent:
        query = request.query
        shopper_id = request.shopper_id
        session_id = request.session_id or str(uuid.uuid4())
        if request.arm:  # an explicit arm is honoured (a forced canary query, a test)
            arm = request.arm
            event = self.rewriter.serve(query, shopper_id=shopper_id, session_id=session_id, arm=arm)
        else:  # otherwise the arms decide
            event = self.rewriter.serve(query, shopper_id=shopper_id, session_id=session_id)
        self._write(event)
        metrics.QUERIES_SERVED.labels(event.arm).inc()
        return event

    def _write(self, event: QueryEvent) -> None:
        """Publish the query event and wait for the broker's acknowledgement: rewrites whose event was not
        written can never be attributed or learned from, so the caller gets an error instead of them."""
        from kafka.errors import KafkaError

        topic = self.settings.topics.query_events
        try:
            # Keyed by event id: interactions are keyed the same way, so both meet on one partition.
            future = self.producer.send(topic, key=event.event_id.encode(), value=encode(event))
            future.get(timeout=EVENT_ACK_TIMEOUT_S)
        except KafkaError as exc:
            metrics.EVENTS_NOT_WRITTEN.labels("rewriter", topic).inc()
            log.error("query event %s not written to %s: %s", event.event_id, topic, exc)
            raise EventNotWrittenError(f"the query event could not be written to {topic}: {exc}") from exc

    def http_server(self, port: int) -> ThreadingHTTPServer:
        """``POST /rewrite``, ``GET /healthz /readyz /metrics`` on 127.0.0.1:port (0: any free port).

        Every request gets an answer: a JSON ``{"error": ...}`` with 400/404/408/411/413/503, or a 500 when
        serving itself raised; the connection is never just dropped. ``request_timeout_s`` bounds how long
        a client may take to send its request, so slow clients cannot hold server threads for long.
        """
        service = self
        limits = self.settings.rewriter

        class Handler(BaseHTTPRequestHandler):
            timeout = limits.request_timeout_s  # socket timeout while reading the request line and headers

            def do_POST(self) -> None:
                try:
                    if self.path != "/rewrite":
                        raise HttpError(404, "not found")
                    request = parse_rewrite_request(read_body(self, limits), limits)
                    event = service.serve_request(request)
                    _json_response(self, 200, event.model_dump(mode="json"))
                except EventNotWrittenError as exc:  # the broker did not take the event: retry later
                    metrics.REQUESTS_REFUSED.labels("503").inc()
                    _json_response(self, 503, {"error": str(exc)}, headers={"Retry-After": "1"})
                except HttpError as exc:
                    if exc.status != 503:
                        metrics.REQUESTS_REFUSED.labels(str(exc.status)).inc()
                    _json_response(self, exc.status, {"error": exc.reason}, headers=exc.headers)
                except (
                    Exception
                ) as exc:  # serving failed: the client gets a 500 and a reason, the log the rest
                    log.exception("serving a query failed")
                    metrics.REQUESTS_REFUSED.labels("500").inc()
                    _json_response(self, 500, {"error": f"internal error: {type(exc).__name__}"})

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    status, body = service.liveness()
                    _json_response(self, status, body)
                elif self.path == "/readyz":
                    ok, body = service.readiness()
                    _json_response(self, 200 if ok else 503, body)
                elif self.path == "/metrics":
                    _json_response(self, 200, generate_latest(), CONTENT_TYPE_LATEST)
                else:
                    _json_response(self, 404, {"error": "not found"})

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

        return _RewriterHttpServer(port, Handler, self.heartbeat)


def run(
    settings: Settings,
    store: PolicyStore,
    search: SearchFn,
    port: int,
    alias: str = "production",
    rank: Ranker | None = None,
    vocabulary_texts: Sequence[str] | None = None,
    hints: Hints | None = None,
) -> None:
    """``qrloop serve``: the rewriter service until SIGTERM, over ``search`` (the root passes the search
    engine in: the kernel does not know which one runs), for best-of-N serving ``rank``, with
    ``vocabulary_texts`` every served policy writes only the tokens those texts use, and with ``hints`` it
    can serve a hinted policy; closes ``store`` when it stops."""
    version = store.resolve(alias)
    loaded = load_stored_version(store, version)
    vocabulary = None if vocabulary_texts is None else output_vocabulary(loaded.tokenizer, vocabulary_texts)
    if vocabulary is not None:
        log.info("output vocabulary: %d of %d tokens", len(vocabulary), len(loaded.tokenizer))
    production = Rewriter(loaded, search, settings.rewriter, settings.seed, rank, vocabulary, hints)
    metrics.ALIAS_VERSION.labels(alias).set(version.id)
    producer = KafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, enable_idempotence=True, acks="all", linger_ms=5
    )
    rewriter: Rewriter | ArmedRewriter = production
    follower: AnnouncementFollower
    if settings.canary.enabled and alias == settings.canary.production_alias:
        rewriter = start_arms(settings, production, store)
        follower = ArmsFollower(settings, rewriter, store).start()
    else:
        follower = AnnouncementFollower(settings, production, alias, store).start()
    checks = {
        "broker": health.kafka_check(settings.kafka.bootstrap_servers),
        "database": health.database_check(settings.db_url),
        "follower": follower.check(),
    }
    service = RewriterService(settings, rewriter, producer, checks)
    server = service.http_server(port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    reload_on_sighup("rewriter", service.reload)
    log.info("serving alias %r (version %d) on 127.0.0.1:%d", alias, version.id, port)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        follower.stop()
        producer.flush()
        producer.close()
        store.close()
