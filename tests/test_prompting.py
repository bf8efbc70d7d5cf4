"""The hinted prompt: which words of the results it shows, how the user message carries them, and how a
policy says it was trained on them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from learner.offline.build import mark_hinted
from learner.ope import model_scorer
from learner.worker import training_triples, triple
from qrloop.events import PreferencePair, QueryEvent, decode, encode
from qrloop.models import ModelLoadError, build_tiny_policy, load_policy, require_policy
from qrloop.prompting import (
    HINT_WORDS_KEY,
    RESULT_DEPTH,
    build_prompt,
    hint_words,
    result_words,
    results_hints,
    user_message,
)
from qrloop.serving import Rewriter, load_version
from qrloop.settings import RewardSettings, RewriterSettings, Settings
from streams import attribution
from tests.test_attribution import interaction, query_event, relevance_table
from tests.test_serving import fake_search

TITLES = ["Ryobi Cordless Drills Kit", "DEWALT Cordless Drill and Case", "Cordless Drill Set", "Drill Bit"]


def test_result_words_are_the_titles_common_words_the_query_does_not_say() -> None:
    # "drill" is said (in the other number too); "and" and "set" name nothing; "cordless" is in three titles,
    # then one-title words in the order the titles use them
    assert result_words("Drill 0", TITLES, n=4) == ["cordless", "ryobi", "kit", "dewalt"]
    assert result_words("cordless drills", TITLES, n=2) == ["ryobi", "kit"]


def test_results_hints_search_the_query_deep_and_read_its_titles() -> None:
    asked: list[tuple[str, int]] = []

    def search(query: str, k: int) -> list[str]:
        asked.append((query, k))
        return [str(i) for i in range(len(TITLES))]

    hints = results_hints(search, lambda product: TITLES[int(product)], n=3)
    assert hints("drill") == ["cordless", "ryobi", "kit"]
    assert asked == [("drill", RESULT_DEPTH)]


def test_the_user_message_is_the_query_alone_without_hints() -> None:
    assert user_message("  cordles drill ") == "cordles drill"
    assert user_message("cordles drill", ["cordless", "ryobi"]) == (
        "cordles drill\nWords in its results: cordless, ryobi"
    )
    plain = SimpleNamespace(chat_template=None)
    assert build_prompt(plain, "cordles drill") == (
        "Rewrite the shopping query for a product search engine. Reply with the query only.\n"
        "Query: cordles drill\nRewrite:"
    )
    assert "Words in its results: cordless" in build_prompt(plain, "cordles drill", ["cordless"])


def test_a_policy_says_how_many_result_words_it_was_trained_with() -> None:
    assert hint_words(SimpleNamespace(config=SimpleNamespace())) == 0
    assert hint_words(SimpleNamespace(config=SimpleNamespace(**{HINT_WORDS_KEY: 10}))) == 10
    assert hint_words(object()) == 0


# --- a hinted policy end to end: served with its words, logged, paired, trained and scored under them ---


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny"), require_policy(Settings()), seed=1)


def hinted_copy(tiny: Path, into: Path, words: int) -> Path:
    """A copy of ``tiny`` whose config says its prompt shows ``words`` result words (as the warm start marks
    it), saved and loaded again through transformers."""
    model, tokenizer = load_policy(tiny)
    model.save_pretrained(into)
    tokenizer.save_pretrained(into)
    mark_hinted(into, words)
    return into


def test_the_hint_mark_survives_every_save_a_version_goes_through(tiny: Path, tmp_path: Path) -> None:
    marked = hinted_copy(tiny, tmp_path / "marked", 3)
    model, tokenizer = load_policy(marked)
    assert hint_words(model) == 3
    model.save_pretrained(tmp_path / "next")  # what a DPO step's publish does with the weights it trained
    tokenizer.save_pretrained(tmp_path / "next")
    assert hint_words(load_policy(tmp_path / "next")[0]) == 3
    assert hint_words(load_policy(tiny)[0]) == 0


def test_a_hinted_policy_is_served_with_its_results_words(tiny: Path, tmp_path: Path) -> None:
    hinted = load_version(hinted_copy(tiny, tmp_path / "hinted", 3), 2)
    asked: list[str] = []

    def hints(query: str) -> list[str]:
        asked.append(query)
        return ["cordless", "ryobi", "kit", "dewalt"]

    config = RewriterSettings(max_new_tokens=4, max_resamples=3)
    with pytest.raises(ModelLoadError, match="results' words"):
        Rewriter(hinted, fake_search, config)  # no catalog to take the words from: never served plain
    plain_rewriter = Rewriter(load_version(tiny, 1), fake_search, config)
    with pytest.raises(ModelLoadError):
        plain_rewriter.swap(hinted)
    assert plain_rewriter.version == 1, "a refused swap keeps the version that was serving"

    plain = plain_rewriter.serve("angle bracket", shopper_id="s", session_id="x")
    assert plain.hints == [] and b'"hints"' not in encode(plain), "a plain event's JSON is as it always was"

    rewriter = Rewriter(load_version(tiny, 1), fake_search, config, hints=hints)
    assert rewriter.serve("angle bracket", shopper_id="s", session_id="x").hints == []
    assert asked == [], "a plain policy's prompt needs no search for words"
    rewriter.swap(hinted)
    torch.manual_seed(0)
    event = rewriter.serve("angle bracket", shopper_id="s", session_id="x")
    assert event.hints == ["cordless", "ryobi", "kit"], "as many words as the policy was trained with"
    assert asked == ["angle bracket"], "one search for the words per query, however many rounds it samples"
    assert decode(QueryEvent, encode(event)) == event


def test_pairs_and_the_learner_keep_the_prompt_the_rewrites_were_sampled_from() -> None:
    words = ["metal", "steel"]
    state = attribution.apply_query(
        attribution.new_state(now_wall=0.0), query_event().model_copy(update={"hints": words}), 30.0
    )
    attribution.apply_interaction(state, interaction("r1", "p5", "click", 1), 30.0)
    pair = attribution.score(state, relevance_table, RewardSettings(relevant_above=0.5)).pair
    assert pair is not None and pair.hints == words
    assert decode(PreferencePair, encode(pair)) == pair
    message = "angle bracket\nWords in its results: metal, steel"
    assert triple(pair) == (message, pair.chosen, pair.rejected)
    assert training_triples([pair], echo_rejected=True)[1] == (message, pair.chosen, "angle bracket")
    plain = pair.model_copy(update={"hints": []})
    assert triple(plain)[0] == "angle bracket"


def test_off_policy_scores_rewrites_under_the_prompt_they_were_sampled_from(tiny: Path) -> None:
    model, tokenizer = load_policy(tiny)
    score = model_scorer(model, tokenizer, max_new_tokens=8)
    event = query_event().model_copy(update={"hints": ["metal", "steel"]})
    as_asked = event.model_copy(update={"query": user_message(event.query, event.hints), "hints": []})
    plain = event.model_copy(update={"hints": []})
    assert score([event]) == score([as_asked])
    assert score([event]) != score([plain])
