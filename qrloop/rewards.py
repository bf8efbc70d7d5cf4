"""The paper's reward signals (§2, §3.2) as pure functions: no model, no I/O, no torch.

For a query Q with original product list P and a rewrite's list P~:

- relevance   r = mean over P~ of M1(Q, P_i) ∈ [0, 1]; an empty P~ scores 0 (a rewrite that retrieves nothing
  must never look good, and "mean of nothing" has no better value);
- diversity   d = (|P~| − |P ∩ P~|) / |P|; when |P| = 0 the original found nothing, so every product the
  rewrite finds is new: d = 1 if P~ is non-empty, else 0. (With |P~| ≤ |P|, as with a fixed top-k,
  d ∈ [0, 1].) Lists are compared as sets: a product shown twice is one product;
- click rate  c = clicks / |P~|, and likewise add-to-cart and purchase rates (0 for an empty list);
- the combined reward is the weighted mean of the five (weights from settings), so it stays in [0, 1]
  whenever d does;
- coverage    cov = distinct relevant products over all rewrites of a query (the paper's Table 4).

Those five are computed and reported (Table 3), but DPO does not rank by their weighted mean: with it, copying
the query scored best (the original's list is usually the most on-target one, and a random list's diversity
had to be down-weighted so drift would not pay), and the online loop learned to echo. The scalar DPO ranks by
(``RewardSettings.ranking = "gain"``) pays for what a rewrite *adds* beyond the original list P. With
N = P~ − P (the new products), n = max(|P|, |P~|), s(p) = M1(Q, p) and τ the M1 score from which a product
counts as relevant (calibrated on training-split labels, ``qrloop.relevance_threshold``):

- novelty     ν = Σ_{p ∈ N} h(p) / n with h(p) = clip((s(p) − τ) / (1 − τ), 0, 1): only new products
  above τ pay, more the more relevant; a random list is all new but almost all below τ, so it earns ~0;
- engagement  e = Σ_{p ∈ N} (click + add-to-cart + purchase of p) / 3 / n: what shoppers did with the new
  products (interactions on products the original also showed are not the rewrite's doing). It is not gated
  by M1: it is the shoppers' own verdict, and it is what pays a typo fix, whose products M1 scores against
  the misspelled query and often finds below τ while shoppers (and human raters) take them. Irrelevant
  products get only the click model's accidental clicks, rarely a cart or a purchase;
- gain        g = (w_ν ν + w_e e) / (w_ν + w_e) ∈ [0, 1], and exactly 0 for a rewrite that normalises to the
  query (an echo: it adds nothing by definition) or retrieves nothing.

Every gain is ≥ 0 and an echo's is 0, so an echo can never be *chosen* over anything: at best it ties.

The Faust aggregator, the benchmarks and the canary import exactly these names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, replace
from typing import Literal

from qrloop.data import normalise_query
from qrloop.settings import RewardSettings

Preference = Literal["first", "second", "tie"]


def relevance(scores: Sequence[float]) -> float:
    """Mean M1 score of a rewrite's products; 0.0 for an empty list (retrieving nothing is never good)."""
    return float(sum(scores) / len(scores)) if len(scores) else 0.0


def diversity(original: Sequence[str], rewritten: Sequence[str]) -> float:
    """Share of the rewrite's products the original did not show, relative to the original list's size."""
    rewritten_set = set(rewritten)
    if not original:
        # Nothing was shown before, so whatever the rewrite finds is new; finding nothing adds nothing.
        return 1.0 if rewritten_set else 0.0
    original_set = set(original)
    return (len(rewritten_set) - len(rewritten_set & original_set)) / len(original_set)


def rate(count: int, n_products: int) -> float:
    """Interactions per shown product; 0.0 when nothing was shown (no list, no behaviour to reward)."""
    return count / n_products if n_products > 0 else 0.0


def same_text(first: str, second: str) -> bool:
    """Equal once case and whitespace are normalised: the same query to the search engine."""
    return normalise_query(first) == normalise_query(second)


def is_echo(query: str, rewrite: str) -> bool:
    """The rewrite is the query itself (normalised): it can add nothing to the original's results."""
    return same_text(query, rewrite)


def hinge(score: float, relevant_above: float) -> float:
    """How far above the relevance threshold a product's M1 score is, scaled to [0, 1]; 0 below it."""
    if relevant_above >= 1.0:
        return 0.0
    return min(1.0, max(0.0, (score - relevant_above) / (1.0 - relevant_above)))


@dataclass(frozen=True)
class NewProducts:
    """The products of a rewrite's list that the original did not show, with their M1 scores."""

    scores: dict[str, float]
    list_size: int  # n = max(|P|, |P~|): the denominator of both gain terms

    @classmethod
    def of(
        cls, original: Sequence[str], rewritten: Sequence[str], relevance_scores: Sequence[float]
    ) -> NewProducts:
        shown = set(original)
        scores = {p: float(s) for p, s in zip(rewritten, relevance_scores, strict=True) if p not in shown}
        return cls(scores, max(len(set(original)), len(set(rewritten))))


def novelty(new: NewProducts, relevant_above: float) -> float:
    """Relevance-weighted novelty ν: Σ over new products of their hinge above τ, per listed product."""
    if new.list_size == 0:
        return 0.0
    return sum(hinge(s, relevant_above) for s in new.scores.values()) / new.list_size


RelevanceOfProducts = Callable[[str, Sequence[str]], Sequence[float]]
"""(query, product ids) → M1 scores in [0, 1], one per product."""


def list_novelties(
    query: str,
    original: Sequence[str],
    lists: Sequence[Sequence[str]],
    relevance: RelevanceOfProducts,
    relevant_above: float,
) -> list[float]:
    """The novelty ν of each candidate list against the original's: the part of the gain that is known
    before any shopper sees a list (engagement comes later), so serving can rank candidates by it."""
    return [novelty(NewProducts.of(original, ps, relevance(query, ps)), relevant_above) for ps in lists]


def new_engagement(
    new: NewProducts, clicked: AbstractSet[str], carted: AbstractSet[str], bought: AbstractSet[str]
) -> float:
    """Engagement e on the new products: (clicks + add-to-carts + purchases) / 3 per listed product."""
    if new.list_size == 0:
        return 0.0
    fresh = new.scores.keys()
    stages = len(fresh & clicked) + len(fresh & carted) + len(fresh & bought)
    return stages / 3 / new.list_size


@dataclass(frozen=True)
class RewardComponents:
    """The five paper signals of one rewrite's list, each in [0, 1] (diversity may exceed 1 if |P~| > |P|),
    and the two terms of the gain (0 where not computed, e.g. a pair logged before the gain existed)."""

    relevance: float
    diversity: float
    click: float
    add2cart: float
    purchase: float
    novelty: float = 0.0
    engagement: float = 0.0

    def combined(self, weights: RewardSettings) -> float:
        """Weighted sum divided by the sum of weights: a weighted mean, so it stays on the signals' scale."""
        pairs = (
            (weights.relevance, self.relevance),
            (weights.diversity, self.diversity),
            (weights.click, self.click),
            (weights.add2cart, self.add2cart),
            (weights.purchase, self.purchase),
        )
        total = sum(w for w, _ in pairs)
        return sum(w * v for w, v in pairs) / total if total > 0 else 0.0

    def gain(self, weights: RewardSettings) -> float:
        """What the rewrite adds beyond the original list: weighted mean of novelty and new engagement."""
        total = weights.novelty + weights.engagement
        if total <= 0:
            return 0.0
        return (weights.novelty * self.novelty + weights.engagement * self.engagement) / total

    def scalar(self, weights: RewardSettings) -> float:
        """The reward DPO ranks by: the gain (default) or the paper's weighted mean (``rewards.ranking``)."""
        return self.gain(weights) if weights.ranking == "gain" else self.combined(weights)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def components(
    original_products: Sequence[str],
    rewrite_products: Sequence[str],
    relevance_scores: Sequence[float],
    clicks: int,
    add2carts: int,
    purchases: int,
) -> RewardComponents:
    """The five paper signals of one rewrite, given what its list showed and what the shopper did with it
    (the gain terms stay 0: :func:`rewrite_components` computes everything)."""
    n = len(rewrite_products)
    return RewardComponents(
        relevance=relevance(relevance_scores),
        diversity=diversity(original_products, rewrite_products),
        click=rate(clicks, n),
        add2cart=rate(add2carts, n),
        purchase=rate(purchases, n),
    )


@dataclass(frozen=True)
class Feedback:
    """Distinct products of one list that the shopper clicked, added to the cart, bought."""

    clicked: frozenset[str] = frozenset()
    carted: frozenset[str] = frozenset()
    bought: frozenset[str] = frozenset()


def rewrite_components(
    query: str,
    rewrite: str,
    original_products: Sequence[str],
    rewrite_products: Sequence[str],
    relevance_scores: Sequence[float],
    feedback: Feedback,
    relevant_above: float,
) -> RewardComponents:
    """All signals of one rewrite: the paper's five and the gain's two (0 for an echo of the query)."""
    shown = set(rewrite_products)
    # Only interactions on products the list actually showed are attributable to it.
    clicked, carted, bought = feedback.clicked & shown, feedback.carted & shown, feedback.bought & shown
    paper = components(
        original_products, rewrite_products, relevance_scores, len(clicked), len(carted), len(bought)
    )
    if is_echo(query, rewrite):
        return paper
    new = NewProducts.of(original_products, rewrite_products, relevance_scores)
    return replace(
        paper,
        novelty=novelty(new, relevant_above),
        engagement=new_engagement(new, clicked, carted, bought),
    )


def prefer(reward_first: float, reward_second: float, margin: float) -> Preference:
    """Which rewrite DPO should prefer; within the margin it is a tie (counted, never emitted)."""
    if abs(reward_first - reward_second) <= margin:
        return "tie"
    return "first" if reward_first > reward_second else "second"


def coverage(rewrite_product_lists: Sequence[Sequence[str]], is_relevant: Callable[[str], bool]) -> int:
    """Distinct relevant products over all rewrites of a query (the paper's Table 4)."""
    return len({p for products in rewrite_product_lists for p in products if is_relevant(p)})
