"""`selar` command line: one sub-command per module in `selar_local.commands`.

Each command module exposes `register(subparsers)`, which adds its parser and sets
`func` (called with the parsed namespace, returns an exit code). The CLI only wires
them together; every command sits on the public Python API.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Imported lazily so that `selar models` does not pay for FastAPI, and so on.
COMMAND_MODULES = ("run", "bench", "serve", "models", "doctor", "bench_speed", "rpc_server", "calibrate", "steer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selar",
        description="Selective latent reasoning (SeLaR) on llama.cpp, local and offline.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"selar_local.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"selar_local.commands.{name}":
                continue  # command not built into this install
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing errors: one clear line, no traceback
        from selar_local.errors import SelarError

        if isinstance(exc, SelarError) and not getattr(args, "verbose", False):
            print(f"selar: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
