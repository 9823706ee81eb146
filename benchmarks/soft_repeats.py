"""How often the token shown right after a soft step repeats the token shown before it, against
the same rate after a discrete step, per method and model, on GSM8K problems.

A soft step shows its sampled token but feeds the model a mixture (for selar, one pushed away
from the top candidate), so the model never read the token it showed and may emit it again.

    nice -n 10 python benchmarks/soft_repeats.py --models smollm2-135m-instruct,\
qwen2.5-coder-0.5b-instruct --problems 4 --seeds 2 --markdown docs/benchmarks/soft_repeats.md
"""
from __future__ import annotations

import argparse
import sys

from selar_local.bench.datasets import load_problems
from selar_local.bench.runner import problem_prompt
from selar_local.registry import resolve_model
from selar_local.runtime import load


def repeat_counts(tokens: list[int], soft_flags: list[bool]) -> dict[str, int]:
    """Counts of (steps, repeats) for tokens that follow a soft input and a discrete one.
    soft_flags[i] says the input after token i was soft, so token i+1 is the one 'after'."""
    counts = {"after_soft": 0, "repeat_after_soft": 0, "after_discrete": 0, "repeat_after_discrete": 0}
    for i in range(len(tokens) - 1):
        kind = "soft" if soft_flags[i] else "discrete"
        counts[f"after_{kind}"] += 1
        counts[f"repeat_after_{kind}"] += tokens[i + 1] == tokens[i]
    return counts


def measure(name: str, methods: list[str], problems: int, seeds: int, max_tokens: int, threads) -> list[dict]:
    runtime = load(str(resolve_model(name)), n_parallel=4, n_threads=threads)
    try:
        items = load_problems("gsm8k", limit=problems)
        prompts = [problem_prompt(runtime, p) for p in items]
        rows = []
        for method in methods:
            params = [runtime.default_params(method=method, seed=s, max_tokens=max_tokens)
                      for _ in prompts for s in range(seeds)]
            batch = [t for t in prompts for _ in range(seeds)]
            total = {"after_soft": 0, "repeat_after_soft": 0, "after_discrete": 0, "repeat_after_discrete": 0}
            for result in runtime.generate_batch(batch, params):
                for key, value in repeat_counts(list(result.tokens), list(result.soft_flags)).items():
                    total[key] += value
            rows.append({"model": name, "method": method, "tau": params[0].tau, **total})
            print(name, method, total, file=sys.stderr, flush=True)
        return rows
    finally:
        runtime.close()


def table(rows: list[dict]) -> str:
    def rate(n: int, d: int) -> str:
        return f"{n}/{d} ({100 * n / d:.1f}%)" if d else "-"

    lines = ["| model | method | tau | repeats after a soft step | repeats after a discrete step |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['tau']:g} | {rate(r['repeat_after_soft'], r['after_soft'])} "
                     f"| {rate(r['repeat_after_discrete'], r['after_discrete'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--methods", default="selar,soft,moi")
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    rows = [row for name in args.models.split(",") for row in
            measure(name.strip(), args.methods.split(","), args.problems, args.seeds, args.max_tokens, args.threads)]
    text = table(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write(f"GSM8K test problems 1-{args.problems}, seeds 0-{args.seeds - 1}, {args.max_tokens} tokens, "
                      "each model's defaults (registry tau).\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
