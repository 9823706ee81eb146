"""Answer extraction and grading for the benchmark harness.

How an answer is compared depends on the data set's answer kind (see ``datasets.BUILTIN``):

* ``numeric`` (GSM8K): numbers, with thousands separators, currency, units and trailing zeros
  ignored (``\\$1,000.00`` == ``1000``);
* ``integer`` (AIME): the same, so ``033`` == ``33``;
* ``math`` (MATH-500, AMC, user files): a normalised-string check first, then symbolic
  equivalence with ``math_verify``;
* ``choice`` (GPQA): the option letter, case-insensitive.

Grading never raises: anything that cannot be parsed or times out counts as wrong.

Threads: ``math_verify`` bounds its work with ``signal.alarm``, which only works in the main
thread. We pass that timeout only when called from the main thread; in worker threads the
timeout is switched off (``parsing_timeout=None`` / ``timeout_seconds=None``) and, as a cheaper
guard, over-long answers are not handed to sympy at all.
"""
from __future__ import annotations

import os
import re
import threading
from decimal import Decimal, InvalidOperation
from functools import lru_cache

from selar_local.bench.datasets import BUILTIN, AnswerKind, canonical_name

SYMBOLIC_TIMEOUT_S = 5
# Longer answers are almost never right and can make sympy run for minutes without a timeout.
MAX_SYMBOLIC_CHARS = 400

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_SINGLE_TOKEN = re.compile(r"[^\s${}]+")
# A number as written in prose: 1,234.5 / -3 / .5 (thousands groups must be exactly 3 digits).
_NUMBER_PATTERN = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_NUMBER = re.compile(_NUMBER_PATTERN)
_CHOICE_IN_BOX = re.compile(r"^[\s({\[]*([A-Da-d])(?:[\s)}\].:,]|$)")
_CHOICE_IN_PROSE = re.compile(
    r"(?i:answer)\s*(?:(?i:is)\s*)?[:\-]?\s*(?:\*\*)?\s*[(\[]?\s*([A-D])(?![A-Za-z])"
)


def _balanced_group(text: str, open_index: int) -> str | None:
    """Content of the ``{...}`` group opening at ``open_index``, or None if never closed."""
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":  # skip escaped characters such as \{ \} and \\
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (or ``\\boxed 5``) in ``text``.

    Nested braces are handled. None when there is no box or the last one is not closed
    (a generation cut off mid-answer has no final answer, even if it boxed something before).
    """
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    after_spaces = len(text) - len(text[start:].lstrip())
    if after_spaces < len(text) and text[after_spaces] == "{":
        return _balanced_group(text, after_spaces)
    if after_spaces == start:  # "\boxedx" without a space is not a box
        return None
    token = _SINGLE_TOKEN.match(text, after_spaces)
    return token.group(0).rstrip(".,;:") if token else None


def _choice_letter(text: str) -> str | None:
    match = _CHOICE_IN_BOX.match(_strip_text_macros(text))
    return match.group(1).upper() if match else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(text: str, dataset: str) -> str | None:
    """The model's final answer: the last box; GSM8K falls back to the last number in the text,
    GPQA to "answer is (C)". GPQA answers come back as an upper-case letter."""
    kind = answer_kind(dataset)
    boxed = last_boxed(text)
    boxed = boxed.strip() if boxed is not None else None
    if kind == "choice":
        letter = _choice_letter(boxed) if boxed else None
        if letter is None:
            prose = _CHOICE_IN_PROSE.findall(text)
            letter = prose[-1] if prose else None
        return letter
    if boxed:
        return boxed
    if kind == "numeric":
        return _last_number(text)
    return None


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")
_SIZED_DELIMITERS = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])")


def _strip_text_macros(text: str) -> str:
    return _TEXT_MACRO.sub(r"\1", text)


def normalize_latex(text: str) -> str:
    """A canonical spelling for the exact-match fast path (never used to declare inequality)."""
    text = text.strip().strip("$").strip()
    text = _strip_text_macros(text)
    text = _SIZED_DELIMITERS.sub("", text)
    text = _SPACING.sub("", text)
    text = _DEGREES.sub("", text)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    text = text.replace("\\$", "").replace("\\%", "%")
    text = re.sub(r"\s+", "", text)
    return text.rstrip(".")


# "18", "$18.00", "\\$1,000", "x = 18", "50\\%": one number with optional trimmings.
_PLAIN_NUMBER = re.compile(
    r"^(?:[a-zA-Z]\s*=\s*)?\$?\s*(?P<number>" + _NUMBER_PATTERN + r")\s*%?(?P<unit>.*)$"
)
# Trailing unit words ("18 dollars", "5 \\text{ cm}"): accepted only for word-problem answers,
# since in math answers "5i" or "3x" are not the number 5 or 3.
_UNIT_WORDS = re.compile(r"^\s*(?:[a-zA-Z][a-zA-Z .]*)?$")


def parse_plain_number(text: str, *, allow_units: bool = False) -> Decimal | None:
    """The value of an answer that is just a number (with currency, commas), else None."""
    cleaned = _strip_text_macros(text.strip().strip("$"))
    cleaned = _SPACING.sub(" ", cleaned).replace("\\$", "$").replace("\\%", "%")
    match = _PLAIN_NUMBER.match(cleaned.strip().rstrip("."))
    if match is None:
        return None
    unit = match.group("unit")
    if unit.strip() and not (allow_units and _UNIT_WORDS.match(unit)):
        return None
    try:
        return Decimal(match.group("number").replace(",", ""))
    except InvalidOperation:
        return None


# ---------------------------------------------------------------------------------------------
# Symbolic comparison
# ---------------------------------------------------------------------------------------------

def _symbolic_timeout() -> int | None:
    """math_verify's signal-based timeout works only in the main thread on POSIX."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    return SYMBOLIC_TIMEOUT_S if in_main_thread and os.name == "posix" else None


@lru_cache(maxsize=4096)
def _parse_boxed(answer: str, timeout: int | None) -> tuple:
    # math_verify's docs: wrap the gold in $...$ or \boxed{} so its LaTeX extractor finds it.
    from math_verify import parse

    return tuple(parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout))


def symbolic_equal(predicted: str, gold: str) -> bool:
    """math_verify's verdict on gold vs predicted; False on any failure or timeout."""
    if len(predicted) > MAX_SYMBOLIC_CHARS:
        return False
    try:
        from math_verify import verify
        from math_verify.errors import TimeoutException
    except ImportError:  # the bench extra is not installed: only the string paths are available
        return False
    timeout = _symbolic_timeout()
    try:
        gold_parsed = _parse_boxed(gold, timeout)
        predicted_parsed = _parse_boxed(predicted, timeout)
        if not gold_parsed or not predicted_parsed:
            return False
        # verify is asymmetric: gold first.
        return bool(verify(list(gold_parsed), list(predicted_parsed), timeout_seconds=timeout))
    except (Exception, TimeoutException):  # TimeoutException is a BaseException
        return False


# ---------------------------------------------------------------------------------------------
# Public grading API
# ---------------------------------------------------------------------------------------------

def answer_kind(dataset: str) -> AnswerKind:
    """How answers of ``dataset`` are compared; unknown data sets are graded as math."""
    builtin = canonical_name(dataset)
    if builtin is not None:
        return BUILTIN[builtin].answer_kind
    lowered = dataset.lower()
    for prefix, kind in (("gsm", "numeric"), ("aime", "integer"), ("gpqa", "choice")):
        if lowered.startswith(prefix):
            return kind  # type: ignore[return-value]
    return "math"


def _numbers_equal(predicted: str, gold: str, *, allow_units: bool) -> bool | None:
    """True/False when both sides are plain numbers, None when either is not."""
    predicted_value = parse_plain_number(predicted, allow_units=allow_units)
    gold_value = parse_plain_number(gold, allow_units=allow_units)
    if predicted_value is None or gold_value is None:
        return None
    return predicted_value == gold_value


def is_correct(predicted: str | None, gold: str, dataset: str) -> bool:
    """Whether ``predicted`` (an extracted answer) matches ``gold`` for ``dataset``."""
    if predicted is None or not predicted.strip():
        return False
    try:
        kind = answer_kind(dataset)
        if kind == "choice":
            letter = _choice_letter(predicted)
            return letter is not None and letter == _choice_letter(gold)
        if normalize_latex(predicted) == normalize_latex(gold):
            return True
        numbers_equal = _numbers_equal(predicted, gold, allow_units=kind == "numeric")
        if numbers_equal is not None and kind in ("numeric", "integer"):
            return numbers_equal  # plain numbers settle it; no float-rounding leniency
        if numbers_equal:
            return True
        # Math answers that differ as numbers may still be equal (50\% vs 0.5); ask sympy.
        return symbolic_equal(predicted, gold)
    except Exception:  # grading must never take a run down
        return False


def grade(text: str, gold: str, dataset: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) for a model's full output."""
    predicted = extract_answer(text, dataset)
    return predicted, is_correct(predicted, gold, dataset)


def answer_key(answer: str | None, dataset: str) -> str | None:
    """A canonical spelling of an extracted answer, so that equal answers vote together
    (``$1,000.00`` and ``1000`` on GSM8K, ``(c)`` and ``C`` on GPQA)."""
    if answer is None or not answer.strip():
        return None
    kind = answer_kind(dataset)
    if kind == "choice":
        return _choice_letter(answer)
    value = parse_plain_number(answer, allow_units=kind == "numeric")
    if value is not None:
        return format(value.normalize(), "f")
    return normalize_latex(answer)
