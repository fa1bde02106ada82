"""The search space: dotted config keys of the base job → Optuna distributions, and the base job itself.

Forms (each value under ``space:``)::

    [a, b, c]                     categorical (also {choices: [...]})
    {float: [lo, hi]}             uniform; {float: [lo, hi], step: 0.1} a grid of steps
    {log: [lo, hi]}               log-uniform float
    {int: [lo, hi]}               integer (inclusive); add log: true or step: k
    ... when: {key: value}        conditional: only sampled when another parameter has that value (or one of
                                  a list of values); otherwise the base config's value stands

Every key must exist in the base job's schema (the error names the closest key), every bound must satisfy
lo < hi, and every endpoint / choice must validate in the base config, all before any trial starts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Optional

from lmforge.errors import ConfigError

_FORMS = ("float", "log", "int", "choices")


@dataclass
class Param:
    key: str
    kind: str  # float | int | categorical
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: list = field(default_factory=list)
    when: dict[str, list] = field(default_factory=dict)

    def distribution(self):
        import optuna.distributions as D

        if self.kind == "categorical":
            return D.CategoricalDistribution(self.choices)
        if self.kind == "int":
            return D.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return D.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def grid_values(self) -> list:
        """Values a grid search visits (floats need ``step``; ints every value)."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise ConfigError(f"space.{self.key}: a grid search needs a step for a float range (add step: or "
                              "give a list of values)")
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def endpoints(self) -> list:
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


class Space:
    """Ordered parameters (conditions refer to earlier ones)."""

    def __init__(self, params: list[Param]):
        self.params = params

    def __bool__(self) -> bool:
        return bool(self.params)

    def active(self, p: Param, chosen: dict) -> bool:
        return all(k in chosen and chosen[k] in vals for k, vals in p.when.items())

    def suggest(self, trial) -> dict:
        """Define-by-run: one ``trial.suggest_*`` per active parameter, in order."""
        chosen: dict = {}
        for p in self.params:
            if not self.active(p, chosen):
                continue
            if p.kind == "categorical":
                chosen[p.key] = trial.suggest_categorical(p.key, p.choices)
            elif p.kind == "int":
                chosen[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                chosen[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), step=p.step, log=p.log)
        return chosen

    def grid(self) -> dict[str, list]:
        if any(p.when for p in self.params):
            raise ConfigError("sampler grid: conditional parameters (when:) cannot be gridded; use random, tpe, gp")
        return {p.key: p.grid_values() for p in self.params}


def _where(origins, key: str) -> str:
    return origins.where(("space", key), at_key=True) if origins is not None else "space"


def _pair(raw, key: str, form: str, where: str) -> tuple:
    if not (isinstance(raw, (list, tuple)) and len(raw) == 2 and all(isinstance(v, (int, float)) and
                                                                     not isinstance(v, bool) for v in raw)):
        raise ConfigError(f"{where}: space.{key}: {form}: needs [low, high] numbers, got {raw!r}")
    lo, hi = raw
    if lo >= hi:
        raise ConfigError(f"{where}: space.{key}: {form}: low {lo} must be < high {hi}")
    if form in ("log",) and lo <= 0:
        raise ConfigError(f"{where}: space.{key}: log: low {lo} must be > 0 for a log scale")
    return lo, hi


def parse_param(key: str, spec, where: str) -> Param:
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: space.{key}: expected a list of choices or one of "
                          f"{{float: [lo, hi]}}, {{log: [lo, hi]}}, {{int: [lo, hi]}}; got {spec!r}")
    forms = [f for f in _FORMS if f in spec]
    extra = sorted(set(spec) - set(_FORMS) - {"step", "when"} - ({"log"} if "int" in spec else set()))
    if len(forms) != 1 and not ("int" in spec and forms == ["log", "int"]) or extra:
        bad = extra[0] if extra else "/".join(forms) or "nothing"
        close = difflib.get_close_matches(str(bad), list(_FORMS) + ["step", "when"], n=1)
        hint = f"; did you mean '{close[0]}'?" if close and extra else ""
        raise ConfigError(f"{where}: space.{key}: unknown form '{bad}'{hint} (give one of float, log, int, choices"
                          " plus optional step, when)")
    when = {k: (v if isinstance(v, list) else [v]) for k, v in (spec.get("when") or {}).items()}
    if "int" in spec:
        lo, hi = _pair(spec["int"], key, "int", where)
        log = bool(spec.get("log", False))
        if log and lo <= 0:
            raise ConfigError(f"{where}: space.{key}: int with log: true needs low > 0, got {lo}")
        return Param(key, "int", int(lo), int(hi), log=log, step=spec.get("step"), when=when)
    if "choices" in spec:
        ch = spec["choices"]
        if not isinstance(ch, list) or not ch:
            raise ConfigError(f"{where}: space.{key}: choices must be a non-empty list, got {ch!r}")
        return Param(key, "categorical", choices=list(ch), when=when)
    form = forms[0]
    lo, hi = _pair(spec[form], key, form, where)
    return Param(key, "float", float(lo), float(hi), log=form == "log", step=spec.get("step"), when=when)


def parse_space(space: dict, schema, origins=None) -> Space:
    """Check every key against ``schema`` (the base job's root model) and every distribution's form."""
    from lmforge.config_loader import suggest_key, valid_keys

    keys, params = set(valid_keys(schema)), []
    for key, spec in space.items():
        where = _where(origins, key)
        if key not in keys:
            hint = suggest_key(tuple(key.split(".")), schema)
            raise ConfigError(f"{where}: unknown key 'space.{key}': not a key of the base job "
                              f"({schema.__name__}){hint}")
        params.append(parse_param(key, spec, where))
    seen = set()
    for p in params:
        for k in p.when:
            if k not in seen:
                raise ConfigError(f"{_where(origins, p.key)}: space.{p.key}: when: '{k}' is not a parameter "
                                  "listed before it in space")
        seen.add(p.key)
    return Space(params)


# ----------------------------------------------------------------------------- the base job


@dataclass
class BaseJob:
    kind: str  # train | finetune
    path: str
    overrides: dict

    def schema(self):
        if self.kind == "finetune":
            from lmforge.finetune.config import FinetuneConfig

            return FinetuneConfig
        from lmforge.config import Config

        return Config

    def load(self, params: Optional[dict] = None, extra: Optional[dict] = None):
        """The base config + fixed overrides + ``params`` (+ ``extra``: run_dir etc.), validated."""
        from lmforge.config_loader import deep_merge

        tree: dict = {}
        for k, v in {**self.overrides, **(params or {}), **(extra or {})}.items():
            tree = deep_merge(tree, nest(k, v))
        if self.kind == "finetune":
            from lmforge.finetune.config import load_finetune_config

            return load_finetune_config(self.path, tree)
        from lmforge.config import load_config

        return load_config(self.path, tree)


def nest(dotted: str, value) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def detect_kind(path: str, kind: str) -> str:
    if kind != "auto":
        return kind
    from lmforge.config_loader import read_yaml

    tree, _ = read_yaml(path)
    return "finetune" if ("task" in tree or "base" in tree) else "train"


def check_space_values(job: BaseJob, space: Space, origins=None) -> None:
    """Every endpoint and choice validates in the base config (the base with ``overrides`` must too)."""
    job.load()
    for p in space.params:
        for v in p.endpoints():
            try:
                job.load({p.key: v})
            except ConfigError as e:
                first = str(e).splitlines()[0].split(": ", 1)[-1]
                raise ConfigError(f"{_where(origins, p.key)}: space.{p.key}: value {v!r} is not valid for the "
                                  f"base job: {first}") from None

