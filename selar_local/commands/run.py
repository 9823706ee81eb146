"""`selar run "question"`: stream one answer, optionally writing a per-step trace."""
from __future__ import annotations

import argparse
import json
import sys
import time

from selar_local.commands.common import (
    add_decode_arguments,
    add_model_arguments,
    load_runtime,
    params_from_args,
    wants_auto_tau,
)

SOFT_STYLE, RESET = "\033[36m", "\033[0m"  # soft-step tokens in cyan on a terminal


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="answer one question, streaming the tokens",
                                   description="Answer one question with SeLaR (or cot/soft/moi), streaming.")
    parser.add_argument("prompt", help="the question (use - to read it from standard input)")
    parser.add_argument("--system", default=None, help="system message for the chat template")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    parser.add_argument("--trace", metavar="FILE", default=None,
                        help="write one JSON line per step (token, soft or not, entropy, top-k ids and weights)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="mark tokens whose next input was soft (default: when writing to a terminal)")
    add_model_arguments(parser)
    add_decode_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    auto = wants_auto_tau(args)
    params = params_from_args(args, **({"tau": 0.5} if auto else {}))  # validate before loading the model
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    runtime = load_runtime(args)
    if auto:
        from selar_local.calibrate import auto_tau

        calibration = auto_tau(runtime, params)
        params = params.replace(tau=calibration.tau)
        print(f"[tau auto] {calibration.tau:.2f} (calibrated soft share {100 * calibration.soft_share:.1f}%)",
              file=sys.stderr)
    if args.raw:
        stream = runtime.stream(prompt, params)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        stream = runtime.stream(params=params, messages=messages)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    trace = open(args.trace, "w", encoding="utf-8") if args.trace else None
    started = time.perf_counter()
    try:
        while True:
            try:
                event = next(stream)
            except StopIteration as done:
                result = done.value
                break
            if event.text:
                sys.stdout.write(f"{SOFT_STYLE}{event.text}{RESET}" if color and event.soft else event.text)
                sys.stdout.flush()
            if trace:
                trace.write(json.dumps(event.trace_record(runtime.model.token_text(event.token))) + "\n")
    finally:
        if trace:
            trace.close()
    elapsed = time.perf_counter() - started
    sys.stdout.write("\n")
    print(
        f"[{params.method}] {result.completion_tokens} tokens, {result.soft_steps} soft steps "
        f"({100 * result.soft_share:.1f}%), {result.tokens_per_second:.1f} tokens/s, "
        f"prompt {result.prompt_tokens} tokens, {elapsed:.2f} s, finish: {result.finish_reason}",
        file=sys.stderr,
    )
    return 0
