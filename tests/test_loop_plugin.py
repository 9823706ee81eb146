"""A method plugs into the loop through the registry alone (a policy class plus its
`Method` entry), on real models: one whose next input is a `Vector` (the embedding the
method computes), one that reads the final hidden state (`needs_hidden`), and one that
records what the loop tells it (`Policy.accept`) while a thinking budget forces the span's
close marker as a Force segment."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from selar_local import methods
from selar_local.generate import generate_many, stream_tokens
from selar_local.methods import Method
from selar_local.params import DecodeParams
from selar_local.policies import CotPolicy, SelarPolicy, Vector

from conftest import runtime_for
from decode_compare import token_tie

QUESTION = [{"role": "user", "content": "Name three colors and say why you like them."}]
THINK_CLOSE = 151649


class OwnRowVector(CotPolicy):
    """cot, but the next input is the chosen token's embedding row computed here and fed
    as a Vector (the form a hidden-state method's input takes)."""

    table = None  # the embedding table, set by the test (a real method would compute its vector)

    def decide(self, dist, logits):
        decision = super().decide(dist, logits)
        return dataclasses.replace(decision, soft=True, vector=np.array(self.table.row(decision.token)))


class HiddenReader(CotPolicy):
    """cot that declares it reads the hidden state, and keeps each row it is handed."""

    needs_hidden = True
    seen: list = []

    def propose(self, logits, hidden=None):
        HiddenReader.seen.append(None if hidden is None else np.array(hidden))
        return super().propose(logits, hidden)


class Recording(SelarPolicy):
    """SeLaR that keeps every (token, is_generated) the loop tells it, and its thinking
    state as it reads it before each step."""

    made: list["Recording"] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accepted: list[tuple[int, bool]] = []
        self.thinking_seen: list[bool] = []
        Recording.made.append(self)

    def propose(self, logits, hidden=None):
        self.thinking_seen.append(self.in_thinking)
        return super().propose(logits, hidden)

    def accept(self, token, is_generated):
        self.accepted.append((token, is_generated))
        super().accept(token, is_generated)


def _register(monkeypatch, name: str, policy: str, soft: bool) -> None:
    monkeypatch.setitem(methods.REGISTRY, name, Method(name, policy, "a test method", soft))


def test_a_vector_input_method_plugs_in_and_feeds_what_it_computes(monkeypatch, model_files):
    """A registered method whose every next input is a Vector equal to the token's own
    embedding row decodes exactly as cot (the self-check proves rows and tokens give the
    same logits), through the embedding batches: every step is a soft (non-token) input."""
    rt = runtime_for("llama", model_files, n_parallel=2)
    assert rt.self_check.passed
    monkeypatch.setattr(OwnRowVector, "table", rt.table)
    _register(monkeypatch, "own_row_vector", f"{__name__}:OwnRowVector", True)
    prompt = rt.encode(messages=QUESTION)
    cot = DecodeParams(method="cot", greedy=True, max_tokens=24, logprobs=2)
    vector, reference = generate_many(rt, [prompt, prompt], [cot.replace(method="own_row_vector"), cot])
    parted = next((k for k, (a, b) in enumerate(zip(vector.tokens, reference.tokens)) if a != b), None)
    if parted is None:
        assert vector.tokens == reference.tokens and vector.text == reference.text
    else:  # only where cot's own step was a near-tie (tests/decode_compare.py)
        assert token_tie(reference, parted) is not None, f"parted at step {parted} without a near-tie"
    assert vector.soft_steps == len(vector.tokens) - 1 and reference.soft_steps == 0  # the last input is never fed
    assert vector.effective_counts == []  # a vector is no mixture of rows
    logits = np.zeros(rt.model.n_vocab, np.float32)
    logits[42] = 5.0
    decision = OwnRowVector(cot, rt.token_info).propose(logits)
    assert decision.token == 42 and isinstance(decision.next_input, Vector)
    assert np.array_equal(decision.next_input.values, rt.table.row(42))


def test_a_policy_that_needs_the_hidden_state_is_handed_its_row(monkeypatch, model_files):
    """A registered method with needs_hidden: the loop switches the engine's hidden output on
    for its steps and hands it the final hidden state of its own last input, its prompt's
    last token included (decoded again where the prompt cache holds the prompt: slots keep
    logits, not hidden states), beside a cot neighbour whose decode does not change."""
    rt = runtime_for("llama", model_files, n_parallel=2)
    HiddenReader.seen = []
    _register(monkeypatch, "hidden_reader", f"{__name__}:HiddenReader", False)
    prompt = rt.encode(messages=QUESTION)
    other = rt.encode(messages=[{"role": "user", "content": "Spell cat."}])
    cot = DecodeParams(method="cot", greedy=True, max_tokens=12, logprobs=2)
    alone = generate_many(rt, [prompt, other], [cot, cot])
    reader, neighbour = generate_many(rt, [prompt, other], [cot.replace(method="hidden_reader"), cot])
    assert len(HiddenReader.seen) == len(reader.tokens)  # one row per decided step
    assert all(h is not None and h.shape == (rt.context.n_hidden,) and np.isfinite(h).all()
               for h in HiddenReader.seen)
    assert not np.array_equal(HiddenReader.seen[0], HiddenReader.seen[1])  # each step's own row
    for got, want in ((reader, alone[0]), (neighbour, alone[1])):
        parted = next((k for k, (a, b) in enumerate(zip(got.tokens, want.tokens)) if a != b), None)
        assert parted is None or token_tie(want, parted) is not None
        assert parted is not None or got.tokens == want.tokens
    # the first row is the prompt's last hidden state: the same as a plain decode of the prompt gives
    ctx = rt.context
    ctx.remove_sequence(0)
    ctx.set_hidden_output(True)
    try:
        ctx.decode_tokens(prompt, range(len(prompt)), [0] * len(prompt), [False] * (len(prompt) - 1) + [True])
        last = np.array(ctx.hidden(-1))
    finally:
        ctx.set_hidden_output(False)
        ctx.remove_sequence(0)
    assert np.array_equal(HiddenReader.seen[0], last)


@pytest.fixture(scope="module")
def tiny_r1(tiny_model):
    from selar_local.runtime import Runtime

    runtime = Runtime(tiny_model("qwen2-r1"), n_ctx=256, n_parallel=2, n_threads=1)
    yield runtime
    runtime.close()


def test_a_policy_is_told_every_token_and_reads_the_sequences_thinking_state(monkeypatch, tiny_r1):
    """Under a thinking budget the loop forces the close marker and the answer's opening:
    the policy is told each of those tokens with is_generated False and every other token
    with True, in the order shown; the thinking state it reads is the sequence's (inside
    the span until the close marker, outside after it), which it never had to track."""
    Recording.made.clear()
    _register(monkeypatch, "recording", f"{__name__}:Recording", True)
    prompt = tiny_r1.encode(messages=[{"role": "user", "content": "What is 2 + 3?"},
                                      {"role": "assistant", "content": "<think>\n"}])
    params = DecodeParams(method="recording", tau=0.0, thinking_only=True, max_think_tokens=5, max_tokens=12,
                          seed=3, ignore_eos=True)
    stream = stream_tokens(tiny_r1, prompt, params)
    events = list(stream)
    (policy,) = Recording.made
    forced = tiny_r1.thinking_span.forced_close  # the close marker, then the answer's opening
    assert forced[0] == THINK_CLOSE
    tokens = [e.token for e in events]
    assert tokens[5:5 + len(forced)] == list(forced)
    assert policy.accepted == [(t, not 5 <= i < 5 + len(forced)) for i, t in enumerate(tokens)]
    # proposals happen on generated steps only: 5 inside the span, the rest after it
    assert policy.thinking_seen == [True] * 5 + [False] * (len(tokens) - 5 - len(forced))
