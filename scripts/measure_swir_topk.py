"""What restricting SwiReasoning's latent input softmax(l) @ E to the top-k tokens changes.

The published method mixes the whole vocabulary; selar-local mixes the top `swir_topk`
(default 20, at most 64) tokens of softmax(l), renormalised, so that a step gathers k rows
instead of dequantising the table. This decodes the built-in calibration prompts with swir
and, at every latent step, compares the top-k input with the full-vocabulary one: the
probability mass the top k hold, the relative L2 error ||e_k - e_full|| / ||e_full|| and
the cosine similarity. Usage:

    python scripts/measure_swir_topk.py --model qwen2.5-coder-0.5b-instruct --threads 1
"""
from __future__ import annotations

import argparse

import numpy as np

from selar_local.calibrate import CALIBRATION_PROMPTS
from selar_local.params import DecodeParams
from selar_local.policies import SwiReasoningPolicy
from selar_local.runtime import load
from selar_local.sampling import softmax, top_candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--window", type=int, default=16, help="swir_window (small: more latent steps)")
    parser.add_argument("--ks", default="5,10,20,64", help="top-k sizes compared with the full mixture")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    runtime = load(args.model, n_parallel=len(CALIBRATION_PROMPTS), n_threads=args.threads, n_ctx=1024)
    table = runtime.table.dense()
    stats: dict[int, list[tuple[float, float, float]]] = {k: [] for k in ks}
    original = SwiReasoningPolicy._latent_mixture

    def recording(policy, logits):
        full = softmax(np.asarray(logits, dtype=np.float64))
        e_full = full.astype(np.float32) @ table
        for k in ks:
            ids, values = top_candidates(logits, k)
            e_k = softmax(values).astype(np.float32) @ table[ids]
            err = float(np.linalg.norm(e_k - e_full) / np.linalg.norm(e_full))
            cos = float(e_k @ e_full / (np.linalg.norm(e_k) * np.linalg.norm(e_full)))
            stats[k].append((float(full[ids].sum()), err, cos))
        return original(policy, logits)

    SwiReasoningPolicy._latent_mixture = recording
    params = DecodeParams(method="swir", swir_window=args.window, max_tokens=args.max_tokens)
    prompts = [runtime.encode(messages=[{"role": "user", "content": p}]) for p in CALIBRATION_PROMPTS]
    runtime.generate_batch(prompts, [params.replace(seed=params.seed + i) for i in range(len(prompts))])
    SwiReasoningPolicy._latent_mixture = original

    print(f"{runtime.model_path.name}: {len(stats[ks[0]])} latent steps, vocabulary {table.shape[0]}")
    print("| k | top-k mass mean | mass p10 | rel. L2 error mean | error p90 | cosine min |")
    print("|---|---|---|---|---|---|")
    for k in ks:
        a = np.array(stats[k])
        print(f"| {k} | {a[:, 0].mean():.4f} | {np.percentile(a[:, 0], 10):.4f} | {a[:, 1].mean():.4f} | "
              f"{np.percentile(a[:, 1], 90):.4f} | {a[:, 2].min():.4f} |")


if __name__ == "__main__":
    main()
