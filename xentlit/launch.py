"""How the scripts start: the Hydra entry point, the command line of a resumed run or a torchrun rank, the
command of Lightning's DDP children, and what a job leaves behind for the next job of a ``-m`` sweep."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf


def hydra_entry(run: Callable[[DictConfig], Any], config_name: str) -> Callable[[], Any]:
    """The ``main`` of a script in ``scripts/``: registers the schemas, composes ``conf/<config_name>.yaml``
    (Hydra overrides and ``-m`` sweeps from the command line) and calls ``run`` with the config."""
    import hydra

    from xentlit.config import register_configs

    register_configs()
    _use_one_run_dir_per_job()
    _quiet_known_noise()
    config_dir = Path(sys.modules["__main__"].__file__ or ".").resolve().parents[1] / "conf"
    main = hydra.main(version_base="1.3", config_path=str(config_dir), config_name=config_name)(run)

    def entry() -> Any:
        if any(arg.lstrip("+~").split("=", 1)[0].split(".")[0] == "hparams_search" for arg in sys.argv[1:]):
            raise SystemExit("hparams_search=... is a hyperparameter search, its own command: xentlit search (or "
                             "python scripts/search.py) with the same overrides")
        sys.argv = _argv_for_external_rank(_argv_for_resume(sys.argv))
        return main()

    return entry


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
    directory per job, in single runs and sweeps alike.
    """
    import __main__
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    if __main__.__spec__ is None:
        command = [sys.executable, os.path.abspath(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
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


# What Lightning's DDP launcher writes into the launching process's environment.
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def _distributed_job() -> Iterator[None]:
    """Leave no DDP state behind, so the next job of a ``-m`` sweep launches its own processes.

    Lightning's launcher sets ``LOCAL_RANK`` (and friends) in the launching process, which would make the
    next job believe an external launcher created its processes; the process group is also left open.
    """
    saved = {name: os.environ.get(name) for name in _LAUNCHER_ENV}
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _one_tracker_run_per_job() -> Iterator[None]:
    """Finish the W&B run when the job ends, also on an error: W&B keeps one global run per process and
    Lightning's WandbLogger reuses it, so later jobs of a -m sweep would log into the first job's run."""
    try:
        yield
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()
