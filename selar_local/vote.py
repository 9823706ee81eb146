"""Latent self-consistency: K sequences of one prompt, a majority vote over their answers.

Pure functions: `majority_vote` sees only each sample's answer key (None: no answer, no
vote) and its mean log-probability; ties between equally frequent answers go to the one
whose samples were, on average, the most confident.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Vote:
    key: str | None       # the winning answer key (None: no sample gave an answer)
    index: int            # the sample shown for the vote: the most confident one with that answer
    votes: int            # samples that gave the winning answer
    voters: int           # samples that gave any answer
    samples: int


def majority_vote(keys: Sequence[str | None], mean_logprobs: Sequence[float]) -> Vote:
    if len(keys) != len(mean_logprobs) or not keys:
        raise ValueError("majority_vote needs one mean log-probability per answer, and at least one answer")
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    if not groups:
        best = max(range(len(keys)), key=lambda i: (mean_logprobs[i], -i))
        return Vote(None, best, 0, 0, len(keys))

    def confidence(members: list[int]) -> float:
        return sum(mean_logprobs[i] for i in members) / len(members)

    # Most votes, then the highest mean confidence, then the answer seen first.
    key = max(groups, key=lambda k: (len(groups[k]), confidence(groups[k]), -groups[k][0]))
    members = groups[key]
    index = max(members, key=lambda i: (mean_logprobs[i], -i))
    return Vote(key, index, len(members), sum(len(m) for m in groups.values()), len(keys))


def sample_seeds(seed: int, samples: int) -> list[int]:
    """Sample i decodes with seed + i (as OpenAI `n` choices do here): sample 0 is the
    single-sample run, so K = 1 is exactly the existing method."""
    return [(seed + i) % (1 << 63) for i in range(samples)]
