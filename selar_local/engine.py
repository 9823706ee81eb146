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
  (a collected ctypes callback segfaults on the next log line);
- ggml's RPC client (distributed decoding, docs/DISTRIBUTED.md) aborts the process on a
  lost server; patches/llama.cpp-rpc-lost-server.patch makes it log the loss and fail the
  decode instead, and the log line is turned into RpcServerLostError here.
"""
from __future__ import annotations

import collections
import ctypes
import math
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Sequence

import numpy as np

from selar_local.errors import (ContextOverflowError, DecodeError, InvalidParameterError, ModelLoadError, RpcError,
                                 RpcServerLostError, UnsupportedModelError)

GGUF_MAGIC = b"GGUF"
_LOG_LEVEL_ERROR = 3
_LOG_LEVEL_CONT = 5
_MROPE_TYPES = (8, 40)  # LLAMA_ROPE_TYPE_MROPE, LLAMA_ROPE_TYPE_IMROPE
# Logged by the patched RPC client when a server goes away (patches/llama.cpp-rpc-lost-server.patch).
_RPC_LOST_LINE = re.compile(r"RPC server (\S+) lost: (.*?); the device is unusable")


class _Bindings:
    """Imports llama_cpp once, silences it, and initialises the backend."""

    _lock = threading.Lock()
    _lib = None
    verbose = False
    recent_log: collections.deque[str] = collections.deque(maxlen=64)
    _callback = None  # must stay referenced: llama.cpp keeps the raw pointer
    _last_level = 0
    rpc_lost: dict[str, str] = {}  # endpoint -> why, from the RPC client's log line

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
        if "RPC server" in line:
            lost = _RPC_LOST_LINE.search(line)
            if lost:
                cls.rpc_lost[lost.group(1)] = lost.group(2)
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
    def gpu_backend(self) -> bool:
        """A GPU backend is built in (llama_supports_gpu_offload is also true for a build
        with only the RPC backend, whose layers may run on another machine's CPU)."""
        return any(name != "CPU" for name in self.backends)

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


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 2


def default_threads() -> int:
    """Decode threads: half the CPUs we may run on (at least 1), roughly the physical
    cores. ggml's threads spin at barriers between graph nodes, so a thread that loses
    its core to another process stalls every node: measured on 2 busy cores, 2 threads
    gave 1.6 tokens/s where 1 thread gave 46. Pass n_threads to use more on an idle machine."""
    return max(1, available_cpus() // 2)


def default_threads_batch() -> int:
    """Prompt (batch) threads: every CPU we may run on, as llama.cpp and llama-cpp-python
    do. Prompt processing is compute-bound, with long graph nodes between barriers, so
    it does not suffer the spinning-thread stalls above: a 4,064-token prompt went from
    91 tokens/s (1 thread) to 180 (2 threads) on the 2-core development machine."""
    return max(1, available_cpus())


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


# -- devices and llama.cpp's RPC backend ----------------------------------------------
_DEVICE_KINDS = ("CPU", "GPU", "IGPU", "ACCEL", "META")  # enum ggml_backend_dev_type


@dataclass(frozen=True)
class Device:
    """A ggml backend device: local (CPU, CUDA0, Metal...) or on an RPC server."""

    name: str
    description: str
    kind: str
    memory_free: int
    memory_total: int

    @property
    def summary(self) -> str:
        return f"{self.name} ({self.description}, {self.memory_free >> 20} MiB free of {self.memory_total >> 20} MiB)"


class _Ggml:
    """ggml's backend registry (libggml, loaded with libllama) and the RPC backend's entry
    points, found by name through the registry as upstream's tools do. Every call
    releases the GIL: the RPC client's worker thread logs through our Python callback."""

    _fns = None
    _abort_hook = None  # must stay referenced, like the log callback
    _lock = threading.Lock()

    @classmethod
    def get(cls):
        if cls._fns is None:
            llama_lib()  # loads libllama and, with it, libggml
            with cls._lock:
                if cls._fns is None:
                    cls._fns = cls._bind()
        return cls._fns

    @staticmethod
    def _bind():
        from llama_cpp import _ggml

        lib, vp, sz = _ggml.libggml, ctypes.c_void_p, ctypes.c_size_t

        def fn(name, restype, *argtypes):
            function = lib[name]  # a new function object: the shared bindings stay untouched
            function.restype, function.argtypes = restype, list(argtypes)
            return function

        fns = dict(
            reg_by_name=fn("ggml_backend_reg_by_name", vp, ctypes.c_char_p),
            reg_proc=fn("ggml_backend_reg_get_proc_address", vp, vp, ctypes.c_char_p),
            reg_dev_count=fn("ggml_backend_reg_dev_count", sz, vp),
            reg_dev_get=fn("ggml_backend_reg_dev_get", vp, vp, sz),
            reg_name=fn("ggml_backend_reg_name", ctypes.c_char_p, vp),
            dev_count=fn("ggml_backend_dev_count", sz),
            dev_get=fn("ggml_backend_dev_get", vp, sz),
            dev_by_name=fn("ggml_backend_dev_by_name", vp, ctypes.c_char_p),
            dev_name=fn("ggml_backend_dev_name", ctypes.c_char_p, vp),
            dev_description=fn("ggml_backend_dev_description", ctypes.c_char_p, vp),
            dev_type=fn("ggml_backend_dev_type", ctypes.c_int, vp),
            dev_memory=fn("ggml_backend_dev_memory", None, vp, ctypes.POINTER(sz), ctypes.POINTER(sz)),
            dev_reg=fn("ggml_backend_dev_backend_reg", vp, vp),
            set_abort_callback=fn("ggml_set_abort_callback", vp, vp),
            add_server=None, start_server=None,
        )
        rpc = fns["reg_by_name"](b"RPC")
        if rpc:
            add = fns["reg_proc"](rpc, b"ggml_backend_rpc_add_server")
            start = fns["reg_proc"](rpc, b"ggml_backend_rpc_start_server")
            if add and start:
                fns["add_server"] = ctypes.CFUNCTYPE(vp, ctypes.c_char_p)(add)
                fns["start_server"] = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, sz, sz, vp)(start)
        return SimpleNamespace(**fns)

    @classmethod
    def describe(cls, handle) -> Device:
        fns = cls.get()
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        fns.dev_memory(handle, ctypes.byref(free), ctypes.byref(total))
        kind = int(fns.dev_type(handle))
        return Device(fns.dev_name(handle).decode(), (fns.dev_description(handle) or b"").decode(errors="replace"),
                      _DEVICE_KINDS[kind] if kind < len(_DEVICE_KINDS) else str(kind), free.value, total.value)

    @classmethod
    def install_abort_hook(cls) -> None:
        """On a build without the RPC patch a lost server still aborts the process; say why
        and what to do instead of ggml's bare backtrace."""
        if cls._abort_hook is not None:
            return

        def on_abort(message: bytes) -> None:
            text = message.decode("utf-8", errors="replace").strip()
            if "RPC" in text:
                text += ("\nselar: error: an RPC server was lost and this llama.cpp build aborts the process; "
                         "run scripts/setup.sh to rebuild llama-cpp-python with patches/llama.cpp-rpc-lost-server.patch, "
                         "which turns this into a clear error")
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

        cls._abort_hook = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(on_abort)
        cls.get().set_abort_callback(ctypes.cast(cls._abort_hook, ctypes.c_void_p))


def local_devices() -> list[Device]:
    """This machine's ggml devices (CPU, and CUDA/Metal/Vulkan on such builds)."""
    fns = _Ggml.get()
    return [_Ggml.describe(fns.dev_get(i)) for i in range(fns.dev_count())
            if fns.reg_name(fns.dev_reg(fns.dev_get(i))) != b"RPC"]


_rpc_users: collections.Counter[str] = collections.Counter()  # endpoint -> loaded models using it


def rpc_in_use(endpoint: str) -> bool:
    """Whether a model loaded in this process holds a connection to this server (llama.cpp
    shares one per endpoint; the server, which serves one client at a time, is busy with it)."""
    return _rpc_users[endpoint] > 0


def rpc_supported() -> bool:
    """Whether this llama.cpp build has the RPC backend (GGML_RPC=ON)."""
    return _Ggml.get().add_server is not None


def _require_rpc() -> None:
    if not rpc_supported():
        raise RpcError("this llama-cpp-python build has no RPC backend: rebuild it with CMAKE_ARGS containing "
                       "-DGGML_RPC=ON (scripts/setup.sh does)")


def _rpc_device_handles(endpoints: Sequence[str]) -> list[int]:
    """Connect to each server (llama.cpp's client) and return its devices, in order."""
    _require_rpc()
    fns = _Ggml.get()
    _Ggml.install_abort_hook()
    handles = []
    for endpoint in endpoints:
        _Bindings.rpc_lost.pop(endpoint, None)  # a server back after a loss is usable again
        _Bindings.recent_log.clear()
        reg = fns.add_server(endpoint.encode())
        if not reg:
            raise RpcError(f"RPC server {endpoint} has no device to offer or could not be reached: "
                           f"{_Bindings.last_errors() or 'no details logged'}")
        handles.extend(fns.reg_dev_get(reg, i) for i in range(fns.reg_dev_count(reg)))
    return handles


def _local_offload_handles() -> list[int]:
    """llama.cpp's default offload devices on this machine: the GPUs, else the integrated
    GPUs (the CPU is not in the list: layers that are not offloaded stay on it)."""
    fns = _Ggml.get()
    gpus, igpus = [], []
    for i in range(fns.dev_count()):
        handle = fns.dev_get(i)
        if fns.reg_name(fns.dev_reg(handle)) == b"RPC":
            continue
        kind = int(fns.dev_type(handle))
        (gpus if kind == 1 else igpus if kind == 2 else []).append(handle)
    return gpus or igpus


def serve_rpc(host: str, port: int, *, n_threads: int, device_names: Sequence[str] = ()) -> None:
    """Run llama.cpp's RPC server in this thread; returns only if it cannot start (the
    reason is on stderr). Devices by name (`local_devices()`); by default the GPUs, else
    the CPU, as upstream's rpc-server chooses."""
    _require_rpc()
    fns = _Ggml.get()
    if device_names:
        handles = []
        for name in device_names:
            handle = fns.dev_by_name(name.encode())
            if not handle or fns.reg_name(fns.dev_reg(handle)) == b"RPC":
                known = ", ".join(d.name for d in local_devices())
                raise InvalidParameterError(f"unknown device {name!r}: this machine has {known}")
            handles.append(handle)
    else:
        handles = _local_offload_handles()
        if not handles:
            handles = [fns.dev_get(i) for i in range(fns.dev_count()) if int(fns.dev_type(fns.dev_get(i))) == 0][:1]
    array = (ctypes.c_void_p * len(handles))(*handles)
    fns.start_server(f"{host}:{port}".encode(), None, n_threads, len(handles), ctypes.cast(array, ctypes.c_void_p))


class LlamaModel:
    """A loaded GGUF model: weights, vocabulary, metadata, tokeniser, chat template."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = -1, vocab_only: bool = False,
                 rpc_servers: Sequence[str] = (), tensor_split: Sequence[float] | None = None,
                 cpu_repack: bool = True):
        self.path = Path(path).expanduser()
        check_gguf_file(self.path)
        lib = llama_lib()
        self._lib = lib
        params = lib.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers  # -1: all layers where a GPU backend exists; ignored on CPU
        params.vocab_only = vocab_only
        # False: weights stay in plain CPU buffers, not repacked for the interleaved
        # kernels. An RPC server's CPU never repacks, so this makes a local run compute
        # exactly what a run split over RPC servers computes (docs/DISTRIBUTED.md).
        params.use_extra_bufts = cpu_repack
        self.cpu_repack = cpu_repack
        self.rpc_servers = tuple(rpc_servers)
        self.devices: tuple[Device, ...] = ()
        self._set_devices(params, tensor_split)
        _Bindings.recent_log.clear()
        handle = lib.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
        if not handle:
            detail = _Bindings.last_errors()
            lost = [f"{e} ({_Bindings.rpc_lost[e]})" for e in self.rpc_servers if e in _Bindings.rpc_lost]
            if lost:
                raise RpcError(f"RPC server {', '.join(lost)} was lost while the model loaded: {detail}")
            if "unknown model architecture" in detail:
                raise UnsupportedModelError(f"llama.cpp does not support this model's architecture: {detail}")
            raise ModelLoadError(f"llama.cpp could not load {self.path}: {detail or 'no details logged'}")
        self._handle = handle
        _rpc_users.update(self.rpc_servers)
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
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self._vocab))
        # M-RoPE models (qwen2vl, qwen3vl, qwen35, ...) read GGML_MROPE_SECTIONS = 4
        # positions per embedding input (llama.cpp's n_pos_per_embd, not exported: the
        # rope type says it). Their embedding batches need the 4n layout (LlamaContext).
        self.n_pos_per_embd = 4 if int(lib.llama_model_rope_type(handle)) in _MROPE_TYPES else 1
        # Recurrent state (mamba, rwkv) or a mix of attention and recurrent layers.
        self.is_recurrent = bool(lib.llama_model_is_recurrent(handle))
        self.is_hybrid = bool(lib.llama_model_is_hybrid(handle))

    def _set_devices(self, params, tensor_split: Sequence[float] | None) -> None:
        """The offload devices: the RPC servers' first (as llama.cpp orders them, to keep
        network transfers few), then the local GPUs; layers split by `tensor_split`."""
        if not self.rpc_servers and tensor_split is None:
            return  # llama.cpp's own default choice
        handles = _rpc_device_handles(self.rpc_servers) + _local_offload_handles()
        self.devices = tuple(_Ggml.describe(h) for h in handles)
        if self.rpc_servers:
            # NULL-terminated; llama.cpp copies the list at load, the array is kept anyway.
            self._device_array = (ctypes.c_void_p * (len(handles) + 1))(*handles, None)
            params.devices = ctypes.addressof(self._device_array)
        if tensor_split is not None:
            split = [float(x) for x in tensor_split]
            names = ", ".join(d.name + (f" [{d.description}]" if d.name.startswith("RPC") else "") for d in self.devices)
            if not self.devices:
                raise InvalidParameterError("--tensor-split needs offload devices (GPUs or --rpc servers); "
                                            "this machine has only its CPU")
            if len(split) > len(self.devices):
                raise InvalidParameterError(f"--tensor-split has {len(split)} values for {len(self.devices)} "
                                            f"device(s): {names}")
            if any(not math.isfinite(x) or x < 0 for x in split) or sum(split) <= 0:
                raise InvalidParameterError(f"--tensor-split {split}: expected non-negative proportions, not all zero")
            self._tensor_split = (ctypes.c_float * int(self._lib.llama_max_devices()))(*split)
            params.tensor_split = self._tensor_split

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
            _rpc_users.subtract(self.rpc_servers)

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass


def _address_function(lib, name: str, argtypes: list) -> ctypes._CFuncPtr:
    """A function object of our own for `name` that returns a pointer as an int address (the
    shared binding builds a POINTER(c_float) object per call), so views can be cached per address."""
    function = lib.llama_cpp._lib[name]  # a new function object, not the shared one
    function.argtypes = argtypes
    function.restype = ctypes.c_void_p
    return function


class _HiddenOutput:
    """LlamaContext's final hidden state beside the logits (a part of the context, kept apart
    for size: it reads the context's handle, library and model)."""

    # With embeddings on and pooling NONE, llama_decode also copies each output's final
    # hidden state (llama.cpp's `result_norm`: after the output norm, before the output
    # matrix; transformers' hidden_states[-1]) into the context's embeddings buffer. Two
    # costs (docs/PERFORMANCE.md): a switch makes llama.cpp build another graph, and while
    # it is on llama.cpp makes every input of a batch an output (it overrides the batch's
    # flags), so a prompt computes the output layer for every token. Hence it is switched
    # on only around the steps that read it, and rows are found with output_rows.
    def _init_hidden_output(self) -> None:
        lib = self._lib
        self.hidden_output = False
        self.n_hidden = self.model.n_embd  # the hidden state's width (the output matrix's input)
        self._hidden_views: dict[object, np.ndarray] = {}
        self._get_embeddings_ith = _address_function(lib, "llama_get_embeddings_ith", [ctypes.c_void_p, ctypes.c_int32])
        self._get_embeddings = _address_function(lib, "llama_get_embeddings", [ctypes.c_void_p])

    def set_hidden_output(self, on: bool) -> bool:
        """Have the next decodes also output the final hidden state (or stop). Returns
        whether the setting changed; unchanged costs nothing."""
        on = bool(on)
        if on == self.hidden_output:
            return False
        if on:
            pooling = int(self._lib.llama_pooling_type(self._handle))
            if pooling != self._lib.LLAMA_POOLING_TYPE_NONE:
                raise UnsupportedModelError(f"this context pools its embeddings (pooling type {pooling}): "
                                            "per-token hidden states need pooling NONE")
        self._lib.llama_set_embeddings(self._handle, on)
        self.hidden_output = on
        return True

    def output_rows(self) -> np.ndarray:
        """The row, in the last decode's logits and hidden-state buffers, of each input that
        asked for logits, in batch order. Rows 0..n-1 when hidden output was off; with it
        on every input had an output, so a prompt's last token is at its batch index.
        Read from llama.cpp's own map (the address llama_get_logits_ith gives)."""
        batch = self._token_batch if self.last_input_kind == "tokens" else self._embd_batch
        n = int(batch.n_tokens) if self.last_input_kind else 0
        wanted = np.flatnonzero(self._logits[:n])
        first = self._get_logits(self._handle_value)
        if not first:
            raise DecodeError("no logits in the last batch")
        row_bytes = 4 * self.model.n_vocab
        rows = np.empty(len(wanted), dtype=np.int64)
        for k, index in enumerate(wanted):
            address = self._get_logits_ith(self._handle_value, int(index))
            if not address:
                raise DecodeError(f"no logits for input {int(index)} of the last batch")
            rows[k] = (address - first) // row_bytes
        return rows

    def hidden(self, batch_index: int) -> np.ndarray:
        """The final hidden state of input `batch_index` of the last decode (negative:
        counted from the last output), a zero-copy view valid until the next decode."""
        address = self._get_embeddings_ith(self._handle_value, int(batch_index))
        if not address:
            raise DecodeError(f"no hidden state for input {batch_index} of the last batch"
                              + ("" if self.hidden_output else " (hidden output is off: set_hidden_output(True))"))
        return self._hidden_view(address, 1)[0]

    def hidden_rows(self, n_outputs: int) -> np.ndarray:
        """The final hidden states of the last decode's first n_outputs outputs (rows as in
        output_rows) as one zero-copy [n_outputs, n_hidden] view, valid until the next decode."""
        if not self.hidden_output:
            raise DecodeError("hidden output is off: call set_hidden_output(True) before the decode")
        first = self._get_embeddings(self._handle_value)
        if not first:
            raise DecodeError("no hidden states in the last batch")
        return self._hidden_view(first, n_outputs)

    def _hidden_view(self, address: int, n_rows: int) -> np.ndarray:
        key = (address, n_rows)
        view = self._hidden_views.get(key)
        if view is None:
            if len(self._hidden_views) >= 4 * self.n_seq_max + 8:  # the same few addresses recur
                self._hidden_views.clear()
            view = np.ctypeslib.as_array((ctypes.c_float * (n_rows * self.n_hidden)).from_address(address)
                                         ).reshape(n_rows, self.n_hidden)
            self._hidden_views[key] = view
        return view


class _KvCache:
    """LlamaContext's KV-cache calls on its sequences (a part of the context, kept apart for size)."""

    def remove_sequence(self, seq_id: int) -> None:
        self._lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def copy_sequence(self, src: int, dst: int, keep: int | None = None) -> None:
        """Give `dst` the KV cells of `src` at positions < keep (all of them for None): a
        shared prefix prefilled once. With one KV stream per sequence llama.cpp copies
        whole streams (at the next decode), so `dst` gets all of them and is then cut
        back; in a unified cache the cells are shared, not copied."""
        lib, memory = self._lib, self._memory
        lib.llama_memory_seq_rm(memory, dst, -1, -1)
        if self.kv_unified:
            lib.llama_memory_seq_cp(memory, src, dst, 0, -1 if keep is None else keep)
        else:
            lib.llama_memory_seq_cp(memory, src, dst, -1, -1)
            if keep is not None:
                lib.llama_memory_seq_rm(memory, dst, keep, -1)

    def truncate_sequence(self, seq_id: int, keep: int) -> bool:
        """Drop the cells of `seq_id` at positions >= keep (for prefix reuse). Returns
        whether the prefix was kept: recurrent and hybrid models (mamba, lfm2, qwen35, ...)
        hold one state per sequence, not per position, and cannot drop a tail; their whole
        sequence is removed instead (measured: removal and copying of whole sequences
        work there, docs/MODELS.md)."""
        if self._lib.llama_memory_seq_rm(self._memory, seq_id, keep, -1):
            return True
        self.remove_sequence(seq_id)
        return False

    def sequence_length(self, seq_id: int) -> int:
        return int(self._lib.llama_memory_seq_pos_max(self._memory, seq_id)) + 1

    def clear(self) -> None:
        self._lib.llama_memory_clear(self._memory, True)


class LlamaContext(_HiddenOutput, _KvCache):
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
        n_threads_batch: int | None = None,
        kv_unified: bool = False,
        eval_callback=None,
    ):
        if n_ctx < 16 or n_batch < 1 or n_seq_max < 1:
            raise ValueError(f"invalid context sizes: n_ctx={n_ctx}, n_batch={n_batch}, n_seq_max={n_seq_max}")
        lib = model._lib
        self._lib = lib
        self.model = model
        self.n_seq_max = n_seq_max
        self.n_batch = n_batch
        params = lib.llama_context_default_params()
        # Default: one KV stream per sequence, so each sequence owns exactly n_ctx cells
        # and a long sequence can never starve another one mid-generation. Unified: one
        # pool of n_ctx * n_seq_max cells that any sequence may fill (a long request can
        # use what short ones leave), and copying a prefix between sequences shares cells
        # instead of copying whole streams.
        params.n_ctx = n_ctx * n_seq_max
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        params.kv_unified = bool(kv_unified)
        self.kv_unified = bool(kv_unified)
        self.n_threads = int(n_threads or default_threads())
        self.n_threads_batch = int(n_threads_batch or default_threads_batch())
        if self.n_threads < 1 or self.n_threads_batch < 1:
            raise ValueError(f"invalid thread counts: n_threads={n_threads}, n_threads_batch={n_threads_batch}")
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads_batch
        self._prompt_threads = True  # the context starts with n_threads_batch for batches
        params.no_perf = True
        # Per-token (unpooled) hidden states when set_hidden_output turns embeddings on.
        params.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        if eval_callback is not None:  # LayerStates: llama.cpp's per-node graph callback (cb_eval)
            params.cb_eval = eval_callback
        _Bindings.recent_log.clear()
        handle = lib.llama_init_from_model(model._handle, params)
        if not handle:
            raise ModelLoadError(f"llama.cpp could not create a context: {_Bindings.last_errors()}")
        self._handle = handle
        # llama.cpp pads n_ctx (minimum 256) and clamps n_batch to it: use its values,
        # since a batch over the effective n_batch aborts the process.
        self.n_ctx = int(lib.llama_n_ctx(handle)) // (1 if kv_unified else n_seq_max)
        self.n_batch = min(int(lib.llama_n_batch(handle)), int(lib.llama_n_ubatch(handle)))
        self._memory = lib.llama_get_memory(handle)
        self._allocate_batches(model.n_embd_inp)
        # Hot-path C calls, looked up once. Our own function object for
        # llama_get_logits_ith returns the address as an int (the shared binding builds
        # a POINTER(c_float) object per call), so the logits view can be cached per address.
        self._llama_decode = lib.llama_decode
        self._get_logits_ith = _address_function(lib, "llama_get_logits_ith", [ctypes.c_void_p, ctypes.c_int32])
        self._get_logits = _address_function(lib, "llama_get_logits", [ctypes.c_void_p])
        self._handle_value = ctypes.cast(handle, ctypes.c_void_p).value
        self._logit_views: dict[object, np.ndarray] = {}  # by address, and (address, rows)
        self.last_input_kind: str | None = None  # "tokens" or "embeddings": the last decode's batch
        self._init_hidden_output()

    def _allocate_batches(self, n_embd: int) -> None:
        lib, n = self._lib, self.n_batch
        self.n_embd = n_embd
        self._tokens = np.zeros(n, dtype=np.int32)
        self._embd = np.zeros((n, n_embd), dtype=np.float32)
        self._pos = np.zeros(n, dtype=np.int32)
        # Embedding batches of M-RoPE models: llama.cpp reads 4 planes of n positions,
        # pos[j*n + i] for j = temporal, height, width, extra, and expands a token batch
        # to t = h = w = p, extra = 0. Measured on tiny qwen2vl and qwen3vl models: the
        # layout [p..|p..|p..|0..] gives logits bit-identical to token input; with only n
        # entries llama.cpp reads past the end of the buffer.
        self._n_pos_per_embd = self.model.n_pos_per_embd
        self._embd_pos = np.zeros(n * self._n_pos_per_embd, dtype=np.int32) if self._n_pos_per_embd > 1 else self._pos
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
        self._embd_batch.pos = self._embd_pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
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

    def decode_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        """Prefill prompt i as sequence i from position 0, all in one batch; the logits of each
        prompt's last token are the outputs 0..n-1 (`logits_rows(len(prompts))`)."""
        tokens, positions, seq_ids, want = [], [], [], []
        for seq_id, prompt in enumerate(prompts):
            tokens += prompt
            positions += range(len(prompt))
            seq_ids += [seq_id] * len(prompt)
            want += [False] * (len(prompt) - 1) + [True]
        self.decode_tokens(tokens, positions, seq_ids, want)

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

    def _use_threads(self, prompt: bool) -> None:
        """llama.cpp runs every batch of more than one input on n_threads_batch threads,
        decode steps of several sequences included. Only prompt work is compute-bound
        enough for all the CPUs; a decode step keeps the decode thread count (spinning
        threads stall on a busy machine), so the count is switched per batch."""
        if prompt != self._prompt_threads:
            batch = self.n_threads_batch if prompt else self.n_threads
            self._lib.llama_set_n_threads(self._handle, self.n_threads, batch)
            self._prompt_threads = prompt

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
            if self._prompt_threads:
                self._use_threads(False)
            return 1
        self._check_batch_size(n)
        self._pos[:n] = positions
        self._seq_id[:n] = seq_ids
        self._logits[:n] = want_logits
        self._use_threads(not self._logits[:n].all())  # inputs without outputs: prompt tokens
        if n and (self._seq_id[:n].min() < 0 or self._seq_id[:n].max() >= self.n_seq_max):
            raise ValueError(f"sequence id out of range [0, {self.n_seq_max})")
        if self._pos[:n].max() >= self.n_ctx:
            raise ContextOverflowError(f"position {int(self._pos[:n].max())} is past the context size {self.n_ctx}")
        return n

    def _decode(self, batch, n: int) -> None:
        batch.n_tokens = n
        if batch is self._embd_batch and self._n_pos_per_embd > 1:
            planes = self._embd_pos[: n * self._n_pos_per_embd].reshape(self._n_pos_per_embd, n)
            planes[:3] = self._pos[:n]
            planes[3:] = 0
        status = self._llama_decode(self._handle, batch)
        self.last_input_kind = "tokens" if batch is self._token_batch else "embeddings"
        if _Bindings.rpc_lost and self.model.rpc_servers:
            self.check_rpc_servers()
        if status != 0:
            reason = {1: "no free KV-cache slot for the batch", 2: "aborted"}.get(status, "error")
            raise DecodeError(f"llama_decode failed ({status}: {reason}) {_Bindings.last_errors()}".strip(),
                              status=status)

    def check_rpc_servers(self) -> None:
        """Raise RpcServerLostError if one of the model's RPC servers was lost (the
        patched client logs it; the decode fails or its outputs are zeros)."""
        for endpoint in self.model.rpc_servers:
            why = _Bindings.rpc_lost.get(endpoint)
            if why is not None:
                raise RpcServerLostError(
                    f"RPC server {endpoint} was lost ({why}): the request failed. The model's layers on that "
                    "server are gone; once it is back (`selar rpc-server` on that machine), load the model again")

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

    def logits_rows(self, n_outputs: int) -> np.ndarray:
        """The logits of the last decode's first n_outputs outputs (inputs that asked for
        logits, in batch order) as one zero-copy [n_outputs, n_vocab] view, valid until
        the next decode: the batch-wide step reads every live sequence's row from it."""
        first = self._get_logits(self._handle_value)  # outputs in batch order (llama.cpp reorders)
        if not first:
            raise DecodeError("no logits in the last batch")
        key = (first, n_outputs)
        view = self._logit_views.get(key)
        if view is None:
            if len(self._logit_views) >= 4 * self.n_seq_max + 8:
                self._logit_views.clear()
            view = np.ctypeslib.as_array((ctypes.c_float * (n_outputs * self.model.n_vocab)).from_address(first)
                                         ).reshape(n_outputs, self.model.n_vocab)
            self._logit_views[key] = view
        return view

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.llama_free(self._handle)
            self._handle = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass


# -- the residual stream and control vectors (Fractional Reasoning, issue 26) ----------
# llama.cpp names each layer's output `l_out-<il>` (after the layer's control vector) and the
# final norm's output `result_norm`. Two ways read them: the context's cb_eval graph callback
# (any architecture that names l_out, one Python call per graph node) and the vendored
# libllama's C++-only llama_set/get_embeddings_layer_inp (llama-ext.h), which only ~20
# architectures wire up (llama, qwen3, ...; not qwen2 or gemma3), aborts the process on the
# others, copies every token of the batch and has no input for the last layer's output.
# Both cost the same on SmolLM2 (benchmarks/layer_states.py), so the callback is used.
_LAYER_OUTPUT = re.compile(rb"l_out-(\d+)")
_FINAL_NORM = b"result_norm"


def model_layer_count(model: LlamaModel) -> int:
    return int(model._lib.llama_model_n_layer(model._handle))


class _GgmlTensors:
    """ggml's tensor accessors (libggml-base, reached through the libggml llama-cpp-python loads)."""

    _fns = None

    @classmethod
    def get(cls):
        if cls._fns is None:
            llama_lib()
            from llama_cpp import _ggml

            lib, vp, sz = _ggml.libggml, ctypes.c_void_p, ctypes.c_size_t

            def fn(name, restype, *argtypes):
                function = lib[name]
                function.restype, function.argtypes = restype, list(argtypes)
                return function

            cls._fns = SimpleNamespace(
                name=fn("ggml_get_name", ctypes.c_char_p, vp), n_elements=fn("ggml_nelements", ctypes.c_int64, vp),
                n_rows=fn("ggml_nrows", ctypes.c_int64, vp), n_bytes=fn("ggml_nbytes", sz, vp),
                get=fn("ggml_backend_tensor_get", None, vp, vp, sz, sz))
        return cls._fns


class LayerStates:
    """Each layer's output (the residual stream after layer il) and the final norm's output at
    the last token of a prompt, read while llama.cpp computes them (the context's cb_eval).

    It owns a one-sequence context of its own: the callback slows every decode a little, so
    the serving contexts never carry it. `read` returns a copy, shape (n_layer, n_embd).
    """

    def __init__(self, model: LlamaModel, *, n_ctx: int = 2048, n_threads: int | None = None,
                 n_threads_batch: int | None = None):
        import llama_cpp

        self.model = model
        self.n_layer = model_layer_count(model)
        self._fns = _GgmlTensors.get()
        self._states = np.zeros((self.n_layer, model.n_embd), dtype=np.float32)
        self._final = np.zeros(model.n_embd, dtype=np.float32)
        self._seen = np.zeros(self.n_layer, dtype=bool)
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)  # kept: C holds the pointer
        self.context = LlamaContext(model, n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads,
                                    n_threads_batch=n_threads_batch, eval_callback=self._callback)

    def _on_tensor(self, tensor, ask: bool, _user_data) -> bool:
        name = self._fns.name(tensor)
        layer = _LAYER_OUTPUT.fullmatch(name)
        if ask:  # True: compute up to this node and call back with its data
            return layer is not None or name == _FINAL_NORM
        n_elements, n_bytes = self._fns.n_elements(tensor), self._fns.n_bytes(tensor)
        width = n_elements // max(1, self._fns.n_rows(tensor))
        if n_bytes != 4 * n_elements or width != self._final.shape[0]:
            return True  # not an f32 [n_embd, n_tokens] tensor: left unread, reported by `read`
        if layer is not None:
            il = int(layer.group(1))
            if il >= self.n_layer:
                return True
            row, self._seen[il] = self._states[il], True
        else:
            row = self._final
        # Columns are the batch's tokens (the last layer's only its outputs): the last one.
        self._fns.get(tensor, row.ctypes.data, n_bytes - 4 * width, 4 * width)
        return True

    def read(self, tokens: Sequence[int]) -> np.ndarray:
        """Prefill `tokens` from position 0 and return every layer's output at the last one."""
        if not 1 <= len(tokens) <= self.context.n_batch:
            raise ContextOverflowError(f"a prompt of {len(tokens)} tokens: the layer reader takes 1 to "
                                       f"{self.context.n_batch}")
        self._seen[:] = False
        self.context.clear()
        n = len(tokens)
        self.context.decode_tokens(tokens, range(n), [0] * n, [False] * (n - 1) + [True])
        if not self._seen.all():
            missing = np.flatnonzero(~self._seen)
            raise UnsupportedModelError(
                f"cannot read the layer outputs of this {self.model.architecture} model: llama.cpp's graph names "
                f"no f32 'l_out-<il>' tensor for {len(missing)} of its {self.n_layer} layers (first: {missing[0]}), "
                "so steering vectors cannot be built for it")
        return self._states.copy()

    @property
    def final_norm(self) -> np.ndarray:
        """The final norm's output (`result_norm`) at the last token of the last `read`."""
        return self._final.copy()

    @property
    def layer_outputs(self) -> np.ndarray:
        """Every layer's output at the last input of the context's last decode (a `read`, or
        a decode of its own on `context`, such as an embedding row), (n_layer, n_embd)."""
        return self._states.copy()

    def close(self) -> None:
        self.context.close()


def control_vector_digest(vectors: np.ndarray | None) -> str | None:
    """A short identity of a control vector (None for none): what prompt caches are keyed on."""
    if vectors is None:
        return None
    import hashlib

    return hashlib.blake2b(np.ascontiguousarray(vectors, dtype=np.float32).tobytes(), digest_size=12).hexdigest()


def set_control_vector(context: LlamaContext, vectors: np.ndarray | None) -> None:
    """Add vectors[il] to layer il's output, for every sequence of the context (llama.cpp's
    control vector, llama_set_adapter_cvec); None removes it. Shape (n_layer, n_embd); row 0
    must be zero, since llama.cpp never steers the first layer. The KV cells already computed
    keep the old vector's effect: callers key their prompt caches on `context.control_vector_id`.
    The next decode re-reserves the compute graph (benchmarks/layer_states.py measures it)."""
    lib, n_layer, n_embd = context._lib, model_layer_count(context.model), context.model.n_embd
    if vectors is None:
        status = lib.llama_set_adapter_cvec(context._handle, None, 0, n_embd, -1, -1)
    else:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (n_layer, n_embd):
            raise InvalidParameterError(f"control vector of shape {vectors.shape}: this model needs "
                                        f"({n_layer}, {n_embd}), one row per layer")
        if not np.isfinite(vectors).all():
            raise InvalidParameterError("control vector has non-finite values")
        if np.any(vectors[0]):
            raise InvalidParameterError("control vector row 0 must be zero: llama.cpp does not steer the first layer")
        data = vectors[1:]
        status = lib.llama_set_adapter_cvec(context._handle, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                            data.size, n_embd, 1, n_layer - 1)
    if status != 0:
        raise DecodeError(f"llama_set_adapter_cvec failed: {_Bindings.last_errors() or 'no details logged'}")
    context.control_vector_id = control_vector_digest(vectors)


def control_vector_id(context: LlamaContext) -> str | None:
    """The digest of the context's control vector (None: none set)."""
    return getattr(context, "control_vector_id", None)


# The llama-ext.h route, kept to cross-check the callback and to measure it: C++-mangled names
# (x86-64 and arm64 Itanium ABI). Only architectures whose graph records its layer inputs;
# enabling it on another (qwen2, gemma3, ...) aborts the process inside llama.cpp.
LAYER_INPUT_ARCHITECTURES = frozenset({"llama", "qwen3", "qwen3moe", "qwen3next", "qwen35", "qwen35moe", "lfm2"})
_SET_LAYER_INPUT = "_Z30llama_set_embeddings_layer_inpP13llama_contextjb"
_GET_LAYER_INPUT = "_Z30llama_get_embeddings_layer_inpP13llama_contextj"


def enable_layer_inputs(context: LlamaContext, layers: Iterable[int]) -> None:
    """Have llama.cpp copy the input of each of `layers` (every token of each batch) out of
    the graph; read with `layer_input`."""
    if context.model.architecture not in LAYER_INPUT_ARCHITECTURES:
        raise UnsupportedModelError(f"llama.cpp records no layer inputs for {context.model.architecture}")
    raw = context._lib.llama_cpp._lib[_SET_LAYER_INPUT]
    raw.argtypes, raw.restype = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_bool], None
    for il in layers:
        raw(context._handle, int(il), True)


def layer_input(context: LlamaContext, layer: int, batch_index: int) -> np.ndarray:
    """The input of `layer` at token `batch_index` of the last decode (a copy)."""
    raw = context._lib.llama_cpp._lib[_GET_LAYER_INPUT]
    raw.argtypes, raw.restype = [ctypes.c_void_p, ctypes.c_uint32], ctypes.c_void_p
    address = raw(context._handle, int(layer))
    n_embd = context.model.n_embd
    row = (ctypes.c_float * n_embd).from_address(address + 4 * n_embd * int(batch_index))
    return np.ctypeslib.as_array(row).copy()


def return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere a
    no-op): the repacked weights and KV buffers of a closed model are freed to malloc,
    which otherwise keeps them for the process."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


class _captured_stderr:
    """What C code prints on file descriptor 2 meanwhile (llama.cpp's grammar parser
    fprintf's its errors there rather than to the log callback)."""

    _lock = threading.Lock()

    def __enter__(self):
        import tempfile

        self._lock.acquire()
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._file.seek(0)
            self.text = self._file.read(4096).decode("utf-8", errors="replace")
            self._file.close()
        finally:
            self._lock.release()


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


class GrammarSampler:
    """llama.cpp's grammar sampler (`llama_sampler_init_grammar`) for one sequence.

    `allows` checks a few tokens by applying the grammar to a small token-data array;
    `allowed_mask` does the same for a candidate set or the whole vocabulary. llama.cpp's
    `accept` aborts the process on a token the grammar rejects, so `accept` checks first.
    """

    def __init__(self, model: LlamaModel, gbnf: str, *, root: str = "root"):
        lib = llama_lib()
        self._lib = lib
        self.model = model
        self.gbnf = gbnf
        self.root = root
        _Bindings.recent_log.clear()
        with _captured_stderr() as printed:
            handle = lib.llama_sampler_init_grammar(model._vocab, gbnf.encode("utf-8"), root.encode("utf-8"))
        if not handle:  # llama.cpp's parser prints why on stderr and returns NULL
            detail = printed.text.strip().splitlines()[0] if printed.text.strip() else _Bindings.last_errors()
            raise InvalidParameterError(f"grammar: llama.cpp cannot parse this GBNF ({detail or 'no details'})")
        self._handle = handle
        self._small = np.zeros(8, dtype=_TOKEN_DATA)
        self._whole: np.ndarray | None = None
        self._array = lib.llama_token_data_array()

    def _apply(self, data: np.ndarray) -> np.ndarray:
        """Apply the grammar to `data` in place; True where the token stays allowed."""
        arr = self._array
        arr.data = ctypes.cast(data.ctypes.data, self._lib.llama_token_data_p)
        arr.size = data.shape[0]
        arr.selected = -1
        arr.sorted = False
        self._lib.llama_sampler_apply(self._handle, ctypes.byref(arr))
        return np.isfinite(data["logit"])

    def allowed_mask(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """One bool per id: may the grammar's current state take this token next."""
        ids = np.asarray(ids, dtype=np.int32)
        n = ids.shape[0]
        if n <= self._small.shape[0]:
            data = self._small[:n]
        else:
            if self._whole is None or self._whole.shape[0] < n:
                self._whole = np.zeros(max(n, self.model.n_vocab), dtype=_TOKEN_DATA)
            data = self._whole[:n]
        data["id"] = ids
        data["logit"] = 0.0
        return self._apply(data)

    def allows(self, token: int) -> bool:
        return bool(self.allowed_mask((token,))[0])

    def accept(self, token: int, *, checked: bool = False) -> None:
        """Advance the grammar past `token` (an end-of-generation token is accepted only
        where the grammar is complete). `checked`: the caller has just seen `allowed_mask`
        allow it in this state, so the check (another grammar pass) is skipped."""
        if not checked and not self.allows(token):
            raise InvalidParameterError(f"grammar: token {token} ({self.model.token_text(token)!r}) is not "
                                        "allowed here")
        self._lib.llama_sampler_accept(self._handle, int(token))

    def clone(self) -> "GrammarSampler":
        twin = object.__new__(GrammarSampler)
        twin.__dict__.update(self.__dict__)
        twin._handle = self._lib.llama_sampler_clone(self._handle)
        twin._small = np.zeros(8, dtype=_TOKEN_DATA)
        twin._whole = None
        twin._array = self._lib.llama_token_data_array()
        return twin

    def reset(self) -> None:
        self._lib.llama_sampler_reset(self._handle)

    def close(self) -> None:
        if getattr(self, "_handle", None):
            self._lib.llama_sampler_free(self._handle)
            self._handle = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass
