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
from selar_local import self_grading
from selar_local.errors import InvalidParameterError
from selar_local.outputs import replay_output
from selar_local.params import DecodeParams

if TYPE_CHECKING:
    from selar_local.generate import GenerationResult
    from selar_local.runtime import Runtime

@dataclass
class LatentSeekResult:
    text: str                   # the final answer
    tokens: list[int]           # its tokens: the latent prefix's argmax tokens, then the greedy rest
    iterations: int             # Adam steps taken (0: the first answer passed its grading)
    rewards: list[float]        # the reward of each answer graded, the first answer's first
    prefix_length: int          # tokens of the latent prefix (0 when no step was taken)
    generations: int            # answers decoded
    gradings: int               # gradings decoded (each is its grader's checks, one decode per prompt)
    grading_tokens: int = 0     # tokens the gradings decoded, all checks together
    results: list["GenerationResult"] = field(default_factory=list, repr=False)  # each decode's result
    settings: dict = field(default_factory=dict)  # what it searched with (a response's `selar` shows them)
    # The final answer's thinking span apart (a thinking model): its reasoning, and the text after
    # the span; answer None without markers (then the whole text is the answer).
    reasoning: str = ""
    answer: str | None = None
    think_tokens: int = 0       # of its tokens, those inside the thinking span

    @property
    def content(self) -> str:
        """What the final answer says after any thinking span: what is graded and returned."""
        return self.text if self.answer is None else self.answer

    @property
    def reward(self) -> float:
        return self.rewards[-1]

    @property
    def first_answer(self) -> str:
        """The greedy cot answer the search started from (its reply content): set against the
        final answer, it says what the search changed."""
        return self.results[0].content

    @property
    def decoded_tokens(self) -> int:
        """Every token the search decoded: its answers' and its gradings'."""
        return sum(r.completion_tokens for r in self.results) + self.grading_tokens

    @property
    def finish_reason(self) -> str:
        return self.results[-1].finish_reason

    def describe(self) -> str:
        """One line for `selar run`'s stderr."""
        rewards = ", ".join(f"{r:.3f}" for r in self.rewards)
        return (f"{self.iterations} iterations, rewards [{rewards}], final reward {self.reward:.3f}, "
                f"{self.generations} generations, {self.gradings} gradings ({self.grading_tokens} tokens), latent prefix {self.prefix_length} "
                f"tokens, {len(self.tokens)} tokens, finish: {self.finish_reason}")

    def summary(self) -> dict:
        """What a response's `selar` field and a bench record carry about the search."""
        return {"iterations": self.iterations, "rewards": [round(r, 6) for r in self.rewards],
                "reward": round(self.reward, 6), "prefix_length": self.prefix_length,
                "generations": self.generations, "gradings": self.gradings,
                "grading_tokens": self.grading_tokens, "first_answer": self.first_answer}


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


def grading_prompts(runtime: "Runtime", grader: self_grading.Grader, question: str, answer: str) -> list[list[int]]:
    """The tokens of each check's prompt: its chat through the model's template, then the
    opening words of its reply."""
    return [runtime.encode(messages=chat) + runtime.model.tokenize(start, add_special=False, parse_special=False)
            for chat, start in zip(grader.messages(question, answer), grader.starts)]


def grading_params(runtime: "Runtime", grader: self_grading.Grader) -> DecodeParams:
    """How every check of `grader` decodes: greedy, its length, its grammar if it has one."""
    return runtime.default_params(method="cot", greedy=True, max_tokens=grader.max_tokens, json_schema=grader.schema)


def grade(runtime: "Runtime", question: str, answer: str, decode: Decode | None = None,
          grader: str = self_grading.DEFAULT_GRADER) -> tuple[float, int]:
    """The model's grading of an answer as a reward, and the tokens it decoded: the grader's
    checks, decoded greedily side by side (selar_local/self_grading.py)."""
    decode = decode or runtime.generate_batch
    checks = self_grading.grader_named(grader)
    params = grading_params(runtime, checks)
    prompts = grading_prompts(runtime, checks, question, answer)
    gradings = decode(prompts, [params] * len(prompts))
    return checks.reward([g.content for g in gradings]), sum(len(g.tokens) for g in gradings)


def latentseek(runtime: "Runtime", question: str, *, messages: Sequence[dict] | None = None, max_tokens: int = 512,
               iterations: int = ls.MAX_ITERATIONS, lr: float = ls.LEARNING_RATE, rho: float = ls.RHO,
               threshold: float = ls.REWARD_THRESHOLD, grader: str = self_grading.DEFAULT_GRADER,
               table: np.ndarray | None = None) -> LatentSeekResult:
    """Search one problem. messages: the chat to answer (default: the question as one user turn);
    table: the output layer (ls.output_table(model file) by default, dequantised here)."""
    ls.check_settings(lr, iterations, rho, threshold)
    messages = list(messages) if messages is not None else [{"role": "user", "content": question}]
    params = runtime.default_params(method="latentseek", greedy=True, max_tokens=max_tokens, latentseek_lr=lr,
                                    latentseek_iterations=iterations, latentseek_rho=rho,
                                    latentseek_threshold=threshold, latentseek_grader=grader)
    return search(runtime, question, runtime.encode(messages=messages), params, table=table)


def continuation_params(runtime: "Runtime", greedy: DecodeParams, prefix: Sequence[int], in_thinking: bool,
                        max_tokens: int) -> DecodeParams:
    """How the rest of a revised answer decodes after its latent prefix: `greedy` with the
    tokens left, and a thinking budget (max_think_tokens) that counts the prefix's thinking
    tokens too, so a revised answer thinks no longer than a first one."""
    budget = greedy.max_think_tokens
    if budget is not None:
        prefix_thinking = replay_output(runtime.model.token_bytes, runtime.thinking_span, in_thinking, prefix)[3]
        budget = max(0, budget - prefix_thinking)
    return greedy.replace(max_tokens=max_tokens, max_think_tokens=budget)


def search(runtime: "Runtime", question: str, prompt: Sequence[int], params: DecodeParams, *,
           decode: Decode | None = None, table: np.ndarray | None = None,
           reference: Callable[[str], bool] | None = None) -> LatentSeekResult:
    """The registry's entry for `--method latentseek`: search the answer to `prompt` (its tokens)
    with the latentseek_* settings of `params`; `question` is what the grading prompt shows.
    Answers decode greedily with params' other fields (max_tokens, stop, ...) as cot. decode:
    how to decode (default runtime.generate_batch; the server passes its scheduler's).
    reference: for the `psrm` grader, whether an answer is the reference answer (`selar bench`
    passes its grading against the data set's)."""
    decode = decode or runtime.generate_batch
    iterations, lr = params.latentseek_iterations, params.latentseek_lr
    rho, threshold = params.latentseek_rho, params.latentseek_threshold
    ls.check_settings(lr, iterations, rho, threshold)
    grader = params.latentseek_grader
    if grader == self_grading.REFERENCE_GRADER:
        if reference is None:
            raise InvalidParameterError(
                f"latentseek_grader '{grader}' rewards an answer by the problem's reference answer, which only "
                f"`selar bench` has; use {' or '.join(self_grading.GRADERS)} (the model grades its own answer)")

        def grade_answer(answer: str) -> tuple[float, int]:
            return self_grading.reference_reward(reference(answer)), 0
    else:
        def grade_answer(answer: str) -> tuple[float, int]:
            return grade(runtime, question, answer, decode, grader)
    settings = {"lr": lr, "max_iterations": iterations, "rho": rho, "threshold": threshold, "grader": grader}
    prompt = list(prompt)
    greedy = params.replace(method="cot", greedy=True)
    first = decode([prompt], [greedy])[0]
    reward, grading_tokens = grade_answer(first.content)
    results, rewards = [first], [reward]
    tokens, text = list(first.tokens), first.text
    if ls.reward_passes(rewards[0], threshold) or iterations == 0 or not tokens:
        return LatentSeekResult(text, tokens, 0, rewards, 0, 1, 1, grading_tokens, results, settings,
                                reasoning=first.reasoning, answer=first.answer, think_tokens=first.think_tokens)
    n_prefix = ls.prefix_length(len(tokens), rho)
    # z_t: the final state that produced answer token t (at the position before it)
    z = final_states(runtime, prompt + tokens[:n_prefix - 1], len(prompt) - 1).astype(np.float64)
    table = ls.output_table(runtime.model.path) if table is None else table
    adam, prefix = ls.Adam(lr=lr), np.asarray(tokens[:n_prefix])
    in_thinking = bool(runtime.thinking_at_end(prompt))
    steps = 0
    for steps in range(1, iterations + 1):
        z = adam.step(z, ls.policy_gradient(table, z, prefix, rewards[-1]))
        prefix = ls.prefix_tokens(table, z)
        rest = max(1, params.max_tokens - n_prefix)
        continuation = decode([prompt + prefix.tolist()], [continuation_params(runtime, greedy, prefix.tolist(),
                                                                                in_thinking, rest)])[0]
        results.append(continuation)
        tokens = prefix.tolist() + list(continuation.tokens)
        # one output, split as the loop would have split it had it decoded the prefix too
        text, reasoning, answer, think_tokens = replay_output(runtime.model.token_bytes, runtime.thinking_span,
                                                              in_thinking, tokens, params.stop + runtime.stop_strings)
        reward, spent = grade_answer(text if answer is None else answer)
        rewards.append(reward)
        grading_tokens += spent
        if ls.reward_passes(rewards[-1], threshold):
            break
    return LatentSeekResult(text, tokens, steps, rewards, n_prefix, 1 + steps, 1 + steps, grading_tokens, results,
                            settings, reasoning=reasoning, answer=answer, think_tokens=think_tokens)
