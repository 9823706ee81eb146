#!/usr/bin/env bash
# The accuracy runs of issues 25 and 26 (docs/BENCHMARKS.md), one after another, each in its
# committed run folder: a folder that exists is resumed (a finished one costs a second), a
# missing one is started with the exact settings below. Runs at nice 19, so tests and other
# work keep the CPU; interrupt it at any time (kill -TERM: at most the items in flight are lost,
# and they are decoded again on the next start).
#
#   nohup bash scripts/evidence_runs.sh > runs.log 2>&1 &      # from the repository root
#   bash scripts/evidence_runs.sh --list                       # items each folder holds, of how many
#
# Qwen2.5-Coder-1.5B-Instruct (`selar pull qwen2.5-coder-1.5b-instruct`), GSM8K test, the
# published sampling (T 0.6, top-k 20, top-p 0.95, seed 41), prompt format 2, 16 sequences per
# decode on 2 threads: the settings of every GSM8K table on that page. The frac runs use 1024
# tokens (frac answers grow with alpha: at 512, 66% of alpha 0.1's were cut), with their own
# 1024-token cot and cot maj@5 to pair with; frac maj@5 draws alpha per sample in [0, 0.15] as the paper.
# LatentSeek runs twice: with the model's own grading (the method) and with the paper's perfect
# sparse reward (psrm: the answer against the reference), which measures the latent search itself.
set -uo pipefail
cd "$(dirname "$0")/.."
selar=".venv/bin/selar"
runs=docs/benchmarks/runs
shared="--model qwen2.5-coder-1.5b-instruct --parallel 16 --threads 2 --seed 41 --temperature 0.6 --top-k 20 --top-p 0.95"
gsm8k() { echo "-d gsm8k --limit $1 --max-tokens $2 $shared"; }  # the first $1 problems, $2 tokens
common=$(gsm8k 200 512)
long=$(gsm8k 200 1024)  # frac: answers grow with alpha
# MATH-500's first 100 problems, 1024 tokens (its answers are longer), tau 0.5
math="-d math500 --limit 100 --max-tokens 1024 $shared --tau 0.5"

# folder | selar bench arguments (the order is the order they run in: the cheap runs that complete
# a table row, then MATH-500's cot / selar / soft (the harder set, where SeLaR's published gains
# are larger: the question this project most needs answered; ahead of latent m 16, whose first
# 63 answers, 5 right, already show where that row lands), then textmas (the last row of the
# GSM8K hidden-state table), the 1000-item maj@5 pairs and the other MATH-500 runs)
jobs=(
  "gsm8k-qwen15-f2-latent8|$common --methods latent --latent-steps 8"
  "gsm8k-qwen15-f2-latent1|$common --methods latent --latent-steps 1 --tau 0.5"
  "gsm8k-qwen15-f2-frac010|$common --methods frac --frac-alpha 0.1"
  "gsm8k-qwen15-f2-t1024-cot|$long --methods cot --tau 0.5"
  "gsm8k-qwen15-f2-t1024-frac010|$long --methods frac --frac-alpha 0.1"
  "gsm8k-qwen15-f2-latentmas1|$common --methods latentmas --latent-steps 1 --tau 0.5"
  "gsm8k-qwen15-f2-latent2|$common --methods latent --latent-steps 2 --tau 0.5"
  "gsm8k-qwen15-f2-maj5-latent1-noise030|$common --methods latent --latent-steps 1 --samples 5 --latent-noise 0.3 --tau 0.5"
  "gsm8k-qwen15-f2-latentseek|$(gsm8k 100 512) --methods latentseek --greedy"
  "gsm8k-qwen15-f2-t1024-frac005|$long --methods frac --frac-alpha 0.05"
  "gsm8k-qwen15-f2-latentseek-psrm|$(gsm8k 100 512) --methods latentseek --greedy --latentseek-grader psrm"
  "gsm8k-qwen15-f2-t1024-frac015|$long --methods frac --frac-alpha 0.15"
  "gsm8k-qwen15-f2-latentmas|$common --methods latentmas --latent-steps 8 --tau 0.5"
  "math500-qwen15-main|$math --methods cot,selar,soft"
  "gsm8k-qwen15-f2-latent16|$common --methods latent --latent-steps 16 --tau 0.5"
  "gsm8k-qwen15-f2-textmas|$common --methods textmas --tau 0.5"
  "gsm8k-qwen15-f2-t1024-maj5-cot|$long --methods cot --samples 5 --tau 0.5"
  "gsm8k-qwen15-f2-t1024-maj5-frac|$long --methods frac --samples 5 --frac-alpha-range 0,0.15"
  "math500-qwen15-latent4|$math --methods latent --latent-steps 4"
  "math500-qwen15-selar-hidden|$math --methods selar --soft-source hidden"
  "math500-qwen15-textmas|$math --methods textmas"
  "math500-qwen15-latentmas|$math --methods latentmas --latent-steps 8"
)

# The value after flag $1 in the argument words $3.., else the default $2: "--limit 200 ..." -> 200
flag_value() {
  local flag=$1 default=$2; shift 2
  while [ $# -gt 1 ]; do [ "$1" = "$flag" ] && { echo "$2"; return; }; shift; done
  echo "$default"
}

if [ "${1:-}" = "--list" ]; then
  for job in "${jobs[@]}"; do
    folder=${job%%|*}
    # shellcheck disable=SC2086  # the arguments are words on purpose
    set -- ${job#*|}
    limit=$(flag_value --limit 0 "$@")
    samples=$(flag_value --samples 1 "$@")
    methods=$(flag_value --methods cot "$@" | tr ',' ' ' | wc -w)
    done_items=$( [ -f "$runs/$folder/results.jsonl" ] && wc -l < "$runs/$folder/results.jsonl" || echo 0)
    echo "$folder: $((done_items)) / $((limit * methods * samples)) items"
  done
  exit 0
fi

# frac needs the model's steering vectors (cached per model file; a second build is a no-op)
nice -n 19 "$selar" steer build --model qwen2.5-coder-1.5b-instruct --threads 2 || exit 1
for job in "${jobs[@]}"; do
  folder=${job%%|*}
  args=${job#*|}
  echo "=== $(date -u +%FT%TZ) $folder"
  if [ -f "$runs/$folder/config.json" ]; then
    nice -n 19 "$selar" bench --resume --out "$runs/$folder" --parallel 16 --threads 2 --no-progress
  else
    # shellcheck disable=SC2086  # the arguments are words on purpose
    nice -n 19 "$selar" bench $args --out "$runs/$folder" --no-progress
  fi
  rc=$?
  echo "=== $(date -u +%FT%TZ) $folder exit $rc"
done
