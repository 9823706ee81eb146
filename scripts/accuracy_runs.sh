#!/usr/bin/env bash
# The GSM8K runs of issue 12 on Qwen2.5-Coder-0.5B, one after the other, each resumable: run this
# script again after a kill and every run continues where it stopped (finished runs are skipped
# in seconds). Results go to docs/benchmarks/runs/; `selar bench report` joins them with the
# existing cot/selar/soft run of the same model and data set.
#   nohup nice -n 19 bash scripts/accuracy_runs.sh > /tmp/accuracy_runs.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct}
# f2: prompt format 2 (the GGUF's Jinja template; docs/BENCHMARKS.md "Prompt formats"). The
# format-1 folders (gsm8k-qwen05, -greedy-cot, -swir) are kept for their own comparisons.
TAG=${TAG:-qwen05-f2}
RUNS=docs/benchmarks/runs
COMMON=(--dataset gsm8k --model "$MODEL" --threads "${THREADS:-1}" --no-progress --resume)

bench() {  # bench NAME ARGS...: one resumable run folder
  local name=$1; shift
  echo "== $(date -u +%FT%TZ) $name"
  PYTHONPATH=$PWD "$PY" -m selar_local.cli bench "${COMMON[@]}" --out "$RUNS/gsm8k-$TAG-$name" "$@"
}

# The baselines of this prompt format first: sampled cot, selar and soft, and greedy cot.
bench main --limit 200 --methods cot,selar,soft --parallel 8
bench greedy-cot --limit 200 --methods cot --greedy --parallel 8
# SwiReasoning with W = 64: the published W = 512 was set for 32k-token budgets; with 512 tokens
# it would allow at most one latent block.
bench swir --limit 200 --methods swir --swir-window 64 --parallel 8
bench selar-tau-auto --limit 200 --methods selar --tau auto --parallel 8
bench soft-gumbel --limit 200 --methods soft --soft-noise gumbel --parallel 8
bench moi --limit 200 --methods moi --parallel 8
for tau in 0.3 0.7 0.9; do
  bench "selar-tau${tau/./}" --limit 100 --methods selar --tau "$tau" --parallel 8
done
bench maj5 --limit 200 --methods cot,selar --samples 5 --parallel 10
echo "== $(date -u +%FT%TZ) all runs done"
