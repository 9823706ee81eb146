"""Latent self-consistency: K sequences of one prompt, a vote over their answers.

Pure functions: a vote sees only each sample's answer key (None: no answer, no vote) and its
mean log-probability. `majority_vote` counts, and ties between equally frequent answers go to
the one whose samples were, on average, the most confident. `weighted_vote` gives each sample
the weight exp(mean log-probability), its per-token geometric-mean probability, in (0, 1], so
that two hesitant samples can lose to one sure one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

VOTES = ("majority", "weighted")  # DecodeParams.vote


@dataclass(frozen=True)
class Vote:
    key: str | None       # the winning answer key (None: no sample gave an answer)
    index: int            # the sample shown for the vote: the most confident one with that answer
    votes: int            # samples that gave the winning answer
    voters: int           # samples that gave any answer
    samples: int


def majority_vote(keys: Sequence[str | None], mean_logprobs: Sequence[float]) -> Vote:
    groups = _groups(keys, mean_logprobs)
    if not groups:
        return _no_answer(mean_logprobs)

    def confidence(members: list[int]) -> float:
        return sum(mean_logprobs[i] for i in members) / len(members)

    # Most votes, then the highest mean confidence, then the answer seen first.
    key = max(groups, key=lambda k: (len(groups[k]), confidence(groups[k]), -groups[k][0]))
    return _vote(key, groups, mean_logprobs)


def weighted_vote(keys: Sequence[str | None], mean_logprobs: Sequence[float]) -> Vote:
    """The answer whose samples' weights exp(mean log-probability) sum highest (then the one
    with more votes, then the one seen first)."""
    groups = _groups(keys, mean_logprobs)
    if not groups:
        return _no_answer(mean_logprobs)

    def weight(members: list[int]) -> float:
        return math.fsum(math.exp(mean_logprobs[i]) for i in members)

    key = max(groups, key=lambda k: (weight(groups[k]), len(groups[k]), -groups[k][0]))
    return _vote(key, groups, mean_logprobs)


def vote(kind: str, keys: Sequence[str | None], mean_logprobs: Sequence[float]) -> Vote:
    """The vote named by DecodeParams.vote: "majority" or "weighted"."""
    if kind not in VOTES:
        raise ValueError(f"unknown vote {kind!r}: expected one of {', '.join(VOTES)}")
    return (weighted_vote if kind == "weighted" else majority_vote)(keys, mean_logprobs)


def _groups(keys: Sequence[str | None], mean_logprobs: Sequence[float]) -> dict[str, list[int]]:
    if len(keys) != len(mean_logprobs) or not keys:
        raise ValueError("a vote needs one mean log-probability per answer, and at least one answer")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    return groups


def _no_answer(mean_logprobs: Sequence[float]) -> Vote:
    best = max(range(len(mean_logprobs)), key=lambda i: (mean_logprobs[i], -i))
    return Vote(None, best, 0, 0, len(mean_logprobs))


def _vote(key: str, groups: dict[str, list[int]], mean_logprobs: Sequence[float]) -> Vote:
    """The winner's Vote: the sample shown is its most confident one."""
    members = groups[key]
    index = max(members, key=lambda i: (mean_logprobs[i], -i))
    return Vote(key, index, len(members), sum(len(m) for m in groups.values()), len(mean_logprobs))


def sample_seeds(seed: int, samples: int) -> list[int]:
    """Sample i decodes with seed + i (as OpenAI `n` choices do here): sample 0 is the
    single-sample run, so K = 1 is exactly the existing method."""
    return [(seed + i) % (1 << 63) for i in range(samples)]
