"""The roles of the multi-agent methods: `latentmas` (LatentMAS, sequential) and its text
baseline `textmas`, in one place so that the two differ only in how the team's work is
passed on.

Four roles work on one problem in turn: a planner lays out a plan, a critic checks it, a
refiner turns both into a corrected plan, and a solver writes the answer. Each role's duty
is the same text in both methods:
- latentmas: every role's turn is appended to ONE sequence; the planner, critic and
  refiner each think `--latent-steps` steps in hidden space after their turn and write
  nothing, so what they thought reaches the next role only through the sequence's KV
  cache (the "latent working memory"); the solver's turn is followed by decoding.
- textmas: every role decodes text in a fresh sequence, and the next roles' turns quote
  that text; the solver's text is the answer. Without it a latentmas gain could not be told
  from the extra prompting.

The wording is ours, written for small instruction-tuned models in the spirit of the
LatentMAS paper's sequential prompts: short duties, the problem restated in every turn
(a role must not depend on remembering it), and only the solver asked for the answer. The
problem is the user's message as given, so a benchmark's answer instruction (boxed answer,
option letter) reaches the solver unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from selar_local.errors import InvalidParameterError


@dataclass(frozen=True)
class Role:
    name: str
    title: str      # how the other roles refer to it
    duty: str       # what it does, the same in latentmas and textmas
    answers: bool   # the solver: its turn is decoded as the answer


ROLES: tuple[Role, ...] = (
    Role("planner", "Planner",
         "Work out how to solve the problem below: which facts and quantities matter, and which steps, "
         "in which order, lead from them to what is asked. Keep the plan short, one line a step. Do not "
         "carry out the calculation and do not give the final answer: a critic reviews your plan next.",
         False),
    Role("critic", "Critic",
         "Review the plan for the problem below. Check each step: is it correct, does it follow from the "
         "problem's facts, is a step missing, does the plan end at exactly what is asked? Say briefly what "
         "is wrong and how to fix it; do not solve the problem yourself.",
         False),
    Role("refiner", "Refiner",
         "Combine the plan and its review into one corrected plan for the problem below, step by step, "
         "fixing what the review found and keeping what was right. Do not give the final answer: a solver "
         "follows your plan next.",
         False),
    Role("solver", "Solver",
         "Solve the problem below step by step. The team's plan can guide you, but it may contain mistakes: "
         "check every step against the problem, and follow the problem where they disagree.",
         True),
)
ROLE_NAMES = tuple(role.name for role in ROLES)
_BY_NAME: Mapping[str, Role] = {role.name: role for role in ROLES}

_TEAM = "You are the {title} in a team of four (Planner, Critic, Refiner, Solver) solving one problem in turn."
# How earlier work reaches a role: latent thoughts in the shared memory, or quoted text.
_LATENT_CONTEXT = ("The team's earlier roles thought about it before you; their thoughts are in your memory "
                   "above, as thoughts rather than words.")
_TEXT_CONTEXT = "Here is what the team's earlier roles wrote:"


def role(name: str) -> Role:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise InvalidParameterError(f"unknown role {name!r}: expected one of {', '.join(ROLE_NAMES)}") from None


def latentmas_turn(name: str, problem: str) -> list[dict]:
    """The user turn of role `name` in latentmas, to append to the shared sequence."""
    r = role(name)
    parts = [_TEAM.format(title=r.title)]
    if name != ROLES[0].name:
        parts.append(_LATENT_CONTEXT)
    parts += [r.duty, f"Problem:\n{problem}"]
    return [{"role": "user", "content": "\n\n".join(parts)}]


def textmas_turn(name: str, problem: str, notes: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """The conversation of role `name` in textmas: its duty, the earlier roles' texts
    (`notes`: (role name, text) in order) quoted, and the problem."""
    r = role(name)
    earlier = [n for n, _ in notes]
    expected = list(ROLE_NAMES[: ROLE_NAMES.index(name)])
    if earlier != expected:
        raise InvalidParameterError(f"the {name}'s turn needs the notes of {expected or 'no role'}, got {earlier}")
    parts = [_TEAM.format(title=r.title)]
    if notes:
        quoted = "\n\n".join(f"[{role(n).title}]\n{text.strip()}" for n, text in notes)
        parts.append(f"{_TEXT_CONTEXT}\n\n{quoted}")
    parts += [r.duty, f"Problem:\n{problem}"]
    return [{"role": "user", "content": "\n\n".join(parts)}]


def problem_of(messages: Sequence[Mapping]) -> str:
    """The problem the team works on: the conversation's last user message."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str) and content.strip():
                return content
            break
    raise InvalidParameterError("latentmas and textmas need a last user message that holds the problem as text")
