"""Time and peak memory of the latent alignment W_a (selar_local/alignment.py) on one model,
computed from scratch (no cache read or written) and then read from a fresh cache.

    nice -n 10 .venv/bin/python benchmarks/latent_alignment.py [MODEL] [--kind ridge|identity]

MODEL: a registry name or a .gguf path (default qwen2.5-coder-1.5b-instruct). Peak memory is
the process's maximum resident set (ru_maxrss) after the computation, against the resident
set just before it (the imports and the interpreter), so the difference is what the
computation added; the tables' float32 size is printed beside it for scale.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--kind", default="ridge", choices=("ridge", "identity"))
    args = parser.parse_args()

    import numpy as np

    from selar_local.alignment import TensorRows, alignment_sources, load_alignment
    from selar_local.gguf_index import GGUFIndex
    from selar_local.registry import get_entry, local_path

    path = Path(args.model) if args.model.endswith(".gguf") else local_path(get_entry(args.model))
    if path is None:
        raise SystemExit(f"{args.model} is not on this machine: `selar pull {args.model}` first")
    index = GGUFIndex(path)
    sources = alignment_sources(index)
    tables = {name: TensorRows(index, name) for name in {sources.output, sources.input}}
    table_mb = sum(t.n_rows * t.width * 4 for t in tables.values()) / 2**20
    before = resident_mb()
    start = time.perf_counter()
    alignment = load_alignment(path, args.kind, use_cache=False, progress=True)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SELAR_CACHE_DIR"] = cache
        from selar_local.alignment import _write_cache, cache_file
        from selar_local.download import file_sha256

        _write_cache(cache_file(file_sha256(path), args.kind, alignment.lam), kind=args.kind, lam=alignment.lam,
                     matrix=alignment.matrix, norm=alignment.target_norm)
        start = time.perf_counter()
        cached = load_alignment(path, args.kind)
        cached_s = time.perf_counter() - start
    same = alignment.matrix is None or np.array_equal(cached.matrix, alignment.matrix)
    print(f"model: {path.name} ({index.architecture}); tables: "
          + ", ".join(f"{t.name} {t.quant_type} {t.n_rows} x {t.width}" for t in tables.values())
          + f" ({table_mb:.0f} MB as float32); tied: {sources.tied}")
    print(f"| alignment | compute s | resident before MB | peak resident MB | added MB | cached load s |")
    print(f"|---|---|---|---|---|---|")
    print(f"| {args.kind} | {elapsed:.1f} | {before:.0f} | {peak:.0f} | {peak - before:.0f} | {cached_s:.3f} |")
    print(f"cache round trip identical: {same}; target norm {alignment.target_norm:.4f}, "
          f"input scale {alignment.input_scale:g}")


if __name__ == "__main__":
    main()
