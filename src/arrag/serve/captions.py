"""Captions of the built-in world read back into prompts: the inverse of :attr:`arrag.world.prompts.Prompt.text`,
so that the world's checker can judge an image made from typed text."""

from __future__ import annotations

import re

from arrag.world.prompts import COLOURS, NUMBER_WORDS, RELATIONS, Clause, Prompt

_COUNTS = {word: count for count, word in NUMBER_WORDS.items()}
_CLAUSE = re.compile(
    rf"(?:an? (?:(?P<colour>{'|'.join(COLOURS)}) )?(?P<digit>\d)|(?P<count>{'|'.join(_COUNTS)}) (?P<many>\d)s)"
)
_PROMPT = re.compile(rf"(?P<first>.+?) (?P<join>and|{'|'.join(RELATIONS)}) (?P<second>.+)")


def _clause(text: str) -> Clause | None:
    match = _CLAUSE.fullmatch(text)
    if match is None:
        return None
    if match["count"]:
        return Clause(int(match["many"]), count=_COUNTS[match["count"]])
    clause = Clause(int(match["digit"]), colour=match["colour"])
    return clause if clause.describe() == text else None  # "an" only before 8, "a" before the rest


def parse_caption(text: str) -> Prompt | None:
    """The world prompt whose caption is ``text`` (case and surrounding spaces aside); None for other text."""
    text = " ".join(text.lower().split())
    single = _clause(text)
    if single is not None:
        category = "counting" if single.count > 1 else "colors" if single.colour else "single_object"
        return Prompt(category, (single,))
    match = _PROMPT.fullmatch(text)
    if match is None:
        return None
    first, second = _clause(match["first"]), _clause(match["second"])
    if first is None or second is None or first.count > 1 or second.count > 1:
        return None
    if match["join"] != "and":
        if first.colour or second.colour:
            return None
        return Prompt("position", (first, second), match["join"])
    if bool(first.colour) != bool(second.colour):
        return None
    return Prompt("color_attr" if first.colour else "two_object", (first, second))
