"""`selar calibrate --model M`: fit SeLaR's gate threshold to a model (used by --tau auto)."""
from __future__ import annotations

import argparse
import sys

from selar_local.commands.common import (
    add_model_arguments, add_sampler_arguments, explicit_sampler, load_runtime, sampler_from_args,
)
from selar_local.params import DecodeParams

_DEFAULTS = DecodeParams()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fit SeLaR's entropy threshold tau to a model (for --tau auto)",
        description="Decode built-in reasoning prompts with cot, histogram the normalised top-k_s entropy "
                    "of every step, and choose tau in the low-density zone between the confident and the "
                    "uncertain steps so that SeLaR's soft share lands in 6-14%. The result is cached per "
                    "model file (sha256) and sampler settings; --tau auto uses it.")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per prompt (default %(default)s)")
    parser.add_argument("--parallel", "-p", type=int, default=8, help="prompts decoded together (default %(default)s)")
    parser.add_argument("--refresh", action="store_true", help="calibrate again even if a cached result exists")
    parser.add_argument("--plot", metavar="PNG", default=None, help="write the histogram as a PNG")
    parser.add_argument("--json", action="store_true", help="print the calibration as JSON")
    parser.add_argument("--write-registry", nargs="?", const="", default=None, metavar="MODELS_TXT",
                        help="write the result as the model's tau= field into the registry file (default: "
                             "the packaged models.txt), the tau used where none is given")
    sampler = parser.add_argument_group("sampler (the entropy depends on it; --tau auto matches these)")
    sampler.add_argument("--ks", type=int, default=_DEFAULTS.ks, help="SeLaR candidates in the gate's entropy")
    add_sampler_arguments(sampler)
    add_model_arguments(parser)
    parser.set_defaults(func=calibrate_command)


def calibrate_command(args: argparse.Namespace) -> int:
    from selar_local.calibrate import ProgressBar, auto_tau, cached_tau, out_of_band_reason, plot_histogram, render_histogram
    from selar_local.errors import InvalidParameterError

    if args.max_tokens < 1 or args.parallel < 1:
        raise InvalidParameterError("--max-tokens and --parallel must be >= 1")
    from selar_local.model_sampler import model_sampler
    from selar_local.registry import resolve_model

    model_path = resolve_model(args.model)
    params = DecodeParams(method="cot", ks=args.ks, seed=args.seed, **sampler_from_args(args))
    params = model_sampler(model_path).apply(params, explicit_sampler(args))  # the sampler it decodes with
    calibration = None if args.refresh else cached_tau(model_path, params)
    if calibration is None:  # not cached yet (or --refresh): load the model and decode
        runtime = load_runtime(args, n_parallel=args.parallel)
        try:
            bar = ProgressBar()
            try:
                calibration = auto_tau(runtime, params, refresh=True, max_tokens=args.max_tokens, progress=bar)
            finally:
                bar.close()
        finally:
            runtime.close()
    if args.json:
        print(calibration.to_json())
    else:
        print(render_histogram(calibration))
    band = "inside" if calibration.in_band else "OUTSIDE"
    print(f"{calibration.model_file}: tau {calibration.tau:.2f}, soft share {100 * calibration.soft_share:.1f}% "
          f"({band} the 6-14% band) over {calibration.steps} cot steps of {calibration.prompts} prompts",
          file=sys.stderr)
    if calibration.tau_spread:
        lo, hi = calibration.tau_spread
        print(f"tau with the prompts resampled: {lo:.2f}-{hi:.2f} (10th-90th percentile)"
              + ("; a wide spread: more prompts (or --max-tokens) would pin it down" if hi - lo > 0.2 else ""),
              file=sys.stderr)
    reason = out_of_band_reason(calibration)
    if reason:
        print(reason, file=sys.stderr)
    if args.plot:
        print(f"histogram: {plot_histogram(calibration, args.plot)}", file=sys.stderr)
    if args.write_registry is not None:
        _write_registry(args.write_registry, model_path, calibration)
    return 0


def _write_registry(registry_file: str, model_path, calibration) -> None:
    from selar_local.errors import InvalidParameterError
    from selar_local.model_tau import registry_tau_from_calibration, write_registry_tau
    from selar_local.registry import entry_for_path, load_registry, packaged_registry_path

    path = registry_file or packaged_registry_path()
    entry = entry_for_path(model_path, load_registry(path))
    if entry is None:
        raise InvalidParameterError(f"--write-registry: {model_path.name} is no entry of {path}")
    tau = registry_tau_from_calibration(calibration.tau, calibration.version, calibration.settings)
    write_registry_tau(path, entry.name, tau)
    print(f"{path}: {entry.name} tau={tau.format()}", file=sys.stderr)
