"""The loop's pure parts: a sequence's queue of segments (Force before Decode, forced tokens
in the order asked) and the one function that turns any next input into a batch row."""
from __future__ import annotations

import numpy as np
import pytest

from selar_local.batch_runner import input_row
from selar_local.kv_slots import Slot
from selar_local.outputs import SequenceOutput, TextStream
from selar_local.params import DecodeParams
from selar_local.policies import Mixture, StepDecision, Token, Vector
from selar_local.sequences import Decode, Force, Phase, Prefill, Sequence


def _sequence() -> Sequence:
    seq = Sequence(0, Slot(0), DecodeParams(method="cot"), None, [1, 2, 3], SequenceOutput(TextStream(())))
    seq.segments.extend((Prefill([1, 2, 3]), Decode()))
    return seq


def test_forced_tokens_come_before_decode_in_the_order_asked():
    seq = _sequence()
    assert seq.phase is Phase.PREFILLING and seq.prefill.tokens == [1, 2, 3]
    assert seq.next_forced() is None  # the front is the prompt, not a Force
    seq.segments.popleft()
    assert seq.prefill is None and seq.next_forced() is None
    seq.force((7, 8))
    seq.force((9,))  # asked while 7, 8 are still to come: after them, in the same segment
    assert len(seq.segments) == 2 and isinstance(seq.segments[0], Force)
    seq.force((5,), constrained=True)  # another kind: its own segment, after the others
    assert [seq.next_forced() for _ in range(4)] == [(7, False), (8, False), (9, False), (5, True)]
    assert len(seq.segments) == 1 and isinstance(seq.segments[0], Decode)  # the emptied Force is gone
    assert seq.next_forced() is None


def test_next_input_names_the_decisions_input():
    ids, weights, vector = np.array([4, 5]), np.array([0.25, 0.75]), np.ones(3, np.float32)
    base = dict(entropy=0.5, top_ids=ids, top_probs=weights)
    assert StepDecision(4, False, None, None, **base).next_input == Token(4)
    mixture = StepDecision(4, True, ids, weights, **base).next_input
    assert isinstance(mixture, Mixture) and mixture.ids is ids and mixture.weights is weights
    vec = StepDecision(4, True, None, None, **base, vector=vector).next_input
    assert isinstance(vec, Vector) and vec.values is vector


def test_input_row_writes_each_kind_of_input(smollm):
    table = smollm.table
    row = np.full(smollm.model.n_embd_inp, np.nan, dtype=np.float32)
    input_row(row, Token(42), table)
    assert np.array_equal(row, table.row(42))
    input_row(row, Mixture(np.array([42, 7]), np.array([1.5, -0.5])), table)
    expected = np.dot(np.array([1.5, -0.5], dtype=np.float32), table.rows([42, 7]))
    assert np.array_equal(row, expected)
    values = np.arange(row.size, dtype=np.float32)
    input_row(row, Vector(values), table)
    assert np.array_equal(row, values)
    with pytest.raises(TypeError, match="not a next input"):
        input_row(row, (42,), table)
