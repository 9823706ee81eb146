"""How stable is `selar calibrate`'s tau (docs/BENCHMARKS.md, "How stable is tau")?

Decodes the sixteen calibration prompts with cot under several seeds (the way `calibrate` does,
the model's own sampler), keeps every step's entropy, and then calibrates again and again on
random sets of 8 or 16 of those sequences. For each rule it prints the 10th-90th percentile of
the tau chosen and how often that tau puts the soft share inside the 6-14% band on the
sequences the set did not contain (the prompts a user then decodes). Rules: the current one
(`calibrate.choose_tau`, version 4) and version 3 (kept below only for this comparison).

    python benchmarks/calibration_stability.py --model qwen2.5-coder-0.5b-instruct [--seeds 3]
        [--entropies FILE.json] [--markdown docs/benchmarks/calibration_stability.md]

The entropies are cached in FILE.json (default: under the user's cache), so the analysis can be
rerun without decoding; --markdown appends the model's rows to a table. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from selar_local import calibrate as cal  # noqa: E402
from selar_local.registry import cache_dir, resolve_model  # noqa: E402

Sequences = list  # of (entropies, eligible) per decoded sequence


def choose_tau_v3(h: np.ndarray, ok: np.ndarray) -> float:
    """Version 3: the lowest smoothed density among in-band thresholds, exact ties to the share
    nearest 10%, a flat run to its middle; no floor under tau, no noise tolerance."""
    shares = np.array([cal.soft_share(h, ok, t) for t in cal.TAU_GRID])
    in_band = (shares >= cal.SOFT_SHARE_BAND[0]) & (shares <= cal.SOFT_SHARE_BAND[1])
    counts, edges = np.histogram(h[h > 0], bins=cal.BINS, range=(0.0, 1.0))
    density = np.convolve(counts, np.ones(3) / 3, mode="same")
    at_tau = density[np.clip(np.searchsorted(edges, cal.TAU_GRID, side="right") - 1, 0, cal.BINS - 1)]
    closeness = np.abs(shares - cal.TARGET_SHARE)
    if not in_band.any():
        return float(cal.TAU_GRID[np.argmin(closeness)])
    candidates = np.flatnonzero(in_band)
    best = candidates[np.lexsort((closeness[candidates], at_tau[candidates]))[0]]
    same = (at_tau == at_tau[best]) & (shares == shares[best]) & in_band
    lo = hi = best
    while lo > 0 and same[lo - 1]:
        lo -= 1
    while hi < len(cal.TAU_GRID) - 1 and same[hi + 1]:
        hi += 1
    return float(cal.TAU_GRID[(lo + hi) // 2])


RULES = {
    "version 3": choose_tau_v3,
    "version 4 (current)": lambda h, ok: cal.choose_tau(h, ok)[0],
}


def decode_entropies(model: str, seeds: int, threads: int) -> dict:
    from selar_local.runtime import Runtime

    path = resolve_model(model)
    prompts = cal.CALIBRATION_PROMPTS
    runtime = Runtime(path, n_ctx=len(prompts) * 512, n_parallel=len(prompts), n_threads=threads)
    try:
        base = runtime.default_params().replace(method="cot", max_tokens=256, soft_noise="none")
        mask = runtime.token_info.math_symbol_mask
        tokens = [runtime.encode(messages=[{"role": "user", "content": p}]) for p in prompts]
        sequences = []
        for s in range(seeds):
            params = [base.replace(seed=base.seed + 1000 * s + i) for i in range(len(prompts))]
            for i, r in enumerate(runtime.generate_batch(tokens, params)):
                eligible = ~mask[np.asarray(r.tokens, dtype=np.int64)]
                sequences.append({"prompt": i, "seed": s, "h": [float(x) for x in r.entropies],
                                  "eligible": [bool(x) for x in eligible]})
            print(f"{path.name}: seed {s + 1}/{seeds} decoded", file=sys.stderr, flush=True)
        return {"model_file": path.name, "settings": cal.sampler_settings(base), "sequences": sequences}
    finally:
        runtime.close()


def study(sequences: Sequences, set_size: int, draws: int, seed: int = 0) -> dict[str, dict]:
    """Per rule: tau's 10th/50th/90th percentile over `draws` random sets of `set_size`
    sequences, and the share of draws whose tau lands the held-out share in the band."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(len(sequences), set_size, replace=False) for _ in range(draws)]
    out = {}
    for name, rule in RULES.items():
        taus, held_out_in_band = [], []
        for pick in picks:
            chosen = set(int(i) for i in pick)
            h = np.concatenate([sequences[i][0] for i in chosen])
            ok = np.concatenate([sequences[i][1] for i in chosen])
            tau = rule(h, ok)
            rest_h = np.concatenate([s[0] for i, s in enumerate(sequences) if i not in chosen])
            rest_ok = np.concatenate([s[1] for i, s in enumerate(sequences) if i not in chosen])
            share = cal.soft_share(rest_h, rest_ok, tau)
            taus.append(tau)
            held_out_in_band.append(cal.SOFT_SHARE_BAND[0] <= share <= cal.SOFT_SHARE_BAND[1])
        p10, p50, p90 = np.percentile(taus, [10, 50, 90])
        out[name] = {"tau_p10": p10, "tau_median": p50, "tau_p90": p90,
                     "held_out_in_band": float(np.mean(held_out_in_band))}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--seeds", type=int, default=3, help="decodes of the 16 prompts (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draws", type=int, default=200, help="random prompt sets per size (default %(default)s)")
    parser.add_argument("--entropies", type=Path, default=None, help="JSON cache of the decoded entropies")
    parser.add_argument("--markdown", type=Path, default=None, help="append the rows to this table")
    args = parser.parse_args()

    store = args.entropies or cache_dir() / "calibration-study" / f"{args.model}-{args.seeds}seeds.json"
    if store.exists():
        data = json.loads(store.read_text(encoding="utf-8"))
    else:
        data = decode_entropies(args.model, args.seeds, args.threads)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(data), encoding="utf-8")
    sequences = [(np.asarray(s["h"], dtype=np.float64), np.asarray(s["eligible"], dtype=bool))
                 for s in data["sequences"]]
    steps = sum(len(h) for h, _ in sequences)
    print(f"{data['model_file']}: {len(sequences)} sequences, {steps} steps, sampler {data['settings']}")
    rows = []
    for size in (8, 16):
        for name, r in study(sequences, size, args.draws).items():
            row = (f"| {data['model_file']} | {size} | {name} | {r['tau_p10']:.2f} / {r['tau_median']:.2f} / "
                   f"{r['tau_p90']:.2f} | {100 * r['held_out_in_band']:.0f}% |")
            rows.append(row)
            print(row)
    if args.markdown:
        new = not args.markdown.exists()
        with args.markdown.open("a", encoding="utf-8") as f:
            if new:
                f.write("| model | prompts per calibration | rule | tau p10 / median / p90 | held-out share in 6-14% |\n"
                        "|---|---|---|---|---|\n")
            f.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
