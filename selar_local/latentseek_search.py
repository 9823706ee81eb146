"""LatentSeek's search on the public Python API (the math is selar_local/latentseek.py).

A greedy cot answer is graded by the model itself; while the reward stays under its threshold,
the final hidden states of the answer's first tokens are moved by Adam along the REINFORCE
gradient, the prefix tokens become argmax W_out z, and the rest of the answer is decoded
greedily after them and graded again. Each iteration costs one generation and one grading.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from selar_local import latentseek as ls
from selar_local.errors import InvalidParameterError
from selar_local.params import DecodeParams

if TYPE_CHECKING:
    from selar_local.generate import GenerationResult
    from selar_local.runtime import Runtime

GRADING_TOKENS = 64


@dataclass
class LatentSeekResult:
    text: str                   # the final answer
    tokens: list[int]           # its tokens: the latent prefix's argmax tokens, then the greedy rest
    iterations: int             # Adam steps taken (0: the first answer passed its grading)
    rewards: list[float]        # the reward of each answer graded, the first answer's first
    prefix_length: int          # tokens of the latent prefix (0 when no step was taken)
    generations: int            # answers decoded
    gradings: int               # gradings decoded
    results: list["GenerationResult"] = field(default_factory=list, repr=False)  # each decode's result
    settings: dict = field(default_factory=dict)  # what it searched with (a response's `selar` shows them)

    @property
    def reward(self) -> float:
        return self.rewards[-1]

    @property
    def finish_reason(self) -> str:
        return self.results[-1].finish_reason

    def describe(self) -> str:
        """One line for `selar run`'s stderr."""
        rewards = ", ".join(f"{r:.3f}" for r in self.rewards)
        return (f"{self.iterations} iterations, rewards [{rewards}], final reward {self.reward:.3f}, "
                f"{self.generations} generations, {self.gradings} gradings, latent prefix {self.prefix_length} "
                f"tokens, {len(self.tokens)} tokens, finish: {self.finish_reason}")

    def summary(self) -> dict:
        """What a response's `selar` field and a bench record carry about the search."""
        return {"iterations": self.iterations, "rewards": [round(r, 6) for r in self.rewards],
                "reward": round(self.reward, 6), "prefix_length": self.prefix_length,
                "generations": self.generations, "gradings": self.gradings}


def final_states(runtime: "Runtime", tokens: Sequence[int], first: int) -> np.ndarray:
    """The final hidden states (what the output layer multiplies) at positions first..len-1 of
    `tokens`, shape (len(tokens) - first, n_embd): the engine's hidden-state output, in a
    context of its own so that the runtime's slots and prompt cache stay as they are."""
    from selar_local.engine import LlamaContext

    n = len(tokens)
    if not 0 <= first < n:
        raise InvalidParameterError(f"final states from position {first} of {n} tokens")
    context = LlamaContext(runtime.model, n_ctx=max(16, n), n_batch=max(16, n), n_threads=runtime.context.n_threads,
                           n_threads_batch=runtime.context.n_threads_batch)
    try:
        context.set_hidden_output(True)  # every input of the batch becomes an output: rows by batch index
        context.decode_tokens(tokens, range(n), [0] * n, [i >= first for i in range(n)])
        return np.stack([context.hidden(i) for i in range(first, n)]).copy()
    finally:
        context.close()


Decode = Callable[[Sequence[Sequence[int]], Sequence[DecodeParams]], list]


def grade(runtime: "Runtime", question: str, answer: str, decode: Decode | None = None) -> float:
    """The model's grading of an answer (greedy, the JSON object its schema allows) as a reward."""
    decode = decode or runtime.generate_batch
    params = runtime.default_params(method="cot", greedy=True, max_tokens=GRADING_TOKENS,
                                    json_schema=ls.SELF_REWARD_SCHEMA)
    grading = decode([runtime.encode(messages=ls.self_reward_messages(question, answer))], [params])[0]
    return ls.self_reward(grading.content)


def latentseek(runtime: "Runtime", question: str, *, messages: Sequence[dict] | None = None, max_tokens: int = 512,
               iterations: int = ls.MAX_ITERATIONS, lr: float = ls.LEARNING_RATE, rho: float = ls.RHO,
               threshold: float = ls.REWARD_THRESHOLD, table: np.ndarray | None = None) -> LatentSeekResult:
    """Search one problem. messages: the chat to answer (default: the question as one user turn);
    table: the output layer (ls.output_table(model file) by default, dequantised here)."""
    ls.check_settings(lr, iterations, rho, threshold)
    messages = list(messages) if messages is not None else [{"role": "user", "content": question}]
    params = runtime.default_params(method="latentseek", greedy=True, max_tokens=max_tokens, latentseek_lr=lr,
                                    latentseek_iterations=iterations, latentseek_rho=rho,
                                    latentseek_threshold=threshold)
    return search(runtime, question, runtime.encode(messages=messages), params, table=table)


def search(runtime: "Runtime", question: str, prompt: Sequence[int], params: DecodeParams, *,
           decode: Decode | None = None, table: np.ndarray | None = None) -> LatentSeekResult:
    """The registry's entry for `--method latentseek`: search the answer to `prompt` (its tokens)
    with the latentseek_* settings of `params`; `question` is what the grading prompt shows.
    Answers decode greedily with params' other fields (max_tokens, stop, ...) as cot. decode:
    how to decode (default runtime.generate_batch; the server passes its scheduler's)."""
    decode = decode or runtime.generate_batch
    iterations, lr = params.latentseek_iterations, params.latentseek_lr
    rho, threshold = params.latentseek_rho, params.latentseek_threshold
    ls.check_settings(lr, iterations, rho, threshold)
    settings = {"lr": lr, "max_iterations": iterations, "rho": rho, "threshold": threshold}
    prompt = list(prompt)
    greedy = params.replace(method="cot", greedy=True)
    first = decode([prompt], [greedy])[0]
    results, rewards = [first], [grade(runtime, question, first.content, decode)]
    tokens, text = list(first.tokens), first.text
    if ls.reward_passes(rewards[0], threshold) or iterations == 0 or not tokens:
        return LatentSeekResult(text, tokens, 0, rewards, 0, 1, 1, results, settings)
    n_prefix = ls.prefix_length(len(tokens), rho)
    # z_t: the final state that produced answer token t (at the position before it)
    z = final_states(runtime, prompt + tokens[:n_prefix - 1], len(prompt) - 1).astype(np.float64)
    table = ls.output_table(runtime.model.path) if table is None else table
    adam, prefix = ls.Adam(lr=lr), np.asarray(tokens[:n_prefix])
    steps = 0
    for steps in range(1, iterations + 1):
        z = adam.step(z, ls.policy_gradient(table, z, prefix, rewards[-1]))
        prefix = ls.prefix_tokens(table, z)
        rest = max(1, params.max_tokens - n_prefix)
        continuation = decode([prompt + prefix.tolist()], [greedy.replace(max_tokens=rest)])[0]
        results.append(continuation)
        tokens = prefix.tolist() + list(continuation.tokens)
        text = runtime.model.detokenize(prefix.tolist()) + continuation.text
        rewards.append(grade(runtime, question, text, decode))
        if ls.reward_passes(rewards[-1], threshold):
            break
    return LatentSeekResult(text, tokens, steps, rewards, n_prefix, 1 + steps, 1 + steps, results, settings)
