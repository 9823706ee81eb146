"""A model's calibrated SeLaR gate as its registry entry carries it (models.txt `tau=`).

`tau=0.26@v4:temperature:0.6,top_k:20,top_p:0.95,min_p:0,ks:3` reads: tau 0.26, chosen by
version 4 of `selar calibrate`'s rule under that sampler (the four sampler fields and SeLaR's
ks, every one of them: the entropy the gate compares with tau depends on each).

The gate's entropy is measured under a sampler, so a tau is only meaningful under the sampler
it was calibrated under. Where the user gives no tau, the registry's is used if the sampler in
use is exactly that one and the rule version is the current one; otherwise the published 0.5
is used and the reason is logged and reported (`selar doctor`, `GET /v1/models`): applying a
threshold fitted to another entropy scale silently would gate the wrong steps.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping

log = logging.getLogger(__name__)

# The fields the calibration's entropy depends on (selar_local.calibrate.sampler_settings).
TAU_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "ks")
_INT_SETTINGS = ("top_k", "ks")
_TAU_PATTERN = re.compile(r"(?P<tau>[0-9]*\.?[0-9]+)@v(?P<version>[1-9][0-9]*):(?P<settings>.+)")


@dataclass(frozen=True)
class RegistryTau:
    """A calibrated tau and the rule version and sampler it was calibrated under."""

    value: float
    version: int
    settings: tuple[tuple[str, float | int], ...]  # (field, value) in TAU_SETTINGS order

    def settings_dict(self) -> dict[str, float | int]:
        return dict(self.settings)

    def format(self) -> str:
        """The models.txt value (parse_tau_field's inverse)."""
        return f"{self.value:g}@v{self.version}:" + ",".join(f"{k}:{v:g}" for k, v in self.settings)

    def mismatch(self, settings: Mapping[str, float | int], version: int) -> str | None:
        """Why this tau does not apply under `settings` and rule `version` (None: it applies)."""
        if self.version != version:
            return f"calibrated with rule version {self.version}, the current rule is version {version}"
        mine = self.settings_dict()
        differ = [f"{k} {settings.get(k)} (calibrated under {mine[k]:g})" for k in TAU_SETTINGS
                  if float(settings.get(k, float("nan"))) != float(mine[k])]
        return "the sampler differs: " + ", ".join(differ) if differ else None


def parse_field_values(text: str, known: tuple[str, ...], int_fields, *, unknown: str) -> dict[str, float | int]:
    """`FIELD:VALUE,...` with each field of `known` at most once, as numbers (ints for
    `int_fields`); ValueError naming the first problem. `unknown` formats the message for an
    unknown field ({name!r}, {known}). Shared by the registry's sampler= and tau= fields."""
    values: dict[str, float | int] = {}
    for item in text.split(","):
        name, sep, value = item.partition(":")
        if not sep or not value:
            raise ValueError(f"{item!r} is not FIELD:VALUE")
        if name not in known:
            raise ValueError(unknown.format(name=name, known=", ".join(known)))
        if name in values:
            raise ValueError(f"{name} given twice")
        try:
            values[name] = int(value) if name in int_fields else float(value)
        except ValueError:
            raise ValueError(f"{name}:{value} is not a number") from None
    return values


def parse_tau_field(text: str) -> RegistryTau:
    """Parse `TAU@vN:temperature:T,top_k:K,top_p:P,min_p:M,ks:S` (ValueError if malformed)."""
    match = _TAU_PATTERN.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not TAU@vVERSION:FIELD:VALUE,... (e.g. 0.26@v4:temperature:0.6,"
                         "top_k:20,top_p:0.95,min_p:0,ks:3)")
    tau = float(match["tau"])
    if not 0 < tau <= 1:
        raise ValueError(f"tau {tau:g} is not in (0, 1]")
    values = parse_field_values(match["settings"], TAU_SETTINGS, _INT_SETTINGS,
                                unknown="unknown field {name!r} (the calibration's sampler: {known})")
    missing = [name for name in TAU_SETTINGS if name not in values]
    if missing:
        raise ValueError(f"the calibration's sampler lacks {', '.join(missing)} (all of "
                         f"{', '.join(TAU_SETTINGS)} are needed)")
    return RegistryTau(tau, int(match["version"]), tuple((name, values[name]) for name in TAU_SETTINGS))


def registry_tau_from_calibration(tau: float, version: int, settings: Mapping[str, float | int]) -> RegistryTau:
    """The registry form of a calibration (selar_local.calibrate.Calibration's fields)."""
    return RegistryTau(round(float(tau), 2), int(version), tuple((name, settings[name]) for name in TAU_SETTINGS))


@dataclass(frozen=True)
class TauChoice:
    """The tau a decode uses where the user gives none, and why."""

    value: float
    source: str  # "registry NAME (v4)" | "published" | "user"
    note: str = ""  # why a registry tau was not applied

    def describe(self) -> str:
        return f"{self.value:g} ({self.source}" + (f"; {self.note}" if self.note else "") + ")"


def choose_default_tau(registry_tau: RegistryTau | None, entry_name: str | None,
                       settings: Mapping[str, float | int], published: float) -> TauChoice:
    """The registry's tau if it was calibrated under `settings` with the current rule, else the
    published value with the reason."""
    from selar_local.calibrate import CALIBRATION_VERSION

    if registry_tau is None:
        return TauChoice(published, "published")
    reason = registry_tau.mismatch(settings, CALIBRATION_VERSION)
    if reason is None:
        return TauChoice(registry_tau.value, f"registry {entry_name} (calibration v{registry_tau.version})")
    return TauChoice(published, "published",
                     f"registry {entry_name}'s tau {registry_tau.value:g} not applied: {reason}")


def write_registry_tau(registry_path, name: str, tau: RegistryTau) -> None:
    """Set entry `name`'s `tau=` in a registry file (replacing the one it has, else on a new
    continuation line after the entry's last line); the rest of the file is kept byte for byte,
    and the result is parsed before it replaces the file."""
    import os
    from pathlib import Path

    from selar_local.registry import RegistryFormatError, load_registry

    path = Path(registry_path).resolve()  # a checkout links the package's models.txt to the root one
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines)
                  if line[:1].strip() and line.split("#", 1)[0].split()[:1] == [name]), None)
    if start is None:
        raise RegistryFormatError(f"{path}: no entry {name!r} to write tau= into")
    last = start
    for i in range(start + 1, len(lines)):
        code = lines[i].split("#", 1)[0]
        if not code.strip():
            continue  # blank and comment lines neither end nor extend the entry
        if not code[0].isspace():
            break
        last = i
    field = f"tau={tau.format()}"
    pattern = re.compile(r"(?<!\S)tau=\S+")
    for i in range(start, last + 1):
        code, hash_, comment = lines[i].partition("#")
        if pattern.search(code):
            lines[i] = pattern.sub(field, code, count=1) + hash_ + comment
            break
    else:
        newline = "\n" if lines[last].endswith("\n") else ""
        if not newline:
            lines[last] += "\n"
        lines.insert(last + 1, f"    {field}\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    try:
        written = load_registry(tmp)[name].tau
        if written != tau:
            raise RegistryFormatError(f"{path}: tau= of {name} reads back as {written}, not {tau}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
