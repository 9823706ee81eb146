"""Answer extraction and grading, on real gold answers from the benchmark files."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import external_data_dir
from selar_local.bench.datasets import PACKAGED_DATA_DIR, load_problems
from selar_local.bench.grading import (
    answer_kind,
    extract_answer,
    grade,
    is_correct,
    last_boxed,
    normalize_latex,
    symbolic_equal,
)

# GPQA Diamond is not shipped (its authors ask that it not be published in plain text).
GPQA_DIR = external_data_dir("gpqa_diamond/test.jsonl")
requires_gpqa = pytest.mark.skipif(
    GPQA_DIR is None, reason="GPQA Diamond is not shipped: set SELAR_DATA_DIR to a folder holding "
                             "gpqa_diamond/test.jsonl to run this test")


def gold_answers(name: str) -> list[str]:
    """Gold answers of a data set: the shipped copy, or GPQA from where a developer has it."""
    data_dir = GPQA_DIR if name == "gpqa_diamond" else PACKAGED_DATA_DIR
    return [problem.answer for problem in load_problems(name, data_dir=data_dir)]


@pytest.fixture(scope="module")
def math500_golds() -> list[str]:
    return gold_answers("math500")


# ------------------------------------------------------------------ last_boxed


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("first \\boxed{1}, finally \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("\\fbox{7}", "7"),
    ("the answer is \\boxed 5$.", "5"),
    ("\\boxed {x+1}", "x+1"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),  # escaped braces do not count
    ("\\boxed{\\begin{pmatrix} 1 \\\\ {2} \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ {2} \\end{pmatrix}"),
    ("\\boxed{\\boxed{3}}", "3"),
    ("\\boxed{}", ""),
])
def test_last_boxed_finds_the_last_box(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text", [
    "no box here",
    "\\boxed{unclosed",
    "\\boxed{1} and then cut off \\boxed{2",  # the final answer is the truncated one
    "\\boxedanswer{3}",
    "",
])
def test_last_boxed_returns_none(text):
    assert last_boxed(text) is None


# ------------------------------------------------------------------ extract_answer


@pytest.mark.parametrize("text, expected", [
    ("She pays \\boxed{\\$1,000}. Later 20 minutes pass.", "\\$1,000"),
    ("The total is 1,234.5 dollars.", "1234.5"),
    ("It drops by 3 degrees, ending at -7.", "-7"),
    ("Half of it: .5 of a cup", ".5"),
    ("No digits at all.", None),
])
def test_extract_gsm8k_boxed_then_last_number(text, expected):
    assert extract_answer(text, "gsm8k") == expected


@pytest.mark.parametrize("text, expected", [
    ("Thus $\\boxed{\\dfrac{1}{2}}$.", "\\dfrac{1}{2}"),
    ("The answer is 12.", None),  # math answers must be boxed
])
def test_extract_math_needs_a_box(text, expected):
    assert extract_answer(text, "math500") == expected


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{C}", "C"),
    ("so \\boxed{\\text{(b)}}", "B"),
    ("\\boxed{D) 12 eV}", "D"),
    ("Therefore, the answer is (C).", "C"),
    ("Answer: **A**", "A"),
    ("\\boxed{12 eV}; so the answer is D", "D"),
    ("A is tempting but wrong.", None),
    ("\\boxed{E}", None),
])
def test_extract_gpqa_letter(text, expected):
    assert extract_answer(text, "gpqa_diamond") == expected


# ------------------------------------------------------------------ is_correct: MATH-500


# (index in math500/test.jsonl, gold as stored there, equivalent rewritings, wrong answers)
MATH500_CASES = [
    (0, "\\left( 3, \\frac{\\pi}{2} \\right)",
     ["(3,\\frac{\\pi}{2})", "(3, \\pi/2)", "\\left(3,\\dfrac{\\pi}{2}\\right)"],
     ["(3, \\pi)", "(\\frac{\\pi}{2}, 3)", "3"]),
    (1, "p - q", ["-q + p"], ["q - p", "p + q"]),
    (2, "\\frac{14}{3}", ["14/3", "\\dfrac{14}{3}", "\\tfrac{14}{3}", "4\\frac{2}{3}"],
     ["3/14", "4.6667", "14"]),
    (4, "\\text{Evelyn}", ["Evelyn", "\\textbf{Evelyn}"], ["\\text{Bob}"]),
    (7, "90^\\circ", ["90", "90^{\\circ}", "90°"], ["45^\\circ", "9"]),
    (8, "3\\sqrt{13}", ["\\sqrt{117}", "3 \\sqrt{13}"], ["3\\sqrt{12}", "\\sqrt{39}"]),
    (15, "6 - 5i", ["6-5i", "-5i + 6"], ["6+5i", "6"]),
    (17, "\\pi", ["\\pi"], ["3.14", "2\\pi"]),
    (23, "x=5", ["5", "x = 5"], ["x=6", "-5"]),
    (25, "1,-2", ["-2, 1", "1, -2"], ["1", "1, 2"]),
    (44, "1.25", ["\\frac{5}{4}", "1.250", "5/4"], ["1.2", "125"]),
    (99, "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
     ["\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}"],
     ["\\begin{pmatrix} 1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"]),
    (103, "(3,4]", ["(3, 4]"], ["(3,4)", "[3,4]"]),
]


@pytest.mark.parametrize("index, stored_gold, equivalents, wrong", MATH500_CASES,
                         ids=[str(case[0]) for case in MATH500_CASES])
def test_math500_real_golds(math500_golds, index, stored_gold, equivalents, wrong):
    gold = math500_golds[index]
    assert gold == stored_gold  # the case table describes the real file
    for answer in equivalents:
        assert is_correct(answer, gold, "math500"), answer
    for answer in wrong:
        assert not is_correct(answer, gold, "math500"), answer


@pytest.mark.parametrize("predicted, gold, expected", [
    ("\\dfrac{1}{2}", "0.5", True),  # same rational number
    ("0.5", "\\frac12", True),
    ("1/2", "2", False),
    ("2", "\\frac{1}{2}", False),
    ("(3, \\pi/2)", "(3, \\pi)", False),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}", True),
    ("[1,2)", "[1,2]", False),
    ("\\{1,2\\}", "\\{2,1\\}", True),  # sets ignore order
    ("(2,1)", "(1,2)", False),  # ordered pair vs interval
    ("5i", "5", False),  # not a number with a unit
    ("\\text{west}", "\\text{east}", False),
])
def test_math_equivalence_pairs(predicted, gold, expected):
    assert is_correct(predicted, gold, "math500") is expected


def test_every_math500_gold_grades_equal_to_itself(math500_golds):
    for gold in math500_golds:
        assert grade(f"Hence $\\boxed{{{gold}}}$.", gold, "math500") == (gold, True), gold


def test_every_math500_gold_is_symbolically_equal_to_itself(math500_golds):
    # Forces the math_verify path (the string fast path is not used here).
    failures = [gold for gold in math500_golds if not symbolic_equal(gold, gold)]
    assert failures == []


def test_neighbouring_math500_golds_are_not_confused(math500_golds):
    # Each gold graded against the next one: distinct answers must not match, except when
    # they are the same value written differently ("5" vs "x=5" in this file).
    confused = [
        (gold, following)
        for gold, following in zip(math500_golds, math500_golds[1:])
        if normalize_latex(gold) != normalize_latex(following)
        and is_correct(following, gold, "math500")
    ]
    assert all(normalize_latex(b).split("=")[-1] == normalize_latex(a) for a, b in confused), confused


# ------------------------------------------------------------------ is_correct: GSM8K, AIME, GPQA


@pytest.mark.parametrize("predicted, gold, expected", [
    ("1,000", "1000", True),
    ("$18.00", "18", True),
    ("\\$18.00", "18", True),
    ("18 dollars", "18", True),
    ("18\\text{ dollars}", "18", True),
    ("x = 18", "18", True),
    ("\\frac{36}{2}", "18", True),  # not a plain number: symbolic fallback
    ("180", "18", False),
    ("18.5", "18", False),
    ("1.8", "18", False),
    ("10", "-10", False),
    ("-10", "-10", True),
])
def test_gsm8k_numeric_normalisation(predicted, gold, expected):
    assert is_correct(predicted, gold, "gsm8k") is expected


def test_gsm8k_real_golds():
    golds = gold_answers("gsm8k")
    assert golds[0] == "18" and golds[146] == "2125"
    assert is_correct("\\$18.00", golds[0], "gsm8k")
    assert is_correct("2,125", golds[146], "gsm8k")
    assert not is_correct("2,126", golds[146], "gsm8k")
    for gold in golds:
        assert grade(f"... so she makes {int(gold):,} in total.", gold, "gsm8k") == (gold, True)


@pytest.mark.parametrize("name", ["aime24", "aime25"])
def test_aime_integers_ignore_leading_zeros(name):
    for gold in gold_answers(name):
        assert is_correct(f"{int(gold):03d}", gold, name)
        assert is_correct(f"{gold}.0", gold, name)
        assert not is_correct(str(int(gold) + 1), gold, name)


def test_amc23_real_golds():
    for gold in gold_answers("amc23"):
        assert grade(f"\\boxed{{{gold}}}", gold, "amc23") == (gold, True)
        assert not is_correct(str(int(gold) + 1), gold, "amc23")


@requires_gpqa
def test_gpqa_letters_case_insensitive():
    for gold in gold_answers("gpqa_diamond"):
        assert grade(f"... \\boxed{{{gold.lower()}}}", gold, "gpqa") == (gold, True)
        other = "A" if gold != "A" else "B"
        assert grade(f"\\boxed{{{other}}}", gold, "gpqa") == (other, False)


# ------------------------------------------------------------------ robustness


@pytest.mark.parametrize("predicted", [
    None, "", "   ", "\\frac{", "}}}{{", "\\sqrt{-", "x" * 5000, "\\begin{pmatrix}", "10^{10^{10}}+",
])
@pytest.mark.parametrize("dataset", ["math500", "gsm8k", "aime24", "gpqa"])
def test_garbage_never_raises(predicted, dataset):
    assert is_correct(predicted, "5", dataset) is False


def test_grade_without_an_answer():
    assert grade("I could not solve it.", "5", "math500") == (None, False)


def test_answer_kinds():
    assert answer_kind("gsm8k") == "numeric"
    assert answer_kind("math-500") == "math"
    assert answer_kind("aime25") == "integer"
    assert answer_kind("gpqa") == "choice"
    assert answer_kind("my_custom_set") == "math"


# ------------------------------------------------------------------ threads


def test_math_verify_default_timeout_fails_in_threads():
    # The premise for our thread handling: math_verify's default (signal-based) timeout
    # raises outside the main thread.
    from math_verify import parse

    errors: list[BaseException] = []

    def parse_with_defaults() -> None:
        try:
            parse("$\\frac{1}{2}$")
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            errors.append(exc)

    worker = threading.Thread(target=parse_with_defaults)
    worker.start()
    worker.join()
    assert len(errors) == 1 and isinstance(errors[0], ValueError)


def test_grading_from_worker_threads():
    cases = [
        ("\\dfrac{1}{2}", "0.5", True),
        ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("\\sqrt{117}", "3\\sqrt{13}", True),
        ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
    ] * 4
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: is_correct(case[0], case[1], "math500"), cases))
    assert results == [expected for _, _, expected in cases]
