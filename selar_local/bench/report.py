"""`selar bench report`: statistics of one or more run folders as Markdown, CSV and plots.

Per run (model) and data set, one row per method:

* accuracy = correct / items, with a 95% Wilson interval. With several seeds the items of all
  seeds are pooled (n = problems x seeds); the pooled interval treats them as independent,
  which understates the problem-to-problem variance, so the per-seed accuracies and their
  mean and standard deviation are reported as well.
* mean generated tokens, mean wall time per item (its own latency inside the batch: with
  --parallel N the N live sequences share each decode), share of soft steps (soft steps /
  generated tokens, over all items), share of items cut at max_tokens, errors (prompts that
  did not fit the context; graded as wrong so every method keeps the same n).
* against the baseline (cot): items paired on (problem, seed); the paired difference of
  accuracy (method - baseline) with Newcombe's 95% interval, the discordant counts (solved
  only by the method / only by the baseline) and the exact McNemar p-value.

Runs of the same model file on the same data set share one table, so that a control run made
later (``--methods cot --greedy``, another tau) is paired with the first run's items. The first
run's methods keep their names; a later run's method is labelled by the decoding parameters that
differ from the first run's and that it reads, e.g. ``cot (greedy)`` or ``selar (tau=0.7)`` (a
latent run's recorded tau is no difference: latent never reads it), and that label can be the
``--baseline``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from selar_local.bench.runner import RESULTS_NAME, BenchConfig, decoded_with, read_config, read_results
from selar_local.bench.stats import mcnemar_exact, mean_over_seeds, paired_difference, wilson_interval
from selar_local.methods import REGISTRY, method_options
from selar_local.errors import SelarError

CSV_COLUMNS = (
    "run", "model", "dataset", "method", "n", "n_problems", "seeds", "correct", "accuracy", "ci_lo", "ci_hi",
    "seed_mean", "seed_std", "mean_tokens", "mean_seconds", "median_seconds", "soft_share", "truncated_share",
    "errors", "baseline", "n_paired", "diff", "diff_lo", "diff_hi", "method_only", "baseline_only", "mcnemar_p",
    "samples", "pass_at_1", "pass_at_k", "mean_generations", "weighted_maj", "mean_latent_steps",
    "mean_decoded_tokens", "first_correct", "revised", "revised_fixed", "revised_broke",
)


class ReportError(SelarError):
    """A run folder holds nothing to report."""


@dataclass
class Run:
    path: Path
    config: BenchConfig | None
    records: list[dict[str, Any]]

    @property
    def model(self) -> str:
        return self.config.model_file if self.config else "?"

    @property
    def label(self) -> str:
        return self.path.name or str(self.path)


@dataclass
class MethodRow:
    run: str
    model: str
    dataset: str
    method: str
    n: int
    n_problems: int
    seeds: list[int]
    correct: int
    accuracy: float
    ci_lo: float
    ci_hi: float
    seed_mean: float | None
    seed_std: float | None
    per_seed: dict[int, float]
    mean_tokens: float
    mean_seconds: float
    median_seconds: float  # the table's figure: a paused process (SIGSTOP) inflates the mean of the items in flight
    soft_share: float
    truncated_share: float
    errors: int
    baseline: str | None = None
    n_paired: int | None = None
    diff: float | None = None
    diff_lo: float | None = None
    diff_hi: float | None = None
    method_only: int | None = None
    baseline_only: int | None = None
    mcnemar_p: float | None = None
    samples: int = 1                 # self-consistency: accuracy is maj@samples
    pass_at_1: float | None = None   # mean accuracy of the single samples
    pass_at_k: float | None = None   # share of problems some sample solved
    mean_generations: float = 1.0    # answers decoded per item: K for maj@K, a search's own count (latentseek)
    weighted_maj: float | None = None  # wmaj@K: accuracy of the vote weighted by exp(mean log-probability)
    mean_latent_steps: float = 0.0   # hidden-state steps per item (latent, latentmas)
    mean_decoded_tokens: float = math.nan  # tokens decoded per item over all its generations (textmas: 4 roles)
    # A search that revises a first answer (latentseek): items whose first answer was right, items
    # it revised (took a step), and of those the ones it turned right and the ones it turned wrong.
    first_correct: int | None = None
    revised: int | None = None
    revised_fixed: int | None = None
    revised_broke: int | None = None

    def csv_row(self) -> dict[str, Any]:
        row = {k: getattr(self, k) for k in CSV_COLUMNS if k != "seeds"}
        row["seeds"] = " ".join(str(s) for s in self.seeds)
        return row


@dataclass
class Section:
    run: str
    model: str
    dataset: str
    rows: list[MethodRow] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    prompt_format: int = 0


def load_run(path: str | Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder")
    config = read_config(path)
    records = read_results(path / RESULTS_NAME)
    if not records:
        raise ReportError(f"{path / RESULTS_NAME} holds no results yet")
    return Run(path, config, records)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def method_row(run: str, model: str, dataset: str, method: str, records: Sequence[dict]) -> MethodRow:
    n = len(records)
    correct = sum(bool(r.get("correct")) for r in records)
    lo, hi = wilson_interval(correct, n)
    seeds = sorted({int(r["seed"]) for r in records})
    per_seed: dict[int, float] = {}
    seed_mean = seed_std = None
    try:
        summary = mean_over_seeds([(r["id"], int(r["seed"]), bool(r.get("correct"))) for r in records])
        per_seed = {int(s): float(a) for s, a in summary["per_seed"].items()}
        seed_mean, seed_std = float(summary["mean"]), float(summary["std"])
    except ValueError:
        pass  # seeds cover different problems (a partial run): no per-seed mean
    ok = [r for r in records if not r.get("error")]
    tokens = sum(int(r.get("completion_tokens") or 0) for r in ok)
    soft = sum(int(r.get("soft_steps") or 0) for r in ok)
    return MethodRow(
        run=run, model=model, dataset=dataset, method=method, n=n,
        n_problems=len({r["id"] for r in records}), seeds=seeds, correct=correct, accuracy=correct / n,
        ci_lo=lo, ci_hi=hi, seed_mean=seed_mean, seed_std=seed_std, per_seed=per_seed,
        mean_tokens=_mean([int(r.get("completion_tokens") or 0) for r in ok]),
        mean_seconds=_mean([float(r.get("wall_seconds") or 0.0) for r in ok]),
        median_seconds=statistics.median([float(r.get("wall_seconds") or 0.0) for r in ok]) if ok else math.nan,
        soft_share=soft / tokens if tokens else 0.0,
        truncated_share=_mean([r.get("finish_reason") == "length" for r in ok]) if ok else 0.0,
        errors=n - len(ok),
        mean_generations=_mean([int(r.get("generations") or 1) for r in ok]) if ok else 1.0,
        mean_latent_steps=_mean([int(r.get("latent_steps") or 0) for r in ok]) if ok else 0.0,
        mean_decoded_tokens=_mean([int(r.get("decoded_tokens") or r.get("completion_tokens") or 0) for r in ok]),
        **revisions(ok),
    )


def revisions(records: Sequence[dict]) -> dict[str, int]:
    """What a revising search changed, from records that grade its first answer (`first_correct`,
    latentseek runs since 2026-12-07): {} for other records."""
    if not records or any("first_correct" not in r for r in records):
        return {}
    revised = [r for r in records if int(r.get("iterations") or 0) > 0]
    return {"first_correct": sum(bool(r["first_correct"]) for r in records), "revised": len(revised),
            "revised_fixed": sum(bool(r["correct"]) and not r["first_correct"] for r in revised),
            "revised_broke": sum(r["first_correct"] and not bool(r["correct"]) for r in revised)}


def vote_records(records: Sequence[dict], samples: int) -> tuple[list[dict], float, float]:
    """Self-consistency: one record per (problem, seed) whose `correct` is the majority vote's
    (ties by mean log-probability) and `weighted_correct` the weighted vote's (by exp(mean
    log-probability), from the same samples), with the group's tokens and soft steps summed.
    Returns them with pass@1 (mean over the single samples) and pass@K (some sample correct).
    Groups with fewer than `samples` records (a run killed while writing one) are left out."""
    from selar_local.bench.grading import answer_key
    from selar_local.vote import majority_vote, weighted_vote

    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((str(r["id"]), int(r["seed"])), []).append(r)
    voted, singles, any_correct = [], [], []
    for members in groups.values():
        if len(members) != samples:
            continue
        members.sort(key=lambda r: int(r.get("sample", 0)))
        dataset = members[0]["dataset"]
        keys = [answer_key(r.get("extracted"), dataset) for r in members]
        confidences = [float(r.get("mean_logprob") or 0.0) for r in members]
        vote = majority_vote(keys, confidences)
        chosen = members[vote.index]
        weighted = weighted_vote(keys, confidences)
        ok = [r for r in members if not r.get("error")]
        voted.append({
            "id": chosen["id"], "dataset": dataset, "method": chosen["method"], "seed": int(chosen["seed"]),
            "correct": bool(chosen.get("correct")) and vote.key is not None, "extracted": chosen.get("extracted"),
            "error": chosen.get("error") if not ok else None, "finish_reason": chosen.get("finish_reason"),
            "completion_tokens": sum(int(r.get("completion_tokens") or 0) for r in ok),
            "soft_steps": sum(int(r.get("soft_steps") or 0) for r in ok),
            "wall_seconds": max((float(r.get("wall_seconds") or 0.0) for r in ok), default=0.0),
            "votes": vote.votes,
            "weighted_correct": bool(members[weighted.index].get("correct")) and weighted.key is not None,
        })
        singles += [bool(r.get("correct")) for r in members]
        any_correct.append(any(bool(r.get("correct")) for r in members))
    pass1 = sum(singles) / len(singles) if singles else math.nan
    passk = sum(any_correct) / len(any_correct) if any_correct else math.nan
    return voted, pass1, passk


def add_paired(row: MethodRow, baseline: str, base_records: Sequence[dict], records: Sequence[dict]) -> None:
    """Pair on (problem, seed) and fill the comparison columns of ``row``."""
    base = {(r["id"], int(r["seed"])): bool(r.get("correct")) for r in base_records}
    mine = {(r["id"], int(r["seed"])): bool(r.get("correct")) for r in records}
    keys = sorted(set(base) & set(mine), key=str)
    row.baseline = baseline
    row.n_paired = len(keys)
    if not keys:
        return
    a = [base[k] for k in keys]
    b = [mine[k] for k in keys]
    d = paired_difference(a, b)
    row.diff, row.diff_lo, row.diff_hi = d["diff"], d["lo"], d["hi"]
    row.method_only, row.baseline_only = int(d["b_only"]), int(d["a_only"])
    row.mcnemar_p = mcnemar_exact(row.method_only, row.baseline_only)


def variant_suffix(first: Run, run: Run, method: str) -> str:
    """How ``run`` decodes ``method`` differently from ``first``: " (greedy)", " (tau=0.7,
    seeds=1)", or "". Another method's option (tau for latent, recorded but never read) is not
    a difference; the registry says which options each method reads."""
    if run is first or first.config is None or run.config is None:
        return ""
    mine, theirs = run.config.params, first.config.params
    parts = []
    auto = run.config.tau_auto and not first.config.tau_auto
    for key in sorted(set(mine) & set(theirs)):  # a setting one run predates: it decoded with its default
        if not _reads(method, key):
            continue
        if key == "tau" and auto:
            parts.append(f"tau=auto {mine.get(key)}")
        elif mine.get(key) != theirs.get(key):
            parts.append(("greedy" if mine.get(key) else "sampled") if key == "greedy" else f"{key}={mine.get(key)}")
    if run.config.seeds != first.config.seeds:
        parts.append("seeds=" + ",".join(str(s) for s in run.config.seeds))
    return f" ({', '.join(parts)})" if parts else ""


def method_settings(config: BenchConfig) -> str:
    """The options the run's methods read, as recorded ("tau 0.5, lam 1.0, ks 3; "), or "":
    a latent run's header does not list the SeLaR settings it never read."""
    parts = []
    for key in method_options():
        if key in config.params and any(m in REGISTRY and _reads(m, key) for m in config.methods):
            auto = " (auto: calibrated)" if key == "tau" and config.tau_auto else ""
            parts.append(f"{key} {config.params[key]}{auto}")
    return ", ".join(parts) + "; " if parts else ""


def _reads(method: str, key: str) -> bool:
    """Whether ``method`` decodes with parameter ``key``: the shared sampler settings are read by
    every method, a method's own options (methods.REGISTRY) only by the methods that list them."""
    if method not in REGISTRY or key not in method_options():
        return True
    return key in REGISTRY[method].fields


def summarize(runs: Sequence[Run], baseline: str = "cot", *, common_problems: bool = False,
              votes_at: Sequence[int] = ()) -> list[Section]:
    """One section per (model file, data set); rows are the methods of every run in it.
    common_problems: every row keeps only the problems all rows of its section hold, so that
    runs of different lengths (a 100-problem sweep beside 200-problem runs) compare on the
    same problems, accuracy columns included.
    votes_at: for each maj@K run, also the vote of its first k samples for each k here below
    K (a row "cot maj@k of K"), so that a search costing k generations on average
    (latentseek) meets self-consistency at the same cost without another run."""
    groups: dict[tuple[str, str, int], list[tuple[Run, dict[str, list[dict]]]]] = {}
    for run in runs:
        by_dataset: dict[str, dict[str, list[dict]]] = {}
        for r in run.records:
            by_dataset.setdefault(r["dataset"], {}).setdefault(r["method"], []).append(r)
        prompt_format = run.config.prompt_format if run.config else 0
        for dataset, by_method in by_dataset.items():  # other prompts: not comparable, another table
            groups.setdefault((run.model, dataset, prompt_format), []).append((run, by_method))
    sections: list[Section] = []
    for (model, dataset, prompt_format), members in groups.items():
        first = members[0][0]
        section = Section(" + ".join(run.label for run, _ in members), model, dataset, runs=[m[0] for m in members],
                          prompt_format=prompt_format)
        labelled: dict[str, tuple[Run, list[dict]]] = {}
        for run, by_method in members:
            order = list(run.config.methods) if run.config else []
            samples = run.config.samples if run.config else 1
            for method in [m for m in order if m in by_method] + sorted(m for m in by_method if m not in order):
                label = method + (f" maj@{samples}" if samples > 1 else "") + variant_suffix(first, run, method)
                if label in labelled:  # the same method decoded the same way twice: name the folder
                    label = f"{label} [{run.label}]"
                labelled[label] = (run, by_method[method])
        if common_problems and labelled:
            shared = set.intersection(*({r["id"] for r in records} for _, records in labelled.values()))
            labelled = {label: (run, [r for r in records if r["id"] in shared])
                        for label, (run, records) in labelled.items()}
        extra: dict[str, tuple[int, float, float]] = {}
        for label, (run, records) in list(labelled.items()):
            samples = run.config.samples if run.config else 1
            for k in sorted({k for k in votes_at if 1 <= k < samples}):
                first_k = [r for r in records if int(r.get("sample", 0)) < k]
                voted, pass1, passk = vote_records(first_k, k)
                if voted:
                    fewer = label.replace(f" maj@{samples}", f" maj@{k} of {samples}", 1)
                    labelled[fewer], extra[fewer] = (run, voted), (k, pass1, passk)
            if samples > 1:
                voted, pass1, passk = vote_records(records, samples)
                if not voted:
                    del labelled[label]
                    continue
                labelled[label] = (run, voted)
                extra[label] = (samples, pass1, passk)
        for label, (run, records) in labelled.items():
            row = method_row(run.label, model, dataset, label, records)
            if label in extra:
                row.samples, row.pass_at_1, row.pass_at_k = extra[label]
                row.mean_generations = float(row.samples)
                row.weighted_maj = _mean([r["weighted_correct"] for r in records])
                row.mean_decoded_tokens = row.mean_tokens  # the group's tokens, summed by vote_records
            if label != baseline and baseline in labelled:
                add_paired(row, baseline, labelled[baseline][1], records)
            section.rows.append(row)
        sections.append(section)
    return sections


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------

def _pct(x: float | None, digits: int = 1) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}"


def _signed_pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.1f}"


def _p(p: float | None) -> str:
    if p is None:
        return ""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def render_markdown(sections: Sequence[Section]) -> str:
    out = io.StringIO()
    out.write("# Benchmark report\n\n")
    for section in sections:
        out.write(f"## {section.dataset} - {section.model} (run `{section.run}`, prompt format "
                  f"{section.prompt_format})\n\n")
        for run in section.runs:
            if run.config is None:
                continue
            c = run.config
            p = c.params
            decoding = ("greedy" if p.get("greedy") else
                        f"T {p.get('temperature')}, top-k {p.get('top_k')}, top-p {p.get('top_p')}, "
                        f"min-p {p.get('min_p')}")
            expected = c.problems * len(c.methods) * len(c.seeds) * c.samples
            where = f"`{run.label}`: " if len(section.runs) > 1 else ""
            samples = f" x {c.samples} samples" if c.samples > 1 else ""
            out.write(f"{where}{c.problems} problems x {len(c.methods)} methods x {len(c.seeds)} seed(s) "
                      f"({', '.join(str(s) for s in c.seeds)}){samples}; {len(run.records)}/{expected} items done; "
                      f"{decoding}; max_tokens {p.get('max_tokens')}; {method_settings(c)}n_ctx {c.n_ctx}; "
                      f"{cpu_kernels(run.records)}.\n\n")
        multi_seed = any(len(r.seeds) > 1 for r in section.rows)
        voting = any(r.samples > 1 for r in section.rows)
        header = ["method", "n", "accuracy % [95% CI]"]
        if voting:
            header += ["pass@1 %", "pass@K %", "wmaj@K %"]
        if multi_seed:
            header.append("mean over seeds % (sd)")
        searching = voting or any(r.mean_generations != 1 for r in section.rows)
        if searching:
            header.append("mean generations")
        latent = any(r.mean_latent_steps for r in section.rows)
        if latent:
            header.append("latent steps")
        header += ["mean tokens"]
        decoded = any(r.mean_decoded_tokens != r.mean_tokens for r in section.rows if not r.samples > 1)
        if decoded:  # a search's tokens over all its generations (textmas: its four roles)
            header.append("decoded tokens")
        header += ["median s / item", "soft steps %", "hit max_tokens %", "errors"]
        base = next((r.baseline for r in section.rows if r.baseline), None)
        if base:
            header += [f"vs {base}: diff pts [95% CI]", "only method / only base", "McNemar p"]
        out.write("| " + " | ".join(header) + " |\n")
        out.write("|" + "|".join("---" for _ in header) + "|\n")
        for r in section.rows:
            cells = [r.method, str(r.n), f"{_pct(r.accuracy)} [{_pct(r.ci_lo)}, {_pct(r.ci_hi)}]"]
            if voting:
                cells += [_pct(r.pass_at_1 if r.samples > 1 else r.accuracy), _pct(r.pass_at_k), _pct(r.weighted_maj)]
            if multi_seed:
                cells.append(f"{_pct(r.seed_mean)} ({_pct(r.seed_std)})" if r.seed_mean is not None else "n/a")
            if searching:
                cells.append(f"{r.mean_generations:.2f}")
            if latent:
                cells.append(f"{r.mean_latent_steps:.1f}")
            cells.append(f"{r.mean_tokens:.1f}")
            if decoded:
                cells.append(f"{r.mean_decoded_tokens:.1f}")
            cells += [f"{r.median_seconds:.2f}", _pct(r.soft_share),
                      _pct(r.truncated_share, 0), str(r.errors)]
            if base:
                if r.diff is None:
                    cells += ["(baseline)" if r.method == base else "", "", ""]
                else:
                    cells += [f"{_signed_pct(r.diff)} [{_signed_pct(r.diff_lo)}, {_signed_pct(r.diff_hi)}]",
                              f"{r.method_only} / {r.baseline_only}", _p(r.mcnemar_p)]
            out.write("| " + " | ".join(cells) + " |\n")
        for r in section.rows:
            if r.first_correct is not None:
                out.write(f"\n{r.method}: its first answers {r.first_correct} of {r.n} right; it revised {r.revised} "
                          f"(took a step), turning {r.revised_fixed} right and {r.revised_broke} wrong.\n")
        if multi_seed:
            out.write("\nPer seed (accuracy %):\n\n")
            seeds = sorted({s for r in section.rows for s in r.seeds})
            out.write("| method | " + " | ".join(f"seed {s}" for s in seeds) + " |\n")
            out.write("|---|" + "|".join("---" for _ in seeds) + "|\n")
            for r in section.rows:
                out.write(f"| {r.method} | " + " | ".join(_pct(r.per_seed.get(s)) for s in seeds) + " |\n")
        out.write("\n")
    out.write("Accuracy intervals: Wilson score, 95%. Paired difference: method minus baseline on the same "
              "(problem, seed) items, Newcombe's hybrid score interval; McNemar: exact two-sided binomial "
              "test on the discordant items. Median s / item: each item's own latency (prefill + decode) while "
              "sharing the batch with the other live sequences, the median (the mean, in report.csv, also counts "
              "any time the process was stopped against the items in flight). `maj@K` rows (self-consistency): accuracy is the "
              "majority vote over K samples (seeds seed..seed+K-1; ties by mean log-probability), tokens and soft "
              "steps are summed over the K samples, pass@1 is the mean over the single samples and pass@K the "
              "share of problems some sample solved; wmaj@K is the vote over the same samples with each weighed "
              "by exp(its mean log-probability), the answer of the largest total weight winning. Mean "
              "generations: answers decoded per item (K for maj@K; a search "
              "such as latentseek counts its own, each with one self-grading besides), the cost to compare at.\n")
    return out.getvalue()


def render_csv(sections: Sequence[Section]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for section in sections:
        for r in section.rows:
            writer.writerow({k: ("" if v is None else (round(v, 6) if isinstance(v, float) else v))
                             for k, v in r.csv_row().items()})
    return out.getvalue()


def choose_trace(runs: Sequence[Run], problem: str | None = None, method: str | None = None) -> dict | None:
    """The record whose entropy trace is plotted: the given problem/method, else the record of
    selar (or the first non-cot method) with the most soft steps in the first run."""
    for run in runs:
        methods = [m for m in (run.config.methods if run.config else ())]
        wanted = method or ("selar" if "selar" in methods else next((m for m in methods if m != "cot"), None))
        candidates = [r for r in run.records if r.get("trace") and (wanted is None or r["method"] == wanted)]
        if problem is not None:
            candidates = [r for r in candidates if str(r["id"]) == str(problem)]
        if candidates:
            return max(candidates, key=lambda r: (int(r.get("soft_steps") or 0), -candidates.index(r)))
    if problem is not None or method is not None:
        raise ReportError(f"no record with a trace for problem {problem!r}, method {method!r}")
    return None


def cpu_kernels(records: Sequence[dict]) -> str:
    """How the items were decoded on CPU: with repacked weights an item's tokens depend on the
    sequences beside it in the batch."""
    repacked = sum(1 for r in records if decoded_with(r, "cpu_repack"))
    if repacked == 0:
        return "plain CPU kernels"
    if repacked == len(records):
        return "repacked CPU weights (an item's tokens depend on its batch neighbours)"
    return f"repacked CPU weights for {repacked} of {len(records)} items"


def write_report(run_dirs: Sequence[Path], out_dir: Path, *, baseline: str = "cot", plots: bool = True,
                 trace_problem: str | None = None, trace_method: str | None = None,
                 common_problems: bool = False, votes_at: Sequence[int] = ()) -> str:
    runs = [load_run(d) for d in run_dirs]
    sections = summarize(runs, baseline, common_problems=common_problems, votes_at=votes_at)
    markdown = render_markdown(sections)
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        from selar_local.bench import plots as plotting

        written = [plotting.accuracy_vs_tokens(sections, out_dir / "accuracy_vs_tokens.png")]
        record = choose_trace(runs, trace_problem, trace_method)
        if record is not None:
            tau = record.get("params", {}).get("tau") if record["method"] == "selar" else None
            written.append(plotting.entropy_trace(record, out_dir / "entropy_trace.png", tau=tau))
        markdown += "\nPlots: " + ", ".join(f"![{p.stem}]({p.name})" for p in written) + "\n"
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    (out_dir / "report.csv").write_text(render_csv(sections), encoding="utf-8")
    (out_dir / "report.json").write_text(json.dumps(
        [{**r.csv_row(), "per_seed": r.per_seed} for s in sections for r in s.rows], indent=1), encoding="utf-8")
    return markdown
