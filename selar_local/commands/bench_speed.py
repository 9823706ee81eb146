"""`selar bench-speed`: decode speed against the bare llama_decode loop and `Llama`."""
from __future__ import annotations

import argparse

from selar_local.speed import DEFAULT_MODELS

SECTIONS = ("speed", "ttft", "host", "switch", "rss", "batched")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench-speed", help="measure decode speed, overhead, TTFT, RSS and batching",
        description="Speed benchmark: the bare llama_decode loop, llama-cpp-python's Llama and selar-local "
                    "(cot, selar) on the same model and threads, alternating repetitions, medians and ratios.")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated registry names or .gguf paths (default: the three test models)")
    parser.add_argument("--threads", type=int, default=1,
                        help="n_threads for every contender (default 1: ggml threads spin, so on a busy "
                             "machine fewer threads are faster and steadier)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run (default 128)")
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions (default 5)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="SmolLM2 only, 16 tokens, 2 repetitions, short sections (checks the plumbing)")
    parser.add_argument("--markdown", metavar="FILE", default=None, help="also write the tables as Markdown")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the raw figures as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selar_local import speed

    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"selar bench-speed: unknown section(s): {', '.join(unknown)}")
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    tokens, reps = args.tokens, args.reps
    if args.quick:
        models, tokens, reps = ("smollm2-135m-instruct",), 16, 2
    text = speed.run(models, n_threads=args.threads, n_new=tokens, reps=reps, quick=args.quick,
                     sections=sections, markdown=args.markdown, json_out=args.json)
    print(text)
    return 0
