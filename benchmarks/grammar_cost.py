"""What the grammar costs per step (docs/PERFORMANCE.md, "Grammar").

1. llama.cpp's grammar sampler alone, on each model's vocabulary, in two states of a JSON
   Schema grammar (after `{`: few tokens allowed; inside a string: most allowed): checking
   the drawn token (one candidate), masking 20 candidates, masking the whole vocabulary.
2. In the real loop (cot sampled and selar with tau 0, a JSON Schema answer): the host time
   the constraint adds per step (adjust + commit), and how often the drawn token was
   rejected and how often the whole vocabulary had to be masked.
Medians of --reps; asserts nothing.

    python benchmarks/grammar_cost.py [--models smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local import constraint  # noqa: E402
from selar_local.engine import GrammarSampler, LlamaModel  # noqa: E402
from selar_local.grammar import schema_to_gbnf  # noqa: E402
from selar_local.params import DecodeParams  # noqa: E402
from selar_local.registry import resolve_model  # noqa: E402
from selar_local.runtime import Runtime  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}},
          "required": ["name", "age", "city"]}
ASK = [{"role": "user", "content": "Describe a person (name, age, city) as JSON."}]


def _ms(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1000


def sampler_costs(model: LlamaModel, reps: int) -> dict[str, float]:
    gbnf = schema_to_gbnf(PERSON)
    out = {}
    rng = np.random.default_rng(0)
    for state, prefix in (("after {", "{"), ("in a string", '{"name": "')):
        g = GrammarSampler(model, gbnf)
        for ch in prefix:  # one character at a time: always a token sequence the grammar takes
            tokens = model.tokenize(ch, add_special=False, parse_special=False)
            for t in tokens:
                g.accept(t)
        some = rng.choice(model.n_vocab, 20, replace=False)
        drawn = int(some[0])
        whole = np.arange(model.n_vocab)
        out[f"{state}: drawn token"] = statistics.median(_ms(lambda: g.allows(drawn), 200) for _ in range(reps))
        out[f"{state}: 20 candidates"] = statistics.median(_ms(lambda: g.allowed_mask(some), 100) for _ in range(reps))
        out[f"{state}: whole vocab"] = statistics.median(_ms(lambda: g.allowed_mask(whole), 3) for _ in range(reps))
        out[f"{state}: allowed share"] = float(g.allowed_mask(whole).mean())
        g.close()
    return out


def loop_costs(rt: Runtime, method: str, reps: int) -> dict[str, float]:
    spent, counts = [0.0], {"steps": 0, "redraw": 0, "whole": 0}
    adjust, commit = constraint.SequenceGrammar.adjust, constraint.SequenceGrammar.commit
    redraw, masked = constraint.redraw, constraint.masked_distribution

    def timed_adjust(self, *a, **k):
        t = time.perf_counter()
        try:
            return adjust(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t
            counts["steps"] += 1

    def timed_commit(self, *a, **k):
        t = time.perf_counter()
        try:
            return commit(self, *a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    def counted_redraw(*a, **k):
        counts["redraw"] += 1
        return redraw(*a, **k)

    def counted_masked(*a, **k):
        counts["whole"] += 1
        return masked(*a, **k)

    constraint.SequenceGrammar.adjust, constraint.SequenceGrammar.commit = timed_adjust, timed_commit
    constraint.redraw, constraint.masked_distribution = counted_redraw, counted_masked
    per_step, free_step = [], []
    try:
        for seed in range(reps):
            params = DecodeParams(method=method, tau=0.0, json_schema=PERSON, max_tokens=60, seed=seed)
            spent[0], before = 0.0, counts["steps"]
            t = time.perf_counter()
            result = rt.generate(messages=ASK, params=params)
            wall = time.perf_counter() - t
            steps = counts["steps"] - before
            per_step.append(spent[0] / steps * 1000)
            free_step.append(wall / max(1, len(result.tokens)) * 1000)
    finally:
        constraint.SequenceGrammar.adjust, constraint.SequenceGrammar.commit = adjust, commit
        constraint.redraw, constraint.masked_distribution = redraw, masked
    return {"grammar ms/step": statistics.median(per_step), "whole step ms": statistics.median(free_step),
            "rejected share": counts["redraw"] / counts["steps"],
            "masked-filter share": counts["whole"] / counts["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    for name in args.models.split(","):
        path = resolve_model(name)
        model = LlamaModel(path, vocab_only=True)
        print(f"## {name} (vocab {model.n_vocab})")
        for key, value in sampler_costs(model, args.reps).items():
            print(f"  sampler {key}: {value:.4f}" + ("" if "share" in key else " ms"))
        model.close()
        rt = Runtime(path, n_ctx=1024)
        for method in ("cot", "selar"):
            for key, value in loop_costs(rt, method, args.reps).items():
                print(f"  loop {method} {key}: {value:.4f}")
        rt.close()


if __name__ == "__main__":
    main()
