"""`selar serve`: an OpenAI-compatible HTTP server (chat, completions, models, health)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from selar_local.commands.common import add_model_arguments, runtime_options


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page",
        description="Serve a model (--model), or every local model loaded on demand (without --model), over "
                    "an OpenAI-compatible HTTP API: POST /v1/chat/completions, POST /v1/completions, POST "
                    "/v1/responses (streaming or not), GET /v1/models, GET /health; Ollama's API (/api/chat, "
                    "/api/generate, /api/tags, /api/ps, /api/show); /tokenize, /detokenize, /metrics "
                    "(--metrics); and a chat page at / that shows each token's entropy, soft steps and "
                    "candidates. SeLaR parameters (method, tau, lam, ks, ...) are extra fields of the request body.",
    )
    add_model_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    group.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    group.add_argument("--parallel", "-np", type=int, default=1,
                       help="requests decoded together as parallel sequences of one context (default 1)")
    group.add_argument("--queue-size", type=int, default=32,
                       help="requests that may wait for a free slot; beyond it the server answers 503 (default 32)")
    group.add_argument("--api-key", default=os.environ.get("SELAR_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on every request (default: $SELAR_API_KEY, if set)")
    group.add_argument("--model-alias", default=None,
                       help="the model id clients see and send (default: the registry name or file name)")
    pool = parser.add_argument_group("models on demand (without --model)")
    pool.add_argument("--models", default=None, metavar="NAME[,NAME...]",
                      help="serve these registry names or .gguf paths, each loaded when a request names it "
                           "(default without --model: every registry model on this machine)")
    pool.add_argument("--models-dir", default=None,
                      help="also serve every .gguf file of this folder (by file name)")
    pool.add_argument("--max-loaded", type=int, default=1,
                      help="models kept in memory at once; a request for another one unloads the least recently "
                           "used idle model (default 1)")
    pool.add_argument("--keep-alive", type=_duration, default=300.0, metavar="SECONDS",
                      help="unload a model idle this long (default 300; -1: never); a request's keep_alive overrides it")
    group.add_argument("--metrics", action="store_true",
                       help="GET /metrics: Prometheus metrics (requests, tokens, soft steps, slots, KV, latencies)")
    group.add_argument("--allow-pull", action="store_true",
                       help="let POST /api/pull download registry models (default: a client cannot make the "
                            "server fetch anything)")
    group.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from selar_local.errors import InvalidParameterError

    if args.parallel < 1:
        raise InvalidParameterError(f"invalid --parallel {args.parallel}: expected an integer >= 1")
    if args.queue_size < 0:
        raise InvalidParameterError(f"invalid --queue-size {args.queue_size}: expected an integer >= 0")
    if not 0 <= args.port <= 65535:
        raise InvalidParameterError(f"invalid --port {args.port}: expected 0..65535")
    try:  # FastAPI and uvicorn are needed only here
        from selar_local.api import Selar
        from selar_local.server import serve  # noqa: F401  (checks the server's dependencies early)
    except ModuleNotFoundError as exc:
        print(f"selar: error: `selar serve` needs {exc.name}: pip install 'selar-local[server]' "
              "(fastapi, uvicorn)", file=sys.stderr)
        return 2
    if not _is_loopback(args.host) and not args.api_key:
        print(f"selar: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    if args.model is None:
        return _serve_pool(args)
    llm = Selar(args.model, n_parallel=args.parallel, queue_size=args.queue_size, model_id=args.model_alias,
                **runtime_options(args))
    check = llm.runtime.self_check
    print(f"selar: serving {llm.model_id} ({llm.runtime.model.architecture}) on http://{args.host}:{args.port}/v1 "
          f"with {args.parallel} slot(s) of {llm.runtime.context.n_ctx} tokens, queue {args.queue_size}; "
          f"soft decoding {'available' if check.passed else 'UNAVAILABLE (' + check.detail + '; only method=cot)'}",
          file=sys.stderr, flush=True)
    print(f"selar: sampler defaults: {llm.runtime.sampler.describe()}", file=sys.stderr, flush=True)
    print(f"selar: chat page at {_page_url(args.host, args.port)}", file=sys.stderr, flush=True)
    return _serve_then_close(llm, args)


def _serve_pool(args: argparse.Namespace) -> int:
    """`selar serve` without --model: the models named, found or in --models-dir, on demand."""
    from selar_local.api import Selar
    from selar_local.errors import InvalidParameterError
    from selar_local.model_pool import ModelPool, discover_models

    if args.max_loaded < 1:
        raise InvalidParameterError(f"invalid --max-loaded {args.max_loaded}: expected an integer >= 1")
    if args.model_alias:
        raise InvalidParameterError("--model-alias names the one model of --model; without --model each model "
                                    "is served by its own name")
    names = [n.strip() for n in args.models.split(",") if n.strip()] if args.models else None
    models = discover_models(names, args.models_dir)
    if not models:
        raise InvalidParameterError("no model to serve: pull one (`selar pull NAME`), or pass --model, --models "
                                    "or --models-dir")
    options = runtime_options(args)

    def load(model):
        llm = Selar(model.path, n_parallel=args.parallel, queue_size=args.queue_size, model_id=model.id, **options)
        check = llm.runtime.self_check
        print(f"selar: loaded {model.id} ({llm.runtime.model.architecture}); soft decoding "
              f"{'available' if check.passed else 'UNAVAILABLE (' + check.detail + ')'}; sampler defaults: "
              f"{llm.runtime.sampler.describe()}", file=sys.stderr, flush=True)
        return llm

    pool = ModelPool(models, load=load, max_loaded=args.max_loaded, keep_alive=args.keep_alive,
                     queue_size=args.queue_size)
    print(f"selar: serving {len(models)} model(s) on demand on http://{args.host}:{args.port}/v1 "
          f"(at most {args.max_loaded} loaded, idle ones unloaded after "
          f"{'never' if args.keep_alive is None else f'{args.keep_alive:g} s'}): "
          f"{', '.join(m.id for m in models)}", file=sys.stderr, flush=True)
    print(f"selar: chat page at {_page_url(args.host, args.port)}", file=sys.stderr, flush=True)
    return _serve_then_close(pool, args)


def _duration(text: str) -> float | None:
    """Seconds, or Ollama's forms ("5m", "1h", "30s"); negative: forever (None)."""
    from selar_local.model_pool import parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: seconds, or e.g. 30s, 5m, 1h") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _page_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the chat page."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # bound to every address: this machine's own will do
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _serve_then_close(target, args) -> int:
    """Serve one model (Selar) or a pool until the server stops, then free what it holds."""
    from selar_local.server import serve

    try:
        serve(target, host=args.host, port=args.port, api_key=args.api_key, log_level=args.log_level,
              metrics=args.metrics, allow_pull=args.allow_pull)
    finally:
        target.close()
    return 0
