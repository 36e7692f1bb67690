"""The search space: read once from a TOML file in ``studies/``, sampled by ``suggest(trial)``.

A space file has an optional ``[fixed]`` table (training params every trial uses) and one
``[params.<name>]`` table per searched param, in the order they are asked::

    [params.lr]
    type = "float"        # float | int | categorical
    low = 1e-4
    high = 1e-2
    log = true            # optional, float/int
    # step = 1            # optional, int

    [params.unfreeze]
    type = "int"
    low = 0
    high = 4
    requires = ["resnet", "pretrained"]   # asked only for a ResNet over pretrained weights

    [params.focal_gamma]
    type = "float"
    low = 0.5
    high = 3.0
    when = { loss = ["focal"] }           # asked only when the loss chosen is focal

An optional ``[[start]]`` array gives the first trials of a new study (a known-good recipe,
as ``study.enqueue_trial``): each table sets searched params (the rest are sampled).

Names are ``search.training.engine.TrainParams`` fields. ``suggest`` works on any Optuna trial
(Ray's define-by-run captor included) and returns the full params dict: fixed values + suggestions.
"""

from __future__ import annotations

import importlib.resources
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import models

if TYPE_CHECKING:
    import optuna
from search.training.engine import TrainParams

# the shipped spaces: package data of ``studies`` (the repo folder, or the installed copy)
STUDIES_DIR = Path(str(importlib.resources.files("studies")))
TYPES = ("float", "int", "categorical")
REQUIREMENTS = ("resnet", "simple_cnn", "pretrained")  # conditions a param may depend on
_KEYS = {"type", "low", "high", "log", "step", "choices", "requires", "when", "why"}


class SpaceError(ValueError):
    """A space file is malformed; the message names the file and the offending key."""


@dataclass(frozen=True)
class Space:
    """Searched params (name -> spec, in asking order) and fixed params."""

    params: dict[str, dict[str, Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # file it came from
    start: list[dict[str, Any]] = field(default_factory=list)  # first trials of a new study

    def to_dict(self) -> dict:
        """JSON-able form, stored in the study's user attrs."""
        return {
            "source": self.source,
            "fixed": self.fixed,
            "params": self.params,
            "start": self.start,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Space:
        return _validate(
            d.get("params", {}), d.get("fixed", {}), d.get("source", "<dict>"), d.get("start", [])
        )


def default_space_file(cuda: bool) -> Path:
    """``studies/default.toml`` on a GPU, ``studies/cpu.toml`` (small and fast) without one."""
    return STUDIES_DIR / ("default.toml" if cuda else "cpu.toml")


def resolve_space_file(name: str | Path) -> Path:
    """A path, or a bare name looked up in ``studies/`` (``cpu`` -> ``studies/cpu.toml``)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (STUDIES_DIR / p, STUDIES_DIR / f"{p}.toml"):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in STUDIES_DIR.glob("*.toml"))
    raise SpaceError(f"space file {name!r} not found (as a path or in {STUDIES_DIR}: {known})")


def load_space(path: str | Path) -> Space:
    """Read and validate a space file."""
    path = resolve_space_file(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpaceError(f"{path}: not valid TOML ({e})") from e
    unknown = sorted(set(raw) - {"params", "fixed", "description", "start"})
    if unknown:
        raise SpaceError(
            f"{path}: unknown top-level keys {unknown} (params, fixed, start, description)"
        )
    return _validate(raw.get("params", {}), raw.get("fixed", {}), str(path), raw.get("start", []))


def _check_start(start: list, params: dict, fixed: dict, source: str) -> None:
    """Each ``[[start]]`` table sets searched params to allowed values."""
    if not isinstance(start, list) or not all(isinstance(t, dict) for t in start):
        raise SpaceError(f"{source}: start must be an array of tables ([[start]])")
    for i, t in enumerate(start):
        where = f"{source}: [[start]] #{i + 1}"
        extra = sorted(set(t) - set(params))
        if extra:
            raise SpaceError(f"{where}: {extra} are not searched params")
        for name, v in t.items():
            spec = params[name]
            ok = (
                v in spec["choices"]
                if spec["type"] == "categorical"
                else isinstance(v, int | float) and spec["low"] <= v <= spec["high"]
            )
            if not ok:
                raise SpaceError(f"{where}: {name} = {v!r} is outside [params.{name}]")
        try:
            TrainParams.from_dict({**fixed, **t})
        except (TypeError, ValueError) as e:
            raise SpaceError(f"{where}: {e}") from None


def _validate(params: dict, fixed: dict, source: str, start: list | None = None) -> Space:
    known = {f.name for f in fields(TrainParams)}
    for name in [*params, *fixed]:
        if name not in known:
            raise SpaceError(f"{source}: unknown param {name!r}; known: {sorted(known)}")
    both = sorted(set(params) & set(fixed))
    if both:
        raise SpaceError(f"{source}: {both} both fixed and searched")
    clean: dict[str, dict] = {}
    for name, spec in params.items():
        where = f"{source}: [params.{name}]"
        if not isinstance(spec, dict):
            raise SpaceError(f"{where} must be a table")
        extra = sorted(set(spec) - _KEYS)
        if extra:
            raise SpaceError(f"{where}: unknown keys {extra} (allowed: {sorted(_KEYS)})")
        kind = spec.get("type")
        if kind not in TYPES:
            raise SpaceError(f"{where}: type must be one of {TYPES}, got {kind!r}")
        if kind == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise SpaceError(f"{where}: categorical needs a non-empty 'choices' list")
        else:
            lo, hi = spec.get("low"), spec.get("high")
            if not isinstance(lo, int | float) or not isinstance(hi, int | float) or lo > hi:
                raise SpaceError(f"{where}: needs numbers low <= high, got {lo!r}, {hi!r}")
            if spec.get("log") and lo <= 0:
                raise SpaceError(f"{where}: log scale needs low > 0, got {lo}")
            step = spec.get("step")
            if step is not None and (not isinstance(step, int | float) or step <= 0):
                raise SpaceError(f"{where}: step must be a number > 0, got {step!r}")
            if step is not None and spec.get("log"):
                raise SpaceError(f"{where}: step and log cannot both be set (Optuna)")
        bad = sorted(set(spec.get("requires", [])) - set(REQUIREMENTS))
        if bad:
            raise SpaceError(f"{where}: unknown requires {bad} (allowed: {REQUIREMENTS})")
        when = spec.get("when", {})
        if not isinstance(when, dict) or not all(isinstance(v, list) for v in when.values()):
            raise SpaceError(f"{where}: when must be a table of lists, e.g. {{ loss = [...] }}")
        for other in when:
            if other not in clean and other not in fixed:
                raise SpaceError(
                    f"{where}: when refers to {other!r}, which is not fixed or searched before it"
                )
        clean[name] = dict(spec)
    _check_values(clean, dict(fixed), source)
    archs = list(params.get("arch", {}).get("choices", [])) + (
        [fixed["arch"]] if "arch" in fixed else []
    )
    for arch in archs:
        try:
            models.check_name(arch)
        except models.UnknownModelError as e:
            raise SpaceError(f"{source}: {e}") from e
    _check_start(start or [], clean, dict(fixed), source)
    return Space(params=clean, fixed=dict(fixed), source=source, start=list(start or []))


def _check_values(params: dict, fixed: dict, source: str) -> None:
    """Every fixed value, choice and range end must make valid ``TrainParams``."""
    try:
        TrainParams.from_dict(fixed)
    except (TypeError, ValueError) as e:
        raise SpaceError(f"{source}: [fixed]: {e}") from None
    for name, spec in params.items():
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for v in values:
            try:
                TrainParams.from_dict({**fixed, name: v})
            except (TypeError, ValueError) as e:
                raise SpaceError(f"{source}: [params.{name}] value {v!r}: {e}") from None


def _applies(spec: dict, chosen: dict, pretrained: bool) -> bool:
    """Whether a conditional param is asked, given the params chosen so far."""
    req = spec.get("requires", [])
    arch = chosen.get("arch", TrainParams.arch)
    if "resnet" in req and not models.is_resnet(arch):
        return False
    if "simple_cnn" in req and arch != "simple_cnn":
        return False
    if "pretrained" in req and not pretrained:
        return False
    defaults = TrainParams()
    return all(chosen.get(n, getattr(defaults, n)) in ok for n, ok in spec.get("when", {}).items())


def suggest(trial: optuna.Trial, space: Space, pretrained: bool = False) -> dict[str, Any]:
    """Sample one trial's params: ``space.fixed`` plus each applicable searched param.

    ``trial`` is an ``optuna.Trial`` (or anything with its ``suggest_*`` methods). Params
    whose ``requires`` is not met are not asked and keep the ``TrainParams`` default.
    """
    chosen: dict[str, Any] = dict(space.fixed)
    for name, spec in space.params.items():
        if not _applies(spec, chosen, pretrained):
            continue
        kind = spec["type"]
        if kind == "categorical":
            chosen[name] = trial.suggest_categorical(name, spec["choices"])
        elif kind == "int":
            chosen[name] = trial.suggest_int(
                name,
                int(spec["low"]),
                int(spec["high"]),
                step=int(spec.get("step", 1)),
                log=bool(spec.get("log", False)),
            )
        else:
            chosen[name] = trial.suggest_float(
                name,
                float(spec["low"]),
                float(spec["high"]),
                step=spec.get("step"),
                log=bool(spec.get("log", False)),
            )
    return chosen


def skipped_for_weights(space: Space) -> list[str]:
    """Searched params left out because no pretrained weights are given."""
    return [n for n, s in space.params.items() if "pretrained" in s.get("requires", [])]
