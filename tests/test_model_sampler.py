"""The model's recommended sampler: GGUF general.sampling.* keys and the registry's sampler=,
filling only what the user leaves unset (command line, request, Python API)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pull_helpers import write_registry

from selar_local.commands.common import add_decode_arguments, explicit_sampler, params_from_args
from selar_local.model_sampler import ModelSampler, model_sampler, parse_sampler_field
from selar_local.params import DecodeParams
from selar_local.registry import load_registry

SAMPLING_KV = {"general.sampling.temp": 0.8, "general.sampling.top_k": 40, "general.sampling.top_p": 0.9}
FROM_GGUF = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}


def _registry(tmp_path: Path, fields: str = ""):
    return load_registry(write_registry(tmp_path, f"m  sha256=-  size=-  arch=llama  hf=o/r/m.gguf {fields}\n"))


def test_parse_sampler_field_types_each_value():
    assert parse_sampler_field("temperature:1.0,top_k:64,top_p:0.95,min_p:0.05") == (
        ("temperature", 1.0), ("top_k", 64), ("top_p", 0.95), ("min_p", 0.05))
    assert isinstance(dict(parse_sampler_field("top_k:64"))["top_k"], int)


def test_gguf_keys_fill_and_the_registry_wins_where_both_speak(tmp_path):
    path = tmp_path / "m.gguf"
    gguf = {"general.sampling.temp": "0.800000", "general.sampling.top_k": "40"}  # as llama.cpp prints them
    alone = model_sampler(path, gguf.get, registry={})
    assert alone.values == {"temperature": 0.8, "top_k": 40} and set(alone.sources.values()) == {"GGUF"}
    both = model_sampler(path, gguf.get, registry=_registry(tmp_path, "sampler=top_k:64,min_p:0.05"))
    assert both.values == {"temperature": 0.8, "top_k": 64, "min_p": 0.05}
    assert both.sources == {"temperature": "GGUF", "top_k": "registry m", "min_p": "registry m"}
    assert "top_k 64, min_p 0.05 (registry m)" in both.describe()
    assert model_sampler(path, {}.get, registry={}).values == {}


def test_the_two_readers_of_a_float32_agree(tmp_path):
    import numpy as np

    as_float32 = {"general.sampling.top_p": float(np.float32(0.95))}  # the header walk: 0.949999988079071
    as_printed = {"general.sampling.top_p": "0.950000"}              # llama_model_meta_val_str
    assert model_sampler(tmp_path / "m.gguf", as_float32.get, registry={}).values == {"top_p": 0.95}
    assert model_sampler(tmp_path / "m.gguf", as_printed.get, registry={}).values == {"top_p": 0.95}


def test_invalid_gguf_values_are_ignored_with_a_warning(tmp_path, caplog):
    bad = {"general.sampling.temp": "0.000000", "general.sampling.top_k": "2", "general.sampling.top_p": "x",
           "general.sampling.min_p": "0.100000"}
    with caplog.at_level(logging.WARNING, logger="selar_local.model_sampler"):
        sampler = model_sampler(tmp_path / "m.gguf", bad.get, registry={})
    assert sampler.values == {"min_p": 0.1}  # temp 0 is llama.cpp's greedy; top-k 2 leaves ks=3 no room
    assert "general.sampling.temp" in caplog.text and "general.sampling.top_k" in caplog.text


def test_apply_keeps_what_the_user_gave():
    sampler = ModelSampler({"temperature": 1.0, "top_k": 64}, {"temperature": "GGUF", "top_k": "GGUF"})
    params = DecodeParams(temperature=0.3, seed=7)
    applied = sampler.apply(params, explicit={"temperature"})
    assert (applied.temperature, applied.top_k, applied.top_p, applied.seed) == (0.3, 64, 0.95, 7)
    assert sampler.apply(params).temperature == 1.0
    assert ModelSampler().apply(params) is params
    assert sampler.fill({"top_k": 20}) == {"temperature": 1.0, "top_k": 20}


def test_command_line_sampler_options_count_as_given_only_when_typed():
    parser = argparse.ArgumentParser()
    add_decode_arguments(parser)
    plain = parser.parse_args([])
    assert explicit_sampler(plain) == set()
    assert params_from_args(plain) == DecodeParams()  # the published settings until the model is known
    typed = parser.parse_args(["--temperature", "0.6", "--top-k", "8"])
    assert explicit_sampler(typed) == {"temperature", "top_k"}
    sampler = ModelSampler({"temperature": 1.0, "top_k": 64, "top_p": 0.8}, {})
    applied = sampler.apply(params_from_args(typed), explicit_sampler(typed))
    assert (applied.temperature, applied.top_k, applied.top_p) == (0.6, 8, 0.8)  # typed 0.6 kept, though the default


def test_a_gguf_with_sampling_keys_sets_the_runtimes_defaults(tiny_model):
    from selar_local.runtime import Runtime

    path = tiny_model("llama", SAMPLING_KV)
    assert model_sampler(path).values == FROM_GGUF  # read from the header, nothing loaded
    rt = Runtime(path, n_ctx=256)
    try:
        assert rt.sampler.values == FROM_GGUF  # read by llama.cpp
        defaults = rt.default_params(method="cot", max_tokens=4)
        assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.8, 40, 0.9)
        assert rt.default_params(temperature=0.2).temperature == 0.2
    finally:
        rt.close()
    plain = Runtime(tiny_model("llama"), n_ctx=256)
    try:
        assert plain.sampler.values == {} and plain.default_params() == DecodeParams()
    finally:
        plain.close()


def test_requests_and_bench_configs_take_the_models_sampler(tiny_model, tmp_path):
    from selar_local.api import Selar
    from selar_local.cli import build_parser
    from selar_local.commands.bench import _config_from_args
    from selar_local.runtime import Runtime

    path = tiny_model("llama", SAMPLING_KV)
    rt = Runtime(path, n_ctx=256)
    llm = Selar(runtime=rt)
    try:
        messages = [{"role": "user", "content": "Hi"}]
        default = llm.builder.chat({"messages": messages, "max_tokens": 2}).choices[0]
        assert (default.temperature, default.top_k, default.top_p) == (0.8, 40, 0.9)
        chosen = llm.builder.chat({"messages": messages, "max_tokens": 2, "temperature": 0.5, "top_k": 5}).choices[0]
        assert (chosen.temperature, chosen.top_k, chosen.top_p) == (0.5, 5, 0.9)
        assert llm.models()["data"][0]["meta"]["sampler"] == FROM_GGUF
    finally:
        llm.close()
        rt.close()
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n')
    common = ["bench", "--dataset", str(data), "--model", str(path), "--methods", "cot", "--out", str(tmp_path / "r")]
    config, _, _ = _config_from_args(build_parser().parse_args(common))
    assert {k: config.params[k] for k in FROM_GGUF} == FROM_GGUF  # what the run used, in its config
    config, _, _ = _config_from_args(build_parser().parse_args(common + ["--top-p", "0.95"]))
    assert config.params["top_p"] == 0.95 and config.params["temperature"] == 0.8
