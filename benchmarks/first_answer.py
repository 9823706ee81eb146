"""The first answer a new user sees: the README's question, decoded as `selar run QUESTION`
decodes it (SeLaR at its defaults: the registry's calibrated tau and the model's sampler),
over several seeds per model, graded with the project's GSM8K grader.

    nice -n 10 python benchmarks/first_answer.py --models qwen2.5-coder-0.5b-instruct,\
qwen2.5-coder-1.5b-instruct --seeds 10 --markdown docs/benchmarks/first_answer.md

A model qualifies as the embedded default when it is right on at least 9 of 10 seeds.
"""
from __future__ import annotations

import argparse
import sys
import time

from selar_local.bench.grading import grade
from selar_local.registry import resolve_model
from selar_local.runtime import load

QUESTION = "A farmer has 17 sheep and buys 5 more, then sells 8. How many sheep does he have?"
GOLD = "14"


def run_model(name: str, seeds: int, threads: int | None) -> dict:
    runtime = load(str(resolve_model(name)), n_threads=threads)
    try:
        params = runtime.default_params()  # what `selar run` uses with no options
        rows = []
        for seed in range(seeds):
            started = time.perf_counter()
            result = runtime.generate(params=params.replace(seed=seed), messages=[{"role": "user", "content": QUESTION}])
            seconds = time.perf_counter() - started
            answer, correct = grade(result.text, GOLD, "gsm8k")
            rows.append({"seed": seed, "answer": answer, "correct": correct, "tokens": len(result.tokens),
                         "soft": result.soft_steps / max(len(result.tokens), 1),
                         "tok_s": len(result.tokens) / seconds})
            print(f"{name} seed {seed}: {answer!r} {'right' if correct else 'WRONG'} "
                  f"({len(result.tokens)} tokens)", file=sys.stderr, flush=True)
        return {"model": name, "tau": params.tau, "tau_source": runtime.sampler.tau_choice(params).describe(),
                "rows": rows}
    finally:
        runtime.close()


def table(results: list[dict]) -> str:
    lines = ["| model | tau (source) | right | answers by seed | soft steps | tokens/s |", "|---|---|---|---|---|---|"]
    for r in results:
        rows = r["rows"]
        right = sum(row["correct"] for row in rows)
        answers = " ".join(str(row["answer"]) for row in rows)
        soft = 100 * sum(row["soft"] for row in rows) / len(rows)
        speed = sum(row["tok_s"] for row in rows) / len(rows)
        lines.append(f"| {r['model']} | {r['tau_source']} | {right}/{len(rows)} | {answers} | {soft:.1f}% | {speed:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct,"
                                            "qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    results = [run_model(name.strip(), args.seeds, args.threads) for name in args.models.split(",") if name.strip()]
    text = table(results)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write(f"Question: {QUESTION} (gold {GOLD}); `selar run` defaults, seeds 0-{args.seeds - 1}.\n\n"
                      + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
