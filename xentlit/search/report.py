"""What a search leaves in its sweep directory: the trial table (CSV and Markdown), the best trial
(``optimization_results.yaml``) and Optuna's optimisation-history and parameter-importance plots; all written
atomically, from the study alone (so a finished search can be reported again by rerunning its command)."""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from xentlit.atomic import write_atomic

TABLE_CSV = "trials.csv"
TABLE_MD = "trials.md"
RESULTS = "optimization_results.yaml"
HISTORY_PLOT = "optimization_history.png"
IMPORTANCE_PLOT = "param_importances.png"


def trial_rows(study: Any, search: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, epochs reported, duration, the searched parameters, a note."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    trials = study.get_trials(deepcopy=False)
    retried_as = {Retry.retry_history(t)[-1]: t.number for t in trials if Retry.retry_history(t)}
    rows = []
    for trial in trials:
        state = trial.state.name.lower()
        note = ""
        if state == "pruned" and trial.intermediate_values:
            note = f"pruned after epoch {max(trial.intermediate_values)}"
        elif trial.number in retried_as:
            note = f"interrupted; run again as trial {retried_as[trial.number]}"
        elif "error" in trial.user_attrs:
            note = trial.user_attrs["error"]
        if Retry.retried_trial_number(trial) is not None:
            note = f"{note + '; ' if note else ''}retry of trial {Retry.retry_history(trial)[-1]}"
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        rows.append({
            "number": trial.number, "state": state, search["metric"]: trial.value,
            "epochs": len(trial.intermediate_values), "duration_s": duration,
            **{name: trial.params.get(name) for name in search["params"]},
            "run_dir": trial.user_attrs.get("run_dir", ""), "note": note,
        })
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown(rows: list[dict[str, Any]], lines_before: list[str]) -> str:
    """The rows as a Markdown table, after ``lines_before``."""
    if not rows:
        return "\n".join([*lines_before, "", "No trials yet."]) + "\n"
    columns = list(rows[0])
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join([*lines_before, "", *table]) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def write_plots(study: Any, sweep: Path) -> list[str]:
    """Optuna's optimisation history (needs a completed trial) and parameter importances (needs two); returns a
    line per plot that could not be drawn, saying why."""
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

    from xentlit.plots import save_figure

    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    notes = []
    for name, plot, needed in ((HISTORY_PLOT, plot_optimization_history, 1),
                               (IMPORTANCE_PLOT, plot_param_importances, 2)):
        if completed < needed:
            notes.append(f"{name} not drawn: it needs {needed} completed trial(s), the study has {completed}")
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:  # Optuna's remarks go into the table's notes
                warnings.simplefilter("always", UserWarning)
                axes = plot(study)
        except (ValueError, RuntimeError) as err:
            notes.append(f"{name} not drawn: {err}")
            continue
        notes += [f"{name}: {w.message}" for w in caught if w.category is UserWarning]
        figure = axes.figure
        figure.set_size_inches(8, 5)
        figure.set_layout_engine("constrained")  # long parameter names and the legend stay inside the image
        save_figure(figure, sweep / name)
        plt.close(figure)
    return notes


def write_report(study: Any, sweep: Path, search: Mapping[str, Any]) -> dict[str, Any]:
    """Write the trial table, the best trial and the plots into ``sweep``; print the table; return the best
    trial's entry of ``optimization_results.yaml``."""
    from optuna.trial import TrialState

    rows = trial_rows(study, search)
    notes = write_plots(study, sweep)
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial if completed else None
    results = {
        "metric": search["metric"], "direction": search["direction"],
        "best_trial": best.number if best else None, "best_value": best.value if best else None,
        "best_params": dict(best.params) if best else {},
        "run_dir": str(sweep / best.user_attrs["run_dir"]) if best and "run_dir" in best.user_attrs else None,
        "trials": {state.name.lower(): sum(r["state"] == state.name.lower() for r in rows)
                   for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)},
    }
    headline = (f"Best: trial {best.number}, {search['metric']} = {best.value:.4f} ({search['direction']}), "
                + ", ".join(f"{k}={_cell(v)}" for k, v in best.params.items()) if best
                else "Best: none (no trial completed)")
    counts = ", ".join(f"{n} {state}" for state, n in results["trials"].items())
    text = markdown(rows, [f"# Search {search['study_name']} ({sweep})", "", f"{len(rows)} trials: {counts}.",
                           "", headline, *(f"\n{n}" for n in notes)])
    write_atomic(sweep / TABLE_CSV, _csv(rows))
    write_atomic(sweep / TABLE_MD, text)
    write_atomic(sweep / RESULTS, yaml.safe_dump(results, sort_keys=False))
    print(text, flush=True)
    return results
