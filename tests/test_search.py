"""``xentlit search`` (scripts/search.py): the search file's checks, and a real search with pruning, parallel worker
processes, a SIGKILL in the middle and its continuation, read back from the study and the files it writes."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import CONF, SCRIPTS, run_script

optuna = pytest.importorskip("optuna", reason="needs `pip install -e .[search]` (optuna>=4)")

from xentlit.search import main  # noqa: E402
from xentlit.search.run import STORAGE_FILE, storage  # noqa: E402

# A search whose outcome does not hang on chance: lr 1e-6 is hopeless (chance accuracy), lr 0.03 trains, and every
# lr-0.03 trial is the same run (module.ece_bins only changes the ECE metric), so that good trials tie and are never
# pruned. The median pruner starts after one completed trial, from epoch 0. With the random sampler and seed 11, each
# of the two worker processes proposes lr 0.03 first and 1e-6 second: the second trial of each worker starts after
# its first completed, and is pruned after its first epoch.
TINY = """\
defaults:
  - /search_schema
  - _self_
n_trials: 6
n_jobs: 2
sampler: {name: random, seed: 11}
pruner: {name: median, median: {n_startup_trials: 1, n_warmup_steps: 0}}
params:
  optimizer.lr: {type: categorical, choices: [0.03, 1.0e-6]}
  module.ece_bins: {type: int, low: 5, high: 20}
trial_overrides: [++callbacks.rich_progress_bar=null, trainer.enable_progress_bar=false]
"""
EPOCHS = 3
GOOD, BAD = 0.03, 1e-6


def _user_conf(tmp_path: Path, name: str, text: str) -> str:
    """A config directory of the user's with ``hparams_search/<name>.yaml``; returns its searchpath override."""
    folder = tmp_path / "conf" / "hparams_search"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(text)
    return f"hydra.searchpath=[file://{tmp_path / 'conf'}]"


def _study(sweep: Path):
    return optuna.load_study(study_name="search", storage=storage(sweep))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_search_prunes_survives_a_kill_and_continues_to_its_report(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["hparams_search=tiny", f"hparams_search.dir={sweep}", _user_conf(tmp_path, "tiny", TINY),
            f"trainer.max_epochs={EPOCHS}", "trainer.limit_train_batches=4", "callbacks=none", "logger=none"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, str(SCRIPTS / "search.py"), *args], cwd=tmp_path, stdout=log,
                             stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    # SIGKILL the search process once a trial was pruned and another one is running
    deadline = time.monotonic() + 240
    while True:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        assert time.monotonic() < deadline, "no trial was pruned in time"
        if (sweep / STORAGE_FILE).is_file():
            trials = _study(sweep).get_trials()
            states = [t.state for t in trials]
            running = [t for t in trials if t.state.name == "RUNNING" and (sweep / t.user_attrs.get("run_dir", "-")).is_dir()]
            if optuna.trial.TrialState.PRUNED in states and running:
                break
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    killed = _study(sweep).get_trials()
    workers = {t.user_attrs["pid"] for t in killed}
    assert len(workers) == 2 and first.pid not in workers  # two worker processes ran the trials
    for _ in range(30):  # ... and ended with the search process (at once): no orphan goes on with the search
        if not any(map(_alive, workers)):
            break
        time.sleep(0.1)
    assert not any(map(_alive, workers))
    time.sleep(1)
    assert [t.state for t in _study(sweep).trials] == [t.state for t in killed]
    interrupted = [t for t in killed if t.state.name == "RUNNING"]
    assert interrupted

    # the same command continues the search in its directory
    second = run_script("search.py", *args, cwd=tmp_path)
    assert f"{len(interrupted)} interrupted one(s) queued again" in second.stdout
    study = _study(sweep)
    by_state = {state: [t for t in study.trials if t.state.name == state] for state in ("COMPLETE", "PRUNED", "FAIL")}
    # each interrupted trial failed and ran again, with the parameters it had drawn, to an end
    assert sorted(t.number for t in by_state["FAIL"]) == sorted(t.number for t in interrupted)
    for old in interrupted:
        [again] = [t for t in study.trials if t.system_attrs.get("failed_trial") == old.number]
        assert old.params.items() <= again.params.items() and again.state.name in ("COMPLETE", "PRUNED")
    # n_trials ran to an end (two workers may each start the last one)
    assert 6 <= len(by_state["COMPLETE"]) + len(by_state["PRUNED"]) <= 7
    # the hopeless trials were pruned after their first epoch, the good ones ran all epochs
    assert by_state["PRUNED"] and all(t.params["optimizer.lr"] == BAD for t in by_state["PRUNED"])
    assert len(by_state["COMPLETE"]) >= 2 and all(t.params["optimizer.lr"] == GOOD for t in by_state["COMPLETE"])
    for trial in by_state["PRUNED"]:
        assert sorted(trial.intermediate_values) == [0]
        summary = json.loads((sweep / trial.user_attrs["run_dir"] / "metrics.json").read_text())
        assert summary["status"] == "pruned" and summary["pruned"]["epoch"] == 0
    for trial in by_state["COMPLETE"]:
        assert sorted(trial.intermediate_values) == list(range(EPOCHS)) and trial.value > 0.5
        recorded = yaml.safe_load((sweep / trial.user_attrs["run_dir"] / ".hydra" / "overrides.yaml").read_text())
        assert f"optimizer.lr={GOOD}" in recorded and f"module.ece_bins={trial.params['module.ece_bins']}" in recorded
    assert len({t.user_attrs["pid"] for t in study.trials} - workers) == 2  # two new workers

    # the report: the table of every trial, the best one, the plots
    with open(sweep / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["number"]), r["state"]) for r in rows] == [(t.number, t.state.name.lower()) for t in study.trials]
    assert {"val/acc_best", "epochs", "duration_s", "optimizer.lr", "module.ece_bins", "note"} <= set(rows[0])
    markdown = (sweep / "trials.md").read_text()
    assert "pruned after epoch 0" in markdown and f"interrupted; run again as trial {again.number}" in markdown
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(t.value for t in by_state["COMPLETE"]))
    assert results["best_params"]["optimizer.lr"] == GOOD
    assert results["trials"] == {"complete": len(by_state["COMPLETE"]), "pruned": len(by_state["PRUNED"]),
                                  "fail": len(interrupted)}
    for plot in ("optimization_history.png", "param_importances.png"):
        assert (sweep / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- the search file


def _error(*argv: str, config_dir: Path = CONF) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv), config_dir=config_dir)
    message = str(exit_info.value.code)
    assert message.startswith("xentlit search:"), message
    return message


@pytest.mark.parametrize(("argv", "expected"), [
    (["hparams_search.n_trails=3"], r"hparams_search.n_trails.*Key 'n_trails' not in 'SearchConfig'"),
    (["hparams_search.n_trials=many"], r"hparams_search.n_trials=many"),
    (["hparams_search.direction=up"], r"direction must be maximize or minimize, got 'up'"),
    (["hparams_search.sampler.name=cmaes"], r"sampler.name must be one of tpe, random, gp, got 'cmaes'"),
    (["+hparams_search.pruner.median.warmup=2"], r"pruner.median: optuna's MedianPruner takes no argument\(s\) "
                                                 r"\['warmup'\] \(it takes n_startup_trials, n_warmup_steps"),
    (["hparams_search=nope"], r"Could not find 'hparams_search/nope'.*optuna"),
    (["optimizer.lr=0.1"], r"params.optimizer.lr is searched and also set on the command line"),
    (["-m"], r"'-m' is not used by a search"),
    (["trainer=ddp_cpu"], r"one process on one device"),
])
def test_search_settings_fail_clearly(argv, expected):
    import re

    assert re.search(expected, _error(*argv), re.S)


@pytest.mark.parametrize(("entry", "expected"), [
    ("optimizer.lrr: {type: float, low: 0.001, high: 0.1}", r"params.optimizer.lrr is not a key of the training"),
    ("optimizer.lr: {type: float, low: 0.001}", r"params.optimizer.lr: missing \['high'\]"),
    ("optimizer.lr: {type: float, low: 0.1, high: 0.001}", r"params.optimizer.lr: .*low.*high"),
    ("optimizer.lr: {type: float, low: 0.0, high: 0.1, log: true}", r"params.optimizer.lr: .*low"),
    ("optimizer.lr: {type: flaot, low: 0.001, high: 0.1}", r"params.optimizer.lr must be a mapping with type"),
    ("optimizer.lr: {type: float, low: 0.001, high: 0.1, lg: true}", r"params.optimizer.lr: unknown option\(s\) \['lg'\]"),
    ("loss: {type: categorical, choices: [focal, focall]}", r"params.loss is the config group loss.*\['focall'\]"),
    ("model.hidden_sizes: {type: categorical, choices: [[64]]}", r"write a list as a string"),
])
def test_a_typo_in_the_search_space_fails_clearly(tmp_path, entry, expected):
    import re

    text = "defaults: [/search_schema, _self_]\nparams:\n  " + entry + "\n"
    message = _error("hparams_search=mine", _user_conf(tmp_path, "mine", text))
    assert "hparams_search/mine.yaml" in message and re.search(expected, message), message


def test_a_typo_in_the_search_file_names_the_key(tmp_path):
    text = "defaults: [/search_schema, _self_]\nn_trails: 3\nparams: {optimizer.lr: {type: float, low: 0.1, high: 1}}\n"
    message = _error("hparams_search=mine", _user_conf(tmp_path, "mine", text))
    assert "hparams_search/mine" in message and "Key 'n_trails' not in 'SearchConfig'" in message


# ------------------------------------------------------------------------------------------- the shipped file


def test_shipped_search_space_composes_and_every_corner_trains(compose):
    """conf/hparams_search/optuna.yaml passes its checks, and the extreme values of every range compose into a
    training config that instantiates (every loss the search picks accepts the searched label smoothing)."""
    from hydra.utils import instantiate

    from xentlit.losses import LOSSES
    from xentlit.search.run import load, split_arguments

    search, source, base = load(CONF, *split_arguments([]))
    assert source == "hparams_search/optuna.yaml"
    assert (search["metric"], search["direction"]) == ("val/acc_best", "maximize")
    assert search["sampler"]["name"] == "tpe" and isinstance(search["sampler"]["seed"], int)
    assert search["pruner"]["name"] == "median"
    params = search["params"]
    assert set(params) == {"optimizer.lr", "optimizer.weight_decay", "loss.label_smoothing", "loss"}
    assert params["optimizer.lr"]["log"] and 0 < params["optimizer.lr"]["low"] < 1e-3 < params["optimizer.lr"]["high"]
    shipped = {p.stem for p in (CONF / "loss").glob("*.yaml")}
    assert set(params["loss"]["choices"]) == {n for n in shipped if getattr(LOSSES.get(n), "supports_soft_targets", True)}
    lr, wd, ls = (params[k] for k in ("optimizer.lr", "optimizer.weight_decay", "loss.label_smoothing"))
    for i, loss in enumerate(params["loss"]["choices"]):
        corner = (lr["low"], wd["high"], ls["high"]) if i % 2 else (lr["high"], wd["low"], ls["low"])
        cfg = compose(*search["trial_overrides"], f"loss={loss}", f"optimizer.lr={corner[0]}",
                      f"optimizer.weight_decay={corner[1]}", f"loss.label_smoothing={corner[2]}",
                      "paths.output_dir=unused")
        assert instantiate(cfg.loss).label_smoothing == pytest.approx(corner[2])


def test_old_sweeper_overrides_point_to_the_search_settings():
    assert "hparams_search.n_trials=50" in _error("hydra.sweeper.n_trials=50")


def test_the_training_script_points_a_search_to_its_command(monkeypatch):
    from xentlit.cli import train
    from xentlit.entry import hydra_entry

    monkeypatch.setattr(sys, "argv", ["train.py", "hparams_search=optuna", "hparams_search.n_trials=5"])
    with pytest.raises(SystemExit, match="its own command: xentlit search"):
        hydra_entry(train, config_name="train")()


def test_a_continued_search_refuses_other_settings_and_a_second_search_at_once(tmp_path):
    from xentlit.search.run import _exclusive, _record, load, split_arguments

    sweep = tmp_path / "sweep"
    search, _, _ = load(CONF, *split_arguments(["trainer.max_epochs=3"]))
    _record(sweep, search, ["trainer.max_epochs=3"])  # what the first command recorded
    message = _error(f"hparams_search.dir={sweep}", "trainer.max_epochs=5")
    assert "holds a search with other settings (training overrides (was: trainer.max_epochs=3))" in message
    message = _error(f"hparams_search.dir={sweep}", "trainer.max_epochs=3", "hparams_search.pruner.name=none")
    assert "other settings (pruner)" in message
    with _exclusive(sweep):  # a search command holds the directory
        message = _error(f"hparams_search.dir={sweep}", "trainer.max_epochs=3")
    assert f"another search is running in {sweep}" in message
    assert not (sweep / "study.journal").exists()  # none of them started a study
