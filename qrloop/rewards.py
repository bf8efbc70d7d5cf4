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

The Faust aggregator, the benchmarks and the canary import exactly these names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

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


@dataclass(frozen=True)
class RewardComponents:
    """The five signals of one rewrite's list, each in [0, 1] (diversity may exceed 1 if |P~| > |P|)."""

    relevance: float
    diversity: float
    click: float
    add2cart: float
    purchase: float

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
    """All five signals of one rewrite, given what its list showed and what the shopper did with it."""
    n = len(rewrite_products)
    return RewardComponents(
        relevance=relevance(relevance_scores),
        diversity=diversity(original_products, rewrite_products),
        click=rate(clicks, n),
        add2cart=rate(add2carts, n),
        purchase=rate(purchases, n),
    )


def prefer(reward_first: float, reward_second: float, margin: float) -> Preference:
    """Which rewrite DPO should prefer; within the margin it is a tie (counted, never emitted)."""
    if abs(reward_first - reward_second) <= margin:
        return "tie"
    return "first" if reward_first > reward_second else "second"


def coverage(rewrite_product_lists: Sequence[Sequence[str]], is_relevant: Callable[[str], bool]) -> int:
    """Distinct relevant products over all rewrites of a query (the paper's Table 4)."""
    return len({p for products in rewrite_product_lists for p in products if is_relevant(p)})
