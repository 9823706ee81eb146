"""The OpenAI request and response schema: request bodies (or API keyword arguments)
validated into `PreparedRequest`s, and `chat.completion` / `text_completion` bodies and
streamed chunks built from generation results, each with a `selar` field.

Streamed chunks carry per-token data only when the request sets `"selar_trace": true`
(see `ChunkWriter.event`), so ordinary OpenAI clients get ordinary chunks."""
from __future__ import annotations

import dataclasses
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from selar_local import structured, tool_calls
from selar_local.errors import ContextOverflowError, InvalidParameterError, SelarError, UnsupportedModelError
from selar_local.generate import GenerationResult, StepEvent
from selar_local.params import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, DecodeParams
from selar_local.methods import REGISTRY
from selar_local.turns import total_prompt_tokens

# DecodeParams fields a request may set by their own name (SeLaR's and the sampler's).
# (`logprobs` is OpenAI's own field, with its own meaning per endpoint: handled below.)
DECODE_FIELDS = tuple(f.name for f in dataclasses.fields(DecodeParams) if f.name != "logprobs")
MAX_MESSAGES = 1024          # messages per chat request
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions `logprobs`, as OpenAI
# OpenAI fields that are accepted but only in their neutral form (anything else is an error,
# so that a client never silently gets something other than what it asked for).
_NEUTRAL_FIELDS: dict[str, Callable[[Any], bool]] = {
    "frequency_penalty": lambda v: v in (None, 0, 0.0),
    "presence_penalty": lambda v: v in (None, 0, 0.0),
    "logit_bias": lambda v: not v,
    "tools": lambda v: True,  # tool_calls.py
    "functions": lambda v: not v,
    "tool_choice": lambda v: True,
    "function_call": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": lambda v: True,
    "response_format": lambda v: True,  # structured.py
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: not v,
    "user": lambda v: True,
    "metadata": lambda v: True,
    "store": lambda v: v in (None, False),
    "service_tier": lambda v: True,
    "modalities": lambda v: v in (None, ["text"]),
}
_COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
                  "top_p", "stop", "seed", "n", "logprobs", "selar_trace"}
# chat_template_kwargs: variables for the model's Jinja template, as llama-server takes
# them (e.g. {"enable_thinking": false} for Qwen3-style templates).
CHAT_FIELDS = frozenset(_COMMON_FIELDS | {"messages", "top_logprobs", "chat_template_kwargs"} | set(_NEUTRAL_FIELDS)
                        | set(DECODE_FIELDS))
COMPLETION_FIELDS = frozenset(_COMMON_FIELDS | {"prompt", "echo"} | set(_NEUTRAL_FIELDS) | set(DECODE_FIELDS))
_ROLES = ("system", "developer", "user", "assistant", "tool")


# ----------------------------------------------------------------------------- errors


class RequestError(InvalidParameterError):
    """A request the server answers with 4xx: says which parameter and why."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status

_PARAM_IN_MESSAGE = re.compile(r"^(?:invalid (\w+)=|(grammar|json_schema): )")


def as_request_error(exc: Exception) -> RequestError:
    """Map the runtime's user errors to a RequestError carrying param and code."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, ContextOverflowError):
        return RequestError(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, UnsupportedModelError):
        return RequestError(str(exc), param="method", code="unsupported_method")
    match = _PARAM_IN_MESSAGE.match(str(exc))
    return RequestError(str(exc), param=(match.group(1) or match.group(2)) if match else None, code="invalid_value")

# --------------------------------------------------------------------- request building


@dataclass
class PreparedRequest:
    """A validated request: its tokens, decoding parameters and how to answer it."""

    kind: str  # "chat" or "completion"
    prompt_tokens: list[int]
    choices: list[DecodeParams]  # one per choice (OpenAI `n`), each with its own seed
    stream: bool = False
    include_usage: bool = False
    echo_text: str | None = None
    model: str = ""
    # selar_trace: how to show a token id (the model's vocabulary); None = no per-token data
    token_text: Callable[[int], str] | None = None
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    logprobs: bool = False  # answer with log-probabilities (the choices' params carry how many)
    tools: Any = None  # tool_calls.ToolRequest: parse the answer's tool calls

    @property
    def params(self) -> DecodeParams:
        """The first choice's parameters (the only ones when n = 1)."""
        return self.choices[0]


def _content_text(content: Any, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones can be honoured
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise RequestError(f"messages[{index}].content: only text parts are supported, not {kind!r}",
                                   param=f"messages[{index}].content")
        return "".join(texts)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts",
                       param=f"messages[{index}].content")


def normalise_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise RequestError(f"{len(messages)} messages: at most {MAX_MESSAGES} per request", param="messages",
                           code="too_many_messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages[{i}]")
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(_ROLES)}, not {role!r}",
                               param=f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content_text(message.get("content"), i),
                    **{k: message[k] for k in ("tool_calls", "tool_call_id", "name") if message.get(k) is not None}})
    return tool_calls.check_history(out)


class RequestBuilder:
    """Turns OpenAI request bodies (or API keyword arguments) into PreparedRequests."""

    def __init__(self, runtime, *, model_id: str, auto_tau: Callable[[DecodeParams], float],
                 default_stop: Sequence[str] = (), aliases: Sequence[str] = ()):
        """auto_tau(params): the calibrated tau for a request's sampler (tau "auto")."""
        self.runtime = runtime
        self.auto_tau = auto_tau
        self.max_choices = runtime.n_parallel  # the choices of one request decode together
        self.model_id = model_id
        self.default_stop = tuple(default_stop)
        self.aliases = frozenset({model_id, *aliases})

    def check_model(self, model: Any) -> None:
        if model is None or model == "":
            return
        if model not in self.aliases:
            raise RequestError(f"model {model!r} is not served here; this server serves {self.model_id!r}",
                               param="model", code="model_not_found", status=404)

    def chat(self, body: Mapping[str, Any]) -> PreparedRequest:
        self._check_fields(body, CHAT_FIELDS)
        self.check_model(body.get("model"))
        messages = normalise_messages(body.get("messages"))
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
            raise RequestError("'chat_template_kwargs' must be an object whose keys are template variable names",
                               param="chat_template_kwargs")
        reserved = sorted({"messages", "add_generation_prompt", "bos_token", "eos_token", "tools"} & set(kwargs))
        if reserved:
            raise RequestError(f"'chat_template_kwargs' cannot set {', '.join(reserved)} (set by the server)",
                               param="chat_template_kwargs")
        tools = tool_calls.check_tools(body, self.runtime.model.chat_template())
        rendered = list(tools.tools) if tools and tools.choice != "none" else None
        try:
            method = body.get("method")  # latentmas: its roles' turns (a turns.TurnPrompt)
            tokens = self.runtime.encode(messages=messages, tools=rendered, template_kwargs=dict(kwargs),
                                         method=method if isinstance(method, str) and method in REGISTRY else None)
        except InvalidParameterError as exc:
            raise as_request_error(exc) from exc
        except SelarError as exc:
            raise RequestError(f"cannot format these messages with the model's chat template: {exc}",
                               param="messages") from exc
        return self._prepared("chat", body, tokens, tools if rendered else None)

    def completion(self, body: Mapping[str, Any]) -> PreparedRequest:
        self._check_fields(body, COMPLETION_FIELDS)
        self.check_model(body.get("model"))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("'prompt' is empty", param="prompt")
            tokens, text = self.runtime.encode(prompt), prompt
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            n_vocab = self.runtime.model.n_vocab
            if any(not 0 <= t < n_vocab for t in prompt):
                raise RequestError(f"'prompt' token ids must be in [0, {n_vocab})", param="prompt")
            tokens, text = list(prompt), None
        elif isinstance(prompt, list) and len(prompt) > 1:
            raise RequestError("one prompt per request: batches of prompts are not supported "
                               "(send them as separate, concurrent requests)", param="prompt")
        else:
            raise RequestError("'prompt' must be a non-empty string or a list of token ids", param="prompt")
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise RequestError("'echo' must be true or false", param="echo")
        prepared = self._prepared("completion", body, tokens)
        if echo:
            prepared.echo_text = text if text is not None else self.runtime.model.detokenize(tokens)
        return prepared

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _check_fields(body: Mapping[str, Any], allowed: frozenset) -> None:
        if not isinstance(body, Mapping):
            raise RequestError("the request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise RequestError(f"unrecognized request argument(s): {', '.join(unknown)} (SeLaR parameters: "
                               f"{', '.join(DECODE_FIELDS)})", param=unknown[0], code="unknown_parameter")
        for name, neutral in _NEUTRAL_FIELDS.items():
            if name in body and not neutral(body[name]):
                raise RequestError(f"{name}={body[name]!r} is not supported by selar-local "
                                   f"(only its neutral value is accepted)", param=name, code="unsupported_parameter")

    def _prepared(self, kind: str, body: Mapping[str, Any], tokens: list[int], tools=None) -> PreparedRequest:
        n = body.get("n")
        n = 1 if n is None else n
        if not _is_int(n) or not 1 <= n <= self.max_choices:
            raise RequestError(f"invalid n={n!r}: expected an integer in [1, {self.max_choices}] (the choices of "
                               f"one request decode together; this server runs {self.max_choices} sequences at once)",
                               param="n", code="invalid_value")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be true or false", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, Mapping) or set(options) - {"include_usage"}:
            raise RequestError("'stream_options' supports only include_usage", param="stream_options")
        try:
            self.runtime.check_prompt_fits(total_prompt_tokens(tokens))
        except ContextOverflowError as exc:
            raise RequestError(str(exc), param="messages" if kind == "chat" else "prompt",
                               code="context_length_exceeded") from exc
        n_logprobs = self._logprobs(kind, body)
        params = self._decode_params(body, total_prompt_tokens(tokens)).replace(logprobs=n_logprobs)
        params = structured.with_tool_grammar(params, tools)
        structured.check_constraint(self.runtime.model, params)
        try:
            self.runtime.require_method(params.method)
            self.runtime.check_thinking_params(params)
        except (UnsupportedModelError, InvalidParameterError) as exc:
            raise as_request_error(exc) from exc
        trace = body.get("selar_trace", False)
        if trace not in (None, True, False):
            raise RequestError("'selar_trace' must be true or false", param="selar_trace")
        if trace and not stream:
            raise RequestError("'selar_trace' describes streamed chunks: it needs stream=true", param="selar_trace")
        # Choice i samples with seed + i: a seeded request replays exactly, and its choices differ.
        choices = [params.replace(seed=(params.seed + i) % (1 << 63)) for i in range(n)]
        return PreparedRequest(kind, tokens, choices, stream=stream, include_usage=bool(options.get("include_usage")),
                               model=self.model_id, logprobs=n_logprobs is not None,
                               token_text=self.runtime.model.token_text if trace else None, tools=tools,
                               id=("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24])

    @staticmethod
    def _logprobs(kind: str, body: Mapping[str, Any]) -> int | None:
        """Alternatives per token, or None for no log-probabilities. Chat: `logprobs` is a
        boolean and `top_logprobs` (0-20) the count; completions: `logprobs` is the count (0-5)."""
        if kind == "chat":
            wanted, top = body.get("logprobs"), body.get("top_logprobs")
            if wanted is not None and not isinstance(wanted, bool):
                raise RequestError(f"invalid logprobs={wanted!r}: expected true or false", param="logprobs")
            if top is not None and (not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
                raise RequestError(f"invalid top_logprobs={top!r}: expected an integer in [0, {MAX_TOP_LOGPROBS}]",
                                   param="top_logprobs")
            if top is not None and not wanted:
                raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
            return (top or 0) if wanted else None
        count = body.get("logprobs")
        if count is None:
            return None
        if not _is_int(count) or not 0 <= count <= MAX_COMPLETION_LOGPROBS:
            raise RequestError(f"invalid logprobs={count!r}: expected an integer in [0, {MAX_COMPLETION_LOGPROBS}]",
                               param="logprobs")
        return count

    def _decode_params(self, body: Mapping[str, Any], n_prompt: int) -> DecodeParams:
        values: dict[str, Any] = {k: body[k] for k in DECODE_FIELDS if body.get(k) is not None}
        if "seed" not in values:  # OpenAI: an unseeded request is sampled afresh (the response says the seed)
            values["seed"] = secrets.randbelow(1 << 31)
        for flag in ("greedy", "thinking_only", "ignore_eos"):
            if flag in values and not isinstance(values[flag], bool):
                raise RequestError(f"invalid {flag}={values[flag]!r}: expected true or false", param=flag)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        room = self.runtime.context.n_ctx - n_prompt
        if max_tokens is None:
            max_tokens = room  # OpenAI: up to the end of the context
        elif not _is_int(max_tokens) or max_tokens < 1:
            raise RequestError(f"invalid max_tokens={max_tokens!r}: expected an integer >= 1", param="max_tokens")
        values["max_tokens"] = max(1, min(max_tokens, room))
        temperature = body.get("temperature")
        if temperature is not None:
            if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
                raise RequestError(f"invalid temperature={temperature!r}: expected a number in [0, 2] "
                                   "(0 = greedy)", param="temperature")
            if temperature == 0:
                values["greedy"] = True
                values.pop("temperature", None)
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise RequestError("'stop' must be a string or a list of strings", param="stop")
        room_for_stops = MAX_STOP_STRINGS - len(self.default_stop)  # the model's own stop strings count too
        if len(stop) > room_for_stops:  # before anything iterates over them
            raise RequestError(f"{len(stop)} stop strings: at most {room_for_stops} for this model", param="stop",
                               code="invalid_value")
        values["stop"] = tuple(dict.fromkeys([s for s in stop if s] + list(self.default_stop)))
        values.update(structured.constraint_fields(body))  # response_format -> json_schema
        try:
            # The model's recommended sampler (and registry tau) where the request names none;
            # filling validates the request's values, so its errors are the request's too.
            values = self.runtime.sampler.fill(values)
            auto = isinstance(values.get("tau"), str) and values["tau"].strip().lower() == "auto"
            params = DecodeParams(**{**values, "tau": 0.5} if auto else values)
        except (InvalidParameterError, TypeError) as exc:
            raise as_request_error(exc) from exc
        return params.replace(tau=self.auto_tau(params)) if auto else params


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------- response shapes


def selar_summary(params: DecodeParams, result: GenerationResult) -> dict[str, Any]:
    counts = result.effective_counts
    summary = {
        "method": params.method,
        "seed": params.seed,  # replay a sampled answer by sending this seed
        "soft_steps": result.soft_steps,
        "soft_share": round(result.soft_share, 6),
        "mean_entropy": round(result.mean_entropy, 6),
        "mean_effective_tokens": round(sum(counts) / len(counts), 6) if counts else None,
        "prefill_seconds": round(result.prefill_seconds, 6),
        "decode_seconds": round(result.decode_seconds, 6),
        "tokens_per_second": round(result.tokens_per_second, 3),
    }
    if params.method == "selar":
        summary.update(tau=params.tau, lam=params.lam, ks=params.ks)
    if "latent_steps" in REGISTRY[params.method].fields:  # latent, latentmas
        summary.update(latent_steps=result.latent_steps, latent_align=params.latent_align,
                       latent_noise=params.latent_noise)
    return summary


def usage(req: PreparedRequest, results: Sequence[GenerationResult]) -> dict[str, Any]:
    """The prompt counts once (it is prefilled once for all choices); cached_tokens, as
    OpenAI's: the prompt tokens whose KV cells came from the prompt cache."""
    completion = sum(r.completion_tokens for r in results)
    prompt = total_prompt_tokens(req.prompt_tokens)
    cached = min((r.cached_tokens for r in results), default=0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class LogprobFormatter:
    """OpenAI's two log-probability shapes from (token, log p, alternatives) records.

    Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
    Completions: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}.
    The log-probabilities are those of the filtered distribution the token was drawn from
    (temperature, top-k, top-p, min-p applied), not of the raw model."""

    def __init__(self, model, kind: str):
        self.model = model
        self.kind = kind

    def _piece(self, token: int) -> tuple[str, list[int]]:
        data = self.model.token_bytes(token)
        return data.decode("utf-8", errors="replace"), list(data)

    def chat_entry(self, token: int, logprob: float, top: Sequence[tuple[int, float]]) -> dict[str, Any]:
        text, data = self._piece(token)
        alternatives = []
        for alt, alt_lp in top:
            alt_text, alt_data = self._piece(alt)
            alternatives.append({"token": alt_text, "logprob": alt_lp, "bytes": alt_data})
        return {"token": text, "logprob": logprob, "bytes": data, "top_logprobs": alternatives}

    def block(self, tokens: Sequence[int], records: Sequence[tuple[float, tuple]], offset: int = 0) -> dict[str, Any]:
        if self.kind == "chat":
            return {"content": [self.chat_entry(t, lp, top) for t, (lp, top) in zip(tokens, records)]}
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, (lp, top) in zip(tokens, records):
            text, _ = self._piece(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({self._piece(alt)[0]: alt_lp for alt, alt_lp in top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out


def completion_response(req: PreparedRequest, results: Sequence[GenerationResult], model=None) -> dict[str, Any]:
    """The non-streaming body: chat.completion or text_completion, one choice per result."""
    formatter = LogprobFormatter(model, req.kind) if req.logprobs else None
    choices = []
    for index, result in enumerate(results):
        logprobs = None
        if formatter is not None:
            offset = len(req.echo_text or "")
            logprobs = formatter.block(result.tokens[:len(result.logprobs)], result.logprobs, offset)
        if req.kind == "chat":
            message = {"role": "assistant", "content": result.content}
            if result.answer is not None:  # a thinking model: its reasoning apart (DeepSeek's convention)
                message["reasoning_content"] = result.reasoning
            finish = result.finish_reason
            if req.tools is not None:  # the model's tool-call syntax -> message.tool_calls
                content, calls = tool_calls.parse(req.tools.fmt, result.content, req.tools.tools)
                if calls:
                    message.update(content=content or None, tool_calls=[c.as_openai() for c in calls])
                    finish = "tool_calls"
            choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
        else:
            choices.append({"index": index, "text": (req.echo_text or "") + result.text, "logprobs": logprobs,
                            "finish_reason": result.finish_reason})
    body = {"id": req.id, "object": "chat.completion" if req.kind == "chat" else "text_completion",
            "created": req.created, "model": req.model, "choices": choices, "usage": usage(req, results),
            "selar": selar_summary(req.choices[0], results[0])}
    if len(results) > 1:
        body["selar"]["choices"] = [selar_summary(p, r) for p, r in zip(req.choices, results)]
        body["selar"]["vote"] = vote_summary(results, req.choices[0].vote)
    return body


VOTE_FORMAT = "gsm8k"  # answers read as the last \boxed{}, else the last number in the text


def vote_summary(results: Sequence[GenerationResult], kind: str = "majority") -> dict[str, Any]:
    """Self-consistency over the n choices: their answers and the winner of the request's
    `vote` (majority, ties to the most confident choice by mean log-probability; or weighted
    by exp(mean log-probability))."""
    from selar_local.runtime import SelfConsistencyResult

    vote = SelfConsistencyResult.from_results(results, VOTE_FORMAT, kind)
    return {"answer": vote.answer, "votes": vote.votes, "voters": vote.voters, "choice_index": vote.index,
            "answers": vote.answers, "vote": kind}


class ChunkWriter:
    """Builds the streamed chunks of one request, in order; with n > 1 the choices'
    chunks interleave, each carrying its `index`."""

    def __init__(self, req: PreparedRequest, model=None):
        self.req = req
        self.object = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
        self.formatter = LogprobFormatter(model, req.kind) if req.logprobs else None
        # log-probabilities of tokens whose text is still held back (a possible stop string)
        self._pending: dict[int, list[tuple[int, tuple[float, tuple]]]] = {}
        self._offset: dict[int, int] = {}
        self._results: dict[int, GenerationResult] = {}  # finished choices
        self._calls: dict[int, tool_calls.StreamedCalls] = {}  # with tools: text held while a call may start

    def _chunk(self, choice: dict | None, **extra: Any) -> dict[str, Any]:
        out = {"id": self.req.id, "object": self.object, "created": self.req.created, "model": self.req.model,
               "choices": [choice] if choice is not None else []}
        out.update(extra)
        return out

    def _choice(self, index: int, text: str | None, finish_reason: str | None, *, role: bool = False,
                reasoning: str = "") -> dict:
        logprobs = self._flush_logprobs(index, (text or "") + reasoning)
        if self.req.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if reasoning:
                delta["reasoning_content"] = reasoning
            if text is not None:
                delta["content"] = text
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}

    def _flush_logprobs(self, index: int, text: str | None) -> dict | None:
        pending = self._pending.pop(index, None)
        if not pending or self.formatter is None:
            return None
        offset = self._offset.get(index, len(self.req.echo_text or ""))
        self._offset[index] = offset + len(text or "")
        return self.formatter.block([t for t, _ in pending], [r for _, r in pending], offset)

    def opening(self) -> list[dict]:
        if self.req.kind == "chat":
            return [self._chunk(self._choice(i, "", None, role=True)) for i in range(len(self.req.choices))]
        if self.req.echo_text:
            return [self._chunk(self._choice(i, self.req.echo_text, None)) for i in range(len(self.req.choices))]
        return []

    def event(self, event: StepEvent, index: int = 0) -> dict | None:
        """A content chunk for one step of choice `index` (None when the step released no
        text yet). With selar_trace, every step gets a chunk (its text may be empty: a
        partial UTF-8 character, or a stop token) whose `selar` object describes that step."""
        if event.logprob is not None:
            self._pending.setdefault(index, []).append((event.token, (event.logprob, event.top_logprobs)))
        # Chat: the thinking span's text goes to delta.reasoning_content, the rest to
        # delta.content (llama-server's --reasoning-format deepseek); completions: raw text.
        content, reasoning = (event.content, event.reasoning) if self.req.kind == "chat" else (event.text, "")
        if self.req.token_text is not None:
            return self._chunk(self._choice(index, content if content or not reasoning else None, None,
                                            reasoning=reasoning), selar=token_trace(event, self.req.token_text))
        if self.req.tools is not None and content:
            calls = self._calls.setdefault(index, tool_calls.StreamedCalls(self.req.tools.fmt, self.req.tools.tools))
            content = calls.push(content)
        if not content and not reasoning:
            return None
        return self._chunk(self._choice(index, content if content else None, None, reasoning=reasoning))

    def _tool_chunks(self, index: int, result: GenerationResult) -> tuple[list[dict], str]:
        """With tools: the held text as content, or the calls' deltas; and the finish reason."""
        held = self._calls.pop(index, None)
        if held is None:
            return [], result.finish_reason
        content, calls = held.finish()
        out = [self._chunk(self._choice(index, content, None))] if content else []
        if not calls:
            return out, result.finish_reason
        for delta in tool_calls.StreamedCalls.deltas(calls):
            out.append(self._chunk({"index": index, "delta": {"tool_calls": [delta]}, "logprobs": None,
                                    "finish_reason": None}))
        return out, "tool_calls"

    def choice_closing(self, result: GenerationResult, index: int = 0) -> dict:
        """The chunk that ends choice `index` (its finish_reason and `selar` summary)."""
        return self._chunk(self._choice(index, None if self.req.kind == "chat" else "", result.finish_reason),
                           selar=selar_summary(self.req.choices[index], result))

    def vote_chunk(self, results: Sequence[GenerationResult]) -> list[dict]:
        """With n > 1: a chunk without choices whose `selar.vote` is the self-consistency vote."""
        if len(results) < 2:
            return []
        return [self._chunk(None, selar={"vote": vote_summary(results, self.req.choices[0].vote)})]

    def usage_chunk(self, results: Sequence[GenerationResult]) -> list[dict]:
        return [self._chunk(None, usage=usage(self.req, results))] if self.req.include_usage else []

    def feed(self, index: int, kind: str, payload: Any) -> list[dict]:
        """The chunks one item of choice `index` brings: an "event" (a step) or "done" (its
        result); after the last choice's result, the vote and usage chunks too. The API's
        iterator and the server's event stream both read their items through this."""
        if kind == "event":
            chunk = self.event(payload, index)
            return [chunk] if chunk is not None else []
        self._results[index] = payload
        out, finish = self._tool_chunks(index, payload)
        closing = self.choice_closing(payload, index)
        closing["choices"][0]["finish_reason"] = finish
        out.append(closing)
        if self.finished:
            ordered = [self._results[i] for i in range(len(self.req.choices))]
            out += self.vote_chunk(ordered) + self.usage_chunk(ordered)
        return out

    @property
    def finished(self) -> bool:
        """Every choice has its result."""
        return len(self._results) == len(self.req.choices)


def token_trace(event: StepEvent, token_text: Callable[[int], str]) -> dict[str, Any]:
    """The `selar` object of a traced chunk (documented in the README): the step's token,
    its gate entropy, whether the NEXT input is a soft mixture, the top-k candidates with
    their probabilities (renormalised over the k), and on soft steps the mixture."""
    out: dict[str, Any] = {
        "index": event.index, "token": event.token, "token_text": token_text(event.token),
        "soft": event.soft, "entropy": round(event.entropy, 6) + 0.0,
        "top_ids": list(event.top_ids), "top_tokens": [token_text(t) for t in event.top_ids],
        "top_probs": [round(p, 6) + 0.0 for p in event.top_probs],
    }
    if event.soft:
        out.update(mix_ids=list(event.mix_ids), mix_tokens=[token_text(t) for t in event.mix_ids],
                   mix_weights=[round(w, 6) + 0.0 for w in event.mix_weights])
    if event.latent:  # the latent steps just before this token (no token of their own)
        out["latent"] = [marker.trace_record(token_text) for marker in event.latent]
    return out
