"""The rewriter: serve two sampled rewrites per query from the policy an alias points at, and hot-swap it.

``Rewriter`` is the pure serving core (model in, ``QueryEvent`` out); ``RewriterService`` adds the process
around it: an HTTP endpoint the search front end (here: the simulated shoppers) calls, the Kafka producer of
query events, and the thread that follows policy announcements. A new version is loaded in that background
thread and swapped in under a lock *between* queries, so no query is dropped or served by a half-loaded model.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from qrloop import metrics
from qrloop.events import PolicyAnnouncement, QueryEvent, Rewrite, SchemaError, decode, encode
from qrloop.models import load_policy
from qrloop.prompting import build_prompt, end_of_turn
from qrloop.settings import RewriterSettings, Settings

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


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


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

    def swap(self, policy: LoadedPolicy) -> None:
        """Replace the policy; waits for the query in flight, so each query sees exactly one version."""
        with self._lock:
            self._policy = policy

    def _sample(self, policy: LoadedPolicy, query: str) -> list[tuple[str, float]]:
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
        return [(" ".join(t.split()), float(lp)) for t, lp in zip(texts, logps, strict=True)]

    def sample_rewrites(self, policy: LoadedPolicy, query: str) -> list[tuple[str, float]]:
        first = self._sample(policy, query)
        if normalise(first[0][0]) == normalise(first[1][0]):
            # Identical rewrites teach DPO nothing; one resample usually separates them.
            second = self._sample(policy, query)
            distinct = [r for r in second if normalise(r[0]) != normalise(first[0][0])]
            if distinct:
                return [first[0], distinct[0]]
        return first

    def serve(
        self,
        query: str,
        *,
        shopper_id: str,
        session_id: str,
        arm: str = "production",
        event_time: datetime | None = None,
    ) -> QueryEvent:
        with self._lock:
            policy = self._policy
            rewrites = self.sample_rewrites(policy, query)
        k = self.config.top_k_products
        return QueryEvent(
            event_id=str(uuid.uuid4()),
            event_time=event_time or datetime.now(UTC),
            shopper_id=shopper_id,
            session_id=session_id,
            query=query,
            policy_version=policy.version,
            arm=arm,  # type: ignore[arg-type]
            original_products=self.search(query)[:k],
            rewrites=[
                Rewrite(
                    rewrite_id=f"r{i + 1}",
                    text=text,
                    logprob=logprob,
                    products=self.search(text)[:k] if text else [],
                )
                for i, (text, logprob) in enumerate(rewrites)
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


def _json_response(
    handler: BaseHTTPRequestHandler, status: int, body: Any, content_type: str = "application/json"
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class RewriterService:
    """The serving process: HTTP in, QueryEvent published to Kafka and returned to the caller."""

    def __init__(self, settings: Settings, rewriter: Rewriter, producer: Any) -> None:
        self.settings = settings
        self.rewriter = rewriter
        self.producer = producer

    def handle(self, request: dict[str, Any]) -> QueryEvent:
        event = self.rewriter.serve(
            str(request["query"]),
            shopper_id=str(request.get("shopper_id", "anonymous")),
            session_id=str(request.get("session_id", uuid.uuid4())),
            arm=str(request.get("arm", "production")),
        )
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
                    _json_response(self, 200, {"ok": True, "version": service.rewriter.version})
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
    rewriter = Rewriter(
        load_version(store.load_dir(version), version.id), engine.search, settings.rewriter, settings.seed
    )
    metrics.ALIAS_VERSION.labels(alias).set(version.id)
    producer = KafkaProducer(
        bootstrap_servers=settings.kafka.bootstrap_servers, enable_idempotence=True, acks="all", linger_ms=5
    )
    follower = AnnouncementFollower(settings, rewriter, alias, store).start()
    service = RewriterService(settings, rewriter, producer)
    server = service.http_server(port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    log.info("serving alias %r (version %d) on 127.0.0.1:%d", alias, version.id, port)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        follower.stop()
        producer.flush()
        producer.close()
        store.close()
