"""Input-embedding rows E[v], read from the GGUF file and dequantised on demand.

Only the rows a step needs are dequantised (a 150k x 4k table is 2.4 GB in float32),
through a bounded LRU cache. Rows are returned as the model itself sees them: where
llama.cpp scales token inputs inside the graph but not embedding inputs (the Gemma
family multiplies by sqrt(n_embd)), the rows are pre-scaled here.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from selar_local.errors import ModelLoadError
from selar_local.gguf_index import GGUFIndex

TOKEN_EMBEDDING = "token_embd.weight"

# Architectures whose graph multiplies token inputs by sqrt(n_embd) on the token path
# only (llama.cpp's build_inp_embd). Verified at load by the self-check anyway.
SQRT_SCALED_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "gemma3n", "gemma4", "gemma-embedding"})


def undequantisable_reason(name: str, qtype) -> str | None:
    """Why the rows of tensor `name` cannot be read here, or None when they can. llama.cpp runs
    some types the installed gguf-py cannot dequantise (Q1_0): such a model still decodes
    tokens, but no method can feed or read its table rows."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
    except NotImplementedError:
        return f"{name} is stored as {qtype.name}, which the installed gguf-py cannot dequantise"
    return None


def input_scale_for(architecture: str, n_embd: int) -> float:
    return math.sqrt(n_embd) if architecture in SQRT_SCALED_ARCHITECTURES else 1.0


class EmbeddingTable:
    """Dequantised rows of `token_embd.weight` with a bounded cache."""

    def __init__(self, path: str | Path, *, scale: float = 1.0, cache_bytes: int = 64 << 20):
        from gguf.quants import dequantize

        index = GGUFIndex(path)
        location = index.tensors.get(TOKEN_EMBEDDING)
        if location is None:
            raise ModelLoadError(f"{path} has no {TOKEN_EMBEDDING} tensor: soft decoding needs the input embeddings")
        self._dequantize = dequantize
        self._raw = index.raw_rows(TOKEN_EMBEDDING)  # memory-mapped rows of raw (quantised) bytes
        # Missing rows are read with pread, not through the memory map: a page fault on
        # the map pulls in its neighbours too (fault-around and read-ahead), so 200
        # random rows of SmolLM2's 30 MB table added 29 MB to the resident set; pread
        # adds only the rows kept in the cache below.
        self._row_bytes = int(location.row_bytes)
        self._row_offset = int(location.offset)
        self._fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_BINARY", 0)) if hasattr(os, "pread") else None
        self._qtype = location.qtype
        self.quant_type = location.qtype.name
        self.n_embd = int(location.shape[0])
        self.n_vocab = int(location.shape[1])
        self.scale = float(scale)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_rows = max(64, cache_bytes // (4 * self.n_embd))

    @property
    def unreadable(self) -> str | None:
        """Why these rows cannot be dequantised here (undequantisable_reason), or None."""
        return undequantisable_reason(TOKEN_EMBEDDING, self._qtype)

    def rows(self, ids) -> np.ndarray:
        """float32 rows (len(ids), n_embd) for the given token ids, cached."""
        ids = [int(i) for i in ids]
        missing = [i for i in dict.fromkeys(ids) if i not in self._cache]
        if missing:
            self._check_ids(missing)
            fresh = self._dequantize(self._read_raw(missing), self._qtype).astype(np.float32, copy=False)
            fresh = fresh.reshape(len(missing), self.n_embd)
            if self.scale != 1.0:
                fresh = fresh * np.float32(self.scale)
            for token, row in zip(missing, fresh):
                self._cache[token] = row
        out = np.empty((len(ids), self.n_embd), dtype=np.float32)
        for k, token in enumerate(ids):
            out[k] = self._cache[token]
            self._cache.move_to_end(token)
        while len(self._cache) > self.cache_rows:
            self._cache.popitem(last=False)
        return out

    def row(self, token: int) -> np.ndarray:
        """One cached row (read-only view of the cache; copy before modifying)."""
        row = self._cache.get(token)
        if row is None:
            return self.rows((token,))[0]
        self._cache.move_to_end(token)
        return row

    def mix(self, ids, weights: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """sum_i weights[i] * E[ids[i]], accumulated in float32 (into `out` if given)."""
        rows = self.rows(ids)
        return np.dot(np.asarray(weights, dtype=np.float32), rows, out=out)

    def dense(self) -> np.ndarray:
        """The whole table dequantised, (n_vocab, n_embd) float32, bypassing the cache. Decoding
        never needs it (152k x 896 floats are 0.5 GB); measurements of full-vocabulary
        mixtures do (scripts/measure_swir_topk.py)."""
        table = self._dequantize(np.asarray(self._raw), self._qtype).astype(np.float32, copy=False)
        table = table.reshape(self.n_vocab, self.n_embd)
        return table * np.float32(self.scale) if self.scale != 1.0 else table

    def _read_raw(self, ids: list[int]) -> np.ndarray:
        """Raw (quantised) bytes of the given rows, shape (len(ids), row_bytes)."""
        if self._fd is None:  # no pread (Windows): read through the map
            return self._raw[ids]
        size, base = self._row_bytes, self._row_offset
        out = np.empty((len(ids), size), dtype=np.uint8)
        for k, token in enumerate(ids):
            data = os.pread(self._fd, size, base + token * size)
            if len(data) != size:
                raise ModelLoadError(f"short read of embedding row {token}: the model file is truncated")
            out[k] = np.frombuffer(data, dtype=np.uint8)
        return out

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise IndexError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")

    @property
    def cached_rows(self) -> int:
        return len(self._cache)
