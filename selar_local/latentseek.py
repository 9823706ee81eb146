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
- The reward (selar_local/self_grading.py): the model checks its own answer; minus the weight of
  the failed checks, in [-1, 0]; at REWARD_THRESHOLD or above the search ends.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from selar_local.errors import InvalidParameterError, ModelLoadError

RHO = 0.1
MAX_PREFIX = 300
LEARNING_RATE = 0.03
MAX_ITERATIONS = 10
REWARD_THRESHOLD = -0.2  # the published one: with the default grader, one failed check of weight 1 passes
ITERATIONS_LIMIT = 32  # each iteration is one generation and one grading: bounded per request
OUTPUT_TABLES = ("output.weight", "token_embd.weight")  # the output layer, else its tied input table


def check_settings(lr: float, iterations: int, rho: float, threshold: float) -> None:
    """The one check of LatentSeek's settings (DecodeParams fields and the driver's arguments)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    problems = []
    if not (isinstance(iterations, int) and not isinstance(iterations, bool) and 0 <= iterations <= ITERATIONS_LIMIT):
        problems.append(f"iterations={iterations!r} (an integer in [0, {ITERATIONS_LIMIT}])")
    if not (number(lr) and 0 < lr <= 10):
        problems.append(f"lr={lr!r} (a number in (0, 10])")
    if not (number(rho) and 0 < rho <= 1):
        problems.append(f"rho={rho!r} (0 < rho <= 1)")
    if not (number(threshold) and -1 <= threshold <= 1):
        problems.append(f"threshold={threshold!r} (a number in [-1, 1]; the reward is in [-1, 0], so a "
                        "threshold above 0 runs every iteration)")
    if problems:
        raise InvalidParameterError("invalid LatentSeek settings: " + "; ".join(problems))


def prefix_length(n_answer_tokens: int, rho: float = RHO, cap: int = MAX_PREFIX) -> int:
    """Tokens of the latent prefix: rho of the answer (at least 1), at most `cap`."""
    if n_answer_tokens < 1:
        raise InvalidParameterError("LatentSeek needs an answer of at least one token")
    return max(1, min(cap, int(rho * n_answer_tokens)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def _logits(table: np.ndarray, z: np.ndarray) -> np.ndarray:
    """W z_t for each t, as float64 (T, n_vocab). The product is taken in the table's dtype: a
    float64 z times the float32 table would first copy the whole table to float64 (1.9 GiB for
    a 1.5B Qwen), once per call and per search."""
    return (z.astype(table.dtype, copy=False) @ table.T).astype(np.float64, copy=False)


def log_probs(table: np.ndarray, z: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """log p(x_t | z_t) for each t. table: (n_vocab, n_embd); z: (T, n_embd); tokens: (T,)."""
    logits = _logits(table, z)
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
    return logits[np.arange(len(tokens)), tokens] - log_z


def log_prob_gradient(table: np.ndarray, z: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """d log p(x_t | z_t) / d z_t = W^T (onehot(x_t) - softmax(W z_t)), one row per t."""
    residual = -_softmax(_logits(table, z))
    residual[np.arange(len(tokens)), tokens] += 1.0
    return (residual.astype(table.dtype, copy=False) @ table).astype(np.float64, copy=False)


def policy_gradient(table: np.ndarray, z: np.ndarray, tokens: np.ndarray, reward: float) -> np.ndarray:
    """The REINFORCE estimate of d E[R] / d z from one sample: R * d sum_t log p(x_t | z_t) / d z."""
    return float(reward) * log_prob_gradient(table, z, tokens)


def prefix_tokens(table: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The tokens the latent prefix stands for: argmax W z_t."""
    return np.argmax(_logits(table, z), axis=-1)


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
# Output tables kept in memory, by model file: searches running side by side (a bench at
# --parallel 16, a server's requests) share one read-only copy instead of each dequantising its
# own (a 1.5B Qwen's is 0.9 GiB as float32). A server may hold a few models; the oldest goes.
_TABLES: "OrderedDict[tuple[str, int, int], np.ndarray]" = OrderedDict()
_TABLES_LOCK = threading.Lock()
TABLES_KEPT = 2


def output_table(model_path: str | Path, *, max_bytes: int = 2 << 30) -> np.ndarray:
    """The model's output layer as float32 (n_vocab, n_embd), read-only, dequantised once per
    model file from the GGUF (`output.weight`, else the tied `token_embd.weight`) and shared;
    refused past max_bytes."""
    path = Path(model_path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _TABLES_LOCK:  # a second caller waits for the first one's table instead of making its own
        table = _TABLES.get(key)
        if table is None:
            table = _dequantised_output_table(path, max_bytes)
            table.flags.writeable = False
            _TABLES[key] = table
            while len(_TABLES) > TABLES_KEPT:
                _TABLES.popitem(last=False)
        _TABLES.move_to_end(key)
    if table.nbytes > max_bytes:
        raise InvalidParameterError(f"the output table of {path.name} is {table.nbytes >> 20} MiB as float32, "
                                    f"over the {max_bytes >> 20} MiB bound")
    return table


def _dequantised_output_table(model_path: Path, max_bytes: int) -> np.ndarray:
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
        raise InvalidParameterError(f"the output table of {model_path.name} is {need >> 20} MiB as float32, "
                                    f"over the {max_bytes >> 20} MiB bound")
    return np.ascontiguousarray(dequantize(index.raw_rows(name), location.qtype).reshape(n_vocab, n_embd),
                                dtype=np.float32)


def reward_passes(reward: float, threshold: float = REWARD_THRESHOLD) -> bool:
    return reward >= threshold - 1e-12 and math.isfinite(reward)
