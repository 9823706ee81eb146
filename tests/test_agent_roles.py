"""The LatentMAS / TextMAS roles (selar_local/agent_roles.py): one set of duties for both."""
from __future__ import annotations

import pytest

from selar_local.agent_roles import ROLE_NAMES, ROLES, latentmas_turn, problem_of, role, textmas_turn
from selar_local.errors import InvalidParameterError

PROBLEM = "Tom has 3 apples and buys 4 more. How many? Please put your final answer within \\boxed{}."


def content(messages) -> str:
    assert len(messages) == 1 and messages[0]["role"] == "user"
    return messages[0]["content"]


def test_four_roles_in_order_and_only_the_solver_answers():
    assert ROLE_NAMES == ("planner", "critic", "refiner", "solver")
    assert [r.answers for r in ROLES] == [False, False, False, True]
    for r in ROLES[:-1]:
        assert "do not" in r.duty.lower()  # they are told not to answer (or solve)
    assert "do not" not in ROLES[-1].duty.lower()


def test_latentmas_turns_carry_the_duty_and_the_problem_verbatim():
    for i, name in enumerate(ROLE_NAMES):
        text = content(latentmas_turn(name, PROBLEM))
        assert role(name).duty in text and text.endswith(f"Problem:\n{PROBLEM}")
        assert f"You are the {role(name).title}" in text
        assert ("in your memory above" in text) == (i > 0)  # the planner is first: nothing before it


def test_textmas_turns_have_the_same_duties_and_quote_the_earlier_roles_in_order():
    notes = [("planner", "1. add 3 and 4\n"), ("critic", "The plan is fine.")]
    text = content(textmas_turn("refiner", PROBLEM, notes))
    assert role("refiner").duty in text and text.endswith(f"Problem:\n{PROBLEM}")
    assert text.index("[Planner]\n1. add 3 and 4") < text.index("[Critic]\nThe plan is fine.") < text.index("Problem:")
    assert "in your memory" not in text
    assert "[" not in content(textmas_turn("planner", PROBLEM))
    for name in ROLE_NAMES:  # the same duty as in latentmas
        earlier = [(n, "x") for n in ROLE_NAMES[: ROLE_NAMES.index(name)]]
        assert role(name).duty in content(textmas_turn(name, PROBLEM, earlier))
        assert role(name).duty in content(latentmas_turn(name, PROBLEM))


def test_textmas_needs_exactly_the_earlier_roles_notes():
    with pytest.raises(InvalidParameterError, match=r"needs the notes of \['planner'\], got \[\]"):
        textmas_turn("critic", PROBLEM)
    with pytest.raises(InvalidParameterError, match="got \\['critic', 'planner'\\]"):
        textmas_turn("refiner", PROBLEM, [("critic", "a"), ("planner", "b")])
    with pytest.raises(InvalidParameterError, match="unknown role 'judge'"):
        latentmas_turn("judge", PROBLEM)


def test_the_problem_is_the_last_user_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"}, {"role": "user", "content": PROBLEM}]
    assert problem_of(messages) == PROBLEM
    with pytest.raises(InvalidParameterError, match="last user message"):
        problem_of([{"role": "system", "content": "x"}])
    with pytest.raises(InvalidParameterError, match="last user message"):
        problem_of([{"role": "user", "content": "  "}])
