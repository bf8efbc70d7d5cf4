"""Shopper profiles with the paper's attributes (Appendix B, Table 6), drawn deterministically from a seed.

Demographics (gender, age band, region, income) and preferences (price sensitivity, brand affinity, style,
material, colour). The catalog decides which preferences are *checkable*: material and colour preferences are
drawn from the catalog's own material/colour values and brand preferences from its brands, so the click model
can compare them with a product's fields. Style has no catalog field and only shapes the LLM judge's bio;
there is no price field either, so price sensitivity and income act on the purchase stage only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GENDERS = ("female", "male", "non-binary")
AGE_BANDS = ("18-25", "26-35", "36-50", "51-65", "65+")
REGIONS = ("North America", "Europe", "Asia", "South America", "Oceania")
INCOMES = ("low", "middle", "high", "luxury")
LEVELS = ("low", "medium", "high")
STYLES = ("casual", "business", "luxury", "trendy", "minimalist", "classic")
# Colour families as they appear in Home Depot's colour field ("Browns / Tans", "Chrome", "White", ...).
COLOURS = ("white", "black", "brown", "gray", "chrome", "nickel", "bronze", "red", "blue", "green")
MATERIALS = (
    "steel",
    "wood",
    "plastic",
    "aluminum",
    "brass",
    "vinyl",
    "glass",
    "fiberglass",
    "concrete",
    "pvc",
)


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
        """low/medium/high as 0, 0.5, 1."""
        return LEVELS.index(getattr(self, attribute)) / 2

    def bio(self) -> str:
        prefs = [
            f"price sensitivity {self.price_sensitivity}",
            f"brand affinity {self.brand_affinity}"
            + (f" (likes {', '.join(self.preferred_brands)})" if self.preferred_brands else ""),
            f"style {self.style}",
        ]
        if self.material_preference:
            prefs.append(f"prefers {self.material_preference} products")
        if self.colour_preference:
            prefs.append(f"prefers the colour {self.colour_preference}")
        return (
            f"Gender: {self.gender}; age {self.age_band}; lives in {self.region}; {self.income} income. "
            f"Preferences: {'; '.join(prefs)}."
        )


class ProfilePool:
    """``size`` profiles from ``seed``; the same seed always gives the same pool."""

    def __init__(self, seed: int, size: int = 500, brands: tuple[str, ...] = ()) -> None:
        rng = np.random.default_rng(seed)
        self.profiles = [self._draw_one(rng, i, brands) for i in range(size)]

    @staticmethod
    def _draw_one(rng: np.random.Generator, index: int, brands: tuple[str, ...]) -> Profile:
        def pick(options: tuple[str, ...], p: list[float] | None = None) -> str:
            return str(options[rng.choice(len(options), p=p)])

        affinity = pick(LEVELS, [0.4, 0.4, 0.2])
        n_brands = {"low": 0, "medium": 2, "high": 3}[affinity]
        preferred = (
            tuple(str(b) for b in rng.choice(brands, size=min(n_brands, len(brands)), replace=False))
            if brands
            else ()
        )
        return Profile(
            shopper_id=f"shopper-{index:04d}",
            gender=pick(GENDERS, [0.48, 0.48, 0.04]),
            age_band=pick(AGE_BANDS),
            region=pick(REGIONS, [0.45, 0.25, 0.15, 0.1, 0.05]),
            income=pick(INCOMES, [0.25, 0.45, 0.22, 0.08]),
            price_sensitivity=pick(LEVELS),
            brand_affinity=affinity,
            style=pick(STYLES),
            material_preference=pick(MATERIALS) if rng.random() < 0.6 else None,
            colour_preference=pick(COLOURS) if rng.random() < 0.5 else None,
            preferred_brands=preferred,
        )

    def draw(self, rng: np.random.Generator) -> Profile:
        return self.profiles[int(rng.integers(len(self.profiles)))]
