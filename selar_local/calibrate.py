"""`--tau auto`: a SeLaR gate threshold fitted to the model instead of a constant.

SeLaR's tau (0.5) was tuned on Qwen3; a less confident model opens the gate far more often
(SmolLM2-135M: 62% of steps at 0.5). Calibration decodes a handful of built-in reasoning
prompts with `cot`, collects the normalised top-k_s entropy of every step, and chooses tau in
the low-density valley between the confident mode (near 0) and the uncertain mode, among the
thresholds whose soft share (steps with h >= tau whose token is not a math symbol, as SeLaR
would gate them) lies in the band the paper reports, 6-14%. The result is cached per model
file (sha256), sampler settings and rule version in the user's cache.

Version 4 of the rule (docs/BENCHMARKS.md, "How stable is tau"): sixteen prompts instead of
eight; a threshold must leave some of the uncertain steps discrete (one below every positive
entropy would gate on whether the sampler's filter kept a second token, not on how uncertain
the step is: that flipped Qwen2.5-Coder-0.5B between 0.04 and 0.4); and densities within
sampling noise of the lowest count as equally low, the tie going to the share nearest 10%
(a density that rises through the band, as Gemma 3's does, has its "valley" at the band's
edge, where a new prompt set falls outside).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from selar_local.params import DecodeParams

if TYPE_CHECKING:  # pragma: no cover
    from selar_local.runtime import Runtime

CALIBRATION_VERSION = 4
SOFT_SHARE_BAND = (0.06, 0.14)
TARGET_SHARE = 0.10
# tau must leave at least this share of the steps with h > 0 below it (discrete).
MIN_DISCRETE_UNCERTAIN = 0.2
# Smoothed densities within this many Poisson standard errors of the lowest tie.
DENSITY_TIE_Z = 2.0
BINS = 50                      # histogram of h over [0, 1]
TAU_GRID = np.round(np.arange(0.02, 1.0001, 0.01), 2)  # candidate thresholds
# Word problems in the style of the reasoning benchmarks (written for this purpose).
CALIBRATION_PROMPTS = (
    "A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 29 of them. "
    "How many muffins are left? Think step by step.",
    "Tom reads 15 pages a day. His book has 240 pages. After 6 days, how many pages does he "
    "still have to read? Explain your reasoning.",
    "A train travels 180 km in 2 hours and then 150 km in 3 hours. What is its average speed "
    "over the whole trip? Show your work.",
    "Maria buys 3 notebooks at $4 each and 2 pens at $1.50 each. She pays with a $20 bill. "
    "How much change does she get? Reason step by step.",
    "A rectangle is 3 times as long as it is wide, and its perimeter is 48 cm. What is its "
    "area? Work it out carefully.",
    "In a class of 30 students, 40% play football and half of the rest play chess. How many "
    "students play neither? Think it through.",
    "A tank holds 500 litres. It is filled at 25 litres per minute while 10 litres per minute "
    "leak out. How long does it take to fill the empty tank? Explain.",
    "Sam is twice as old as his sister. In 6 years the sum of their ages will be 36. How old "
    "is Sam now? Solve it step by step.",
    "A shop sells apples in bags of 6. Lena needs 50 apples for a party. How many bags must "
    "she buy, and how many apples will be left over? Think step by step.",
    "A cyclist rides at 18 km per hour for 2.5 hours and then walks 4 km. How far did she "
    "travel in total? Explain your reasoning.",
    "A recipe needs 3 eggs for every 250 g of flour. How many eggs are needed for 1 kg of "
    "flour? Show your work.",
    "Ben saves $12 each week. He already has $45. How many weeks until he can buy a bike that "
    "costs $200? Reason step by step.",
    "A garden is 12 m long and 7 m wide. A path 1 m wide runs around the outside of it. What "
    "is the area of the path? Work it out carefully.",
    "Three friends share a pizza bill of $42 and a tip of 15% of the bill equally. How much "
    "does each pay? Think it through.",
    "A library had 1,250 books. It gave away 8% of them and then bought 140 new ones. How "
    "many books does it have now? Explain.",
    "The sum of three consecutive even numbers is 84. What is the largest of them? Solve it "
    "step by step.",
)


class CalibrationError(Exception):
    pass


@dataclass(frozen=True)
class CalibrationProgress:
    """How far a calibration is: prompts decoded of all, and their tokens so far."""

    prompts_done: int
    prompts_total: int
    tokens: int


ProgressCallback = Callable[[CalibrationProgress], None]


@dataclass
class Calibration:
    tau: float
    soft_share: float              # share of cot steps SeLaR would make soft at this tau
    in_band: bool
    steps: int
    histogram: list[int]           # counts of h in BINS equal bins over [0, 1]
    max_share: float = 0.0         # the share at any tau just above 0: steps with h > 0 (not math symbols)
    # How much tau depends on which prompts were decoded: its 10th and 90th percentile when the
    # prompts are drawn again with replacement (empty in calibrations cached before it existed).
    tau_spread: list[float] = field(default_factory=list)
    model_sha256: str = ""
    model_file: str = ""
    settings: dict = field(default_factory=dict)
    prompts: int = 0
    version: int = CALIBRATION_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def soft_share(entropies: np.ndarray, eligible: np.ndarray, tau: float) -> float:
    """Share of steps SeLaR would make soft: h >= tau and the token is not a math symbol."""
    return float(np.mean((entropies >= tau) & eligible)) if len(entropies) else 0.0


def reachable_share(entropies: np.ndarray, eligible: np.ndarray) -> float:
    """The largest soft share any tau > 0 can give: steps whose filtered distribution keeps
    a second candidate (h > 0), math symbols excepted. Below the band, no tau reaches it."""
    return float(np.mean((entropies > 0) & eligible)) if len(entropies) else 0.0


def choose_tau(entropies: Sequence[float], eligible: Sequence[bool], *,
               band: tuple[float, float] = SOFT_SHARE_BAND) -> tuple[float, float, bool]:
    """(tau, soft share, whether the share is in `band`).

    The candidates are the grid thresholds whose share is in the band and that leave at least
    MIN_DISCRETE_UNCERTAIN of the positive entropies below them. Among them, take the one where
    the density of the positive entropies (a 3-bin smoothed histogram) is lowest: the valley
    between the confident and the uncertain steps, where a small change of tau moves few
    steps. Densities within DENSITY_TIE_Z Poisson standard errors of the lowest count as equal;
    ties go to the share closest to 10%, and a flat run of equal thresholds to its middle. When
    no threshold qualifies (too few or too discrete steps), the share closest to 10% wins and
    `in_band` says whether it is in the band."""
    h = np.asarray(entropies, dtype=np.float64)
    ok = np.asarray(eligible, dtype=bool)
    if h.size == 0:
        raise CalibrationError("no decoding steps to calibrate on")
    shares = np.array([soft_share(h, ok, t) for t in TAU_GRID])
    in_band = (shares >= band[0]) & (shares <= band[1])
    positive = np.sort(h[h > 0])
    below = np.searchsorted(positive, TAU_GRID, side="left") / max(positive.size, 1)
    candidate = in_band & (below >= MIN_DISCRETE_UNCERTAIN)
    counts, edges = np.histogram(positive, bins=BINS, range=(0.0, 1.0))
    density = np.convolve(counts, np.ones(3) / 3, mode="same")
    at_tau = density[np.clip(np.searchsorted(edges, TAU_GRID, side="right") - 1, 0, BINS - 1)]
    closeness = np.abs(shares - TARGET_SHARE)
    if not candidate.any():
        best = int(np.argmin(closeness))
        return float(TAU_GRID[best]), float(shares[best]), bool(in_band[best])
    lowest = at_tau[candidate].min()
    # the mean of 3 bins of counts: its standard error is sqrt(3 d) / 3 (at least that of one count)
    low = candidate & (at_tau <= lowest + DENSITY_TIE_Z * np.sqrt(max(3 * lowest, 1.0)) / 3)
    best = int(np.flatnonzero(low)[np.argmin(closeness[low])])
    # A flat run (an empty stretch of the histogram) gives the same share over several
    # thresholds: take the middle of the run, not its edge.
    same = low & (shares == shares[best])
    lo = hi = best
    while lo > 0 and same[lo - 1]:
        lo -= 1
    while hi < len(TAU_GRID) - 1 and same[hi + 1]:
        hi += 1
    best = (lo + hi) // 2
    return float(TAU_GRID[best]), float(shares[best]), bool(in_band[best])


def tau_spread(per_prompt: Sequence[tuple[np.ndarray, np.ndarray]], *, draws: int = 200,
               seed: int = 0) -> list[float]:
    """[p10, p90] of the tau `choose_tau` picks when the prompts are resampled with
    replacement (each draw: as many prompts as there are, their steps concatenated). A
    narrow spread says the prompts agree; a wide one that another handful of prompts, or
    another batch's last bits on the same ones, could move tau that far."""
    if len(per_prompt) < 2:
        return []
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(draws):
        pick = rng.integers(0, len(per_prompt), len(per_prompt))
        h = np.concatenate([per_prompt[i][0] for i in pick])
        ok = np.concatenate([per_prompt[i][1] for i in pick])
        if h.size:
            taus.append(choose_tau(h, ok)[0])
    return [float(x) for x in np.percentile(taus, [10, 90])] if taus else []


def histogram(entropies: Sequence[float]) -> list[int]:
    counts, _ = np.histogram(np.asarray(entropies, dtype=np.float64), bins=BINS, range=(0.0, 1.0))
    return [int(c) for c in counts]


def sampler_settings(params: DecodeParams) -> dict:
    """The settings the entropy depends on (and so the cache key besides the model)."""
    return {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
            "min_p": params.min_p, "ks": params.ks}


def cache_file(model_sha256: str, settings: dict) -> Path:
    from selar_local.registry import cache_dir

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    # The rule's version is in the name, so that a program of an older version (a benchmark still
    # running from an older checkout) keeps its own file rather than overwriting this one.
    return cache_dir() / "calibration" / f"{model_sha256}-{key}-v{CALIBRATION_VERSION}.json"


def load_cached(model_sha256: str, settings: dict) -> Calibration | None:
    path = cache_file(model_sha256, settings)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != CALIBRATION_VERSION or data.get("settings") != settings:
            return None
        return Calibration(**data)
    except (OSError, ValueError, TypeError):
        return None


def store(calibration: Calibration) -> Path:
    path = cache_file(calibration.model_sha256, calibration.settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(calibration.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def calibrate(runtime: "Runtime", params: DecodeParams | None = None, *,
              prompts: Sequence[str] = CALIBRATION_PROMPTS, max_tokens: int = 256, decode=None,
              progress: ProgressCallback | None = None) -> Calibration:
    """Decode `prompts` with cot under `params`' sampler and choose tau (nothing cached).
    `decode(prompts, params_list, on_finish=...)` -> results: how to decode them (default: the
    runtime's generate_batch; a server passes its scheduler, which owns the context); it calls
    `on_finish(index, result)` as each prompt is done. `progress` receives a
    CalibrationProgress at the start and after each prompt."""
    from selar_local.registry import file_sha256

    base = (params or runtime.default_params()).replace(method="cot", max_tokens=max_tokens, soft_noise="none")
    tokens = [runtime.encode(messages=[{"role": "user", "content": p}]) for p in prompts]
    decode = decode or runtime.generate_batch
    done = {"prompts": 0, "tokens": 0}

    def finished(index: int, result) -> None:
        done["prompts"] += 1
        done["tokens"] += len(result.tokens)
        if progress is not None:
            progress(CalibrationProgress(done["prompts"], len(tokens), done["tokens"]))

    if progress is not None:
        progress(CalibrationProgress(0, len(tokens), 0))
    results = decode(tokens, [base.replace(seed=base.seed + i) for i in range(len(tokens))], on_finish=finished)
    mask = runtime.token_info.math_symbol_mask
    per_prompt = [(np.asarray(r.entropies, dtype=np.float64), ~mask[np.asarray(r.tokens, dtype=np.int64)])
                  for r in results]
    entropies = np.concatenate([h for h, _ in per_prompt])
    eligible = np.concatenate([ok for _, ok in per_prompt])
    tau, share, in_band = choose_tau(entropies, eligible)
    return Calibration(tau=tau, soft_share=share, in_band=in_band, steps=int(entropies.size),
                       max_share=reachable_share(entropies, eligible), tau_spread=tau_spread(per_prompt),
                       histogram=histogram(entropies), model_sha256=file_sha256(runtime.model_path),
                       model_file=runtime.model_path.name, settings=sampler_settings(base), prompts=len(prompts))


def auto_tau(runtime: "Runtime", params: DecodeParams | None = None, *, refresh: bool = False,
             **calibrate_options) -> Calibration:
    """The model's calibrated tau for `params`' sampler: from the cache, else calibrated now."""
    from selar_local.registry import file_sha256

    settings = sampler_settings(params or runtime.default_params())
    if not refresh:
        cached = load_cached(file_sha256(runtime.model_path), settings)
        if cached is not None:
            return cached
    calibration = calibrate(runtime, params, **calibrate_options)
    store(calibration)
    return calibration


class ProgressBar:
    """A tqdm bar on stderr for a calibration (prompts done of all, tokens in its postfix), as
    `selar pull` shows its download: pass it as calibrate's `progress`, close it after."""

    def __init__(self, label: str = "calibrating tau", disable: bool | None = None):
        from tqdm import tqdm

        self._bar = tqdm(total=len(CALIBRATION_PROMPTS), desc=label, unit="prompt", disable=disable,
                         dynamic_ncols=True, leave=True)

    def __call__(self, state: CalibrationProgress) -> None:
        self._bar.total = state.prompts_total
        self._bar.n = state.prompts_done
        self._bar.set_postfix_str(f"{state.tokens} tokens", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def auto_tau_with_progress(runtime: "Runtime", params: DecodeParams | None = None) -> Calibration:
    """auto_tau with a progress bar on stderr while it calibrates (none for a cached result)."""
    bar: ProgressBar | None = None

    def show(state: CalibrationProgress) -> None:
        nonlocal bar
        bar = bar or ProgressBar()
        bar(state)

    try:
        return auto_tau(runtime, params, progress=show)
    finally:
        if bar is not None:
            bar.close()


def cached_tau(model_path: Path, params: DecodeParams | None = None) -> Calibration | None:
    """The cached calibration of a model file, without loading it (None if there is none)."""
    from selar_local.registry import file_sha256

    from selar_local.model_sampler import model_sampler

    params = params or model_sampler(model_path).apply(DecodeParams())
    return load_cached(file_sha256(Path(model_path)), sampler_settings(params))


def out_of_band_reason(calibration: Calibration) -> str | None:
    """Why no tau lands in the band, when that is the sampler's doing (None otherwise)."""
    low = SOFT_SHARE_BAND[0]
    if calibration.in_band or calibration.max_share >= low:
        return None
    s = calibration.settings
    return (f"no tau reaches {100 * low:.0f}%: only {100 * calibration.max_share:.1f}% of the steps keep a second "
            f"candidate after the filter (temperature {s.get('temperature')}, top-k {s.get('top_k')}, top-p "
            f"{s.get('top_p')}, min-p {s.get('min_p')}), and a step with one candidate has entropy 0. The model is "
            f"this confident under this sampler; calibrate under the sampler you decode with (a model's own "
            f"recommended settings, e.g. Gemma 3's --temperature 1.0 --top-k 64 --top-p 0.95).")


def render_histogram(calibration: Calibration, width: int = 40) -> str:
    """The entropy histogram as text, the chosen tau marked."""
    counts = calibration.histogram
    peak = max(counts[1:] + [1])  # the h = 0 spike would flatten every other bar
    lines = []
    for i, count in enumerate(counts):
        lo = i / BINS
        bar = "#" * min(width, round(width * count / peak))
        mark = "  <- tau" if lo <= calibration.tau < lo + 1 / BINS else ""
        lines.append(f"{lo:4.2f}-{lo + 1 / BINS:4.2f} {count:6d} {bar}{mark}")
    return "\n".join(lines)


def plot_histogram(calibration: Calibration, path: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0.0, 1.0, BINS + 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(edges[:-1], calibration.histogram, width=1 / BINS, align="edge", color="#4c72b0")
    ax.set_yscale("log")
    ax.axvline(calibration.tau, color="#c44e52", linestyle="--",
               label=f"tau = {calibration.tau:.2f} (soft share {100 * calibration.soft_share:.1f}%)")
    ax.set_xlabel("normalised top-k_s entropy h (cot steps)")
    ax.set_ylabel("steps (log scale)")
    ax.set_title(calibration.model_file)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
