"""The map from the model's final hidden state back into its input-embedding space.

A hidden state h (llama.cpp's `result_norm`, read with LlamaContext.hidden) is not an
input embedding: it lives where the output matrix reads, so feeding it as is puts the
model off its input distribution. LatentMAS's training-free "latent space realignment"
solves for the matrix that sends each output row W_out[v] to its input row W_in[v]:

    W_a = argmin ||W_out W - W_in||^2 + lambda ||W||^2 = (W_out^T W_out + lambda I)^-1 W_out^T W_in

(ridge, lambda 1e-5), then feeds a = h W_a rescaled to the mean norm of the input rows, times
the architecture's input scale (Gemma's sqrt(n_embd), which llama.cpp applies to token
inputs only: embeddings.input_scale_for). Tied models have W_out = W_in, and W_a is then
I - lambda (G + lambda I)^-1, the identity up to lambda over G's smallest eigenvalue.
`identity` alignment (a = h, rescaled and scaled the same way) is the published ablation.

Bounded memory: the two tables (152k x 1536 floats are 0.9 GB each on Qwen2.5-1.5B) are
never held; their rows are read in blocks with pread into one reused buffer (no memory
map, whose touched pages would count against the process), dequantised, and folded into
the d x d sums G = W_out^T W_out and C = W_out^T W_in. Each block's products are float32
(BLAS), the running sums float64, and the d x d solve float64 (d = 1536: 19 MB), so
that summing 152k rows does not lose the small eigenvalues; the result is stored float32.
Results are cached per model file (sha256) under cache_dir()/latent-align, written to a
temporary file and renamed, so an interrupted run leaves no cache and a damaged file is
recomputed.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from selar_local.embeddings import TOKEN_EMBEDDING, input_scale_for, undequantisable_reason
from selar_local.errors import InvalidParameterError, ModelLoadError, UnsupportedModelError
from selar_local.gguf_index import GGUFIndex
from selar_local.latent_steps import aligned_input

OUTPUT_WEIGHT = "output.weight"
ALIGN_LAMBDA = 1e-5
ALIGN_KINDS = ("ridge", "identity")
ALIGNMENT_VERSION = 1
BLOCK_BYTES = 32 << 20  # float32 bytes of one block of rows, per table

log = logging.getLogger(__name__)


class TensorRows:
    """The rows of a 2-D GGUF tensor (one per token), dequantised to float32 block by block."""

    def __init__(self, index: GGUFIndex, name: str):
        from gguf.quants import dequantize

        location = index.tensors.get(name)
        if location is None:
            raise ModelLoadError(f"{index.path} has no tensor {name}")
        if len(location.shape) != 2:
            raise UnsupportedModelError(f"{index.path}: {name} has shape {location.shape}, expected 2-D")
        self.path = index.path
        self.name = name
        self.width = int(location.shape[0])
        self.n_rows = int(location.shape[1])
        self._row_bytes = int(location.row_bytes)
        self._offset = int(location.offset)
        unreadable = undequantisable_reason(name, location.qtype)
        if unreadable is not None:
            raise UnsupportedModelError(f"{index.path}: {unreadable}; the hidden-state methods read this table "
                                        "(use a token-space method such as cot)")
        self._qtype = location.qtype
        self.quant_type = location.qtype.name
        self._dequantize = dequantize
        if self._offset + self.n_rows * self._row_bytes > self.path.stat().st_size:
            raise ModelLoadError(f"{self.path} is truncated: tensor {name} ends past the end of the file")

    def default_block_rows(self) -> int:
        return max(256, BLOCK_BYTES // (4 * self.width))

    def blocks(self, block_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows [n, width]) for consecutive blocks of the whole tensor."""
        block_rows = block_rows or self.default_block_rows()
        buffer = bytearray(block_rows * self._row_bytes)
        with self.path.open("rb", buffering=0) as handle:
            handle.seek(self._offset)
            for start in range(0, self.n_rows, block_rows):
                n = min(block_rows, self.n_rows - start)
                view = memoryview(buffer)[: n * self._row_bytes]
                if handle.readinto(view) != len(view):
                    raise ModelLoadError(f"short read of {self.name} rows {start}..{start + n}: the file is truncated")
                raw = np.frombuffer(buffer, dtype=np.uint8, count=len(view)).reshape(n, self._row_bytes)
                rows = self._dequantize(raw, self._qtype).astype(np.float32, copy=False)
                yield start, rows.reshape(n, self.width)


@dataclass(frozen=True)
class AlignmentSources:
    """Which tensors of a GGUF file the alignment reads."""

    output: str   # output.weight, or token_embd.weight for a tied model
    input: str    # token_embd.weight
    tied: bool


def alignment_sources(index: GGUFIndex) -> AlignmentSources:
    """The output and input tables of a model, or a clear error where it has none to align."""
    tensors = index.tensors
    if TOKEN_EMBEDDING not in tensors:
        raise UnsupportedModelError(
            f"{index.path} has no {TOKEN_EMBEDDING}: hidden-state methods feed input embeddings, and this "
            "model has no table of them (use a token-space method such as cot)")
    if OUTPUT_WEIGHT not in tensors:
        # llama.cpp ties the output matrix to the input table when the file has no output.weight
        return AlignmentSources(TOKEN_EMBEDDING, TOKEN_EMBEDDING, True)
    out, inp = tensors[OUTPUT_WEIGHT], tensors[TOKEN_EMBEDDING]
    if len(out.shape) != 2 or len(inp.shape) != 2 or out.shape[1] != inp.shape[1]:
        raise UnsupportedModelError(
            f"{index.path}: {OUTPUT_WEIGHT} {tuple(out.shape)} and {TOKEN_EMBEDDING} {tuple(inp.shape)} do not have "
            "one row per token each, so the output rows cannot be matched to the input rows")
    return AlignmentSources(OUTPUT_WEIGHT, TOKEN_EMBEDDING, False)


@dataclass(frozen=True)
class LatentAlignment:
    """How a hidden state becomes the next input: a = input_scale * target_norm * u/||u||, u = h W_a."""

    kind: str                   # "ridge" or "identity"
    matrix: np.ndarray | None   # W_a, [n_hidden, n_embd_in] float32; None for identity
    target_norm: float          # mean L2 norm of the (unscaled) input rows
    input_scale: float          # the architecture's token-input scale (Gemma: sqrt(n_embd))
    lam: float
    tied: bool
    n_hidden: int
    n_embd: int

    def apply(self, hidden: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The input rows for hidden states [n, n_hidden] (or one [n_hidden] vector)."""
        return aligned_input(hidden, self.matrix, self.target_norm * self.input_scale, out=out)

    @property
    def fed_norm(self) -> float:
        """The L2 norm of every fed vector (before any latent noise)."""
        return self.target_norm * self.input_scale


def compute_ridge(output_rows: TensorRows, input_rows: TensorRows | None, *, lam: float = ALIGN_LAMBDA,
                  block_rows: int | None = None, progress: bool = False) -> tuple[np.ndarray, float]:
    """W_a (float32) and the mean input-row norm, streaming both tables once. input_rows
    None: a tied model (the output table is the input table: one product per block)."""
    from tqdm import tqdm

    tied = input_rows is None
    source_in = output_rows if tied else input_rows
    if not tied and input_rows.n_rows != output_rows.n_rows:
        raise UnsupportedModelError(f"{output_rows.n_rows} output rows against {input_rows.n_rows} input rows")
    d_out, d_in = output_rows.width, source_in.width
    gram = np.zeros((d_out, d_out), dtype=np.float64)
    cross = gram if tied else np.zeros((d_out, d_in), dtype=np.float64)
    norm_sum = 0.0
    block_rows = block_rows or output_rows.default_block_rows()
    inputs = None if tied else input_rows.blocks(block_rows)
    label = f"latent alignment {output_rows.path.name}"
    with tqdm(total=output_rows.n_rows, unit="rows", unit_scale=True, desc=label, disable=not progress,
              leave=False) as bar:
        for start, w_out in output_rows.blocks(block_rows):
            w_in = w_out if tied else next(inputs)[1]
            gram += w_out.T @ w_out
            if not tied:
                cross += w_out.T @ w_in
            norm_sum += float(np.linalg.norm(w_in, axis=1).astype(np.float64).sum())
            bar.update(w_out.shape[0])
    regularised = gram + lam * np.eye(d_out)
    matrix = np.linalg.solve(regularised, cross)
    if not np.isfinite(matrix).all():
        raise UnsupportedModelError(f"{output_rows.path}: the alignment solve gave non-finite values")
    return matrix.astype(np.float32), norm_sum / source_in.n_rows


def mean_row_norm(rows: TensorRows, *, block_rows: int | None = None, progress: bool = False) -> float:
    from tqdm import tqdm

    total = 0.0
    with tqdm(total=rows.n_rows, unit="rows", unit_scale=True, desc=f"input-row norms {rows.path.name}",
              disable=not progress, leave=False) as bar:
        for _, block in rows.blocks(block_rows):
            total += float(np.linalg.norm(block, axis=1).astype(np.float64).sum())
            bar.update(block.shape[0])
    return total / rows.n_rows


# -- the cache ----------------------------------------------------------------------------
def cache_file(model_sha256: str, kind: str, lam: float) -> Path:
    from selar_local.download import cache_dir

    detail = f"ridge-lam{lam:g}" if kind == "ridge" else kind
    return cache_dir() / "latent-align" / f"{model_sha256}-{detail}-v{ALIGNMENT_VERSION}.npz"


def _read_cache(path: Path, *, kind: str, lam: float, shape: tuple[int, int]) -> tuple[np.ndarray | None, float] | None:
    """The cached matrix and norm, or None when absent or not a complete, matching result."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != ALIGNMENT_VERSION or str(data["kind"]) != kind:
                raise ValueError("another version or kind")
            norm = float(data["target_norm"])
            matrix = None
            if kind == "ridge":
                if float(data["lam"]) != lam:
                    raise ValueError("another lambda")
                matrix = np.array(data["matrix"], dtype=np.float32)
                if matrix.shape != shape or not np.isfinite(matrix).all():
                    raise ValueError(f"matrix of shape {matrix.shape}, expected {shape}")
        if not (np.isfinite(norm) and norm > 0):
            raise ValueError(f"target norm {norm}")
        return matrix, norm
    except Exception as exc:  # a damaged file of any kind (zip, header, values): recompute
        log.warning("ignoring the damaged latent-alignment cache %s (%s); computing it again", path, exc)
        return None


def _write_npz(handle, **arrays) -> None:
    np.savez(handle, **arrays)


def _write_cache(path: Path, *, kind: str, lam: float, matrix: np.ndarray | None, norm: float) -> None:
    """Atomically: a temporary file in the same folder, flushed, then renamed over the name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    arrays = dict(version=np.int64(ALIGNMENT_VERSION), kind=np.str_(kind), lam=np.float64(lam),
                  target_norm=np.float64(norm))
    if matrix is not None:
        arrays["matrix"] = matrix
    try:
        with tmp.open("wb") as handle:
            _write_npz(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_alignment(model_path: str | os.PathLike, kind: str = "ridge", *, lam: float = ALIGN_LAMBDA,
                   use_cache: bool = True, progress: bool = False, block_rows: int | None = None,
                   n_hidden: int | None = None) -> LatentAlignment:
    """The model's alignment: from the cache (keyed by the file's sha256, kind and lambda)
    or computed and cached. n_hidden: the hidden-state width llama.cpp reports, checked
    against the output table's."""
    if kind not in ALIGN_KINDS:
        raise InvalidParameterError(f"unknown latent alignment {kind!r}: expected one of {', '.join(ALIGN_KINDS)}")
    if not (np.isfinite(lam) and lam > 0):
        raise InvalidParameterError(f"invalid ridge lambda {lam!r}: expected a positive number")
    path = Path(model_path)
    index = GGUFIndex(path)
    sources = alignment_sources(index)
    output_rows = TensorRows(index, sources.output)
    input_rows = TensorRows(index, sources.input)
    d_hidden, d_in = output_rows.width, input_rows.width
    if n_hidden is not None and n_hidden != d_hidden:
        raise UnsupportedModelError(f"{path}: the hidden state has {n_hidden} values but {sources.output} rows have "
                                    f"{d_hidden}")
    if kind == "identity" and d_hidden != d_in:
        raise UnsupportedModelError(f"{path}: identity alignment needs the hidden width ({d_hidden}) to equal the "
                                    f"input width ({d_in}); use ridge")
    scale = input_scale_for(index.architecture, d_in)
    cached = None
    if use_cache:
        from selar_local.download import file_sha256

        cache = cache_file(file_sha256(path, progress=progress), kind, lam)
        cached = _read_cache(cache, kind=kind, lam=lam, shape=(d_hidden, d_in))
    if cached is not None:
        matrix, norm = cached
    else:
        if kind == "ridge":
            matrix, norm = compute_ridge(output_rows, None if sources.tied else input_rows, lam=lam,
                                         block_rows=block_rows, progress=progress)
        else:
            matrix, norm = None, mean_row_norm(input_rows, block_rows=block_rows, progress=progress)
        if use_cache:
            _write_cache(cache, kind=kind, lam=lam, matrix=matrix, norm=norm)
    return LatentAlignment(kind, matrix, norm, scale, lam, sources.tied, d_hidden, d_in)
