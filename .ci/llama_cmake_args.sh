#!/usr/bin/env bash
# Prints the CMAKE_ARGS for building llama-cpp-python on this CPU (see patches/README.md:
# ggml's AMX kernels segfault in sandboxed VMs that report AMX but do not grant the tile
# state, so x86 builds list their ISA extensions explicitly instead of -march=native).
set -eu
flags=""
if [ "$(uname -m)" = "x86_64" ] && [ -r /proc/cpuinfo ]; then
  has() { grep -q -w "$1" /proc/cpuinfo; }
  flags="-DGGML_NATIVE=OFF"
  has avx && flags="$flags -DGGML_AVX=ON"
  has avx2 && flags="$flags -DGGML_AVX2=ON"
  has fma && flags="$flags -DGGML_FMA=ON"
  has f16c && flags="$flags -DGGML_F16C=ON"
  has bmi2 && flags="$flags -DGGML_BMI2=ON"
  has avx_vnni && flags="$flags -DGGML_AVX_VNNI=ON"
  if has avx512f && has avx512bw && has avx512vl && has avx512dq; then
    flags="$flags -DGGML_AVX512=ON"
    has avx512vbmi && flags="$flags -DGGML_AVX512_VBMI=ON"
    has avx512_vnni && flags="$flags -DGGML_AVX512_VNNI=ON"
    has avx512_bf16 && flags="$flags -DGGML_AVX512_BF16=ON"
  fi
fi
# The RPC backend (issue 13, docs/DISTRIBUTED.md): splits a model over several machines.
# Built everywhere; it costs nothing until `--rpc` names a server.
flags="$flags -DGGML_RPC=ON"
echo "$flags"
