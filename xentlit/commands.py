"""The ``xentlit`` command: ``xentlit <command> [Hydra overrides]``, also ``python -m xentlit <command> ...``.

A command is a ``"module:function"`` in :data:`COMMANDS`; the function reads ``sys.argv`` as a Hydra app does
(overrides, ``-m``, ``--help``, ``--cfg job``, ``hydra.*``, ``--config-dir``), so ``xentlit train ARGS`` takes
exactly what ``python scripts/train.py ARGS`` takes. Adding a command is one entry in the table. Nothing heavy
(torch, Lightning) is imported before a command is chosen.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

__all__ = ["COMMANDS", "main", "relaunch_command", "command_line"]

# command -> ("module:function", what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("xentlit.entry:train_main", "train a classifier, test its best checkpoint (conf/train.yaml)"),
    "eval": ("xentlit.entry:eval_main", "re-test a checkpoint on the test split of its data (conf/eval.yaml)"),
    "predict": ("xentlit.entry:predict_main", "class probabilities for the rows of your file (conf/predict.yaml)"),
    "search": ("xentlit.entry:search_main", "hyperparameter search with Optuna, pruning bad trials (conf/hparams_search/)"),
}

# The command this process runs, when it was started through main() (None for scripts/*.py).
_running: str | None = None
_through_module = False


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name.ljust(width)}  {about}" for name, (_, about) in COMMANDS.items()]
    return ("usage: xentlit <command> [Hydra overrides, -m, --help, --cfg job, --config-dir DIR ...]\n\n"
            "commands:\n" + "\n".join(lines) + "\n\n`xentlit <command> --help` lists the command's config groups "
            "and options.")


def main(argv: list[str] | None = None) -> int:
    """Run the command named by ``argv[1]`` (default ``sys.argv``) with the rest of the arguments."""
    global _running, _through_module
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
        return 0 if len(argv) >= 2 else 2
    name = argv[1]
    if name not in COMMANDS:
        print(f"xentlit: unknown command {name!r}; the commands are {', '.join(COMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[name][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    _running, _through_module = name, Path(argv[0]).name in ("__main__.py", "cli.py", "-m")
    sys.argv = [argv[0], *argv[2:]]
    function()
    return 0


def relaunch_command() -> list[str] | None:
    """The interpreter arguments that run this process's command again (``-m xentlit <command>``), or None when the
    process was not started through :func:`main`."""
    return None if _running is None else ["-m", "xentlit", _running]


def command_line(script: str) -> str:
    """How the user started this run, for messages: ``xentlit train`` or ``python -m xentlit train``, else
    ``python scripts/<script>``."""
    if _running is None:
        return f"python scripts/{script}"
    return f"python -m xentlit {_running}" if _through_module else f"xentlit {_running}"
