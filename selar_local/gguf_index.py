"""Where a tensor lives in a GGUF file, found by walking the header once.

`gguf.GGUFReader` builds a numpy view for every metadata item: measured 8.7 s on an
idle core for SmolLM2's 49k-token vocabulary (16 s on a busy one), and it grows with
the vocabulary (Gemma 3 has 262k). Loading must not cost that, so this walks the
header with `struct`, skipping values, and memory-maps only the tensor it needs. The
gguf package still supplies the type tables and the dequantisation kernels.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from selar_local.errors import ModelLoadError

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class TensorLocation:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]   # GGUF order: shape[0] is the row width
    offset: int              # absolute byte offset in the file

    @property
    def row_bytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[0] // block * type_size


class _Cursor:
    def __init__(self, buffer: mmap.mmap):
        self.buf = buffer
        self.pos = 0

    def take(self, fmt: str):
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> bytes:
        length = self.take("<Q")
        out = self.buf[self.pos:self.pos + length]
        self.pos += length
        return out

    def skip_value(self, vtype: int) -> None:
        if vtype == GGUFValueType.STRING:
            length = self.take("<Q")  # read first: `pos += take()` would add to the stale pos
            self.pos += length
        elif vtype == GGUFValueType.ARRAY:
            item_type, count = self.take("<IQ")
            if item_type in _SCALAR_SIZES:
                self.pos += _SCALAR_SIZES[GGUFValueType(item_type)] * count
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        else:
            self.pos += _SCALAR_SIZES[GGUFValueType(vtype)]


class GGUFIndex:
    """Metadata strings/ints of interest and the location of every tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with self.path.open("rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self.metadata, self.tensors = self._walk(_Cursor(self._map))
        except (struct.error, ValueError, KeyError, OSError) as exc:
            raise ModelLoadError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): {exc}") from exc

    def _walk(self, cur: _Cursor):
        if cur.take("<4s") != b"GGUF":
            raise ValueError("missing GGUF magic")
        version, n_tensors, n_kv = cur.take("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string().decode("utf-8")
            vtype = cur.take("<I")
            if vtype == GGUFValueType.STRING and not key.startswith("tokenizer."):
                metadata[key] = cur.string().decode("utf-8", errors="replace")
            elif vtype in (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64):
                metadata[key] = cur.take({4: "<I", 5: "<i", 10: "<Q"}[vtype])
            elif vtype == GGUFValueType.FLOAT32:  # e.g. general.sampling.temp
                metadata[key] = cur.take("<f")
            else:
                cur.skip_value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = cur.string().decode("utf-8")
            n_dims = cur.take("<I")
            shape = tuple(cur.take(f"<{n_dims}Q")) if n_dims > 1 else (cur.take("<Q"),)
            qtype, offset = cur.take("<IQ")
            infos.append((name, GGMLQuantizationType(qtype), shape, offset))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        tensors = {name: TensorLocation(name, qt, shape, data_start + off) for name, qt, shape, off in infos}
        return metadata, tensors

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def raw_rows(self, name: str) -> np.ndarray:
        """A read-only (rows, row_bytes) uint8 view of a 2-D tensor, memory-mapped."""
        loc = self.tensors[name]
        n_rows = int(np.prod(loc.shape[1:]))
        end = loc.offset + n_rows * loc.row_bytes
        if end > len(self._map):
            raise ModelLoadError(f"{self.path} is truncated: tensor {name} ends past the end of the file")
        return np.frombuffer(self._map, dtype=np.uint8, count=n_rows * loc.row_bytes,
                             offset=loc.offset).reshape(n_rows, loc.row_bytes)
