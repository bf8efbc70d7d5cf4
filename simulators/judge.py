"""The judge M2: (profile, original query, product list) → impressions, clicks, add-to-carts, purchases.

One interface, :class:`Judge`; two implementations.

``ClickModelJudge`` (the default) is a position-based click model (PBM, Richardson et al. 2007; Chuklin,
Markov & de Rijke, "Click Models for Web Search", 2015): a shopper clicks the product at rank i (0 = top)
when they examine that rank *and* find the product attractive, independently::

    P(click_i)             = examination(i) × attractiveness_i
    examination(i)         = 1 / (i + 1) ** eta         a power law; eta = 1 as in Joachims et al. (2017)
    attractiveness_i       = min(cap, (floor + span × g_i²) × (1 + bonus_i))
    P(add to cart | click) = min(1, cart_rate × g_i × (1 + bonus_i))
    P(purchase | cart)     = min(1, buy_rate × (1 − price_damping × price_sensitivity) × income_factor)

- g_i ∈ [0, 1] is the human label where raters judged the (original query, product) pair, else the relevance
  model M1's score (``qrloop.relevance.RelevanceModel``). Squaring it makes a partial match (g = 0.5) a
  quarter as attractive as a perfect one: shoppers click clearly relevant products, not near misses.
- bonus_i is the profile's match with the product: its material preference found in the product's material
  field, its colour preference in the colour field, its brand affinity (0, 0.5, 1) when the product's brand is
  one of its preferred brands (``profile_bonus``). Matches raise attractiveness and the add-to-cart rate.
- There is no price field in the catalogs, so price sensitivity and income act on the purchase stage only
  (cart abandonment), never on clicks.
- Every shown product gets an impression: lists are short (top-k = 10) and shown whole.

Impressions ⊇ clicks ⊇ add-to-carts ⊇ purchases per product by construction (each stage is conditional on
the previous one). All parameters live in the frozen :class:`ClickModelParams`; :meth:`expected` gives the
analytic expectations of the counts, which tests and benchmarks use instead of sampling.

``LLMJudge`` asks a causal LM the paper's Appendix B (Table 7) question once per interaction kind ("How many
items from this list will you click? ... Respond with a single number only"), against a local transformers
model (its chat template) or any OpenAI-compatible endpoint (``/v1/chat/completions``). It parses the number
robustly (:func:`parse_count`), clips it to the list, makes the stages consistent (purchases ≤ add-to-carts ≤
clicks) and assigns them to the most attractive products (attractiveness as in the click model). A timeout,
an error or an answer without a number falls back to the click model for that list, counted in
``.fallbacks``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from qrloop.catalog import Catalog, Product
from qrloop.models import load_policy
from qrloop.relevance import RelevanceModel
from qrloop.settings import Settings
from simulators.profiles import INCOMES, Profile

StageKind = Literal["click", "add_to_cart", "purchase"]
STAGES: tuple[StageKind, ...] = ("click", "add_to_cart", "purchase")


@dataclass(frozen=True)
class Outcome:
    """Per position (0 = top) flags for the list that was shown."""

    impressions: tuple[bool, ...]
    clicks: tuple[bool, ...]
    add_to_carts: tuple[bool, ...]
    purchases: tuple[bool, ...]

    @property
    def counts(self) -> dict[str, int]:
        return {
            "impressions": sum(self.impressions),
            "clicks": sum(self.clicks),
            "add_to_carts": sum(self.add_to_carts),
            "purchases": sum(self.purchases),
        }

    @classmethod
    def empty(cls) -> Outcome:
        return cls((), (), (), ())


class Judge(Protocol):
    def judge(
        self, profile: Profile, query: str, products: Sequence[Product], rng: np.random.Generator
    ) -> Outcome: ...


@dataclass(frozen=True)
class ClickModelParams:
    eta: float = 1.0
    """Examination decay: examination(i) = 1 / (i + 1) ** eta; 1.0 as in Joachims et al. (WSDM 2017)."""
    floor: float = 0.02
    """Attractiveness of an irrelevant product (g = 0): accidental and curiosity clicks."""
    span: float = 0.6
    """Attractiveness a perfectly relevant product (g = 1) adds to the floor, before profile bonuses."""
    cap: float = 0.95
    """Upper bound of attractiveness: nobody clicks anything with certainty."""
    material_bonus: float = 0.5
    """Relative attractiveness gain when the profile's material preference is in the product's material."""
    colour_bonus: float = 0.3
    """Relative gain when the profile's colour preference is in the product's colour field."""
    brand_bonus: float = 0.6
    """Relative gain for a preferred brand, times brand affinity (low 0, medium 0.5, high 1)."""
    cart_rate: float = 0.5
    """P(add to cart | click) for a perfectly relevant product without profile matches."""
    buy_rate: float = 0.6
    """P(purchase | add to cart) for a middle-income shopper with low price sensitivity."""
    price_damping: float = 0.6
    """Share of buy_rate a fully price-sensitive shopper loses (no price field: carts get abandoned)."""
    income_factor: tuple[float, ...] = (0.7, 1.0, 1.2, 1.4)
    """Multiplier of P(purchase | add to cart) per income, in ``profiles.INCOMES`` order (low .. luxury)."""


RelevanceLookup = Callable[[str, Sequence[Product]], np.ndarray]
"""(original query, products) → relevance g in [0, 1] per product."""


def _field_words(value: str) -> set[str]:
    return set(re.findall(r"[a-z]+", value.lower()))


def _mentions(field_value: str, preference: str | None) -> bool:
    """Whether a catalog field names the preference, as a word or its plural ("Whites" for "white")."""
    if not preference:
        return False
    words = _field_words(field_value)
    return bool(words & {preference, preference + "s", preference + "es"})


def profile_bonus(profile: Profile, product: Product, params: ClickModelParams) -> float:
    """Sum of the relative bonuses this profile gives this product (0 when nothing matches)."""
    bonus = 0.0
    if _mentions(product.material, profile.material_preference):
        bonus += params.material_bonus
    if _mentions(product.color, profile.colour_preference):
        bonus += params.colour_bonus
    if product.brand and product.brand in profile.preferred_brands:
        bonus += params.brand_bonus * profile.level("brand_affinity")
    return bonus


@dataclass(frozen=True)
class StageProbabilities:
    """Per position: P(click), P(add to cart | click), P(purchase | add to cart)."""

    click: np.ndarray
    cart_given_click: np.ndarray
    purchase_given_cart: np.ndarray


def _bonuses(params: ClickModelParams, profile: Profile, products: Sequence[Product]) -> np.ndarray:
    return np.array([profile_bonus(profile, p, params) for p in products], dtype=np.float64)


def _attractiveness(params: ClickModelParams, g: np.ndarray, bonus: np.ndarray) -> np.ndarray:
    return np.minimum(params.cap, (params.floor + params.span * g**2) * (1.0 + bonus))


def stage_probabilities(
    params: ClickModelParams, profile: Profile, relevance: np.ndarray, products: Sequence[Product]
) -> StageProbabilities:
    """The click model's probabilities for one shown list (pure: no sampling, no model)."""
    g = np.clip(np.asarray(relevance, dtype=np.float64), 0.0, 1.0)
    bonus = _bonuses(params, profile, products)
    examination = 1.0 / np.arange(1, len(products) + 1, dtype=np.float64) ** params.eta
    cart = np.minimum(1.0, params.cart_rate * g * (1.0 + bonus))
    buy = (
        params.buy_rate
        * (1.0 - params.price_damping * profile.level("price_sensitivity"))
        * params.income_factor[INCOMES.index(profile.income)]
    )
    click = examination * _attractiveness(params, g, bonus)
    return StageProbabilities(click, cart, np.full(len(products), min(1.0, buy)))


def attractiveness(
    params: ClickModelParams, profile: Profile, relevance: np.ndarray, products: Sequence[Product]
) -> np.ndarray:
    """Rank-free attractiveness (P(click | examined)), used to order products for the LLM judge's counts."""
    g = np.clip(np.asarray(relevance, dtype=np.float64), 0.0, 1.0)
    return _attractiveness(params, g, _bonuses(params, profile, products))


@dataclass
class ClickModelJudge:
    relevance: RelevanceLookup
    params: ClickModelParams = field(default_factory=ClickModelParams)

    @classmethod
    def default(
        cls, settings: Settings, catalog: Catalog, params: ClickModelParams | None = None
    ) -> ClickModelJudge:
        """Human labels where raters judged the pair, M1 (or its logged cosine fallback) elsewhere."""
        model = RelevanceModel.load(settings)
        return cls(labelled_or_model(catalog, model.score), params or ClickModelParams())

    def probabilities(self, profile: Profile, query: str, products: Sequence[Product]) -> StageProbabilities:
        return stage_probabilities(self.params, profile, self.relevance(query, products), products)

    def attractiveness(self, profile: Profile, query: str, products: Sequence[Product]) -> np.ndarray:
        return attractiveness(self.params, profile, self.relevance(query, products), products)

    def expected(self, profile: Profile, query: str, products: Sequence[Product]) -> dict[str, float]:
        """Analytic expected counts of the list: sums of the per-position stage probabilities."""
        if not products:
            return {"impressions": 0.0, "clicks": 0.0, "add_to_carts": 0.0, "purchases": 0.0}
        p = self.probabilities(profile, query, products)
        carts = p.click * p.cart_given_click
        return {
            "impressions": float(len(products)),
            "clicks": float(p.click.sum()),
            "add_to_carts": float(carts.sum()),
            "purchases": float((carts * p.purchase_given_cart).sum()),
        }

    def expected_clicks(self, profile: Profile, query: str, products: Sequence[Product]) -> float:
        return self.expected(profile, query, products)["clicks"]

    def judge(
        self, profile: Profile, query: str, products: Sequence[Product], rng: np.random.Generator
    ) -> Outcome:
        if not products:
            return Outcome.empty()
        p = self.probabilities(profile, query, products)
        n = len(products)
        # Three draws per position in a fixed order, whatever the earlier stages decided: the stream for a
        # seed stays the same when a parameter changes one stage's outcome.
        clicks = rng.random(n) < p.click
        carts = clicks & (rng.random(n) < p.cart_given_click)
        buys = carts & (rng.random(n) < p.purchase_given_cart)
        return Outcome((True,) * n, _flags(clicks), _flags(carts), _flags(buys))


def _flags(values: np.ndarray) -> tuple[bool, ...]:
    return tuple(bool(v) for v in values)


def labelled_or_model(
    catalog: Catalog, model_score: Callable[[str, Sequence[str]], np.ndarray]
) -> RelevanceLookup:
    """g per product: the human label of (query, product) where one exists, else the model's score."""

    def relevance(query: str, products: Sequence[Product]) -> np.ndarray:
        labelled = [catalog.grade(query, p.product_id) for p in products]
        unknown = [p.text for p, g in zip(products, labelled, strict=True) if g is None]
        scores = iter(model_score(query, unknown) if unknown else [])
        return np.array([g if g is not None else float(next(scores)) for g in labelled], dtype=np.float64)

    return relevance


# --- the LLM judge -----------------------------------------------------------------------------------------

QUESTIONS: dict[StageKind, str] = {
    "click": "How many items from this list will you click?",
    "add_to_cart": "How many items from this list will you add to your cart?",
    "purchase": "How many items from this list will you purchase?",
}
CRITERIA = (
    "Criteria for a good list of products: 1. A good list of products for a query is which has accurate "
    "representation of the user intent, demographics and preferences. 2. It should have a diverse set of "
    "products matching the query. 3. It should not have products too different from the query. 4. The main "
    "product requested (Eg. toys for kids - toys is the main product) must be given importance, not the "
    "additional clause. The additional clause must be used as a qualifier."
)
_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
)
NUMBER_WORDS = {word: i for i, word in enumerate(_WORDS.split())} | {"none": 0, "nothing": 0}
ALL_WORDS = frozenset({"all", "every", "everything"})


def judge_prompt(profile: Profile, query: str, products: Sequence[Product], kind: StageKind) -> str:
    """The paper's Table 7 prompt for one interaction kind."""
    listing = "; ".join(f"{i + 1}. {p.title}" for i, p in enumerate(products))
    return (
        f"User Profile: {profile.bio()} {CRITERIA} You are now a simulated user of this ecommerce platform "
        f"and want to search products using this query: {query}. The site returns a list of product: "
        f"{listing}. "
        "Given the bio and preferences for the simulated user and based on the query, then answer this final "
        f"question: {QUESTIONS[kind]} Respond with a single number only, DO NOT provide other information."
    )


def parse_count(text: str | None, n_products: int | None = None) -> int | None:
    """The count in a model's reply, clipped to [0, n_products] when given; None when there is none.

    Digits win ("I would click 2 items" → 2, "-4" → 0, "2.5" → 2); else the first number word ("eleven" →
    11, "none" → 0, "all of them" → n_products); a reply that starts with "No" means 0.
    """
    if not text or not text.strip():
        return None
    lowered = text.lower()
    digits = re.search(r"-?\d+", lowered)
    value: int | None = int(digits.group()) if digits else None
    words = re.findall(r"[a-z]+", lowered)
    if value is None:
        for word in words:
            if word in NUMBER_WORDS:
                value = NUMBER_WORDS[word]
                break
            if word in ALL_WORDS and n_products is not None:
                value = n_products
                break
    if value is None and words and words[0] == "no":
        value = 0
    if value is None:
        return None
    value = max(0, value)
    return min(n_products, value) if n_products is not None else value


Completion = Callable[[str], str]
"""prompt → the model's reply text."""


def local_completion(model_dir: str | Path, max_new_tokens: int = 6) -> Completion:
    """Greedy replies from a local transformers causal LM, through its chat template."""
    import torch  # only a judge backed by a local LM needs torch

    model, tokenizer = load_policy(Path(model_dir))

    def complete(prompt: str) -> str:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        return str(tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))

    return complete


def http_completion(url: str, model: str = "judge", timeout_s: float = 10.0) -> Completion:
    """Any OpenAI-compatible endpoint: POST {url}/v1/chat/completions, temperature 0, a few tokens."""
    import httpx  # an optional dependency: only a judge behind an HTTP endpoint needs it

    endpoint = f"{url.rstrip('/')}/v1/chat/completions"

    def complete(prompt: str) -> str:
        response = httpx.post(
            endpoint,
            json={
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 8,
                "temperature": 0,
            },
            timeout=timeout_s,
        )
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"])

    return complete


@dataclass
class LLMJudge:
    complete: Completion
    fallback: ClickModelJudge
    fallbacks: int = 0
    """Lists the click model judged because the LLM timed out, failed or gave no number."""
    calls: int = 0
    answers: list[str] = field(default_factory=list)

    @classmethod
    def for_target(
        cls, target: str, fallback: ClickModelJudge, *, model: str = "judge", timeout_s: float = 10.0
    ) -> LLMJudge:
        """``target`` is an http(s) URL of an OpenAI-compatible server, or a local model directory."""
        if target.startswith(("http://", "https://")):
            return cls(http_completion(target, model=model, timeout_s=timeout_s), fallback)
        return cls(local_completion(target), fallback)

    def _ask(self, profile: Profile, query: str, products: Sequence[Product], kind: StageKind) -> int | None:
        self.calls += 1
        try:
            answer = self.complete(judge_prompt(profile, query, products, kind))
        except Exception:  # a timeout or a broken endpoint: the click model answers for this list
            return None
        self.answers.append(answer)
        return parse_count(answer, len(products))

    def counts(self, profile: Profile, query: str, products: Sequence[Product]) -> list[int] | None:
        """Clicks, add-to-carts, purchases as the LLM answers them (consistent), or None on any failure."""
        counts: list[int] = []
        for kind in STAGES:
            answer = self._ask(profile, query, products, kind)
            if answer is None:
                return None  # no point asking the next question of a server that just timed out
            counts.append(answer if not counts else min(answer, counts[-1]))
        return counts

    def judge(
        self, profile: Profile, query: str, products: Sequence[Product], rng: np.random.Generator
    ) -> Outcome:
        if not products:
            return Outcome.empty()
        counts = self.counts(profile, query, products)
        if counts is None:
            self.fallbacks += 1
            return self.fallback.judge(profile, query, products, rng)
        order = np.argsort(-self.fallback.attractiveness(profile, query, products), kind="stable")

        def top(n: int) -> tuple[bool, ...]:
            chosen = set(order[:n].tolist())
            return tuple(i in chosen for i in range(len(products)))

        clicks, carts, buys = counts
        return Outcome((True,) * len(products), top(clicks), top(carts), top(buys))
