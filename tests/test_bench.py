"""`selar bench`: resumable runs, batched identity, config checks, and the report's statistics.

The runs use the real SmolLM2-135M model with greedy decoding (deterministic) on a handful of
GSM8K problems and short budgets; the statistics are checked on a synthetic results file
against values worked out by hand.
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import runtime_for
from decode_compare import assert_same_greedy_row
from selar_local.bench import report as bench_report
from selar_local.bench.runner import (
    CONFIG_NAME, RESULTS_NAME, BenchConfig, BenchConfigError, ResultsFileError, load_config_problems, problem_prompt,
    read_config, read_results,
)
from selar_local.cli import main as cli_main

MODEL = "smollm2-135m-instruct"
SMALL_RUN = ["--dataset", "gsm8k", "--limit", "4", "--methods", "cot,selar,soft", "--greedy",
             "--max-tokens", "40", "--model", MODEL, "--n-ctx", "512", "--no-progress"]
COMPARED = ("text", "extracted", "correct", "completion_tokens", "soft_steps", "finish_reason")


def bench(*args: str) -> int:
    return cli_main(["bench", *args])


def records_by_key(run_dir: Path) -> dict:
    rows = read_results(run_dir / RESULTS_NAME)
    keys = [(r["id"], r["method"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicated work items"
    return {k: r for k, r in zip(keys, rows)}


def table_without_times(run_dir: Path) -> list[dict]:
    """The report's CSV rows minus the columns that measure time."""
    bench_report.write_report([run_dir], run_dir, plots=False)
    rows = list(csv.DictReader(io.StringIO((run_dir / "report.csv").read_text())))
    for row in rows:
        row.pop("mean_seconds")
        row.pop("median_seconds")
        row.pop("run")
    return rows


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, smollm_path) -> Path:
    """An uninterrupted --parallel 1 run: 4 problems x cot, selar, soft, greedy."""
    out = tmp_path_factory.mktemp("bench") / "reference"
    assert bench(*SMALL_RUN, "--parallel", "1", "--out", str(out)) == 0
    return out


# ---------------------------------------------------------------------------------------------
# Real runs
# ---------------------------------------------------------------------------------------------

def test_run_writes_one_record_per_item_with_params_and_trace(reference_run):
    rows = records_by_key(reference_run)
    assert len(rows) == 4 * 3
    config = json.loads((reference_run / CONFIG_NAME).read_text())
    assert config["methods"] == ["cot", "selar", "soft"] and config["seeds"] == [41] and config["problems"] == 4
    for (pid, method, seed), r in rows.items():
        assert pid.startswith("gsm8k-") and seed == 41
        assert r["params"]["method"] == method and r["params"]["greedy"] is True and r["params"]["max_tokens"] == 40
        assert isinstance(r["text"], str) and 1 <= r["completion_tokens"] <= 40
        assert r["wall_seconds"] > 0 and r["error"] is None
        assert len(r["trace"]["entropy"]) == r["completion_tokens"] == len(r["trace"]["soft"])
        assert r["trace"]["soft"].count("1") == r["soft_steps"]
        if method == "cot":
            assert r["soft_steps"] == 0
    # Soft Thinking mixes every step but the last: the trace must show it.
    assert all(r["soft_steps"] >= r["completion_tokens"] - 1 for k, r in rows.items() if k[1] == "soft")


def test_parallel_4_gives_the_same_greedy_results_as_parallel_1(reference_run, tmp_path, model_files):
    """Bit for bit on x86; on ARM CPUs with int8 matmul an item may part from its --parallel 1
    row at a near-tie, which its decode alone (with the top two log-probabilities) must show."""
    out = tmp_path / "p4"
    assert bench(*SMALL_RUN, "--parallel", "4", "--out", str(out)) == 0
    ref, par = records_by_key(reference_run), records_by_key(out)
    assert set(ref) == set(par)
    config = read_config(reference_run)
    problems = {p.id: p for p in load_config_problems(config)}
    runtime = runtime_for("llama", model_files, n_ctx=512, cpu_repack=False, prompt_cache=False)

    def decode_alone(pid: str, params):
        prompt = problem_prompt(runtime, problems[pid])
        return lambda: runtime.generate_batch([prompt], [params.replace(logprobs=2)])[0]

    identical = []
    for (pid, method, seed), row in ref.items():
        got = par[(pid, method, seed)]
        assert got["parallel"] == 4 and got["cpu_repack"] is False  # plain kernels by default
        params = config.decode_params(method, seed)
        identical.append(assert_same_greedy_row(
            got, row, decode_alone(pid, params), runtime.model.token_bytes, fields=COMPARED,
            tau=params.tau if method == "selar" else None))
    if all(identical):
        assert table_without_times(out) == table_without_times(reference_run)


def test_a_resumed_run_keeps_the_cpu_kernels_it_decoded_with(reference_run, tmp_path, capsys):
    """A run from before the setting was recorded decoded with repacked weights; resuming it
    goes on with them (the new rows say so), and --no-cpu-repack on the command line wins."""
    for name, flags, expected in (("old", (), True), ("asked", ("--no-cpu-repack",), False)):
        out = tmp_path / name
        shutil.copytree(reference_run, out)
        rows = read_results(out / RESULTS_NAME)
        for row in rows:
            row.pop("cpu_repack")
        (out / RESULTS_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows[:-2]))
        assert bench("--out", str(out), "--resume", "--no-progress", *flags) == 0
        assert f"CPU weights {'repacked' if expected else 'not repacked'}" in capsys.readouterr().err
        resumed = read_results(out / RESULTS_NAME)
        assert [r.get("cpu_repack") for r in resumed] == [None] * (len(rows) - 2) + [expected] * 2
        # the report says how the items were decoded
        md = bench_report.write_report([out], out, plots=False)
        assert ("repacked CPU weights (an item's tokens depend on its batch neighbours)" if expected
                else f"repacked CPU weights for {len(rows) - 2} of {len(rows)} items") in md
    assert "plain CPU kernels" in bench_report.write_report([reference_run], tmp_path, plots=False)


def test_sigint_mid_run_then_resume_gives_the_uninterrupted_table(reference_run, tmp_path, capsys):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "selar_local.cli", "bench", *SMALL_RUN, "--parallel", "1", "--out", str(out)]
    # SIGINT at its default disposition in the child: a suite started from a background job
    # (`cmd &`) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    results = out / RESULTS_NAME
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 3:
            proc.send_signal(signal.SIGSTOP)  # frozen mid-run, however fast the machine
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    try:
        # While it runs, a second process on the same folder is refused (it would redo the same items).
        assert bench("--out", str(out), "--resume", "--no-progress") == 2
        assert f"is in use by another selar bench (pid {proc.pid})" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGINT)  # pending until it continues: it lands exactly here
        proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "--resume" in err
    done = read_results(results)
    assert 3 <= len(done) < 12, "the interrupt must land mid-run"
    # A kill while writing leaves half a line: resume must cut it, not choke on it.
    with open(results, "a", encoding="utf-8") as handle:
        handle.write('{"id": "gsm8k-3", "method": "so')

    assert bench("--out", str(out), "--resume", "--no-progress") == 0
    ref, resumed = records_by_key(reference_run), records_by_key(out)
    assert set(resumed) == set(ref)  # nothing missing, nothing duplicated
    for key in ref:
        assert {f: resumed[key][f] for f in COMPARED} == {f: ref[key][f] for f in COMPARED}, key
    for key, r in records_by_key(out).items():  # the finished items were not redone
        if key in {(d["id"], d["method"], d["seed"]) for d in done}:
            assert r["finished_at"] == next(d for d in done if (d["id"], d["method"], d["seed"]) == key)["finished_at"]
    assert table_without_times(out) == table_without_times(reference_run)
    # Resuming a finished run does nothing and duplicates nothing.
    assert bench(*SMALL_RUN, "--parallel", "2", "--out", str(out), "--resume") == 0
    assert len(read_results(results)) == 12


def test_prompt_too_long_for_the_context_is_recorded_as_an_error(tmp_path, smollm_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"q": "What is 2 + 3?", "a": "5"}) + "\n"
                    + json.dumps({"q": "Add these numbers: " + " + ".join(["1"] * 200), "a": "200"}) + "\n")
    out = tmp_path / "run"
    assert bench("--dataset", str(data), "--question-field", "q", "--answer-field", "a", "--methods", "cot",
                 "--greedy", "--max-tokens", "8", "--model", MODEL, "--n-ctx", "128", "--no-progress",
                 "--out", str(out), "--parallel", "2") == 0
    rows = records_by_key(out)
    short, long = rows[("mine-0", "cot", 41)], rows[("mine-1", "cot", 41)]
    assert short["error"] is None and short["completion_tokens"] >= 1
    assert long["error"] and "context" in long["error"] and long["correct"] is False
    (row,) = table_without_times(out)
    assert row["errors"] == "1" and row["n"] == "2"


# ---------------------------------------------------------------------------------------------
# Configs and the results file (no model needed)
# ---------------------------------------------------------------------------------------------

def _config(**changes) -> BenchConfig:
    values = dict(dataset="gsm8k", methods=("cot", "selar"), seeds=(41,), params={"greedy": True, "max_tokens": 8},
                  model=MODEL, model_file="m.gguf", model_size=123, n_ctx=512, limit=4, problems=4,
                  problems_sha256="abc")
    values.update(changes)
    return BenchConfig(**values)


def test_a_run_of_the_older_prompt_format_is_neither_resumed_nor_paired(tmp_path):
    """Runs made before prompts were rendered with the GGUF's own Jinja template (their
    config has no prompt_format) saw other prompts: resuming one with today's code would mix
    two prompt formats in one run, and pairing it with a new run would compare unlike things."""
    from selar_local.bench.runner import PROMPT_FORMAT, prepare_run

    old = _config().to_dict()
    del old["prompt_format"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(old))
    assert read_config(tmp_path).prompt_format == 1
    with pytest.raises(BenchConfigError, match=f"prompt_format: 1 \\(saved\\) vs {PROMPT_FORMAT} \\(now\\)"):
        prepare_run(tmp_path, _config(), resume=True)

    (tmp_path / "old").mkdir(), (tmp_path / "new").mkdir()
    old_run, new_run = _synthetic_run(tmp_path / "old"), _synthetic_run(tmp_path / "new")
    config = json.loads((old_run / CONFIG_NAME).read_text())
    del config["prompt_format"]
    (old_run / CONFIG_NAME).write_text(json.dumps(config))
    markdown = bench_report.write_report([old_run, new_run], tmp_path / "both", plots=False)
    assert "prompt format 1)" in markdown and f"prompt format {PROMPT_FORMAT})" in markdown
    assert markdown.count("## gsm8k") == 2  # two tables: nothing paired across formats


def test_a_config_saved_before_a_changed_default_resumes_as_it_was_decoded(tmp_path):
    """LatentSeek's grading got its field and a new default (the four checks) at once: a run
    whose config predates the field was graded with the json object, and a resume must go on
    so (not with today's default), while runs of methods that never grade keep the default."""
    from selar_local.bench.runner import prepare_run

    old = _config(methods=("latentseek",)).to_dict()
    del old["params"]["latentseek_grader"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(old))
    saved = read_config(tmp_path)
    assert saved.params["latentseek_grader"] == "json"
    assert saved.decode_params("latentseek", 41).latentseek_grader == "json"
    # The full command repeated with today's default is a different run, and says where.
    with pytest.raises(BenchConfigError, match="latentseek_grader: 'json' \\(saved\\) vs 'checks' \\(now\\)"):
        prepare_run(tmp_path, _config(methods=("latentseek",)), resume=True)
    assert prepare_run(tmp_path, _config(methods=("latentseek",), params={
        "greedy": True, "max_tokens": 8, "latentseek_grader": "json"}), resume=True) == []

    plain = _config().to_dict()  # cot, selar: nothing reads the grader
    del plain["params"]["latentseek_grader"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(plain))
    assert read_config(tmp_path).params["latentseek_grader"] == "checks"
    assert prepare_run(tmp_path, _config(), resume=True) == []


def test_resume_with_a_different_config_is_refused_naming_the_differences(tmp_path, capsys):
    from selar_local.bench.runner import prepare_run, write_config

    write_config(tmp_path, _config())
    with pytest.raises(BenchConfigError) as err:
        prepare_run(tmp_path, _config(limit=5, params={"greedy": True, "max_tokens": 16}), resume=True)
    message = str(err.value)
    assert "--resume refused" in message and "limit: 4 (saved) vs 5 (now)" in message
    assert "max_tokens: 8 (saved) vs 16 (now)" in message
    # The same config resumes; a run folder is never reused silently without --resume.
    assert prepare_run(tmp_path, _config(), resume=True) == []
    with pytest.raises(BenchConfigError, match="--resume to continue"):
        prepare_run(tmp_path, _config(), resume=False)

    # Through the CLI: one clear line, exit code 2, before any model is loaded.
    out = tmp_path / "cli"
    out.mkdir()
    (out / CONFIG_NAME).write_text(json.dumps({**_config().to_dict(), "dataset": "gsm8k", "limit": 4}))
    args = ["--dataset", "gsm8k", "--limit", "3", "--methods", "cot,selar", "--greedy", "--max-tokens", "8",
            "--model", MODEL, "--n-ctx", "512", "--out", str(out), "--resume"]
    assert bench(*args) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("selar: error: --resume refused") and "limit: 4 (saved) vs 3 (now)" in err_text
    assert err_text.count("\n") == 1


@pytest.mark.parametrize("content, needle", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"version": 1, "dataset": "gsm8k"}), "missing key(s) methods"),
    (json.dumps({"version": 99}), "unsupported config version"),
    (json.dumps({**_config().to_dict(), "methods": ["cot", "magic"]}), "unknown method(s) magic"),
    (json.dumps({**_config().to_dict(), "params": {"temperature": -1}}), "invalid temperature"),
])
def test_malformed_config_is_a_clear_error(tmp_path, capsys, content, needle):
    (tmp_path / CONFIG_NAME).write_text(content)
    with pytest.raises(BenchConfigError, match=None) as err:
        read_config(tmp_path)
    assert needle in str(err.value)
    assert bench("--out", str(tmp_path), "--resume") == 2
    assert needle in capsys.readouterr().err


def test_cli_argument_errors_are_one_line(tmp_path, capsys):
    assert bench("--dataset", "gsm8k", "--methods", "cot,nope", "--out", str(tmp_path / "x")) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert bench("--dataset", "gsm8k", "--seeds", "0", "--out", str(tmp_path / "x")) == 2
    assert "--seeds" in capsys.readouterr().err
    assert bench("--dataset", "gsm8k") == 2
    assert "--out" in capsys.readouterr().err
    assert bench("--out", str(tmp_path / "never")) == 2
    assert "--dataset is required" in capsys.readouterr().err
    # A bare --resume continues the saved run; options that would change it are refused, not ignored.
    assert bench("--out", str(tmp_path / "x"), "--resume", "--max-tokens", "100", "--greedy") == 2
    assert "cannot take --greedy, --max-tokens" in capsys.readouterr().err


def test_seed_list_and_count():
    from selar_local.commands.bench import parse_seeds

    assert parse_seeds("3", 41) == (41, 42, 43)
    assert parse_seeds("7,3", 41) == (7, 3)


def test_results_file_tolerates_only_a_half_written_last_line(tmp_path):
    path = tmp_path / RESULTS_NAME
    good = [{"id": f"p{i}", "method": "cot", "seed": 41, "correct": True} for i in range(3)]
    body = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(body + '{"id": "p3", "meth')
    assert read_results(path) == good
    assert path.read_text().endswith('"meth')  # reading alone changes nothing
    assert read_results(path, repair=True) == good
    assert path.read_text() == body  # the partial line is cut off
    # A complete last record without its newline is kept and given the newline.
    path.write_text(body + json.dumps({"id": "p3", "method": "cot", "seed": 41}))
    assert len(read_results(path, repair=True)) == 4 and path.read_text().endswith("}\n")
    # Corruption elsewhere is not silently dropped.
    path.write_text(json.dumps(good[0]) + "\n{garbage\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(ResultsFileError, match=":2: corrupt record"):
        read_results(path, repair=True)
    # A duplicated item counts once.
    path.write_text(body + json.dumps(good[0]) + "\n")
    assert len(read_results(path)) == 3


# ---------------------------------------------------------------------------------------------
# Report statistics on a synthetic run, against hand computations
# ---------------------------------------------------------------------------------------------

def _synthetic_run(tmp_path: Path) -> Path:
    """10 problems, seed 41: cot right on p0-p4, selar on p0-p7, soft on p2-p5 and p9."""
    run = tmp_path / "synthetic"
    run.mkdir()
    config = _config(methods=("cot", "selar", "soft"), limit=10, problems=10)
    (run / CONFIG_NAME).write_text(json.dumps(config.to_dict()))
    rows = []
    for i in range(10):
        pid = f"gsm8k-{i}"
        # cot: 5/10, 100 tokens each, 2.0 s each
        rows.append(dict(id=pid, dataset="gsm8k", method="cot", seed=41, correct=i < 5, completion_tokens=100,
                         soft_steps=0, wall_seconds=2.0, finish_reason="stop", error=None))
        # selar: 8/10, tokens 80 on even / 60 on odd problems, 10 soft steps each, 1.5 s (p9: 11.5 s,
        # an item in flight while the process was stopped)
        rows.append(dict(id=pid, dataset="gsm8k", method="selar", seed=41, correct=i < 8,
                         completion_tokens=80 if i % 2 == 0 else 60, soft_steps=10, wall_seconds=11.5 if i == 9 else 1.5,
                         finish_reason="length" if i == 9 else "stop", error=None))
        # soft: right on p2..p5 and p9 (5/10)
        rows.append(dict(id=pid, dataset="gsm8k", method="soft", seed=41, correct=i in (2, 3, 4, 5, 9),
                         completion_tokens=50, soft_steps=49, wall_seconds=1.0, finish_reason="stop", error=None))
    (run / RESULTS_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


Z = 1.959963984540054
# report.csv rounds each value to 6 decimals: a value can be off by 0.5e-6 (plus float noise).
CSV_ROUNDING = 0.5e-6 + 1e-12


def _wilson(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return centre - half, centre + half


def test_report_statistics_match_hand_computation(tmp_path):
    run = _synthetic_run(tmp_path)
    markdown = bench_report.write_report([run], run, plots=True)
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((run / "report.csv").read_text()))}
    cot, selar, soft = rows["cot"], rows["selar"], rows["soft"]

    # Accuracy and Wilson intervals. 8/10: centre 0.716741, half-width 0.226578 (see test_stats).
    assert float(selar["accuracy"]) == pytest.approx(0.8, abs=CSV_ROUNDING)
    assert float(selar["ci_lo"]) == pytest.approx(0.490162, abs=2e-6)
    assert float(selar["ci_hi"]) == pytest.approx(0.943318, abs=2e-6)
    # 5/10: centre 0.5, half = 1.959964 * sqrt(0.025 + 3.841459/400) / 1.384146 = 0.263407
    assert (float(cot["ci_lo"]), float(cot["ci_hi"])) == (pytest.approx(0.236593, abs=2e-6),
                                                          pytest.approx(0.763407, abs=2e-6))
    # Tokens, time, soft share (soft steps / generated tokens over all items).
    assert float(selar["mean_tokens"]) == pytest.approx(70.0, abs=CSV_ROUNDING)          # (5*80 + 5*60) / 10
    assert float(selar["mean_seconds"]) == pytest.approx(2.5, abs=CSV_ROUNDING)           # (9*1.5 + 11.5) / 10
    assert float(selar["median_seconds"]) == pytest.approx(1.5, abs=CSV_ROUNDING)         # what the table shows
    assert float(selar["soft_share"]) == pytest.approx(100 / 700, abs=CSV_ROUNDING)       # 10*10 / 700
    assert float(soft["soft_share"]) == pytest.approx(0.98, abs=CSV_ROUNDING)             # 49 / 50
    assert float(selar["truncated_share"]) == pytest.approx(0.1, abs=CSV_ROUNDING)
    assert cot["diff"] == "" and cot["mcnemar_p"] == ""

    # selar vs cot: both right p0-p4 (5), selar only p5-p7 (3), cot only 0, neither 2.
    assert (selar["method_only"], selar["baseline_only"], selar["n_paired"]) == ("3", "0", "10")
    assert float(selar["diff"]) == pytest.approx(0.3, abs=CSV_ROUNDING)
    assert float(selar["mcnemar_p"]) == pytest.approx(2 * 0.5 ** 3, abs=CSV_ROUNDING)    # 0.25
    # Newcombe's interval (method 10), worked from the Wilson limits:
    # p_b = .8 (l1, u1) = wilson(8, 10); p_a = .5 (l2, u2) = wilson(5, 10)
    # phi = (5*2 - 3*0) / sqrt(8 * 2 * 5 * 5) = 10 / 20 = 0.5
    l1, u1 = _wilson(8, 10)
    l2, u2 = _wilson(5, 10)
    phi = 0.5
    lo = 0.3 - math.sqrt((0.8 - l1) ** 2 - 2 * phi * (0.8 - l1) * (u2 - 0.5) + (u2 - 0.5) ** 2)
    hi = 0.3 + math.sqrt((u1 - 0.8) ** 2 - 2 * phi * (u1 - 0.8) * (0.5 - l2) + (0.5 - l2) ** 2)
    assert float(selar["diff_lo"]) == pytest.approx(lo, abs=1e-6)
    assert float(selar["diff_hi"]) == pytest.approx(hi, abs=1e-6)
    # l1 = .490162, u1 = .943318, l2 = .236593, u2 = .763407:
    # lo = .3 - sqrt(.096000 - .5 * 2 * .309838 * .263407 + .069383) = .3 - .289429 = .010571
    # hi = .3 + sqrt(.020540 - .5 * 2 * .143318 * .263407 + .069383) = .3 + .228413 = .528413
    assert float(selar["diff_lo"]) == pytest.approx(0.010571, abs=2e-6)
    assert float(selar["diff_hi"]) == pytest.approx(0.528413, abs=2e-6)

    # soft vs cot: same accuracy; discordant soft-only {p5, p9}, cot-only {p0, p1}: diff 0, p = 1.
    assert float(soft["diff"]) == pytest.approx(0.0, abs=CSV_ROUNDING)
    assert (soft["method_only"], soft["baseline_only"]) == ("2", "2")
    assert float(soft["mcnemar_p"]) == pytest.approx(1.0, abs=CSV_ROUNDING)


    # Markdown carries the same numbers; the plots are real PNGs.
    assert "| selar | 10 | 80.0 [49.0, 94.3] | 70.0 | 1.50 | 14.3 | 10 | 0 | +30.0 [" in markdown  # median time
    assert "+30.0 [" in markdown and "| 3 / 0 | 0.250 |" in markdown
    assert (run / "report.md").read_text() == markdown
    assert (run / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_revising_searchs_changes_are_counted_from_its_graded_first_answers():
    def row(first, final, iterations):
        return {"first_correct": first, "correct": final, "iterations": iterations}

    records = [row(True, True, 0), row(False, False, 0), row(False, True, 2), row(True, False, 1),
               row(False, False, 3), row(True, True, 1)]
    assert bench_report.revisions(records) == {"first_correct": 3, "revised": 4, "revised_fixed": 1,
                                               "revised_broke": 1}
    # rows that do not grade a first answer (other methods, latentseek runs before the field): nothing
    assert bench_report.revisions([{"correct": True, "iterations": 1}]) == {}
    assert bench_report.revisions([row(True, True, 0), {"correct": True, "iterations": 0}]) == {}


def test_report_mean_over_seeds_and_pairing_by_seed(tmp_path):
    run = tmp_path / "seeds"
    run.mkdir()
    (run / CONFIG_NAME).write_text(json.dumps(_config(seeds=(1, 2), limit=4, problems=4).to_dict()))
    rows = []
    # cot: seed 1 right on p0, p1 (2/4); seed 2 right on p0 (1/4)
    # selar: seed 1 right on p0, p1, p2 (3/4); seed 2 right on p0-p3 (4/4)
    for seed, cot_right, selar_right in ((1, {0, 1}, {0, 1, 2}), (2, {0}, {0, 1, 2, 3})):
        for i in range(4):
            for method, right in (("cot", cot_right), ("selar", selar_right)):
                rows.append(dict(id=f"q{i}", dataset="gsm8k", method=method, seed=seed, correct=i in right,
                                 completion_tokens=10, soft_steps=0, wall_seconds=1.0, error=None))
    (run / RESULTS_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    markdown = bench_report.write_report([run], run, plots=False)
    data = {r["method"]: r for r in json.loads((run / "report.json").read_text())}
    # cot: per seed 0.5 and 0.25 -> mean 0.375, sd = |0.5 - 0.25| / sqrt(2) = 0.176777
    assert data["cot"]["seed_mean"] == pytest.approx(0.375)
    assert data["cot"]["seed_std"] == pytest.approx(0.25 / math.sqrt(2))
    assert data["selar"]["seed_mean"] == pytest.approx(0.875)
    # pooled: cot 3/8, selar 7/8; pairs on (problem, seed): selar-only = 1 (seed 1) + 3 (seed 2) = 4
    assert data["cot"]["correct"] == 3 and data["selar"]["correct"] == 7 and data["selar"]["n"] == 8
    assert (data["selar"]["method_only"], data["selar"]["baseline_only"]) == (4, 0)
    assert data["selar"]["mcnemar_p"] == pytest.approx(2 * 0.5 ** 4)  # 0.125
    assert "| method | seed 1 | seed 2 |" in markdown and "| cot | 50.0 | 25.0 |" in markdown


def test_entropy_trace_plot_picks_the_selar_item_with_most_soft_steps(tmp_path):
    run = _synthetic_run(tmp_path)
    rows = read_results(run / RESULTS_NAME)
    for r in rows:
        n = r["completion_tokens"]
        r["trace"] = {"entropy": [0.1 * (k % 10) for k in range(n)], "soft": "".join("1" if k % 10 >= 5 else "0"
                                                                                       for k in range(n))}
    rows[4]["soft_steps"] = 40  # the selar item of gsm8k-1
    (run / RESULTS_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = [bench_report.load_run(run)]
    chosen = bench_report.choose_trace(runs)
    assert (chosen["id"], chosen["method"]) == ("gsm8k-1", "selar")
    assert bench_report.choose_trace(runs, "gsm8k-3", "cot")["id"] == "gsm8k-3"
    bench_report.write_report([run], run, plots=True)
    assert (run / "entropy_trace.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(bench_report.ReportError):
        bench_report.choose_trace(runs, "no-such-problem", "selar")


def test_a_later_runs_label_names_only_the_parameters_its_method_reads(tmp_path):
    """Every run records every DecodeParams field; a latent or frac run started without --tau
    records another tau than the first run's, which those methods never read, so it is no
    difference. selar reads tau: its label keeps it; the shared max_tokens is every method's."""
    run = _synthetic_run(tmp_path)  # cot, selar, soft at tau 0.5 (the default), max_tokens 8
    sampled = {"greedy": False, "max_tokens": 8, "tau": 0.5, "latent_steps": 8, "frac_alpha": 0.0}
    (run / CONFIG_NAME).write_text(json.dumps(_config(methods=("cot", "selar", "soft"), limit=10, problems=10,
                                                      params=sampled).to_dict()))
    later = tmp_path / "later"
    later.mkdir()
    params = {**sampled, "tau": 0.26, "latent_steps": 2, "frac_alpha": 0.1, "max_tokens": 16}
    (later / CONFIG_NAME).write_text(json.dumps(_config(methods=("latent", "frac", "selar"), limit=10, problems=10,
                                                        params=params).to_dict()))
    rows = [dict(id=f"gsm8k-{i}", dataset="gsm8k", method=m, seed=41, correct=i < 3, completion_tokens=90,
                 soft_steps=0, wall_seconds=1.0, finish_reason="stop", error=None)
            for i in range(10) for m in ("latent", "frac", "selar")]
    (later / RESULTS_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    labels = [r.method for r in bench_report.summarize([bench_report.load_run(d) for d in (run, later)])[0].rows]
    assert labels == ["cot", "selar", "soft", "latent (latent_steps=2, max_tokens=16)",
                      "frac (frac_alpha=0.1, max_tokens=16)", "selar (max_tokens=16, tau=0.26)"]


def test_a_runs_header_lists_the_options_its_methods_read():
    """The header line of a run names the recorded options of its methods only: a latent run
    records tau (every run records every field) but is not described by it; cot reads none."""
    params = {"tau": 0.26, "lam": 1.0, "ks": 3, "latent_steps": 1, "latent_noise": 0.3, "latent_align": "ridge",
              "frac_alpha": 0.0, "max_tokens": 512}
    latent = _config(methods=("latent",), limit=10, problems=10, params=params)
    assert bench_report.method_settings(latent) == "latent_align ridge, latent_noise 0.3, latent_steps 1; "
    assert bench_report.method_settings(_config(methods=("cot",), limit=10, problems=10, params=params)) == ""
    selar = _config(methods=("cot", "selar"), limit=10, problems=10, params=params)
    assert bench_report.method_settings(selar) == (  # the config records every field (defaults filled in)
        "tau 0.26, lam 1.0, ks 3, thinking_only False, soft_source mixture, latent_align ridge, soft_noise none, "
        "gumbel_tau 0.5, dirichlet_alpha 1.0; ")


def test_a_control_run_of_the_same_model_joins_the_table_and_can_be_the_baseline(tmp_path):
    """A later `--methods cot --greedy` run of the same model and problems is one more row,
    labelled by what it decodes differently, and pairs with the first run's items."""
    run = _synthetic_run(tmp_path)  # cot right on p0-p4, selar p0-p7, soft p2-p5 + p9
    sampled = {"greedy": False, "max_tokens": 8}
    (run / CONFIG_NAME).write_text(json.dumps(_config(methods=("cot", "selar", "soft"), limit=10, problems=10,
                                                      params=sampled).to_dict()))
    control = tmp_path / "greedy"
    control.mkdir()
    params = {**sampled, "greedy": True}
    (control / CONFIG_NAME).write_text(json.dumps(_config(methods=("cot",), limit=10, problems=10,
                                                          params=params).to_dict()))
    rows = [dict(id=f"gsm8k-{i}", dataset="gsm8k", method="cot", seed=41, correct=i <= 6, completion_tokens=90,
                 soft_steps=0, wall_seconds=1.0, finish_reason="stop", error=None) for i in range(10)]
    (control / RESULTS_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "joined"

    markdown = bench_report.write_report([run, control], out, plots=True)
    data = {r["method"]: r for r in json.loads((out / "report.json").read_text())}
    assert list(data) == ["cot", "selar", "soft", "cot (greedy)"]
    assert markdown.count("## gsm8k") == 1 and "`greedy`: 10 problems x 1 methods" in markdown
    # cot (greedy) vs cot: greedy-only p5, p6; cot-only none -> +20 points, p = 2 * 0.5^2 = 0.5
    greedy = data["cot (greedy)"]
    assert (greedy["run"], greedy["correct"], greedy["method_only"], greedy["baseline_only"]) == ("greedy", 7, 2, 0)
    assert greedy["diff"] == pytest.approx(0.2) and greedy["mcnemar_p"] == pytest.approx(0.5)

    bench_report.write_report([run, control], out, baseline="cot (greedy)", plots=False)
    data = {r["method"]: r for r in json.loads((out / "report.json").read_text())}
    # soft vs cot (greedy): soft-only p9; greedy-only p0, p1, p6 -> -20 points,
    # p = 2 * P(X <= 1 | 4, 1/2) = 2 * 5/16 = 0.625
    soft = data["soft"]
    assert (soft["baseline"], soft["method_only"], soft["baseline_only"]) == ("cot (greedy)", 1, 3)
    assert soft["diff"] == pytest.approx(-0.2) and soft["mcnemar_p"] == pytest.approx(0.625)
    assert data["cot (greedy)"]["diff"] is None

    # A shorter run (the first 5 problems): with common_problems every row counts those 5 only.
    short = tmp_path / "short"
    short.mkdir()
    (short / CONFIG_NAME).write_text(json.dumps(_config(methods=("cot",), limit=5, problems=5,
                                                        params={**sampled, "greedy": True, "max_tokens": 9}).to_dict()))
    (short / RESULTS_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    runs = [bench_report.load_run(d) for d in (run, control, short)]
    mixed = {r.method: r for r in bench_report.summarize(runs)[0].rows}
    common = {r.method: r for r in bench_report.summarize(runs, common_problems=True)[0].rows}
    assert mixed["cot"].n == 10 and {r.n for r in common.values()} == {5}
    assert common["cot"].correct == 5 and common["selar"].correct == 5  # p0-p4 right for both
    assert common["cot (greedy)"].diff == 0.0

    # The same run given twice: its rows are told apart by folder, not merged or dropped.
    twice = bench_report.summarize([bench_report.load_run(run), bench_report.load_run(run)])
    assert [r.method for r in twice[0].rows] == ["cot", "selar", "soft", "cot [synthetic]", "selar [synthetic]",
                                                 "soft [synthetic]"]


def test_the_config_says_which_tau_and_where_it_came_from(reference_run):
    from selar_local.registry import get_entry

    registry_tau = get_entry("smollm2-135m-instruct").tau
    config = json.loads((reference_run / CONFIG_NAME).read_text())
    assert config["params"]["tau"] == registry_tau.value  # no --tau: the registry's, under its sampler
    assert config["tau_source"] == (f"{registry_tau.value:g} (registry smollm2-135m-instruct "
                                    f"(calibration v{registry_tau.version}))")
    assert config["tau_auto"] is False
