"""The method registry: validation, policies, CLI flags and API fields follow from it."""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from selar_local.commands.common import add_decode_arguments, params_from_args
from selar_local.errors import InvalidParameterError
from selar_local.methods import METHODS, REGISTRY, feeds_soft_inputs, method_options
from selar_local.openai_schema import DECODE_FIELDS
from selar_local.params import DecodeParams
from selar_local.policies import Policy, TokenInfo, make_policy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_decode_arguments(parser)
    return parser


def test_every_registered_method_validates_and_makes_its_policy():
    info = TokenInfo(16, np.zeros(16, dtype=bool))
    for name, method in REGISTRY.items():
        policy = make_policy(DecodeParams(method=name, top_k=0), info)
        assert isinstance(policy, Policy) and type(policy) is method.policy_class()
    assert METHODS == tuple(REGISTRY)
    with pytest.raises(InvalidParameterError, match="one of cot, selar, soft, moi, swir, "):
        DecodeParams(method="coconut")
    token_only = ("cot", "frac", "latentseek", "textmas")  # frac steers the layers, the searches decode text
    assert not any(map(feeds_soft_inputs, token_only)) and all(feeds_soft_inputs(m) for m in METHODS if m not in token_only)


def test_every_method_option_is_a_decode_field_with_a_flag_and_an_api_field():
    fields = {f.name for f in dataclasses.fields(DecodeParams)}
    flags = {a.dest for a in _parser()._actions}
    for name, (option, users) in method_options().items():
        assert name in fields and name in flags and name in DECODE_FIELDS, name
        assert users and all(option in REGISTRY[m].options for m in users)


def test_the_soft_thinking_and_mixture_of_inputs_flags_reach_the_params():
    args = _parser().parse_args(["--method", "soft", "--soft-topk", "4", "--cold-stop-entropy", "0.25",
                                 "--cold-stop-steps", "3", "--moi-topn", "6", "--moi-beta", "0.5",
                                 "--soft-noise", "gumbel", "--thinking-only", "--tau", "0.3"])
    params = params_from_args(args)
    assert params == DecodeParams(method="soft", soft_topk=4, cold_stop_entropy=0.25, cold_stop_steps=3,
                                  moi_topn=6, moi_beta=0.5, soft_noise="gumbel", thinking_only=True, tau=0.3)
    assert params_from_args(_parser().parse_args([])) == DecodeParams()
    with pytest.raises(InvalidParameterError, match="soft_topk"):
        params_from_args(_parser().parse_args(["--soft-topk", "0"]))
