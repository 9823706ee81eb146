"""`selar bench-speed`: decode speed against the bare llama_decode loop and `Llama`."""
from __future__ import annotations

import argparse
import sys

from selar_local.speed import DEFAULT_MODELS

SECTIONS = ("speed", "ttft", "host", "switch", "rss", "batched")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench-speed", help="measure decode speed, overhead, TTFT, RSS and batching",
        description="Speed benchmark: the bare llama_decode loop, llama-cpp-python's Llama and selar-local "
                    "(cot, selar) on the same model and threads, alternating repetitions, medians and ratios.")
    parser.add_argument("--models", default=None,
                        help="comma-separated registry names or .gguf paths (default: the three test models; "
                             "with --quick, SmolLM2 only)")
    parser.add_argument("--threads", type=int, default=1,
                        help="n_threads for every contender (default 1: ggml threads spin, so on a busy "
                             "machine fewer threads are faster and steadier)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per run (default 128; 16 with --quick)")
    parser.add_argument("--reps", type=int, default=None,
                        help="alternating repetitions (default 5; 2 with --quick)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="16 tokens, 2 repetitions, short sections, SmolLM2 unless --models is given "
                             "(checks the plumbing)")
    parser.add_argument("--markdown", metavar="FILE", default=None, help="also write the tables as Markdown")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the raw figures as JSON, saved after each model (the checkpoint)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run from its --json file: models already measured "
                             "there are kept, the rest are run (same settings, build and CPU required)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selar_local import speed

    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"selar bench-speed: unknown section(s): {', '.join(unknown)}")
    models, tokens, reps = (("smollm2-135m-instruct",), 16, 2) if args.quick else (DEFAULT_MODELS, 128, 5)
    tokens = tokens if args.tokens is None else args.tokens
    reps = reps if args.reps is None else args.reps
    if tokens < 1 or reps < 1:
        raise SystemExit("selar bench-speed: --tokens and --reps must be >= 1")
    if args.models is not None:
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    try:
        text = speed.run(models, n_threads=args.threads, n_new=tokens, reps=reps, quick=args.quick,
                         sections=sections, markdown=args.markdown, json_out=args.json, resume=args.resume)
    except speed.CheckpointError as exc:
        raise SystemExit(f"selar bench-speed: {exc}") from None
    except KeyboardInterrupt:
        if not args.json:
            raise
        print(f"interrupted: the models finished so far are saved in {args.json}; continue with the same "
              f"command plus --resume", file=sys.stderr)
        return 130
    print(text)
    return 0
