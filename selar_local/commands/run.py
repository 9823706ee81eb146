"""`selar run "question"`: stream one answer, optionally writing a per-step trace."""
from __future__ import annotations

import argparse
import json
import sys
import time

from selar_local.errors import InvalidParameterError
from selar_local.methods import REGISTRY, is_search
from selar_local.vote import VOTES

from selar_local.commands.common import (
    add_decode_arguments,
    add_model_arguments,
    load_runtime,
    explicit_sampler,
    params_from_args,
    wants_auto_tau,
)

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
    parser.add_argument("--samples", "-k", type=int, default=1,
                        help="latent self-consistency: decode K samples of the prompt together (seeds seed..seed+K-1) "
                             "and print the voted answer (default 1: one streamed answer)")
    parser.add_argument("--vote", choices=VOTES, default="majority",
                        help="how --samples counts answers: one vote per sample (majority, ties to the more "
                             "confident), or each weighed by exp(its mean log-probability) (weighted)")
    parser.add_argument("--answer-format", default="gsm8k", metavar="DATASET",
                        help="how --samples reads and compares answers: gsm8k (the last \\boxed{}, else the last "
                             "number), math (boxed only), gpqa_diamond (option letter) (default %(default)s)")
    parser.add_argument("--frac-alpha-range", metavar="A,B", default=None,
                        help="--method frac with --samples: draw each sample's alpha uniformly in [A, B] (the "
                             "paper: 0,0.15) and vote")
    constraint = parser.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", metavar="FILE", default=None,
                            help="the answer must be JSON matching this JSON Schema file (after any thinking)")
    constraint.add_argument("--grammar", metavar="FILE", default=None,
                            help="the answer must match this GBNF grammar file (llama.cpp's format)")
    add_model_arguments(parser)
    add_decode_arguments(parser)
    parser.set_defaults(func=run)


def _constraint_from_args(args: argparse.Namespace) -> dict:
    """--json-schema / --grammar FILE -> DecodeParams fields (the file's text)."""
    for flag, field in (("json_schema", "json_schema"), ("grammar", "grammar")):
        path = getattr(args, flag, None)
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    return {field: f.read()}
            except OSError as exc:
                option = "--" + flag.replace("_", "-")
                raise InvalidParameterError(f"{option} {path}: cannot read it ({exc.strerror})") from None
    return {}


def run(args: argparse.Namespace) -> int:
    auto = wants_auto_tau(args)
    params = params_from_args(args, **({"tau": 0.5} if auto else {}), vote=args.vote,
                              **_constraint_from_args(args))  # validate before loading the model
    if args.samples < 1:
        raise InvalidParameterError(f"--samples must be >= 1, got {args.samples}")
    if args.vote != "majority" and args.samples < 2:
        raise InvalidParameterError(f"--vote {args.vote} counts the answers of --samples K >= 2")
    alpha_range = _alpha_range(args, params)
    if args.samples > 1 and args.trace:
        raise InvalidParameterError("--trace follows one streamed answer; it cannot be combined with --samples")
    if is_search(params.method) and (args.samples > 1 or args.trace or args.raw):
        raise InvalidParameterError(f"--method {params.method} searches one chat answer: it cannot be combined "
                                    "with --samples, --trace or --raw")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    runtime = load_runtime(args, n_parallel=args.samples)
    params = runtime.sampler.apply(params, explicit_sampler(args))
    if auto:
        from selar_local.calibrate import auto_tau_with_progress

        calibration = auto_tau_with_progress(runtime, params)
        params = params.replace(tau=calibration.tau)
        print(f"[tau auto] {calibration.tau:.2f} (calibrated soft share {100 * calibration.soft_share:.1f}%)",
              file=sys.stderr)
    if args.samples > 1:
        return _run_samples(args, runtime, params, prompt, alpha_range)
    if is_search(params.method):
        return _run_search(args, runtime, params, prompt)
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
                for marker in event.latent:  # latent steps: a marker each, before the token they led to
                    trace.write(json.dumps(marker.trace_record(runtime.model.token_text)) + "\n")
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
        f"{f'{result.latent_steps} latent steps, ' if result.latent_steps else ''}"
        f"{'greedy' if params.greedy else f'seed {params.seed}'}",
        file=sys.stderr,
    )
    return 0


def _alpha_range(args: argparse.Namespace, params) -> tuple[float, float] | None:
    if args.frac_alpha_range is None:
        return None
    if params.method != "frac" or args.samples < 2:
        raise InvalidParameterError("--frac-alpha-range needs --method frac and --samples K >= 2")
    try:
        low, high = (float(x) for x in args.frac_alpha_range.split(","))
    except ValueError:
        raise InvalidParameterError(f"--frac-alpha-range {args.frac_alpha_range!r}: expected two numbers A,B") from None
    from selar_local.steering import alpha_draws

    alpha_draws((low, high), 1, 0)  # the range is checked before the model loads
    return low, high


def _run_samples(args: argparse.Namespace, runtime, params, prompt: str, alpha_range=None) -> int:
    messages = None if args.raw else ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}]
    started = time.perf_counter()
    if alpha_range is not None:
        from selar_local import frac

        vote = frac.generate_samples(runtime, None if messages else prompt, params, messages=messages,
                                     samples=args.samples, alpha_range=alpha_range, dataset=args.answer_format)
    else:
        vote = runtime.generate_samples(None if messages else prompt, params, messages=messages,
                                        samples=args.samples, dataset=args.answer_format)
    elapsed = time.perf_counter() - started
    from selar_local.steering import alpha_draws

    alphas = alpha_draws(alpha_range, args.samples, params.seed) if alpha_range is not None else []
    print(vote.text)
    for i, (r, answer) in enumerate(zip(vote.results, vote.answers)):
        mark = "*" if i == vote.index else " "
        alpha = f", alpha {alphas[i]:.4f}" if alphas else ""
        print(f"{mark}[sample {i}, seed {params.seed + i}{alpha}] answer {answer!r}, {r.completion_tokens} tokens, "
              f"{r.soft_steps} soft, mean log-prob {r.mean_logprob:.3f}, finish: {r.finish_reason}", file=sys.stderr)
    print(f"[{params.method} x {args.samples}] {params.vote} answer {vote.answer!r} ({vote.votes}/{args.samples} votes, "
          f"{vote.voters} samples answered), shown: sample {vote.index}; {elapsed:.2f} s", file=sys.stderr)
    return 0


def _run_search(args: argparse.Namespace, runtime, params, prompt: str) -> int:
    """A search method (latentseek): the final answer on stdout, the search's course on stderr."""
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}]
    template_kwargs = {"enable_thinking": False} if args.no_think else None
    started = time.perf_counter()
    search = REGISTRY[params.method].search_function()
    found = search(runtime, prompt, runtime.encode(messages=messages, template_kwargs=template_kwargs), params)
    print(found.content if args.hide_thinking else found.text)
    print(f"[{params.method}] {found.describe()}; {time.perf_counter() - started:.2f} s", file=sys.stderr)
    return 0
