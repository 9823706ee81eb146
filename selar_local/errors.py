"""Errors users see. Every one carries a message that says what to do about it."""
from __future__ import annotations


class SelarError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ModelLoadError(SelarError):
    """The model file is missing, is not a GGUF file, or llama.cpp cannot load it."""


class UnsupportedModelError(SelarError):
    """The architecture cannot run the requested decoding method."""


class InvalidParameterError(SelarError, ValueError):
    """A decoding hyperparameter is out of range."""


class ContextOverflowError(SelarError):
    """The prompt (plus at least one generated token) does not fit the context window."""


class ModelNotFoundError(SelarError):
    """A model name is neither a file nor an entry of the registry available locally."""


class DecodeError(SelarError):
    """llama_decode returned an error (for example, no free KV-cache slot: status 1)."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class DatasetError(SelarError):
    """A benchmark data set cannot be found, read, or lacks the fields the harness needs."""


class RpcError(SelarError):
    """An RPC server (llama.cpp's distributed backend) cannot be reached or used."""


class RpcVersionError(RpcError):
    """An RPC server speaks another version of llama.cpp's RPC protocol."""


class RpcServerLostError(RpcError, DecodeError):
    """An RPC server holding some of the model's layers went away mid-generation."""
