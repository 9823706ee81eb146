"""Why do latent steps break the text that follows them? (docs/LATENT.md, "Several latent
steps in a row").

`latent_alignment_quality.py` looks at one fed hidden state after a text prefix. The methods
feed several in a row and then decode text after them; this measures both halves, on GSM8K
*test* prompts rendered by the model's chat template, for m latent steps (m = --steps):

1. Inside the model, at each fed input: the residual stream after every layer (llama.cpp's
   `l_out-<il>`, read through the context's graph callback, engine.LayerStates), as a ratio
   to the same layer at the token path's input of the same step (the greedy token fed
   instead). A ratio far above 1 at some layers is an outsized activation (an attention
   sink); near 1 means the fed states are ordinary in size and differ in direction only.
2. After them, the text: the greedy cot answer of the prompt alone (its first --text
   tokens) is fed after [the prompt + m inserted cells], and its next-token distributions
   are compared with those of the same text right after the prompt: top-1 agreement and
   median KL(plain || with cells). The cells are the m aligned hidden states of the latent
   method (ridge W_a, as `latent`), or, as references, m Soft Thinking inputs (the top-20
   expected row of each step) and m of the greedy tokens themselves.

    nice -n 10 python benchmarks/latent_drift.py --model qwen2.5-coder-1.5b-instruct [--prompts 8] [--steps 8] [--text 48]

Asserts nothing; prints two markdown tables.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local.alignment import load_alignment  # noqa: E402
from selar_local.bench.datasets import load_problems  # noqa: E402
from selar_local.engine import LayerStates  # noqa: E402
from selar_local.registry import resolve_model  # noqa: E402
from selar_local.runtime import Runtime  # noqa: E402


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class Probe:
    """One-sequence context whose every decode also leaves each layer's output at its last
    input (LayerStates) and, for a single input, its final hidden state and logits."""

    def __init__(self, rt: Runtime, n_ctx: int):
        self.rt = rt
        self.states = LayerStates(rt.model, n_ctx=n_ctx, n_threads=rt.context.n_threads,
                                  n_threads_batch=rt.context.n_threads_batch)
        self.ctx = self.states.context
        self.pos = 0

    def prompt(self, tokens: list[int]) -> np.ndarray:
        """Prefill from position 0; the logits of the last token."""
        self.states.read(tokens)
        self.pos = len(tokens)
        return self.ctx.logits(len(tokens) - 1).copy()  # by batch position: the prompt's last

    def feed_row(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One input vector at the next position: (layer outputs, final hidden state, logits)."""
        self.ctx.decode_embeddings(row[None, :].astype(np.float32), [self.pos], [0], [True])
        self.pos += 1
        return self.states.layer_outputs, self.states.final_norm.copy(), self.ctx.logits(0).copy()

    def feed_text(self, tokens: list[int]) -> np.ndarray:
        """Teacher-forced text at the next positions: the log-probabilities after each token."""
        n = len(tokens)
        self.ctx.decode_tokens(tokens, range(self.pos, self.pos + n), [0] * n, [True] * n)
        self.pos += n
        return log_softmax(self.ctx.logits_rows(n).copy())


def greedy_text(probe: Probe, prompt: list[int], n: int) -> list[int]:
    logits = probe.prompt(prompt)
    out = []
    for _ in range(n):
        token = int(np.argmax(logits))
        if token in probe.rt.model.eog_ids:
            break
        out.append(token)
        row = probe.rt.table.rows([token])[0]
        _, _, logits = probe.feed_row(row)
    return out


def measure(name: str, prompts: int, steps: int, text: int, threads: int | None):
    rt = Runtime(resolve_model(name), n_ctx=1024, n_threads=threads, n_threads_batch=threads)
    alignment = load_alignment(rt.model_path, "ridge", n_hidden=rt.model.n_embd, progress=True)
    probe = Probe(rt, 1024)
    ratios = {"aligned hidden state": [], "Soft Thinking input": []}  # [prompt][step] -> (n_layer,)
    after = {"aligned hidden state": [], "Soft Thinking input": [], "greedy tokens": []}
    for problem in load_problems("gsm8k", limit=prompts):
        prompt = rt.encode(messages=[{"role": "user", "content": problem.prompt}])
        answer = greedy_text(probe, prompt, text + steps)
        plain_text = answer[:text]
        probe.prompt(prompt)
        reference = probe.feed_text(plain_text)
        # the token path: the greedy answer's first m tokens, fed as rows (their layer norms)
        logits = probe.prompt(prompt)
        token_layers = []
        for token in answer[:steps]:
            layers, _, logits = probe.feed_row(rt.table.rows([token])[0])
            token_layers.append(np.linalg.norm(layers, axis=1))
        for kind in after:
            logits = probe.prompt(prompt)
            hidden = probe.states.final_norm.copy()
            per_step = []
            for s in range(steps):
                if kind == "aligned hidden state":
                    row = alignment.apply(hidden)
                elif kind == "Soft Thinking input":
                    top = np.argsort(-logits)[:20]
                    p = np.exp(log_softmax(logits[top]))
                    row = (p.astype(np.float32) @ rt.table.rows(top.tolist())).astype(np.float32)
                else:
                    row = rt.table.rows([answer[s]])[0]
                layers, hidden, logits = probe.feed_row(row)
                if kind in ratios and s < len(token_layers):
                    per_step.append(np.linalg.norm(layers, axis=1) / np.maximum(token_layers[s], 1e-12))
            if kind in ratios:
                ratios[kind].append(per_step)
            shifted = probe.feed_text(plain_text)
            kl = (np.exp(reference) * (reference - shifted)).sum(axis=1)
            agree = reference.argmax(axis=1) == shifted.argmax(axis=1)
            after[kind].append((agree.mean(), np.median(kl)))
    probe.ctx.close()
    rt.close()
    return ratios, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--text", type=int, default=48, help="tokens of the greedy answer compared after the cells")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    models = args.model or ["qwen2.5-coder-0.5b-instruct"]
    inside, outside = [], []
    for name in models:
        ratios, after = measure(name, args.prompts, args.steps, args.text, args.threads)
        for kind, runs in ratios.items():
            r = np.array([run for run in runs if len(run) == args.steps])  # (prompts, steps, n_layer)
            n_layer = r.shape[2]
            thirds = [range(1, n_layer // 3), range(n_layer // 3, 2 * n_layer // 3), range(2 * n_layer // 3, n_layer)]
            for step in sorted({0, args.steps // 2, args.steps - 1}):
                cells = [f"{np.median(r[:, step, list(t)]):.2f} / {np.max(r[:, step, list(t)]):.2f}" for t in thirds]
                inside.append(f"| {name} | {kind} | {step + 1} | " + " | ".join(cells) + " |")
        for kind, rows in after.items():
            agree = 100 * np.mean([a for a, _ in rows])
            kl = np.median([k for _, k in rows])
            outside.append(f"| {name} | {args.steps} x {kind} | {agree:.0f}% | {kl:.3f} |")
    print("Residual-stream norm at the fed input / at the greedy token's input, same step "
          "(median / max over prompts and the layers of each third):\n")
    print("| model | fed input | step | layers 1/3 | layers 2/3 | layers 3/3 |")
    print("|---|---|---|---|---|---|")
    print("\n".join(inside))
    print(f"\nThe greedy answer's first {args.text} tokens after the prompt and m inserted cells, against right "
          "after the prompt:\n")
    print("| model | cells inserted | top-1 agrees | median KL(plain || with cells), nats |")
    print("|---|---|---|---|")
    print("\n".join(outside))


if __name__ == "__main__":
    main()
