"""The search configuration (``conf/hparams_search/<name>.yaml``): its schema, its checks, and what it builds.

The file is composed by Hydra under the key ``hparams_search`` on top of :class:`SearchConfig`, so a misspelt
key or a wrong type fails at start-up with Hydra naming the key (``hparams_search.n_trails``); the parts a schema
cannot check (the search space, the sampler's and pruner's options) are checked here, with errors that name the
entry and what was expected. Nothing here runs a trial.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

SCHEMA_NAME = "search_schema"
ROOT_NAME = "xentlit_search"  # the primary config the search file is composed in (as the group hparams_search)

# Sampler and pruner names -> Optuna classes (looked up by name, never imported from a config string).
SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "gp": "GPSampler"}
PRUNERS = {"median": "MedianPruner", "hyperband": "HyperbandPruner", "none": "NopPruner"}
DIRECTIONS = ("maximize", "minimize")
PARAM_TYPES = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
               "categorical": {"choices"}}


@dataclass
class SamplerConfig:
    """Which Optuna sampler proposes the trials; ``<name>``: keyword arguments of its class."""

    name: str = "tpe"
    seed: Optional[int] = 1234
    tpe: dict[str, Any] = field(default_factory=dict)
    random: dict[str, Any] = field(default_factory=dict)
    gp: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunerConfig:
    """Which Optuna pruner stops unpromising trials (``none``: none); ``<name>``: keyword arguments of its class."""

    name: str = "median"
    median: dict[str, Any] = field(default_factory=dict)
    hyperband: dict[str, Any] = field(default_factory=dict)
    none: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchConfig:
    """The schema of ``conf/hparams_search/*.yaml`` (composed under the key ``hparams_search``)."""

    metric: str = "val/acc_best"  # reported after every validation epoch (pruning) and the trial's value at the end
    direction: str = "maximize"
    n_trials: int = 20  # trials that run to an end (completed, pruned or failed); killed ones are retried
    n_jobs: int = 1  # trials at once, each in its own process, sharing the study's storage
    dir: Optional[str] = None  # the sweep directory; null: <paths.log_dir>/search/<date>_<time>_<id>
    study_name: str = "search"
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    params: dict[str, Any] = field(default_factory=dict)  # training config key -> {type: float|int|categorical, ...}
    trial_overrides: list[str] = field(default_factory=list)  # training overrides of every trial (before yours)


def register_schema() -> None:
    """Register :class:`SearchConfig` with Hydra as ``search_schema`` (the search files' first default), and the
    primary config that selects a search file: ``hparams_search=<name>``, ``optuna`` by default (a primary config
    of its own, not ``hparams_search/<name>`` itself, so that a file in a ``hydra.searchpath`` is found too)."""
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=SearchConfig)
    store.store(name=ROOT_NAME, node={"defaults": [{"hparams_search": "optuna"}, "_self_"]})


def check(search: Mapping[str, Any], source: str) -> None:
    """Raise ``ValueError`` naming the entry of ``source`` for anything the schema cannot check."""
    if search["direction"] not in DIRECTIONS:
        raise ValueError(f"{source}: direction must be maximize or minimize, got {search['direction']!r}")
    for key in ("n_trials", "n_jobs"):
        if search[key] < 1:
            raise ValueError(f"{source}: {key} must be at least 1, got {search[key]}")
    if not search["params"]:
        raise ValueError(f"{source}: params is empty: name at least one training config key to search")
    for name, spec in search["params"].items():
        distribution(name, spec, source)
    sampler_kwargs(search["sampler"], source)
    pruner_kwargs(search["pruner"], source)


def distribution(name: str, spec: Any, source: str) -> Any:
    """The Optuna distribution of the search-space entry ``name: spec`` (its errors name the entry)."""
    from optuna import distributions

    where = f"{source}: params.{name}"
    if not isinstance(spec, Mapping) or spec.get("type") not in PARAM_TYPES:
        raise ValueError(f"{where} must be a mapping with type: float, int or categorical, got {spec!r}")
    unknown = set(spec) - PARAM_TYPES[spec["type"]] - {"type"}
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {sorted(unknown)} for type {spec['type']} "
                         f"(it takes {sorted(PARAM_TYPES[spec['type']])})")
    if spec["type"] == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"{where}: choices must be a non-empty list, got {choices!r}")
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise ValueError(f"{where}: choice {choice!r} is not a number, string, boolean or null "
                                 "(write a list as a string, e.g. \"[64,64]\": it is passed as a Hydra override)")
        return distributions.CategoricalDistribution(list(choices))
    missing = {"low", "high"} - set(spec)
    if missing:
        raise ValueError(f"{where}: missing {sorted(missing)}")
    kind = distributions.FloatDistribution if spec["type"] == "float" else distributions.IntDistribution
    kwargs = {key: spec[key] for key in ("low", "high", "log", "step") if spec.get(key) is not None}
    if spec["type"] == "float" and not all(_is_number(spec[k]) for k in ("low", "high")):
        raise ValueError(f"{where}: low and high must be numbers, got {spec['low']!r} and {spec['high']!r}")
    try:
        return kind(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def suggest(trial: Any, name: str, spec: Mapping[str, Any]) -> Any:
    """The trial's value of the entry ``name: spec`` (Optuna's ``suggest_*``, so every sampler sees the space)."""
    if spec["type"] == "categorical":
        return trial.suggest_categorical(name, list(spec["choices"]))
    suggest_number = trial.suggest_float if spec["type"] == "float" else trial.suggest_int
    options = {key: spec[key] for key in ("log", "step") if spec.get(key) is not None}
    return suggest_number(name, spec["low"], spec["high"], **options)


def override(name: str, value: Any) -> str:
    """The Hydra override that sets the training config's ``name`` (a key or a config group) to ``value``."""
    if value is None:
        return f"{name}=null"
    if isinstance(value, bool):
        return f"{name}={str(value).lower()}"
    return f"{name}={value!r}" if isinstance(value, float) else f"{name}={value}"


def sampler_kwargs(sampler: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """``(Optuna class name, keyword arguments)`` of the configured sampler, the arguments checked."""
    return _choice(sampler, SAMPLERS, "sampler", source, seed=sampler.get("seed"))


def pruner_kwargs(pruner: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """``(Optuna class name, keyword arguments)`` of the configured pruner, the arguments checked."""
    return _choice(pruner, PRUNERS, "pruner", source)


def _choice(node: Mapping[str, Any], names: dict[str, str], what: str, source: str,
            seed: Any = None) -> tuple[str, dict[str, Any]]:
    import optuna

    name = node["name"]
    if name not in names:
        raise ValueError(f"{source}: {what}.name must be one of {', '.join(names)}, got {name!r}")
    class_name = names[name]
    kwargs = dict(node.get(name) or {})
    accepted = inspect.signature(getattr(optuna.samplers if what == "sampler" else optuna.pruners,
                                         class_name)).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{source}: {what}.{name}: optuna's {class_name} takes no argument(s) {unknown} "
                         f"(it takes {', '.join(p for p in accepted if p != 'self')})")
    if seed is not None and "seed" in accepted:
        kwargs["seed"] = seed
    return class_name, kwargs


def build_sampler(sampler: Mapping[str, Any], seed: int | None, source: str) -> Any:
    """The Optuna sampler of the config, with ``seed`` (a worker's own) in place of the configured one."""
    import optuna

    class_name, kwargs = sampler_kwargs(sampler, source)
    if "seed" in kwargs:
        kwargs["seed"] = seed
    return getattr(optuna.samplers, class_name)(**kwargs)


def build_pruner(pruner: Mapping[str, Any], source: str) -> Any:
    """The Optuna pruner of the config."""
    import optuna

    class_name, kwargs = pruner_kwargs(pruner, source)
    return getattr(optuna.pruners, class_name)(**kwargs)
