"""The benchmark runner: (problem, method, seed) work items through `Runtime.generate_batch`,
every finished item appended at once to ``results.jsonl``, resumable after a kill.

Layout of a run folder (``--out runs/NAME``)::

    config.json     what was asked for: data set, problems, methods, seeds, model, decoding
                    parameters. ``--resume`` refuses a different one.
    results.jsonl   one JSON object per finished work item (see `record_for`), appended and
                    flushed as each item finishes; a half-written last line (killed while
                    writing) is cut off on resume.

Work items are ordered seed -> problem -> method, so an interrupted run holds (nearly) the
same problems for every method and its partial numbers stay paired.

Each record keeps a compact per-step trace (entropy rounded to 4 decimals and a string of
``0``/``1`` soft flags) so that the report can plot one problem's entropy trace with its soft
steps marked without loading the model again.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from selar_local.bench.datasets import Problem, load_problems
from selar_local.bench.grading import grade
from selar_local.errors import ContextOverflowError, SelarError
from selar_local.generate import generate_groups
from selar_local.methods import REGISTRY, is_search
from selar_local.params import METHODS, DecodeParams
from selar_local.turns import total_prompt_tokens
from selar_local.vote import sample_seeds

CONFIG_NAME = "config.json"
RESULTS_NAME = "results.jsonl"
LOCK_NAME = ".lock"
CONFIG_VERSION = 1
# Keys of the decoding parameters that vary per work item (not part of the run's params).
PER_ITEM_PARAMS = ("method", "seed")
# How a problem becomes the model's prompt. 1: llama.cpp's built-in template engine (runs made
# before the GGUF's own Jinja template was rendered); 2: the GGUF's Jinja template, as
# transformers renders it (Qwen2.5 and SmolLM2 then get their default system prompts). Runs of
# different formats are neither resumed into each other nor paired in one report table.
PROMPT_FORMAT = 2


# A decoding parameter added after runs were started, whose default is not how those runs were
# decoded: a saved config without the field means the value here (for the runs whose methods
# read it). Other missing fields mean their default, which by rule keeps the old decoding.
PARAMS_BEFORE_RECORDED: dict[str, Any] = {
    "latentseek_grader": "json",  # the only grading before the published four checks became the default
}


def params_as_decoded(params: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """A saved config's params with each field it lacks set as its run decoded it
    (`PARAMS_BEFORE_RECORDED`), so that a resumed run goes on as it started."""
    read = set().union(*(REGISTRY[m].fields for m in methods if m in REGISTRY))
    legacy = {k: v for k, v in PARAMS_BEFORE_RECORDED.items() if k in read and k not in params}
    return {**params, **legacy}


class BenchConfigError(SelarError):
    """A run folder's config is malformed, or --resume was asked with a different config."""


class ResultsFileError(SelarError):
    """results.jsonl has a corrupt line that is not a half-written last line."""


class RunInUseError(SelarError):
    """Another process is running a benchmark in the same run folder."""


try:
    import fcntl

    def _try_lock(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)


@contextlib.contextmanager
def run_folder_lock(run_dir: str | os.PathLike):
    """Exclusive use of a run folder while this process works in it: a second `selar bench`
    on the same folder would redo the same items and interleave its records with ours. The
    operating system releases the lock when the process ends, however it ends."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_NAME, "a+", encoding="utf-8")
    try:
        _try_lock(handle)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise RunInUseError(f"{run_dir} is in use by another selar bench (pid {holder}); wait for it to "
                            f"finish or stop it, then --resume") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchConfig:
    """Everything that decides what a run computes. Two runs with equal configs (and the same
    model file) produce the same work items; `--parallel` and threads are not part of it."""

    dataset: str                  # built-in name or path of a user JSON-lines file
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    params: dict[str, Any]        # DecodeParams fields except method and seed
    model: str                    # as given (registry name or path)
    model_file: str               # file name of the resolved GGUF
    model_size: int               # its size in bytes
    n_ctx: int
    split: str = "test"
    limit: int | None = None
    question_field: str | None = None
    answer_field: str | None = None
    id_field: str | None = None
    problems: int = 0             # number of problems loaded
    problems_sha256: str = ""     # of their ids, prompts and gold answers, in order
    tau_auto: bool = False        # params' tau came from `selar calibrate` (--tau auto)
    tau_source: str = ""          # where params' tau came from: user, registry (and why not), published
    samples: int = 1              # self-consistency: K samples per (problem, method, seed), voted
    prompt_format: int = PROMPT_FORMAT  # how problems become prompts (see PROMPT_FORMAT)
    # Fractional Reasoning's test-time scaling: frac samples draw their alpha in [a, b]
    frac_alpha_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.frac_alpha_range is not None:
            from selar_local.steering import alpha_draws

            if "frac" not in self.methods or self.samples < 2:
                raise BenchConfigError("frac_alpha_range needs the frac method and samples >= 2")
            try:
                alpha_draws(self.frac_alpha_range, 1, 0)  # checks the range
            except SelarError as exc:
                raise BenchConfigError(str(exc)) from None
            object.__setattr__(self, "frac_alpha_range", tuple(float(a) for a in self.frac_alpha_range))
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise BenchConfigError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise BenchConfigError(f"a method is listed twice: {','.join(self.methods)}")
        if not isinstance(self.samples, int) or isinstance(self.samples, bool) or self.samples < 1:
            raise BenchConfigError(f"samples must be an integer >= 1, got {self.samples!r}")
        searches = [m for m in self.methods if is_search(m)]
        if searches and self.samples > 1:
            raise BenchConfigError(f"{', '.join(searches)} searches one answer per item: it cannot be voted over "
                                   f"--samples {self.samples} (compare it with cot maj@K in a run of its own)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise BenchConfigError(f"seeds must be distinct and at least one: {self.seeds}")
        # Canonical form: every DecodeParams field but method/seed, lists for tuples, so that a
        # saved config and a new one compare equal when they mean the same decoding.
        full = self.decode_params(self.methods[0], self.seeds[0]).to_dict()  # validates them
        canonical = {k: (list(v) if isinstance(v, tuple) else v) for k, v in full.items() if k not in PER_ITEM_PARAMS}
        object.__setattr__(self, "params", canonical)

    def decode_params(self, method: str, seed: int) -> DecodeParams:
        if not isinstance(self.params, dict):
            raise BenchConfigError(f"params must be an object, got {type(self.params).__name__}")
        return DecodeParams.from_dict({**self.params, "method": method, "seed": seed})

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIG_VERSION, "dataset": self.dataset, "split": self.split, "limit": self.limit,
            "question_field": self.question_field, "answer_field": self.answer_field, "id_field": self.id_field,
            "problems": self.problems, "problems_sha256": self.problems_sha256,
            "methods": list(self.methods), "seeds": list(self.seeds),
            "model": self.model, "model_file": self.model_file, "model_size": self.model_size,
            "n_ctx": self.n_ctx, "params": dict(self.params), "tau_auto": self.tau_auto,
            "tau_source": self.tau_source, "samples": self.samples, "prompt_format": self.prompt_format,
            "frac_alpha_range": None if self.frac_alpha_range is None else list(self.frac_alpha_range),
        }

    @classmethod
    def from_dict(cls, data: Any, *, where: str = CONFIG_NAME) -> "BenchConfig":
        if not isinstance(data, dict):
            raise BenchConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("version") != CONFIG_VERSION:
            raise BenchConfigError(f"{where}: unsupported config version {data.get('version')!r} "
                                   f"(this selar writes version {CONFIG_VERSION})")
        required = ("dataset", "methods", "seeds", "params", "model", "model_file", "model_size", "n_ctx")
        missing = [k for k in required if k not in data]
        if missing:
            raise BenchConfigError(f"{where}: missing key(s) {', '.join(missing)}")
        try:
            params = data["params"]
            if isinstance(params, dict) and isinstance(data["methods"], list):
                params = params_as_decoded(params, [str(m) for m in data["methods"]])
            return cls(
                dataset=str(data["dataset"]), methods=tuple(data["methods"]),
                seeds=tuple(int(s) for s in data["seeds"]), params=params, model=str(data["model"]),
                model_file=str(data["model_file"]), model_size=int(data["model_size"]), n_ctx=int(data["n_ctx"]),
                split=str(data.get("split", "test")), limit=data.get("limit"),
                question_field=data.get("question_field"), answer_field=data.get("answer_field"),
                id_field=data.get("id_field"), problems=int(data.get("problems", 0)),
                problems_sha256=str(data.get("problems_sha256", "")), tau_auto=bool(data.get("tau_auto", False)),
                tau_source=str(data.get("tau_source", "")), samples=int(data.get("samples", 1)),
                prompt_format=int(data.get("prompt_format", 1)),  # absent: written before format 2
                frac_alpha_range=data.get("frac_alpha_range"),
            )
        except SelarError as exc:
            raise BenchConfigError(f"{where}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise BenchConfigError(f"{where}: malformed value ({exc})") from None


def problems_digest(problems: Sequence[Problem]) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.prompt, p.answer], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def config_differences(saved: BenchConfig, new: BenchConfig) -> list[str]:
    """Human-readable 'key: saved -> new' lines for every field that differs."""
    a, b = saved.to_dict(), new.to_dict()
    out = []
    for key in a:
        if key == "params":
            for pk in sorted(set(a["params"]) | set(b["params"])):
                va, vb = a["params"].get(pk), b["params"].get(pk)
                if _norm(va) != _norm(vb):
                    out.append(f"{pk}: {va!r} (saved) vs {vb!r} (now)")
        elif key in ("model", "tau_source"):
            continue  # the file name and size (and params' tau) decide; how they were named or chosen does not
        elif _norm(a[key]) != _norm(b[key]):
            out.append(f"{key}: {a[key]!r} (saved) vs {b[key]!r} (now)")
    return out


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def read_config(run_dir: str | os.PathLike) -> BenchConfig:
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise BenchConfigError(f"{path} not found: is {run_dir} a `selar bench` run folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BenchConfigError(f"{path} is not valid JSON ({exc}); fix or delete it (and start the run afresh)") from None
    return BenchConfig.from_dict(data, where=str(path))


def write_config(run_dir: str | os.PathLike, config: BenchConfig) -> None:
    path = Path(run_dir) / CONFIG_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Results file
# ---------------------------------------------------------------------------------------------

def item_key(record: dict[str, Any]) -> tuple[str, str, int, int]:
    """(problem, method, seed, sample): `seed` is the work item's seed, `sample` the index of a
    self-consistency sample (decoded with seed + sample; 0 in single-sample runs)."""
    return (str(record["id"]), str(record["method"]), int(record["seed"]), int(record.get("sample", 0)))


def read_results(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """All complete records of a results file, in file order.

    Every record is written as one line ending in a newline, so a kill can only leave a
    partial LAST line (no newline after it). That tail is ignored and, with ``repair``, cut
    off the file (or given its newline if it happens to be complete JSON). A corrupt line
    anywhere else is an error. A duplicated key keeps its first record."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    body, tail = lines[:-1], lines[-1]
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, str, int, int]] = set()

    def parse(line: bytes) -> dict[str, Any]:
        record = json.loads(line)
        if not isinstance(record, dict):
            raise ValueError(f"expected an object, got {type(record).__name__}")
        item_key(record)
        return record

    def keep(record: dict[str, Any]) -> None:
        key = item_key(record)
        if key not in seen:
            seen.add(key)
            records.append(record)

    for number, line in enumerate(body, start=1):
        if not line.strip():
            continue
        try:
            keep(parse(line))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ResultsFileError(f"{path}:{number}: corrupt record ({exc}); only a half-written last "
                                   f"line is repaired automatically: remove or fix that line") from None
    tail_complete = False
    if tail.strip():
        try:
            keep(parse(tail))
            tail_complete = True
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            pass  # cut short by a kill
    if repair and tail:
        if tail_complete:
            with open(path, "ab") as handle:
                handle.write(b"\n")
        else:
            with open(path, "r+b") as handle:
                handle.truncate(len(raw) - len(tail))
    return records


class ResultsWriter:
    """Appends one record per line and flushes it to the OS at once."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def compact_trace(entropies: Sequence[float], soft_flags: Sequence[bool]) -> dict[str, Any]:
    return {
        "entropy": [round(float(h), 4) for h in entropies],
        "soft": "".join("1" if f else "0" for f in soft_flags),
    }


def problem_prompt(runtime, problem: Problem, method: str = "cot") -> list[int]:
    """The tokens a problem is decoded from: its prompt as the user's message, through the
    model's chat template (for latentmas, its roles' turns on it: turns.TurnPrompt)."""
    return runtime.encode(messages=[{"role": "user", "content": problem.prompt}], method=method)


def decoded_with(record: dict, setting: str) -> Any:
    """How a finished item was decoded (`parallel`, `cpu_repack`): what its row records, or what
    rows written before the setting was recorded were decoded with (1 sequence, repacked
    weights). A resumed run goes on with its last row's settings unless told otherwise."""
    before_recorded = {"parallel": 1, "cpu_repack": True}
    value = record.get(setting)
    return before_recorded[setting] if value is None else value


def record_for(problem: Problem, method: str, seed: int, params: DecodeParams, result=None, *,
               error: str | None = None, parallel: int = 1, cpu_repack: bool | None = None,
               wall_seconds: float | None = None, sample: int | None = None) -> dict[str, Any]:
    """One line of results.jsonl. ``result`` is a GenerationResult (None for an error). In a
    self-consistency run, ``sample`` is the sample's index (its seed is params.seed).
    ``parallel`` and ``cpu_repack`` are how the item was decoded, not what was asked for: a
    resumed run may change them (`decoded_with` reads them back)."""
    record: dict[str, Any] = {
        "id": problem.id, "dataset": problem.dataset, "method": method, "seed": seed,
        "gold": problem.answer,
    }
    if sample is not None:
        record["sample"] = sample
    if result is None:
        record.update(text="", extracted=None, correct=False, error=error, completion_tokens=0,
                      prompt_tokens=None, soft_steps=0, finish_reason="error", wall_seconds=0.0,
                      prefill_seconds=0.0, decode_seconds=0.0)
    else:
        # Thinking models: the answer after the span is graded, not the reasoning.
        extracted, correct = grade(result.content, problem.answer, problem.dataset)
        wall = result.prefill_seconds + result.decode_seconds if wall_seconds is None else wall_seconds
        record.update(
            text=result.text, extracted=extracted, correct=bool(correct), error=None,
            completion_tokens=result.completion_tokens, prompt_tokens=result.prompt_tokens,
            soft_steps=result.soft_steps, latent_steps=result.latent_steps, finish_reason=result.finish_reason,
            wall_seconds=round(wall, 4), prefill_seconds=round(result.prefill_seconds, 4),
            decode_seconds=round(result.decode_seconds, 4),
            mean_neff=(round(sum(result.effective_counts) / len(result.effective_counts), 4)
                       if result.effective_counts else None),
            mean_logprob=round(result.mean_logprob, 6),
            trace=compact_trace(result.entropies, getattr(result, "soft_flags", []) or []),
        )
    record["parallel"] = parallel
    if cpu_repack is not None:
        record["cpu_repack"] = cpu_repack
    record["finished_at"] = round(time.time(), 3)
    record["params"] = params.to_dict()
    record["params"]["stop"] = list(params.stop)
    return record


def search_record(problem: Problem, method: str, seed: int, params: DecodeParams, found, *, parallel: int = 1,
                  cpu_repack: bool | None = None, wall_seconds: float = 0.0) -> dict[str, Any]:
    """The record of a search method's item (latentseek): its final answer graded, the timings
    of the answers it decoded, and what the search cost: iterations, rewards, generations and
    gradings (so that it can be set against cot maj@K at K = its mean generations); for a
    search that revises a first answer, that answer graded too (`first_correct`)."""
    record = record_for(problem, method, seed, params, found.results[-1], parallel=parallel, cpu_repack=cpu_repack,
                        wall_seconds=wall_seconds)
    extracted, correct = grade(found.content, problem.answer, problem.dataset)
    record.update(text=found.text, extracted=extracted, correct=bool(correct), completion_tokens=len(found.tokens),
                  prompt_tokens=found.results[0].prompt_tokens,
                  prefill_seconds=round(sum(r.prefill_seconds for r in found.results), 4),
                  decode_seconds=round(sum(r.decode_seconds for r in found.results), 4),
                  decoded_tokens=found.decoded_tokens, **found.summary())
    if "first_answer" in record:  # a search that revises an answer: was the one it started from right?
        record["first_extracted"], first_correct = grade(record["first_answer"], problem.answer, problem.dataset)
        record["first_correct"] = bool(first_correct)
    return record


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkItem:
    problem: Problem
    method: str
    seed: int

    def keys(self, samples: int) -> list[tuple[str, str, int, int]]:
        return [(self.problem.id, self.method, self.seed, i) for i in range(samples)]


def work_items(problems: Sequence[Problem], methods: Sequence[str], seeds: Sequence[int]) -> list[WorkItem]:
    """Seed-major, then problem, then method: partial runs stay paired across methods."""
    return [WorkItem(p, m, s) for s in seeds for p in problems for m in methods]


def load_config_problems(config: BenchConfig, *, data_dir=None) -> list[Problem]:
    return load_problems(config.dataset, split=config.split, limit=config.limit, data_dir=data_dir,
                         question_field=config.question_field, answer_field=config.answer_field,
                         id_field=config.id_field)


class RunningAccuracy:
    """Per-method correct/total counts for the progress bar."""

    def __init__(self, methods: Iterable[str]):
        self.counts = {m: [0, 0] for m in methods}

    def add(self, record: dict[str, Any]) -> None:
        c = self.counts.setdefault(record["method"], [0, 0])
        c[0] += bool(record.get("correct"))
        c[1] += 1

    def postfix(self) -> str:
        return " ".join(f"{m} {c}/{n} ({100 * c / n:.0f}%)" if n else f"{m} -" for m, (c, n) in self.counts.items())


@dataclass
class RunSummary:
    total: int
    already_done: int
    ran: int = 0
    errors: int = 0
    wall_seconds: float = 0.0
    completion_tokens: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)


def prepare_run(run_dir: str | os.PathLike, config: BenchConfig, *, resume: bool, overwrite: bool = False) -> list[dict]:
    """Create or check the run folder; returns the records already there (resume)."""
    run_dir = Path(run_dir)
    config_path, results_path = run_dir / CONFIG_NAME, run_dir / RESULTS_NAME
    has_any = config_path.exists() or results_path.exists()
    if has_any and not resume and not overwrite:
        raise BenchConfigError(f"{run_dir} already holds a run; add --resume to continue it, "
                               f"or --overwrite to discard it and start again")
    if has_any and overwrite and not resume:
        for p in (config_path, results_path):
            if p.exists():
                p.unlink()
        has_any = False
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and config_path.exists():
        saved = read_config(run_dir)
        diffs = config_differences(saved, config)
        if diffs:
            raise BenchConfigError(
                f"--resume refused: {config_path} was written for a different run ("
                + "; ".join(diffs) + "). Repeat the original options, or use a new --out folder")
        return read_results(results_path, repair=True)
    if resume and results_path.exists():
        raise BenchConfigError(f"{results_path} exists but {config_path} does not; cannot tell what the run was")
    write_config(run_dir, config)
    return []


def run_bench(
    runtime,
    config: BenchConfig,
    problems: Sequence[Problem],
    run_dir: str | os.PathLike,
    *,
    done: Sequence[dict] = (),
    parallel: int = 1,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
) -> RunSummary:
    """Run every work item not in ``done``; append each record as it finishes.

    ``runtime`` is a loaded `selar_local.runtime.Runtime` whose ``n_parallel`` >= ``parallel``.
    A KeyboardInterrupt leaves every finished item on disk; resume with the same config.
    """
    for method in config.methods:
        runtime.require_method(method)  # fail before any work, not on the first soft step
    items = work_items(problems, config.methods, config.seeds)
    k = config.samples
    done_keys = {item_key(r) for r in done}
    todo = [it for it in items if not all(key in done_keys for key in it.keys(k))]
    summary = RunSummary(total=len(items) * k, already_done=(len(items) - len(todo)) * k)
    accuracy = RunningAccuracy(config.methods)
    for record in done:
        accuracy.add(record)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=summary.total, initial=summary.already_done, unit="item", dynamic_ncols=True,
                   desc=f"{Path(str(config.dataset)).stem}", smoothing=0.05)
        bar.set_postfix_str(accuracy.postfix(), refresh=False)

    results_path = Path(run_dir) / RESULTS_NAME
    make_record = functools.partial(record_for, parallel=parallel, cpu_repack=runtime.model.cpu_repack)
    started = time.perf_counter()
    prompt_cache: dict[str, list[int]] = {}
    try:
        with ResultsWriter(results_path) as writer:
            def emit(record: dict) -> None:
                writer.write(record)
                accuracy.add(record)
                summary.ran += 1
                summary.completion_tokens += record.get("completion_tokens") or 0
                summary.records.append(record)
                if record.get("error"):
                    summary.errors += 1
                if bar is not None:
                    bar.set_postfix_str(accuracy.postfix(), refresh=False)
                    bar.update(1)
                if on_record is not None:
                    on_record(record)

            runnable: list[tuple[WorkItem, list[int], DecodeParams]] = []
            for it in todo:
                params = config.decode_params(it.method, it.seed)
                key = (it.problem.id, REGISTRY[it.method].turns)
                tokens = prompt_cache.get(key)
                if tokens is None:
                    tokens = problem_prompt(runtime, it.problem, it.method)
                    prompt_cache[key] = tokens
                try:
                    runtime.check_prompt_fits(total_prompt_tokens(tokens))
                except ContextOverflowError as exc:
                    for i, seed in enumerate(sample_seeds(it.seed, k)):
                        emit(make_record(it.problem, it.method, it.seed, params.replace(seed=seed), None,
                                         error=str(exc), sample=i if k > 1 else None))
                    continue
                runnable.append((it, tokens, params))

            searched = [entry for entry in runnable if is_search(entry[0].method)]
            runnable = [entry for entry in runnable if not is_search(entry[0].method)]
            for it, params, found, wall in run_searches(runtime, searched, parallel):
                emit(search_record(it.problem, it.method, it.seed, params, found, parallel=parallel,
                                   cpu_repack=runtime.model.cpu_repack, wall_seconds=wall))

            if config.frac_alpha_range is not None:
                # Each frac sample decodes with its own alpha, and a control vector belongs to the
                # whole context: one generate_batch over every item's samples decodes one round per
                # alpha (generate_by_control_vector), each round `parallel` sequences wide. Sample i
                # of every item of a seed draws the same alpha (frac.sample_params), so a round
                # holds all the items, not one item's one sample.
                from selar_local.frac import sample_params

                drawn = [entry for entry in runnable if entry[0].method == "frac"]
                runnable = [entry for entry in runnable if entry[0].method != "frac"]
                pending: list[tuple[WorkItem, int, DecodeParams, list[int]]] = []
                for it, tokens, params in drawn:
                    for i, member in enumerate(sample_params(params, k, config.frac_alpha_range)):
                        if (it.problem.id, it.method, it.seed, i) not in done_keys:
                            pending.append((it, i, member, tokens))

                def sample_finished(index: int, result) -> None:
                    it, i, sample_params, _ = pending[index]
                    record = make_record(it.problem, it.method, it.seed, sample_params, result, sample=i)
                    emit({**record, "frac_alpha": sample_params.frac_alpha})

                if pending:
                    runtime.generate_batch([tokens for *_, tokens in pending], [p for _, _, p, _ in pending],
                                           on_finish=sample_finished)

            if k == 1:
                # One generate_batch call for everything: it keeps `parallel` sequences live and
                # admits the next item as soon as one finishes (no draining between chunks).
                def finished(index: int, result) -> None:
                    it, _, params = runnable[index]
                    emit(make_record(it.problem, it.method, it.seed, params, result))

                if runnable:
                    runtime.generate_batch([t for _, t, _ in runnable], [p for _, _, p in runnable],
                                           on_finish=finished)
            elif runnable:
                # Self-consistency: each item's K samples decode as one group (prompt prefilled
                # once); a group's records are written when the whole group is done.
                groups = [[p.replace(seed=seed) for seed in sample_seeds(p.seed, k)] for _, _, p in runnable]

                def group_finished(index: int, results) -> None:
                    it = runnable[index][0]
                    for i, (params, result) in enumerate(zip(groups[index], results)):
                        if (it.problem.id, it.method, it.seed, i) not in done_keys:  # a half-written group
                            emit(make_record(it.problem, it.method, it.seed, params, result, sample=i))

                generate_groups(runtime, [t for _, t, _ in runnable], groups, on_finish=group_finished)
    finally:
        summary.wall_seconds = time.perf_counter() - started
        if bar is not None:
            bar.close()
    return summary


def matches_reference(problem: Problem, answer: str) -> bool:
    """Whether `answer` is graded right against the problem's reference answer."""
    return bool(grade(answer, problem.answer, problem.dataset)[1])


def run_searches(runtime, searched: Sequence[tuple[WorkItem, list[int], DecodeParams]], parallel: int):
    """Run the search items (latentseek, textmas), yielding (item, params, found, wall seconds)
    as each one ends. Each search decodes its answers one after the other, so with
    `parallel` > 1 up to `parallel` searches run at once, each in a thread of its own whose
    decodes are requests of one scheduler: they share its batched decodes (200 textmas
    items at --parallel 16 decode about 16 roles at a time, not one)."""
    def one(entry, decode=None):
        it, tokens, params = entry
        search = REGISTRY[it.method].search_function()
        item_started = time.perf_counter()
        found = search(runtime, it.problem.prompt, tokens, params, decode=decode,
                       reference=functools.partial(matches_reference, it.problem))
        return it, params, found, time.perf_counter() - item_started

    if parallel <= 1 or len(searched) <= 1:
        for entry in searched:
            yield one(entry)
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from selar_local.scheduler import Scheduler, decode_requests

    scheduler = Scheduler(runtime, queue_size=parallel)

    def decode(prompts, params_list, on_finish=None):
        return decode_requests(scheduler, prompts, params_list, on_finish=on_finish)

    pending = list(searched)
    running: set = set()
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="selar-search") as pool:
        try:
            while pending or running:
                while pending and len(running) < parallel:
                    running.add(pool.submit(one, pending.pop(0), decode))
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            # Done, or an error or interrupt: closing fails the searches still decoding
            # (SchedulerClosedError), so the pool's threads end before it is shut down.
            scheduler.close()


def group_records(records: Iterable[dict]) -> dict[str, dict[str, list[dict]]]:
    """dataset -> method -> records."""
    out: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        out[r["dataset"]][r["method"]].append(r)
    return out
