"""The one prompt the rewriter samples from and the learner trains on (and the offline SFT uses).

Short on purpose: in a DPO step most tokens were prompt (80% with a long system message), and the step's
cost grows with every token. The chat template is the model's own, so an instruct model sees the format it
was tuned on.

A *hinted* policy's user message also carries the words of the query's results: the ten words the titles of
the original query's top 30 use most that the query does not say (pseudo-relevance feedback, as RM3 does). A
135M policy that sees only the query cannot know a 54,667-product catalog's words; with them, the best two of
eight samples of the same warm start found 1.21x (Home Depot) and 1.36x (CrowdFlower) the judged-relevant
products of the original's top 10, against 1.09x and 1.14x with the query alone (``bench_hints.py``). Which
prompt a policy was trained on is part of its weights' meaning, so it travels in its ``config.json``
(:data:`HINT_WORDS_KEY`), which every DPO step and every version copies with the weights.

The query is searched for its words as the catalog spells it (:mod:`qrloop.spelling`), and a corrected
query leads the line: a misspelled word matches no title, so without it the results (and their words) are
those of the query's other words.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from qrloop.data import normalise_query

SYSTEM = "Rewrite the shopping query for a product search engine. Reply with the query only."
HINT_LINE = "Words in its results: "
# How deep a hinted prompt looks and how many words it shows: the original's ranks 11-30 hold 1.65x the
# judged-relevant products of its top 10 (bench_headroom's "deeper" row), and the best two of these ten words
# appended to the query reached 1.32x when the learner's reward picked them (its "expansions" rows).
RESULT_DEPTH = 30
RESULT_WORDS = 10
# A policy's config.json key: how many result words its prompt was trained with (absent or 0: the query only).
HINT_WORDS_KEY = "qrloop_hint_words"
# Words many titles share that name no product: a hint or an expansion by one of them moves the ranking by
# chance.
_FILLER_WORDS = frozenset(
    ["and", "the", "for", "with", "from", "into", "per", "pack", "set", "piece", "pieces"]
)
_WORD = re.compile(r"[a-z][a-z0-9'-]+")

# hints(query) -> the words of its results a hinted prompt shows (the composition root builds it over the
# search engine and the catalog, which the kernel does not know)
Hints = Callable[[str], list[str]]
# search(query, k) -> at most k product ids, best first
DeepSearch = Callable[[str, int], Sequence[str]]


def title_words(title: str) -> list[str]:
    """The words of a title as the hints count them (and the catalog's spelling knows them): lower case,
    starting with a letter, so sizes ("1/2", "20x8") are not words."""
    return _WORD.findall(title.lower())


def result_words(query: str, titles: Iterable[str], n: int = RESULT_WORDS) -> list[str]:
    """The ``n`` words most of ``titles`` use (one count per title, ties by first use) that ``query`` does not
    already say, in either number: pseudo-relevance feedback over the query's own results."""
    said = {w.lower().rstrip("s") for w in query.split()}
    counts: Counter[str] = Counter()
    for title in titles:
        counts.update(dict.fromkeys(title_words(title), 1))
    return [
        word
        for word, _ in counts.most_common()
        if len(word) > 2 and word not in _FILLER_WORDS and word.rstrip("s") not in said
    ][:n]


def results_hints(
    search: DeepSearch,
    title_of: Callable[[str], str],
    n: int = RESULT_WORDS,
    correct: Callable[[str], str] | None = None,
) -> Hints:
    """``hints(query)``: the :func:`result_words` of the titles of the query's top :data:`RESULT_DEPTH`.

    With ``correct`` (the catalog's spelling, :class:`qrloop.spelling.CatalogSpeller`), a query it changes is
    searched as corrected, and the corrected query leads the line, whole: a misspelled word matches no title,
    so the typed query's results hold the words of its *other* words, and a policy shown them has nothing to
    correct towards. Whole, because a 135M policy copies a phrase it is shown far more reliably than it
    substitutes one word inside another (README, "The catalog's spelling").
    """

    def hints(query: str) -> list[str]:
        fixed = correct(query) if correct is not None else query
        words = result_words(fixed, (title_of(p) for p in search(fixed, RESULT_DEPTH)), n)
        return ([fixed, *words] if fixed != normalise_query(query) else words)[:n]

    return hints


def user_message(query: str, hints: Sequence[str] = ()) -> str:
    """What the policy is asked: the query, then (a hinted policy) one line of its results' words."""
    query = query.strip()
    return f"{query}\n{HINT_LINE}{', '.join(hints)}" if hints else query


def hint_words(model: Any) -> int:
    """How many result words ``model``'s prompt was trained with: 0 for a policy that sees the query only."""
    return int(getattr(getattr(model, "config", None), HINT_WORDS_KEY, 0) or 0)


def build_prompt(tokenizer: Any, query: str, hints: Sequence[str] = ()) -> str:
    """The templated prompt text, ending where the assistant's rewrite begins."""
    message = user_message(query, hints)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": message}]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return f"{SYSTEM}\nQuery: {message}\nRewrite:"


def end_of_turn(tokenizer: Any, generation_config: Any = None) -> str:
    """The token a rewrite ends with: the one ``generate`` stops on, else the tokenizer's EOS.

    They differ for the converted SmolLM2: its tokenizer reports ``<|im_start|>`` as EOS (a GGUF conversion
    artefact) while its generation config stops on ``<|im_end|>``, the chat template's end of turn. A learner
    that scored rewrites ending in the tokenizer's EOS would train a terminator the rewriter never samples.
    """
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        return str(tokenizer.eos_token)
    return str(tokenizer.convert_ids_to_tokens(int(eos)))
