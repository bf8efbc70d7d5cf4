"""The HTTP rewriter: every bad request gets a JSON 4xx/5xx (never a dropped connection), and a normal query
sent at the same time is still answered. Tiny random policy, real broker for the query events."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaProducer

from qrloop import health
from qrloop.models import build_tiny_policy, require_policy
from qrloop.runs import isolate
from qrloop.serving import Rewriter, RewriterService, load_version
from qrloop.settings import Settings
from qrloop.topics import ensure_topics
from tests.helpers import free_port, unique_topic_name


def search(text: str) -> list[str]:
    if "explode" in text:
        raise ValueError("the search engine failed")  # a failure inside handle(): must become a 500
    return [f"p{abs(hash(w)) % 50}" for w in text.split()][:10]


@dataclass
class Served:
    port: int
    service: RewriterService
    rewriter: Rewriter


@pytest.fixture(scope="module")
def served(
    base_settings: Settings, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    settings = isolate(base_settings, unique_topic_name(), None).model_copy(deep=True)
    settings.rewriter = settings.rewriter.model_copy(
        update={
            "max_new_tokens": 4,
            "max_body_bytes": 8192,
            "max_query_chars": 100,
            "request_timeout_s": 2.0,
            "max_in_flight": 2,
        }
    )
    ensure_topics(settings)
    tiny = build_tiny_policy(tmp_path_factory.mktemp("tiny"), require_policy(base_settings), seed=5)
    rewriter = Rewriter(load_version(tiny, 1), search, settings.rewriter)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    service = RewriterService(settings, rewriter, producer, {"broker": health.kafka_check(kafka_bootstrap)})
    server = service.http_server(0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    yield Served(server.server_address[1], service, rewriter)
    server.shutdown()
    server.server_close()
    producer.close()


def post(port: int, body: bytes, timeout_s: float = 120.0) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/rewrite", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def normal_query(port: int) -> tuple[int, dict[str, object]]:
    return post(port, json.dumps({"query": "cordless drill", "shopper_id": "s1"}).encode())


def raw_exchange(port: int, chunks: list[bytes], pause_s: float = 0.0) -> tuple[int, dict[str, object]]:
    """Send ``chunks`` as they are (a malformed request), then read the answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(pause_s)
        data = b""
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    assert data, "the server dropped the connection without an answer"
    head, _, payload = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert b"application/json" in head, head
    return status, json.loads(payload)


def request_bytes(body: bytes, headers: dict[str, str] | None = None) -> bytes:
    fields = {"Host": "x", "Content-Type": "application/json", **(headers or {})}
    if "Content-Length" not in fields and headers is None:
        fields["Content-Length"] = str(len(body))
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return f"POST /rewrite HTTP/1.1\r\n{head}\r\n".encode() + body


def while_normal_query(
    served: Served, bad: Future[tuple[int, dict[str, object]]]
) -> tuple[int, dict[str, object]]:
    """A normal query sent while the bad request is in progress is answered 200; the bad one's answer."""
    status, event = normal_query(served.port)
    assert status == 200 and len(event["rewrites"]) == 2, event  # type: ignore[arg-type]
    return bad.result(timeout=120)


DEEP = b"[" * 3000 + b"]" * 3000
CASES = {
    "content-length -1": (request_bytes(b'{"query": "x"}', {"Content-Length": "-1"}), 400, "Content-Length"),
    "no content-length": (request_bytes(b'{"query": "x"}', {}), 411, "Content-Length"),
    "chunked": (
        request_bytes(b"e\r\n" + b'{"query": "x"}' + b"\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}),
        411,
        "chunked",
    ),
    "huge content-length": (request_bytes(b"", {"Content-Length": str(10**12)}), 413, "at most 8192"),
    "body over the limit": (request_bytes(json.dumps({"query": "x" * 9000}).encode()), 413, "at most 8192"),
    "query over the cap": (request_bytes(json.dumps({"query": "drill " * 40}).encode()), 413, "at most 100"),
    "lone surrogate": (request_bytes(b'{"query": "a\\ud800"}'), 400, "unicode"),
    "null query": (request_bytes(b'{"query": null}'), 400, "query"),
    "number query": (request_bytes(b'{"query": 5}'), 400, "query"),
    "blank query": (request_bytes(b'{"query": "   "}'), 400, "blank"),
    "no query": (request_bytes(b'{"shopper_id": "s"}'), 400, "query"),
    "wrong shopper type": (request_bytes(b'{"query": "drill", "shopper_id": 3}'), 400, "shopper_id"),
    "unknown arm": (request_bytes(b'{"query": "drill", "arm": "banana"}'), 400, "arm"),
    "json array": (request_bytes(b'["drill"]'), 400, "JSON object"),
    "json string": (request_bytes(b'"drill"'), 400, "JSON object"),
    "not json": (request_bytes(b"query=drill"), 400, "not valid JSON"),
    "bad utf-8": (request_bytes(b'{"query": "\xff\xfe"}'), 400, "not valid JSON"),
    "deep nesting": (request_bytes(DEEP), 400, "not valid JSON"),
    "huge number": (request_bytes(b'{"query": "x", "n": ' + b"9" * 5000 + b"}"), 400, "not valid JSON"),
    "serving raises": (request_bytes(b'{"query": "explode"}'), 500, "internal error: ValueError"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_gets_a_json_error_and_a_normal_query_is_still_served(served: Served, case: str) -> None:
    raw, expected, reason = CASES[case]
    with ThreadPoolExecutor(1) as pool:
        status, body = while_normal_query(served, pool.submit(raw_exchange, served.port, [raw]))
    assert status == expected and reason in str(body["error"]), (status, body)


def test_slow_client_gets_408_and_does_not_block_others(served: Served) -> None:
    """Headers and part of the body, then nothing: answered 408 after request_timeout_s (2 s here)."""
    head = request_bytes(b"", {"Content-Length": "50"})
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(raw_exchange, served.port, [head, b'{"query": '])
        status, body = while_normal_query(served, slow)
    assert status == 408 and "not received within 2 s" in str(body["error"]), body


def test_idle_connection_is_closed_after_the_timeout(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as sock:
        assert normal_query(served.port)[0] == 200, "an idle connection holds no one up"
        started = time.monotonic()
        assert sock.recv(100) == b"", "the server closes a connection that sends nothing"
        assert time.monotonic() - started < 30


def test_overloaded_rewriter_answers_503_then_recovers(served: Served) -> None:
    """With the model busy and max_in_flight (2) queries waiting for it, the next query is a 503 at once;
    when the model is free again the waiting queries are answered."""
    with ThreadPoolExecutor(2) as pool:
        with served.rewriter._lock:  # the model is busy with "another query"
            waiting = [pool.submit(normal_query, served.port) for _ in range(2)]
            deadline = time.monotonic() + 60
            while served.service._slots._value > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            status, body = post(served.port, b'{"query": "drill"}')
            assert status == 503 and "overloaded" in str(body["error"]), body
        assert [f.result(timeout=120)[0] for f in waiting] == [200, 200]
    assert normal_query(served.port)[0] == 200


def test_not_ready_rewriter_answers_503(served: Served, tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there: the broker check fails
    service = RewriterService(
        served.service.settings,
        served.rewriter,
        served.service.producer,
        {"broker": health.kafka_check(f"127.0.0.1:{closed}")},
    )
    server = service.http_server(0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        status, body = post(server.server_address[1], b'{"query": "drill"}')
        assert status == 503 and "not ready" in str(body["error"]), body
        assert normal_query(served.port)[0] == 200, "the ready rewriter still serves"
    finally:
        server.shutdown()
        server.server_close()


def test_healthz_is_the_accept_loops_heartbeat(served: Served) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/healthz", timeout=30) as response:
        body = json.loads(response.read())
    assert response.status == 200 and body["ok"] and body["age_s"] < body["max_age_s"]
    # A query that holds the model past the age limit makes the role not live.
    served.service._in_flight[-1] = time.monotonic() - served.service.settings.daemon.liveness_max_age_s - 1
    try:
        status, body = served.service.liveness()
        assert status == 503 and body["longest_query_s"] > body["max_age_s"]
    finally:
        served.service._in_flight.pop(-1)
