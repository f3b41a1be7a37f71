"""How a run starts: the Hydra entry points behind ``xentlit train|eval|predict`` and ``scripts/*.py``.

An entry point registers the schemas, finds xentlit's configs (``xentlit/conf`` inside an installed wheel, or
``conf/`` at the top of a clone), adds the user's own config directory (``--config-dir DIR`` or the
``XENTLIT_CONFIG_DIR`` environment variable), rewrites ``sys.argv`` for ``resume=`` and for ``torchrun``'s other
ranks, and sets torch's intra-op threads (``threads=``) before it calls the run function with the composed config.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from xentlit import commands

__all__ = ["CONFIG_DIR_ENV", "eval_main", "hydra_entry", "package_config_dir", "predict_main", "search_main",
           "set_threads", "train_main"]

# A directory of the user's own configs (model/, data/, experiment/ ... options), used like --config-dir.
CONFIG_DIR_ENV = "XENTLIT_CONFIG_DIR"


def package_config_dir() -> Path:
    """xentlit's own configs: ``xentlit/conf`` in an installed wheel, else ``conf/`` beside the package (a clone,
    an editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"xentlit's configs are missing: neither {here / 'conf'} (installed) nor "
                            f"{here.parent / 'conf'} (a clone) holds train.yaml; reinstall xentlit")


def _script_config_dir(config_name: str) -> Path:
    """``conf/`` beside the running script's folder (``scripts/train.py`` of a clone), else the package's."""
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    if script:
        candidate = Path(script).resolve().parents[1] / "conf"
        if (candidate / f"{config_name}.yaml").is_file():
            return candidate
    return package_config_dir()


def hydra_entry(run: Callable[[DictConfig], Any], config_name: str,
                config_dir: str | Path | None = None) -> Callable[[], Any]:
    """The ``main`` of a command: composes ``<config_dir>/<config_name>.yaml`` with the command line's Hydra
    overrides (``-m`` sweeps, ``--help``, ``--cfg job``, ``hydra.*``, ``--config-dir``) and calls ``run`` with it.

    ``config_dir`` defaults to the running script's ``../conf`` when it has one (a clone's ``scripts/``), else
    xentlit's own configs.
    """
    import hydra

    from xentlit.config import register_configs

    register_configs()
    _use_one_run_dir_per_job()
    _quiet_known_noise()
    directory = Path(config_dir) if config_dir is not None else _script_config_dir(config_name)
    main = hydra.main(version_base="1.3", config_path=str(directory.resolve()), config_name=config_name)(_task(run))

    def entry() -> Any:
        if config_name == "train" and any(
                arg.lstrip("+~").split("=", 1)[0].split(".")[0] == "hparams_search" for arg in sys.argv[1:]):
            raise SystemExit("hparams_search=... is a hyperparameter search, its own command: xentlit search (or "
                             "python scripts/search.py) with the same overrides")
        sys.argv = _argv_for_external_rank(_argv_for_resume(_argv_with_user_config_dir(sys.argv)))
        return main()

    return entry


def train_main() -> Any:
    """``xentlit train``: train, test and write the run directory (``scripts/train.py``)."""
    from xentlit.cli import train

    return hydra_entry(train, "train", package_config_dir())()


def eval_main() -> Any:
    """``xentlit eval``: re-test a checkpoint (``scripts/eval.py``)."""
    from xentlit.cli import evaluate

    return hydra_entry(evaluate, "eval", package_config_dir())()


def predict_main() -> Any:
    """``xentlit predict``: predict the rows of a file with a checkpoint (``scripts/predict.py``)."""
    from xentlit.cli import predict

    return hydra_entry(predict, "predict", package_config_dir())()


def search_main() -> Any:
    """``xentlit search``: a hyperparameter search over training runs (``scripts/search.py``); a user config
    directory (``--config-dir DIR`` or ``XENTLIT_CONFIG_DIR``) joins Hydra's search path."""
    from xentlit.search import main

    argv = _argv_with_user_config_dir(sys.argv)[1:]
    if "--config-dir" in argv:
        i = argv.index("--config-dir")
        if i + 1 == len(argv):
            raise SystemExit("xentlit search: --config-dir needs a directory")
        argv[i:i + 2] = [f"hydra.searchpath=[file://{Path(argv[i + 1]).expanduser().resolve()}]"]
    return main(argv, config_dir=package_config_dir())


def _task(run: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """``run`` behind the per-process settings every command takes from its config."""

    @functools.wraps(run)
    def task(cfg: DictConfig) -> Any:
        import logging

        if logging.getLogger().handlers:  # Hydra's job logging is on: warnings go to the run's log file too
            logging.captureWarnings(True)
        set_threads(cfg.get("threads"))
        return run(cfg)

    return task


def set_threads(threads: int | None) -> None:
    """Torch's intra-op threads for this process: ``threads``, or torch's own default (one per core) for None."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}: expected a number of torch intra-op threads >= 1, or null for torch's "
                         "default (one per core)")
    import torch

    torch.set_num_threads(threads)


def _argv_with_user_config_dir(argv: list[str]) -> list[str]:
    """``XENTLIT_CONFIG_DIR=DIR`` acts as ``--config-dir DIR`` (which, given on the command line, wins)."""
    directory = os.environ.get(CONFIG_DIR_ENV)
    if not directory or any(a in ("--config-dir", "-cd") or a.startswith("--config-dir=") for a in argv[1:]):
        return argv
    return [argv[0], "--config-dir", directory, *argv[1:]]


def _quiet_known_noise() -> None:
    """Silence messages every run would otherwise print, none actionable by the user:

    - Lightning 2.6 builds pytree specs with ``LeafSpec()``, which torch 2.13 deprecates (Lightning's code,
      harmless; it goes away with a Lightning release that follows torch);
    - Lightning's advertisement for its hosted logger, printed at every ``Trainer`` start.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # Lightning's own all_gather (used under DDP) calls a torch function that torch 2.13 deprecates: not the user's
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")

    class _DropTip(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("💡 Tip")

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTip())


# Options that choose where a run writes files.
_OUTPUT_KEYS = ("dirpath", "save_dir", "default_root_dir", "output_dir", "log_dir", "root_dir", "paths")


def _argv_for_resume(argv: list[str]) -> list[str]:
    """``resume=<run dir>`` continues that run in its own directory with its own overrides.

    The run's recorded overrides (``.hydra/overrides.yaml``) come first, so the config is the same; any
    override given now (e.g. a larger ``trainer.max_epochs``) comes after them and wins.
    """
    given = [arg for arg in argv[1:] if arg.startswith("resume=")]
    if not given:
        return argv
    run_dir = Path(given[-1].split("=", 1)[1]).expanduser()
    recorded = run_dir / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        raise SystemExit(f"resume={run_dir}: not a run directory of xentlit (no {recorded})")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(recorded))
    except Exception as err:
        raise SystemExit(f"resume={run_dir}: {recorded} is not a YAML list of overrides ({err})") from None
    if not isinstance(loaded, list) or not all(isinstance(o, str) for o in loaded):
        raise SystemExit(f"resume={run_dir}: {recorded} is not a YAML list of overrides")
    previous = [o for o in loaded if not o.startswith(("resume=", "hydra."))]
    for override in previous:  # where a run writes is this directory: a recorded override cannot move it
        if "$" in override:  # an interpolation (even escaped) can build nodes no check sees: oc.create
            raise SystemExit(f"resume={run_dir}: its recorded override {override!r} holds an interpolation, "
                             "which a resumed run does not take from a file. Nothing was run")
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith(("paths.", "paths=", "trust_targets")) or key.rsplit(".", 1)[-1] in _OUTPUT_KEYS:
            raise SystemExit(f"resume={run_dir}: its recorded override {override!r} sets where the run writes or "
                             "what it trusts; a resumed run writes only into its own directory. Nothing was run")
    now = [arg for arg in argv[1:] if not arg.startswith("resume=")]
    return [argv[0], *previous, *now, f"resume={run_dir.resolve()}", f"hydra.run.dir={run_dir.resolve()}"]


def _argv_for_external_rank(argv: list[str]) -> list[str]:
    """Under ``torchrun`` every rank runs the script: only global rank 0 gets a run directory.

    The other ranks write nothing of their own (loggers, checkpoints and metrics are rank-0-only and
    checkpoint paths are broadcast from rank 0), so Hydra is pointed at a scratch folder for them.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or os.environ.get("RANK", "0") == "0":
        return argv
    scratch = tempfile.mkdtemp(prefix=f"xentlit-rank{os.environ['RANK']}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [*argv, f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=disabled"]


def _job_subprocess_cmd(local_rank: int) -> tuple[list[str], str]:
    """Command for Lightning's DDP child processes: this one job again, in this job's own directory.

    Lightning's default re-runs the whole command line, so a ``-m`` sweep would start a second sweep
    in every child, with per-rank run folders; re-running just this job's overrides keeps one run
    directory per job, in single runs and sweeps alike. The user's config directories come along.
    """
    import __main__
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    relaunch = commands.relaunch_command()
    if relaunch is not None:
        command = [sys.executable, *relaunch]
    elif __main__.__spec__ is None:
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    for source in hydra_cfg.runtime.config_sources:
        if source.provider == "command-line":  # --config-dir
            command += ["--config-dir", source.path]
    command += [o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.searchpath=")]
    command += list(hydra_cfg.overrides.task)
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        "hydra.output_subdir=null",
        f"hydra.job.name={hydra_cfg.job.name}_rank{local_rank}",
    ]
    return command, get_original_cwd()


def _use_one_run_dir_per_job() -> None:
    from lightning.pytorch.strategies.launchers import subprocess_script

    if not hasattr(subprocess_script, "_hydra_subprocess_cmd"):
        raise RuntimeError("this Lightning version launches DDP children differently; xentlit needs an update")
    subprocess_script._hydra_subprocess_cmd = _job_subprocess_cmd
