"""The LLM judge: robust number parsing, plumbing with the local SmolLM2, and a counted timeout fallback."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from qrloop.models import require_policy
from qrloop.settings import Settings
from simulators.catalog import Catalog
from simulators.judge import (
    ClickModelJudge,
    LLMJudge,
    http_completion,
    judge_prompt,
    local_completion,
    parse_count,
)
from simulators.profiles import ProfilePool


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("3", 3),
        ("I would click 2 items", 2),
        ("", None),
        ("eleven", 10),
        ("100", 10),
        ("none of them", 0),
        ("Two.", 2),
        ("no number here", 0),
        ("maybe", None),
        ("-4", 0),
        ("all of them", 10),
    ],
)
def test_parse_count_on_messy_replies(reply: str, expected: int | None) -> None:
    assert parse_count(reply, n_products=10) == expected


@pytest.fixture(scope="module")
def catalog(base_settings: Settings) -> Catalog:
    return Catalog.open(base_settings)


def fallback(catalog: Catalog) -> ClickModelJudge:
    return ClickModelJudge(lambda q, ps: np.full(len(ps), 0.8))


def test_prompt_is_the_papers_table_7(catalog: Catalog) -> None:
    profile = ProfilePool(0, 1).profiles[0]
    prompt = judge_prompt(profile, "angle bracket", catalog.products(["100001"]), "click")
    assert "How many items from this list will you click?" in prompt
    assert "Respond with a single number only" in prompt and "Simpson Strong-Tie" in prompt
    assert profile.bio() in prompt


def test_local_smollm2_judge_plumbing(base_settings: Settings, catalog: Catalog) -> None:
    judge = LLMJudge(local_completion(str(require_policy(base_settings))), fallback(catalog))
    products = catalog.products(["100001", "100002", "100005"])
    outcome = judge.judge(ProfilePool(0, 1).profiles[0], "angle bracket", products, np.random.default_rng(0))
    assert len(judge.answers) + 3 * judge.fallbacks >= 3, "one question per interaction kind"
    counts = outcome.counts
    assert counts["impressions"] == 3
    assert counts["purchases"] <= counts["add_to_carts"] <= counts["clicks"] <= 3


def test_timeout_falls_back_to_the_click_model_and_is_counted(catalog: Catalog) -> None:
    # A server on loopback that accepts connections and never answers.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        judge = LLMJudge(http_completion(url, timeout_s=0.5), fallback(catalog))
        outcome = judge.judge(
            ProfilePool(0, 1).profiles[0],
            "bracket",
            catalog.products(["100001", "100002"]),
            np.random.default_rng(0),
        )
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()
    assert judge.fallbacks == 1
    assert outcome.counts["impressions"] == 2
