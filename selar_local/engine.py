"""The only module that touches ctypes: llama.cpp's C API through llama-cpp-python.

It follows llama.cpp's `examples/simple`: load a model, make a context, tokenise,
decode batches, read logits. Two things are added for latent reasoning: batches of
embedding rows instead of token ids, and per-sequence KV-cache management.

Traps handled here (each measured with llama-cpp-python 0.3.36):
- a batch larger than n_batch aborts the process inside llama.cpp, so it is refused here;
- the arrays behind a `llama_batch` must outlive `llama_decode`, and `llama_batch_free`
  frees whatever the struct points at, so batches are built over numpy arrays owned by
  the context and never passed to `llama_batch_free`;
- a batch with both `token` and `embd` set silently uses the tokens, so the token batch
  and the embedding batch are two structs with exactly one of the two pointers set;
- importing `llama_cpp` installs a log callback that prints to stderr; ours replaces it,
  keeps recent lines for error messages, and stays referenced for the life of the process
  (a collected ctypes callback segfaults on the next log line).
"""
from __future__ import annotations

import collections
import ctypes
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from selar_local.errors import ContextOverflowError, DecodeError, ModelLoadError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
_LOG_LEVEL_ERROR = 3
_LOG_LEVEL_CONT = 5


class _Bindings:
    """Imports llama_cpp once, silences it, and initialises the backend."""

    _lock = threading.Lock()
    _lib = None
    verbose = False
    recent_log: collections.deque[str] = collections.deque(maxlen=64)
    _callback = None  # must stay referenced: llama.cpp keeps the raw pointer
    _last_level = 0

    @classmethod
    def get(cls):
        if cls._lib is None:
            with cls._lock:
                if cls._lib is None:
                    import llama_cpp

                    cls._callback = llama_cpp.llama_log_callback(cls._on_log)
                    llama_cpp.llama_log_set(cls._callback, ctypes.c_void_p(0))
                    llama_cpp.llama_backend_init()
                    cls._lib = llama_cpp
        return cls._lib

    @classmethod
    def _on_log(cls, level: int, text: bytes, _user_data) -> None:
        level = cls._last_level if level == _LOG_LEVEL_CONT else level
        cls._last_level = level
        line = text.decode("utf-8", errors="replace")
        cls.recent_log.append(line)
        if cls.verbose:
            sys.stderr.write(line)

    @classmethod
    def last_errors(cls) -> str:
        lines = [line.strip() for line in cls.recent_log if line.strip()]
        return " | ".join(lines[-3:])


def set_verbose(verbose: bool) -> None:
    """Show llama.cpp's own log on stderr (hidden by default)."""
    _Bindings.verbose = verbose


def llama_lib():
    return _Bindings.get()


@dataclass(frozen=True)
class BuildInfo:
    version: str
    system_info: str
    gpu_offload: bool
    backends: tuple[str, ...]

    @property
    def summary(self) -> str:
        kinds = ", ".join(self.backends) or "CPU"
        return f"llama-cpp-python {self.version}; backends: {kinds}; GPU offload: {'yes' if self.gpu_offload else 'no'}"


def build_info() -> BuildInfo:
    lib = llama_lib()
    system = lib.llama_print_system_info().decode("utf-8", errors="replace")
    backends = []
    for name in ("CUDA", "Metal", "Vulkan", "HIP", "SYCL", "OpenCL", "CANN", "MUSA"):
        if name.upper() in system.upper():
            backends.append(name)
    backends.append("CPU")
    import llama_cpp

    return BuildInfo(llama_cpp.__version__, system.strip(), bool(lib.llama_supports_gpu_offload()), tuple(backends))


def default_threads() -> int:
    """Half the CPUs we may run on (at least 1): roughly the physical cores. ggml's
    threads spin at barriers between graph nodes, so a thread that loses its core to
    another process stalls every node: measured on 2 busy cores, 2 threads gave 1.6
    tokens/s where 1 thread gave 46. Pass n_threads to use more on an idle machine."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        available = os.cpu_count() or 2
    return max(1, available // 2)


def check_gguf_file(path: Path) -> None:
    """Clear errors before llama.cpp sees the file (it only logs, then returns NULL)."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"not a GGUF file: {path} (starts with {magic!r}, expected {GGUF_MAGIC!r}); "
            "convert it with llama.cpp's convert_hf_to_gguf.py or download a .gguf"
        )


class LlamaModel:
    """A loaded GGUF model: weights, vocabulary, metadata, tokeniser, chat template."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = -1, vocab_only: bool = False):
        self.path = Path(path).expanduser()
        check_gguf_file(self.path)
        lib = llama_lib()
        self._lib = lib
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers  # -1: all layers where a GPU backend exists; ignored on CPU
        params.vocab_only = vocab_only
        _Bindings.recent_log.clear()
        handle = lib.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
        if not handle:
            detail = _Bindings.last_errors()
            if "unknown model architecture" in detail:
                raise UnsupportedModelError(f"llama.cpp does not support this model's architecture: {detail}")
            raise ModelLoadError(f"llama.cpp could not load {self.path}: {detail or 'no details logged'}")
        self._handle = handle
        self._vocab = lib.llama_model_get_vocab(handle)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self.n_embd = int(lib.llama_model_n_embd(handle))
        self.n_embd_inp = int(lib.llama_model_n_embd_inp(handle))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(handle))
        self.architecture = self.metadata("general.architecture") or "unknown"
        self.name = self.metadata("general.name") or self.path.stem
        self.description = self._read_string(lambda buf, size: lib.llama_model_desc(handle, buf, size))
        self._pieces: dict[int, bytes] = {}
        self.eog_ids = frozenset(t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(self._vocab, t))
        self.bos_id = int(lib.llama_vocab_bos(self._vocab))
        self.eos_id = int(lib.llama_vocab_eos(self._vocab))

    # -- metadata ---------------------------------------------------------------------
    def metadata(self, key: str) -> str | None:
        lib = self._lib
        value = self._read_string(lambda buf, size: lib.llama_model_meta_val_str(self._handle, key.encode(), buf, size))
        return value

    @staticmethod
    def _read_string(call) -> str | None:
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = call(buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    # -- tokens -----------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            out = (ctypes.c_int32 * capacity)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), out, capacity, add_special, parse_special)
            if n >= 0:
                return list(out[:n])
            capacity = -n

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (may be part of a multi-byte UTF-8 character)."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = buf.raw[:n]
            self._pieces[token] = piece
        return piece

    def token_text(self, token: int, *, special: bool = True) -> str:
        """Display form of a token, special tokens rendered (for traces)."""
        buf = ctypes.create_string_buffer(128)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, 128, 0, special)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def detokenize(self, tokens: Iterable[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def single_token(self, text: str) -> int | None:
        """The id of `text` when it is exactly one (special) token, else None."""
        ids = self.tokenize(text, add_special=False, parse_special=True)
        return ids[0] if len(ids) == 1 else None

    # -- chat -------------------------------------------------------------------------
    def chat_template(self) -> str | None:
        raw = self._lib.llama_model_chat_template(self._handle, None)
        return raw.decode("utf-8") if raw else None

    def apply_builtin_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str | None:
        """Format messages with llama.cpp's built-in template engine, which recognises
        the common templates (chatml, llama3, gemma, deepseek, ...) by their text.
        None when it does not recognise this model's template. Models without a
        template get their family's built-in one (gemma3 -> gemma), else chatml."""
        lib = self._lib
        template = (self.chat_template() or self._family_template()).encode("utf-8")
        keep = [(str(m["role"]).encode(), str(m["content"]).encode()) for m in messages]
        chat = (lib.llama_chat_message * len(keep))(*[lib.llama_chat_message(role, text) for role, text in keep])
        size = sum(len(r) + len(c) for r, c in keep) * 2 + 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = lib.llama_chat_apply_template(template, chat, len(keep), add_generation_prompt, buf, size)
            if n < 0:
                return None
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n

    def _family_template(self) -> str:
        lib = self._lib
        count = lib.llama_chat_builtin_templates(None, 0)
        names = (ctypes.c_char_p * count)()
        lib.llama_chat_builtin_templates(names, count)
        builtin = {name.decode() for name in names}
        family = re.sub(r"[\d.]+[a-z]*$", "", self.architecture)  # gemma3 -> gemma, qwen2 -> qwen
        return next((name for name in (self.architecture, family) if name in builtin), "chatml")

    # -- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.llama_model_free(self._handle)
            self._handle = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


class LlamaContext:
    """A llama.cpp context with `n_seq_max` independent sequences of `n_ctx` cells each,
    and two preallocated batches (token ids, embedding rows) reused for every decode."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_seq_max: int = 1,
        n_threads: int | None = None,
    ):
        if n_ctx < 16 or n_batch < 1 or n_seq_max < 1:
            raise ValueError(f"invalid context sizes: n_ctx={n_ctx}, n_batch={n_batch}, n_seq_max={n_seq_max}")
        lib = model._lib
        self._lib = lib
        self.model = model
        self.n_seq_max = n_seq_max
        self.n_batch = n_batch
        params = lib.llama_context_default_params()
        # One KV stream per sequence: each sequence owns exactly n_ctx cells, so a
        # long sequence can never starve another one mid-generation.
        params.n_ctx = n_ctx * n_seq_max
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = False
        threads = n_threads or default_threads()
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        _Bindings.recent_log.clear()
        handle = lib.llama_init_from_model(model._handle, params)
        if not handle:
            raise ModelLoadError(f"llama.cpp could not create a context: {_Bindings.last_errors()}")
        self._handle = handle
        # llama.cpp pads n_ctx (minimum 256) and clamps n_batch to it: use its values,
        # since a batch over the effective n_batch aborts the process.
        self.n_ctx = int(lib.llama_n_ctx(handle)) // n_seq_max
        self.n_batch = min(int(lib.llama_n_batch(handle)), int(lib.llama_n_ubatch(handle)))
        self._memory = lib.llama_get_memory(handle)
        self._allocate_batches(model.n_embd_inp)
        # Hot-path C calls, looked up once. Our own function object for
        # llama_get_logits_ith returns the address as an int (the shared binding builds
        # a POINTER(c_float) object per call), so the logits view can be cached per address.
        self._llama_decode = lib.llama_decode
        raw = lib.llama_cpp._lib["llama_get_logits_ith"]  # a new function object, not the shared one
        raw.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        raw.restype = ctypes.c_void_p
        self._get_logits_ith = raw
        self._handle_value = ctypes.cast(handle, ctypes.c_void_p).value
        self._logit_views: dict[int, np.ndarray] = {}
        self.last_input_kind: str | None = None  # "tokens" or "embeddings": the last decode's batch

    def _allocate_batches(self, n_embd: int) -> None:
        lib, n = self._lib, self.n_batch
        self.n_embd = n_embd
        self._tokens = np.zeros(n, dtype=np.int32)
        self._embd = np.zeros((n, n_embd), dtype=np.float32)
        self._pos = np.zeros(n, dtype=np.int32)
        self._n_seq_id = np.ones(n, dtype=np.int32)
        self._seq_id = np.zeros(n, dtype=np.int32)
        self._logits = np.zeros(n, dtype=np.int8)
        # seq_id is an array of pointers, one per token, each to that token's one id.
        seq_ptr_type = ctypes.POINTER(ctypes.c_int32)
        base = self._seq_id.ctypes.data
        self._seq_id_ptrs = (seq_ptr_type * n)(*[ctypes.cast(base + 4 * i, seq_ptr_type) for i in range(n)])

        def batch(token_ptr, embd_ptr):
            b = lib.llama_batch()
            b.token = token_ptr
            b.embd = embd_ptr
            b.pos = self._pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
            b.n_seq_id = self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
            b.seq_id = self._seq_id_ptrs
            b.logits = self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
            return b

        self._token_batch = batch(self._tokens.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), None)
        self._embd_batch = batch(None, self._embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        self._vocab_shape = (self.model.n_vocab,)

    # -- decoding ---------------------------------------------------------------------
    def decode_tokens(self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int],
                      want_logits: Sequence[bool]) -> None:
        n = self._fill_common(len(tokens), positions, seq_ids, want_logits)
        if n == 1:
            self._tokens[0] = tokens[0]
        else:
            self._tokens[:n] = tokens
        self._decode(self._token_batch, n)

    def decode_embeddings(self, rows: np.ndarray, positions: Sequence[int], seq_ids: Sequence[int],
                          want_logits: Sequence[bool]) -> None:
        n = self._fill_common(rows.shape[0], positions, seq_ids, want_logits)
        if rows.shape[1] != self.n_embd:
            raise ValueError(f"embedding rows have width {rows.shape[1]}, the model expects {self.n_embd}")
        self._embd[:n] = rows
        self._decode(self._embd_batch, n)

    def embedding_buffer(self, n: int) -> np.ndarray:
        """The embedding batch's own rows, to fill in place (saves a copy per step)."""
        self._check_batch_size(n)
        return self._embd[:n]

    def decode_embedding_buffer(self, n: int, positions: Sequence[int], seq_ids: Sequence[int],
                                want_logits: Sequence[bool]) -> None:
        self._fill_common(n, positions, seq_ids, want_logits)
        self._decode(self._embd_batch, n)

    def _check_batch_size(self, n: int) -> None:
        if not 1 <= n <= self.n_batch:
            raise ValueError(f"batch of {n} inputs: must be between 1 and n_batch={self.n_batch}")

    def _fill_common(self, n: int, positions, seq_ids, want_logits) -> int:
        if n == 1:  # the one-sequence decode step: plain Python, no NumPy reductions
            pos, seq = int(positions[0]), int(seq_ids[0])
            if not 0 <= seq < self.n_seq_max:
                raise ValueError(f"sequence id out of range [0, {self.n_seq_max})")
            if pos >= self.n_ctx:
                raise ContextOverflowError(f"position {pos} is past the context size {self.n_ctx}")
            self._pos[0] = pos
            self._seq_id[0] = seq
            self._logits[0] = bool(want_logits[0])
            return 1
        self._check_batch_size(n)
        self._pos[:n] = positions
        self._seq_id[:n] = seq_ids
        self._logits[:n] = want_logits
        if n and (self._seq_id[:n].min() < 0 or self._seq_id[:n].max() >= self.n_seq_max):
            raise ValueError(f"sequence id out of range [0, {self.n_seq_max})")
        if self._pos[:n].max() >= self.n_ctx:
            raise ContextOverflowError(f"position {int(self._pos[:n].max())} is past the context size {self.n_ctx}")
        return n

    def _decode(self, batch, n: int) -> None:
        batch.n_tokens = n
        status = self._llama_decode(self._handle, batch)
        self.last_input_kind = "tokens" if batch is self._token_batch else "embeddings"
        if status != 0:
            reason = {1: "no free KV-cache slot for the batch", 2: "aborted"}.get(status, "error")
            raise DecodeError(f"llama_decode failed ({status}: {reason}) {_Bindings.last_errors()}".strip())

    def logits(self, output_index: int) -> np.ndarray:
        """Logits of the output_index-th input that asked for logits in the last decode:
        a zero-copy view into llama.cpp's buffer, valid until the next decode."""
        address = self._get_logits_ith(self._handle_value, output_index)
        if not address:
            raise DecodeError(f"no logits for output {output_index} of the last batch")
        view = self._logit_views.get(address)
        if view is None:
            # llama.cpp keeps one output buffer per context and reallocates it only when
            # a batch asks for more outputs than ever before: the same few addresses recur.
            if len(self._logit_views) >= 4 * self.n_seq_max + 8:
                self._logit_views.clear()
            view = np.ctypeslib.as_array((ctypes.c_float * self.model.n_vocab).from_address(address))
            self._logit_views[address] = view
        return view

    # -- KV cache ---------------------------------------------------------------------
    def remove_sequence(self, seq_id: int) -> None:
        self._lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def copy_sequence(self, src: int, dst: int) -> None:
        """Give `dst` all of `src`'s KV cells (a shared prompt prefilled once). With one KV
        stream per sequence llama.cpp copies whole streams, so `dst` is cleared first."""
        self._lib.llama_memory_seq_rm(self._memory, dst, -1, -1)
        self._lib.llama_memory_seq_cp(self._memory, src, dst, -1, -1)

    def truncate_sequence(self, seq_id: int, keep: int) -> None:
        """Drop the cells of `seq_id` at positions >= keep (for prefix reuse)."""
        if not self._lib.llama_memory_seq_rm(self._memory, seq_id, keep, -1):
            self.remove_sequence(seq_id)

    def sequence_length(self, seq_id: int) -> int:
        return int(self._lib.llama_memory_seq_pos_max(self._memory, seq_id)) + 1

    def clear(self) -> None:
        self._lib.llama_memory_clear(self._memory, True)

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.llama_free(self._handle)
            self._handle = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass
