"""One validated parameter object for every decoding method (in the spirit of vLLM's
SamplingParams). Defaults are the published SeLaR settings (SELAR_SPEC.md)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from selar_local.errors import InvalidParameterError
from selar_local.methods import LATENT_ALIGNS, METHODS, REGISTRY, SOFT_NOISES, SOFT_SOURCES  # the method registry (selar_local/methods.py)
from selar_local.vote import VOTES
# Per-step work grows with these; one request must not be able to make every other
# request's steps expensive (a 49k-token mixture costs ~2 ms per step on the host).
MAX_MIXTURE_SIZE = 64        # ks, soft_topk, moi_topn and any other mixture size
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256        # characters per stop string (held back while streaming)
MAX_TOP_LOGPROBS = 20        # as OpenAI
MAX_LATENT_STEPS = 256       # latent steps before the text (each is one decode)
# The filter a model may recommend (GGUF general.sampling.*, a registry entry's sampler=).
SAMPLER_FIELDS = ("temperature", "top_k", "top_p", "min_p")


@dataclass(frozen=True)
class DecodeParams:
    method: str = "selar"
    max_tokens: int = 512
    # Common sampling filter: temperature -> top-k -> top-p -> min-p -> softmax.
    temperature: float = 0.6
    top_k: int = 20          # 0 disables
    top_p: float = 0.95      # 1.0 disables
    min_p: float = 0.0       # 0.0 disables
    seed: int = 41
    greedy: bool = False     # shown token = argmax instead of a sample
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # as llama-server: end-of-generation tokens are never drawn
    logprobs: int | None = None  # None: no log-probabilities; n >= 0: the shown token's and n alternatives
    # Self-consistency (K samples of one prompt, `n` on the server): how their answers are
    # counted, one vote each or weighed by exp(mean log-probability) (selar_local/vote.py).
    vote: str = "majority"
    # SeLaR
    tau: float = 0.5         # entropy gate threshold; > 1 never opens the gate
    lam: float = 1.0         # contrastive push away from the dominant token
    ks: int = 3              # candidates in the gate's entropy and the soft mixture
    thinking_only: bool = False  # gate only inside <think>...</think>
    soft_source: str = "mixture"  # mixture | hidden: SeLaR's soft input from the top-ks rows or the hidden state
    # Thinking budget: after this many tokens inside the span, the close marker is
    # emitted and the answer follows (None: no budget). Needs a model with thinking markers.
    max_think_tokens: int | None = None
    # Soft Thinking
    soft_topk: int = 10              # max_topk of the soft mixture
    cold_stop_entropy: float = 0.01  # Cold Stop threshold on full-vocab entropy (nats)
    cold_stop_steps: int = 256       # consecutive low-entropy steps before </think>
    # Mixture of Inputs
    moi_topn: int = 20
    moi_beta: float = 1.0
    # Stochastic Soft Thinking: noise on the mixture weights of soft and selar
    soft_noise: str = "none"         # none | gumbel | dirichlet
    gumbel_tau: float = 0.5          # w = softmax((log p + g) / gumbel_tau)
    dirichlet_alpha: float = 1.0     # w ~ Dir(dirichlet_alpha * p)
    # SwiReasoning
    swir_window: int = 512           # W: steps in explicit mode before a switch back to latent
    swir_max_switches: int = 0       # C_max on latent -> explicit switches; 0: no limit
    swir_alpha: float = 0.7          # alpha_0: <think> blend when switching to latent
    swir_beta: float = 0.7           # beta_0: </think> blend when switching to explicit
    swir_topk: int = 20              # latent input = softmax(l) over the top swir_topk tokens
    # Hidden-state latent steps (issue 25, docs/LATENT.md)
    latent_steps: int = 8            # m: aligned hidden states fed before the text is decoded
    latent_align: str = "ridge"      # ridge | identity: the map from hidden state to input space
    latent_noise: float = 0.0        # SIGMA: Gaussian noise on each fed latent vector, relative to its norm
    # Fractional Reasoning: the steering vector's strength, a fraction of each layer's typical update
    frac_alpha: float = 0.0
    # LatentSeek (a search: selar_local/latentseek_search.py), the paper's settings
    latentseek_lr: float = 0.03
    latentseek_iterations: int = 10
    latentseek_rho: float = 0.1
    latentseek_threshold: float = -0.2
    latentseek_grader: str = "checks"  # selar_local/self_grading.py's GRADERS
    # Constrained answer (llama.cpp's grammar sampler, after any thinking span): GBNF text,
    # or a JSON Schema (a dict or its JSON text; kept as canonical JSON text).
    grammar: str | None = None
    json_schema: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        _check(self.method in REGISTRY, "method", self.method, f"one of {', '.join(REGISTRY)}")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        for name in SAMPLER_FIELDS:
            check_sampler_value(name, getattr(self, name))
        _check(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"<{len(self.stop)} strings>",
               f"at most {MAX_STOP_STRINGS} stop strings")
        _check(all(len(s) <= MAX_STOP_LENGTH for s in self.stop), "stop", "<a long string>",
               f"stop strings of at most {MAX_STOP_LENGTH} characters")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
               "logprobs", self.logprobs, f"an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token)")
        _check(self.vote in VOTES, "vote", self.vote, f"one of {', '.join(VOTES)}")
        _check(_finite(self.tau) and self.tau >= 0, "tau", self.tau,
               "a number >= 0 (the gate compares a normalised entropy in [0, 1]; tau > 1 disables it)")
        _check(_finite(self.lam) and self.lam >= 0, "lam", self.lam, "a number >= 0")
        _check(self.max_think_tokens is None or (_is_int(self.max_think_tokens) and self.max_think_tokens >= 0),
               "max_think_tokens", self.max_think_tokens, "an integer >= 0, or None for no budget")
        _check(_is_int(self.ks) and 2 <= self.ks <= MAX_MIXTURE_SIZE, "ks", self.ks,
               f"an integer in [2, {MAX_MIXTURE_SIZE}] (entropy over one token is 0; larger mixtures cost every step)")
        if self.top_k:
            _check(self.ks <= self.top_k, "ks", self.ks, f"at most top_k ({self.top_k})")
        _check(_is_int(self.soft_topk) and 1 <= self.soft_topk <= MAX_MIXTURE_SIZE, "soft_topk", self.soft_topk,
               f"an integer in [1, {MAX_MIXTURE_SIZE}]")
        _check(_finite(self.cold_stop_entropy) and self.cold_stop_entropy >= 0, "cold_stop_entropy",
               self.cold_stop_entropy, "a number >= 0")
        _check(_is_int(self.cold_stop_steps) and self.cold_stop_steps >= 1, "cold_stop_steps",
               self.cold_stop_steps, "an integer >= 1")
        _check(_is_int(self.moi_topn) and 2 <= self.moi_topn <= MAX_MIXTURE_SIZE, "moi_topn", self.moi_topn,
               f"an integer in [2, {MAX_MIXTURE_SIZE}]")
        _check(_finite(self.moi_beta) and self.moi_beta >= 0, "moi_beta", self.moi_beta, "a number >= 0")
        _check(self.soft_noise in SOFT_NOISES, "soft_noise", self.soft_noise, f"one of {', '.join(SOFT_NOISES)}")
        _check(_finite(self.gumbel_tau) and self.gumbel_tau > 0, "gumbel_tau", self.gumbel_tau, "a number > 0")
        _check(_finite(self.dirichlet_alpha) and self.dirichlet_alpha > 0, "dirichlet_alpha",
               self.dirichlet_alpha, "a number > 0")
        _check(_is_int(self.swir_window) and self.swir_window >= 1, "swir_window", self.swir_window,
               "an integer >= 1")
        _check(_is_int(self.swir_max_switches) and self.swir_max_switches >= 0, "swir_max_switches",
               self.swir_max_switches, "an integer >= 0 (0: no limit)")
        _check(_finite(self.swir_alpha) and 0 <= self.swir_alpha <= 1, "swir_alpha", self.swir_alpha,
               "a number in [0, 1]")
        _check(_finite(self.swir_beta) and 0 <= self.swir_beta <= 1, "swir_beta", self.swir_beta,
               "a number in [0, 1]")
        _check(_is_int(self.swir_topk) and 1 <= self.swir_topk <= MAX_MIXTURE_SIZE, "swir_topk", self.swir_topk,
               f"an integer in [1, {MAX_MIXTURE_SIZE}]")
        _check(_is_int(self.latent_steps) and 0 <= self.latent_steps <= MAX_LATENT_STEPS, "latent_steps",
               self.latent_steps, f"an integer in [0, {MAX_LATENT_STEPS}]")
        _check(self.method != "latentmas" or self.latent_steps >= 1, "latent_steps", self.latent_steps,
               "at least 1 for latentmas (each role but the solver thinks that many steps; textmas is the roles in text)")
        _check(self.soft_source in SOFT_SOURCES, "soft_source", self.soft_source, f"one of {', '.join(SOFT_SOURCES)}")
        _check(self.latent_align in LATENT_ALIGNS, "latent_align", self.latent_align, f"one of {', '.join(LATENT_ALIGNS)}")
        _check(_finite(self.latent_noise) and self.latent_noise >= 0, "latent_noise", self.latent_noise,
               "a number >= 0 (the noise's norm relative to the fed vector's)")
        if self.frac_alpha != 0.0 or self.method == "frac":
            from selar_local.steering import check_alpha

            check_alpha(self.frac_alpha)
        from selar_local.latentseek import check_settings

        check_settings(self.latentseek_lr, self.latentseek_iterations, self.latentseek_rho, self.latentseek_threshold)
        from selar_local.self_grading import GRADER_NAMES

        _check(self.latentseek_grader in GRADER_NAMES, "latentseek_grader", self.latentseek_grader,
               f"one of {', '.join(GRADER_NAMES)}")
        self._check_constraint()

    def _check_constraint(self) -> None:
        from selar_local.grammar import canonical_schema, check_gbnf_text, schema_to_gbnf

        if self.grammar is not None and self.json_schema is not None:
            raise InvalidParameterError("grammar and json_schema are exclusive: give one of them")
        if self.ignore_eos and (self.grammar is not None or self.json_schema is not None):
            raise InvalidParameterError("ignore_eos cannot go with a grammar or json_schema: a complete "
                                        "answer must be able to end")
        if self.grammar is not None:
            check_gbnf_text(self.grammar)
        if self.json_schema is not None:
            text = canonical_schema(self.json_schema)
            schema_to_gbnf(text)  # a schema the converter cannot handle fails here, by name
            object.__setattr__(self, "json_schema", text)

    def constraint_gbnf(self) -> str | None:
        """The GBNF the answer must match, or None when it is free."""
        if self.json_schema is not None:
            from selar_local.grammar import schema_to_gbnf

            return schema_to_gbnf(self.json_schema)
        return self.grammar

    def replace(self, **changes: Any) -> "DecodeParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DecodeParams":
        """Build from user input, rejecting unknown keys by name (typos must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidParameterError(f"unknown decoding parameter(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SAMPLER_RULES = {
    "temperature": (lambda v: _finite(v) and v > 0, "a number > 0 (use greedy=True for argmax decoding)"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 disables)"),
    "top_p": (lambda v: _finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
}


def check_sampler_value(name: str, value: Any) -> None:
    """Raise InvalidParameterError unless `value` is valid for the sampler field `name`."""
    ok, expected = _SAMPLER_RULES[name]
    _check(ok(value), name, value, expected)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise InvalidParameterError(f"invalid {name}={value!r}: expected {expected}")
