"""The sampler a model recommends, used where the user names none.

llama.cpp's converters can write a model's recommended sampler into the GGUF file
(`general.sampling.temp`, `.top_k`, `.top_p`, `.min_p`); llama-cli and llama-server take
those as their defaults. selar-local does the same, and a registry entry's `sampler=` field
says it for files that predate those keys (Gemma 3 270M: Google's T 1.0, top-k 64, top-p 0.95).
The registry wins where both speak: it names one exact file.

Order of precedence, field by field: what the user gives (a command-line option, a request
field, an explicit DecodeParams object), then the registry, then the GGUF keys, then the
published SeLaR settings (DecodeParams' defaults). tau follows the same order: the user's,
then the registry's `tau=` (only under the sampler it was calibrated under, see
selar_local.model_tau), then the published 0.5.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from selar_local.errors import InvalidParameterError
from selar_local.model_tau import RegistryTau, TauChoice, choose_default_tau, parse_field_values
from selar_local.params import SAMPLER_FIELDS, DecodeParams, check_sampler_value

log = logging.getLogger(__name__)
_DEFAULT_KS = DecodeParams().ks

# GGUF key -> DecodeParams field (llama.cpp's LLAMA_MODEL_META_KEY_SAMPLING_*)
GGUF_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
}


@dataclass(frozen=True)
class ModelSampler:
    """The model's recommended values for some of SAMPLER_FIELDS, and where each came from."""

    values: Mapping[str, float | int] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)  # field -> "GGUF" | "registry NAME"
    tau: RegistryTau | None = None  # the registry entry's calibrated gate
    entry_name: str | None = None

    def apply(self, params: DecodeParams, explicit: Iterable[str] = ()) -> DecodeParams:
        """params with every sampler field the user did not give replaced by the model's value,
        and tau (unless "tau" is in `explicit`) by the registry's where it holds."""
        given = set(explicit)
        changes = {k: v for k, v in self.values.items() if k not in given and getattr(params, k) != v}
        params = params.replace(**changes) if changes else params
        if "tau" in given:
            return params
        choice = self.tau_choice(params)
        return params.replace(tau=choice.value) if choice.value != params.tau else params

    def fill(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """A DecodeParams keyword dict with the model's values where it names none (tau too)."""
        filled = {**self.values, **values}
        if "tau" not in values and self.tau is not None:
            filled["tau"] = self.tau_choice(DecodeParams(**filled)).value
        return filled

    def tau_choice(self, params: DecodeParams) -> TauChoice:
        """The tau a decode with `params`' sampler uses where the user gives none, and why."""
        settings = {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p,
                    "min_p": params.min_p, "ks": params.ks}
        return choose_default_tau(self.tau, self.entry_name, settings, DecodeParams().tau)

    def describe(self) -> str:
        if not self.values:
            return "none (the published SeLaR settings)"
        by_source: dict[str, list[str]] = {}
        for name, value in self.values.items():
            by_source.setdefault(self.sources[name], []).append(f"{name} {value:g}")
        return "; ".join(f"{', '.join(items)} ({source})" for source, items in by_source.items())


def model_sampler(path: str | os.PathLike, metadata: Callable[[str], Any] | None = None,
                  registry: Mapping | None = None) -> ModelSampler:
    """The recommended sampler of a model file: its GGUF keys, then its registry entry's
    `sampler=` over them. `metadata(key)` reads one GGUF key (a loaded model's own reader;
    default: a walk of the file's header, which loads nothing)."""
    from selar_local.registry import entry_for_path

    if metadata is None:
        from selar_local.gguf_index import GGUFIndex

        metadata = GGUFIndex(path).metadata.get
    values: dict[str, float | int] = {}
    sources: dict[str, str] = {}
    for key, name in GGUF_SAMPLING_KEYS.items():
        raw = metadata(key)
        if raw is None:
            continue
        value = _from_gguf(name, raw)
        if value is None:
            log.warning("%s: ignoring %s=%r, not a valid %s", Path(path).name, key, raw, name)
            continue
        values[name], sources[name] = value, "GGUF"
    entry = entry_for_path(path, registry)
    if entry is None:
        return ModelSampler(values, sources)
    for name, value in entry.sampler:
        values[name], sources[name] = value, f"registry {entry.name}"
    return ModelSampler(values, sources, tau=entry.tau, entry_name=entry.name)


def _from_gguf(name: str, raw: Any) -> float | int | None:
    """A GGUF value (a number, or the string llama.cpp's reader gives) as the field's type,
    None where it is not a value DecodeParams accepts (e.g. temp 0, llama.cpp's greedy)."""
    try:
        number = float(raw)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    if name == "top_k":
        if number != int(number):
            return None
        number = int(number)
    else:
        # llama.cpp's reader prints a float32 with 6 decimals ("0.800000"), the header walk
        # gives the float32 itself (0.800000011920929): both round to the same 0.8, so the
        # sampler (and the calibration cached under it) is the same whichever read it.
        number = round(number, 6)
    try:
        _check(name, number)
    except InvalidParameterError:
        return None
    return number


def _check(name: str, value: float | int) -> None:
    check_sampler_value(name, value)
    if name == "top_k" and 0 < value < _DEFAULT_KS:  # the published ks would no longer fit under it
        raise InvalidParameterError(f"invalid top_k={value}: a recommended top-k must be 0 or at least "
                                    f"{_DEFAULT_KS} (the default ks: the gate and the mixture need the candidates)")


def parse_sampler_field(text: str) -> tuple[tuple[str, float | int], ...]:
    """A registry `sampler=` value: `temperature:1.0,top_k:64,top_p:0.95` (any of
    SAMPLER_FIELDS, each once), checked as DecodeParams checks them."""
    out = parse_field_values(text, SAMPLER_FIELDS, ("top_k",),
                             unknown="unknown sampler field {name!r} (known: {known})")
    for name, number in out.items():
        try:
            _check(name, number)
        except InvalidParameterError as exc:
            raise ValueError(str(exc)) from None
    return tuple(out.items())
