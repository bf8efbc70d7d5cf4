"""The rewriter: two distinct sampled rewrites with their log-probabilities; hot swap on announcement."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest
import torch
from kafka import KafkaProducer
from transformers import PreTrainedTokenizerBase

from policy_store import db
from qrloop.data import normalise_query as normalise
from qrloop.events import PolicyAnnouncement, encode
from qrloop.models import build_tiny_policy, require_policy
from qrloop.prompting import build_prompt, end_of_turn
from qrloop.rewards import is_echo
from qrloop.runs import open_store
from qrloop.serving import (
    AnnouncementFollower,
    LoadedPolicy,
    Rewriter,
    Sampled,
    _completion_logprobs,
    best_two,
    complementary_two,
    load_version,
    round_temperature,
    top_two,
    useful_distinct,
)
from qrloop.settings import RewriterSettings, Settings
from qrloop.topics import ensure_topics
from tests.helpers import free_port, get, isolated_env, store_settings, wait_for


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tokenizer_dir = require_policy(Settings())
    return (
        build_tiny_policy(tmp_path_factory.mktemp("a"), tokenizer_dir, seed=1),
        build_tiny_policy(tmp_path_factory.mktemp("b"), tokenizer_dir, seed=2),
    )


def fake_search(text: str) -> list[str]:
    return [f"p{abs(hash(w)) % 50}" for w in text.split()][:10]


def test_two_distinct_rewrites_with_their_logprobs(tiny_dirs: tuple[Path, Path]) -> None:
    policy = load_version(tiny_dirs[0], 1)
    rewriter = Rewriter(policy, fake_search, RewriterSettings(max_new_tokens=8))
    torch.manual_seed(0)
    event = rewriter.serve("angle bracket", shopper_id="s", session_id="x")
    first, second = event.rewrites
    assert normalise(first.text) != normalise(second.text)
    assert event.policy_version == 1 and event.arm == "production"
    assert event.original_products == fake_search("angle bracket")
    assert first.products == fake_search(first.text)

    assert first.logprob < 0 and second.logprob < 0


def test_logged_logprob_is_the_policys_own(tiny_dirs: tuple[Path, Path]) -> None:
    """What generate() reports equals a plain forward pass over the same tokens, EOS included, padding not."""
    policy = load_version(tiny_dirs[0], 1)
    model, tokenizer = policy.model, policy.tokenizer
    inputs = tokenizer(build_prompt(tokenizer, "angle bracket"), return_tensors="pt")
    torch.manual_seed(3)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            do_sample=True,
            max_new_tokens=8,
            num_return_sequences=2,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
    prompt_len = inputs.input_ids.shape[1]
    stop_id = tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer, model.generation_config))
    logged = _completion_logprobs(out.sequences, out.logits, prompt_len, stop_id)
    for row in range(2):
        ids = out.sequences[row : row + 1]
        generated = ids[0, prompt_len:].tolist()
        if stop_id in generated:
            generated = generated[: generated.index(stop_id) + 1]
        full = torch.cat([inputs.input_ids, torch.tensor([generated])], dim=1)
        with torch.no_grad():
            logps = torch.log_softmax(model(full).logits[0, :-1].float(), dim=-1)
        targets = full[0, prompt_len:]
        expected = float(logps[prompt_len - 1 :].gather(1, targets[:, None]).sum())
        assert float(logged[row]) == pytest.approx(expected, abs=1e-3)


def test_useful_candidates_skip_echoes_empties_and_repeats_in_draw_order() -> None:
    a, b, c = (
        Sampled("Drill", -1.0),
        Sampled("cordless drill", -2.0, draw=1),
        Sampled("drill bit", -3.0, draw=2),
    )
    candidates = [a, b, Sampled(" ", -0.5), Sampled("Cordless  drill", -2.5, draw=2), c]
    assert useful_distinct("drill", candidates) == [b, c]
    assert useful_distinct("drill", [a, b]) == [b], "one useful rewrite is not a pair"
    # Best-of-N: the two best scores, served in draw order; a tie goes to the earlier draw.
    d = Sampled("drill driver", -4.0, draw=2)
    assert top_two([b, c, d], [0.1, 0.5, 0.3]) == [c, d]
    assert top_two([b, c, d], [0.2, 0.2, 0.2]) == [b, c]
    # Out of tries: the useful one first, then a distinct text (an echo if nothing else), then anything.
    assert best_two("drill", [a, a, b]) == [b, a]
    assert best_two("drill", [a, Sampled("drill", -1.5)]) == [a, Sampled("drill", -1.5)]
    assert best_two("drill", [a, a]) == [a, a], "two identical draws are still two rewrites"


class RecordingRewriter(Rewriter):
    """The real rewriter and model; it remembers every round it drew (as :meth:`altered` leaves it)."""

    rounds: list[list[Sampled]]

    def _sample(
        self,
        policy: LoadedPolicy,
        query: str,
        reference: LoadedPolicy | None = None,
        draw: int = 1,
        hints: Sequence[str] = (),
    ) -> list[Sampled]:
        out = self.altered(query, draw, super()._sample(policy, query, reference, draw, hints))
        self.rounds.append(out)
        return out

    def altered(self, query: str, draw: int, drawn: list[Sampled]) -> list[Sampled]:
        return drawn


class EchoingRewriter(RecordingRewriter):
    """The real rewriter and model, except that the first rewrite of the first round echoes the query (what a
    collapsing policy does); it remembers every round it served from."""

    def altered(self, query: str, draw: int, drawn: list[Sampled]) -> list[Sampled]:
        if draw == 1:
            drawn[0] = drawn[0]._replace(text=query.upper())
        return drawn


def test_resamples_an_echo_and_logs_each_served_rewrite_with_its_own_round(
    tiny_dirs: tuple[Path, Path],
) -> None:
    config = RewriterSettings(max_new_tokens=6, max_resamples=3)
    rewriter = EchoingRewriter(load_version(tiny_dirs[0], 1), fake_search, config)
    rewriter.rounds = []
    torch.manual_seed(7)
    event = rewriter.serve("angle bracket", shopper_id="s", session_id="x")
    assert len(rewriter.rounds) >= 2, "an echo in the first round makes the rewriter sample again"
    assert len(rewriter.rounds) <= 1 + config.max_resamples, "bounded"
    assert all(not is_echo("angle bracket", r.text) for r in event.rewrites), "the echo is not served"
    assert normalise(event.rewrites[0].text) != normalise(event.rewrites[1].text)
    # Each served rewrite is one of the drawn candidates, with the log-probability computed in its own round
    # (that computation is test_logged_logprob_is_the_policys_own's), and says which round that was.
    drawn = {(c.text, c.logprob, c.draw) for number, rnd in enumerate(rewriter.rounds, 1) for c in rnd}
    assert all(c.draw == number for number, rnd in enumerate(rewriter.rounds, 1) for c in rnd)
    assert {(r.text, r.logprob, r.draw) for r in event.rewrites} <= drawn
    assert max(r.draw for r in event.rewrites) >= 2, "the second rewrite came from a later round"


def test_a_collapsed_policy_is_resampled_hotter_and_logged_at_its_own_temperature(
    tiny_dirs: tuple[Path, Path],
) -> None:
    # Near-greedy, the tiny model always ends at once: one text (empty) whatever the seed, a collapse.
    policy = load_version(tiny_dirs[0], 1)

    def served_and_rounds(heat: float) -> tuple[list[Sampled], list[list[Sampled]]]:
        config = RewriterSettings(max_new_tokens=6, temperature=0.05, max_resamples=2, resample_heat=heat)
        assert [round_temperature(config, draw) for draw in (1, 2)] == pytest.approx([0.05, 0.05 * heat])
        rewriter = RecordingRewriter(policy, fake_search, config)
        rewriter.rounds = []
        torch.manual_seed(0)
        return rewriter.sample_rewrites(policy, "angle bracket", reference=policy), rewriter.rounds

    unheated, rounds = served_and_rounds(1.0)
    assert len(rounds) == 3 and all(c.text == "" for rnd in rounds for c in rnd), "the same text every round"
    assert [c.text for c in unheated] == ["", ""], "at one temperature the collapse is served"
    heated, (first, *_) = served_and_rounds(10.0)
    assert all(c.text == "" for c in first)
    assert len(useful_distinct("angle bracket", heated)) == 2 and all(c.draw >= 2 for c in heated)
    # What is logged is log π(y | x) at temperature 1 (the same completion scored by a forward pass), not the
    # heated round's sampling distribution, so off-policy estimates and DPO see the policy itself.
    for c in heated:
        assert c.reference_logprob is not None
        assert c.logprob == pytest.approx(c.reference_logprob, abs=1e-3)


def test_best_of_n_serves_the_two_candidates_the_ranker_scores_highest(tiny_dirs: tuple[Path, Path]) -> None:
    searched: list[str] = []
    ranked: list[tuple[str, list[str], list[list[str]]]] = []

    def search(text: str) -> list[str]:
        searched.append(text)
        return fake_search(text)

    def rank(query: str, original: Sequence[str], lists: Sequence[Sequence[str]]) -> list[float]:
        ranked.append((query, list(original), [list(ps) for ps in lists]))
        return [float(len(set(ps) - set(original))) + 0.01 * len(ps) for ps in lists]  # new products first

    config = RewriterSettings(max_new_tokens=6, samples=8)
    rewriter = RecordingRewriter(load_version(tiny_dirs[0], 1), search, config, rank=rank)
    rewriter.rounds = []
    torch.manual_seed(3)
    event = rewriter.serve("angle bracket", shopper_id="s", session_id="x")

    assert len(rewriter.rounds[0]) == 8, "one round draws rewriter.samples rewrites"
    useful = useful_distinct("angle bracket", [c for rnd in rewriter.rounds for c in rnd])
    assert len(useful) > 2 and len(ranked) == 1, "ranked once, over every useful candidate drawn"
    query, original, lists = ranked[0]
    assert query == "angle bracket" and original == fake_search("angle bracket")
    assert lists == [fake_search(c.text) for c in useful]
    scores = dict(zip((c.text for c in useful), rank(query, original, lists), strict=True))
    served = [r.text for r in event.rewrites]
    left = [c.text for c in useful if c.text not in served]
    assert min(scores[t] for t in served) >= max(scores[t] for t in left), "the best two are served"
    assert served == [c.text for c in useful if c.text in served], "in draw order"
    assert [r.products for r in event.rewrites] == [fake_search(t) for t in served]
    assert sorted(searched) == sorted({"angle bracket", *(c.text for c in useful)}), "each text searched once"


def new_relevant(query: str, original: Sequence[str], lists: Sequence[Sequence[str]]) -> list[float]:
    """A ranker like the novelty's: the relevant products ("r…") a list adds beyond ``original``."""
    return [float(len({p for p in ps if p.startswith("r")} - set(original))) for ps in lists]


def test_complementary_pick_serves_what_adds_most_beyond_the_first() -> None:
    b, c, d, e = (Sampled(t, -1.0) for t in ("drill kit", "cordless drill", "drill set", "drill driver"))
    original = ["r0", "x1"]
    lists = [["r1", "x2"], ["r2", "r3", "r4", "r0"], ["r2", "r3", "r4", "x3"], ["r5", "r6", "x4"]]
    assert new_relevant("drill", original, lists) == [1.0, 3.0, 3.0, 2.0]
    # Ranked on their own, c and d are the best two; together they add r2-r4 once (3 products).
    assert top_two([b, c, d, e], new_relevant("drill", original, lists)) == [c, d]
    # Complementary: c, then e, which adds r5 and r6 beyond the original and c (5 products), in draw order.
    assert complementary_two("drill", [b, c, d, e], original, lists, new_relevant) == [c, e]
    # Nothing adds beyond the first: the second goes to the first ranking's next best, then the earlier draw.
    same = [["r2"], ["r2", "r3"], ["r3"], ["r2", "x5"]]
    assert complementary_two("drill", [b, c, d, e], original, same, new_relevant) == [b, c]


def test_best_of_n_complementary_ranks_the_rest_against_the_original_and_the_first(
    tiny_dirs: tuple[Path, Path],
) -> None:
    ranked: list[tuple[list[str], list[list[str]]]] = []

    def rank(query: str, original: Sequence[str], lists: Sequence[Sequence[str]]) -> list[float]:
        ranked.append((list(original), [list(ps) for ps in lists]))
        return [float(len(set(ps) - set(original))) + 0.01 * len(ps) for ps in lists]

    config = RewriterSettings(max_new_tokens=6, samples=8, pick="complementary")
    rewriter = RecordingRewriter(load_version(tiny_dirs[0], 1), fake_search, config, rank=rank)
    rewriter.rounds = []
    torch.manual_seed(3)
    event = rewriter.serve("angle bracket", shopper_id="s", session_id="x")

    useful = useful_distinct("angle bracket", [c for rnd in rewriter.rounds for c in rnd])
    assert len(useful) > 2 and len(ranked) == 2, "ranked against the original, then the rest beyond the first"
    (original, lists), (shown, rest) = ranked
    scores, beyond = rank("", original, lists), rank("", shown, rest)
    first = max(range(len(useful)), key=lambda i: (scores[i], -i))
    assert shown == list(dict.fromkeys([*original, *lists[first]]))
    assert rest == [ps for i, ps in enumerate(lists) if i != first]
    others = [i for i in range(len(useful)) if i != first]
    second = others[max(range(len(others)), key=lambda j: (beyond[j], scores[others[j]], -j))]
    served = [r.text for r in event.rewrites]
    assert served == [useful[i].text for i in sorted((first, second))], "the first, then the most beyond it"


def test_swap_waits_for_the_query_in_flight(tiny_dirs: tuple[Path, Path]) -> None:
    first = load_version(tiny_dirs[0], 1)
    second = load_version(tiny_dirs[1], 2)
    rewriter = Rewriter(first, fake_search, RewriterSettings(max_new_tokens=4))
    served: list[int | None] = []

    def serve_many() -> None:
        for _ in range(6):
            served.append(rewriter.serve("drill", shopper_id="s", session_id="x").policy_version)

    thread = threading.Thread(target=serve_many)
    thread.start()
    time.sleep(0.05)
    rewriter.swap(second)
    thread.join()
    assert served[-1] == 2 and set(served) <= {1, 2}
    assert served == sorted(cast("list[int]", served)), "once swapped, never back"  # all 1 or 2, as asserted


def test_announcement_makes_the_rewriter_serve_the_new_version(
    settings: Settings, kafka_bootstrap: str, unique_topic: str, tiny_dirs: tuple[Path, Path]
) -> None:
    topics = settings.topics.model_copy(update={"policy_versions": f"{unique_topic}.v"})
    configured = settings.model_copy(update={"topics": topics})
    ensure_topics(configured, {topics.policy_versions: 1})
    db.upgrade(configured.db_url)
    store = open_store(configured)
    v1 = store.publish(tiny_dirs[0], base_model="tiny")
    v2 = store.publish(tiny_dirs[1], base_model="tiny", parent=v1.id)
    store.set_alias("production", v1.id)
    rewriter = Rewriter(
        load_version(store.load_dir(v1), v1.id), fake_search, RewriterSettings(max_new_tokens=4)
    )
    follower = AnnouncementFollower(configured, rewriter, "production", store).start()
    time.sleep(1.0)  # the follower starts at the end of the topic
    store.set_alias("production", v2.id)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    note = PolicyAnnouncement(kind="alias_moved", version=v2.id, alias="production", previous_version=v1.id)
    producer.send(topics.policy_versions, value=encode(note))
    producer.flush()
    deadline = time.monotonic() + 30
    while rewriter.version != v2.id and time.monotonic() < deadline:
        time.sleep(0.1)
    follower.stop()
    producer.close()
    assert rewriter.version == v2.id
    assert rewriter.serve("drill", shopper_id="s", session_id="x").policy_version == v2.id
    assert follower.swaps and follower.swaps[0][0] == v2.id
    store.close()


def test_readyz_fails_on_an_unreachable_broker_or_database(
    settings: Settings, kafka_bootstrap: str, tiny_dirs: tuple[Path, Path]
) -> None:
    """The rewriter is ready only when it can serve *and* publish: the real broker and database pass, an
    address where nothing listens fails its check by name (503)."""
    import json

    from qrloop import health
    from qrloop.serving import RewriterService

    rewriter = Rewriter(load_version(tiny_dirs[0], 1), fake_search, RewriterSettings(max_new_tokens=4))
    closed = free_port()  # nothing listens there
    cases = {
        "all reachable": {
            "broker": health.kafka_check(kafka_bootstrap),
            "database": health.database_check(settings.db_url),
        },
        "broker down": {
            "broker": health.kafka_check(f"127.0.0.1:{closed}"),
            "database": health.database_check(settings.db_url),
        },
        "database down": {
            "broker": health.kafka_check(kafka_bootstrap),
            "database": health.database_check(
                f"postgresql+psycopg://qrloop:qrloop@127.0.0.1:{closed}/qrloop"
            ),
        },
    }
    results = {}
    for name, checks in cases.items():
        server = RewriterService(settings, rewriter, producer=None, checks=checks).http_server(0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            status, body = get(f"http://127.0.0.1:{server.server_address[1]}/readyz")
            results[name] = (status, json.loads(body))
        finally:
            server.shutdown()
            server.server_close()
    status, body = results["all reachable"]
    assert status == 200 and body["role"] == "rewriter" and body["version"] == 1
    assert set(body["checks"]) == {"broker", "database", "model"}
    assert all(c["ok"] for c in body["checks"].values())
    for name, failing in (("broker down", "broker"), ("database down", "database")):
        status, body = results[name]
        assert status == 503 and body["ok"] is False, name
        assert [k for k, c in body["checks"].items() if not c["ok"]] == [failing], (name, body)


def decode_one(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    text = tokenizer.decode([token_id], skip_special_tokens=True)
    assert isinstance(text, str)  # one id list decodes to one string; the stubs' union also covers batches
    return text


def token_pieces(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """What each vocabulary token decodes to alone, without whitespace (the rewriter collapses it)."""
    pieces = {"".join(decode_one(tokenizer, i).split()) for i in range(len(tokenizer))}
    return pieces | {""}


def from_two_tokens(text: str, pieces: set[str]) -> bool:
    """Whether a served rewrite is the decoded text of at most two generated tokens.

    Two byte-fragment tokens can decode together to one character that neither decodes to alone, so a text
    of at most two characters passes too.
    """
    bare = "".join(text.split())
    return len(bare) <= 2 or any(bare[:k] in pieces and bare[k:] in pieces for k in range(len(bare) + 1))


def test_sighup_reloads_sampling_settings_and_log_level(
    base_settings: Settings, kafka_bootstrap: str, unique_topic: str, tmp_path: Path
) -> None:
    """``qrloop serve`` on the real broker and store: /readyz checks all three; after the config file caps
    rewrites at 2 tokens and SIGHUP, every rewrite has at most 2 tokens and DEBUG lines appear."""
    import json
    import signal
    import subprocess
    import sys
    import urllib.request

    from qrloop.models import load_policy
    from qrloop.settings import REPO_ROOT

    tiny = build_tiny_policy(tmp_path / "tiny", require_policy(base_settings), seed=3)
    settings = store_settings(base_settings, unique_topic, tmp_path, tiny)
    _, tokenizer = load_policy(tiny)
    config = tmp_path / "qrloop.toml"
    config.write_text("[rewriter]\nmax_new_tokens = 12\n")
    port = free_port()
    log_path = tmp_path / "serve.log"
    # The level must come from the file (the environment would win over it), so that its change can show.
    env = {k: v for k, v in isolated_env(settings, unique_topic).items() if k != "QRLOOP_LOGGING__LEVEL"}
    env["QRLOOP_CONFIG"] = str(config)
    with log_path.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "qrloop", "serve", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )

    def texts(n: int) -> list[str]:
        """The rewrites of ``n`` queries served now."""
        served = []
        for _ in range(n):
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/rewrite",
                data=json.dumps({"query": "cordless drill"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                event = json.loads(response.read())
            served += [r["text"] for r in event["rewrites"]]
        return served

    try:
        wait_for(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 120, "/readyz", log_path)
        body = json.loads(get(f"http://127.0.0.1:{port}/readyz")[1])
        assert set(body["checks"]) == {"broker", "database", "follower", "model"} and all(
            c["ok"] for c in body["checks"].values()
        )
        pieces = token_pieces(tokenizer)
        before = texts(3)
        assert not all(from_two_tokens(text, pieces) for text in before), (
            "a random tiny model runs past 2 tokens: the cap below is what stops it"
        )

        config.write_text("[rewriter]\nmax_new_tokens = 2\ntemperature = 0.7\n[logging]\nlevel = 'DEBUG'\n")
        server.send_signal(signal.SIGHUP)
        expected = "settings reloaded: log level DEBUG, {'temperature': 0.7, 'max_new_tokens': 2}"
        wait_for(lambda: expected in log_path.read_text(errors="replace"), 30, "the reload", log_path)
        assert server.poll() is None, "SIGHUP does not stop the rewriter"
        after = texts(3)
        # Exactly "at most two generated tokens", not a re-tokenised count: the decoded text of two odd tokens
        # (byte fragments decode to U+FFFD) re-tokenised into 5 once.
        assert all(from_two_tokens(text, pieces) for text in after), (before, after)
        assert "DEBUG qrloop" in log_path.read_text(errors="replace"), "the log level was reloaded"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
