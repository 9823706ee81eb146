"""Input-embedding rows E[v], read from the GGUF file and dequantised on demand.

Only the rows a step needs are dequantised (a 150k x 4k table is 2.4 GB in float32),
through a bounded LRU cache. Rows are returned as the model itself sees them: where
llama.cpp scales token inputs inside the graph but not embedding inputs (the Gemma
family multiplies by sqrt(n_embd)), the rows are pre-scaled here.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from selar_local.errors import ModelLoadError
from selar_local.gguf_index import GGUFIndex

TOKEN_EMBEDDING = "token_embd.weight"

# Architectures whose graph multiplies token inputs by sqrt(n_embd) on the token path
# only (llama.cpp's build_inp_embd). Verified at load by the self-check anyway.
SQRT_SCALED_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "gemma3n", "gemma4", "gemma-embedding"})


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
        self._qtype = location.qtype
        self.quant_type = location.qtype.name
        self.n_embd = int(location.shape[0])
        self.n_vocab = int(location.shape[1])
        self.scale = float(scale)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_rows = max(64, cache_bytes // (4 * self.n_embd))

    def rows(self, ids) -> np.ndarray:
        """float32 rows (len(ids), n_embd) for the given token ids, cached."""
        ids = [int(i) for i in ids]
        missing = [i for i in dict.fromkeys(ids) if i not in self._cache]
        if missing:
            self._check_ids(missing)
            fresh = self._dequantize(self._raw[missing], self._qtype).astype(np.float32, copy=False)
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

    def mix(self, ids, weights: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """sum_i weights[i] * E[ids[i]], accumulated in float32 (into `out` if given)."""
        rows = self.rows(ids)
        return np.dot(np.asarray(weights, dtype=np.float32), rows, out=out)

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.n_vocab]
        if bad:
            raise IndexError(f"token ids out of range [0, {self.n_vocab}): {bad[:5]}")

    @property
    def cached_rows(self) -> int:
        return len(self._cache)
