"""The rewriter: serve two sampled rewrites per query from the policy an alias points at, and hot-swap it.

``Rewriter`` is the pure serving core (model in, ``QueryEvent`` out); ``RewriterService`` adds the process
around it: an HTTP endpoint the search front end (here: the simulated shoppers) calls, the Kafka producer of
query events, and the thread that follows policy announcements. A new version is loaded in that background
thread and swapped in under a lock *between* queries, so no query is dropped or served by a half-loaded model.

Canary arms: ``ArmedRewriter`` holds a production and a canary ``Rewriter``. While the ``canary`` alias points
at a version other than production's, a share of shoppers (a stable hash of the shopper id, salted with the
canary version) is served by the canary; every ``QueryEvent`` records its ``arm`` and ``policy_version``, and
canary rewrites also log their log-probability under the production policy (the canary job's KL guard).
``ArmsFollower`` follows both aliases and the canary job's share steps on the policy-versions topic.
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from qrloop import health, metrics
from qrloop.events import Arm, PolicyAnnouncement, QueryEvent, Rewrite, SchemaError, decode, encode
from qrloop.models import load_policy
from qrloop.prompting import build_prompt, end_of_turn
from qrloop.rewards import is_echo, same_text
from qrloop.settings import CanarySettings, RewriterSettings, Settings

log = logging.getLogger("qrloop.rewriter")
SearchFn = Callable[[str], list[str]]


@dataclass(frozen=True)
class LoadedPolicy:
    version: int | None
    model: Any
    tokenizer: Any


def load_version(path: Path, version: int | None) -> LoadedPolicy:
    model, tokenizer = load_policy(path)
    return LoadedPolicy(version, model, tokenizer)


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


def pick_two(query: str, candidates: Sequence[Sampled]) -> list[Sampled] | None:
    """The first two candidates (in draw order) that differ from each other and from the query, if any."""
    picked: list[Sampled] = []
    for candidate in candidates:
        if adds_nothing(query, candidate.text) or any(same_text(candidate.text, p.text) for p in picked):
            continue
        picked.append(candidate)
        if len(picked) == 2:
            return picked
    return None


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
    """Two distinct rewrites from one ``generate(num_return_sequences=2)`` call, and their products."""

    def __init__(
        self, policy: LoadedPolicy, search: SearchFn, config: RewriterSettings, seed: int = 0
    ) -> None:
        self._policy = policy
        self._lock = threading.Lock()
        self.search = search
        self.config = config
        self._generator_seed = seed

    @property
    def version(self) -> int | None:
        return self._policy.version

    @property
    def policy(self) -> LoadedPolicy:
        return self._policy

    def swap(self, policy: LoadedPolicy) -> None:
        """Replace the policy; waits for the query in flight, so each query sees exactly one version."""
        with self._lock:
            self._policy = policy

    def reconfigure(self, config: RewriterSettings) -> None:
        """Replace the sampling settings; like ``swap``, between queries, so no query mixes two configs."""
        with self._lock:
            self.config = config

    def _sample(
        self, policy: LoadedPolicy, query: str, reference: LoadedPolicy | None = None, draw: int = 1
    ) -> list[Sampled]:
        tokenizer = policy.tokenizer
        inputs = tokenizer(build_prompt(tokenizer, query), return_tensors="pt")
        with torch.no_grad():
            out = policy.model.generate(
                **inputs,
                do_sample=True,
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                max_new_tokens=self.config.max_new_tokens,
                num_return_sequences=2,
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
        self, policy: LoadedPolicy, query: str, reference: LoadedPolicy | None = None
    ) -> list[Sampled]:
        """Two rewrites that differ from each other and from the query, resampling a bounded number of times.

        Identical rewrites make no pair and an echo adds nothing, so serving them wastes the query's
        exploration; left alone, a policy drifting towards echoing the query serves ever fewer useful pairs
        (the collapse issue #12 measured). Each round draws two more; after ``max_resamples`` extra rounds the
        best available pair is served. Every served rewrite keeps the log-probability of its *own* tokens from
        the round that drew it (log π(y | x) at temperature 1, as always), so what is logged is exactly what
        was served. The behaviour distribution is then π conditioned on being accepted, not π itself: the
        importance weights of off-policy evaluation treat it as π (the rejected mass is reported per version
        through ``Rewrite.draw``); DPO recomputes log-probabilities and is unaffected.
        """
        candidates: list[Sampled] = []
        for draw in range(1, self.config.max_resamples + 2):
            candidates += self._sample(policy, query, reference, draw)
            picked = pick_two(query, candidates)
            if picked is not None:
                return picked
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
        with self._lock:
            policy = policy or self._policy
            rewrites = self.sample_rewrites(policy, query, reference)
        k = self.config.top_k_products
        return QueryEvent(
            event_id=str(uuid.uuid4()),
            event_time=event_time or datetime.now(UTC),
            shopper_id=shopper_id,
            session_id=session_id,
            query=query,
            policy_version=policy.version,
            arm=arm,
            original_products=self.search(query)[:k],
            rewrites=[
                Rewrite(
                    rewrite_id=f"r{i + 1}",
                    text=text,
                    logprob=logprob,
                    products=self.search(text)[:k] if text else [],
                    reference_logprob=reference_logprob,
                    draw=draw,
                )
                for i, (text, logprob, reference_logprob, draw) in enumerate(rewrites)
            ],
        )


class AnnouncementFollower:
    """Follows the policy-versions topic; when ``alias`` moves, loads that version and swaps it in."""

    def __init__(self, settings: Settings, rewriter: Rewriter, alias: str, store: Any) -> None:
        self.settings = settings
        self.rewriter = rewriter
        self.alias = alias
        self.store = store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="announcement-follower", daemon=True)
        self.swaps: list[tuple[int, float]] = []  # (version, seconds from announcement to serving)

    def start(self) -> AnnouncementFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap_servers,
            enable_auto_commit=False,
            client_id=f"{self.settings.kafka.client_id}-rewriter",
        )
        partition = TopicPartition(self.settings.topics.policy_versions, 0)
        consumer.assign([partition])
        consumer.seek_to_end(partition)  # only announcements made from now on; startup resolved the alias
        try:
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=300).values():
                    for record in records:
                        self._handle(record.value)
        finally:
            consumer.close()

    def _handle(self, raw: bytes) -> None:
        try:
            note = decode(PolicyAnnouncement, raw)
        except SchemaError:
            log.warning("ignoring an unreadable policy announcement")
            return
        if note.kind != "alias_moved" or note.alias != self.alias or note.version == self.rewriter.version:
            return
        started = time.perf_counter()
        version = self.store.get(note.version)
        loaded = load_version(self.store.load_dir(version), version.id)
        self.rewriter.swap(loaded)
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
                self.canary = Rewriter(policy, p.search, p.config, p._generator_seed)
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
    """Follows both aliases and the canary job's verdicts for an ``ArmedRewriter``, in one consumer thread."""

    def __init__(self, settings: Settings, armed: ArmedRewriter, store: Any) -> None:
        super().__init__(settings, armed.production, settings.canary.production_alias, store)
        self.armed = armed
        self.config: CanarySettings = settings.canary

    def _handle(self, raw: bytes) -> None:
        try:
            note = decode(PolicyAnnouncement, raw)
        except SchemaError:
            log.warning("ignoring an unreadable policy announcement")
            return
        try:
            self._apply(note)
        except Exception:  # a bad announcement must not kill the thread that follows all the others
            log.exception("could not apply announcement %s", note.model_dump_json())

    def _apply(self, note: PolicyAnnouncement) -> None:
        from qrloop.canary_job import canary_share

        if note.kind == "canary_verdict" and "share" in note.details:
            if self.armed.set_share(note.version, float(note.details["share"])):
                log.info("canary %d now serves %.0f%% of shoppers", note.version, 100 * self.armed.share)
            return
        if note.kind != "alias_moved":
            return
        if note.alias == self.config.production_alias and note.version != self.armed.production.version:
            self._swap(note.version, self.armed.swap_production, self.config.production_alias)
        elif note.alias == self.config.canary_alias and (
            self.armed.canary is None or note.version != self.armed.canary.version
        ):
            share = canary_share(self.store, note.version, self.config)
            self._swap(note.version, lambda p: self.armed.set_canary(p, share), self.config.canary_alias)

    def _swap(self, version_id: int, install: Callable[[LoadedPolicy], None], alias: str) -> None:
        started = time.perf_counter()
        loaded = self.armed.loaded(version_id)
        if loaded is None:
            version = self.store.get(version_id)
            loaded = load_version(self.store.load_dir(version), version.id)
        install(loaded)
        self.swaps.append((version_id, time.perf_counter() - started))
        metrics.ALIAS_VERSION.labels(alias).set(version_id)
        log.info("%s arm now serves version %d (%.2f s)", alias, version_id, time.perf_counter() - started)


def start_arms(settings: Settings, production: Rewriter, store: Any) -> ArmedRewriter:
    """The production rewriter plus the canary arm as the store has it now (alias and current share)."""
    from qrloop.canary_job import canary_share

    config = settings.canary
    armed = ArmedRewriter(production, config.share_steps[0])
    holder = store.aliases().get(config.canary_alias)
    if holder is not None and holder.version_id != production.version:
        loaded = load_version(store.load_dir(store.get(holder.version_id)), holder.version_id)
        armed.set_canary(loaded, canary_share(store, holder.version_id, config))
        metrics.ALIAS_VERSION.labels(config.canary_alias).set(holder.version_id)
    return armed


def _json_response(
    handler: BaseHTTPRequestHandler, status: int, body: Any, content_type: str = "application/json"
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


# Safe to change in a running rewriter: they act from the next query and change nothing already served.
# Not the products per list (rewards of lists of other lengths are not comparable), nor topics, aliases or
# the database; the canary's share is the canary job's to step (its audit log is the state), not a setting.
RELOADABLE = ("temperature", "top_p", "max_new_tokens", "max_resamples")


class RewriterService:
    """The serving process: HTTP in, QueryEvent published to Kafka and returned to the caller.

    ``/readyz`` runs ``checks`` (in ``run``: the broker and the policy store's database, as the other roles'
    probes do) plus the model check: ready only when a query could be served *and* its event published.
    """

    def __init__(
        self,
        settings: Settings,
        rewriter: Rewriter | ArmedRewriter,
        producer: Any,
        checks: Mapping[str, health.Check] | None = None,
    ) -> None:
        self.settings = settings
        self.rewriter = rewriter
        self.producer = producer
        self.probes = health.Probes({**(checks or {}), "model": self._model_check})

    def _model_check(self) -> str:
        if self.rewriter.version is None:
            return "base model loaded"
        return f"version {self.rewriter.version} loaded"

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        ok, checks = self.probes.ready()
        arms = self.rewriter.arms() if isinstance(self.rewriter, ArmedRewriter) else {}
        return ok, {"ok": ok, "role": "rewriter", "version": self.rewriter.version, **arms, "checks": checks}

    def reload(self, fresh: Settings) -> dict[str, Any]:
        """SIGHUP: the log level and the ``RELOADABLE`` rewriter settings, from the next query on."""
        from qrloop import logs

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

    def handle(self, request: dict[str, Any]) -> QueryEvent:
        query = str(request["query"])
        shopper_id = str(request.get("shopper_id", "anonymous"))
        session_id = str(request.get("session_id", uuid.uuid4()))
        if request.get("arm"):  # an explicit arm is honoured (a forced canary query, a test)
            arm = str(request["arm"])
            event = self.rewriter.serve(query, shopper_id=shopper_id, session_id=session_id, arm=arm)
        else:  # otherwise the arms decide
            event = self.rewriter.serve(query, shopper_id=shopper_id, session_id=session_id)
        # Keyed by event id: interactions are keyed the same way, so both meet on one partition.
        self.producer.send(
            self.settings.topics.query_events, key=event.event_id.encode(), value=encode(event)
        )
        metrics.QUERIES_SERVED.labels(event.arm).inc()
        return event

    def http_server(self, port: int) -> ThreadingHTTPServer:
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path != "/rewrite":
                    _json_response(self, 404, {"error": "not found"})
                    return
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    if not isinstance(body, dict) or not str(body.get("query", "")).strip():
                        raise ValueError("body must be a JSON object with a non-empty 'query'")
                except ValueError as exc:
                    _json_response(self, 400, {"error": str(exc)})
                    return
                event = service.handle(body)
                _json_response(self, 200, event.model_dump(mode="json"))

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    _json_response(self, 200, {"ok": True})
                elif self.path == "/readyz":
                    ok, body = service.readiness()
                    _json_response(self, 200 if ok else 503, body)
                elif self.path == "/metrics":
                    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

                    _json_response(self, 200, generate_latest(), CONTENT_TYPE_LATEST)
                else:
                    _json_response(self, 404, {"error": "not found"})

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

        return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def run(port: int, alias: str = "production") -> None:
    """``qrloop serve``: the rewriter service until SIGTERM."""
    import signal

    from kafka import KafkaProducer

    from policy_store import PolicyStore
    from qrloop.settings import get_settings
    from simulators.search import SearchEngine

    settings = get_settings()
    store = PolicyStore.from_settings(settings)
    version = store.resolve(alias)
    engine = SearchEngine.open(settings)
    production = Rewriter(
        load_version(store.load_dir(version), version.id), engine.search, settings.rewriter, settings.seed
    )
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
    }
    service = RewriterService(settings, rewriter, producer, checks)
    server = service.http_server(port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    signal.signal(signal.SIGHUP, lambda *_: service.reload(Settings()))
    log.info("serving alias %r (version %d) on 127.0.0.1:%d", alias, version.id, port)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        follower.stop()
        producer.flush()
        producer.close()
        store.close()
