"""LatentSeek with a right reward against sampling with the same reward, at the same budget.

With `--latentseek-grader psrm` the search is told the truth (0: the answer is right, -1: it is
not) and stops at the first right answer; every failed answer costs one more generation, the
greedy rest decoded after a moved latent prefix. The same oracle can stop plain sampling: take the
search's own first (greedy) answer, then fresh sampled cot answers (a `--samples K` cot run of the
same problems) until one is right. Both then cost "generations until the first right answer",
and the question is only which second attempt finds a right answer sooner: a step in latent space
or a new sample. For each budget g (generations at most), this prints the share of problems
solved within g generations and the mean generations spent, for both.

    python benchmarks/latentseek_budget.py docs/benchmarks/runs/gsm8k-qwen15-f2-latentseek-psrm \
        docs/benchmarks/runs/gsm8k-qwen15-f2-maj5-cot [--markdown]

Only problems in both runs count. Asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local.bench.runner import RESULTS_NAME, read_config, read_results  # noqa: E402
from selar_local.self_grading import REFERENCE_GRADER  # noqa: E402


def search_attempts(record: dict) -> list[bool]:
    """Right or wrong, each answer a psrm search decoded: reward 0 is right (it stops there)."""
    return [reward == 0.0 for reward in record["rewards"]]


def solved_within(attempts: list[bool], budget: int) -> tuple[bool, int]:
    """Solved within `budget` generations, and the generations spent (stopping at the first right)."""
    for used, right in enumerate(attempts[:budget], start=1):
        if right:
            return True, used
    return False, min(budget, len(attempts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("search_run", help="a latentseek run folder made with --latentseek-grader psrm")
    parser.add_argument("samples_run", help="a cot run folder made with --samples K on the same problems")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)

    config = read_config(args.search_run)
    if config.params.get("latentseek_grader") != REFERENCE_GRADER:
        parser.error(f"{args.search_run} was not run with --latentseek-grader {REFERENCE_GRADER}")
    searches = {r["id"]: r for r in read_results(os.path.join(args.search_run, RESULTS_NAME))
                if r["method"] == "latentseek" and not r.get("error")}
    samples: dict[str, dict[int, bool]] = defaultdict(dict)
    for r in read_results(os.path.join(args.samples_run, RESULTS_NAME)):
        if r["method"] == "cot" and not r.get("error"):
            samples[r["id"]][int(r.get("sample", 0))] = bool(r["correct"])
    k = max((len(s) for s in samples.values()), default=0)
    common = [i for i in searches if len(samples.get(i, {})) == k]
    if not common or k == 0:
        parser.error("the two runs share no problem (with all its samples)")
    search = {i: search_attempts(searches[i]) for i in common}
    # the search's own first answer, then the K samples in their order
    sampled = {i: [bool(searches[i]["first_correct"])] + [samples[i][s] for s in range(k)] for i in common}
    most = max(1 + k, max(len(a) for a in search.values()))
    def at_budget(attempts: dict[str, list[bool]], budget: int) -> list[float]:
        results = [solved_within(a, budget) for a in attempts.values()]
        return [100 * sum(ok for ok, _ in results) / len(results), sum(used for _, used in results) / len(results)]

    rows = [[budget, *at_budget(search, budget), *(at_budget(sampled, budget) if budget <= 1 + k else (None, None))]
            for budget in range(1, most + 1)]
    header = ["generations at most", "latent steps: solved %", "mean generations",
              "fresh samples: solved %", "mean generations"]
    print(f"{len(common)} problems; the search's first answer right on "
          f"{sum(s[0] for s in sampled.values())}; samples from {args.samples_run} (K = {k})")
    cell = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for b, s_ok, s_gen, c_ok, c_gen in rows:
            print(f"| {b} | {cell(s_ok, '.1f')} | {cell(s_gen, '.2f')} | {cell(c_ok, '.1f')} | {cell(c_gen, '.2f')} |")
    else:
        print("  ".join(header))
        for b, s_ok, s_gen, c_ok, c_gen in rows:
            print(f"{b:>3}  {cell(s_ok, '6.1f')}  {cell(s_gen, '5.2f')}  {cell(c_ok, '6.1f')}  {cell(c_gen, '5.2f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
