"""Options shared by the commands that load a model and decode."""
from __future__ import annotations

import argparse

from selar_local.errors import InvalidParameterError
from selar_local.methods import METHODS, Option, method_options
from selar_local.params import SAMPLER_FIELDS, DecodeParams

_DEFAULTS = DecodeParams()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", default=None,
                       help="registry name (see `selar models`) or path to a .gguf file; default: the embedded model")
    group.add_argument("--n-ctx", type=int, default=4096, help="context size per sequence (default %(default)s)")
    group.add_argument("--threads", type=int, default=None,
                       help="decode threads (default: half the CPUs, about the physical cores)")
    group.add_argument("--threads-batch", type=int, default=None,
                       help="prompt-processing threads (default: all the CPUs, as llama.cpp)")
    group.add_argument("--prefill-chunk", type=int, default=None,
                       help="prompt tokens fed per step while other sequences decode, so that no stream "
                            "waits for a whole prompt (default 64 on CPU, 256 with a GPU backend; keep it a multiple of 64)")
    group.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                       help="prefill every prompt in full (default: a slot keeps its KV cells, and the next "
                            "request sharing a prefix prefills only the rest)")
    group.add_argument("--kv-unified", action="store_true",
                       help="one KV pool for all parallel sequences (a long request may use what short ones "
                            "leave) instead of n_ctx cells each")
    group.add_argument("--n-gpu-layers", type=int, default=-1,
                       help="layers to offload on Metal/CUDA builds (-1: all; ignored on CPU builds)")
    group.add_argument("--rpc", metavar="HOST:PORT[,HOST:PORT...]", default=None,
                       help="split the model's layers over these `selar rpc-server`s (llama.cpp's RPC backend; "
                            "with --n-gpu-layers N only the last N layers leave this machine); docs/DISTRIBUTED.md")
    group.add_argument("--tensor-split", metavar="P0,P1,...", type=_proportions, default=None,
                       help="share of the offloaded layers per device: the --rpc servers in order, then local GPUs "
                            "(default: by free memory)")
    group.add_argument("--cpu-repack", action=argparse.BooleanOptionalAction, default=None,
                       help="let llama.cpp repack quantized weights for its interleaved CPU kernels. Those "
                            "kernels treat a row differently by where it falls in the batch, so a sequence's "
                            "logits then depend on what decodes beside it (default: on; `bench`: off, so that "
                            "an item's tokens do not depend on --parallel or on where a run was resumed)")
    group.add_argument("--verbose", "-v", action="store_true", help="show llama.cpp's log and full tracebacks")


def _proportions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace("/", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 3,1, not {text!r}") from None


def add_decode_arguments(parser: argparse.ArgumentParser, *, method_default: str | None = "selar") -> None:
    group = parser.add_argument_group("decoding (defaults: the published SeLaR settings)")
    if method_default is not None:
        group.add_argument("--method", choices=METHODS, default=method_default,
                           help=f"decoding method (default {method_default})")
    for name, (option, users) in method_options().items():  # the registry's (selar_local/methods.py)
        _add_method_option(group, option, users)
    add_sampler_arguments(group)
    group.add_argument("--greedy", action="store_true", help="show the argmax token instead of a sample")
    group.add_argument("--max-tokens", type=int, default=_DEFAULTS.max_tokens)
    group.add_argument("--max-think-tokens", type=int, default=None, metavar="N",
                       help="thinking budget: after N tokens inside the thinking span the close marker "
                            "is emitted and the answer follows (models with thinking markers)")
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_method_option(group, option: Option, users: tuple[str, ...]) -> None:
    """--field-name for a method's DecodeParams field, typed by its default."""
    flag = "--" + option.field.replace("_", "-")
    default = getattr(_DEFAULTS, option.field)
    helptext = option.help if len(users) == 1 else f"{option.help} ({', '.join(users)})"
    if option.field == "tau":  # a number or "auto" (resolved against the model); None: not given
        group.add_argument(flag, type=tau_value, default=None,
                           help=f"{helptext}. Default: the registry's calibrated tau for the sampler in use, "
                                f"else {default}")
    elif isinstance(default, bool):
        group.add_argument(flag, action="store_true", help=helptext)
    elif option.choices is not None:
        group.add_argument(flag, choices=option.choices, default=default, help=helptext)
    else:
        group.add_argument(flag, type=type(default), default=default, help=f"{helptext} (default %(default)s)")


def add_sampler_arguments(group) -> None:
    """The sampling filter and seed, shared by every decoding command and `selar calibrate`
    (the gate's entropy depends on them). The filter options default to None: the model's
    recommended value where it has one (selar_local.model_sampler), else the published one."""
    model = "the model's recommended value (GGUF general.sampling.*, the registry), else"
    group.add_argument("--temperature", type=float, default=None, help=f"default: {model} {_DEFAULTS.temperature}")
    group.add_argument("--top-k", type=int, default=None, help=f"default: {model} {_DEFAULTS.top_k} (0 disables)")
    group.add_argument("--top-p", type=float, default=None, help=f"default: {model} {_DEFAULTS.top_p}")
    group.add_argument("--min-p", type=float, default=None, help=f"default: {model} {_DEFAULTS.min_p}")
    group.add_argument("--seed", type=int, default=_DEFAULTS.seed)


def explicit_sampler(args: argparse.Namespace) -> set[str]:
    """The sampler fields (and tau) given on the command line (the model's values fill the others)."""
    given = {name for name in SAMPLER_FIELDS if getattr(args, name, None) is not None}
    return given | ({"tau"} if getattr(args, "tau", None) is not None else set())


def sampler_from_args(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in SAMPLER_FIELDS if getattr(args, name, None) is not None}


def tau_value(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def wants_auto_tau(args: argparse.Namespace) -> bool:
    return getattr(args, "tau", None) == "auto"


def params_from_args(args: argparse.Namespace, **overrides) -> DecodeParams:
    """The decoding parameters of the command line. With --tau auto, pass the resolved value
    as the `tau` override (see `selar_local.calibrate.auto_tau`). Sampler options not given
    keep the published values here: once the model is known, `ModelSampler.apply(params,
    explicit_sampler(args))` puts its recommended ones in their place."""
    if wants_auto_tau(args) and "tau" not in overrides:
        raise InvalidParameterError("--tau auto is resolved against the model: calibrate first")
    values = dict(
        method=getattr(args, "method", "selar"), **sampler_from_args(args),
        seed=args.seed, greedy=args.greedy, max_tokens=args.max_tokens, stop=tuple(args.stop),
        max_think_tokens=getattr(args, "max_think_tokens", None),
        **{name: getattr(args, name) for name in method_options()},
    )
    if values["tau"] is None:  # not given: the published value here; the registry's once the model is known
        values["tau"] = _DEFAULTS.tau
    values.update(overrides)
    return DecodeParams(**values)


def runtime_options(args: argparse.Namespace) -> dict:
    """The Runtime keyword arguments of the model options (everything but the model)."""
    from selar_local.errors import InvalidParameterError

    for name in ("threads", "threads_batch", "prefill_chunk"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InvalidParameterError(f"invalid --{name.replace('_', '-')} {value}: expected an integer >= 1")
    options = dict(n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads_batch,
                   prefill_chunk=args.prefill_chunk, prompt_cache=args.prompt_cache, kv_unified=args.kv_unified,
                   n_gpu_layers=args.n_gpu_layers, verbose=args.verbose, rpc=args.rpc, tensor_split=args.tensor_split)
    if args.cpu_repack is not None:  # else the command's default
        options["cpu_repack"] = args.cpu_repack
    return options


def load_runtime(args: argparse.Namespace, *, n_parallel: int = 1):
    from selar_local.runtime import load

    return load(args.model, n_parallel=n_parallel, **runtime_options(args))
