"""Benchmark problems: the built-in data sets (JSON lines, offline) and user JSON-lines files.

A built-in name such as ``gsm8k`` resolves to ``<data_dir>/gsm8k/<split>.jsonl``. Without an
explicit ``data_dir`` the first directory holding the requested file is used, in this order:
``$SELAR_DATA_DIR`` (when set), the copies shipped inside the package (``selar_local/data``:
the test splits of GSM8K, MATH-500, AIME 2024/2025 and AMC 2023), then ``./data`` and
``../shared/data`` relative to the working directory and to the repository root (GPQA Diamond,
which is not shipped, and GSM8K's train split). Any other existing path is read as a user file whose fields
are mapped with ``question_field`` / ``answer_field`` / ``id_field``.

Problem ids are ``<dataset>-<row index>`` (row index counts JSON records, not blank lines), so
they stay the same from run to run as long as the file does.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping

from selar_local.errors import DatasetError

ANSWER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Kinds of gold answer; grading picks its comparison from these.
AnswerKind = Literal["numeric", "math", "integer", "choice"]

DATA_DIR_ENV = "SELAR_DATA_DIR"
# selar_local/bench/datasets.py -> parents[2] is the repository root.
REPO_ROOT = Path(__file__).resolve().parents[2]
# The public test sets shipped with the package (selar_local/data/README.md: sources, licences).
PACKAGED_DATA_DIR = Path(__file__).resolve().parents[1] / "data"

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_BOXED_LETTER = re.compile(r"\\boxed\{\s*([A-Za-z])\s*\}")
_GENERIC_SPLIT_NAMES = {"test", "train", "validation", "valid", "dev", "data"}


@dataclass(frozen=True)
class Problem:
    id: str
    dataset: str
    question: str
    answer: str  # the gold answer, already extracted (e.g. "18", "\frac{14}{3}", "D")
    prompt: str  # what the model sees: the question plus the answer instruction if it lacks one


def gsm8k_gold(answer_text: str) -> str:
    """The number after GSM8K's ``####`` marker, thousands separators removed."""
    match = _GSM8K_FINAL.search(answer_text)
    if match is None:
        raise ValueError("no '#### <answer>' line")
    return match.group(1).replace(",", "").strip()


def boxed_letter_gold(solution_text: str) -> str:
    """The option letter in GPQA's ``\\boxed{D}`` solution."""
    match = _BOXED_LETTER.search(solution_text)
    if match is None:
        raise ValueError("no \\boxed{<letter>} in the solution")
    return match.group(1).upper()


def plain_gold(answer_value: str) -> str:
    return answer_value.strip()


@dataclass(frozen=True)
class HubSource:
    """Where the same benchmark lives on the Hugging Face Hub (used only with source="hub")."""

    repo_id: str
    config: str | None
    split_map: Mapping[str, str]  # our split name -> hub split name
    question_field: str
    answer_field: str


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    question_field: str
    answer_field: str
    gold: Callable[[str], str]  # raw answer field -> gold answer
    answer_kind: AnswerKind
    hub: HubSource | None = None

    def file(self, data_dir: Path, split: str) -> Path:
        return data_dir / self.name / f"{split}.jsonl"


BUILTIN: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec(
        "gsm8k", "question", "answer", gsm8k_gold, "numeric",
        HubSource("openai/gsm8k", "main", {"test": "test", "train": "train"}, "question", "answer"),
    ),
    "math500": DatasetSpec(
        "math500", "problem", "answer", plain_gold, "math",
        HubSource("HuggingFaceH4/MATH-500", None, {"test": "test"}, "problem", "answer"),
    ),
    # The multiple-choice form used here (shuffled options inside the problem) is not on the
    # Hub as such; the original Idavidrein/gpqa is gated and laid out differently.
    "gpqa_diamond": DatasetSpec("gpqa_diamond", "problem", "solution", boxed_letter_gold, "choice"),
    "aime24": DatasetSpec(
        "aime24", "problem", "answer", plain_gold, "integer",
        HubSource("HuggingFaceH4/aime_2024", None, {"test": "train"}, "problem", "answer"),
    ),
    "aime25": DatasetSpec(
        "aime25", "problem", "answer", plain_gold, "integer",
        HubSource("math-ai/aime25", None, {"test": "test"}, "problem", "answer"),
    ),
    "amc23": DatasetSpec(
        "amc23", "problem", "answer", plain_gold, "math",
        HubSource("math-ai/amc23", None, {"test": "test"}, "question", "answer"),
    ),
}

ALIASES: dict[str, str] = {
    "gpqa": "gpqa_diamond",
    "gpqa-diamond": "gpqa_diamond",
    "math-500": "math500",
    "math": "math500",
    "aime2024": "aime24",
    "aime2025": "aime25",
    "amc2023": "amc23",
}

DEFAULT_QUESTION_FIELDS = ("question", "problem", "prompt")
DEFAULT_ANSWER_FIELDS = ("answer", "solution", "target")


def canonical_name(name: str) -> str | None:
    """The built-in data set a name or alias refers to, or None."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in BUILTIN else None


def known_names() -> list[str]:
    return sorted(BUILTIN) + sorted(ALIASES)


def build_prompt(question: str) -> str:
    """Append the answer instruction unless the question already asks for a boxed answer."""
    if "\\boxed" in question:  # math500/aime/amc end with it; GPQA has its own letter version
        return question
    return f"{question.rstrip()}\n{ANSWER_INSTRUCTION}"


# ---------------------------------------------------------------------------------------------
# Data directory
# ---------------------------------------------------------------------------------------------

def data_dir_candidates() -> list[Path]:
    """Where built-in data sets are looked for, in order."""
    candidates: list[Path] = []
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        candidates.append(Path(from_env).expanduser())
    candidates.append(PACKAGED_DATA_DIR)
    for base in (Path.cwd(), REPO_ROOT):
        for relative in ("data", "../shared/data"):
            path = (base / relative).resolve()
            if path not in candidates:
                candidates.append(path)
    return candidates


def find_data_dir(containing: str | None = None) -> Path | None:
    """The first existing candidate data directory (holding ``containing`` if given), or None."""
    for path in data_dir_candidates():
        if path.is_dir() and (containing is None or (path / containing).exists()):
            return path
    return None


def _builtin_file(spec: DatasetSpec, split: str, data_dir: str | os.PathLike | None) -> Path:
    searched = [Path(data_dir).expanduser()] if data_dir is not None else data_dir_candidates()
    for directory in searched:
        path = spec.file(directory, split)
        if path.is_file():
            return path
    looked = ", ".join(str(spec.file(d, split)) for d in searched)
    why = ""
    if not spec.file(PACKAGED_DATA_DIR, split).is_file():
        why = (" GPQA Diamond is not shipped with selar-local (its authors ask that it not be published in plain "
               "text)." if spec.name == "gpqa_diamond" else f" Split {split!r} of {spec.name} is not shipped.")
    raise DatasetError(
        f"data set {spec.name!r} (split {split!r}) not found; looked for {looked}.{why} "
        f"Set {DATA_DIR_ENV} or pass data_dir to the folder holding {spec.name}/{split}.jsonl."
    )


# ---------------------------------------------------------------------------------------------
# Reading JSON lines
# ---------------------------------------------------------------------------------------------

def _read_jsonl(path: Path, limit: int | None) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Yield (row index, line number, record); row index skips blank lines."""
    row_index = 0
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if limit is not None and row_index >= limit:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{line_number}: malformed JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DatasetError(
                    f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}"
                )
            yield row_index, line_number, record
            row_index += 1


def _field_text(record: dict[str, Any], field: str, where: str) -> str:
    if field not in record or record[field] is None:
        present = ", ".join(sorted(record)) or "none"
        raise DatasetError(f"{where}: missing field {field!r} (fields present: {present})")
    value = record[field]
    return value if isinstance(value, str) else json.dumps(value)


def _first_present(record: dict[str, Any], options: tuple[str, ...], role: str, where: str) -> str:
    for field in options:
        if field in record:
            return field
    present = ", ".join(sorted(record)) or "none"
    raise DatasetError(
        f"{where}: no {role} field (tried {', '.join(options)}; fields present: {present}); "
        f"name it with --{role}-field"
    )


@dataclass(frozen=True)
class _FieldMap:
    question: str | None
    answer: str | None
    id: str | None
    gold: Callable[[str], str]


def _problems_from_file(
    path: Path, dataset: str, fields: _FieldMap, limit: int | None
) -> list[Problem]:
    problems: list[Problem] = []
    seen_ids: set[str] = set()
    question_field, answer_field = fields.question, fields.answer
    for row_index, line_number, record in _read_jsonl(path, limit):
        where = f"{path}:{line_number} (row {row_index})"
        # Default fields are chosen on the first row and then required on every row.
        question_field = question_field or _first_present(
            record, DEFAULT_QUESTION_FIELDS, "question", where)
        answer_field = answer_field or _first_present(
            record, DEFAULT_ANSWER_FIELDS, "answer", where)
        question = _field_text(record, question_field, where)
        raw_answer = _field_text(record, answer_field, where)
        try:
            gold = fields.gold(raw_answer)
        except ValueError as exc:
            raise DatasetError(f"{where}: cannot read the gold answer: {exc}") from None
        problem_id = (
            _field_text(record, fields.id, where) if fields.id else f"{dataset}-{row_index}"
        )
        if problem_id in seen_ids:
            raise DatasetError(f"{where}: duplicate id {problem_id!r}")
        seen_ids.add(problem_id)
        problems.append(Problem(problem_id, dataset, question, gold, build_prompt(question)))
    return problems


def _user_gold(raw_answer: str) -> str:
    """User files: take GSM8K-style '#### N' answers as N, anything else as is."""
    if "####" in raw_answer:
        return gsm8k_gold(raw_answer)
    return plain_gold(raw_answer)


def _dataset_name_for_path(path: Path) -> str:
    # "foo/test.jsonl" is better called "foo" than "test".
    if path.stem.lower() in _GENERIC_SPLIT_NAMES and path.parent.name:
        return path.parent.name
    return path.stem


def _user_path(path: Path, split: str) -> Path:
    if path.is_dir():
        inner = path / f"{split}.jsonl"
        if not inner.is_file():
            raise DatasetError(f"{path} is a folder without {split}.jsonl")
        return inner
    return path


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

def load_problems(
    name_or_path: str | os.PathLike,
    *,
    split: str = "test",
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    source: Literal["local", "hub"] = "local",
) -> list[Problem]:
    """Load a built-in benchmark by name, or a user JSON-lines file by path.

    ``limit`` keeps the first N problems. ``source="hub"`` fetches a built-in benchmark with the
    optional ``datasets`` library instead of reading the local files.
    """
    if limit is not None and limit < 0:
        raise DatasetError(f"limit must be >= 0, got {limit}")
    name = str(name_or_path)
    builtin = canonical_name(name)
    if source == "hub":
        return _load_from_hub(builtin, name, split, limit)
    if source != "local":
        raise DatasetError(f"unknown source {source!r}; use 'local' or 'hub'")

    if builtin is not None:
        spec = BUILTIN[builtin]
        fields = _FieldMap(
            question_field or spec.question_field, answer_field or spec.answer_field,
            id_field, spec.gold,
        )
        return _problems_from_file(_builtin_file(spec, split, data_dir), builtin, fields, limit)

    path = Path(name).expanduser()
    if not path.exists():
        raise DatasetError(
            f"{name!r} is neither a built-in data set ({', '.join(known_names())}) nor an "
            f"existing file; built-in data sets are looked for under "
            f"{', '.join(str(d) for d in ([Path(data_dir)] if data_dir else data_dir_candidates()))}"
        )
    path = _user_path(path, split)
    fields = _FieldMap(question_field, answer_field, id_field, _user_gold)
    return _problems_from_file(path, _dataset_name_for_path(path), fields, limit)


def _load_from_hub(builtin: str | None, name: str, split: str, limit: int | None) -> list[Problem]:
    if builtin is None or BUILTIN[builtin].hub is None:
        on_hub = sorted(n for n, spec in BUILTIN.items() if spec.hub is not None)
        raise DatasetError(f"no Hub source known for {name!r}; known: {', '.join(on_hub)}")
    spec = BUILTIN[builtin]
    hub = spec.hub
    assert hub is not None
    if split not in hub.split_map:
        raise DatasetError(
            f"{builtin} on the Hub has no {split!r} split; available: {', '.join(hub.split_map)}"
        )
    try:
        import datasets as hf_datasets  # optional extra: pip install 'selar-local[datasets]'
    except ImportError:
        raise DatasetError(
            "source='hub' needs the 'datasets' library: pip install 'selar-local[datasets]'"
        ) from None
    try:
        rows = hf_datasets.load_dataset(hub.repo_id, hub.config, split=hub.split_map[split])
    except Exception as exc:  # network, auth, renamed repos: all one message for the user
        raise DatasetError(f"cannot load {hub.repo_id} from the Hub: {exc}") from exc

    problems: list[Problem] = []
    for row_index, record in enumerate(rows):
        if limit is not None and row_index >= limit:
            break
        where = f"{hub.repo_id} row {row_index}"
        question = _field_text(record, hub.question_field, where)
        gold = spec.gold(_field_text(record, hub.answer_field, where))
        problems.append(
            Problem(f"{builtin}-{row_index}", builtin, question, gold, build_prompt(question))
        )
    return problems
