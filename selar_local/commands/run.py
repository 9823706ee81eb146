"""`selar run "question"`: stream one answer, optionally writing a per-step trace."""
from __future__ import annotations

import argparse
import json
import sys
import time

from selar_local.commands.common import add_decode_arguments, add_model_arguments, load_runtime, params_from_args

# On a terminal: tokens whose next input was soft in cyan, the thinking span dimmed.
SOFT_STYLE, THINK_STYLE, SOFT_THINK_STYLE, RESET = "\033[36m", "\033[2m", "\033[2;36m", "\033[0m"


def register(subparsers) -> None:
    parser = subparsers.add_parser("run", help="answer one question, streaming the tokens",
                                   description="Answer one question with SeLaR (or cot/soft/moi), streaming.")
    parser.add_argument("prompt", help="the question (use - to read it from standard input)")
    parser.add_argument("--system", default=None, help="system message for the chat template")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    parser.add_argument("--no-think", action="store_true",
                        help="render the chat template with enable_thinking=false (Qwen3-style templates)")
    parser.add_argument("--hide-thinking", action="store_true",
                        help="print only the answer, not the reasoning inside the thinking span")
    parser.add_argument("--trace", metavar="FILE", default=None,
                        help="write one JSON line per step (token, soft or not, entropy, top-k ids and weights)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="mark tokens whose next input was soft (default: when writing to a terminal)")
    add_model_arguments(parser)
    add_decode_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    params = params_from_args(args)  # validate before spending seconds on the model
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    runtime = load_runtime(args)
    if args.raw:
        stream = runtime.stream(prompt, params)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        template_kwargs = {"enable_thinking": False} if args.no_think else None
        if args.no_think and runtime.chat_prompt(messages, template_kwargs=template_kwargs) == runtime.chat_prompt(
                messages, template_kwargs={"enable_thinking": True}):
            print("note: this model's chat template has no enable_thinking switch; --no-think changes nothing",
                  file=sys.stderr)
        stream = runtime.stream(params=params, messages=messages, template_kwargs=template_kwargs)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    trace = open(args.trace, "w", encoding="utf-8") if args.trace else None
    started = time.perf_counter()
    shown_reasoning = False
    try:
        while True:
            try:
                event = next(stream)
            except StopIteration as done:
                result = done.value
                break
            if event.reasoning and not args.hide_thinking:
                style = SOFT_THINK_STYLE if event.soft else THINK_STYLE
                sys.stdout.write(f"{style}{event.reasoning}{RESET}" if color else event.reasoning)
                shown_reasoning = True
            if event.content:
                if shown_reasoning:  # the answer starts on its own paragraph
                    sys.stdout.write("\n\n")
                    shown_reasoning = False
                sys.stdout.write(f"{SOFT_STYLE}{event.content}{RESET}" if color and event.soft else event.content)
            if event.reasoning or event.content:
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
        f"prompt {result.prompt_tokens} tokens, {elapsed:.2f} s, finish: {result.finish_reason}, "
        f"{f'thinking {result.think_tokens} tokens, ' if result.answer is not None else ''}"
        f"{'greedy' if params.greedy else f'seed {params.seed}'}",
        file=sys.stderr,
    )
    return 0
