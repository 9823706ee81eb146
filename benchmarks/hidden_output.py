"""What reading the final hidden state costs (docs/PERFORMANCE.md, "The hidden state beside
the logits"): LlamaContext.set_hidden_output turns llama.cpp's embeddings output on.

Two costs, both measured in one run and interleaved so that load on a shared machine falls
on every variant alike:
- a switch: the decode step right after set_hidden_output changes the setting (llama.cpp
  builds another graph) against a step with the setting unchanged, on and off;
- a prompt: with hidden output on, llama.cpp makes every input an output, so a prefill
  computes the output layer (and keeps logits) for every prompt token, against the usual
  last-token-only prefill; and what the loop does for a prompt whose last hidden state is read
  (batch_runner.BatchRunner._prefill): all but the last token with it off, then the last
  token alone with it on ("prompt split").

    nice -n 10 python benchmarks/hidden_output.py [--model smollm2-135m-instruct ...] [--reps 15] [--prompt 256]

Prints medians (ms) of process CPU time, which load on a shared machine disturbs far less than
wall time (one thread for decode and prompt by default, so no spinning worker threads are
counted), the wall-time medians beside them, and ratios of medians; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local.engine import LlamaContext, LlamaModel  # noqa: E402
from selar_local.registry import resolve_model  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog while the farmer counts his seventeen sheep "
        "and the river runs past the old mill towards the sea. ")


def median_ms(values: list[tuple[float, float]]) -> tuple[float, float]:
    """(CPU, wall) medians in ms."""
    return tuple(1e3 * statistics.median(v[i] for v in values) for i in (0, 1))


def timed(call) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    call()
    return time.process_time() - cpu, time.perf_counter() - wall


def measure(model_name: str, reps: int, prompt_tokens: int, n_threads: int, n_threads_batch: int) -> dict:
    model = LlamaModel(resolve_model(model_name))
    ctx = LlamaContext(model, n_ctx=prompt_tokens + 64, n_batch=prompt_tokens, n_seq_max=1, n_threads=n_threads,
                       n_threads_batch=n_threads_batch)
    try:
        tokens = (model.tokenize(TEXT * (prompt_tokens // 8 + 1)))[:prompt_tokens]
        n = len(tokens)
        step_token, pos = tokens[-1], n

        def prefill(hidden: bool) -> tuple[float, float]:
            ctx.set_hidden_output(hidden)
            ctx.clear()
            return timed(lambda: ctx.decode_tokens(tokens, range(n), [0] * n, [False] * (n - 1) + [True]))

        def prefill_split() -> tuple[float, float]:
            ctx.set_hidden_output(False)
            ctx.clear()

            def both():
                ctx.decode_tokens(tokens[:-1], range(n - 1), [0] * (n - 1), [False] * (n - 1))
                ctx.set_hidden_output(True)
                ctx.decode_tokens(tokens[-1:], [n - 1], [0], [True])
                ctx.hidden_rows(1)
            return timed(both)

        def step(hidden: bool) -> tuple[tuple[float, float], bool]:
            ctx.truncate_sequence(0, pos)
            switched = ctx.set_hidden_output(hidden)
            return timed(lambda: ctx.decode_tokens([step_token], [pos], [0], [True])), switched

        prefill(False)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in ("step off", "step on", "switch to on", "switch to off",
                                                           "prompt off", "prompt on", "prompt split")}
        for _ in range(reps):
            for hidden in (False, True):  # the steady state: two steps, keep the second
                step(hidden)
                elapsed, switched = step(hidden)
                assert not switched
                times["step on" if hidden else "step off"].append(elapsed)
            for hidden in (False, True):  # each step right after a switch (the state is on here)
                elapsed, switched = step(hidden)
                assert switched
                times["switch to on" if hidden else "switch to off"].append(elapsed)
        for _ in range(max(3, reps // 3)):
            for hidden in (False, True):
                prefill(hidden)  # the switch (if any) and a warm-up, untimed
                times["prompt on" if hidden else "prompt off"].append(prefill(hidden))
            prefill_split()
            times["prompt split"].append(prefill_split())
        return {k: median_ms(v) for k, v in times.items()}
    finally:
        ctx.close()
        model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="registry name or .gguf (repeatable)")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens for the prefill comparison")
    parser.add_argument("--threads", type=int, default=1, help="decode threads")
    parser.add_argument("--threads-batch", type=int, default=1, help="prompt threads")
    args = parser.parse_args()
    models = args.model or ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; threads: decode "
          f"{args.threads}, prompt {args.threads_batch}; medians of {args.reps} (prompts: {max(3, args.reps // 3)})")
    print("| model | step off ms | step on ms | step after a switch to on / to off ms | switch / steady step "
          "| prompt off ms | prompt on ms | prompt on / off | prompt split ms | split / off |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in models:
        r = measure(name, args.reps, args.prompt, args.threads, args.threads_batch)

        def cell(key: str, digits: int = 2) -> str:
            cpu, wall = r[key]
            return f"{cpu:.{digits}f} ({wall:.{digits}f})"

        switch = (r["switch to on"][0] / r["step on"][0] + r["switch to off"][0] / r["step off"][0]) / 2
        print(f"| {name} | {cell('step off')} | {cell('step on')} | {cell('switch to on')} / {cell('switch to off')} "
              f"| {switch:.2f} | {cell('prompt off', 0)} | {cell('prompt on', 0)} "
              f"| {r['prompt on'][0] / r['prompt off'][0]:.2f} ({r['prompt on'][1] / r['prompt off'][1]:.2f}) "
              f"| {cell('prompt split', 0)} | {r['prompt split'][0] / r['prompt off'][0]:.2f} "
              f"({r['prompt split'][1] / r['prompt off'][1]:.2f}) |")
    print(f"CPU time, wall time in parentheses; prompt of {args.prompt} tokens. Load average at end: "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
