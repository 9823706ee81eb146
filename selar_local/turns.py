"""A prompt of several turns over ONE sequence: `latentmas`'s roles.

`TurnPrompt` is the first turn's tokens (a list, so every path that takes prompt tokens,
the scheduler, the prompt cache, `generate_many`, takes it unchanged) plus the tokens of
the turns appended later to the same sequence, each after the policy's latent steps
(sequences.SequenceTable.admit queues Prefill, Latent, Prefill, ..., Decode). The KV cache
of the one sequence is then the team's "latent working memory".

`latentmas_prompt` renders the roles' turns (agent_roles.py) through the model's own chat
template: each role's turn is what the template appends when the conversation goes on
with an (empty) assistant turn, which holds the latent steps, and the next role's user
turn. A template that does not extend a conversation by appending (one that rewrites
earlier turns) gets a clear error rather than a sequence that differs from its rendering.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from selar_local.agent_roles import ROLES, latentmas_turn, problem_of
from selar_local.errors import InvalidParameterError


class TurnPrompt(list):
    """The first turn's tokens; `later` holds each later turn's tokens, in order."""

    def __init__(self, first: Iterable[int], later: Sequence[Sequence[int]] = ()):
        super().__init__(first)
        self.later: tuple[list[int], ...] = tuple(list(t) for t in later)
        if any(not t for t in self.later):
            raise InvalidParameterError("a later turn of a prompt has no tokens")

    @property
    def total(self) -> int:
        """Prompt tokens over all turns (what usage reports)."""
        return len(self) + sum(len(t) for t in self.later)


def later_turns(prompt_tokens: Sequence[int]) -> tuple[list[int], ...]:
    """The turns appended after the first one (none for a plain prompt)."""
    return prompt_tokens.later if isinstance(prompt_tokens, TurnPrompt) else ()


def total_prompt_tokens(prompt_tokens: Sequence[int]) -> int:
    return prompt_tokens.total if isinstance(prompt_tokens, TurnPrompt) else len(prompt_tokens)


def keep_turns(prompt_tokens: Sequence[int]) -> list[int]:
    """A list of the prompt's tokens that keeps its later turns (list() would drop them)."""
    return prompt_tokens if isinstance(prompt_tokens, TurnPrompt) else list(prompt_tokens)


def latentmas_prompt(runtime: Any, messages: Sequence[dict], *, template_kwargs: dict | None = None) -> TurnPrompt:
    """The planner's turn as the prompt, the critic's, refiner's and solver's as later turns."""
    problem = problem_of(messages)
    conversation: list[dict] = []
    shown = ""  # the rendering so far, up to the last role's generation prompt
    first: list[int] = []
    later: list[list[int]] = []
    for i, r in enumerate(ROLES):
        if i:
            conversation.append({"role": "assistant", "content": ""})  # the role's latent steps
        conversation += latentmas_turn(r.name, problem)
        text = runtime.chat_prompt(conversation, template_kwargs=template_kwargs)
        if not i:
            first = runtime.encode(messages=conversation, template_kwargs=template_kwargs)
        elif not text.startswith(shown):
            raise InvalidParameterError(
                "method 'latentmas' appends each role's turn to one sequence, but this model's chat template "
                f"renders the conversation differently once the {r.name}'s turn is added (it rewrites earlier "
                "turns); use method 'textmas', or a model whose template extends a conversation by appending")
        else:
            later.append(runtime.model.tokenize(text[len(shown):], add_special=False, parse_special=True))
        shown = text
    return TurnPrompt(first, later)
