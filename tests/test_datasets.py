"""Loading the built-in benchmarks and user JSON-lines files."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import external_data_dir

from selar_local.bench.datasets import (
    ANSWER_INSTRUCTION,
    BUILTIN,
    DATA_DIR_ENV,
    build_prompt,
    canonical_name,
    PACKAGED_DATA_DIR,
    load_problems,
)
from selar_local.errors import DatasetError, SelarError

# The public test sets ship inside the package; these tests need nothing beside the repository.
DATA_DIR = PACKAGED_DATA_DIR
# GPQA Diamond and GSM8K's train split are not shipped (GPQA's authors ask that it not be
# published in plain text): read from $SELAR_DATA_DIR where a developer has them.
EXTERNAL_DIR = external_data_dir("gpqa_diamond/test.jsonl")
requires_external = pytest.mark.skipif(
    EXTERNAL_DIR is None or EXTERNAL_DIR == PACKAGED_DATA_DIR,
    reason="GPQA Diamond and GSM8K train are not shipped: set SELAR_DATA_DIR to a folder holding "
           "gpqa_diamond/test.jsonl and gsm8k/train.jsonl to run this test",
)
SHIPPED = ("gsm8k", "math500", "aime24", "aime25", "amc23")

EXPECTED_ROWS = {
    ("gsm8k", "test"): 1319,
    ("gsm8k", "train"): 7473,
    ("math500", "test"): 500,
    ("gpqa_diamond", "test"): 198,
    ("aime24", "test"): 30,
    ("aime25", "test"): 30,
    ("amc23", "test"): 40,
}


def write_jsonl(path: Path, rows: list[object], *, raw_lines: dict[int, str] | None = None) -> Path:
    """Write rows as JSON lines; raw_lines replaces given (0-based) lines verbatim."""
    lines = [json.dumps(row) for row in rows]
    for index, text in (raw_lines or {}).items():
        lines[index] = text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ built-in data sets


@pytest.mark.parametrize("name, split", [(name, "test") for name in SHIPPED])
def test_shipped_row_counts_and_ids_from_any_directory(name, split, tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # as after `pip install`: nothing beside the working directory
    problems = load_problems(name, split=split)
    assert len(problems) == EXPECTED_ROWS[(name, split)]
    assert [p.id for p in problems] == [f"{name}-{i}" for i in range(len(problems))]
    assert {p.dataset for p in problems} == {name}
    assert all(p.question and p.answer for p in problems)


@requires_external
@pytest.mark.parametrize("name, split", [("gpqa_diamond", "test"), ("gsm8k", "train")])
def test_external_row_counts_and_ids(name, split):
    problems = load_problems(name, split=split, data_dir=EXTERNAL_DIR)
    assert len(problems) == EXPECTED_ROWS[(name, split)]
    assert [p.id for p in problems] == [f"{name}-{i}" for i in range(len(problems))]
    assert {p.dataset for p in problems} == {name}
    assert all(p.question and p.answer for p in problems)


def test_ids_are_stable_across_loads():
    first = load_problems("math500", data_dir=DATA_DIR)
    second = load_problems("math500", data_dir=DATA_DIR)
    assert first == second


def test_gsm8k_gold_is_the_number_after_the_marker():
    problems = load_problems("gsm8k", data_dir=DATA_DIR)
    raw_rows = [json.loads(line) for line in (DATA_DIR / "gsm8k/test.jsonl").open()]
    for problem, row in zip(problems, raw_rows):
        assert problem.answer == row["answer"].split("####")[-1].strip().replace(",", "")
        assert re.fullmatch(r"-?\d+", problem.answer), problem.id
    assert problems[0].answer == "18"
    # Real rows whose marker carries a thousands separator or a sign.
    assert raw_rows[146]["answer"].endswith("#### 2,125") and problems[146].answer == "2125"
    assert raw_rows[489]["answer"].endswith("#### -10") and problems[489].answer == "-10"


def test_gsm8k_prompt_gets_the_instruction_on_a_new_line():
    problem = load_problems("gsm8k", limit=1, data_dir=DATA_DIR)[0]
    assert problem.prompt == f"{problem.question}\n{ANSWER_INSTRUCTION}"


@pytest.mark.parametrize("name", ["math500", "aime24", "aime25", "amc23",
                                  pytest.param("gpqa_diamond", marks=requires_external)])
def test_questions_with_their_own_instruction_are_not_changed(name):
    for problem in load_problems(name, data_dir=EXTERNAL_DIR if name == "gpqa_diamond" else DATA_DIR):
        assert problem.prompt == problem.question
        assert problem.prompt.count(ANSWER_INSTRUCTION) <= 1


@requires_external
def test_gpqa_gold_is_the_boxed_letter():
    problems = load_problems("gpqa", data_dir=EXTERNAL_DIR)
    raw_rows = [json.loads(line) for line in (EXTERNAL_DIR / "gpqa_diamond/test.jsonl").open()]
    assert [p.answer for p in problems] == [row["solution"][len("\\boxed{"):-1] for row in raw_rows]
    assert {p.answer for p in problems} == {"A", "B", "C", "D"}


def test_aime_and_amc_golds_are_integers():
    for name in ("aime24", "aime25", "amc23"):
        for problem in load_problems(name, data_dir=DATA_DIR):
            assert re.fullmatch(r"-?\d+", problem.answer), problem.id


@pytest.mark.parametrize("alias, canonical", [
    pytest.param("gpqa", "gpqa_diamond", marks=requires_external),
    ("math-500", "math500"), ("MATH", "math500"), ("GSM8K", "gsm8k"),
])
def test_aliases_load_the_canonical_data_set(alias, canonical):
    problems = load_problems(alias, limit=2, data_dir=EXTERNAL_DIR if canonical == "gpqa_diamond" else DATA_DIR)
    assert [p.id for p in problems] == [f"{canonical}-0", f"{canonical}-1"]


def test_limit():
    assert len(load_problems("gsm8k", limit=5, data_dir=DATA_DIR)) == 5
    assert load_problems("gsm8k", limit=0, data_dir=DATA_DIR) == []
    with pytest.raises(DatasetError):
        load_problems("gsm8k", limit=-1, data_dir=DATA_DIR)


def test_builtin_file_given_by_path_is_read_as_a_user_file():
    problems = load_problems(DATA_DIR / "aime24" / "test.jsonl", limit=3)
    assert [p.id for p in problems] == ["aime24-0", "aime24-1", "aime24-2"]  # named after folder
    assert problems[0].answer == load_problems("aime24", limit=1, data_dir=DATA_DIR)[0].answer


def test_every_builtin_has_a_known_kind_and_alias_targets_exist():
    assert set(BUILTIN) == {"gsm8k", "math500", "gpqa_diamond", "aime24", "aime25", "amc23"}
    assert {spec.answer_kind for spec in BUILTIN.values()} <= {"numeric", "math", "integer", "choice"}
    assert canonical_name("gpqa") == "gpqa_diamond"
    assert canonical_name("math-500") == "math500"
    assert canonical_name("nonexistent") is None


# ------------------------------------------------------------------ data directory discovery


def _fake_gsm8k(data_dir: Path, question: str, split: str = "test") -> None:
    write_jsonl(data_dir / "gsm8k" / f"{split}.jsonl", [{"question": question, "answer": "x\n#### 1,234"}])


def test_env_var_selects_the_data_dir(tmp_path, monkeypatch):
    _fake_gsm8k(tmp_path, "from env")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    (problem,) = load_problems("gsm8k")
    assert (problem.question, problem.answer) == ("from env", "1234")


def test_shipped_copy_comes_before_folders_beside_the_working_directory(tmp_path, monkeypatch):
    _fake_gsm8k(tmp_path / "data", "from cwd")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_problems("gsm8k", limit=1)[0].id == "gsm8k-0"
    assert load_problems("gsm8k", limit=1)[0].question != "from cwd"


def test_data_folder_in_working_directory_is_found(tmp_path, monkeypatch):
    _fake_gsm8k(tmp_path / "data", "from cwd", split="train")  # a split that is not shipped
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    (problem,) = load_problems("gsm8k", split="train")
    assert problem.question == "from cwd"


def test_shared_data_beside_working_directory_is_found(tmp_path, monkeypatch):
    _fake_gsm8k(tmp_path / "shared" / "data", "from shared", split="train")
    (tmp_path / "clone").mkdir()
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path / "clone")
    (problem,) = load_problems("gsm8k", split="train")
    assert problem.question == "from shared"


def test_missing_builtin_file_says_where_it_looked_and_why_gpqa_is_not_shipped(tmp_path):
    with pytest.raises(DatasetError) as excinfo:
        load_problems("gpqa_diamond", data_dir=tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "gpqa_diamond" / "test.jsonl") in message
    assert DATA_DIR_ENV in message and "not shipped" in message


def test_the_wheel_carries_the_shipped_data(tmp_path):
    """`pip install selar-local` then `selar bench --dataset gsm8k` from any directory: the
    built wheel holds every shipped file and its licence notes, and no GPQA."""
    import subprocess
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(repo)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("selar_local-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SHIPPED:
        assert f"selar_local/data/{name}/test.jsonl" in names
    assert {"selar_local/data/README.md", "selar_local/data/gsm8k/LICENSE", "selar_local/models.txt"} <= names
    assert {f"selar_local/web/{f}" for f in ("index.html", "app.js", "style.css", "favicon.svg")} <= names  # chat page
    assert not any("gpqa" in n for n in names)


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(DatasetError) as excinfo:
        load_problems("no-such-benchmark", data_dir=tmp_path)
    message = str(excinfo.value)
    for name in ("gsm8k", "math500", "gpqa_diamond", "aime24", "aime25", "amc23"):
        assert name in message
    assert str(tmp_path) in message
    assert isinstance(excinfo.value, SelarError)


# ------------------------------------------------------------------ user files


def test_user_file_with_default_fields(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"problem": "What is 1+1?", "solution": "2"},
        {"problem": "Put it in \\boxed{} please: 2+2?", "solution": 4},
    ])
    first, second = load_problems(path)
    assert (first.id, first.dataset, first.answer) == ("mine-0", "mine", "2")
    assert first.prompt == f"What is 1+1?\n{ANSWER_INSTRUCTION}"
    assert second.answer == "4"  # non-string answers become text
    assert second.prompt == second.question  # already asks for a box


def test_user_file_with_mapped_fields_and_ids(tmp_path):
    path = write_jsonl(tmp_path / "mybench" / "test.jsonl", [
        {"q": "Q one", "a": "1", "uid": "alpha"},
        {"q": "Q two", "a": "2", "uid": "beta"},
    ])
    problems = load_problems(path, question_field="q", answer_field="a", id_field="uid")
    assert [(p.id, p.dataset, p.question, p.answer) for p in problems] == [
        ("alpha", "mybench", "Q one", "1"),
        ("beta", "mybench", "Q two", "2"),
    ]


def test_user_folder_uses_split_file(tmp_path):
    write_jsonl(tmp_path / "bench" / "dev.jsonl", [{"question": "q", "answer": "a"}])
    (problem,) = load_problems(tmp_path / "bench", split="dev")
    assert problem.id == "bench-0"


def test_user_file_gsm8k_style_answers_are_reduced_to_the_number(tmp_path):
    path = write_jsonl(tmp_path / "w.jsonl", [{"question": "q", "answer": "work\n#### 2,500"}])
    assert load_problems(path)[0].answer == "2500"


def test_blank_lines_do_not_shift_ids(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('\n{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": "2"}\n')
    assert [(p.id, p.question) for p in load_problems(path)] == [("gaps-0", "a"), ("gaps-1", "b")]


def test_missing_field_names_the_row_and_the_fields_present(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"question": "ok", "answer": "1"},
        {"question": "no answer here", "note": "x"},
    ])
    with pytest.raises(DatasetError) as excinfo:
        load_problems(path)
    message = str(excinfo.value)
    assert f"{path}:2" in message and "row 1" in message
    assert "'answer'" in message and "note, question" in message


def test_no_recognisable_question_field(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "q", "answer": "1"}])
    with pytest.raises(DatasetError, match="question-field"):
        load_problems(path)


def test_mapped_field_missing(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(DatasetError, match="'prompt_text'"):
        load_problems(path, question_field="prompt_text")


def test_malformed_json_reports_file_and_line(tmp_path):
    rows = [{"question": "q", "answer": "1"}] * 3
    path = write_jsonl(tmp_path / "broken.jsonl", rows, raw_lines={2: '{"question": "q", '})
    with pytest.raises(DatasetError, match=re.escape(f"{path}:3")):
        load_problems(path)


def test_non_object_line_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [["question", "answer"]])
    with pytest.raises(DatasetError, match="JSON object"):
        load_problems(path)


def test_duplicate_ids_are_rejected(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [
        {"id": "x", "question": "a", "answer": "1"},
        {"id": "x", "question": "b", "answer": "2"},
    ])
    with pytest.raises(DatasetError, match="duplicate id 'x'"):
        load_problems(path, id_field="id")


def test_build_prompt_leaves_questions_with_their_own_box_instruction():
    assert build_prompt("Pick one; answer as \\boxed{A} or \\boxed{B}") == (
        "Pick one; answer as \\boxed{A} or \\boxed{B}"
    )
    assert build_prompt("What is 2+2?  \n") == f"What is 2+2?\n{ANSWER_INSTRUCTION}"


# ------------------------------------------------------------------ hub


def test_hub_without_datasets_library_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DatasetError, match="pip install"):
        load_problems("gsm8k", source="hub")


def test_hub_rejects_data_sets_without_a_hub_source():
    with pytest.raises(DatasetError, match="no Hub source"):
        load_problems("gpqa", source="hub")
    with pytest.raises(DatasetError, match="split"):
        load_problems("math500", split="train", source="hub")
