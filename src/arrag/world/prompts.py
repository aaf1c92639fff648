"""Structured prompts of the built-in world in GenEval's six categories, and their captions.

The captions follow GenEval's templates with digits for objects:

=============  ==========================  ==================================================
category       caption                     correct when (GenEval's rules)
=============  ==========================  ==================================================
single_object  "a 7"                       a 7 is present
two_object     "a 3 and a 5"               a 3 and a 5 are present
counting       "three 2s"                  exactly three 2s are present
colors         "a red 7"                   a red 7 is present
position       "a 4 left of a 1"           a 4 and a 1 are present, the 4 left of the 1
color_attr     "a red 6 and a white 8"     a red 6 and a white 8 are present
=============  ==========================  ==================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
Category = Literal["single_object", "two_object", "counting", "colors", "position", "color_attr"]
Relation = Literal["left of", "right of", "above", "below"]
RELATIONS: tuple[Relation, ...] = ("left of", "right of", "above", "below")

# Corners of the RGB cube (blue lifted a little so it stays visible on black): maximally distinct hues.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 40, 40),
    "green": (40, 230, 40),
    "blue": (50, 90, 255),
    "yellow": (255, 235, 40),
    "cyan": (40, 230, 235),
    "magenta": (235, 50, 235),
    "white": (255, 255, 255),
}
COLOURS = tuple(PALETTE)
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Clause:
    """``count`` objects showing ``digit``, all of ``colour`` when given."""

    digit: int
    count: int = 1
    colour: str | None = None

    def describe(self) -> str:
        if self.count > 1:
            return f"{NUMBER_WORDS[self.count]} {self.digit}s"
        if self.colour:
            return f"a {self.colour} {self.digit}"
        return f"an {self.digit}" if self.digit == 8 else f"a {self.digit}"


@dataclass(frozen=True)
class Prompt:
    """What an image must show: clauses, and for position prompts the relation of clause 0 to clause 1."""

    category: Category
    clauses: tuple[Clause, ...]
    relation: Relation | None = None

    @property
    def text(self) -> str:
        first = self.clauses[0].describe()
        if self.relation is not None:
            return f"{first} {self.relation} {self.clauses[1].describe()}"
        return " and ".join(clause.describe() for clause in self.clauses)


def sample_prompt(category: Category, rng: np.random.Generator) -> Prompt:
    """A random prompt of one category."""
    digits = [int(d) for d in rng.choice(10, size=2, replace=False)]
    colours = [str(c) for c in rng.choice(COLOURS, size=2, replace=False)]
    if category == "single_object":
        return Prompt(category, (Clause(digits[0]),))
    if category == "two_object":
        return Prompt(category, (Clause(digits[0]), Clause(digits[1])))
    if category == "counting":
        return Prompt(category, (Clause(digits[0], count=int(rng.integers(2, 5))),))
    if category == "colors":
        return Prompt(category, (Clause(digits[0], colour=colours[0]),))
    if category == "position":
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        return Prompt(category, (Clause(digits[0]), Clause(digits[1])), relation)
    if category == "color_attr":
        return Prompt(category, (Clause(digits[0], colour=colours[0]), Clause(digits[1], colour=colours[1])))
    raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")


def sample_prompts(count: int, seed: int) -> list[Prompt]:
    """``count`` prompts, categories in turn, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_prompt(CATEGORIES[i % len(CATEGORIES)], rng) for i in range(count)]  # type: ignore[arg-type]
