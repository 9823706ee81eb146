"""`selar steer build --model M`: Fractional Reasoning's steering vectors for a model file."""
from __future__ import annotations

import argparse
import sys

from selar_local.commands.common import add_model_arguments, load_runtime


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "steer", help="Fractional Reasoning: build the steering vectors --method frac applies",
        description="Steering vectors for --method frac (Fractional Reasoning).")
    actions = parser.add_subparsers(dest="steer_action", metavar="ACTION")
    actions.required = True
    build = actions.add_parser(
        "build", help="build a model's steering vectors (cached per model file)",
        description="Put N GSM8K train questions to the model twice, asking once to reason step by step and "
                    "once to answer directly (its own chat template); read every layer's output at the last "
                    "prompt token; per layer keep the mean difference plus its sign-aligned first principal "
                    "component, and the typical size of the layer's update (its output minus the layer below's). Cached per model file (sha256); an "
                    "interrupted build resumes.")
    from selar_local.steering import DEFAULT_PAIRS

    build.add_argument("--pairs", type=int, default=DEFAULT_PAIRS, help="question pairs (default %(default)s)")
    build.add_argument("--questions", metavar="JSONL", default=None,
                       help="JSON lines with a 'question' field (default: the shipped first 1024 GSM8K train lines)")
    build.add_argument("--refresh", action="store_true", help="build again even if the cache has the vectors")
    add_model_arguments(build)
    build.set_defaults(func=build_command)


def build_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from selar_local import steering

    runtime = load_runtime(args)
    bar = tqdm(total=args.pairs, desc="steering pairs", unit="pair", dynamic_ncols=True, file=sys.stderr)

    def show(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        built = steering.build(runtime, n_pairs=args.pairs, questions_file=args.questions, refresh=args.refresh,
                               progress=show)
    finally:
        bar.close()
        runtime.close()
    norms = ", ".join(f"{n:.1f}" for n in built.update_norms[:: max(1, built.n_layer // 6)])
    print(f"{steering.steering_file(built.model_sha256)}: {built.n_layer} layers from {built.n_pairs} pairs; "
          f"typical layer update norms {norms} ...")
    return 0
