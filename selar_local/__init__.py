"""selar-local: Selective Latent Reasoning (SeLaR) and training-free soft-thinking
decoders on llama.cpp, local and offline.

    import selar_local
    rt = selar_local.load()                      # the embedded default model
    result = rt.generate(messages=[{"role": "user", "content": "What is 17 * 23?"}],
                         params=selar_local.DecodeParams(method="selar", tau=0.5))
    print(result.text, result.soft_steps)
"""
from selar_local.errors import (
    ContextOverflowError,
    DecodeError,
    InvalidParameterError,
    ModelLoadError,
    ModelNotFoundError,
    SelarError,
    UnsupportedModelError,
)
from selar_local.generate import GenerationResult, StepEvent
from selar_local.params import METHODS, DecodeParams

__version__ = "0.1.0"

__all__ = [
    "load", "Runtime", "Selar", "DecodeParams", "METHODS", "GenerationResult", "StepEvent",
    "SelarError", "ModelLoadError", "ModelNotFoundError", "UnsupportedModelError",
    "InvalidParameterError", "ContextOverflowError", "DecodeError",
]


def __getattr__(name: str):
    # Runtime pulls in llama.cpp; keep `import selar_local` cheap for the CLI and tools.
    if name in ("load", "Runtime"):
        from selar_local import runtime

        return getattr(runtime, name)
    if name == "Selar":
        from selar_local.api import Selar

        return Selar
    raise AttributeError(name)
