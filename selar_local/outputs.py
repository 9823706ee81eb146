"""The output accumulator of the generation loop: what one sequence has produced so far
(tokens, text with stop strings held back, the thinking split, entropies, soft flags,
log-probabilities), the stop conditions, the StepEvent of each step and the
GenerationResult at the end.

The loop (generate.py) hands each final decision to `SequenceOutput.take`, with the
token's bytes and what only the loop knows (end-of-generation token, room left in the
context); `take` returns the step's event, whose `finish_reason` says whether the
sequence ended. The sequence's `SpanTracker` is advanced here, with the text: it is the
one thinking state, which the policy reads (policies.py).
"""
from __future__ import annotations

import codecs
import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from selar_local.policies import StepDecision
from selar_local.sampling import Distribution, token_logprobs
from selar_local.thinking import SpanTracker


@dataclass(frozen=True)
class StepEvent:
    """One generated token of one sequence, as streamed to callers and traces."""

    request_id: int
    index: int                 # 0-based position in the generated text
    token: int
    text: str                  # text released by this step (stop-string holdback applied)
    soft: bool                 # the NEXT input is a soft mixture (not this token)
    entropy: float
    top_ids: tuple[int, ...]
    top_probs: tuple[float, ...]
    mix_ids: tuple[int, ...] = ()
    mix_weights: tuple[float, ...] = ()
    finish_reason: str | None = None  # "stop", "length", or "error" on a sequence's last event
    # Only when the request asked for them (DecodeParams.logprobs): log-probability of the
    # shown token under the filtered distribution, and the most probable alternatives.
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    # The thinking span (selar_local/thinking.py): whether this token was generated inside
    # it, and `text` split into reasoning and content (markers in neither). Without
    # thinking markers, content == text.
    thinking: bool = False
    reasoning: str = ""
    content: str = ""
    latent: tuple["LatentMarker", ...] = ()  # the latent steps taken just before this token

    def trace_record(self, token_text: str) -> dict:
        record = {
            "index": self.index, "token": self.token, "text": token_text, "soft": self.soft,
            "entropy": round(self.entropy, 6),
            "top_ids": list(self.top_ids), "top_probs": [round(p, 6) for p in self.top_probs],
            "thinking": self.thinking,
        }
        if self.soft:
            record["mix_ids"] = list(self.mix_ids)
            record["mix_weights"] = [round(w, 6) for w in self.mix_weights]
        if self.finish_reason:
            record["finish_reason"] = self.finish_reason
        return record


@dataclass(frozen=True)
class LatentMarker:
    """A latent step (no token shown): the top tokens of the logits of the step whose
    hidden state it fed, under the sampling filter ("what is it thinking")."""

    step: int                  # 0-based among the sequence's latent steps
    entropy: float             # normalised top-ks entropy, as a token step's
    top_ids: tuple[int, ...]
    top_probs: tuple[float, ...]

    def trace_record(self, token_text) -> dict:
        """token_text(id) -> str: the model's text of a token."""
        return {"latent": True, "step": self.step, "entropy": round(self.entropy, 6),
                "top_ids": list(self.top_ids), "top_probs": [round(p, 6) for p in self.top_probs],
                "top_tokens": [token_text(t) for t in self.top_ids]}


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str
    soft_steps: int
    entropies: list[float]
    prefill_seconds: float
    decode_seconds: float
    effective_counts: list[float] = field(default_factory=list)  # N_eff of each soft input
    soft_flags: list[bool] = field(default_factory=list)  # per step: was the NEXT input soft
    logprob_sum: float = 0.0  # sum of log p(token) under the sampling distribution

    @property
    def mean_logprob(self) -> float:
        """How confident the sampler was in the text it produced (self-consistency's tie-break)."""
        return self.logprob_sum / len(self.tokens) if self.tokens else 0.0
    # per token, when DecodeParams.logprobs asked: (log p of the token, ((id, log p), ...))
    logprobs: list[tuple[float, tuple]] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose KV cells were reused (prompt cache or a copy)
    # Thinking span: the reasoning (markers stripped) and the answer after the span;
    # answer is None for models without thinking markers (the whole text is the answer).
    reasoning: str = ""
    answer: str | None = None
    think_tokens: int = 0  # tokens generated inside the span
    thinking_flags: list[bool] = field(default_factory=list)  # per step: token inside the span
    latent_steps: int = 0  # hidden-state steps fed before the text (method latent)

    @property
    def content(self) -> str:
        """The answer: the text after the thinking span (all of it without markers)."""
        return self.text if self.answer is None else self.answer

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def soft_share(self) -> float:
        return self.soft_steps / len(self.tokens) if self.tokens else 0.0

    @property
    def mean_entropy(self) -> float:
        return float(np.mean(self.entropies)) if self.entropies else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.decode_seconds if self.decode_seconds > 0 else 0.0


class TextStream:
    """Incremental UTF-8 decoding plus stop strings, holding back any tail that could
    still become a stop string so that streamed text never has to be taken back."""

    def __init__(self, stop: Sequence[str], hold: Sequence[str] = ()):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        # `hold`: strings held back like stop strings but not stopping (thinking markers).
        self._prefixes = self._stop + tuple(hold)
        self._longest = max((len(s) for s in self._prefixes), default=0)
        self.text = ""
        self.released = 0

    def push(self, data: bytes) -> tuple[str, bool]:
        """Add a token's bytes; returns (text to release now, whether a stop string hit)."""
        self.text += self._decoder.decode(data)
        if self._prefixes:
            search_from = max(0, self.released - self._longest)
            hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._release(len(self.text)), True
            return self._release(len(self.text) - self._holdback()), False
        return self._release(len(self.text)), False

    def finish(self) -> str:
        self.text += self._decoder.decode(b"", final=True)
        return self._release(len(self.text))

    def _holdback(self) -> int:
        tail = self.text[-self._longest:] if self._longest else ""
        for size in range(min(len(tail), self._longest), 0, -1):
            if any(s.startswith(tail[-size:]) for s in self._prefixes):
                return size
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.released)
        out = self.text[self.released:upto]
        self.released = upto
        return out


def replay_output(token_bytes, span, thinking_at_start: bool, tokens: Sequence[int],
                  stop: Sequence[str] = ()) -> tuple[str, str, str | None, int]:
    """(text, reasoning, answer, think_tokens) of an output given as its tokens, split exactly
    as the loop splits a sequence's output (the same TextStream and SpanTracker, token by
    token): for an answer assembled from pieces decoded apart, such as LatentSeek's latent
    prefix and the continuation decoded after it. token_bytes(id) -> bytes; answer None
    without markers; think_tokens: the tokens inside the span."""
    tracker = SpanTracker(span, thinking_at_start)
    stream = TextStream(stop, tracker.hold_strings)
    for token in tokens:
        offset_before = len(stream.text)
        _, stopped = stream.push(token_bytes(token))
        tracker.push(token, offset_before, stream.text)
        if stopped:
            break
    stream.finish()
    reasoning, answer = tracker.split(stream.text)
    return stream.text, reasoning, answer, tracker.think_tokens


@dataclass
class SequenceOutput:
    """One sequence's output so far (the fields of its GenerationResult)."""

    text: TextStream
    span: SpanTracker = field(default_factory=lambda: SpanTracker(None))
    tokens: list[int] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    soft_flags: list[bool] = field(default_factory=list)   # per step: was the NEXT input soft
    thinking_flags: list[bool] = field(default_factory=list)
    effective_counts: list[float] = field(default_factory=list)
    soft_steps: int = 0
    logprob_sum: float = 0.0
    logprobs: list[tuple[float, tuple]] = field(default_factory=list)
    latent_steps: int = 0
    latent_pending: list[LatentMarker] = field(default_factory=list)  # for the next token's event

    def add_latent(self, decision: StepDecision) -> None:
        """A latent step was taken (its vector decodes next); no token, no text."""
        self.latent_pending.append(LatentMarker(self.latent_steps, float(decision.entropy),
                                                _ints(decision.top_ids), _floats(decision.top_probs)))
        self.latent_steps += 1

    def _latent_markers(self) -> tuple[LatentMarker, ...]:
        markers, self.latent_pending = tuple(self.latent_pending), []
        return markers

    def add(self, decision: StepDecision, data: bytes, logprobs: tuple[float, tuple] | None) -> tuple[str, bool]:
        """Record a shown token (its bytes `data`); returns (text released now, stop string hit)."""
        self.tokens.append(decision.token)
        self.entropies.append(decision.entropy)
        self.soft_flags.append(False)
        self.thinking_flags.append(self.span.in_span)
        self.logprob_sum += decision.logprob
        if logprobs is not None:
            self.logprobs.append(logprobs)
        offset_before = len(self.text.text)
        released, stopped = self.text.push(data)
        self.span.push(decision.token, offset_before, self.text.text)
        return released, stopped

    def add_soft_input(self, weights: np.ndarray | None) -> None:
        """The last token's next input is a mixture with these weights (None: a vector,
        which has no effective count)."""
        self.soft_steps += 1
        self.soft_flags[-1] = True
        if weights is not None:
            self.effective_counts.append(float(1.0 / np.dot(weights, weights)))

    def take(self, request_id: int, decision: StepDecision, data: bytes, *, end_of_generation: bool,
             max_tokens: int, context_full: bool, dist: Distribution | None,
             n_logprobs: int | None) -> StepEvent:
        """Record a final decision (its token's bytes `data`): the stop conditions, the
        output, the event (finish_reason set when the sequence ends here)."""
        event = self._take(request_id, decision, data, end_of_generation=end_of_generation, max_tokens=max_tokens,
                           context_full=context_full, dist=dist, n_logprobs=n_logprobs)
        return dataclasses.replace(event, latent=self._latent_markers()) if self.latent_pending else event

    def _take(self, request_id: int, decision: StepDecision, data: bytes, *, end_of_generation: bool,
              max_tokens: int, context_full: bool, dist: Distribution | None,
              n_logprobs: int | None) -> StepEvent:
        index = len(self.tokens)
        if end_of_generation:  # not part of the output: no log-probability either
            return self._finish(request_id, decision, index, "stop", self.text.finish())
        logprobs = token_logprobs(dist, decision.token, n_logprobs) if n_logprobs is not None and dist is not None else None
        thinking = self.span.in_span
        text, stopped = self.add(decision, data, logprobs)
        if stopped:
            return self._finish(request_id, decision, index, "stop", text, logprobs)
        if decision.final or len(self.tokens) >= max_tokens or context_full:
            return self._finish(request_id, decision, index, "length", text + self.text.finish(), logprobs)
        if decision.soft:
            self.add_soft_input(decision.mix_weights)
        return step_event(request_id, index, decision, text, decision.soft, None, logprobs, self.split(thinking))

    def _finish(self, request_id: int, decision: StepDecision, index: int, reason: str, text: str,
                logprobs: tuple[float, tuple] | None = None) -> StepEvent:
        return step_event(request_id, index, decision, text, False, reason, logprobs,
                          self.split(self.thinking_at(index), final=True))

    def error_event(self, request_id: int) -> StepEvent:
        """The last event of a sequence whose input could not be decoded."""
        return StepEvent(request_id, len(self.tokens), -1, self.text.finish(), False, 0.0, (), (),
                         finish_reason="error")

    def thinking_at(self, index: int) -> bool:
        return len(self.thinking_flags) > index and self.thinking_flags[index]

    def split(self, thinking: bool, final: bool = False) -> tuple[bool, str, str]:
        """(thinking, reasoning, content) of the text released so far."""
        reasoning, content = self.span.route(self.text.released, self.text.text, final=final)
        return thinking, reasoning, content

    def result(self, *, prompt_tokens: int, finish_reason: str, prefill_seconds: float, decode_seconds: float,
               cached_tokens: int) -> GenerationResult:
        reasoning, answer = self.span.split(self.text.text)
        return GenerationResult(
            text=self.text.text, tokens=self.tokens, prompt_tokens=prompt_tokens,
            finish_reason=finish_reason, soft_steps=self.soft_steps, entropies=self.entropies,
            prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
            effective_counts=self.effective_counts, soft_flags=self.soft_flags, logprobs=self.logprobs,
            cached_tokens=cached_tokens,
            reasoning=reasoning, answer=answer, think_tokens=self.span.think_tokens, thinking_flags=self.thinking_flags,
            logprob_sum=self.logprob_sum, latent_steps=self.latent_steps,
        )


def step_event(request_id: int, index: int, d: StepDecision, text: str, soft: bool, reason: str | None,
               logprobs: tuple[float, tuple] | None = None, split: tuple[bool, str, str] = (False, "", "")) -> StepEvent:
    """The StepEvent of a decision (ndarray.tolist() gives the same Python ints/floats as
    int()/float() per element, in one C call)."""
    mixture = soft and d.mix_ids is not None  # a Vector input has no rows to name
    mix_ids = _ints(d.mix_ids) if mixture else ()
    mix_w = _floats(d.mix_weights) if mixture else ()
    return StepEvent(
        request_id, index, d.token, text, soft, float(d.entropy),
        _ints(d.top_ids), _floats(d.top_probs), mix_ids, mix_w, reason,
        *(logprobs or (None, ())), *split,
    )


def _ints(values) -> tuple[int, ...]:
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return tuple(values.tolist())
    return tuple(int(v) for v in values)


def _floats(values) -> tuple[float, ...]:
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return tuple(values.tolist())
    return tuple(float(v) for v in values)
