"""Speed benchmark: selar-local against the physical limit of its own stack.

Everything runs in one process per model, on the same weights and the same number of
threads, with the contenders alternating inside each repetition (the order rotates
from one repetition to the next) so that background load hits all of them alike.
Ratios are taken within a repetition and then their median is reported.

Contenders (128 new tokens from the same prompt tokens):
- bare:   a minimal llama_decode loop written against llama_cpp's ctypes bindings
          directly: one token per step, one preallocated batch, logits read as a view,
          greedy argmax. Nothing can decode faster through these bindings.
- Llama:  llama-cpp-python's high-level `Llama.generate` (greedy), verbose=False.
- cot:    selar-local, chain of thought, greedy.
- selar-greedy / selar: SeLaR with the published defaults, greedy shown token / sampled.

Plus time to first token on a ~500-token prompt, peak RSS (separate subprocesses),
batched aggregate tokens/s at n_parallel 1/4/8, per-step host overhead (everything but
llama_decode) with its breakdown, and the cost of switching between token and
embedding batches. It is a benchmark, not a test: it asserts nothing about speed.

    selar bench-speed --models smollm2-135m-instruct --threads 1 --markdown out.md
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

DEFAULT_MODELS = ("smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct")
PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather, the keeper's daily routine and the mystery, step by step.")
LONG_PROMPT_TOKENS = 500
N_CTX = 1024


# -- helpers ------------------------------------------------------------------------------
def median(values) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover - Windows
        return (float("nan"),) * 3


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(n_threads: int) -> dict:
    from selar_local.runtime import build_info

    info = build_info()
    return {
        "llama_cpp": info.summary,
        "system_info": info.system_info,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "n_threads": n_threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def long_prompt_tokens(model, n: int = LONG_PROMPT_TOKENS) -> list[int]:
    """About n tokens of ordinary prose (repeated, numbered paragraphs)."""
    tokens: list[int] = []
    k = 0
    while len(tokens) < n:
        k += 1
        tokens = model.tokenize(" ".join(
            f"Paragraph {i}: the keeper climbed the stairs, trimmed the wick and logged the ships that passed."
            for i in range(1, k + 1)), add_special=True)
    return tokens[:n]


# -- the bare loop ------------------------------------------------------------------------
class BareLoop:
    """The physical limit: llama_decode through llama_cpp's ctypes bindings and nothing
    else. Shares the weights of an already loaded model, owns its context and batch."""

    def __init__(self, model_handle, n_vocab: int, n_threads: int, n_ctx: int = N_CTX, n_batch: int = 512):
        import llama_cpp as L

        self.L = L
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        self.ctx = L.llama_init_from_model(model_handle, params)
        if not self.ctx:
            raise RuntimeError("bare loop: llama_init_from_model failed")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.n_vocab = n_vocab

    def _fill(self, tokens, start: int) -> None:
        b = self.batch
        n = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 0
        b.logits[n - 1] = 1
        b.n_tokens = n

    def run(self, prompt: list[int], n_new: int, stamps: list[float] | None = None) -> list[int]:
        """Prefill, then n_new greedy tokens; stamps[i] = time token i was known."""
        L, ctx, b = self.L, self.ctx, self.batch
        L.llama_memory_clear(self.mem, True)
        for start in range(0, len(prompt), self.n_batch):
            self._fill(prompt[start:start + self.n_batch], start)
            if L.llama_decode(ctx, b) != 0:
                raise RuntimeError("bare loop: decode failed")
        decode, get_logits, as_array = L.llama_decode, L.llama_get_logits_ith, np.ctypeslib.as_array
        shape = (self.n_vocab,)
        token_arr, pos_arr, logits_flag = b.token, b.pos, b.logits
        self._fill([0], 0)  # one-token batch from now on: only token and pos change
        logits_flag[0] = 1
        pos = len(prompt)
        out = []
        clock, cpu = time.perf_counter, time.process_time
        for _ in range(n_new):
            tok = int(as_array(get_logits(ctx, -1), shape=shape).argmax())
            out.append(tok)
            if stamps is not None:
                stamps.append((clock(), cpu()))
            token_arr[0] = tok
            pos_arr[0] = pos
            pos += 1
            if decode(ctx, b) != 0:
                raise RuntimeError("bare loop: decode failed")
        return out

    def close(self) -> None:
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None


# -- contenders ---------------------------------------------------------------------------
def _rate(stamps: list[tuple[float, float]], which: int = 0) -> float:
    """Decode tokens/s from the (wall, process CPU) times each token became known,
    TTFT excluded. which=1: per CPU second, which background load barely moves."""
    if len(stamps) < 2:
        return float("nan")
    return (len(stamps) - 1) / (stamps[-1][which] - stamps[0][which])


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _result(stamps, t0: float, tokens, **extra) -> dict:
    return {"tps": _rate(stamps), "cpu_tps": _rate(stamps, 1), "ttft": stamps[0][0] - t0, "tokens": tokens, **extra}


def run_bare(bare: BareLoop, prompt, n_new) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = bare.run(prompt, n_new, stamps)
    return _result(stamps, t0, tokens)


def run_llama(llm, prompt, n_new) -> dict:
    llm.reset()
    t0 = time.perf_counter()
    stamps, tokens = [], []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=False):
        stamps.append(_stamp())
        tokens.append(tok)
        if len(tokens) >= n_new:
            break
    return _result(stamps, t0, tokens)


def run_selar_local(rt, prompt, params) -> dict:
    from selar_local.generate import stream_tokens

    t0 = time.perf_counter()
    stamps = []
    stream = stream_tokens(rt, prompt, params)
    while True:
        try:
            next(stream)
        except StopIteration as done:
            result = done.value
            break
        stamps.append(_stamp())
    return _result(stamps, t0, result.tokens, soft=result.soft_steps)


def open_llama(path, n_threads: int, n_ctx: int = N_CTX):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=n_threads,
                 n_threads_batch=n_threads, n_gpu_layers=-1, verbose=False)


# -- host overhead ------------------------------------------------------------------------
class DecodeTimer:
    """Wraps a LlamaContext's decode to add up the wall and thread-CPU time spent inside
    llama_decode (with n_threads=1 ggml computes on the calling thread)."""

    def __init__(self, context):
        self.context = context
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.calls = 0
        self._inner = type(context)._decode

    def __enter__(self):
        inner, context, clock, cpu = self._inner, self.context, time.perf_counter, time.thread_time

        def timed(batch, n):
            t, c = clock(), cpu()
            try:
                inner(context, batch, n)
            finally:
                self.seconds += clock() - t
                self.cpu_seconds += cpu() - c
                self.calls += 1

        context._decode = timed
        return self

    def __exit__(self, *exc):
        del self.context._decode


def host_overhead(rt, prompt, params) -> dict:
    """ms per step spent outside llama_decode, over the decode phase of one generation
    (wall clock, and CPU time of this thread, which preemption does not inflate)."""
    from selar_local.generate import stream_tokens

    stream = stream_tokens(rt, prompt, params)
    next(stream)  # prefill and first step, not counted
    with DecodeTimer(rt.context) as timer:
        t0, c0 = time.perf_counter(), time.thread_time()
        steps = 0
        while True:
            try:
                next(stream)
                steps += 1
            except StopIteration as done:
                result = done.value
                break
        total, total_cpu = time.perf_counter() - t0, time.thread_time() - c0
    steps = max(steps, 1)
    return {"host_ms": 1e3 * (total - timer.seconds) / steps,
            "host_cpu_ms": 1e3 * (total_cpu - timer.cpu_seconds) / steps,
            "decode_ms": 1e3 * timer.seconds / max(timer.calls, 1), "steps": steps, "soft": result.soft_steps}


def host_only(rt, prompt, params, steps: int = 256) -> dict:
    """The loop with llama_decode replaced by a no-op after two real steps (the logits
    stay those of the last real decode, so every step repeats the same decision): the
    per-step cost of selar-local's own Python and NumPy work, free of decode noise."""
    from selar_local.generate import stream_tokens

    stream = stream_tokens(rt, prompt, params.replace(max_tokens=steps + 2))
    next(stream)
    next(stream)
    rt.context._decode = lambda batch, n: None
    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        done = 0
        for _ in stream:
            done += 1
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    finally:
        del rt.context._decode
        rt.context.remove_sequence(0)
    done = max(done, 1)
    return {"host_ms": 1e3 * wall / done, "host_cpu_ms": 1e3 * cpu / done, "steps": done}


def _time_call(fn: Callable, repeat: int) -> float:
    """Median microseconds of fn() over `repeat` calls (one timer per call)."""
    clock = time.perf_counter
    samples = []
    for _ in range(repeat):
        t = clock()
        fn()
        samples.append(clock() - t)
    return 1e6 * statistics.median(samples)


def overhead_profile(rt, prompt, params, repeat: int = 200) -> dict[str, float]:
    """Median microseconds of each piece of one step, on logits captured from a real run."""
    from selar_local import sampling
    from selar_local.generate import _TextStream
    from selar_local.policies import contrastive_weights, make_policy

    logits, _ = _prefill_alone(rt.context, prompt)
    logits = logits.astype(np.float32)  # a copy: the prompt's last logits, a real step's input
    rt.context.remove_sequence(0)
    p = params
    dist = sampling.filter_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p)
    ids, q, h = sampling.normalized_topk(dist, p.ks)
    rng = np.random.default_rng(0)
    policy = make_policy(params, rt.token_info)
    table = rt.table
    row = np.empty(rt.model.n_embd_inp, dtype=np.float32)
    w = contrastive_weights(q.copy(), p.lam * 0.8)
    decision = policy.step(logits)
    text = _TextStream(())
    token = int(ids[0])
    piece = rt.model.token_bytes(token)
    from selar_local import generate as g

    event_maker = getattr(g, "_event", None)
    out = {
        "top-k select (argpartition)": _time_call(lambda: sampling.top_candidates(logits, p.top_k), repeat),
        "filter (temp/top-k/top-p/min-p)": _time_call(
            lambda: sampling.filter_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p), repeat),
        "normalised top-k entropy": _time_call(lambda: sampling.normalized_topk(dist, p.ks), repeat),
        "sample (one uniform)": _time_call(lambda: sampling.sample(dist, rng), repeat),
        "contrastive weights": _time_call(lambda: contrastive_weights(q.copy(), 0.8), repeat),
        "policy.step (all of the above)": _time_call(lambda: policy.step(logits), repeat),
        "soft row mix (k rows, cached)": _time_call(lambda: table.mix(ids, w, out=row), repeat)
        if table is not None else float("nan"),
        "text stream push": _time_call(lambda: text.push(piece), repeat),
        "logits view": _time_call(lambda: rt.context.logits(-1), repeat),
    }
    if event_maker is not None:
        out["event object"] = _time_call(lambda: event_maker(0, 1, decision, "x", decision.soft, None), repeat)
    return out


def _prefill_alone(ctx, prompt) -> tuple[np.ndarray, int]:
    """Sequence 0 holds exactly `prompt`: its last logits and the next position."""
    ctx.remove_sequence(0)
    ctx.decode_tokens(prompt, range(len(prompt)), [0] * len(prompt), [False] * (len(prompt) - 1) + [True])
    return ctx.logits(-1), len(prompt)


def after_decode_profile(rt, prompt, params, samples: int = 40) -> dict[str, float]:
    """Median microseconds of step pieces timed right after a real llama_decode, and again
    at once (warm). A decode streams the whole model through the caches and evicts the
    code of the Python/NumPy step: every distinct code path then pays a first-call penalty
    that warm micro-benchmarks never see. The bare loop pays it once (its argmax)."""
    from selar_local import sampling
    from selar_local.policies import make_policy

    ctx = rt.context
    policy = make_policy(params, rt.token_info)
    p = params
    scratch = np.zeros(rt.model.n_vocab, dtype=np.float32)  # not the logits: the same code, other data
    pieces: dict[str, Callable[[np.ndarray], object]] = {
        "first NumPy call, other data (max)": lambda lg: scratch.max(),
        "argmax over the logits (the bare loop's step)": lambda lg: lg.argmax(),
        "top-k select": lambda lg: sampling.top_candidates(lg, p.top_k),
        "filter (temp/top-k/top-p/min-p)": lambda lg: sampling.filter_logits(lg, p.temperature, p.top_k, p.top_p,
                                                                           p.min_p),
        "policy.step (selar sampled)": lambda lg: policy.step(lg),
    }
    cold: dict[str, list[float]] = {k: [] for k in pieces}
    warm: dict[str, list[float]] = {k: [] for k in pieces}
    clock = time.perf_counter
    logits, pos = _prefill_alone(ctx, prompt)
    names = list(pieces)
    for i in range(samples * len(names)):
        if pos >= ctx.n_ctx:
            logits, pos = _prefill_alone(ctx, prompt)
        ctx.decode_tokens((int(logits.argmax()),), (pos,), (0,), (True,))
        pos += 1
        logits = ctx.logits(0)
        name = names[i % len(names)]
        t0 = clock()
        pieces[name](logits)
        t1 = clock()
        pieces[name](logits)
        t2 = clock()
        cold[name].append(t1 - t0)
        warm[name].append(t2 - t1)
    ctx.remove_sequence(0)
    out = {}
    for name in names:
        out[f"{name}: after decode"] = 1e6 * median(cold[name])
        out[f"{name}: warm"] = 1e6 * median(warm[name])
    return out


def cprofile_steps(rt, prompt, params, top: int = 14) -> list[tuple[str, int, float, float]]:
    """cProfile of a generation's steps: (function, calls, total ms, ms per step)."""
    import cProfile
    import pstats

    from selar_local.generate import stream_tokens

    stream = stream_tokens(rt, prompt, params)
    next(stream)
    prof = cProfile.Profile()
    steps = 0
    prof.enable()
    try:
        for _ in stream:
            steps += 1
    finally:
        prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (filename, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
        where = f"{os.path.basename(filename)}:{name}" if line else name
        rows.append((where, nc, 1e3 * tt, 1e3 * tt / max(steps, 1)))
    rows.sort(key=lambda r: -r[2])
    return rows[:top]


def input_kind_switching(rt, prompt, n_steps: int, reps: int) -> dict[str, float]:
    """ms/step of decoding n_steps greedy steps fed as tokens only, as embedding rows
    only, and alternating between the two (llama.cpp rebuilds its graph on a switch)."""
    ctx, table = rt.context, rt.table
    if table is None:
        return {}

    def one(mode: str) -> float:
        logits, pos = _prefill_alone(ctx, prompt)
        t0 = time.perf_counter()
        for i in range(n_steps):
            tok = int(logits.argmax())
            as_row = mode == "embeddings" or (mode == "alternating" and i % 2)
            if as_row:
                buf = ctx.embedding_buffer(1)
                buf[0] = table.rows((tok,))[0]
                ctx.decode_embedding_buffer(1, (pos,), (0,), (True,))
            else:
                ctx.decode_tokens((tok,), (pos,), (0,), (True,))
            pos += 1
            logits = ctx.logits(-1)
        elapsed = time.perf_counter() - t0
        ctx.remove_sequence(0)
        return 1e3 * elapsed / n_steps

    modes = ("tokens", "embeddings", "alternating")
    samples = {m: [] for m in modes}
    for r in range(reps):
        for m in modes[r % 3:] + modes[:r % 3]:
            samples[m].append(one(m))
    return {m: median(v) for m, v in samples.items()}


# -- peak RSS (subprocesses) --------------------------------------------------------------
def _peak_rss_kib() -> int:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def rss_child(kind: str, path: str, n_threads: int, n_new: int) -> None:
    """Entry point of the RSS subprocesses: load, generate n_new tokens, print peak RSS."""
    if kind == "llama":
        llm = open_llama(path, n_threads)
        prompt = llm.tokenize(PROMPT.encode(), add_bos=True)
        run_llama(llm, prompt, n_new)
    else:
        from selar_local.params import DecodeParams
        from selar_local.runtime import Runtime

        rt = Runtime(path, n_ctx=N_CTX, n_threads=n_threads, n_threads_batch=n_threads, prompt_cache=False)
        prompt = rt.model.tokenize(PROMPT, add_special=True)
        run_selar_local(rt, prompt, DecodeParams(method="selar", max_tokens=n_new))
    print(json.dumps({"kind": kind, "peak_rss_kib": _peak_rss_kib()}))


def peak_rss(path, n_threads: int, n_new: int, reps: int) -> dict[str, float]:
    samples = {"llama": [], "selar-local": []}
    for r in range(reps):
        for kind in (("llama", "selar-local") if r % 2 == 0 else ("selar-local", "llama")):
            proc = subprocess.run(
                [sys.executable, "-c",
                 "import sys; from selar_local.speed import rss_child; "
                 "rss_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))",
                 kind, str(path), str(n_threads), str(n_new)],
                capture_output=True, text=True, check=True)
            samples[kind].append(json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_kib"] / 1024)
    return {k: median(v) for k, v in samples.items()}


# -- batched ------------------------------------------------------------------------------
def batched_throughput(path, n_threads: int, n_new: int, levels=(1, 4, 8), reps: int = 2) -> dict[int, float]:
    """Aggregate generated tokens/s of n sequences decoded together (selar, sampled,
    seeds 41.. so the sequences differ), wall time including their short prefills."""
    from selar_local.params import DecodeParams
    from selar_local.runtime import Runtime

    runtimes = {n: Runtime(path, n_ctx=512, n_parallel=n, n_threads=n_threads, n_threads_batch=n_threads)
                for n in levels}
    prompt = runtimes[levels[0]].model.tokenize(PROMPT, add_special=True)
    samples: dict[int, list[float]] = {n: [] for n in levels}
    try:
        for r in range(reps):
            order = list(levels) if r % 2 == 0 else list(reversed(levels))
            for n in order:
                params = [DecodeParams(method="selar", max_tokens=n_new, seed=41 + i) for i in range(n)]
                t0 = time.perf_counter()
                results = runtimes[n].generate_batch([prompt] * n, params)
                elapsed = time.perf_counter() - t0
                samples[n].append(sum(len(x.tokens) for x in results) / elapsed)
    finally:
        for rt in runtimes.values():
            rt.close()
    return {n: median(v) for n, v in samples.items()}


# -- one model ----------------------------------------------------------------------------
@dataclass
class ModelReport:
    name: str
    n_vocab: int
    speed: dict[str, float] = field(default_factory=dict)        # contender -> median tokens/s
    cpu_speed: dict[str, float] = field(default_factory=dict)    # contender -> median tokens per CPU second
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)  # contender -> {vs bare, vs Llama}
    ttft: dict[str, float] = field(default_factory=dict)         # contender -> median ms
    ttft_ratio: float = float("nan")
    prompt_tokens: int = 0
    long_prompt_tokens: int = 0
    soft_steps: float = float("nan")
    host: dict[str, dict[str, float]] = field(default_factory=dict)
    profile: dict[str, float] = field(default_factory=dict)
    after_decode: dict[str, float] = field(default_factory=dict)  # piece -> us, right after a decode / warm
    cprofile: list = field(default_factory=list)
    switching: dict[str, float] = field(default_factory=dict)
    rss_mib: dict[str, float] = field(default_factory=dict)
    batched: dict[int, float] = field(default_factory=dict)
    same_tokens: dict[str, bool] = field(default_factory=dict)
    loadavg: tuple = ()


def bench_model(name: str, *, n_threads: int, n_new: int = 128, reps: int = 5, quick: bool = False,
                sections=("speed", "ttft", "host", "switch", "rss", "batched"), log=print) -> ModelReport:
    from selar_local.params import DecodeParams
    from selar_local.registry import resolve_model
    from selar_local.runtime import Runtime

    path = resolve_model(name)
    rt = Runtime(path, n_ctx=N_CTX, n_threads=n_threads, n_threads_batch=n_threads, prompt_cache=False)
    report = ModelReport(name, rt.model.n_vocab)
    prompt = rt.model.tokenize(PROMPT, add_special=True)
    report.prompt_tokens = len(prompt)
    bare = BareLoop(rt.model._handle, rt.model.n_vocab, n_threads)
    llm = open_llama(path, n_threads)
    greedy_cot = DecodeParams(method="cot", greedy=True, max_tokens=n_new)
    selar_greedy = DecodeParams(method="selar", greedy=True, max_tokens=n_new)
    selar_sampled = DecodeParams(method="selar", max_tokens=n_new)
    contenders: dict[str, Callable[[list[int]], dict]] = {
        "bare loop": lambda pr: run_bare(bare, pr, n_new),
        "Llama (high-level)": lambda pr: run_llama(llm, pr, n_new),
        "selar-local cot greedy": lambda pr: run_selar_local(rt, pr, greedy_cot),
        "selar-local selar greedy": lambda pr: run_selar_local(rt, pr, selar_greedy),
        "selar-local selar sampled": lambda pr: run_selar_local(rt, pr, selar_sampled),
    }
    names = list(contenders)
    try:
        for fn in contenders.values():  # warm-up: page in the weights, build graphs
            fn(prompt[:8])
        if "speed" in sections:
            log(f"[{name}] decode speed: {reps} alternating repetitions of {len(names)} contenders")
            tps: dict[str, list[float]] = {c: [] for c in names}
            ratios: dict[str, dict[str, list[float]]] = {c: {"bare": [], "Llama": [], "bare_cpu": [], "Llama_cpu": []}
                                                         for c in names}
            cpu: dict[str, list[float]] = {c: [] for c in names}
            soft = []
            for r in range(reps):
                order = names[r % len(names):] + names[:r % len(names)]
                this, this_cpu = {}, {}
                for c in order:
                    out = contenders[c](prompt)
                    this[c] = out["tps"]
                    this_cpu[c] = out["cpu_tps"]
                    if c == "selar-local selar sampled":
                        soft.append(out.get("soft", 0))
                    if r == 0:
                        report.same_tokens[c] = out["tokens"][:n_new]
                for c in names:
                    tps[c].append(this[c])
                    ratios[c]["bare"].append(this[c] / this["bare loop"])
                    ratios[c]["Llama"].append(this[c] / this["Llama (high-level)"])
                    cpu[c].append(this_cpu[c])
                    ratios[c]["bare_cpu"].append(this_cpu[c] / this_cpu["bare loop"])
                    ratios[c]["Llama_cpu"].append(this_cpu[c] / this_cpu["Llama (high-level)"])
                log(f"  rep {r + 1}: " + ", ".join(f"{c.split()[-1] if 'selar-local' not in c else c[12:]}="
                                                   f"{this[c]:.1f}" for c in names))
            report.speed = {c: median(v) for c, v in tps.items()}
            report.cpu_speed = {c: median(v) for c, v in cpu.items()}
            report.ratios = {c: {k: median(v) for k, v in d.items()} for c, d in ratios.items()}
            report.soft_steps = median(soft)
            ref = report.same_tokens.get("bare loop", [])
            report.same_tokens = {c: t == ref[:len(t)] and len(t) > 0 for c, t in report.same_tokens.items()
                                  if c in ("Llama (high-level)", "selar-local cot greedy")}
        if "ttft" in sections:
            long = long_prompt_tokens(rt.model, 64 if quick else LONG_PROMPT_TOKENS)
            report.long_prompt_tokens = len(long)
            log(f"[{name}] time to first token, {len(long)}-token prompt")
            ttft = {"bare loop": [], "Llama (high-level)": [], "selar-local cot greedy": []}
            one_token = {
                "bare loop": lambda: run_bare(bare, long, 1),
                "Llama (high-level)": lambda: run_llama(llm, long, 1),
                "selar-local cot greedy": lambda: run_selar_local(rt, long, greedy_cot.replace(max_tokens=1)),
            }
            keys = list(ttft)
            rat = []
            for r in range(reps):
                this = {}
                for c in keys[r % 3:] + keys[:r % 3]:
                    this[c] = one_token[c]()["ttft"]
                    ttft[c].append(1e3 * this[c])
                rat.append(this["selar-local cot greedy"] / this["Llama (high-level)"])
            report.ttft = {c: median(v) for c, v in ttft.items()}
            report.ttft_ratio = median(rat)
        if "host" in sections:
            log(f"[{name}] per-step host overhead")
            for label, params in (("cot greedy", greedy_cot), ("selar greedy", selar_greedy),
                                  ("selar sampled", selar_sampled)):
                runs = [host_overhead(rt, prompt, params) for _ in range(max(3, reps))]
                report.host[label] = {k: median([x[k] for x in runs]) for k in runs[0]}
                alone = [host_only(rt, prompt, params, 64 if quick else 256) for _ in range(max(3, reps))]
                report.host[label]["alone_ms"] = median([x["host_ms"] for x in alone])
                report.host[label]["alone_cpu_ms"] = median([x["host_cpu_ms"] for x in alone])
            report.profile = overhead_profile(rt, prompt, selar_sampled, repeat=100 if quick else 500)
            report.after_decode = after_decode_profile(rt, prompt, selar_sampled, 15 if quick else 40)
            report.cprofile = cprofile_steps(rt, prompt, selar_sampled)
        if "switch" in sections:
            log(f"[{name}] token vs embedding batches")
            report.switching = input_kind_switching(rt, prompt, 32 if quick else n_new, max(3, reps))
    finally:
        bare.close()
        del llm
        rt.close()
    if "rss" in sections:
        log(f"[{name}] peak RSS (subprocesses)")
        report.rss_mib = peak_rss(path, n_threads, 32, 1 if quick else 3)
    if "batched" in sections:
        log(f"[{name}] batched aggregate tokens/s")
        report.batched = batched_throughput(path, n_threads, 32 if quick else n_new,
                                            (1, 4) if quick else (1, 4, 8), 1 if quick else 2)
    report.loadavg = load_average()
    return report


# -- report -------------------------------------------------------------------------------
def _f(value: float, fmt: str = ".1f") -> str:
    return "n/a" if value != value else format(value, fmt)


def render_markdown(reports: list[ModelReport], machine: dict, settings: dict) -> str:
    lines = ["# selar-local speed benchmark", ""]
    lines.append(f"- llama.cpp: {machine['llama_cpp']}")
    lines.append(f"- CPU: {machine['cpu']} ({machine['cpus']} CPUs visible), n_threads = {machine['n_threads']} "
                 "for every contender; no GPU")
    lines.append(f"- Python {machine['python']}, NumPy {machine['numpy']}, {machine['platform']}")
    lines.append(f"- settings: {settings}")
    lines.append("- load average at the end of each model: "
                 + "; ".join(f"{r.name} {' '.join(f'{x:.2f}' for x in r.loadavg)}" for r in reports))
    lines.append("")
    if any(r.speed for r in reports):
        lines += ["## Decode speed (128 new tokens, tokens/s, medians; ratios per repetition, then median)", ""]
        lines.append("| model | vocab | contender | tokens/s | vs bare loop | vs Llama | tokens/CPU-s | "
                     "vs bare (CPU) | vs Llama (CPU) |")
        lines.append("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in reports:
            for c, v in r.speed.items():
                q = r.ratios[c]
                lines.append(f"| {r.name} | {r.n_vocab} | {c} | {_f(v)} | {_f(q['bare'], '.3f')}x | "
                             f"{_f(q['Llama'], '.3f')}x | {_f(r.cpu_speed.get(c, float('nan')))} | "
                             f"{_f(q.get('bare_cpu', float('nan')), '.3f')}x | "
                             f"{_f(q.get('Llama_cpu', float('nan')), '.3f')}x |")
        lines.append("")
        lines.append("Greedy token streams identical to the bare loop's: " + "; ".join(
            f"{r.name}: " + ", ".join(f"{c} {'yes' if ok else 'no'}" for c, ok in r.same_tokens.items())
            for r in reports) + ".")
        lines.append("Soft steps in the sampled selar run (median of 128): " + ", ".join(
            f"{r.name} {_f(r.soft_steps, '.0f')}" for r in reports) + ".")
        lines.append("")
    if any(r.ttft for r in reports):
        lines += ["## Time to first token (ms, medians)", "",
                  "| model | prompt tokens | bare loop | Llama | selar-local | selar-local / Llama |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in reports:
            t = r.ttft
            lines.append(f"| {r.name} | {r.long_prompt_tokens} | {_f(t['bare loop'])} | {_f(t['Llama (high-level)'])} "
                         f"| {_f(t['selar-local cot greedy'])} | {_f(r.ttft_ratio, '.3f')}x |")
        lines.append("")
    if any(r.host for r in reports):
        lines += ["## Per-step host overhead (everything but llama_decode; ms/step, medians)", "",
                  "In the real loop: wall and thread-CPU time outside llama_decode. Host only: the same loop with "
                  "llama_decode replaced by a no-op (same decision every step).", "",
                  "| model | vocab | method | host ms/step (wall) | host ms/step (CPU) | host only (wall) | "
                  "host only (CPU) | llama_decode ms/step | soft steps |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in reports:
            for label, h in r.host.items():
                nan = float("nan")
                lines.append(f"| {r.name} | {r.n_vocab} | {label} | {_f(h['host_ms'], '.3f')} | "
                             f"{_f(h.get('host_cpu_ms', nan), '.3f')} | {_f(h.get('alone_ms', nan), '.3f')} | "
                             f"{_f(h.get('alone_cpu_ms', nan), '.3f')} | "
                             f"{_f(h['decode_ms'], '.2f')} | {_f(h['soft'], '.0f')}/{_f(h['steps'], '.0f')} |")
        lines.append("")
        lines += ["### Where the host time goes (selar sampled, median microseconds per call)", ""]
        keys = list(dict.fromkeys(k for r in reports for k in r.profile))
        lines.append("| piece | " + " | ".join(f"{r.name} ({r.n_vocab})" for r in reports if r.profile) + " |")
        lines.append("|---|" + "---:|" * sum(1 for r in reports if r.profile))
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_f(r.profile.get(k, float('nan'))) for r in reports if r.profile)
                         + " |")
        lines.append("")
        if any(r.after_decode for r in reports):
            lines += ["### The same pieces right after a real llama_decode vs warm (median microseconds)", "",
                      "Timed twice in a row after each decode: the first call runs with the step's code evicted "
                      "by the decode, the second warm.", ""]
            cold_keys = list(dict.fromkeys(k.rsplit(": ", 1)[0] for r in reports for k in r.after_decode))
            shown = [r for r in reports if r.after_decode]
            lines.append("| piece | " + " | ".join(f"{r.name}: after decode | warm" for r in shown) + " |")
            lines.append("|---|" + "---:|---:|" * len(shown))
            for k in cold_keys:
                lines.append(f"| {k} | " + " | ".join(
                    f"{_f(r.after_decode.get(k + ': after decode', float('nan')))} | "
                    f"{_f(r.after_decode.get(k + ': warm', float('nan')))}" for r in shown) + " |")
            lines.append("")
        for r in reports:
            if r.cprofile:
                lines += [f"cProfile, {r.name}, selar sampled (own time; top functions):", "",
                          "| function | calls | total ms | ms/step |", "|---|---:|---:|---:|"]
                for where, calls, total, per in r.cprofile:
                    lines.append(f"| `{where}` | {calls} | {total:.2f} | {per:.4f} |")
                lines.append("")
    if any(r.switching for r in reports):
        lines += ["## Token vs embedding input batches (ms/step, greedy, medians)", "",
                  "| model | tokens only | embeddings only | alternating |", "|---|---:|---:|---:|"]
        for r in reports:
            s = r.switching
            if s:
                lines.append(f"| {r.name} | {_f(s['tokens'], '.2f')} | {_f(s['embeddings'], '.2f')} | "
                             f"{_f(s['alternating'], '.2f')} |")
        lines.append("")
    if any(r.rss_mib for r in reports):
        lines += ["## Peak RSS (separate processes, 32 tokens generated, MiB, medians)", "",
                  "| model | Llama | selar-local | difference |", "|---|---:|---:|---:|"]
        for r in reports:
            m = r.rss_mib
            if m:
                lines.append(f"| {r.name} | {m['llama']:.0f} | {m['selar-local']:.0f} | "
                             f"{100 * (m['selar-local'] / m['llama'] - 1):+.1f}% |")
        lines.append("")
    if any(r.batched for r in reports):
        lines += ["## Batched aggregate tokens/s (selar sampled, one decode per step for all sequences)", ""]
        levels = sorted({n for r in reports for n in r.batched})
        lines.append("| model | " + " | ".join(f"N={n}" for n in levels) + " | " +
                     " | ".join(f"N={n} / N=1" for n in levels if n > 1) + " |")
        lines.append("|---|" + "---:|" * (len(levels) + len([n for n in levels if n > 1])))
        for r in reports:
            b = r.batched
            if b:
                lines.append(f"| {r.name} | " + " | ".join(_f(b.get(n, float('nan'))) for n in levels) + " | " +
                             " | ".join(_f(b.get(n, float('nan')) / b[1], '.2f') + "x" for n in levels if n > 1)
                             + " |")
        lines.append("")
    return "\n".join(lines)


class CheckpointError(ValueError):
    """--resume asked for a checkpoint that does not match this benchmark."""


def report_from_dict(data: dict) -> ModelReport:
    """A ModelReport back from its JSON form (JSON turns int keys into strings and
    tuples into lists)."""
    report = ModelReport(**data)
    report.batched = {int(n): v for n, v in report.batched.items()}
    report.cprofile = [tuple(row) for row in report.cprofile]
    report.loadavg = tuple(report.loadavg)
    return report


def write_checkpoint(path: str, machine: dict, settings: dict, reports: list[ModelReport]) -> None:
    """The figures so far, written atomically: a kill never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"machine": machine, "settings": settings, "models": [r.__dict__ for r in reports]},
                  handle, indent=1, default=str)
    os.replace(tmp, path)


def read_checkpoint(path: str, machine: dict, settings: dict) -> list[ModelReport]:
    """The models a saved run already measured, if it ran the same benchmark on the same
    build and CPU (mixing machines in one table would mislead)."""
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except FileNotFoundError:
        return []
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"--resume: cannot read {path}: {exc}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("models"), list):
        raise CheckpointError(f"--resume: {path} is not a bench-speed JSON file")
    diffs = [f"{k}: {saved.get('settings', {}).get(k)!r} (saved) vs {v!r} (now)"
             for k, v in settings.items() if saved.get("settings", {}).get(k) != v]
    diffs += [f"{k}: {saved.get('machine', {}).get(k)!r} (saved) vs {machine[k]!r} (now)"
              for k in ("llama_cpp", "cpu", "n_threads") if saved.get("machine", {}).get(k) != machine[k]]
    if diffs:
        raise CheckpointError(f"--resume refused: {path} was written by a different benchmark ("
                              + "; ".join(diffs) + "); use another --json file")
    try:
        return [report_from_dict(m) for m in saved["models"]]
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"--resume: {path} holds a malformed model entry: {exc}") from None


def run(models=DEFAULT_MODELS, *, n_threads: int = 1, n_new: int = 128, reps: int = 5, quick: bool = False,
        sections=("speed", "ttft", "host", "switch", "rss", "batched"), markdown: str | None = None,
        json_out: str | None = None, resume: bool = False, log=None) -> str:
    """Benchmark each model in turn. With json_out, the figures are saved after every
    model, so an interrupted run continues with resume=True from the next model."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    machine = machine_info(n_threads)
    settings = {"n_threads": n_threads, "new_tokens": n_new, "repetitions": reps, "n_ctx": N_CTX,
                "quick": quick, "sections": list(sections)}
    if resume and not json_out:
        raise CheckpointError("--resume needs the --json file of the interrupted run")
    done = {r.name: r for r in read_checkpoint(json_out, machine, settings)} if resume else {}
    log(f"{machine['llama_cpp']} | {machine['cpu']} | threads {n_threads} | load {load_average()}")
    reports = []
    for name in models:
        if name in done:
            log(f"[{name}] already measured in {json_out}: kept")
            reports.append(done[name])
        else:
            reports.append(bench_model(name, n_threads=n_threads, n_new=n_new, reps=reps, quick=quick,
                                       sections=sections, log=log))
        if json_out:
            write_checkpoint(json_out, machine, settings, reports)
    text = render_markdown(reports, machine, settings)
    if markdown:
        with open(markdown, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return text
