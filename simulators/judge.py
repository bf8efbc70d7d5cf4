"""The judge M2: (profile, original query, product list) → impressions, clicks, add-to-carts, purchases.

``ClickModelJudge`` (the default) is a position-based click model (PBM):

    P(click at rank i) = examination(i) × attractiveness(product)
    examination(i)     = 1 / (i + 1) ** eta                                    (eta = 0.7)
    attractiveness     = floor + span × g²                                     (g: relevance in [0, 1])
                         × (1 + material/colour/brand match bonuses of the profile), capped at 0.95
    P(add to cart | click)  = cart_rate × g × (1 + match bonus)
    P(purchase | cart)      = buy_rate × (1 − 0.6 × price sensitivity) × income factor

g is the human label where the (original query, product) pair was judged by raters, else M1's score. Every
shown product gets an impression. The squared relevance makes the model prefer clearly relevant products (a
partial match at g = 0.5 is a quarter as attractive as a perfect one), which is how graded labels usually
translate into clicks. All parameters live in ``ClickModelParams``.

``LLMJudge`` asks a causal LM the paper's Appendix B (Table 7) question once per interaction kind ("How many
items from this list will you click? Respond with a single number only"), parses the number robustly,
clips it to the list, makes the stages consistent (purchases ≤ add-to-carts ≤ clicks) and assigns them to
the most attractive products; a timeout or an unusable answer falls back to the click model and is counted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from simulators.catalog import Catalog, Product
from simulators.profiles import Profile

INCOME_FACTOR = {"low": 0.7, "middle": 1.0, "high": 1.2, "luxury": 1.4}


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


class Judge(Protocol):
    def judge(
        self, profile: Profile, query: str, products: Sequence[Product], rng: np.random.Generator
    ) -> Outcome: ...


@dataclass(frozen=True)
class ClickModelParams:
    eta: float = 0.7  # examination decay with rank
    floor: float = 0.02  # attractiveness of an irrelevant product (accidental clicks)
    span: float = 0.6  # attractiveness added by a perfectly relevant product
    material_bonus: float = 0.5  # profile's material preference matches the product's material
    colour_bonus: float = 0.3  # profile's colour preference matches the product's colour
    brand_bonus: float = 0.6  # × brand affinity (0, 0.5, 1) when the product's brand is a preferred one
    cart_rate: float = 0.5  # P(add to cart | click) for a perfectly relevant, unmatched product
    buy_rate: float = 0.6  # P(purchase | add to cart) for a middle-income, price-insensitive shopper
    max_attractiveness: float = 0.95


RelevanceLookup = Callable[[str, Sequence[Product]], np.ndarray]


def profile_match(profile: Profile, product: Product, params: ClickModelParams) -> float:
    """Sum of the bonuses this profile gives this product (0 when nothing matches)."""
    bonus = 0.0
    if profile.material_preference and profile.material_preference in product.material.lower():
        bonus += params.material_bonus
    if profile.colour_preference and profile.colour_preference in product.color.lower():
        bonus += params.colour_bonus
    if product.brand and product.brand in profile.preferred_brands:
        bonus += params.brand_bonus * profile.level("brand_affinity")
    return bonus


@dataclass
class ClickModelJudge:
    relevance: RelevanceLookup
    params: ClickModelParams = field(default_factory=ClickModelParams)

    @classmethod
    def default(cls, settings: Any, catalog: Catalog) -> ClickModelJudge:
        """Human labels where raters judged the pair, M1 elsewhere."""
        from qrloop.relevance import RelevanceModel

        model = RelevanceModel.load(settings)
        return cls(labelled_or_model(catalog, model.score))

    def attractiveness(
        self, profile: Profile, query: str, products: Sequence[Product]
    ) -> tuple[np.ndarray, np.ndarray]:
        g = np.clip(self.relevance(query, products), 0.0, 1.0)
        match = np.array([profile_match(profile, p, self.params) for p in products])
        a = (self.params.floor + self.params.span * g**2) * (1.0 + match)
        return np.minimum(a, self.params.max_attractiveness), g

    def examination(self, n: int) -> np.ndarray:
        return 1.0 / np.arange(1, n + 1) ** self.params.eta

    def stage_probabilities(
        self, profile: Profile, query: str, products: Sequence[Product]
    ) -> tuple[np.ndarray, ...]:
        a, g = self.attractiveness(profile, query, products)
        click = self.examination(len(products)) * a
        match = np.array([profile_match(profile, p, self.params) for p in products])
        cart = np.minimum(1.0, self.params.cart_rate * g * (1.0 + match))
        buy = (
            self.params.buy_rate
            * (1.0 - 0.6 * profile.level("price_sensitivity"))
            * INCOME_FACTOR[profile.income]
        )
        return click, cart, np.full(len(products), min(1.0, buy))

    def expected_clicks(self, profile: Profile, query: str, products: Sequence[Product]) -> float:
        return float(self.stage_probabilities(profile, query, products)[0].sum()) if products else 0.0

    def judge(
        self, profile: Profile, query: str, products: Sequence[Product], rng: np.random.Generator
    ) -> Outcome:
        if not products:
            return Outcome((), (), (), ())
        p_click, p_cart, p_buy = self.stage_probabilities(profile, query, products)
        clicks = rng.random(len(products)) < p_click
        carts = clicks & (rng.random(len(products)) < p_cart)
        buys = carts & (rng.random(len(products)) < p_buy)
        return Outcome(tuple([True] * len(products)), tuple(clicks), tuple(carts), tuple(buys))


def labelled_or_model(
    catalog: Catalog, model_score: Callable[[str, Sequence[str]], np.ndarray]
) -> RelevanceLookup:
    def relevance(query: str, products: Sequence[Product]) -> np.ndarray:
        labelled = [catalog.grade(query, p.product_id) for p in products]
        unknown = [p.text for p, g in zip(products, labelled, strict=True) if g is None]
        scores = iter(model_score(query, unknown) if unknown else [])
        return np.array([g if g is not None else float(next(scores)) for g in labelled])

    return relevance


# --- the LLM judge -----------------------------------------------------------------------------------------

QUESTIONS = {
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
NUMBER_WORDS = {word: i for i, word in enumerate(_WORDS.split())}
NUMBER_WORDS.update({"none": 0, "no": 0, "all": -1})


def judge_prompt(profile: Profile, query: str, products: Sequence[Product], kind: str) -> str:
    """The paper's Table 7 prompt, one per interaction kind."""
    listing = "; ".join(f"{i + 1}. {p.title}" for i, p in enumerate(products))
    return (
        f"User Profile: {profile.bio()} {CRITERIA} You are now a simulated user of this ecommerce platform "
        f"and want to search products using this query: {query}. The site returns a list of product: "
        f"{listing}. "
        "Given the bio and preferences for the simulated user and based on the query, then answer this final "
        f"question: {QUESTIONS[kind]} Respond with a single number only, DO NOT provide other information."
    )


def parse_count(text: str | None, n_products: int) -> int | None:
    """The first number in a reply (digits or an English word), clipped to [0, n_products]; None if absent."""
    if not text:
        return None
    lowered = text.lower()
    digits = re.search(r"-?\d+", lowered)
    value: int | None = int(digits.group()) if digits else None
    if value is None:
        for word in re.findall(r"[a-z]+", lowered):
            if word in NUMBER_WORDS:
                value = NUMBER_WORDS[word]
                break
    if value is None:
        return None
    if value == -1:  # "all"
        value = n_products
    return max(0, min(n_products, value))


Completion = Callable[[str], str]


def local_completion(model_dir: str, max_new_tokens: int = 6) -> Completion:
    """Greedy answers from a local transformers causal LM, through its chat template."""
    import torch

    from qrloop.models import load_policy

    model, tokenizer = load_policy(model_dir)  # type: ignore[arg-type]

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
    """Any OpenAI-compatible endpoint: POST {url}/v1/chat/completions."""
    import httpx

    def complete(prompt: str) -> str:
        response = httpx.post(
            f"{url.rstrip('/')}/v1/chat/completions",
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
    answers: list[str] = field(default_factory=list)

    def _ask(self, profile: Profile, query: str, products: Sequence[Product], kind: str) -> int | None:
        try:
            answer = self.complete(judge_prompt(profile, query, products, kind))
        except Exception:  # a timeout or a broken endpoint: the click model answers instead
            return None
        self.answers.append(answer)
        return parse_count(answer, len(products))

    def judge(
        self, profile: Profile, query: str, products: Sequence[Product], rng: np.random.Generator
    ) -> Outcome:
        if not products:
            return Outcome((), (), (), ())
        counts = [self._ask(profile, query, products, kind) for kind in ("click", "add_to_cart", "purchase")]
        if any(c is None for c in counts):
            self.fallbacks += 1
            return self.fallback.judge(profile, query, products, rng)
        clicks = int(counts[0])  # type: ignore[arg-type]
        carts = min(int(counts[1]), clicks)  # type: ignore[arg-type]
        buys = min(int(counts[2]), carts)  # type: ignore[arg-type]
        a, _ = self.fallback.attractiveness(profile, query, products)
        order = np.argsort(-a, kind="stable")

        def top(n: int) -> tuple[bool, ...]:
            chosen = set(order[:n].tolist())
            return tuple(i in chosen for i in range(len(products)))

        return Outcome(tuple([True] * len(products)), top(clicks), top(carts), top(buys))
