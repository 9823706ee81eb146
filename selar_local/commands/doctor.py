"""`selar doctor`: can this llama.cpp build run soft decoding on this model? Prints the
build, the model's facts, the embedding rows and the soft-embedding self-check, then a
verdict. Exit code 0 when soft decoding (selar, soft, moi) is supported, 1 otherwise."""
from __future__ import annotations

import argparse
import math
import sys

from selar_local.commands.common import add_model_arguments, runtime_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor", help="check the llama.cpp build and whether a model supports soft decoding",
        description="Print the llama.cpp build, the model's architecture, vocabulary, embedding-row type and "
                    "input scale, and the soft-embedding self-check (feeding E[v] as an embedding must give "
                    "the logits of feeding token v). Exit code 0 when soft decoding is supported, 1 otherwise.",
    )
    add_model_arguments(parser)
    parser.set_defaults(func=run, n_ctx=512)  # the check needs a few tokens only


def run(args: argparse.Namespace) -> int:
    from selar_local.engine import rpc_supported
    from selar_local.errors import SelarError
    from selar_local.rpc import RPC_PROTO_VERSION
    from selar_local.registry import entry_for_path, resolve_model
    from selar_local.runtime import build_info

    out = sys.stdout
    options = runtime_options(args)  # bad values: one clear error line before anything else
    info = build_info()
    line = "-" * 64
    print(f"llama.cpp build   {info.summary}", file=out)
    if args.verbose:
        print(f"system info       {info.system_info}", file=out)
    print(f"RPC backend       {'built in, protocol ' + '.'.join(map(str, RPC_PROTO_VERSION)) if rpc_supported() else 'not built (GGML_RPC=OFF): --rpc unavailable'}",
          file=out)
    try:
        path = resolve_model(args.model)
    except SelarError as exc:
        print(f"model             {args.model or '(default)'}: {exc}", file=out)
        print(line, file=out)
        print("VERDICT: FAIL - the model cannot be found", file=out)
        return 1
    entry = entry_for_path(path)
    print(f"model file        {path}", file=out)
    if entry is not None:
        print(f"registry entry    {entry.name}" + ("" if entry.is_verified else " (unverified: no sha256 recorded)"),
              file=out)
    try:
        from selar_local.runtime import Runtime, available_cpus

        runtime = Runtime(path, **options)
    except SelarError as exc:
        print(line, file=out)
        print(f"VERDICT: FAIL - llama.cpp cannot load this model: {exc}", file=out)
        return 1
    try:
        model, check, table = runtime.model, runtime.self_check, runtime.table
        print(f"model             {model.name} ({model.description})", file=out)
        if model.devices:
            print(f"offload devices   {'; '.join(d.summary for d in model.devices)}", file=out)
        print(f"architecture      {model.architecture}", file=out)
        print(f"vocabulary        n_vocab={model.n_vocab}, eog tokens={len(model.eog_ids)}", file=out)
        print(f"embedding width   n_embd_inp={model.n_embd_inp}, n_ctx_train={model.n_ctx_train}", file=out)
        decode_threads, batch_threads = runtime.threads
        print(f"threads           {decode_threads} for decoding, {batch_threads} for prompts "
              f"({available_cpus()} CPUs available); prompt chunk {runtime.prefill_chunk} tokens while others "
              f"decode; prompt cache {'on' if runtime.slots.enabled else 'off'}; KV cache "
              f"{'unified' if runtime.context.kv_unified else 'one stream per sequence'}", file=out)
        if table is not None:
            print(f"embedding rows    token_embd.weight {table.quant_type}, {table.n_vocab} x {table.n_embd}, "
                  f"input scale {_scale(check.scale if check.passed else table.scale, model.n_embd_inp)}", file=out)
        else:
            print("embedding rows    not read (this architecture cannot take embedding inputs)", file=out)
        diff = "n/a" if math.isnan(check.max_abs_diff) else f"{check.max_abs_diff:.3g}"
        print(f"self-check        {'PASS' if check.passed else 'FAIL'}: max |logit diff| = {diff} "
              f"({check.detail})", file=out)
        template = model.chat_template()
        source = "from the model" if template else "none in the file (llama.cpp's built-in one for the family)"
        print(f"chat template     {source}", file=out)
        span = runtime.thinking_span
        markers = f"{span.markers.open!r} ... {span.markers.close!r}" if span is not None else "none"
        print(f"thinking markers  {markers}", file=out)
        print(f"sampler defaults  {runtime.sampler.describe()}", file=out)
        print(f"default tau       {runtime.sampler.tau_choice(runtime.default_params()).describe()}", file=out)
        print(line, file=out)
        if check.passed:
            print(f"VERDICT: OK - soft decoding is supported on {model.architecture}: "
                  "--method selar, soft, moi and cot all run", file=out)
            return 0
        print(f"VERDICT: NOT SUPPORTED - soft decoding cannot run on this model ({check.detail}); "
              "only --method cot works", file=out)
        return 1
    finally:
        runtime.close()


def _scale(scale: float, n_embd: int) -> str:
    if scale == 1.0:
        return "1 (rows used as stored)"
    if abs(scale - math.sqrt(n_embd)) < 1e-6:
        return f"{scale:g} = sqrt(n_embd) (applied to rows: llama.cpp scales token inputs only)"
    return f"{scale:g}"
