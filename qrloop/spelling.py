"""Catalog spelling: the catalog's own word for a query word its titles (almost) never use.

A misspelled query ("cordles drill") retrieves on its other words, so the words of its results, which a
hinted prompt shows (:mod:`qrloop.prompting`), are often off-target, and a 135M policy corrected 19-23% of
held-out known misspellings however its warm start was mixed (README, "The catalog's spelling"). Search
engines correct against their own index; so does this: a word fewer than ``min_count`` titles use (in either
number) is replaced by the word one edit away (two for words of five letters or more, where none is one
away) that most titles use *together with the query's other words*, then by the one most titles use at all.
The context is what turns "chase lounge" into "chaise lounge" rather than "case lounge". Only alphabetic
words of three letters or more are looked at: sizes, model numbers and units ("20x8", "1/2", "40ft") are left
as typed, because an edit of a number is another product, not a typo.

Pure: built from the titles alone (never from queries, so held-out queries cannot leak into it).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from qrloop.prompting import title_words

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
# A word fewer titles use than this is a candidate typo; a correction must be used at least this often.
MIN_COUNT = 3
# Words this long get a second edit when no word is one edit away: "galvenized", "electirc" and
# "flourescent" are one edit off, "milluakee", "propain" and "acessary" two. Shorter words two edits away
# from a catalog word are mostly other words.
TWO_EDITS_FROM = 5


def edits1(word: str) -> set[str]:
    """Every string one deletion, transposition, replacement or insertion of a letter away from ``word``."""
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    deletes = {a + b[1:] for a, b in splits if b}
    transposes = {a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1}
    replaces = {a + c + b[1:] for a, b in splits if b for c in _LETTERS}
    inserts = {a + c + b for a, b in splits for c in _LETTERS}
    return deletes | transposes | replaces | inserts


def _numbers(word: str) -> tuple[str, ...]:
    """``word`` and the forms its other grammatical number may take in a title."""
    if word.endswith("es"):
        return word, word[:-1], word[:-2]
    if word.endswith("s"):
        return word, word[:-1]
    return word, word + "s", word + "es"


class CatalogSpeller:
    """``correct(query)``: the query with each word the catalog does not know replaced by its likeliest
    catalog word (unchanged where there is none)."""

    def __init__(self, titles: Iterable[str], min_count: int = MIN_COUNT) -> None:
        postings: dict[str, list[int]] = {}
        for i, title in enumerate(titles):
            for word in dict.fromkeys(title_words(title)):
                postings.setdefault(word, []).append(i)
        # Sorted title ids per word: the co-occurrence count of a candidate is one intersection.
        self._titles = {w: np.asarray(ids, dtype=np.int32) for w, ids in postings.items()}
        self.min_count = min_count

    def count(self, word: str) -> int:
        """How many titles use ``word``."""
        ids = self._titles.get(word)
        return 0 if ids is None else len(ids)

    def known(self, word: str) -> bool:
        """Whether enough titles use ``word`` or its other number ("shelfs" is not a typo of "shelf")."""
        return any(self.count(form) >= self.min_count for form in _numbers(word))

    def corrections(self, query: str) -> dict[str, str]:
        """Each misspelled word of ``query`` (lower case) → the catalog word that replaces it."""
        words = query.lower().split()
        fixes: dict[str, str] = {}
        for i, word in enumerate(words):
            if not self._checked(word):
                continue
            context = [w for j, w in enumerate(words) if j != i and self.known(w)]
            best = self._best(word, context)
            if best is not None:
                fixes[word] = best
        return fixes

    def correct(self, query: str) -> str:
        """``query`` lower-cased with its :meth:`corrections` applied (its other words as typed)."""
        fixes = self.corrections(query)
        return " ".join(fixes.get(w, w) for w in query.lower().split())

    def _checked(self, word: str) -> bool:
        return word.isalpha() and len(word) >= 3 and not self.known(word)

    def _best(self, word: str, context: list[str]) -> str | None:
        near = edits1(word)
        candidates = [c for c in near if self.count(c) >= self.min_count]
        if not candidates and len(word) >= TWO_EDITS_FROM:
            candidates = list({c for e in near for c in edits1(e) if self.count(c) >= self.min_count})
        if not candidates:
            return None
        with_context = self._titles_of(context)
        return max(candidates, key=lambda c: (self._together(c, with_context), self.count(c), c))

    def _titles_of(self, words: list[str]) -> np.ndarray:
        """The titles that use at least one of ``words`` (sorted ids)."""
        if not words:
            return np.empty(0, dtype=np.int32)
        return np.unique(np.concatenate([self._titles.get(w, np.empty(0, dtype=np.int32)) for w in words]))

    def _together(self, candidate: str, with_context: np.ndarray) -> int:
        """How many titles use ``candidate`` and at least one of the query's other known words."""
        if len(with_context) == 0:
            return 0
        return int(np.isin(self._titles[candidate], with_context, assume_unique=True).sum())
