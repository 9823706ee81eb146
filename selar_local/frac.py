"""`--method frac`: chain-of-thought decoding with Fractional Reasoning's steering vector as
llama.cpp's control vector, scaled by `frac_alpha` (selar_local/steering.py).

A control vector belongs to the whole context: every sequence of a decode gets it. So
sequences with different vectors never share a decode; the loop only checks that and sets the
vector when nothing is live (`use_control_vector`, its one hook in BatchGenerator), and the
grouping is done above it: the scheduler drains the live sequences before admitting a request
with another vector (mlx-lm's server does the same with batches that cannot mix), and
`generate_samples` with an alpha range decodes each alpha's samples in its own round (`selar
bench` likewise, a round holding that alpha's samples of every item). The
prompt cache holds cells of one vector: switching forgets what free slots kept.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Iterable, Sequence

from selar_local.errors import InvalidParameterError
from selar_local.params import DecodeParams

if TYPE_CHECKING:
    from selar_local.runtime import Runtime, SelfConsistencyResult

METHOD = "frac"
_steering_by_runtime: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def control_key(params: DecodeParams) -> str | None:
    """What decodes may share: None for no control vector, else the method and its alpha."""
    return f"{METHOD}:{params.frac_alpha!r}" if params.method == METHOD else None


def steering_for(runtime: "Runtime"):
    """The runtime's model's steering vectors (loaded once; SteeringError where there are none
    or they belong to another model file)."""
    from selar_local import steering

    loaded = _steering_by_runtime.get(runtime)
    if loaded is None:
        loaded = steering.load_for(runtime.model_path)
        _steering_by_runtime[runtime] = loaded
    return loaded


def check_ready(runtime: "Runtime", params: DecodeParams) -> None:
    """In the caller's thread, before queueing: a frac request needs the model's vectors."""
    if params.method == METHOD:
        steering_for(runtime)


def use_control_vector(runtime: "Runtime", params_list: Sequence[DecodeParams],
                       live: Iterable[DecodeParams]) -> None:
    """Give the context the control vector `params_list` decode with. Called by the loop as
    sequences are admitted; refuses (a bug above the loop) to mix vectors in one decode."""
    from selar_local.engine import control_vector_digest, control_vector_id, set_control_vector

    keys = {control_key(p) for p in params_list}
    if len(keys) > 1:
        raise InvalidParameterError(f"sequences decoded together must share a control vector; got {sorted(map(str, keys))}")
    key = keys.pop()
    live_keys = {control_key(p) for p in live}
    if live_keys and live_keys != {key}:
        raise RuntimeError(f"a sequence with control vector {key} cannot join live ones with {sorted(map(str, live_keys))}: "
                           "the caller must drain them first")
    vectors = None
    if key is not None:
        from selar_local.steering import control_vector

        vectors = control_vector(steering_for(runtime), params_list[0].frac_alpha)
    if control_vector_digest(vectors) == control_vector_id(runtime.context):
        return
    set_control_vector(runtime.context, vectors)
    runtime.slots.forget_free()  # their cells were computed under the old vector


def sample_params(params: DecodeParams, samples: int, alpha_range: Sequence[float]) -> list[DecodeParams]:
    """Each sample's decoding in Fractional Reasoning's test-time scaling: sample i decodes with
    seed + i and the i-th alpha drawn uniformly from alpha_range with params.seed (so sample i
    of every prompt decoded with one seed shares its alpha, and can share its decodes)."""
    from selar_local.steering import alpha_draws
    from selar_local.vote import sample_seeds

    alphas = alpha_draws(alpha_range, samples, params.seed)
    return [params.replace(seed=s, frac_alpha=a) for s, a in zip(sample_seeds(params.seed, samples), alphas)]


def generate_samples(runtime: "Runtime", prompt: str | None = None, params: DecodeParams | None = None, *,
                     messages: Sequence[dict] | None = None, samples: int = 5,
                     alpha_range: Sequence[float] = (0.0, 0.15), dataset: str = "gsm8k") -> "SelfConsistencyResult":
    """Fractional Reasoning's test-time scaling: sample i decodes with seed + i and its own alpha
    drawn uniformly from alpha_range (from the seed), then the vote params.vote (majority: ties
    to the higher mean log-probability; weighted: by exp(mean log-probability)). Samples of one
    alpha decode together, each alpha in its own round."""
    from selar_local.generate import generate_groups
    from selar_local.runtime import SelfConsistencyResult

    params = (params or runtime.default_params()).replace(method=METHOD)
    if not isinstance(samples, int) or isinstance(samples, bool) or not 1 <= samples <= runtime.n_parallel:
        raise InvalidParameterError(f"invalid samples={samples!r}: expected an integer in [1, n_parallel="
                                    f"{runtime.n_parallel}]")
    steering_for(runtime)
    members = sample_params(params, samples, alpha_range)
    alphas = [m.frac_alpha for m in members]
    tokens = runtime.encode(prompt, messages=messages)
    results = [None] * samples
    for alpha in dict.fromkeys(alphas):  # one round per distinct alpha, in draw order
        indices = [i for i, a in enumerate(alphas) if a == alpha]
        for i, result in zip(indices, generate_groups(runtime, [tokens], [[members[i] for i in indices]])[0]):
            results[i] = result
    return SelfConsistencyResult.from_results(results, dataset, params.vote)


def generate_by_control_vector(run, runtime: "Runtime", prompts: Sequence[Sequence[int]],
                               params: Sequence[DecodeParams] | DecodeParams, *, on_finish=None) -> list:
    """`run(runtime, prompts, params, on_finish=...)` (generate_many) once per control vector,
    in order of first appearance, so that a batch mixing methods or alphas never shares a decode;
    results and on_finish indices are those of the whole list."""
    if isinstance(params, DecodeParams):
        params = [params] * len(prompts)
    if len(params) != len(prompts):
        raise InvalidParameterError("one DecodeParams per prompt, or a single one for all")
    rounds: dict[str | None, list[int]] = {}
    for index, p in enumerate(params):
        rounds.setdefault(control_key(p), []).append(index)
    if len(rounds) <= 1:
        return run(runtime, prompts, params, on_finish=on_finish)
    results: list = [None] * len(prompts)
    for indices in rounds.values():
        finished = None if on_finish is None else (lambda i, result, indices=indices: on_finish(indices[i], result))
        for index, result in zip(indices, run(runtime, [prompts[i] for i in indices], [params[i] for i in indices],
                                              on_finish=finished)):
            results[index] = result
    return results
