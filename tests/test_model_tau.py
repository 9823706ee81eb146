"""The registry's calibrated gate (models.txt `tau=`): its exact form, where it applies (the
user's tau, then the registry's under the sampler it was calibrated under, then the published
0.5), `selar calibrate --write-registry`, and what doctor, /v1/models and a bench config say."""
from __future__ import annotations

import argparse

import pytest
from pull_helpers import write_registry

from selar_local.calibrate import CALIBRATION_VERSION
from selar_local.commands.common import add_decode_arguments, explicit_sampler, params_from_args
from selar_local.model_sampler import ModelSampler, model_sampler
from selar_local.model_tau import RegistryTau, TauChoice, parse_tau_field, write_registry_tau
from selar_local.params import DecodeParams
from selar_local.registry import RegistryFormatError, load_registry

PUBLISHED = (("temperature", 0.6), ("top_k", 20), ("top_p", 0.95), ("min_p", 0.0), ("ks", 3))
FIELD = f"0.26@v{CALIBRATION_VERSION}:temperature:0.6,top_k:20,top_p:0.95,min_p:0,ks:3"


def test_the_tau_field_parses_exactly_and_formats_back():
    tau = parse_tau_field(FIELD)
    assert tau == RegistryTau(0.26, CALIBRATION_VERSION, PUBLISHED)
    assert isinstance(tau.settings_dict()["top_k"], int) and isinstance(tau.settings_dict()["ks"], int)
    assert tau.format() == FIELD
    assert parse_tau_field("0.8@v3:ks:3,min_p:0,top_p:0.95,top_k:20,temperature:0.6").settings == PUBLISHED


@pytest.mark.parametrize("text, message", [
    ("0.26", "is not TAU@vVERSION"),
    ("0.26@4:temperature:0.6", "is not TAU@vVERSION"),
    ("1.5@v4:temperature:0.6,top_k:20,top_p:0.95,min_p:0,ks:3", "not in (0, 1]"),
    ("0.26@v4:temperature:0.6,top_k:20,top_p:0.95,min_p:0", "lacks ks"),
    ("0.26@v4:temperature:0.6,top_k:20,top_p:0.95,min_p:0,ks:3,seed:1", "unknown field 'seed'"),
    ("0.26@v4:temperature:0.6,temperature:0.7,top_k:20,top_p:0.95,min_p:0,ks:3", "temperature given twice"),
    ("0.26@v4:temperature:x,top_k:20,top_p:0.95,min_p:0,ks:3", "temperature:x is not a number"),
    ("0.26@v4:temperature:0.6,top_k:2.5,top_p:0.95,min_p:0,ks:3", "top_k:2.5 is not a number"),
])
def test_a_malformed_tau_field_names_the_problem(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_tau_field(text)


def test_the_registry_reads_tau_and_reports_a_bad_one_with_its_line(tmp_path):
    entry = load_registry(write_registry(tmp_path, f"m  sha256=-  size=-  arch=llama  hf=o/r/m.gguf\n"
                                                   f"    tau={FIELD}\n"))["m"]
    assert entry.tau == RegistryTau(0.26, CALIBRATION_VERSION, PUBLISHED)
    assert load_registry(write_registry(tmp_path, "m  sha256=-  size=-  arch=llama  hf=o/r/m.gguf\n"))["m"].tau is None
    with pytest.raises(RegistryFormatError, match=r"models.txt:2: m: bad tau=: .*lacks ks"):
        load_registry(write_registry(tmp_path, "m  sha256=-  size=-  arch=llama  hf=o/r/m.gguf\n"
                                               "    tau=0.3@v4:temperature:0.6,top_k:20,top_p:0.95,min_p:0\n"))


def _sampler(tau: str = FIELD, values: dict | None = None) -> ModelSampler:
    return ModelSampler(values or {}, {k: "registry m" for k in values or {}}, tau=parse_tau_field(tau),
                        entry_name="m")


def test_precedence_user_then_registry_then_published():
    sampler = _sampler()
    assert sampler.apply(DecodeParams()).tau == 0.26                          # the registry's
    assert sampler.apply(DecodeParams(tau=0.7), explicit={"tau"}).tau == 0.7  # the user's
    assert ModelSampler().apply(DecodeParams()).tau == 0.5                    # the published
    assert sampler.fill({}) == {"tau": 0.26}
    assert sampler.fill({"tau": 0.9}) == {"tau": 0.9}
    assert sampler.tau_choice(DecodeParams()) == TauChoice(0.26, f"registry m (calibration v{CALIBRATION_VERSION})")


def test_a_tau_calibrated_under_another_sampler_is_not_applied_and_says_why():
    sampler = _sampler()
    other = DecodeParams(temperature=1.0)
    assert sampler.apply(other, explicit={"temperature"}).tau == 0.5
    assert sampler.fill({"temperature": 1.0}) == {"temperature": 1.0, "tau": 0.5}
    assert sampler.tau_choice(other) == TauChoice(
        0.5, "published", "registry m's tau 0.26 not applied: the sampler differs: temperature 1.0 "
                          "(calibrated under 0.6)")
    assert sampler.apply(DecodeParams(ks=4), explicit=set()).tau == 0.5  # ks moves the entropy too
    stale = _sampler(FIELD.replace(f"@v{CALIBRATION_VERSION}", f"@v{CALIBRATION_VERSION - 1}"))
    assert stale.tau_choice(DecodeParams()).note == (
        f"registry m's tau 0.26 not applied: calibrated with rule version {CALIBRATION_VERSION - 1}, "
        f"the current rule is version {CALIBRATION_VERSION}")


def test_a_registry_sampler_and_its_tau_apply_together(tmp_path):
    own = "0.89@v4:temperature:1,top_k:64,top_p:0.95,min_p:0,ks:3".replace("@v4", f"@v{CALIBRATION_VERSION}")
    registry = load_registry(write_registry(
        tmp_path, f"m  sha256=-  size=-  arch=gemma3  hf=o/r/m.gguf  sampler=temperature:1.0,top_k:64,top_p:0.95\n"
                  f"    tau={own}\n"))
    sampler = model_sampler(tmp_path / "m.gguf", {}.get, registry=registry)
    applied = sampler.apply(DecodeParams())
    assert (applied.temperature, applied.top_k, applied.top_p, applied.tau) == (1.0, 64, 0.95, 0.89)
    assert sampler.apply(DecodeParams(top_k=20), explicit={"top_k"}).tau == 0.5


def test_the_command_line_tau_counts_as_given_only_when_typed():
    parser = argparse.ArgumentParser()
    add_decode_arguments(parser)
    plain, typed = parser.parse_args([]), parser.parse_args(["--tau", "0.5"])
    assert "tau" not in explicit_sampler(plain) and params_from_args(plain).tau == 0.5
    assert "tau" in explicit_sampler(typed)
    sampler = _sampler()
    assert sampler.apply(params_from_args(plain), explicit_sampler(plain)).tau == 0.26
    assert sampler.apply(params_from_args(typed), explicit_sampler(typed)).tau == 0.5  # typed 0.5 kept


def test_write_registry_tau_replaces_or_adds_the_field_and_keeps_the_rest(tmp_path):
    text = ("# header\n"
            "a  sha256=-  size=-  arch=llama  # a comment\n"
            "    hf=o/r/a.gguf\n"
            "\n"
            "# about b\n"
            "b  sha256=-  size=-  arch=llama  hf=o/r/b.gguf  tau=0.5@v1:temperature:1,top_k:0,top_p:1,min_p:0,ks:3"
            "  # old\n")
    path = write_registry(tmp_path, text)
    tau = parse_tau_field(FIELD)
    write_registry_tau(path, "a", tau)
    write_registry_tau(path, "b", tau)
    assert path.read_text() == (
        "# header\n"
        "a  sha256=-  size=-  arch=llama  # a comment\n"
        "    hf=o/r/a.gguf\n"
        f"    tau={FIELD}\n"
        "\n"
        "# about b\n"
        f"b  sha256=-  size=-  arch=llama  hf=o/r/b.gguf  tau={FIELD}  # old\n")
    assert {name: entry.tau for name, entry in load_registry(path).items()} == {"a": tau, "b": tau}
    with pytest.raises(RegistryFormatError, match="no entry 'c'"):
        write_registry_tau(path, "c", tau)


def test_every_calibratable_packaged_entry_carries_a_current_tau():
    entries = load_registry()
    verified = [entry for entry in entries.values() if entry.is_verified]
    assert verified, "the packaged registry has verified (PyPI-carried) entries"
    for entry in verified:
        assert entry.tau is not None and entry.tau.version == CALIBRATION_VERSION, entry.name


# ----------------------------------------------------------------------------- on a real model


def test_a_real_model_decodes_with_its_registry_tau_where_none_is_given(smollm, smollm_path, capsys):
    from selar_local.api import Selar
    from selar_local.cli import main
    from selar_local.registry import get_entry

    registry_tau = get_entry("smollm2-135m-instruct").tau
    assert registry_tau.settings_dict() == {**dict(PUBLISHED)}  # calibrated under the published sampler
    assert smollm.default_params().tau == registry_tau.value
    assert smollm.default_params(tau=0.5).tau == 0.5
    assert smollm.default_params(temperature=1.0).tau == 0.5  # another sampler: not applied
    source = f"registry smollm2-135m-instruct (calibration v{registry_tau.version})"
    selar = Selar(runtime=smollm, queue_size=1)
    try:
        meta = selar.models()["data"][0]["meta"]
        assert meta["tau"] == {"value": registry_tau.value, "source": source, "note": ""}
        hi = [{"role": "user", "content": "hi"}]
        assert selar.builder.chat({"messages": hi}).params.tau == registry_tau.value
        assert selar.builder.chat({"messages": hi, "tau": 0.5}).params.tau == 0.5
        assert selar.builder.chat({"messages": hi, "temperature": 1.0}).params.tau == 0.5
    finally:
        selar.scheduler.close()
    assert main(["doctor", "--model", str(smollm_path)]) == 0
    assert f"default tau       {registry_tau.value:g} ({source})" in capsys.readouterr().out
