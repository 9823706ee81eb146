"""The method registry: every decoding method once, with its policy class, whether it feeds
soft inputs, and the DecodeParams fields it reads (each with its command-line help).

Validation (`params.DecodeParams`), the policy made for a sequence (`policies.make_policy`), the
command-line flags (`commands.common`), the HTTP API's fields (openai_schema.DECODE_FIELDS,
the DecodeParams fields) and `Runtime.require_method` all follow from here, so a new method
is its policy module plus one `Method` entry below (and its fields on DecodeParams). The loop
(generate.py) meets every method through the same Policy calls (policies.py: `propose`,
`forced_step`, `accept`, and the decision's next input: Token, Mixture or Vector), so it does
not change for a new one (README, "Adding a method"; tests/test_loop_plugin.py registers three).

No import of the policies here: params.py validates against this registry and the policies
import params, so a method names its policy class as "module:Class", loaded on first use.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from selar_local.self_grading import GRADER_NAMES  # pure: the prompts and weights, no decoding


@dataclass(frozen=True)
class Option:
    """A DecodeParams field a method reads; the flag is --field-name."""

    field: str
    help: str
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    policy: str                  # "module:Class" of its Policy
    summary: str
    soft_inputs: bool            # feeds embedding mixtures: needs a model that passed the self-check
    options: tuple[Option, ...] = ()
    # A search method is no per-step policy: it decodes whole answers (with `policy`) and the
    # facades (Selar, the server, `selar run`, `selar bench`) hand it to this "module:function":
    # (runtime, question, prompt tokens, params, *, decode, reference), where reference(answer)
    # says whether an answer is the known one (`selar bench` only; None elsewhere).
    search: str | None = None
    # Another policy class for some value of one of its fields: (field, {value: "module:Class"})
    variants: tuple[str, tuple[tuple[str, str], ...]] | None = None
    # Its prompt is several turns over one sequence, not the messages as they are: this
    # "module:function" renders them (runtime, messages, template_kwargs) -> turns.TurnPrompt.
    turns: str | None = None

    @property
    def fields(self) -> frozenset[str]:
        """The DecodeParams fields it reads."""
        return frozenset(option.field for option in self.options)

    def search_function(self):
        return _load(self.search)

    def turns_function(self):
        return _load(self.turns)

    def policy_class(self, params=None) -> type:
        """Its policy class (the variant `params` selects, if any)."""
        name = self.policy
        if self.variants is not None and params is not None:
            field, choices = self.variants
            name = dict(choices).get(getattr(params, field), name)
        return _load(name)


def _load(name: str | None):
    module, _, attribute = (name or "").partition(":")
    return getattr(importlib.import_module(module), attribute)


SOFT_NOISES = ("none", "gumbel", "dirichlet")
LATENT_ALIGNS = ("ridge", "identity")
SOFT_SOURCES = ("mixture", "hidden")  # alignment.ALIGN_KINDS (not imported: see the module docstring)

_NOISE = (
    Option("soft_noise", "Stochastic Soft Thinking: noise on the soft inputs' mixture weights",
           choices=SOFT_NOISES),
    Option("gumbel_tau", "temperature of the Gumbel-softmax weights"),
    Option("dirichlet_alpha", "concentration scale of the Dirichlet weights Dir(alpha p)"),
)

_ALIGN = Option("latent_align", "hidden-state inputs (latent, selar --soft-source hidden): the map from the "
                                "hidden state to input space, ridge W_a or identity", choices=LATENT_ALIGNS)

_LATENT_STEPS = Option("latent_steps", "latent: hidden-state steps before the text (m; 0 is exactly cot); "
                                       "latentmas: steps after each role's turn but the solver's (m >= 1)")

_LATENT_NOISE = Option("latent_noise", "latent, latentmas, soft: Gaussian noise on each fed latent vector, its norm relative "
                                       "to the vector's (a distinct latent path per seed)")

REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("cot", "selar_local.policies:CotPolicy", "chain of thought: the sampled token is fed back", False),
    Method("selar", "selar_local.policies:SelarPolicy", "SeLaR: entropy-gated soft steps with a contrastive push",
           True, (
               Option("tau", "SeLaR entropy gate threshold, or 'auto': the model's calibrated threshold "
                             "(`selar calibrate`; calibrates first if needed)"),
               Option("lam", "SeLaR contrastive push strength"),
               Option("ks", "SeLaR candidates in gate and mixture"),
               Option("thinking_only", "SeLaR: gate only inside <think>...</think>"),
               Option("soft_source", "SeLaR: the soft input's source, the top-ks mixture or the aligned hidden "
                                     "state (docs/LATENT.md)", choices=SOFT_SOURCES),
               _ALIGN,
               *_NOISE,
           ), variants=("soft_source", (("hidden", "selar_local.hidden_selar:HiddenSourceSelarPolicy"),))),
    Method("soft", "selar_local.noisy_soft:NoisySoftThinkingPolicy",
           "Soft Thinking: soft mixtures through the thinking span, Cold Stop", True, (
               Option("soft_topk", "Soft Thinking: tokens in each soft mixture (max_topk)"),
               Option("cold_stop_entropy", "Soft Thinking: Cold Stop threshold on the full-vocabulary entropy (nats)"),
               Option("cold_stop_steps", "Soft Thinking: consecutive low-entropy steps before Cold Stop closes thinking"),
               *_NOISE,
               _LATENT_NOISE,
           )),
    Method("moi", "selar_local.policies:MixtureOfInputsPolicy",
           "Mixture of Inputs: the sampled token blended with its posterior mixture", True, (
               Option("moi_topn", "Mixture of Inputs: tokens in the posterior mixture"),
               Option("moi_beta", "Mixture of Inputs: weight of the sampled token in the posterior"),
           )),
    Method("swir", "selar_local.policies:SwiReasoningPolicy",
           "SwiReasoning: latent and explicit blocks switched on the entropy", True, (
               Option("swir_window", "SwiReasoning: explicit steps before a switch back to latent"),
               Option("swir_max_switches", "SwiReasoning: switch budget C_max (0: no limit)"),
               Option("swir_alpha", "SwiReasoning: <think> blend weight alpha_0 at a switch to latent"),
               Option("swir_beta", "SwiReasoning: </think> blend weight beta_0 at a switch to explicit"),
               Option("swir_topk", "SwiReasoning: tokens in the latent mixture softmax(l) @ E"),
           )),
    Method("latent", "selar_local.latent_policy:LatentPolicy",
           "latent thoughts: m aligned hidden states fed before decoding as cot (docs/LATENT.md)", True, (
               _LATENT_STEPS,
               _ALIGN,
               _LATENT_NOISE,
           )),
    Method("latentmas", "selar_local.latent_policy:LatentMASPolicy",
           "LatentMAS (sequential): planner, critic, refiner and solver turns over one sequence, m latent steps "
           "after each but the solver's, whose turn is decoded as cot (selar_local/agent_roles.py)", True, (
               _LATENT_STEPS,
               _ALIGN,
               _LATENT_NOISE,
           ), turns="selar_local.turns:latentmas_prompt"),
    Method("textmas", "selar_local.policies:CotPolicy",
           "LatentMAS's text baseline: the same four roles, each decoding text (as cot) that the next ones quote",
           False, search="selar_local.textmas_search:search"),
    Method("frac", "selar_local.policies:CotPolicy",
           "Fractional Reasoning: cot with a steering vector (selar steer build) added to every layer", False, (
               Option("frac_alpha", "Fractional Reasoning: steering strength, a fraction of the typical size of each "
                                    "layer's update, in [-1, 1] (the paper samples it in [0, 0.15])"),
           )),
    Method("latentseek", "selar_local.policies:CotPolicy",
           "LatentSeek: policy-gradient search over the latent states of a greedy cot answer's first tokens, "
           "guided by the model's grading of its own answer", False, (
               Option("latentseek_lr", "LatentSeek: Adam learning rate on the latent prefix"),
               Option("latentseek_iterations", "LatentSeek: at most this many Adam steps (each one more "
                                               "generation and grading)"),
               Option("latentseek_rho", "LatentSeek: share of the answer's tokens in the latent prefix (at most 300)"),
               Option("latentseek_threshold", "LatentSeek: the search stops once the self-reward (in [-1, 0]) "
                                              "reaches this"),
               Option("latentseek_grader", "LatentSeek: how the model grades its answer: checks (four free-text "
                                           "checks, the published design), json (one grammar-forced object, cheap), "
                                           "or psrm (selar bench only: 0 if the answer is the data set's, else -1)",
                      choices=GRADER_NAMES),
           ), search="selar_local.latentseek_search:search"),
)}

METHODS: tuple[str, ...] = tuple(REGISTRY)


def method_options() -> dict[str, tuple[Option, tuple[str, ...]]]:
    """Every method's option once (shared ones, such as the noise, under all their methods):
    field -> (option, the methods that read it), in registry order."""
    out: dict[str, tuple[Option, tuple[str, ...]]] = {}
    for method in REGISTRY.values():
        for option in method.options:
            known, users = out.get(option.field, (option, ()))
            out[option.field] = (known, users + (method.name,))
    return out


def is_search(method: str) -> bool:
    """Whether `method` is a search the facades dispatch (not a policy the loop steps)."""
    return REGISTRY[method].search is not None


def refuse_search(method: str) -> None:
    """Where requests are decoded step by step (the scheduler): a search method would silently
    decode as its policy, so it is refused by name."""
    if is_search(method):
        from selar_local.errors import InvalidParameterError

        raise InvalidParameterError(f"method '{method}' is a search over whole answers, not a per-step decode: "
                                    "ask for it as a chat completion (server, Selar API) or with selar run/bench")


def feeds_soft_inputs(method: str) -> bool:
    return REGISTRY[method].soft_inputs
