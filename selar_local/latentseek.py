"""LatentSeek's math (Li et al., 2025, "Seek in the Dark"): test-time policy-gradient search over
the final hidden states of an answer's first tokens, guided by the model's grading of its own
answer. Pure NumPy; the loop that decodes, grades and re-decodes is not wired here.

- The latent prefix z: the final hidden states (after the final norm) of the first rho = 10% of
  a greedy cot answer's tokens, at most 300 (`prefix_length`).
- REINFORCE: with J(z) = R * sum_t log p(x_t | z_t) and p = softmax(W_out z_t), the gradient
  passes only through the output layer and is closed-form (`log_prob_gradient`):
  d log p(x_t | z_t) / d z_t = W_out^T (onehot(x_t) - softmax(W_out z_t)).
- z is moved by Adam (lr 0.03, ascent on J), at most 10 iterations, until the reward passes
  its threshold; the new prefix tokens are argmax W_out z_t (`prefix_tokens`), the rest of
  the answer is decoded greedily after them.
- The reward (`SELF_REWARD_PROMPT`, `self_reward`): the model checks its own reasoning and
  final answer; each failed check costs 1/3, so the reward is in {-1, -2/3, -1/3, 0} and 0
  (every check passed) ends the search.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selar_local.errors import InvalidParameterError, ModelLoadError

RHO = 0.1
MAX_PREFIX = 300
LEARNING_RATE = 0.03
MAX_ITERATIONS = 10
REWARD_THRESHOLD = 0.0
OUTPUT_TABLES = ("output.weight", "token_embd.weight")  # the output layer, else its tied input table


def prefix_length(n_answer_tokens: int, rho: float = RHO, cap: int = MAX_PREFIX) -> int:
    """Tokens of the latent prefix: rho of the answer (at least 1), at most `cap`."""
    if n_answer_tokens < 1:
        raise InvalidParameterError("LatentSeek needs an answer of at least one token")
    return max(1, min(cap, int(rho * n_answer_tokens)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def log_probs(table: np.ndarray, z: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log p(x_t | z_t) for each t. table: (n_vocab, n_embd); z: (T, n_embd); tokens: (T,)."""
    logits = z @ table.T
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    return logits[np.arange(len(tokens)), tokens] - log_z


def log_prob_gradient(table: np.ndarray, z: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """d log p(x_t | z_t) / d z_t = W^T (onehot(x_t) - softmax(W z_t)), one row per t."""
    residual = -_softmax(z @ table.T)
    residual[np.arange(len(tokens)), tokens] += 1.0
    return residual @ table


def policy_gradient(table: np.ndarray, z: np.ndarray, tokens: np.ndarray, reward: float) -> np.ndarray:
    """The REINFORCE estimate of d E[R] / d z from one sample: R * d sum_t log p(x_t | z_t) / d z."""
    return float(reward) * log_prob_gradient(table, z, tokens)


def prefix_tokens(table: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The tokens the latent prefix stands for: argmax W z_t."""
    return np.argmax(z @ table.T, axis=-1)


@dataclass
class Adam:
    """Adam (Kingma and Ba) ascending an objective: `step` returns the moved parameters."""

    lr: float = LEARNING_RATE
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    t: int = 0
    m: np.ndarray | None = field(default=None, repr=False)
    v: np.ndarray | None = field(default=None, repr=False)

    def step(self, params: np.ndarray, grad: np.ndarray) -> np.ndarray:
        if self.m is None:
            self.m, self.v = np.zeros_like(grad), np.zeros_like(grad)
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * grad
        self.v = self.beta2 * self.v + (1 - self.beta2) * grad * grad
        m_hat = self.m / (1 - self.beta1 ** self.t)
        v_hat = self.v / (1 - self.beta2 ** self.t)
        return params + self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


# -- the output table ------------------------------------------------------------------
def output_table(model_path: str | Path, *, max_bytes: int = 2 << 30) -> np.ndarray:
    """The model's output layer as float32 (n_vocab, n_embd), dequantised once from the GGUF
    file (`output.weight`, else the tied `token_embd.weight`); refused past max_bytes."""
    from gguf.quants import dequantize

    from selar_local.gguf_index import GGUFIndex

    index = GGUFIndex(model_path)
    name = next((n for n in OUTPUT_TABLES if n in index.tensors), None)
    if name is None:
        raise ModelLoadError(f"{model_path} has neither {' nor '.join(OUTPUT_TABLES)}: LatentSeek needs the output layer")
    location = index.tensors[name]
    n_embd, n_vocab = int(location.shape[0]), int(np.prod(location.shape[1:]))
    need = 4 * n_embd * n_vocab
    if need > max_bytes:
        raise InvalidParameterError(f"the output table of {Path(model_path).name} is {need >> 20} MiB as float32, "
                                    f"over the {max_bytes >> 20} MiB bound")
    return np.ascontiguousarray(dequantize(index.raw_rows(name), location.qtype).reshape(n_vocab, n_embd),
                                dtype=np.float32)


# -- the self-reward -------------------------------------------------------------------
SELF_REWARD_PROMPT = """You are grading a solution to a math problem. Check it carefully, step by step.

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

SELF_REWARD_FIELDS = ("reasoning_correct", "answer_complete", "answer_consistent")
# For the grammar sampler (DecodeParams.json_schema): the grading can only be this object.
SELF_REWARD_SCHEMA = {
    "type": "object",
    "properties": {name: {"type": "boolean"} for name in SELF_REWARD_FIELDS},
    "required": list(SELF_REWARD_FIELDS),
    "additionalProperties": False,
}


def self_reward_messages(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": SELF_REWARD_PROMPT.format(question=question.strip(), answer=answer.strip())}]


def self_reward(grading: str) -> float:
    """The reward of a grading (the JSON the model wrote): minus one third per failed check;
    an unreadable grading counts as every check failed."""
    try:
        verdict = json.loads(grading)
    except (json.JSONDecodeError, TypeError):
        return -1.0
    if not isinstance(verdict, dict):
        return -1.0
    failed = sum(1 for name in SELF_REWARD_FIELDS if verdict.get(name) is not True)
    return -failed / len(SELF_REWARD_FIELDS)


def reward_passes(reward: float, threshold: float = REWARD_THRESHOLD) -> bool:
    return reward >= threshold - 1e-12 and math.isfinite(reward)
