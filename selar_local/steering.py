"""Fractional Reasoning's steering vectors (Liu et al., 2025): built once per model file, applied
as llama.cpp control vectors scaled by alpha.

Extraction (`build`): each of N GSM8K *train* questions is put to the model twice through its
own chat template, once with an instruction to reason step by step and once with one to answer
directly; each layer's output at the last prompt token is read (engine.LayerStates) and the
difference reasoning minus direct kept. Per layer the vector is the mean difference plus the
first principal component of the centred differences, its sign aligned with the mean (as the
paper's code, after In-Context Vectors). The typical norm of each layer's *update* (what layer
il adds to the residual stream, |l_out[il] - l_out[il-1]|, the median over all 2N prompts) is
stored with it, so that alpha is a fraction of that update.

Why the update and not the residual stream: the paper's code (In-Context Vectors' layer) steers
each layer's MLP output, x -> unit(unit(x) + alpha unit(v)) |x|, so its alpha is a fraction of
what a layer adds. Version 1 of this file scaled by the residual stream's norm instead; added at
every layer, that compounds to several times the stream itself, and alpha 0.1 turned every
GSM8K answer into a loop (docs/BENCHMARKS.md, "Fractional Reasoning's alpha").

Application (`control_vector`): row il is alpha * update_norm[il] * unit(vector[il]), added by
llama.cpp to layer il's output without renormalising (the paper renormalises the MLP output).
Row 0 stays zero: llama.cpp never steers the first layer.

Stored per model file sha256 under the cache directory as .npz, written atomically; a build
saves its progress every few pairs and resumes from it, so an interrupted build is never a
corrupt file.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from selar_local.errors import DatasetError, InvalidParameterError

if TYPE_CHECKING:
    from selar_local.runtime import Runtime

STEERING_VERSION = 2  # 2: alpha scales with each layer's update, not its output (see above)
DEFAULT_PAIRS = 128
# alpha as a fraction of the typical size of a layer's update. The paper samples its alpha in
# [0, 0.15]; negative values steer towards answering directly. At 1 the vector is as large as
# everything the layer adds, at every layer: past that it is no longer a nudge.
ALPHA_RANGE = (-1.0, 1.0)
REASON_INSTRUCTION = "Solve this problem. Reason step by step, showing each step of your work, and then give the final answer."
DIRECT_INSTRUCTION = "Give only the final answer, immediately: no reasoning, no steps, no explanation."
QUESTIONS_FILE = Path(__file__).resolve().parent / "data" / "gsm8k" / "train_first1024.jsonl"
_SAVE_EVERY = 8  # pairs between progress saves


class SteeringError(InvalidParameterError):
    """A steering vector is missing, belongs to another model file, or cannot be built."""


@dataclass(frozen=True)
class SteeringVectors:
    model_sha256: str
    model_file: str
    vectors: np.ndarray        # (n_layer, n_embd): mean difference + sign-aligned first principal component
    update_norms: np.ndarray  # (n_layer,): median of |l_out[il] - l_out[il-1]| on the 2N prompts (il 0: |l_out[0]|)
    n_pairs: int
    questions_file: str

    @property
    def n_layer(self) -> int:
        return int(self.vectors.shape[0])

    def check_model(self, model_sha256: str, model_file: str = "") -> None:
        if model_sha256 != self.model_sha256:
            raise SteeringError(
                f"the steering vector was built for another model file ({self.model_file}, sha256 "
                f"{self.model_sha256[:12]}...), not {model_file or 'this one'} (sha256 {model_sha256[:12]}...): "
                f"run `selar steer build --model {model_file or 'MODEL'}`")


def check_alpha(alpha: float) -> float:
    lo, hi = ALPHA_RANGE
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or not lo <= alpha <= hi:
        raise InvalidParameterError(f"invalid frac_alpha={alpha!r}: expected a number in [{lo}, {hi}], a fraction "
                                    "of the typical size of each layer's update (the paper samples it in [0, 0.15])")
    return float(alpha)


def steering_vectors(differences: np.ndarray) -> np.ndarray:
    """Per layer, mean(d) + s * pc1, where pc1 is the unit first principal component of the
    centred differences and s = sign(pc1 . mean(d)). differences: (N, n_layer, n_embd)."""
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 3 or d.shape[0] < 2:
        raise ValueError(f"need (N >= 2, n_layer, n_embd) differences, got shape {d.shape}")
    mean = d.mean(axis=0)
    out = np.empty(d.shape[1:], dtype=np.float64)
    for il in range(d.shape[1]):
        centred = d[:, il, :] - mean[il]
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        pc = vt[0]
        out[il] = mean[il] + (pc if pc @ mean[il] >= 0 else -pc)
    return out.astype(np.float32)


def control_vector(steering: SteeringVectors, alpha: float) -> np.ndarray:
    """The (n_layer, n_embd) control vector for `alpha`: row il is alpha * update_norm[il] *
    unit(vector[il]); row 0 is zero. alpha 0 gives zeros (which leave the logits bit-identical)."""
    alpha = check_alpha(alpha)
    norms = np.linalg.norm(steering.vectors.astype(np.float64), axis=1, keepdims=True)
    unit = np.divide(steering.vectors, norms, out=np.zeros_like(steering.vectors, dtype=np.float64),
                     where=norms > 0)
    rows = (alpha * steering.update_norms[:, None] * unit).astype(np.float32)
    rows[0] = 0
    return rows


# -- storage ---------------------------------------------------------------------------
def steering_file(model_sha256: str) -> Path:
    from selar_local.download import cache_dir

    return cache_dir() / "steering" / f"{model_sha256}-v{STEERING_VERSION}.npz"


def _save_npz(path: Path, **arrays) -> None:
    """Write atomically: a temporary file beside it, then rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)


def _meta(**fields) -> np.ndarray:
    return np.array(json.dumps(fields, sort_keys=True))


def save(steering: SteeringVectors, path: Path | None = None) -> Path:
    path = path or steering_file(steering.model_sha256)
    _save_npz(path, vectors=steering.vectors, update_norms=steering.update_norms,
              meta=_meta(version=STEERING_VERSION, model_sha256=steering.model_sha256, model_file=steering.model_file,
                         n_pairs=steering.n_pairs, questions_file=steering.questions_file))
    return path


def load_file(path: str | os.PathLike) -> SteeringVectors:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            vectors, norms = data["vectors"], data["update_norms"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise SteeringError(f"{path} is not a readable steering file ({exc}): build it again with `selar steer build`")
    if meta.get("version") != STEERING_VERSION or vectors.ndim != 2 or norms.shape != vectors.shape[:1]:
        raise SteeringError(f"{path} is a steering file of another version or shape: build it again")
    return SteeringVectors(meta["model_sha256"], meta["model_file"], vectors, norms, int(meta["n_pairs"]),
                           meta["questions_file"])


def load_for(model_path: str | os.PathLike, path: str | os.PathLike | None = None) -> SteeringVectors:
    """The steering vectors of a model file: from `path`, else the cache; checked against the file."""
    from selar_local.download import file_sha256

    model_path = Path(model_path)
    sha = file_sha256(model_path)
    source = Path(path) if path is not None else steering_file(sha)
    if not source.is_file():
        raise SteeringError(f"no steering vector for {model_path.name} (looked for {source}): run "
                            f"`selar steer build --model {model_path}` first")
    steering = load_file(source)
    steering.check_model(sha, model_path.name)
    return steering


# -- extraction ------------------------------------------------------------------------
def read_questions(n_pairs: int, path: str | os.PathLike | None = None) -> list[str]:
    """The first n_pairs questions of a JSON-lines file (default: the shipped GSM8K train lines)."""
    source = Path(path) if path is not None else QUESTIONS_FILE
    questions = []
    try:
        with source.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if len(questions) == n_pairs:
                    break
                if line.strip():
                    record = json.loads(line)
                    text = record.get("question") or record.get("problem")
                    if not isinstance(text, str) or not text.strip():
                        raise DatasetError(f"{source}:{number}: no 'question' (or 'problem') text")
                    questions.append(text.strip())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read questions from {source}: {exc}") from exc
    if len(questions) < n_pairs:
        raise DatasetError(f"{source} has {len(questions)} questions, fewer than the {n_pairs} pairs asked for")
    return questions


def pair_messages(question: str) -> tuple[list[dict], list[dict]]:
    """The reasoning prompt and the direct prompt of one question (user turns)."""
    return ([{"role": "user", "content": f"{question}\n\n{REASON_INSTRUCTION}"}],
            [{"role": "user", "content": f"{question}\n\n{DIRECT_INSTRUCTION}"}])


def build(runtime: "Runtime", *, n_pairs: int = DEFAULT_PAIRS, questions_file: str | os.PathLike | None = None,
          refresh: bool = False, progress: Callable[[int, int], None] | None = None) -> SteeringVectors:
    """Build (or load from the cache) the model's steering vectors; progress(done, total) per pair.
    Saves progress every few pairs to a partial file beside the result and resumes from it."""
    from selar_local.download import file_sha256
    from selar_local.engine import LayerStates

    if not isinstance(n_pairs, int) or n_pairs < 2:
        raise InvalidParameterError(f"invalid pairs={n_pairs!r}: need at least 2 question pairs")
    sha = file_sha256(runtime.model_path)
    target = steering_file(sha)
    if target.is_file() and not refresh:
        cached = load_file(target)
        if cached.n_pairs == n_pairs and cached.questions_file == str(questions_file or QUESTIONS_FILE):
            return cached
    questions = read_questions(n_pairs, questions_file)
    partial = target.with_name(target.name.replace(".npz", ".partial.npz"))
    key = dict(model_sha256=sha, n_pairs=n_pairs, questions=questions, reason=REASON_INSTRUCTION,
               direct=DIRECT_INSTRUCTION)
    differences, norms, done = _resume(partial, key)
    states = LayerStates(runtime.model, n_ctx=min(2048, runtime.model.n_ctx_train or 2048),
                         n_threads=runtime.context.n_threads, n_threads_batch=runtime.context.n_threads_batch)
    try:
        if differences is None:
            differences = np.zeros((n_pairs, states.n_layer, runtime.model.n_embd), dtype=np.float32)
            norms = np.zeros((2 * n_pairs, states.n_layer), dtype=np.float32)
        if progress:
            progress(done, n_pairs)
        for i in range(done, n_pairs):
            reason, direct = (states.read(runtime.encode(messages=m)) for m in pair_messages(questions[i]))
            differences[i] = reason - direct
            norms[2 * i], norms[2 * i + 1] = layer_update_norms(reason), layer_update_norms(direct)
            done = i + 1
            if done % _SAVE_EVERY == 0 and done < n_pairs:
                _save_npz(partial, differences=differences, norms=norms, done=np.array(done), key=_meta(**key))
            if progress:
                progress(done, n_pairs)
    finally:
        states.close()
    steering = SteeringVectors(sha, runtime.model_path.name, steering_vectors(differences),
                               np.median(norms, axis=0).astype(np.float32), n_pairs, str(questions_file or QUESTIONS_FILE))
    save(steering, target)
    partial.unlink(missing_ok=True)
    return steering


def _resume(partial: Path, key: dict):
    """The saved differences, norms and pairs done of an interrupted build with the same inputs."""
    try:
        with np.load(partial, allow_pickle=False) as data:
            if json.loads(str(data["key"])) == json.loads(json.dumps(key)):
                return data["differences"].copy(), data["norms"].copy(), int(data["done"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        pass
    return None, None, 0


def layer_update_norms(states: np.ndarray) -> np.ndarray:
    """|l_out[il] - l_out[il-1]| per layer of one prompt's (n_layer, n_embd) states; layer 0's
    input (the token's embedding row) is not read, so its entry is |l_out[0]| (row 0 is never steered)."""
    states = np.asarray(states, dtype=np.float32)
    return np.concatenate([np.linalg.norm(states[:1], axis=1), np.linalg.norm(np.diff(states, axis=0), axis=1)])


def alpha_draws(alpha_range: Sequence[float], samples: int, seed: int) -> list[float]:
    """Fractional Reasoning's test-time scaling: one alpha per sample, uniform in [a, b]
    (the paper: [0, 0.15]), from the request's seed so a run replays."""
    lo, hi = (check_alpha(float(a)) for a in alpha_range)
    if lo > hi:
        raise InvalidParameterError(f"invalid frac_alpha_range={list(alpha_range)}: expected a <= b")
    rng = np.random.default_rng(seed)
    return [float(a) for a in rng.uniform(lo, hi, size=samples)]
