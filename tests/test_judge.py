"""The LLM judge: robust number parsing, consistent counts, plumbing with the local SmolLM2 and with an
OpenAI-compatible HTTP server, and a counted fallback when the server never answers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from qrloop.catalog import Catalog, Product
from qrloop.models import require_policy
from qrloop.settings import Settings
from simulators.judge import (
    QUESTIONS,
    ClickModelJudge,
    Completion,
    LLMJudge,
    Outcome,
    http_completion,
    judge_prompt,
    local_completion,
    parse_count,
)
from simulators.profiles import Profile, ProfilePool


@pytest.mark.parametrize(
    ("reply", "n_products", "expected"),
    [
        ("3", None, 3),
        ("I would click 2 items", None, 2),
        ("", None, None),
        ("   ", None, None),
        (None, None, None),
        ("eleven", None, 11),
        ("eleven", 10, 10),
        ("100", 10, 10),
        ("none", None, 0),
        ("None of them.", 10, 0),
        ("Two.", 10, 2),
        ("2.5", 10, 2),
        ("-4", 10, 0),
        ("all of them", 7, 7),
        ("No.", 10, 0),
        ("maybe", 10, None),
        ("I'd click one or two", 10, 1),
        ("Answer: 4\n(items 1-4)", 10, 4),
    ],
)
def test_parse_count_on_messy_replies(
    reply: str | None, n_products: int | None, expected: int | None
) -> None:
    assert parse_count(reply, n_products) == expected


# --- shared objects -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(base_settings: Settings) -> Catalog:
    return Catalog.open(base_settings)


@pytest.fixture(scope="module")
def products(catalog: Catalog) -> list[Product]:
    return catalog.products(["100001", "100002", "100005", "100006"])


PROFILE = ProfilePool(0, 1).profiles[0]
RELEVANCE = np.array([0.2, 0.9, 0.5, 0.7])  # the click model's view of `products`, by position


def fallback() -> ClickModelJudge:
    return ClickModelJudge(lambda query, products: RELEVANCE[: len(products)])


def scripted(replies: dict[str, str]) -> tuple[list[str], Completion]:
    """A stand-in for the model's text (the model itself is exercised below): replies by question."""
    prompts: list[str] = []

    def complete(prompt: str) -> str:
        prompts.append(prompt)
        kind = next(k for k, question in QUESTIONS.items() if question in prompt)
        return replies[kind]

    return prompts, complete


def judge_once(judge: LLMJudge, products: list[Product], profile: Profile = PROFILE) -> Outcome:
    return judge.judge(profile, "angle bracket", products, np.random.default_rng(0))


# --- the prompt and the counts ------------------------------------------------------------------------------


def test_prompt_is_the_papers_table_7(products: list[Product]) -> None:
    prompt = judge_prompt(PROFILE, "angle bracket", products, "add_to_cart")
    assert prompt.startswith(f"User Profile: {PROFILE.bio()}")
    assert "You are now a simulated user of this ecommerce platform" in prompt
    assert "using this query: angle bracket." in prompt
    assert "1. Simpson Strong-Tie" in prompt and "4. " in prompt
    assert prompt.endswith(
        "How many items from this list will you add to your cart? "
        "Respond with a single number only, DO NOT provide other information."
    )


def test_counts_are_consistent_and_go_to_the_most_attractive_products(products: list[Product]) -> None:
    prompts, complete = scripted({"click": "3", "add_to_cart": "I would add 5", "purchase": "one"})
    judge = LLMJudge(complete, fallback())
    outcome = judge_once(judge, products)
    assert [q for p in prompts for q in QUESTIONS.values() if q in p] == list(QUESTIONS.values())
    assert outcome.counts == {"impressions": 4, "clicks": 3, "add_to_carts": 3, "purchases": 1}
    # attractiveness follows relevance here (0.2, 0.9, 0.5, 0.7): positions 1, 3, 2 are clicked, 1 bought
    assert outcome.clicks == (False, True, True, True)
    assert outcome.purchases == (False, True, False, False)
    assert judge.fallbacks == 0 and judge.calls == 3


def test_an_answer_without_a_number_falls_back_and_is_counted(products: list[Product]) -> None:
    _prompts, complete = scripted({"click": "I cannot say", "add_to_cart": "1", "purchase": "1"})
    judge = LLMJudge(complete, fallback())
    outcome = judge_once(judge, products)
    assert judge.fallbacks == 1 and judge.calls == 1, "no further questions after an unusable answer"
    assert outcome.counts["impressions"] == 4
    assert judge_once(judge, []) == Outcome.empty() and judge.calls == 1, "an empty list asks nothing"


# --- real models and servers --------------------------------------------------------------------------------


def test_local_smollm2_judge_plumbing(base_settings: Settings, products: list[Product]) -> None:
    complete = local_completion(require_policy(base_settings))
    prompts: list[str] = []

    def recording(prompt: str) -> str:
        prompts.append(prompt)
        return complete(prompt)

    judge = LLMJudge(recording, fallback())
    outcome = judge_once(judge, products)
    assert len(judge.answers) == len(prompts) == judge.calls
    if judge.fallbacks == 0:
        # the model gave a number each time: one prompt per interaction kind, in funnel order
        assert [q for p in prompts for q in QUESTIONS.values() if q in p] == list(QUESTIONS.values())
    else:
        assert parse_count(judge.answers[-1], len(products)) is None, "only an unusable answer falls back"
    counts = outcome.counts
    assert counts["impressions"] == 4
    assert counts["purchases"] <= counts["add_to_carts"] <= counts["clicks"] <= 4


class _Answer(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))  # type: ignore[attr-defined]
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "2"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def answering_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_openai_compatible_endpoint_plumbing(
    answering_server: ThreadingHTTPServer, products: list[Product]
) -> None:
    url = f"http://127.0.0.1:{answering_server.server_address[1]}"
    judge = LLMJudge.for_target(url, fallback(), model="some-judge", timeout_s=5.0)
    outcome = judge_once(judge, products)
    requests = answering_server.requests  # type: ignore[attr-defined]
    assert [path for path, _ in requests] == ["/v1/chat/completions"] * 3
    assert all(body["model"] == "some-judge" and body["temperature"] == 0 for _, body in requests)
    assert QUESTIONS["purchase"] in requests[2][1]["messages"][0]["content"]
    assert outcome.counts == {"impressions": 4, "clicks": 2, "add_to_carts": 2, "purchases": 2}
    assert judge.fallbacks == 0


@pytest.fixture
def stalling_server() -> Iterator[str]:
    """A server on loopback that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_timeout_falls_back_to_the_click_model_and_is_counted(
    stalling_server: str, products: list[Product]
) -> None:
    judge = LLMJudge(http_completion(stalling_server, timeout_s=0.3), fallback())
    started = time.perf_counter()
    first = judge_once(judge, products)
    second = judge_once(judge, products[:2])
    assert judge.fallbacks == 2, "every list the LLM could not judge is counted"
    assert judge.calls == 2, "a list stops asking at its first timeout"
    assert time.perf_counter() - started < 3.0
    assert first.counts["impressions"] == 4 and second.counts["impressions"] == 2
    assert first == fallback().judge(PROFILE, "angle bracket", products, np.random.default_rng(0)), (
        "the fallback is the click model itself"
    )
