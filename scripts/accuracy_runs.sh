#!/usr/bin/env bash
# The GSM8K runs of issue 12 on Qwen2.5-Coder-0.5B and -1.5B, one after the other, each
# resumable: run this script again after a kill and every run continues where it stopped
# (finished runs are skipped in seconds). Results go to docs/benchmarks/runs/; `selar bench
# report` joins the runs of one model and data set (docs/BENCHMARKS.md, "Issue 12").
#   THREADS=1 nohup nice -n 19 bash scripts/accuracy_runs.sh qwen05 > /tmp/acc05.log 2>&1 &
#   THREADS=1 nohup nice -n 19 bash scripts/accuracy_runs.sh qwen15 > /tmp/acc15.log 2>&1 &
# Order: the single-sample methods on the 0.5B model, then the baselines of the 1.5B model
# (cot, selar, soft, greedy cot: the pair where the fixed gate was seen to hurt), the tau sweeps
# on both, the rest of the 1.5B methods, and the five-sample runs last (the longest).
# --parallel 16: on this 2-core machine with one thread, 16 sequences of Qwen2.5-Coder-0.5B decode
# 92 tokens/s in all against 58 for 8 (32: 97); the accuracy figures do not depend on it.
set -euo pipefail
cd "$(dirname "$0")/.."
# Started with setsid (or from another terminal) the job has its own scheduler autogroup, and
# `nice` only ranks processes inside one group: lower the whole group too, so that the machine's
# interactive work (tests, builds) comes first. Not an error where the kernel has no autogroups.
echo 19 2>/dev/null > /proc/self/autogroup || true
PY=${PY:-.venv/bin/python}
RUNS=docs/benchmarks/runs
# Tags: f2 = prompt format 2 (the GGUF's Jinja template; docs/BENCHMARKS.md "Prompt formats").
# The format-1 folders (gsm8k-qwen05, -greedy-cot, -swir) are kept for their own comparisons.
declare -A MODEL=([qwen05-f2]=qwen2.5-coder-0.5b-instruct [qwen15-f2]=qwen2.5-coder-1.5b-instruct)

FAILED=()
bench() {  # bench TAG NAME ARGS...: one resumable run folder
  local tag=$1 name=$2; shift 2
  echo "== $(date -u +%FT%TZ) $tag $name"
  # A run that fails is reported and the queue goes on (one refused resume once idled a core
  # for the rest of a session); the script exits 1 at the end if any did.
  PYTHONPATH=$PWD "$PY" -m selar_local.cli bench --dataset gsm8k --model "${MODEL[$tag]}" \
    --threads "${THREADS:-1}" --no-progress --resume --out "$RUNS/gsm8k-$tag-$name" "$@" \
    || { echo "== $(date -u +%FT%TZ) FAILED (exit $?): $tag $name"; FAILED+=("$tag-$name"); }
}

baselines() {  # sampled cot, selar and soft, and greedy cot
  bench "$1" main --limit 200 --methods cot,selar,soft --parallel 16
  bench "$1" greedy-cot --limit 200 --methods cot --greedy --parallel 16
}

single_sample_methods() {
  # SwiReasoning with W = 64: the published W = 512 was set for 32k-token budgets; with 512
  # tokens it would allow at most one latent block.
  bench "$1" swir --limit 200 --methods swir --swir-window 64 --parallel 16
  bench "$1" selar-tau-auto --limit 200 --methods selar --tau auto --parallel 16
  bench "$1" soft-gumbel --limit 200 --methods soft --soft-noise gumbel --parallel 16
  bench "$1" moi --limit 200 --methods moi --parallel 16
}

tau_sweep() {  # tau 0.5 is the main run's selar; auto is its own run
  for tau in 0.3 0.7 0.9; do
    bench "$1" "selar-tau${tau/./}" --limit 100 --methods selar --tau "$tau" --parallel 16
  done
}

qwen05() {
  baselines qwen05-f2
  single_sample_methods qwen05-f2
  tau_sweep qwen05-f2
  bench qwen05-f2 maj5 --limit 200 --methods cot,selar --samples 5 --parallel 20
  # Then half of the 1.5B model's five-sample runs, so that both cores stay busy to the end.
  bench qwen15-f2 maj5-selar --limit 200 --methods selar --samples 5 --parallel 20
}

qwen15() {
  baselines qwen15-f2
  tau_sweep qwen15-f2
  single_sample_methods qwen15-f2
  bench qwen15-f2 maj5-cot --limit 200 --methods cot --samples 5 --parallel 20
}

# Two queues (`bash scripts/accuracy_runs.sh qwen05` and `... qwen15` as two background jobs, one
# core each), of about the same length (~9 hours from the state of 2026-11-23 17:30); no two of
# their runs write one folder. No argument runs both in turn.
case "${1:-all}" in
  qwen05) qwen05 ;;
  qwen15) qwen15 ;;
  all) qwen05; qwen15 ;;
  *) echo "usage: $0 [qwen05|qwen15|all]" >&2; exit 2 ;;
esac
if ((${#FAILED[@]})); then
  echo "== $(date -u +%FT%TZ) ${1:-all}: ${#FAILED[@]} run(s) failed: ${FAILED[*]}"
  exit 1
fi
echo "== $(date -u +%FT%TZ) ${1:-all} runs done"
