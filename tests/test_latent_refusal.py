"""Issue 25: a model that cannot take fed vectors (its embedding-path self-check failed)
refuses the hidden-state methods clearly, at the loop, in the Python API and on the server
(HTTP 400 in OpenAI's error shape), while `cot` on the same runtime keeps answering, the
same tokens before and after the refusals.

The model is scripts/tiny_models.py's random-weight gemma3n: it computes per-layer inputs
from token ids, which no embedding row carries, so its self-check fails whatever the weights
(docs/MODELS.md). A model lacking the tables the alignment reads (no token_embd.weight, or
output and input tables of different vocabularies) cannot be loaded by llama.cpp at all;
alignment.load_alignment's own refusals of such files are tested in tests/test_alignment.py."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import _scripts

from selar_local.errors import UnsupportedModelError
from selar_local.params import DecodeParams

QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
REFUSED = [("latent", {}), ("latent", {"latent_steps": 0, "latent_align": "identity"}),
           ("selar", {"soft_source": "hidden"}), ("selar", {})]


@pytest.fixture(scope="module")
def failed_check(tiny_model):
    from selar_local.runtime import Runtime

    # No prompt cache: the cot runs before and after the refusals compute the same prefill.
    runtime = Runtime(tiny_model("gemma3n"), n_ctx=256, n_parallel=2, n_threads=1, prompt_cache=False)
    yield runtime
    runtime.close()


def _expected_message(method: str) -> str:
    return (f"method '{method}' feeds soft embeddings, which this model cannot take (gemma3n: gemma3n: per-layer "
            "token embeddings are computed from token ids only); use --method cot")


def test_the_self_check_failed_and_says_why(failed_check):
    check = failed_check.self_check
    assert not check.passed and not failed_check.soft_supported
    assert check.detail == "gemma3n: per-layer token embeddings are computed from token ids only"


def test_the_loop_refuses_the_hidden_state_methods_and_cot_still_answers(failed_check):
    cot = DecodeParams(method="cot", greedy=True, max_tokens=6, ignore_eos=True)
    before = failed_check.generate(messages=QUESTION, params=cot)
    for method, options in REFUSED:
        params = DecodeParams(method=method, greedy=True, max_tokens=6, **options)
        with pytest.raises(UnsupportedModelError) as refused:
            failed_check.generate(messages=QUESTION, params=params)
        assert str(refused.value) == _expected_message(method)
        with pytest.raises(UnsupportedModelError, match=f"method '{method}' feeds soft embeddings"):
            failed_check.generate_samples(messages=QUESTION, params=params, samples=2)
    after = failed_check.generate(messages=QUESTION, params=cot)
    assert len(before.tokens) == 6 and before.finish_reason == "length" and before.latent_steps == 0
    assert (after.tokens, after.text, after.finish_reason, after.soft_steps) == (
        before.tokens, before.text, before.finish_reason, 0)
    assert failed_check.slots.n_free == failed_check.n_parallel  # nothing held by the refused requests


def test_the_api_and_the_server_answer_400_and_cot_still_answers(failed_check):
    from fastapi.testclient import TestClient

    from selar_local.api import Selar
    from selar_local.openai_schema import RequestError
    from selar_local.server import create_app

    llm = Selar(runtime=failed_check)
    body = {"model": llm.model_id, "messages": QUESTION, "max_tokens": 4, "seed": 1, "ignore_eos": True}
    try:
        with pytest.raises(RequestError) as refused:
            llm.create_chat_completion(QUESTION, max_tokens=4, method="latent")
        assert (refused.value.param, refused.value.code, refused.value.status) == ("method", "unsupported_method", 400)
        assert str(refused.value) == _expected_message("latent")
        with TestClient(create_app(llm)) as client:
            for method, options in REFUSED:
                response = client.post("/v1/chat/completions", json={**body, "method": method, **options})
                assert response.status_code == 400
                assert response.json() == {"error": {
                    "message": _expected_message(method), "type": "invalid_request_error", "param": "method",
                    "code": "unsupported_method"}}
            ok = client.post("/v1/chat/completions", json={**body, "method": "cot", "n": 2}).json()
    finally:
        llm.close()
    assert [c["finish_reason"] for c in ok["choices"]] == ["length", "length"]
    assert ok["usage"]["completion_tokens"] == 8 and ok["selar"]["method"] == "cot"
    assert [c["seed"] for c in ok["selar"]["choices"]] == [1, 2]


# ----------------------------------------------- tables that llama.cpp runs and gguf-py cannot read

def _q1_0_bytes(values: np.ndarray) -> np.ndarray:
    """Rows [n, width] as Q1_0 blocks (an f16 scale, then one sign bit per value, 128 values a
    block): valid weights for llama.cpp, whatever they compute."""
    rows = values.reshape(values.shape[0], -1, 128)
    scale = np.abs(rows).mean(axis=2).astype(np.float16)[..., None].view(np.uint8)
    signs = np.packbits(rows > 0, axis=2, bitorder="little")
    return np.concatenate([scale, signs], axis=2).reshape(values.shape[0], -1)


@pytest.fixture(scope="module")
def one_bit_tables(tmp_path_factory, model_files):
    """A tiny llama (n_embd 128, so that a row is whole Q1_0 blocks) whose token_embd and output
    tables are Q1_0: llama.cpp decodes it, and the installed gguf-py cannot dequantise Q1_0."""
    from gguf import GGMLQuantizationType, GGUFWriter

    tiny_models, _ = _scripts()
    patch = pytest.MonkeyPatch()
    write_tensor = GGUFWriter.add_tensor

    def add_tensor(self, name, tensor, raw_shape=None, raw_dtype=None):
        if name in ("token_embd.weight", "output.weight"):
            return write_tensor(self, name, _q1_0_bytes(np.asarray(tensor, dtype=np.float32)),
                                raw_dtype=GGMLQuantizationType.Q1_0)
        return write_tensor(self, name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype)

    patch.setattr(tiny_models, "N_EMBD", 128)
    patch.setattr(tiny_models, "HEAD_DIM", 32)
    patch.setattr(GGUFWriter, "add_tensor", add_tensor)
    try:
        kv = tiny_models.read_tokenizer_kv(model_files["llama"])
        n_vocab = len(next(v for k, _, v, _ in kv if k == "tokenizer.ggml.tokens"))
        arch = next(a for a in tiny_models.ARCHITECTURES if (a.label or a.name) == "llama")
        path, _ = tiny_models.build(arch, tmp_path_factory.mktemp("q1_0"), kv, n_vocab)
    finally:
        patch.undo()
    return path


def test_one_bit_tables_load_refuse_the_fed_vector_methods_and_cot_answers(one_bit_tables):
    from selar_local.alignment import load_alignment
    from selar_local.runtime import Runtime

    runtime = Runtime(one_bit_tables, n_ctx=256, n_threads=1)
    try:
        reason = ("token_embd.weight is stored as Q1_0, which the installed gguf-py cannot dequantise "
                  "(llama.cpp can: token methods such as cot run)")
        assert not runtime.self_check.passed and runtime.self_check.detail == reason
        for method, options in REFUSED:
            with pytest.raises(UnsupportedModelError) as refused:
                runtime.generate(messages=QUESTION, params=DecodeParams(method=method, max_tokens=4, **options))
            assert str(refused.value) == (f"method '{method}' feeds soft embeddings, which this model cannot take "
                                          f"(llama: {reason}); use --method cot")
        answer = runtime.generate(messages=QUESTION, params=DecodeParams(method="cot", greedy=True, max_tokens=5,
                                                                         ignore_eos=True))
        assert len(answer.tokens) == 5 and answer.finish_reason == "length" and answer.soft_steps == 0
    finally:
        runtime.close()
    with pytest.raises(UnsupportedModelError, match=r"output.weight is stored as Q1_0, which the installed gguf-py "
                                                    r"cannot dequantise.*use a token-space method such as cot"):
        load_alignment(one_bit_tables)
