"""`--method textmas`: LatentMAS's text baseline on the public Python API. The same four
roles as `latentmas` (agent_roles.py) work in turn, but each one decodes text in a fresh
sequence and the next roles' turns quote it; the solver's text is the answer.

It decodes whole answers one after the other, so it is a search in the registry's sense
(methods.Method.search): the facades hand it the question and a `decode` function, and
`selar bench` runs many items of it at once through one scheduler (bench/runner.py).
Every role samples as `cot` with the request's sampler and seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from selar_local.agent_roles import ROLES, textmas_turn
from selar_local.params import DecodeParams

if TYPE_CHECKING:
    from selar_local.generate import GenerationResult
    from selar_local.runtime import Runtime

Decode = Callable[[Sequence[Sequence[int]], Sequence[DecodeParams]], list]


@dataclass
class TeamResult:
    text: str                 # the solver's text: the answer
    tokens: list[int]         # its tokens
    notes: list[tuple[str, str]]  # (role, what it wrote), in order
    results: list["GenerationResult"] = field(default_factory=list, repr=False)  # one per role
    settings: dict = field(default_factory=dict)  # none of its own: the roles decode as the request asks

    @property
    def finish_reason(self) -> str:
        return self.results[-1].finish_reason

    @property
    def content(self) -> str:
        """The solver's answer after any thinking span: what is graded and returned."""
        return self.results[-1].content

    @property
    def reasoning(self) -> str:
        return self.results[-1].reasoning

    @property
    def answer(self) -> str | None:
        """The solver's text after its thinking span; None without markers."""
        return self.results[-1].answer

    @property
    def think_tokens(self) -> int:
        return self.results[-1].think_tokens

    @property
    def generations(self) -> int:
        return len(self.results)

    @property
    def decoded_tokens(self) -> int:
        """Every token the team decoded: its roles' texts."""
        return sum(r.completion_tokens for r in self.results)

    def summary(self) -> dict:
        """What a response's `selar` field and a bench record carry about the team."""
        return {"generations": self.generations,
                "roles": [{"role": name, "completion_tokens": r.completion_tokens, "finish_reason": r.finish_reason}
                          for (name, _), r in zip(self.notes, self.results)]}

    def describe(self) -> str:
        """One line for `selar run`'s stderr."""
        roles = ", ".join(f"{name} {r.completion_tokens}" for (name, _), r in zip(self.notes, self.results))
        return (f"{self.generations} roles decoded (tokens: {roles}; "
                f"{self.decoded_tokens} in all), finish: {self.finish_reason}")


def search(runtime: "Runtime", question: str, prompt: Sequence[int], params: DecodeParams, *,
           decode: Decode | None = None, reference: Callable[[str], bool] | None = None) -> TeamResult:
    """The registry's entry for `--method textmas`: the roles in turn on `question` (the
    request's last user message; `prompt`, the request's own tokens, is not decoded).
    reference (the search protocol's check against a known answer) is not used: the team does
    not grade its answer.
    decode: how to decode (default runtime.generate_batch; the server passes its scheduler's)."""
    decode = decode or runtime.generate_batch
    as_cot = params.replace(method="cot")
    notes: list[tuple[str, str]] = []
    results = []
    for role in ROLES:
        tokens = runtime.encode(messages=textmas_turn(role.name, question, notes))
        result = decode([tokens], [as_cot])[0]
        results.append(result)
        notes.append((role.name, result.content))
    return TeamResult(results[-1].text, list(results[-1].tokens), notes, results)
