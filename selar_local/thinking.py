"""Thinking spans: where a model's reasoning begins and ends, in the prompt and in the
output. Pure Python (no llama.cpp): the runtime tokenises the markers once, and each
sequence's `SpanTracker` follows its generated tokens.

A span opens in the prompt (R1-distill and Qwen3 templates can end the generation prompt
with `<think>\\n`) or in the output, and closes on the close marker, recognised by its
token ids (one special token such as R1's `</think>` = 151649, or gpt-oss's control
tokens, which render as no text at all) or by its text where a tokenizer splits it.
gpt-oss's analysis channel is a span too: `<|channel|>analysis<|message|>` ... `<|end|>`,
followed by the answer header `<|start|>assistant<|channel|>final<|message|>`.

The tracker also splits the output text into reasoning and content (the answer), with
the markers themselves in neither, as DeepSeek's API and llama-server's
`--reasoning-format deepseek` return them (`reasoning_content` and `content`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class ThinkingMarkers:
    """The texts around a model's reasoning. `answer` is what starts the answer after
    the close marker: a forced close (thinking budget, Cold Stop) emits close + answer,
    and the output split drops it from the content."""

    open: str
    close: str
    answer: str = ""

    @classmethod
    def from_tags(cls, tags: Sequence[str]) -> "ThinkingMarkers":
        if len(tags) not in (2, 3) or not all(tags[:2]):
            raise ValueError(f"thinking markers are OPEN,CLOSE[,ANSWER], got {tuple(tags)!r}")
        return cls(*tags)


THINK_TAGS = ThinkingMarkers("<think>", "</think>", "\n\n")
HARMONY_ANALYSIS = ThinkingMarkers("<|channel|>analysis<|message|>", "<|end|>",
                                   "<|start|>assistant<|channel|>final<|message|>")


def detect_markers(single_token: Callable[[str], int | None]) -> ThinkingMarkers | None:
    """Markers for a model the registry does not describe, from its vocabulary:
    `<think>`/`</think>` as single tokens, or gpt-oss's harmony control tokens."""
    if single_token("<think>") is not None and single_token("</think>") is not None:
        return THINK_TAGS
    if all(single_token(t) is not None for t in ("<|channel|>", "<|message|>", "<|end|>", "<|start|>")):
        return HARMONY_ANALYSIS
    return None


@dataclass(frozen=True)
class SpanTokens:
    """Markers with their token ids in one model's vocabulary."""

    markers: ThinkingMarkers
    open_ids: tuple[int, ...]
    close_ids: tuple[int, ...]
    answer_ids: tuple[int, ...] = ()

    @classmethod
    def build(cls, markers: ThinkingMarkers, tokenize: Callable[[str], list[int]]) -> "SpanTokens":
        """`tokenize(text)`: ids with special tokens parsed and no BOS added."""
        return cls(markers, tuple(tokenize(markers.open)), tuple(tokenize(markers.close)),
                   tuple(tokenize(markers.answer)) if markers.answer else ())

    @property
    def forced_close(self) -> tuple[int, ...]:
        """What a forced close emits: the close marker, then the answer's opening."""
        return self.close_ids + self.answer_ids

    @property
    def single_open(self) -> int | None:
        return self.open_ids[0] if len(self.open_ids) == 1 else None

    @property
    def single_close(self) -> int | None:
        return self.close_ids[0] if len(self.close_ids) == 1 else None


def _last_index(tokens: Sequence[int], pattern: tuple[int, ...]) -> int:
    n = len(pattern)
    for i in range(len(tokens) - n, -1, -1):
        if tuple(tokens[i:i + n]) == pattern:
            return i
    return -1


def prompt_leaves_thinking(span: SpanTokens, prompt_tokens: Sequence[int]) -> bool:
    """Whether the prompt ends inside a span (its last open marker has no close after it)."""
    last_open = _last_index(prompt_tokens, span.open_ids)
    return last_open >= 0 and _last_index(prompt_tokens[last_open:], span.close_ids) < 0


_BEFORE, _THINKING, _CLOSING, _ANSWER = "before", "thinking", "closing", "answer"
REASONING, CONTENT, MARKER = "reasoning", "content", "marker"


class SpanTracker:
    """Follows one sequence's output: whether it is inside the span now, how many tokens
    the span has had, and which characters of the output text are reasoning, content or
    marker. Without markers there is no span: everything is content, and `in_thinking`
    stays True (the whole answer is where latent steps may go, as before)."""

    def __init__(self, span: SpanTokens | None, thinking_at_start: bool = False):
        self.span = span
        self.think_tokens = 0  # tokens generated inside the span (markers excluded)
        self._no_reopen = False
        self._routed = 0
        if span is None:
            self._state = _ANSWER
            self._bounds: list[tuple[int, str]] = [(0, CONTENT)]
            return
        self._state = _THINKING if thinking_at_start else _BEFORE
        self._bounds = [(0, REASONING if thinking_at_start else CONTENT)]
        longest = max(len(span.open_ids), len(span.close_ids), 1)
        self._recent: deque[tuple[int, int]] = deque(maxlen=longest)  # (token, text offset before it)
        self._answer_progress = 0
        self._close_end = 0
        self._pending_from: int | None = None  # text from here may still become a marker
        self._begun = {REASONING: False, CONTENT: False}

    # -- state ------------------------------------------------------------------------
    @property
    def in_thinking(self) -> bool:
        """Inside the span now (always True for a model without markers)."""
        return self.span is None or self._state == _THINKING

    @property
    def in_span(self) -> bool:
        """Inside a real span, one that a close marker can end."""
        return self.span is not None and self._state == _THINKING

    @property
    def answer_header_next(self) -> int | None:
        """The next token of the answer header after a close marker (R1's "\\n\\n"), while
        it is due."""
        if self.span is None or self._state != _CLOSING:
            return None
        return self.span.answer_ids[self._answer_progress]

    def stay_in_answer(self) -> None:
        """From here on no span opens (a constrained answer has begun: text in it that reads
        as an open marker is answer)."""
        self._no_reopen = True

    @property
    def hold_strings(self) -> tuple[str, ...]:
        """Marker texts whose beginnings must be held back while streaming, so that text
        released as reasoning never turns out to be the start of a marker."""
        if self.span is None:
            return ()
        return tuple(m for m in (self.span.markers.open, self.span.markers.close) if m)

    # -- following the output ---------------------------------------------------------
    def push(self, token: int, offset_before: int, text: str) -> None:
        """After `token` has been appended: `text` is the whole output text now, which
        was `offset_before` characters long before this token."""
        span = self.span
        if span is None:
            return
        self._recent.append((token, offset_before))
        self._step(token, offset_before, text)
        self._pending_from = self._partial_marker_start()

    def _partial_marker_start(self) -> int | None:
        """Where the latest tokens begin a marker by id without completing it (their
        text, such as gpt-oss's channel name, must not be routed yet)."""
        if self._state == _CLOSING:
            return self._close_end
        ids = self.span.close_ids if self._state == _THINKING else self.span.open_ids
        for k in range(min(len(ids) - 1, len(self._recent)), 0, -1):
            if all(self._recent[-k + i][0] == ids[i] for i in range(k)):
                return self._recent[-k][1]
        return None

    def _step(self, token: int, offset_before: int, text: str) -> None:
        span = self.span
        if self._state == _THINKING:
            hit = self._find(span.close_ids, span.markers.close, offset_before, text)
            if hit is None:
                self.think_tokens += 1
                return
            start, end = hit
            self._bounds.append((start, MARKER))
            self._close_end = end
            self._answer_progress = 0
            if span.answer_ids:
                self._state = _CLOSING
            else:
                self._bounds.append((end, CONTENT))
                self._state = _ANSWER
        elif self._state == _CLOSING:
            if token == span.answer_ids[self._answer_progress]:
                self._answer_progress += 1
                if self._answer_progress == len(span.answer_ids):
                    self._bounds.append((len(text), CONTENT))
                    self._state = _ANSWER
            else:  # not the expected header: the answer starts right after the close
                self._bounds.append((self._close_end, CONTENT))
                self._state = _ANSWER
                self._look_for_open(offset_before, text)
        else:
            self._look_for_open(offset_before, text)

    def _look_for_open(self, offset_before: int, text: str) -> None:
        if self._no_reopen:
            return
        hit = self._find(self.span.open_ids, self.span.markers.open, offset_before, text)
        if hit is not None:
            self._bounds.append((hit[0], MARKER))
            self._bounds.append((hit[1], REASONING))
            self._state = _THINKING

    def _find(self, ids: tuple[int, ...], marker: str, offset_before: int, text: str) -> tuple[int, int] | None:
        """The marker's character range if the latest tokens complete it: by token ids
        (special tokens, which may render as no text), else by text (split markers)."""
        n = len(ids)
        if n and len(self._recent) >= n and all(self._recent[-n + i][0] == ids[i] for i in range(n)):
            return max(self._recent[-n][1], self._bounds[-1][0]), len(text)
        if marker:
            start = max(self._bounds[-1][0], offset_before - len(marker) + 1, 0)
            i = text.find(marker, start)
            if i >= 0:
                return i, i + len(marker)
        return None

    # -- splitting the text -----------------------------------------------------------
    def _pieces(self, start: int, end: int, text: str):
        bounds = self._bounds
        for k, (b_start, kind) in enumerate(bounds):
            b_end = bounds[k + 1][0] if k + 1 < len(bounds) else len(text)
            lo, hi = max(start, b_start), min(end, b_end)
            if lo < hi:
                yield kind, text[lo:hi]

    def route(self, upto: int, text: str, *, final: bool = False) -> tuple[str, str]:
        """Reasoning and content among text[previous upto : upto] (streaming deltas;
        whitespace at the start of each is dropped, as the final split does). Text that
        may still turn out to be a marker waits, unless this is the final call."""
        if self.span is None:
            out = text[self._routed:upto]
            self._routed = max(self._routed, upto)
            return "", out
        if not final and self._pending_from is not None:
            upto = min(upto, self._pending_from)
        if final:
            self._settle()
        out = {REASONING: [], CONTENT: []}
        for kind, piece in self._pieces(self._routed, upto, text):
            if kind == MARKER:
                continue
            if not self._begun[kind]:
                piece = piece.lstrip()
                self._begun[kind] = bool(piece)
            out[kind].append(piece)
        self._routed = max(self._routed, upto)
        return "".join(out[REASONING]), "".join(out[CONTENT])

    def _settle(self) -> None:
        if self._state == _CLOSING:  # ended inside the answer header: what follows the close is content
            self._bounds.append((self._close_end, CONTENT))
            self._state = _ANSWER

    def split(self, text: str) -> tuple[str, str | None]:
        """(reasoning, answer) of the whole output; answer None without markers."""
        if self.span is None:
            return "", None
        self._settle()
        parts = {REASONING: [], CONTENT: [], MARKER: []}
        for kind, piece in self._pieces(0, len(text), text):
            parts[kind].append(piece)
        return "".join(parts[REASONING]).strip(), "".join(parts[CONTENT]).strip()
