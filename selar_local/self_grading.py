"""The model's grading of its own answer, as a reward in [-1, 0] (LatentSeek's search signal).

A grader is a few prompts, each a check of the answer, and a weight per check; the reward is
minus the weight of the failed checks over the total, and 0 means every check passed. Pure:
the prompts go out as chat messages, the texts the model wrote come back (decoding is the
caller's: selar_local/latentseek_search.py).

- `checks` (the default): the published design (LatentSeek, after Multi-Agent Verification):
  four separate checks, each written out in free text (its reply's first words are given, or a
  small model writes the verdict at once) and ending in a verdict: the calculations redone, the
  final answer, its completeness, the reading of the problem; weights 2, 1, 2, 1 (LatentSeek's
  threshold, -0.2, passes an answer that failed one check of weight 1, no more).
- `json`: one JSON object of three checks, forced by the grammar. Cheap (one short decode) but
  the model has no room to compute before it answers.
- `psrm`: no grading by the model: the answer against the data set's reference answer (the
  paper's "Perfect Sparse Reward Model"), in `selar bench` only; an upper bound on what the search
  can do with a right reward, not a method to deploy.

Neither tells Qwen2.5-Coder-1.5B's wrong GSM8K answers from its right ones: `json` passed all 52
first answers, `checks` all 10 right and all 10 wrong of a balanced 20; redoing the work, the
model repeats its own mistake (benchmarks/latentseek_grader.py, docs/BENCHMARKS.md, "LatentSeek").
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Sequence

from selar_local.errors import InvalidParameterError

VERDICT = "VERDICT:"
_VERDICT_WORD = re.compile(r"\b(true|false)\b", re.IGNORECASE)

_INTRO = """You are checking a proposed solution to a math problem. Read it critically: it may be wrong.

PROBLEM:
{question}

PROPOSED SOLUTION:
{answer}

"""
_END = (f"\n\nWrite the check out first. Then, on a last line of its own, write `{VERDICT} true` or "
        f"`{VERDICT} false`.")

CHECK_PROMPTS = {
    "calculations": _INTRO + (
        "TASK: check the solution's arithmetic. For every calculation it performs, write the calculation "
        "and your own result, one per line (for example `12 * 3 = 36: correct`); skip numbers it only quotes "
        "from the problem. The verdict is true if every calculation gives the value the solution states, "
        "false if any does not.") + _END,
    "final_answer": _INTRO + (
        "TASK: decide whether the solution's final answer is correct. Solve the problem yourself, step by "
        "step, without following the solution's steps, then compare your result with its final answer. The "
        "verdict is true if they agree.") + _END,
    "complete": _INTRO + (
        "TASK: decide whether the solution ends with one definite final answer: quote its final statement, "
        "then say whether it gives a computed value (not a formula left unevaluated, not several candidates, "
        "not a statement that the problem cannot be solved). The verdict is true if it does.") + _END,
    "reading": _INTRO + (
        "TASK: decide whether the solution read the problem correctly. List the quantities the problem gives "
        "and what it asks for, then say whether the solution uses each quantity with its stated meaning (for "
        "example 1.5 times a price, not 1.15 times), leaves out no condition and answers the question asked, "
        "in its units. The verdict is true if it read the problem correctly.") + _END,
}
# The opening words of each check's reply, fed after the chat's generation prompt: a small model
# asked for a verdict writes the verdict at once unless its reply has already started the work.
CHECK_STARTS = {
    "calculations": "Checking each calculation of the solution:\n",
    "final_answer": "Solving the problem myself, step by step:\n",
    "complete": "The solution's final statement:",
    "reading": "What the problem gives and asks:\n",
}
CHECK_WEIGHTS = {"calculations": 2.0, "final_answer": 1.0, "complete": 2.0, "reading": 1.0}

JSON_FIELDS = ("reasoning_correct", "answer_complete", "answer_consistent")
JSON_PROMPT = """You are grading a solution to a math problem. Check it carefully, step by step.

Problem:
{question}

Solution:
{answer}

Check three things:
1. reasoning_correct: every step of the reasoning is correct (each calculation gives the value stated, and each step follows from the problem and the steps before it).
2. answer_complete: the solution ends with one clear final answer to the question that was asked (the quantity the problem asks for, in its units).
3. answer_consistent: the final answer is the value the reasoning arrived at.

Reply with a JSON object only, with the three fields as true or false, for example
{{"reasoning_correct": true, "answer_complete": true, "answer_consistent": false}}"""
# For the grammar sampler (DecodeParams.json_schema): the grading can only be this object.
JSON_SCHEMA = {
    "type": "object",
    "properties": {name: {"type": "boolean"} for name in JSON_FIELDS},
    "required": list(JSON_FIELDS),
    "additionalProperties": False,
}


def verdict_of(text: str) -> bool:
    """A free-text check's verdict: the last word `true` or `false` in it (the model is asked for a
    `VERDICT:` line, and a 1.5B model often ends "the verdict is \\boxed{true}" instead); a reply
    with neither word fails its check."""
    found = _VERDICT_WORD.findall(text or "")
    return bool(found) and found[-1].lower() == "true"


def json_verdicts(text: str) -> list[bool]:
    """The three checks of a JSON grading; an unreadable one fails all three."""
    try:
        verdict = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return [False] * len(JSON_FIELDS)
    if not isinstance(verdict, dict):
        return [False] * len(JSON_FIELDS)
    return [verdict.get(name) is True for name in JSON_FIELDS]


@dataclass(frozen=True)
class Grader:
    name: str
    prompts: tuple[str, ...]         # one decode each, formatted with question and answer
    starts: tuple[str, ...]          # each reply's opening words, fed after the generation prompt
    weights: tuple[float, ...]       # one per check (the json grader's three checks share a prompt)
    check_names: tuple[str, ...]     # one per check, in the order of `verdicts`
    max_tokens: int                  # per decode
    schema: dict | None = None       # the grammar each decode is held to (None: free text)

    def messages(self, question: str, answer: str) -> list[list[dict]]:
        """The chat of each decode, in the order `reward` takes their texts."""
        return [[{"role": "user", "content": p.format(question=question.strip(), answer=answer.strip())}]
                for p in self.prompts]

    def verdicts(self, texts: Sequence[str]) -> list[bool]:
        """Each check's verdict from its reply (the text decoded after its start)."""
        if len(texts) != len(self.prompts):
            raise InvalidParameterError(f"grader {self.name}: {len(texts)} texts for {len(self.prompts)} prompts")
        if self.schema is not None:
            return json_verdicts(texts[0])
        return [verdict_of(t) for t in texts]

    def reward(self, texts: Sequence[str]) -> float:
        """Minus the failed checks' weight over the total weight: in [-1, 0]."""
        failed = sum(w for w, ok in zip(self.weights, self.verdicts(texts)) if not ok)
        return -failed / sum(self.weights)


GRADERS = {
    "checks": Grader("checks", tuple(CHECK_PROMPTS.values()), tuple(CHECK_STARTS[k] for k in CHECK_PROMPTS),
                     tuple(CHECK_WEIGHTS[k] for k in CHECK_PROMPTS), tuple(CHECK_PROMPTS), max_tokens=512),
    "json": Grader("json", (JSON_PROMPT,), ("",), (1.0, 1.0, 1.0), JSON_FIELDS, max_tokens=64,
                   schema=JSON_SCHEMA),
}
DEFAULT_GRADER = "checks"
# The paper's Perfect Sparse Reward Model: 0 when the final answer is the reference answer, else
# -1. No prompt: it needs the reference, which only a benchmark has (`selar bench`). It measures
# what the latent search does with a reward that is right, apart from the model's own grading.
REFERENCE_GRADER = "psrm"
GRADER_NAMES = (*GRADERS, REFERENCE_GRADER)


def reference_reward(correct: bool) -> float:
    """The PSRM reward of an answer that does (0) or does not (-1) match the reference."""
    return 0.0 if correct else -1.0


def grader_named(name: str) -> Grader:
    try:
        return GRADERS[name]
    except KeyError:
        raise InvalidParameterError(f"unknown LatentSeek grader {name!r}; known: {', '.join(GRADERS)}") from None
