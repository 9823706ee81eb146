"""The grammar's adjustments to a step decision (constraint.py): exact, on hand-made inputs."""
import math

import numpy as np
import pytest

from selar_local.constraint import allowed_part, constrain, masked_distribution, redraw
from selar_local.errors import InvalidParameterError
from selar_local.policies import StepDecision
from selar_local.sampling import Distribution

FILTERS = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def allow(*ids):
    ok = set(ids)
    return lambda cand: np.array([int(t) in ok for t in cand], dtype=bool)


def discrete(token, top_ids=(5, 6, 7), top_probs=(0.5, 0.3, 0.2)):
    return StepDecision(token, False, None, None, 0.4, np.array(top_ids), np.array(top_probs), math.log(0.5))


def soft(token, mix_ids, mix_weights, top_ids=None):
    ids = np.array(mix_ids)
    return StepDecision(token, True, ids, np.array(mix_weights, dtype=float), 0.9,
                        np.array(top_ids if top_ids is not None else mix_ids), np.array([0.5, 0.3, 0.2]), -0.7)


DIST = Distribution(np.array([5, 6, 7]), np.array([0.5, 0.3, 0.2]))
LOGITS = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 2.0, 1.0, 0.5])


def test_allowed_part_renormalises_the_allowed_tokens():
    part = allowed_part(DIST, allow(6, 7))
    assert part.ids.tolist() == [6, 7]
    assert part.probs.tolist() == pytest.approx([0.6, 0.4], abs=1e-15)
    assert allowed_part(DIST, allow(8)) is None


def test_an_allowed_token_leaves_the_decision_unchanged():
    d = discrete(5)
    rng = np.random.default_rng(0)
    assert constrain(d, DIST, LOGITS, allow(5, 6), rng, greedy=False, **FILTERS) is d


def test_a_rejected_token_is_redrawn_from_the_allowed_filtered_part():
    out = constrain(discrete(5), DIST, LOGITS, allow(6, 7), np.random.default_rng(0), greedy=True, **FILTERS)
    assert (out.token, out.soft, out.logprob) == (6, False, pytest.approx(math.log(0.6)))
    # sampled: the uniform draw u decides by inverse CDF over [0.6, 0.4]
    u = np.random.default_rng(3).random()
    out = constrain(discrete(5), DIST, LOGITS, allow(6, 7), np.random.default_rng(3), greedy=False, **FILTERS)
    assert out.token == (6 if u < 0.6 else 7)


def test_no_allowed_candidate_falls_back_to_the_masked_vocabulary():
    token, logprob = redraw(DIST, LOGITS, allow(8, 0), np.random.default_rng(0), greedy=True, **FILTERS)
    e8, e0 = math.exp(0.5), math.exp(0.0)
    assert token == 8 and logprob == pytest.approx(math.log(e8 / (e8 + e0)))
    dist = masked_distribution(LOGITS, allow(8, 0), **FILTERS)
    assert dist.ids.tolist() == [8, 0]
    with pytest.raises(InvalidParameterError, match="no token of the vocabulary"):
        masked_distribution(LOGITS, allow(), **FILTERS)


def test_the_mixture_keeps_only_allowed_candidates():
    d = soft(5, [5, 6, 7], [0.5, 0.3, 0.2])
    out = constrain(d, DIST, LOGITS, allow(5, 7), np.random.default_rng(0), greedy=True, **FILTERS)
    assert out.soft and out.token == 5
    assert out.mix_ids.tolist() == [5, 7]
    assert out.mix_weights.tolist() == pytest.approx([0.5 / 0.7, 0.2 / 0.7], abs=1e-15)


def test_a_rejected_top_candidate_makes_the_step_discrete():
    d = soft(6, [5, 6, 7], [0.5, 0.3, 0.2])
    out = constrain(d, DIST, LOGITS, allow(6, 7), np.random.default_rng(0), greedy=True, **FILTERS)
    assert (out.soft, out.mix_ids, out.mix_weights, out.token) == (False, None, None, 6)
    assert out.logprob == d.logprob  # the shown token was allowed: not redrawn


def test_a_mixture_left_with_one_candidate_is_discrete():
    d = soft(5, [5, 6, 7], [0.5, 0.3, 0.2])
    out = constrain(d, DIST, LOGITS, allow(5), np.random.default_rng(0), greedy=True, **FILTERS)
    assert (out.soft, out.token) == (False, 5)


def test_a_rejected_shown_token_on_a_soft_step_is_redrawn_inside_the_mixture():
    d = soft(7, [5, 6, 7], [0.5, 0.3, 0.2])
    out = constrain(d, DIST, LOGITS, allow(5, 6), np.random.default_rng(0), greedy=True, **FILTERS)
    assert out.soft and out.token == 5 and out.mix_ids.tolist() == [5, 6]
    assert out.mix_weights.tolist() == pytest.approx([0.625, 0.375], abs=1e-15)
    assert out.logprob == pytest.approx(math.log(0.625))


def test_the_vocabulary_head_gives_the_whole_vocabularys_answer():
    from selar_local.constraint import HEAD_PER_K
    from selar_local.sampling import filter_logits

    rng = np.random.default_rng(5)
    logits = rng.normal(size=4000)
    for allowed_ids, head_only in ((np.flatnonzero(rng.random(4000) < 0.5), True),
                                   (np.argsort(logits)[:100], False)):  # the 100 least likely only
        sizes = []

        def allowed(ids, ok=set(allowed_ids.tolist())):
            sizes.append(len(ids))
            return np.array([int(t) in ok for t in ids], dtype=bool)

        got = masked_distribution(logits, allowed, temperature=0.7, top_k=5, top_p=0.9, min_p=0.0)
        ref = filter_logits(np.where(np.isin(np.arange(4000), allowed_ids), logits, -np.inf), 0.7, 5, 0.9, 0.0)
        assert got.ids.tolist() == ref.ids.tolist()
        assert got.probs.tolist() == pytest.approx(ref.probs.tolist(), abs=1e-15)
        assert sizes == ([5 * HEAD_PER_K] if head_only else [5 * HEAD_PER_K, 4000])


# ------------------------------------------------ the lazy grammar and the span's markers
# llama.cpp's grammar sampler on R1's real vocabulary (the vocab-only file), the loop's
# SpanTracker, and hand-made step decisions in the order a model could take them.

class _Policy:  # what SequenceGrammar reads of the policy: its distribution and random stream
    last_dist = None
    rng = np.random.default_rng(0)


def _step(grammar, tracker, model, text, token, vocab):
    """One step: the grammar adjusts a decision to show `token`, the tracker and grammar follow."""
    logits = np.zeros(vocab)
    logits[token] = 5.0
    decision = grammar.adjust(discrete(token, top_ids=(token,), top_probs=(1.0,)), _Policy, logits, tracker)
    grammar.commit(decision.token)
    new_text = text + model.token_bytes(decision.token).decode("utf-8", errors="replace")
    tracker.push(decision.token, len(text), new_text)
    return decision.token, new_text


@pytest.fixture(scope="module")
def r1_vocab_model(r1_vocab_path):
    from selar_local.engine import LlamaModel

    model = LlamaModel(r1_vocab_path, vocab_only=True)
    yield model
    model.close()


def _lazy(model, gbnf):
    from selar_local.constraint import SequenceGrammar
    from selar_local.engine import GrammarSampler
    from selar_local.params import DecodeParams
    from selar_local.thinking import THINK_TAGS, SpanTokens, SpanTracker

    span = SpanTokens.build(THINK_TAGS, lambda t: model.tokenize(t, add_special=False))
    return SequenceGrammar(GrammarSampler(model, gbnf), DecodeParams(greedy=True)), SpanTracker(span), span


def test_a_span_the_model_opens_is_free_then_the_header_then_the_grammar_holds(r1_vocab_model):
    model, vocab = r1_vocab_model, r1_vocab_model.n_vocab
    grammar, tracker, span = _lazy(model, 'root ::= "{" [a-z]* "}"')
    think, close, (header,) = span.open_ids[0], span.close_ids[0], span.answer_ids
    brace, word = model.tokenize("{", add_special=False)[0], model.tokenize("abc", add_special=False)
    text = ""
    token, text = _step(grammar, tracker, model, text, think, vocab)   # the model opens the span itself
    assert token == think and tracker.in_span and not grammar.started
    token, text = _step(grammar, tracker, model, text, word[0], vocab)  # reasoning: free
    token, text = _step(grammar, tracker, model, text, close, vocab)    # the model closes it
    assert token == close and not tracker.in_span and tracker.answer_header_next == header
    token, text = _step(grammar, tracker, model, text, header, vocab)   # "\n\n": the grammar rejects it, free
    assert token == header and not grammar.started and tracker.answer_header_next is None
    token, text = _step(grammar, tracker, model, text, brace, vocab)
    assert token == brace and grammar.started
    token, text = _step(grammar, tracker, model, text, think, vocab)    # no second span: <think> is redrawn
    assert token != think and not tracker.in_span
    assert tracker.split(text) == ("abc", "{" + model.token_bytes(token).decode())


def test_the_open_marker_is_free_only_as_the_first_token(r1_vocab_model):
    model, vocab = r1_vocab_model, r1_vocab_model.n_vocab
    grammar, tracker, span = _lazy(model, 'root ::= "{" [a-z]* "}"')
    brace = model.tokenize("{", add_special=False)[0]
    token, text = _step(grammar, tracker, model, "", brace, vocab)
    assert grammar.started
    token, text = _step(grammar, tracker, model, text, span.open_ids[0], vocab)
    assert token != span.open_ids[0] and not tracker.in_span


def _lazy_with(model, gbnf, markers):
    from selar_local.constraint import SequenceGrammar
    from selar_local.engine import GrammarSampler
    from selar_local.params import DecodeParams
    from selar_local.thinking import SpanTokens, SpanTracker

    span = SpanTokens.build(markers, lambda t: model.tokenize(t, add_special=False))
    return SequenceGrammar(GrammarSampler(model, gbnf), DecodeParams(greedy=True)), SpanTracker(span), span


def test_a_marker_of_several_tokens_goes_on_unless_its_start_passes_the_grammar(r1_vocab_model):
    """An open marker split into tokens (as gpt-oss's harmony channel header): once its first
    token is shown, leaving it is allowed only where the grammar takes what was shown."""
    from selar_local.thinking import ThinkingMarkers

    model, vocab = r1_vocab_model, r1_vocab_model.n_vocab
    markers = ThinkingMarkers("<<think>>", "<</think>>")
    word = model.tokenize("abc", add_special=False)[0]
    brace = model.tokenize("{", add_special=False)[0]
    # The grammar rejects the marker's start: after it, only the marker may go on.
    grammar, tracker, span = _lazy_with(model, 'root ::= "{" [a-z]* "}"', markers)
    opening = span.open_ids
    assert len(opening) >= 2
    token, text = _step(grammar, tracker, model, "", opening[0], vocab)
    assert token == opening[0] and not grammar.started
    token, text = _step(grammar, tracker, model, text, brace, vocab)
    assert token == opening[1] and not grammar.started
    # The grammar takes the marker's start: the model may leave it, and the start is answer.
    start = model.token_bytes(opening[0]).decode()
    grammar, tracker, span = _lazy_with(model, f'root ::= "{start}" [a-z]* ">"', markers)
    token, text = _step(grammar, tracker, model, "", opening[0], vocab)
    token, text = _step(grammar, tracker, model, text, word, vocab)
    assert token == word and grammar.started and not tracker.in_span
    assert grammar.sampler.allows(model.tokenize(">", add_special=False)[0])  # past start + "abc"
    assert tracker.split(text) == ("", start + "abc")
