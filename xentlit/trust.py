"""Which ``_target_`` a config read from a file may instantiate.

A checkpoint's stored config and a run directory's recorded overrides are untrusted input: handed to
``hydra.utils.instantiate`` as they are, a ``_target_`` can name any callable (``os.system``,
``pathlib.Path.write_text``, ``pandas.read_pickle``). Before anything from such a file is instantiated, every
``_target_`` in it (nested ones too) must be a class of xentlit, ``torch.optim`` or Lightning's callbacks, loggers
and profilers -- classes only, never a function -- or match a pattern the user trusts explicitly
(``trust_targets=[mymodels.*]``). Anything else fails before any call, naming the target and the option.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["TRUSTED_TARGETS", "UntrustedTargetError", "check_no_interpolation", "check_targets"]

# Classes under these names may be built from a stored config (what the shipped configs use).
TRUSTED_TARGETS: tuple[str, ...] = (
    "xentlit.*",
    "torch.optim.*",
    "lightning.pytorch.callbacks.*",
    "lightning.pytorch.loggers.*",
    "lightning.pytorch.profilers.*",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.trainer.trainer.Trainer",
)


class UntrustedTargetError(ValueError):
    """A config read from a file names a ``_target_`` that is not trusted."""


def _targets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(key path, target)`` for every ``_target_`` in a plain nested dict/list config."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield where, value
            else:
                yield from _targets(value, where)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}[{i}]")


def _strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """``(key path, value)`` for every string in a plain nested dict/list config."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _strings(value, f"{path}[{i}]")


def check_no_interpolation(config: Any, source: str) -> None:
    """Refuse ``${...}`` anywhere in a plain config read from a file: a stored config is resolved when it is saved,
    and an interpolation would be resolved again when it is built (``${oc.create:{_target_: ...}}`` makes a node
    that no check saw)."""
    for where, value in _strings(config):
        if "${" in value:
            raise UntrustedTargetError(f"{source}: {where} holds an interpolation ({value[:60]!r}); a stored config "
                                       "is resolved already, so this is refused. Nothing was run")


def _is_class(target: str) -> bool:
    from hydra.utils import get_class

    try:
        return inspect.isclass(get_class(target))
    except Exception:  # not importable, or not a class
        return False


def check_targets(config: Any, source: str, trust_targets: Sequence[str] = ()) -> None:
    """Raise :class:`UntrustedTargetError` unless every ``_target_`` in ``config`` (a DictConfig or plain dict read
    from ``source``) is a trusted class or matches one of the user's ``trust_targets`` patterns."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    plain = OmegaConf.to_container(config, resolve=True) if isinstance(config, (DictConfig, ListConfig)) else config
    user = [str(p) for p in trust_targets]
    for where, target in _targets(plain):
        if not isinstance(target, str):
            raise UntrustedTargetError(f"{source}: {where} is {target!r}, not a dotted class name")
        if any(fnmatch.fnmatchcase(target, p) for p in user):
            continue
        if any(fnmatch.fnmatchcase(target, p) for p in TRUSTED_TARGETS) and _is_class(target):
            continue
        raise UntrustedTargetError(
            f"{source}: {where} = {target!r} is not a class xentlit builds from a stored config (trusted: "
            f"{', '.join(TRUSTED_TARGETS)}, classes only). Nothing was run. If you wrote this config and trust it, "
            f"allow it with trust_targets=[{target}] (or a pattern such as '{target.rsplit('.', 1)[0]}.*')"
        )
