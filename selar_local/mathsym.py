"""Tokens that force a discrete step in SeLaR: a latent mixture of "3" and "4" is not a
number, so digits, single letters, operators, brackets and common LaTeX commands always
go through as themselves. Each symbol is tokenised alone; those that are one token count.
"""
from __future__ import annotations

import string
from typing import Callable, Iterable

import numpy as np

OPERATORS = list("+-*/^=<>()[]{}_|")
LATEX_COMMANDS = [
    "\\frac", "\\dfrac", "\\tfrac", "\\sqrt", "\\boxed", "\\cdot", "\\times", "\\div",
    "\\infty", "\\pi", "\\pm", "\\mp", "\\le", "\\leq", "\\ge", "\\geq", "\\neq", "\\approx",
    "\\sum", "\\prod", "\\int", "\\log", "\\ln", "\\sin", "\\cos", "\\tan", "\\theta",
    "\\alpha", "\\beta", "\\gamma", "\\left", "\\right", "\\binom", "\\circ", "\\angle",
]


def math_symbols() -> list[str]:
    return list(string.digits) + list(string.ascii_letters) + OPERATORS + LATEX_COMMANDS


def math_symbol_mask(
    tokenize: Callable[[str], list[int]], vocab_size: int, symbols: Iterable[str] | None = None
) -> np.ndarray:
    """Boolean mask over the vocabulary; `tokenize` must not add BOS or other specials."""
    mask = np.zeros(vocab_size, dtype=bool)
    for symbol in math_symbols() if symbols is None else symbols:
        ids = tokenize(symbol)
        if len(ids) == 1 and 0 <= ids[0] < vocab_size:
            mask[ids[0]] = True
    return mask
