"""Shopper profiles with the paper's attributes (Appendix B, Table 6), drawn deterministically from a seed.

Demographics: gender, age band, region, income. Preferences: price sensitivity, brand affinity (with a few
preferred brands), style, material preference, colour preference. What each one does in the click model
(``simulators/judge.py``):

- **material / colour preference** are words from the Home Depot catalog's own ``material`` / ``color``
  fields (their most frequent values, see ``MATERIALS`` / ``COLOURS``), so they can be compared with a
  product: a match makes the product more attractive and more likely to go into the cart;
- **brand affinity** (low / medium / high) scales the bonus for products whose ``brand`` is one of the
  profile's ``preferred_brands``, drawn from the catalog's brand field (0, 2 or 3 brands by affinity);
- **price sensitivity and income** act on the purchase stage only: the catalogs have **no price field**, so
  price cannot make a product less attractive; a price-sensitive or low-income shopper instead abandons more
  carts (price sensitivity dampens P(purchase | add to cart), income scales it);
- **gender, age band, region, style** have no catalog field to act on; they shape the LLM judge's prompt
  (:meth:`Profile.bio`) only.

The marginal distributions are assumptions (no shopper statistics ship with the data), chosen to be plausible
for a home-improvement shop; they are module constants so a reader sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GENDERS = ("female", "male", "non-binary")
GENDER_P = (0.48, 0.48, 0.04)
AGE_BANDS = ("18-25", "26-35", "36-50", "51-65", "65+")
AGE_P = (0.10, 0.25, 0.30, 0.22, 0.13)
REGIONS = ("North America", "Europe", "Asia", "South America", "Oceania")
REGION_P = (0.45, 0.25, 0.15, 0.10, 0.05)
INCOMES = ("low", "middle", "high", "luxury")
INCOME_P = (0.25, 0.45, 0.22, 0.08)
LEVELS = ("low", "medium", "high")
STYLES = ("classic", "modern", "rustic", "industrial", "minimalist", "traditional")
# The most frequent words of Home Depot's colour field ("White", "Browns / Tans", "Brushed Nickel", ...).
COLOURS = ("white", "black", "gray", "brown", "chrome", "silver", "red", "blue", "bronze", "nickel", "green")
# The most frequent words of its material field ("Steel", "Galvanized Steel", "Plastic", "Wood", ...).
MATERIALS = (
    "steel",
    "metal",
    "plastic",
    "wood",
    "vinyl",
    "aluminum",
    "pvc",
    "brass",
    "composite",
    "fiberglass",
    "copper",
)
PREFERRED_BRANDS = {"low": 0, "medium": 2, "high": 3}
P_MATERIAL_PREFERENCE = 0.6  # share of shoppers who care about material at all
P_COLOUR_PREFERENCE = 0.5


@dataclass(frozen=True)
class Profile:
    shopper_id: str
    gender: str
    age_band: str
    region: str
    income: str
    price_sensitivity: str
    brand_affinity: str
    style: str
    material_preference: str | None
    colour_preference: str | None
    preferred_brands: tuple[str, ...]

    def level(self, attribute: str) -> float:
        """A low/medium/high attribute as 0, 0.5 or 1."""
        return LEVELS.index(getattr(self, attribute)) / 2

    def bio(self) -> str:
        """The profile as the LLM judge's prompt states it (the paper's "User Profile")."""
        prefs = [
            f"price sensitivity {self.price_sensitivity}",
            f"brand affinity {self.brand_affinity}"
            + (f" (likes {', '.join(self.preferred_brands)})" if self.preferred_brands else ""),
            f"{self.style} style",
        ]
        if self.material_preference:
            prefs.append(f"prefers {self.material_preference} products")
        if self.colour_preference:
            prefs.append(f"prefers the colour {self.colour_preference}")
        return (
            f"Gender: {self.gender}; age {self.age_band}; lives in {self.region}; {self.income} income. "
            f"Preferences: {'; '.join(prefs)}."
        )


def draw_profile(rng: np.random.Generator, index: int, brands: Sequence[str]) -> Profile:
    """One profile; every attribute is drawn from ``rng`` in a fixed order (determinism)."""

    def pick(options: Sequence[str], p: Sequence[float] | None = None) -> str:
        return str(options[int(rng.choice(len(options), p=p))])

    gender = pick(GENDERS, GENDER_P)
    age_band = pick(AGE_BANDS, AGE_P)
    region = pick(REGIONS, REGION_P)
    income = pick(INCOMES, INCOME_P)
    price_sensitivity = pick(LEVELS, (0.3, 0.4, 0.3))
    affinity = pick(LEVELS, (0.4, 0.4, 0.2))
    n_brands = min(PREFERRED_BRANDS[affinity], len(brands))
    preferred = tuple(str(brands[i]) for i in rng.choice(len(brands), size=n_brands, replace=False))
    style = pick(STYLES)
    material = pick(MATERIALS) if rng.random() < P_MATERIAL_PREFERENCE else None
    colour = pick(COLOURS) if rng.random() < P_COLOUR_PREFERENCE else None
    return Profile(
        shopper_id=f"shopper-{index:04d}",
        gender=gender,
        age_band=age_band,
        region=region,
        income=income,
        price_sensitivity=price_sensitivity,
        brand_affinity=affinity,
        style=style,
        material_preference=material,
        colour_preference=colour,
        preferred_brands=preferred,
    )


class ProfilePool:
    """``size`` profiles from ``seed``; the same seed and brands always give the same pool.

    ``brands`` are the candidates for preferred brands (``Catalog.brands()``'s most frequent ones); without
    them nobody has a preferred brand and brand affinity has nothing to act on.
    """

    def __init__(self, seed: int, size: int = 500, brands: Sequence[str] = ()) -> None:
        rng = np.random.default_rng(seed)
        self.profiles = [draw_profile(rng, i, tuple(brands)) for i in range(size)]

    def __len__(self) -> int:
        return len(self.profiles)

    def draw(self, rng: np.random.Generator) -> Profile:
        """A shopper from the pool, uniformly (the caller's rng, so traffic replays with its seed)."""
        return self.profiles[int(rng.integers(len(self.profiles)))]
