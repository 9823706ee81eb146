"""`selar bench`: run reasoning benchmarks (resumable, batched) and `selar bench report`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from selar_local.methods import METHODS
from selar_local.commands.common import (
    add_decode_arguments, add_model_arguments, explicit_sampler, params_from_args, runtime_options, wants_auto_tau,
)

EPILOG = """\
examples:
  selar bench --dataset gsm8k --methods cot,selar,soft --limit 200 --seeds 3 \\
      --model qwen2.5-coder-0.5b-instruct --parallel 4 --out runs/gsm8k-qwen
  selar bench --out runs/gsm8k-qwen --resume          # continue after Ctrl-C or a kill
  selar bench report runs/gsm8k-qwen                  # tables (Markdown, CSV) and plots

Every finished (problem, method, seed) is appended at once to OUT/results.jsonl; OUT/config.json
records what the run computes. --resume skips what is done; it refuses a different config
(data set, limit, methods, seeds, model file, decoding parameters, n_ctx). --parallel and
--threads may change between sessions.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="benchmark decoding methods on reasoning data sets (and `bench report`)",
        description="Run cot / selar / soft / moi on a reasoning benchmark and grade every answer. "
                    "Use `selar bench report RUN_DIR` for the statistics.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("benchmark")
    run.add_argument("--dataset", "-d", default=None,
                     help="gsm8k, math500, gpqa_diamond, aime24, aime25, amc23, or a JSON-lines file")
    run.add_argument("--split", default="test", help="split of a built-in data set (default test)")
    run.add_argument("--limit", type=int, default=None, help="first N problems only (default: all)")
    run.add_argument("--methods", default="cot,selar,soft",
                     help=f"comma-separated methods among {', '.join(METHODS)} (default cot,selar,soft)")
    run.add_argument("--seeds", default="1",
                     help="number of seeds, counting up from --seed (default 1); or an explicit list "
                          "such as 41,42,43")
    run.add_argument("--samples", "-k", type=int, default=1,
                     help="latent self-consistency: K samples per problem (seeds seed..seed+K-1, prompt prefilled "
                          "once), reported as pass@1, maj@K and pass@K (default 1; needs --parallel >= K)")
    run.add_argument("--frac-alpha-range", metavar="A,B", default=None,
                     help="with --methods frac and --samples K: each frac sample draws its alpha uniformly in [A, B] "
                          "(the paper: 0,0.15), recorded per sample, and the K samples vote")
    run.add_argument("--out", "-o", default=None, help="run folder (config.json, results.jsonl, report)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out; with no --dataset, its saved config is used as is")
    run.add_argument("--overwrite", action="store_true", help="discard an existing run in --out and start again")
    run.add_argument("--parallel", "-p", type=int, default=None,
                     help="sequences decoded together in one llama.cpp context (default 1; on --resume, "
                          "the value the run last used)")
    run.add_argument("--question-field", default=None, help="question field of a user JSON-lines file")
    run.add_argument("--answer-field", default=None, help="answer field of a user JSON-lines file")
    run.add_argument("--id-field", default=None, help="id field of a user file (default: row index)")
    run.add_argument("--data-dir", default=None, help="folder holding <dataset>/<split>.jsonl")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    add_decode_arguments(parser, method_default=None)
    # Options that shape the config: ignored silently on a bare --resume would be a trap.
    config_options = {a.dest: (a.option_strings[0], a.default) for a in parser._actions
                      if a.dest not in _NOT_CONFIG and a.option_strings}
    parser.set_defaults(func=bench, bench_config_options=config_options)

    sub = parser.add_subparsers(dest="bench_command", metavar="report", title="sub-command (optional)")
    report = sub.add_parser("report", help="statistics, Markdown/CSV tables and PNG plots of a run",
                            description="Accuracy with 95% Wilson intervals, tokens, time, soft share, and "
                                        "each method against the baseline: paired difference with its 95%% "
                                        "interval (Newcombe) and an exact McNemar p-value. Writes "
                                        "RUN_DIR/report.md, report.csv and PNG plots.")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s) written by `selar bench`")
    report.add_argument("--baseline", default="cot", help="method the others are compared with (default cot)")
    report.add_argument("--out", "-o", default=None,
                        help="where to write the report (default: the run folder; required with several runs)")
    report.add_argument("--trace-problem", default=None,
                        help="problem id for the entropy-trace plot (default: the one with most soft steps)")
    report.add_argument("--trace-method", default=None, help="method for the entropy-trace plot (default selar)")
    report.add_argument("--no-plots", action="store_true", help="tables only")
    report.add_argument("--common-problems", action="store_true",
                        help="keep only the problems every row holds (e.g. a 100-problem tau sweep beside "
                             "200-problem runs): accuracies and pairs on the same problems")
    report.add_argument("--votes-at", default="", metavar="K1,K2,...",
                        help="for each maj@K run, also the vote of its first k samples for each k below K "
                             "(e.g. 1,2,3: self-consistency at the cost of a search's mean generations)")
    report.set_defaults(func=bench_report)


_NOT_CONFIG = {"help", "out", "resume", "overwrite", "parallel", "no_progress", "threads", "verbose",
               "n_gpu_layers", "data_dir", "dataset", "threads_batch", "prefill_chunk", "prompt_cache",
               "kv_unified", "rpc", "tensor_split", "cpu_repack"}


def parse_seeds(text: str, first_seed: int) -> tuple[int, ...]:
    from selar_local.errors import InvalidParameterError

    text = str(text).strip()
    try:
        if "," in text:
            seeds = tuple(int(s) for s in text.split(",") if s.strip())
        else:
            count = int(text)
            if count < 1:
                raise ValueError
            seeds = tuple(range(first_seed, first_seed + count))
    except ValueError:
        raise InvalidParameterError(f"--seeds {text!r}: give a count >= 1 or a comma-separated list of seeds") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise InvalidParameterError(f"--seeds {text!r}: seeds must be distinct integers >= 0")
    return seeds


def _config_from_args(args):
    from selar_local.bench.runner import PER_ITEM_PARAMS, BenchConfig, problems_digest
    from selar_local.bench.datasets import load_problems
    from selar_local.errors import InvalidParameterError
    from selar_local.model_sampler import model_sampler
    from selar_local.params import METHODS
    from selar_local.registry import resolve_model

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InvalidParameterError(f"--methods: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    if args.samples < 1:
        raise InvalidParameterError("--samples must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise InvalidParameterError("--limit must be >= 1")
    auto = wants_auto_tau(args)
    base = params_from_args(args, method=methods[0], **({"tau": 0.5} if auto else {}))  # validates them all
    problems = load_problems(args.dataset, split=args.split, limit=args.limit, data_dir=args.data_dir,
                             question_field=args.question_field, answer_field=args.answer_field,
                             id_field=args.id_field)
    if not problems:
        raise InvalidParameterError(f"{args.dataset}: no problems to run")
    model_path = resolve_model(args.model)
    sampler = model_sampler(model_path)
    base = sampler.apply(base, explicit_sampler(args))  # recorded in the config
    tau_source = "user" if args.tau is not None else sampler.tau_choice(base).describe()
    if auto:
        saved = _saved_auto_tau(args)
        base = base.replace(tau=saved if saved is not None else _auto_tau(args, model_path, base))
    params = {k: v for k, v in base.to_dict().items() if k not in PER_ITEM_PARAMS}
    config = BenchConfig(
        dataset=args.dataset, methods=methods, seeds=parse_seeds(args.seeds, args.seed), params=params,
        model=str(args.model) if args.model is not None else "(default)", model_file=model_path.name,
        model_size=model_path.stat().st_size, n_ctx=args.n_ctx, split=args.split, limit=args.limit,
        question_field=args.question_field, answer_field=args.answer_field, id_field=args.id_field,
        problems=len(problems), problems_sha256=problems_digest(problems), tau_auto=auto,
        tau_source="calibrated (--tau auto)" if auto else tau_source,
        samples=args.samples, frac_alpha_range=_alpha_range(args.frac_alpha_range),
    )
    return config, problems, model_path


def _alpha_range(text: str | None) -> tuple[float, float] | None:
    from selar_local.errors import InvalidParameterError

    if text is None:
        return None
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise InvalidParameterError(f"--frac-alpha-range {text!r}: expected two numbers A,B") from None
    return low, high


def _saved_auto_tau(args) -> float | None:
    """On --resume of a --tau auto run: the tau it started with. A calibration made since (or
    under a newer rule) must not change a run half-way, nor stop it."""
    from selar_local.bench.runner import BenchConfigError, read_config

    if not args.resume:
        return None
    try:
        saved = read_config(args.out)
    except BenchConfigError:
        return None  # no run there yet: calibrate as for a new one
    tau = saved.params.get("tau")
    if not saved.tau_auto or not isinstance(tau, (int, float)):
        return None
    print(f"--tau auto: tau {tau:.2f}, the calibrated value this run started with", file=sys.stderr)
    return float(tau)


def _auto_tau(args, model_path: Path, params) -> float:
    """The model's calibrated tau (calibrating it now if the cache has none)."""
    from selar_local.calibrate import auto_tau_with_progress, cached_tau
    from selar_local.runtime import load

    calibration = cached_tau(model_path, params)
    if calibration is None:
        print(f"--tau auto: calibrating {model_path.name} (once; cached)", file=sys.stderr)
        runtime = load(str(model_path), n_ctx=args.n_ctx, n_parallel=4, n_threads=args.threads,
                       n_gpu_layers=args.n_gpu_layers, verbose=args.verbose)
        try:
            calibration = auto_tau_with_progress(runtime, params)
        finally:
            runtime.close()
    print(f"--tau auto: tau {calibration.tau:.2f} (calibrated soft share {100 * calibration.soft_share:.1f}%)",
          file=sys.stderr)
    return calibration.tau


def bench(args: argparse.Namespace) -> int:
    from selar_local.bench.runner import (
        BenchConfigError, load_config_problems, problems_digest, read_config, run_folder_lock,
    )
    from selar_local.errors import InvalidParameterError
    from selar_local.registry import resolve_model

    if args.out is None:
        raise InvalidParameterError("--out RUN_DIR is required (where results.jsonl and config.json go)")
    if args.parallel is not None and args.parallel < 1:
        raise InvalidParameterError("--parallel must be >= 1")
    if args.resume and args.overwrite:
        raise InvalidParameterError("--resume and --overwrite contradict each other; pick one")
    out = Path(args.out)
    if args.dataset is None:
        if not args.resume:
            raise InvalidParameterError("--dataset is required (or --resume to continue the run in --out)")
        changed = [flag for dest, (flag, default) in getattr(args, "bench_config_options", {}).items()
                   if getattr(args, dest, default) != default]
        if changed:
            raise InvalidParameterError(
                f"--resume without --dataset continues the saved run as it was and cannot take "
                f"{', '.join(changed)}; drop them, or repeat the full original command with --resume")
        config = read_config(out)  # continue exactly the saved run
        problems = load_config_problems(config, data_dir=args.data_dir)
        if problems_digest(problems) != config.problems_sha256:
            raise BenchConfigError(f"--resume refused: the problems of {config.dataset} differ from the ones "
                                   f"the run started with (the data file changed)")
        model_path = resolve_model(None if config.model == "(default)" else config.model)
        if model_path.name != config.model_file or model_path.stat().st_size != config.model_size:
            raise BenchConfigError(f"--resume refused: {model_path} is not the model file the run used "
                                   f"({config.model_file}, {config.model_size} bytes)")
    else:
        config, problems, model_path = _config_from_args(args)
    with run_folder_lock(out):
        return _run_locked(args, out, config, problems, model_path)


def _run_locked(args, out: Path, config, problems, model_path: Path) -> int:
    from selar_local.bench.runner import decoded_with, prepare_run, run_bench

    done = prepare_run(out, config, resume=args.resume, overwrite=args.overwrite)
    parallel = args.parallel or (int(decoded_with(done[-1], "parallel")) if done else max(1, config.samples))
    if parallel < config.samples:
        from selar_local.errors import InvalidParameterError

        raise InvalidParameterError(f"--samples {config.samples} decodes its samples together: give --parallel "
                                    f">= {config.samples}")

    from selar_local.runtime import load

    options = runtime_options(args)
    options["n_ctx"] = config.n_ctx
    # Plain CPU kernels unless asked: with repacked weights an item's logits depend on its batch
    # neighbours (docs/BENCHMARKS.md, "Batching"). A resumed run keeps what it decoded with.
    options.setdefault("cpu_repack", bool(decoded_with(done[-1], "cpu_repack")) if done else False)
    runtime = load(str(model_path), n_parallel=parallel, **options)
    n_items = len(problems) * len(config.methods) * len(config.seeds) * config.samples
    print(f"selar bench: {config.dataset} ({len(problems)} problems) x {','.join(config.methods)} x "
          f"{len(config.seeds)} seed(s) ({','.join(map(str, config.seeds))}) = {n_items} items; {len(done)} already done; "
          f"model {model_path.name}; --parallel {parallel}; CPU weights "
          f"{'repacked' if options['cpu_repack'] else 'not repacked'}; results in {out}/results.jsonl",
          file=sys.stderr)
    try:
        summary = run_bench(runtime, config, problems, out, done=done, parallel=parallel,
                            progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"interrupted: finished items are saved in {out}/results.jsonl; continue with "
              f"`selar bench --out {out} --resume`", file=sys.stderr)
        return 130
    finally:
        runtime.close()
    rate = summary.completion_tokens / summary.wall_seconds if summary.wall_seconds else 0.0
    print(f"done: {summary.ran} items in {summary.wall_seconds:.1f} s ({rate:.1f} generated tokens/s), "
          f"{summary.errors} error(s). Report: selar bench report {out}", file=sys.stderr)
    return 0


def bench_report(args: argparse.Namespace) -> int:
    from selar_local.bench.report import write_report
    from selar_local.errors import InvalidParameterError

    if len(args.run_dirs) > 1 and args.out is None:
        raise InvalidParameterError("several run folders: give --out for the combined report")
    out = Path(args.out or args.run_dirs[0])
    try:
        votes_at = [int(k) for k in args.votes_at.split(",") if k.strip()]
    except ValueError:
        votes_at = [0]
    if any(k < 1 for k in votes_at):
        raise InvalidParameterError(f"invalid --votes-at {args.votes_at!r}: expected sample counts >= 1 such as 1,2,3")
    markdown = write_report([Path(d) for d in args.run_dirs], out, baseline=args.baseline,
                            plots=not args.no_plots, trace_problem=args.trace_problem,
                            trace_method=args.trace_method, common_problems=args.common_problems,
                            votes_at=votes_at)
    print(markdown)
    return 0
