"""How well the model's self-grading tells its right answers from its wrong ones: LatentSeek's
search only moves when the grading fails, so a grading that passes every answer makes it greedy
cot (docs/BENCHMARKS.md, "LatentSeek").

Grades the first answers of a LatentSeek run folder (each record's `text`, right or wrong
against the gold answer by the bench) with each grader of selar_local/self_grading.py and prints
how many right and wrong answers pass, the rank agreement of reward and correctness (AUC: 0.5 is
chance), how often each check says true on right and on wrong answers, and the tokens a grading
decodes. `json` is the one-object grading LatentSeek shipped with first; `checks` the published
four free-text checks.

    python benchmarks/latentseek_grader.py docs/benchmarks/runs/gsm8k-qwen15-f2-latentseek-json [--graders json,checks] [--balanced N] [--save PREFIX]

Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local import self_grading as sg  # noqa: E402
from selar_local.latentseek import reward_passes  # noqa: E402
from selar_local.latentseek_search import grading_params, grading_prompts  # noqa: E402
from selar_local.bench.datasets import load_problems  # noqa: E402
from selar_local.runtime import load  # noqa: E402


def auc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a right answer > score of a wrong one), ties counted half."""
    right = [s for s, y in zip(scores, labels) if y]
    wrong = [s for s, y in zip(scores, labels) if not y]
    if not right or not wrong:
        return float("nan")
    wins = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong)
    return wins / (len(right) * len(wrong))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a LatentSeek (or any greedy) bench run folder")
    ap.add_argument("--graders", default="json,checks")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--limit", type=int, default=None, help="grade the first N records")
    ap.add_argument("--balanced", type=int, default=None,
                    help="grade the first N right and the first N wrong answers (after --limit)")
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", help="write each grader's texts to SAVE.<grader>.jsonl")
    args = ap.parse_args()

    records = [json.loads(line) for line in open(os.path.join(args.run, "results.jsonl")) if line.strip()]
    records = records[: args.limit] if args.limit else records
    if args.balanced:
        right = [r for r in records if r["correct"]][: args.balanced]
        wrong = [r for r in records if not r["correct"]][: args.balanced]
        records = right + wrong
    questions = {p.id: p.prompt for p in load_problems("gsm8k", split="test")}  # what the bench grades with
    labels = [bool(r["correct"]) for r in records]
    print(f"{len(records)} answers: {sum(labels)} right, {len(labels) - sum(labels)} wrong")
    rt = load(args.model, n_parallel=args.parallel, n_threads=args.threads, n_threads_batch=args.threads,
              cpu_repack=False)
    for name in args.graders.split(","):
        grader = sg.grader_named(name)
        start = time.perf_counter()
        jobs = [(i, tokens) for i, r in enumerate(records)
                for tokens in grading_prompts(rt, grader, questions[r["id"]], r["text"])]
        params = grading_params(rt, grader)
        results = rt.generate_batch([tokens for _, tokens in jobs], [params] * len(jobs))
        texts: dict[int, list[str]] = {}
        for (i, _t), res in zip(jobs, results):
            texts.setdefault(i, []).append(res.content)
        tokens = [len(res.tokens) for res in results]
        rewards = [grader.reward(texts[i]) for i in range(len(records))]
        passed = [reward_passes(x) for x in rewards]  # LatentSeek's threshold, -0.2
        n_right = sum(labels)
        print(f"{name}: right answers passed {sum(p for p, y in zip(passed, labels) if y)}/{n_right}, wrong "
              f"passed {sum(p for p, y in zip(passed, labels) if not y)}/{len(labels) - n_right}, reward AUC "
              f"{auc(rewards, labels):.3f}; tokens per grading: median {np.median(tokens):.0f} per prompt, "
              f"{sum(tokens) / len(records):.0f} in all ({time.perf_counter() - start:.0f} s)")
        verdicts = [grader.verdicts(texts[i]) for i in range(len(records))]
        for c, check in enumerate(grader.check_names):
            ok = [v[c] for v in verdicts]
            print(f"  {check:18s} true on right {sum(o for o, y in zip(ok, labels) if y)}/{n_right}, "
                  f"on wrong {sum(o for o, y in zip(ok, labels) if not y)}/{len(labels) - n_right}")
        if args.save:
            with open(f"{args.save}.{name}.jsonl", "w") as out:
                for r, i in zip(records, range(len(records))):
                    out.write(json.dumps({"id": r["id"], "correct": r["correct"], "reward": rewards[i],
                                          "gradings": texts[i]}) + "\n")
    rt.close()


if __name__ == "__main__":
    main()
