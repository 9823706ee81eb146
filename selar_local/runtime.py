"""A loaded model ready to decode: llama.cpp model and context, embedding rows, the
vocabulary facts the policies need, and the load-time soft-embedding self-check."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from selar_local.chat import render_chat
from selar_local.embeddings import EmbeddingTable, input_scale_for
from selar_local.engine import BuildInfo, LlamaContext, LlamaModel, available_cpus, rpc_in_use, set_verbose  # noqa: F401
from selar_local.engine import build_info as _engine_build_info
from selar_local.errors import ContextOverflowError, InvalidParameterError, UnsupportedModelError
from selar_local.generate import GenerationResult, StepEvent, generate_groups, generate_many, stream_tokens
from selar_local.kv_slots import SlotTable
from selar_local.mathsym import math_symbol_mask
from selar_local.methods import REGISTRY, feeds_soft_inputs
from selar_local.model_sampler import ModelSampler, model_sampler
from selar_local.params import DecodeParams
from selar_local.policies import TokenInfo
from selar_local.rpc import check_servers, parse_endpoints
from selar_local.thinking import SpanTokens, ThinkingMarkers, detect_markers, prompt_leaves_thinking

# Architectures whose embedding-input path differs from the token path in ways rows
# cannot fix: per-layer token inputs (gemma3n, gemma4). Token decoding (cot) still works
# on them. M-RoPE models (qwen2vl, qwen3vl, qwen35, ...) are not here: the engine gives
# their embedding batches the 4-plane positions llama.cpp expects, and the self-check
# proves it per model (docs/MODELS.md).
EMBEDDING_INPUT_UNSUPPORTED = {
    "gemma3n": "per-layer token embeddings are computed from token ids only",
    "gemma4": "per-layer token embeddings are computed from token ids only",
}
SELF_CHECK_TOLERANCE = 1e-3  # max |logit difference|; measured 0.0 on llama, qwen2, gemma3
# Injected by SwiReasoning past twice its switch budget (after </think> where the model has one).
SWIR_ANSWER_PREFIX = "\n\nThe final answer is"
# Prompt tokens per chunk while other sequences decode: one chunk should cost about as
# much as a few decode steps (on a CPU a prompt token costs about a fifth of a decode
# step: SmolLM2-135M on 2 cores, 2.2 ms against 11 ms; on a GPU a step is a few ms and a
# prompt token a few microseconds). Multiples of 64, because ggml's CPU matrix kernels
# compute tiles of rows along another path than the rows left over: 64-token chunks
# reproduced the unchunked prefill's logits to the bit on the tests' prompts, where 16-48
# tokens moved them by up to 0.6 (batch_runner.BatchRunner._decode_tokens).
PREFILL_CHUNK_CPU = 64
PREFILL_CHUNK_GPU = 256


def build_info() -> BuildInfo:
    """The llama.cpp build: version, system info, backends, GPU offload."""
    return _engine_build_info()


def default_prefill_chunk(gpu_offload: bool) -> int:
    return PREFILL_CHUNK_GPU if gpu_offload else PREFILL_CHUNK_CPU


@dataclass(frozen=True)
class SelfCheck:
    """Does feeding E[v] as an embedding reproduce the logits of feeding token v?"""

    passed: bool
    max_abs_diff: float
    scale: float
    detail: str


class Runtime:
    """Model + context + embedding rows. The public entry point of the Python API."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_parallel: int = 1,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        n_gpu_layers: int = -1,
        verbose: bool = False,
        embedding_cache_bytes: int = 64 << 20,
        think_tags: Sequence[str] | None = None,
        stop_strings: Sequence[str] = (),
        prefill_chunk: int | None = None,
        prompt_cache: bool = True,
        kv_unified: bool = False,
        rpc: str | Sequence[str] | None = None,
        tensor_split: Sequence[float] | None = None,
        cpu_repack: bool = True,
        sampler: "ModelSampler | None" = None,
    ):
        """n_threads: decode threads (default: half the CPUs); n_threads_batch: prompt
        threads (default: all CPUs); prefill_chunk: prompt tokens fed per step while other
        sequences decode (default 64 on CPU, 256 with GPU offload); prompt_cache: a slot
        keeps its cells for the next request that shares a prefix; kv_unified: one KV
        pool of n_ctx * n_parallel cells shared by all sequences instead of n_ctx each;
        sampler: the model's recommended sampler (default: its GGUF general.sampling.* keys
        and its registry entry's sampler=), used by default_params() and where params is None."""
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise InvalidParameterError(f"invalid prefill_chunk={prefill_chunk!r}: expected an integer >= 1")
        set_verbose(verbose)
        self.model_path = Path(model_path)
        self._latent_alignments: dict = {}  # kind -> alignment.LatentAlignment, on first use
        # RPC servers (llama.cpp's distributed backend, docs/DISTRIBUTED.md): checked here
        # first, since llama.cpp's client aborts the process on one that does not answer.
        endpoints = parse_endpoints(rpc)
        check_servers([e for e in endpoints if not rpc_in_use(str(e))])
        self.model = LlamaModel(model_path, n_gpu_layers=n_gpu_layers, rpc_servers=[str(e) for e in endpoints],
                                tensor_split=tensor_split, cpu_repack=cpu_repack)
        self.n_parallel = n_parallel
        self.context = LlamaContext(self.model, n_ctx=n_ctx, n_batch=max(n_batch, n_parallel),
                                    n_seq_max=n_parallel, n_threads=n_threads, n_threads_batch=n_threads_batch,
                                    kv_unified=kv_unified)
        offload = n_gpu_layers != 0 and self.build.gpu_backend
        self.prefill_chunk = prefill_chunk or default_prefill_chunk(offload)
        self.slots = SlotTable(n_parallel, enabled=prompt_cache)
        self.sampler = sampler if sampler is not None else model_sampler(self.model_path, self.model.metadata)
        # Stop strings every request gets (from the registry: e.g. a chat turn marker).
        self.stop_strings = tuple(stop_strings)
        # Thinking markers: the registry's (think_tags: () for a model without any), else
        # recognised from the vocabulary (<think>/</think>, gpt-oss's analysis channel).
        self.thinking_span = thinking_span_for(self.model, think_tags)
        span = self.thinking_span
        mask = math_symbol_mask(lambda s: self.model.tokenize(s, add_special=False, parse_special=False),
                                self.model.n_vocab)
        # Policies track single-token markers themselves; the loop's SpanTracker handles all.
        single = (span.single_open, span.single_close) if span is not None else (None, None)
        think_open, think_close = single if None not in single else (None, None)
        answer_prefix = tuple(self.model.tokenize(SWIR_ANSWER_PREFIX, add_special=False, parse_special=False))
        self.token_info = TokenInfo(self.model.n_vocab, mask, think_open, think_close, answer_prefix)
        self.table: EmbeddingTable | None = None
        self.self_check = self._load_embedding_rows(embedding_cache_bytes)

    # -- soft-embedding support ---------------------------------------------------------
    def _load_embedding_rows(self, cache_bytes: int) -> SelfCheck:
        arch = self.model.architecture
        if arch in EMBEDDING_INPUT_UNSUPPORTED:
            return SelfCheck(False, math.nan, 1.0, f"{arch}: {EMBEDDING_INPUT_UNSUPPORTED[arch]}")
        expected = input_scale_for(arch, self.model.n_embd_inp)
        self.table = EmbeddingTable(self.model_path, scale=expected, cache_bytes=cache_bytes)
        unreadable = self.table.unreadable
        if unreadable is not None:  # the model loads and decodes tokens; its rows cannot be fed
            self.table.close()
            self.table = None
            return SelfCheck(False, math.nan, expected, f"{unreadable} (llama.cpp can: token methods such as cot run)")
        if self.table.n_embd != self.model.n_embd_inp:
            return SelfCheck(False, math.nan, expected,
                             f"token_embd width {self.table.n_embd} != model input width {self.model.n_embd_inp}")
        diff = self._embedding_path_difference()
        if diff > SELF_CHECK_TOLERANCE:
            # The scale table may be out of date for a new architecture: try the other one.
            alternative = 1.0 if expected != 1.0 else math.sqrt(self.model.n_embd_inp)
            self.table.scale = alternative
            self.table._cache.clear()
            alt_diff = self._embedding_path_difference()
            if alt_diff <= SELF_CHECK_TOLERANCE:
                return SelfCheck(True, alt_diff, alternative,
                                 f"rows match with scale {alternative:g} (not the expected {expected:g})")
            self.table.scale = expected
            self.table._cache.clear()
            return SelfCheck(False, diff, expected,
                             f"embedding input differs from token input by up to {diff:.4g} logits")
        return SelfCheck(True, diff, expected, "embedding rows reproduce token logits")

    def _embedding_path_difference(self) -> float:
        """Feed a short prompt whose last token goes in once as a token, once as its row."""
        ctx = self.context
        probe = self.model.tokenize("The answer is", add_special=True)[-4:]
        prefix, last = probe[:-1], probe[-1]
        worst = 0.0
        try:
            outputs = []
            for as_embedding in (False, True):
                ctx.remove_sequence(0)
                if prefix:
                    ctx.decode_tokens(prefix, range(len(prefix)), [0] * len(prefix), [False] * len(prefix))
                pos = [len(prefix)]
                if as_embedding:
                    ctx.decode_embeddings(self.table.rows([last]), pos, [0], [True])
                else:
                    ctx.decode_tokens([last], pos, [0], [True])
                outputs.append(ctx.logits(0).copy())
            worst = float(np.max(np.abs(outputs[0] - outputs[1])))
        finally:
            ctx.remove_sequence(0)
        return worst

    @property
    def build(self) -> BuildInfo:
        return build_info()

    @property
    def threads(self) -> tuple[int, int]:
        """(decode threads, prompt threads) of the context."""
        return self.context.n_threads, self.context.n_threads_batch

    @property
    def soft_supported(self) -> bool:
        return self.self_check.passed

    def latent_alignment(self, kind: str = "ridge"):
        """The model's map from hidden state to input space (alignment.py), loaded once
        per kind (computed and cached per model file the first time)."""
        from selar_local.alignment import load_alignment

        if kind not in self._latent_alignments:
            self._latent_alignments[kind] = load_alignment(self.model_path, kind, n_hidden=self.model.n_embd)
        return self._latent_alignments[kind]

    def require_method(self, method: str) -> None:
        if feeds_soft_inputs(method) and not self.self_check.passed:
            raise UnsupportedModelError(
                f"method '{method}' feeds soft embeddings, which this model cannot take "
                f"({self.model.architecture}: {self.self_check.detail}); use --method cot"
            )

    # -- prompts ----------------------------------------------------------------------
    def chat_prompt(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    tools: Sequence[dict] | None = None, template_kwargs: dict | None = None) -> str:
        """Messages through the model's own Jinja chat template (sandboxed), with
        `tools` and template keyword arguments such as enable_thinking; llama.cpp's
        built-in engine where the template cannot be rendered."""
        return render_chat(self.model, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           template_kwargs=template_kwargs)

    def encode(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
               tools: Sequence[dict] | None = None, template_kwargs: dict | None = None,
               method: str | None = None) -> list[int]:
        """Tokens of a raw prompt, or of chat messages through the model's template; for a
        method whose prompt is several turns (latentmas), its turns (a turns.TurnPrompt)."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if messages is None:
            return self.model.tokenize(prompt, add_special=True, parse_special=True)
        if method is not None and REGISTRY[method].turns:
            if tools:
                raise InvalidParameterError(f"method '{method}' runs its own roles' turns: it takes no tools")
            return REGISTRY[method].turns_function()(self, messages, template_kwargs=template_kwargs)
        return chat_tokens(self.model, self.chat_prompt(messages, tools=tools, template_kwargs=template_kwargs))

    def check_prompt_fits(self, n_prompt_tokens: int) -> None:
        if n_prompt_tokens == 0:
            raise ContextOverflowError("the prompt is empty")
        if n_prompt_tokens + 1 > self.context.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {n_prompt_tokens} tokens but the context holds {self.context.n_ctx} "
                f"(per sequence); shorten the prompt or raise n_ctx (--n-ctx)"
            )

    def thinking_at_end(self, prompt_tokens: Sequence[int]) -> bool | None:
        """Whether the prompt leaves the model inside its thinking span; None without markers."""
        if self.thinking_span is None:
            return None
        return prompt_leaves_thinking(self.thinking_span, prompt_tokens)

    def check_thinking_params(self, params: DecodeParams) -> None:
        """A thinking budget needs a span to end."""
        if params.max_think_tokens is not None and self.thinking_span is None:
            raise InvalidParameterError(
                f"invalid max_think_tokens={params.max_think_tokens!r}: this model has no thinking markers "
                "(no <think> tokens, none in the registry), so there is no thinking span to budget")

    # -- generation -------------------------------------------------------------------
    def default_params(self, **changes) -> DecodeParams:
        """DecodeParams with this model's recommended sampler (see selar_local.model_sampler)
        where `changes` name none: what a call without params decodes with."""
        return DecodeParams(**self.sampler.fill(changes))

    def stream(self, prompt: str | None = None, params: DecodeParams | None = None, *,
               messages: Sequence[dict] | None = None, template_kwargs: dict | None = None) -> Iterator[StepEvent]:
        """Stream step events; the generator returns the GenerationResult at the end.
        template_kwargs: chat template variables, e.g. {"enable_thinking": False}."""
        params = params or self.default_params()
        tokens = self.encode(prompt, messages=messages, template_kwargs=template_kwargs, method=params.method)
        return stream_tokens(self, tokens, params)

    def generate(self, prompt: str | None = None, params: DecodeParams | None = None, *,
                 messages: Sequence[dict] | None = None, template_kwargs: dict | None = None) -> GenerationResult:
        stream = self.stream(prompt, params, messages=messages, template_kwargs=template_kwargs)
        while True:
            try:
                next(stream)
            except StopIteration as done:
                return done.value

    def generate_batch(self, prompts: Sequence[Sequence[int]], params, *, on_finish=None) -> list[GenerationResult]:
        from selar_local.frac import generate_by_control_vector  # a control vector is context-wide

        return generate_by_control_vector(generate_many, self, prompts, params, on_finish=on_finish)

    def generate_samples(self, prompt: str | None = None, params: DecodeParams | None = None, *,
                         messages: Sequence[dict] | None = None, samples: int = 5,
                         dataset: str = "gsm8k") -> "SelfConsistencyResult":
        """Latent self-consistency: `samples` sequences of one prompt decoded together (prefilled
        once), sample i with seed + i, and a vote (params.vote) over their extracted answers (`dataset`
        decides how answers are read and compared: "gsm8k" the last box else the last number,
        "math" boxed only, "gpqa_diamond" the option letter)."""
        from selar_local.vote import sample_seeds

        params = params or self.default_params()
        if not isinstance(samples, int) or isinstance(samples, bool) or not 1 <= samples <= self.n_parallel:
            raise InvalidParameterError(f"invalid samples={samples!r}: expected an integer in [1, n_parallel="
                                        f"{self.n_parallel}] (load with n_parallel >= samples)")
        group = [params.replace(seed=s) for s in sample_seeds(params.seed, samples)]
        results = generate_groups(self, [self.encode(prompt, messages=messages, method=params.method)], [group])[0]
        return SelfConsistencyResult.from_results(results, dataset, params.vote)

    def close(self) -> None:
        self.context.close()
        self.model.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def thinking_span_for(model: LlamaModel, think_tags: Sequence[str] | None) -> SpanTokens | None:
    """The model's thinking markers tokenised. think_tags: from the registry (an empty
    sequence: the model has none); None: recognise them from the vocabulary."""
    if think_tags is None:
        markers = detect_markers(model.single_token)
    elif len(think_tags) == 0:
        markers = None
    else:
        markers = ThinkingMarkers.from_tags(tuple(think_tags))
    if markers is None:
        return None
    return SpanTokens.build(markers, lambda text: model.tokenize(text, add_special=False, parse_special=True))


def chat_tokens(model: LlamaModel, text: str) -> list[int]:
    """Tokens of a rendered chat prompt with exactly the BOS the model wants, as
    llama-server does: where the vocabulary adds BOS itself, a BOS the template wrote
    is removed first (no double BOS); elsewhere the template's text is taken as is."""
    if model.add_bos:
        bos = model.token_text(model.bos_id) if model.bos_id >= 0 else ""
        if bos and text.startswith(bos):
            text = text[len(bos):]
        return model.tokenize(text, add_special=True, parse_special=True)
    return model.tokenize(text, add_special=False, parse_special=True)


@dataclass
class SelfConsistencyResult:
    """K samples of one prompt and their vote."""

    results: list[GenerationResult]
    answers: list[str | None]   # each sample's extracted answer
    answer: str | None          # the winning answer (as the chosen sample wrote it)
    index: int                  # the chosen sample: the most confident one with the winning answer
    votes: int
    voters: int

    @property
    def text(self) -> str:
        return self.results[self.index].text

    @classmethod
    def from_results(cls, results: Sequence[GenerationResult], dataset: str = "gsm8k",
                     vote: str = "majority") -> "SelfConsistencyResult":
        """vote: "majority" (one vote per sample) or "weighted" (by exp(mean log-probability))."""
        from selar_local.bench.grading import answer_key, extract_answer
        from selar_local.vote import vote as count_votes

        answers = [extract_answer(r.content, dataset) for r in results]  # after any thinking span
        vote = count_votes(vote, [answer_key(a, dataset) for a in answers], [r.mean_logprob for r in results])
        return cls(list(results), answers, answers[vote.index] if vote.key is not None else None, vote.index,
                   vote.votes, vote.voters)


def load(model: str | os.PathLike | None = None, **kwargs) -> Runtime:
    """Load a model by registry name or path (None: the embedded default model)."""
    from selar_local.registry import entry_for_path, resolve_model

    path = resolve_model(None if model is None else str(model))
    entry = entry_for_path(path)
    if entry is not None:  # the registry knows this model's conventions
        kwargs.setdefault("think_tags", entry.think_tags or ())  # `think=-`: no markers
        kwargs.setdefault("stop_strings", entry.stop_strings)
    return Runtime(path, **kwargs)
