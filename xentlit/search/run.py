"""``xentlit search``: a hyperparameter search with Optuna over the ordinary training runs.

The glue, in order: compose the search file (``conf/hparams_search/<name>.yaml``) and the training config of the
command line, and check both; open (or continue) the Optuna study kept in the sweep directory (a
:class:`~optuna.storages.JournalStorage` file, shared by processes); mark the trials a killed search left running
as failed and queue them again (Optuna's :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`); let
``n_jobs`` worker processes ask the study for trials until ``n_trials`` have ended. Each trial composes the training
config (the command line's overrides, then the trial's sampled ones) with Hydra's compose API and runs
:func:`xentlit.cli.train` as a Hydra job in ``<sweep>/trial_<number>``; a callback reports the metric after every
validation epoch to the trial and stops the run when the pruner says so. At the end the trial table and Optuna's
plots are written into the sweep directory (:mod:`xentlit.search.report`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from xentlit.atomic import write_atomic
from xentlit.search import space

USAGE = """\
usage: xentlit search [hparams_search=<name>] [hparams_search.<key>=<value> ...] [training overrides ...]

Hyperparameter search with Optuna over ordinary training runs. The search space and its settings are
conf/hparams_search/<name>.yaml (default: optuna); every other override is the training's, as for `xentlit train`:
  xentlit search hparams_search.n_trials=50 hparams_search.n_jobs=2 trainer.max_epochs=20 data=synthetic
  xentlit search hparams_search.pruner.name=hyperband          # or median (default), none
  xentlit search hparams_search.dir=outputs/search/lr          # a named sweep directory
Rerun the same command with the sweep directory to continue a search (after a kill too): finished trials are
kept, one that was running is run again. The sweep directory holds one run directory per trial (trial_0000, ...),
the study (study.journal), trials.csv / trials.md, optimization_results.yaml and the plots.
"""

PREFIX = "hparams_search"
STORAGE_FILE = "study.journal"
RECORD_FILE = "search.yaml"
LOCK_FILE = ".search.lock"
# What must be the same to continue a search in its directory (n_trials, n_jobs may change).
_RECORDED = ("metric", "direction", "study_name", "sampler", "pruner", "params", "trial_overrides")


@dataclass(frozen=True)
class Settings:
    """Everything a worker process needs (plain data: it crosses to spawned processes)."""

    config_dir: str
    sweep_dir: str
    source: str  # the search file, for messages
    search: dict[str, Any]
    overrides: tuple[str, ...]  # the command line's training overrides
    started_with: int  # trials in the study when this command started (a continued search gets fresh seeds)


def main(argv: Sequence[str] | None = None, config_dir: str | Path | None = None) -> None:
    """Run ``xentlit search`` with ``argv`` (default ``sys.argv[1:]``) on the configs in ``config_dir``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(USAGE, end="")
        return
    try:
        import optuna  # noqa: F401  (the search needs it: say so before any work)
    except ImportError:
        raise SystemExit("xentlit search needs Optuna: pip install 'xentlit[search]' (or optuna>=4)") from None
    _quiet()
    if config_dir is None:
        from xentlit.entry import package_config_dir

        config_dir = package_config_dir()
    config_dir = Path(config_dir)
    search_args, train_args = split_arguments(argv)
    search, source, base = load(config_dir.resolve(), search_args, train_args)
    sweep = Path(search["dir"] or Path(base.paths.log_dir) / "search" /
                 f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{uuid.uuid4().hex[:6]}").resolve()
    with _exclusive(sweep):
        _record(sweep, search, train_args)
        study = open_study(sweep, search, source)
        retried = retry_interrupted(study)
        settings = Settings(str(config_dir.resolve()), str(sweep), source, search, tuple(train_args),
                            len(study.get_trials(deepcopy=False)))
        print(f"xentlit search: study {search['study_name']!r} in {sweep}: {trials_used(study)} of "
              f"{search['n_trials']} trials done{f', {retried} interrupted one(s) queued again' if retried else ''}. "
              f"Continue an interrupted search with the same command and hparams_search.dir={sweep}", flush=True)
        failed_workers = _run_workers(settings) if trials_used(study) < search["n_trials"] else 0
        from xentlit.search.report import write_report

        write_report(study, sweep, search)
    if failed_workers:
        raise SystemExit(f"xentlit search: {failed_workers} worker process(es) failed (see above); the trials they "
                         f"finished are kept: continue with hparams_search.dir={sweep}")


def split_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(search overrides, training overrides)``: ``hparams_search[.key]=...`` are the search's."""
    search, train = [], []
    for arg in argv:
        key = arg.lstrip("+~").split("=", 1)[0]
        if arg in ("-m", "--multirun") or key.startswith("hydra.sweeper") or key == "hydra.sweep.dir":
            raise SystemExit(f"xentlit search: {arg!r} is not used by a search: its settings are "
                             f"{PREFIX}.<key> (e.g. {PREFIX}.n_trials=50, {PREFIX}.dir=<sweep dir>)")
        (search if key == PREFIX or key.startswith(PREFIX + ".") else train).append(arg)
    return search, train


def load(config_dir: Path, search_args: Sequence[str], train_args: Sequence[str]) -> tuple[dict, str, DictConfig]:
    """The checked search settings (a plain dict), the search file's name and the base training config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from xentlit.config import register_configs

    register_configs()
    space.register_schema()
    chosen = [a.split("=", 1)[1] for a in search_args if a.split("=", 1)[0] == PREFIX]
    source = f"{PREFIX}/{chosen[-1] if chosen else 'optuna'}.yaml"
    # the search file is looked up where the training's configs are: conf/ and any hydra.searchpath given
    searchpath = [a for a in train_args if a.lstrip("+").split("=", 1)[0] == "hydra.searchpath"]
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="train"):
        loader = GlobalHydra.instance().config_loader()
        node = _composed(lambda: compose(space.ROOT_NAME, overrides=[*searchpath, *search_args]), source)[PREFIX]
        search = OmegaConf.to_container(node, resolve=True)
        _fail_clearly(lambda: space.check(search, source))
        overrides = [*search["trial_overrides"], *train_args]
        base = _composed(lambda: compose("train", overrides=overrides, return_hydra_config=True), "training config")
        groups = functools.partial(loader.get_group_options, config_name="train", overrides=list(train_args))
        _fail_clearly(lambda: check_against_training(search, base, train_args, groups, source))
    return search, source, base


def _composed(compose_it: Any, what: str) -> DictConfig:
    """``compose_it()``, Hydra's composition errors turned into one clear exit message (with their cause)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose_it()
    except (HydraException, OmegaConfBaseException) as err:
        cause = f" ({str(err.__cause__).splitlines()[0]})" if err.__cause__ and str(err.__cause__) else ""
        raise SystemExit(f"xentlit search: {what}: {err}{cause}") from None


def _fail_clearly(run_check: Any) -> None:
    try:
        run_check()
    except ValueError as err:
        raise SystemExit(f"xentlit search: {err}") from None


def check_against_training(search: Mapping[str, Any], base: DictConfig, train_args: Sequence[str],
                           group_options: Any, source: str) -> None:
    """Every searched name is a key or a config group of the training config (each choice an option of the group),
    not also set on the command line; every trial runs in one process."""
    choices = base.hydra.runtime.choices
    given = {a.lstrip("+~").split("=", 1)[0] for a in train_args}
    for name, spec in search["params"].items():
        if name in given:
            raise ValueError(f"{source}: params.{name} is searched and also set on the command line ({name}=...): "
                             "drop one of them")
        if name in choices:
            options = group_options(name)
            unknown = [c for c in spec.get("choices", []) if str(c) not in options]
            if spec["type"] != "categorical" or unknown:
                raise ValueError(f"{source}: params.{name} is the config group {name}: search it as categorical "
                                 f"among its options ({', '.join(options)}); not {unknown or spec['type']}")
        elif OmegaConf.select(base, name, default=_ABSENT) is _ABSENT and name.split(".")[0] not in search["params"]:
            raise ValueError(f"{source}: params.{name} is not a key of the training config "
                             f"(check the spelling; a new key is not searched)")
    strategy = str(base.trainer.get("strategy", "auto"))
    if "ddp" in strategy or str(base.trainer.get("devices", 1)) not in ("1", "auto"):
        raise ValueError(f"xentlit search runs every trial in one process on one device (trainer.strategy={strategy}, "
                         f"trainer.devices={base.trainer.get('devices')}): use trainer=default or cpu, and "
                         f"{PREFIX}.n_jobs for trials in parallel")


_ABSENT = object()


@contextlib.contextmanager
def _exclusive(sweep: Path) -> Iterator[None]:
    """Hold the sweep directory's lock: one search command at a time per directory (the kernel frees it on a kill)."""
    sweep.mkdir(parents=True, exist_ok=True)
    with open(sweep / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"xentlit search: another search is running in {sweep}; wait for it or use another "
                             f"{PREFIX}.dir") from None
        yield


def _record(sweep: Path, search: Mapping[str, Any], train_args: Sequence[str]) -> None:
    """Write the search's settings into the sweep directory, or check that a continued search has the same ones."""
    record = {"search": {key: search[key] for key in _RECORDED}, "overrides": list(train_args)}
    path = sweep / RECORD_FILE
    if path.is_file():
        previous = yaml.safe_load(path.read_text())
        changed = [k for k in _RECORDED if previous["search"].get(k) != record["search"][k]]
        if previous["overrides"] != record["overrides"]:
            changed.append(f"training overrides (was: {' '.join(previous['overrides']) or 'none'})")
        if changed:
            raise SystemExit(f"xentlit search: {sweep} holds a search with other settings ({', '.join(changed)}); "
                             f"continue it with the same ones (only n_trials and n_jobs may change) or use another "
                             f"{PREFIX}.dir")
        return
    write_atomic(path, yaml.safe_dump(record, sort_keys=False))


def storage(sweep: Path) -> Any:
    """The study's storage: Optuna's journal file in the sweep directory, safe for several processes."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(sweep / STORAGE_FILE)))


def open_study(sweep: Path, search: Mapping[str, Any], source: str, seed: int | None = None,
               create: bool = True) -> Any:
    """The study in ``sweep`` (created on the first call), with the configured sampler (``seed``) and pruner."""
    import optuna

    sampler = space.build_sampler(search["sampler"], seed if seed is not None else search["sampler"]["seed"], source)
    pruner = space.build_pruner(search["pruner"], source)
    if not create:
        return optuna.load_study(storage=storage(sweep), study_name=search["study_name"], sampler=sampler, pruner=pruner)
    return optuna.create_study(storage=storage(sweep), study_name=search["study_name"], direction=search["direction"],
                               load_if_exists=True, sampler=sampler, pruner=pruner)


def retry_interrupted(study: Any) -> int:
    """Trials left RUNNING by a killed search (none can run now: the lock is ours) become FAIL, and each is queued
    again with its parameters; returns how many."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    stale = study.get_trials(states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
        RetryHeartbeatStaleTrialCallback()(study, trial)
    return len(stale)


def trials_used(study: Any) -> int:
    """Trials that count towards ``n_trials``: completed, pruned, failed with an error, and running; not the
    interrupted ones that were queued again, nor queued ones."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
               or (t.state == TrialState.FAIL and t.number not in retried) for t in trials)


def _run_workers(settings: Settings) -> int:
    """Run the trials: in this process for ``n_jobs: 1``, else in that many spawned processes; returns how many
    worker processes failed."""
    n_jobs = settings.search["n_jobs"]
    if n_jobs == 1:
        try:
            work(settings, 0)
        except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C or SIGTERM during a trial: it is run again later
            _interrupted(settings, stop)
        return 0
    import multiprocessing

    # fork (Linux): the workers start at once, with this process's imports (no torch op has run here, no thread
    # started: what DataLoader workers rely on too); spawn where fork is not the platform's safe default
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    workers = [context.Process(target=work, args=(settings, i, os.getpid()), name=f"xentlit-search-{i}")
               for i in range(n_jobs)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join()
    except KeyboardInterrupt as stop:  # the workers got the Ctrl-C too: their trials stop and stay to be run again
        for worker in workers:
            worker.join()
        _interrupted(settings, stop)
    return sum(worker.exitcode != 0 for worker in workers)


def _interrupted(settings: Settings, stop: BaseException) -> None:
    code = stop.code if isinstance(stop, SystemExit) else None
    if isinstance(code, str):  # a run's own error message (e.g. a full disk): the search ends with it
        raise stop
    print(f"xentlit search: interrupted; the trials that were running will run again: continue with the same "
          f"command and {PREFIX}.dir={settings.sweep_dir}", file=sys.stderr, flush=True)
    raise SystemExit(code if isinstance(code, int) else 128 + signal.SIGINT) from None


def work(settings: Settings, worker: int, parent: int | None = None) -> None:
    """One worker: ask the study for trials and run them until ``n_trials`` have ended (or are running)."""
    import numpy as np
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if parent is not None:  # a worker process
        _die_with(parent)
        import torch

        _quiet()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.search["n_jobs"]))
        from xentlit.config import register_configs

        register_configs()  # again under spawn
    search = settings.search
    seed = search["sampler"]["seed"]
    if seed is not None:  # each worker, and each continuation, its own stream of random proposals
        seed = int(np.random.SeedSequence([seed, settings.started_with, worker]).generate_state(1)[0])
    study = open_study(Path(settings.sweep_dir), search, settings.source, seed=seed, create=False)
    objective = functools.partial(run_trial, settings=settings)
    with initialize_config_dir(config_dir=settings.config_dir, version_base="1.3", job_name="train"):
        context = _hydra_context(GlobalHydra.instance().config_loader())
        while trials_used(study) < search["n_trials"]:
            study.optimize(functools.partial(objective, context=context), n_trials=1, catch=(Exception,))


def _quiet() -> None:
    """The training's filters for known noise, and none for Optuna's experimental-API notes (the retry callback)."""
    import optuna

    from xentlit.entry import _quiet_known_noise

    _quiet_known_noise()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _hydra_context(loader: Any) -> Any:
    from hydra._internal.callbacks import Callbacks
    from hydra.types import HydraContext

    return HydraContext(config_loader=loader, callbacks=Callbacks())


def _die_with(parent: int) -> None:
    """End this worker when the search process ends, also by SIGKILL (Linux: the kernel's parent-death signal;
    elsewhere a thread that watches the parent), so that no orphan runs trials beside a continued search."""
    with contextlib.suppress(Exception):
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the call
                os._exit(1)
            return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_trial(trial: Any, settings: Settings, context: Any) -> float:
    """One trial: its overrides sampled, the training config composed, the run made as a Hydra job in
    ``<sweep>/trial_<number>``; returns the run's metric (raises ``TrialPruned`` when the pruner stopped it)."""
    import optuna
    from hydra import compose
    from hydra.core.utils import run_job

    from xentlit.cli import train

    search = settings.search
    name = f"trial_{trial.number:04d}"
    trial.set_user_attr("run_dir", name)
    trial.set_user_attr("pid", os.getpid())
    try:
        sampled = [space.override(key, space.suggest(trial, key, spec)) for key, spec in search["params"].items()]
        overrides = [*search["trial_overrides"], *settings.overrides, *sampled, f"optimized_metric={search['metric']}"]
        job = ["hydra.mode=MULTIRUN", f'hydra.sweep.dir="{settings.sweep_dir}"', f"hydra.sweep.subdir={name}",
               f"hydra.job.num={trial.number}", f"hydra.job.id={trial.number}"]
        cfg = compose("train", overrides=[*overrides, *job], return_hydra_config=True)
        reporter = ReportToTrial(trial, search["metric"])
        result = run_job(functools.partial(train, callbacks=(reporter,)), cfg, "hydra.sweep.dir", "hydra.sweep.subdir",
                         context).return_value  # raises the run's error
    except KeyboardInterrupt:  # outside Lightning's own handling: leave the trial RUNNING, to be run again
        raise SystemExit(130) from None
    except Exception as err:
        trial.set_user_attr("error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        raise
    if reporter.pruned is not None:
        epoch, value = reporter.pruned
        _mark_pruned(Path(settings.sweep_dir) / name, epoch, search["metric"], value)
        raise optuna.TrialPruned(f"pruned after epoch {epoch}: {search['metric']}={value:.4g}")
    if result is None:
        raise ValueError(f"{name}: the run logged no {search['metric']} (or NaN); see its metrics.json")
    return result


def _mark_pruned(run_dir: Path, epoch: int, metric: str, value: float) -> None:
    """Say in the run's ``metrics.json`` that the search pruned it (the run itself ended as an early stop)."""
    path = run_dir / "metrics.json"
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads(path.read_text())
        summary.update(status="pruned", pruned={"epoch": epoch, "metric": metric, "value": value})
        write_atomic(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")


class ReportToTrial(Callback):
    """Reports ``metric`` to the Optuna trial after every validation epoch (step = epoch) and, when the study's
    pruner says the trial is unpromising, stops the fit like an early stop; ``pruned`` is then ``(epoch, value)``."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.pruned: tuple[int, float] | None = None

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            raise KeyError(f"hparams_search.metric {self.metric!r} is not logged at validation (logged: "
                           f"{', '.join(sorted(trainer.callback_metrics)) or 'nothing'})")
        epoch = trainer.current_epoch
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            self.pruned = (epoch, float(value))
            trainer.should_stop = True
