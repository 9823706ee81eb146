"""Constrained answers through llama.cpp's grammar sampler, on real models: the sampler
itself (engine.GrammarSampler), the JSON Schema converter's errors, and the loop's
constraint on discrete steps, soft steps, and after a thinking span (lazy)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from selar_local.engine import GrammarSampler
from selar_local.errors import InvalidParameterError
from selar_local.params import DecodeParams

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def _check_person(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and isinstance(value["age"], int)
    assert len(value["name"]) <= 12


def test_sampler_allows_accepts_clones_and_resets(smollm):
    model = smollm.model
    yes, no, maybe = (model.single_token(t) for t in ("yes", "no", "maybe"))
    g = GrammarSampler(model, 'root ::= "yes" " ok" | "no"')
    assert g.allowed_mask([yes, no, maybe]).tolist() == [True, True, False]
    assert not g.allows(model.eos_id)  # an empty answer does not match
    whole = g.allowed_mask(np.arange(model.n_vocab))
    assert whole[yes] and whole[no] and not whole[maybe]
    assert whole.sum() < 50  # only the pieces that start "yes" or "no"
    twin = g.clone()
    g.accept(yes)
    ok = model.single_token(" ok")
    assert g.allows(ok) and not g.allows(no)
    assert twin.allows(no) and not twin.allows(ok)  # the clone kept the state it had
    with pytest.raises(InvalidParameterError, match="is not allowed here"):
        g.accept(maybe)
    g.accept(ok)
    assert g.allows(model.eos_id)  # complete: it may end now
    g.reset()
    assert g.allows(no) and not g.allows(model.eos_id)
    twin.close()
    g.close()


@pytest.mark.parametrize("gbnf, problem", [
    ('root ::= foo', "Undefined rule identifier 'foo'"),
    ('root ::= "unclosed', "unexpected end of input"),
])
def test_invalid_gbnf_names_the_problem(smollm, gbnf, problem):
    with pytest.raises(InvalidParameterError, match=f"grammar: llama.cpp cannot parse this GBNF.*{problem}"):
        GrammarSampler(smollm.model, gbnf)


@pytest.mark.parametrize("schema, problem", [
    ({"type": "foo"}, "Unrecognized schema"),
    ({"$ref": "https://example.com/a.json"}, "Fetching remote schemas is not allowed"),
    ({"type": "string", "pattern": "(("}, 'Pattern must start with "\\^"'),
    ("{not json", "json_schema: not valid JSON"),
    ([1, 2], "expected a JSON Schema object, got list"),
])
def test_schema_the_converter_cannot_handle_is_refused_by_name(schema, problem):
    with pytest.raises(InvalidParameterError, match=problem):
        DecodeParams(json_schema=schema)


def test_params_keep_the_schema_as_canonical_text_and_refuse_conflicts():
    p = DecodeParams(json_schema=PERSON)
    assert p.json_schema == json.dumps(PERSON, sort_keys=True)
    assert "root ::=" in p.constraint_gbnf()
    assert DecodeParams(grammar='root ::= "a"').constraint_gbnf() == 'root ::= "a"'
    assert DecodeParams().constraint_gbnf() is None
    with pytest.raises(InvalidParameterError, match="grammar and json_schema are exclusive"):
        DecodeParams(grammar='root ::= "a"', json_schema=PERSON)
    with pytest.raises(InvalidParameterError, match="ignore_eos cannot go with a grammar"):
        DecodeParams(json_schema=PERSON, ignore_eos=True)
    with pytest.raises(InvalidParameterError, match="grammar: expected non-empty GBNF text"):
        DecodeParams(grammar="  ")
    with pytest.raises(InvalidParameterError, match="no `root` rule"):
        DecodeParams(grammar='answer ::= "a"')


def test_bad_gbnf_fails_at_submit_and_takes_no_slot(smollm):
    with pytest.raises(InvalidParameterError, match="Undefined rule identifier 'nope'"):
        smollm.generate(messages=ASK, params=DecodeParams(grammar="root ::= nope", max_tokens=4))
    result = smollm.generate(messages=ASK, params=DecodeParams(grammar='root ::= "yes" | "no"', max_tokens=8))
    assert result.content in ("yes", "no") and result.finish_reason == "stop"


@pytest.mark.parametrize("method", ["cot", "selar", "soft", "moi", "swir"])
def test_json_schema_answer_validates_with_every_method(smollm, method):
    # tau = 0 opens SeLaR's gate at every step: the mixtures are built under the grammar
    params = DecodeParams(method=method, json_schema=PERSON, max_tokens=80, tau=0.0, seed=7)
    result = smollm.generate(messages=ASK, params=params)
    assert result.finish_reason == "stop"
    _check_person(result.content)
    if method == "selar":
        assert result.soft_steps > 0


def test_soft_steps_mix_only_allowed_candidates(smollm):
    """A grammar of lowercase words: every soft step's mixture is lowercase pieces."""
    from selar_local.generate import stream_tokens

    params = DecodeParams(method="selar", tau=0.0, grammar='root ::= [a-z]+ (" " [a-z]+)*', max_tokens=16, seed=2)
    prompt = smollm.encode(messages=[{"role": "user", "content": "Write a sentence in lowercase."}])
    stream = stream_tokens(smollm, prompt, params)
    events = []
    try:
        while True:
            events.append(next(stream))
    except StopIteration as done:
        result = done.value
    assert re.fullmatch(r"[a-z]+( [a-z]+)*", result.content), result.content
    soft = [e for e in events if e.soft]
    assert soft
    for e in soft:
        pieces = [smollm.model.token_text(int(t)) for t in e.mix_ids]
        assert len(pieces) >= 2 and all(re.fullmatch(r" ?[a-z]+", p) for p in pieces), pieces


def test_thinking_is_free_and_the_answer_valid_json_from_random_weights(tiny_model):
    """A random-weight model with R1's tokenizer: the span (opened by the template's prefill)
    is free text, closed by the budget; the answer after it matches the schema."""
    from selar_local.runtime import Runtime

    runtime = Runtime(tiny_model("qwen2-r1"), n_ctx=512, n_threads=1)
    try:
        prompt = runtime.encode(messages=ASK + [{"role": "assistant", "content": "<think>\n"}])
        for method in ("cot", "selar"):
            params = DecodeParams(method=method, tau=0.0, max_think_tokens=12, json_schema=PERSON,
                                  max_tokens=200, seed=4)
            from selar_local.generate import stream_tokens

            stream, events = stream_tokens(runtime, prompt, params), []
            try:
                while True:
                    events.append(next(stream))
            except StopIteration as done:
                result = done.value
            assert result.think_tokens == 12 and result.finish_reason == "stop"
            _check_person(result.answer)
            # the reasoning is not JSON-constrained: random weights write no JSON there
            assert not result.reasoning.lstrip().startswith("{")
    finally:
        runtime.close()


def test_cli_run_json_schema_and_grammar_files(tmp_path, smollm_path):
    import subprocess
    import sys

    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"type": "integer"}},
                                  "required": ["answer"], "additionalProperties": False}))
    base = [sys.executable, "-m", "selar_local.cli", "run", "What is 2 + 3?", "--model", str(smollm_path),
            "--max-tokens", "30", "--threads", "1"]
    done = subprocess.run(base + ["--json-schema", str(schema), "--method", "selar"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == {"answer"} and isinstance(json.loads(done.stdout)["answer"], int)
    bad = tmp_path / "bad.gbnf"
    bad.write_text("root ::= nope")
    done = subprocess.run(base + ["--grammar", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2 and "Undefined rule identifier 'nope'" in done.stderr and not done.stdout
    done = subprocess.run(base + ["--grammar", str(tmp_path / "none.gbnf")], capture_output=True, text=True)
    assert done.returncode == 2 and "cannot read it (No such file or directory)" in done.stderr
    done = subprocess.run(base + ["--grammar", str(bad), "--json-schema", str(schema)], capture_output=True, text=True)
    assert done.returncode == 2 and "not allowed with argument" in done.stderr
