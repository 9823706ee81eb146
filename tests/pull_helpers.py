"""What the pull tests share: a private cache, a stand-in for the model hub, test wheels.

The stand-in listens on 127.0.0.1 and is reached through HF_ENDPOINT. It answers HEAD/GET
{endpoint}/{repo}/resolve/main/{file} as the hub does, as far as selar pull needs
(X-Repo-Commit, ETag, Content-Length, range requests, optionally a 302 to a CDN path), and
misbehaves on purpose: it drops the connection after some bytes, holds a response
mid-file until the test releases it, ignores range requests, hides the size, or is down.
"""
from __future__ import annotations

import hashlib
import http.server
import random
import re
import shutil
import textwrap
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from selar_local.registry import PullError

_RANGE = re.compile(r"bytes=(\d+)-$")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None  # the Range header, as sent
    authorized: bool  # whether it carried an Authorization header


class HubStandIn:
    COMMIT = "0123456789abcdef0123456789abcdef01234567"
    CHUNK = 64 * 1024

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.bytes_sent = 0
        self.ignore_range = False
        self.down = False  # GETs answer 503
        self.hide_size = False  # HEAD answers without Content-Length: the size is unknown
        self.cdn_redirect = False  # /resolve/ answers 302 to /cdn/<sha256>, as the hub does for large files
        self.drop_after: list[int] = []  # per coming GET: close the connection after this many body bytes
        self.hold_at: int | None = None  # the next GET stops at this file offset until `release` is set
        self.held = threading.Event()  # set once a GET is stopped at `hold_at`
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, repo: str, filename: str, data: bytes) -> None:
        self.files[f"/{repo}/resolve/main/{filename}"] = data
        self.files[f"/cdn/{hashlib.sha256(data).hexdigest()}"] = data

    def gets(self) -> list[Request]:
        with self._lock:
            return [request for request in self.requests if request.method == "GET"]

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def _answer(self, *, send_body: bool) -> None:
                path = self.path.split("?")[0]
                with stand_in._lock:
                    request = Request(self.command, path, self.headers.get("Range"), "Authorization" in self.headers)
                    stand_in.requests.append(request)
                data = stand_in.files.get(path)
                if data is None:
                    self._empty(404, {"X-Error-Code": "EntryNotFound"})
                    return
                if stand_in.cdn_redirect and "/resolve/" in path:
                    digest = hashlib.sha256(data).hexdigest()
                    self._empty(302, {
                        "Location": f"/cdn/{digest}", "X-Linked-Size": str(len(data)), "X-Linked-Etag": f'"{digest}"',
                    })
                    return
                with stand_in._lock:
                    drop_after = stand_in.drop_after.pop(0) if send_body and stand_in.drop_after else None
                if send_body and stand_in.down:
                    self._empty(503, {})
                    return
                start = 0
                match = _RANGE.match(self.headers.get("Range", ""))
                if match and not stand_in.ignore_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("X-Repo-Commit", stand_in.COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                if send_body or not stand_in.hide_size:
                    self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if send_body:
                    self._stream(data, start, drop_after)

            def _empty(self, status: int, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in {"X-Repo-Commit": stand_in.COMMIT, **headers, "Content-Length": "0"}.items():
                    self.send_header(key, value)
                self.end_headers()

            def _stream(self, data: bytes, start: int, drop_after: int | None) -> None:
                end = len(data) if drop_after is None else min(len(data), start + drop_after)
                hold_at = stand_in.hold_at
                try:
                    position = start
                    while position < end:
                        if hold_at is not None and position == hold_at:
                            stand_in.hold_at = None
                            stand_in.held.set()
                            stand_in.release.wait()
                            hold_at = None
                        stop = min(end, position + stand_in.CHUNK)
                        if hold_at is not None and position < hold_at < stop:
                            stop = hold_at
                        self.wfile.write(data[position:stop])
                        self.wfile.flush()
                        with stand_in._lock:
                            stand_in.bytes_sent += stop - position
                        position = stop
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away mid-file
                # Returning early closes the connection: the client sees a body cut short.

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()  # a held response must not keep the server from shutting down
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    with HubStandIn() as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.endpoint)
        yield stand_in


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private model cache, and a huggingface_hub that reads nothing from ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SELAR_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    from huggingface_hub import constants

    hf_home = tmp_path / "hf-home"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def write_registry(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.txt"
    path.write_text(textwrap.dedent(text))
    return path


def sample_bytes(size: int, seed: int = 0) -> bytes:
    return b"GGUF" + random.Random(seed).randbytes(size - 4)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_folder_listing(final: Path) -> list[str]:
    """What a model's cache folder holds besides its lock file (which stays, by design)."""
    lock_name = f".{final.name}.lock"
    return sorted(path.name for path in final.parent.iterdir() if path.name != lock_name)


def build_wheel(folder: Path, distribution: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal but valid wheel, enough for `pip download` and for reading members."""
    stem = f"{distribution.replace('-', '_')}-{version}"
    wheel = folder / f"{stem}-py3-none-any.whl"
    dist_info = f"{stem}.dist-info"
    metadata = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, data in {**files, **metadata}.items():
            archive.writestr(member, data)
        archive.writestr(f"{dist_info}/RECORD", "".join(f"{name},,\n" for name in [*files, *metadata]))
    return wheel


def fake_pip_download(folder: Path, fetched: list[str] | None = None) -> Callable[[str, Path], Path]:
    """Stands in for `pip download SPEC`: copies the wheel from `folder`, noting each spec."""

    def download(spec: str, destination: Path) -> Path:
        if fetched is not None:
            fetched.append(spec)
        distribution, _, version = spec.partition("==")
        source = folder / f"{distribution.replace('-', '_')}-{version}-py3-none-any.whl"
        if not source.exists():
            raise PullError(f"pip download {spec} failed: no such package")
        return Path(shutil.copy(source, destination))

    return download
