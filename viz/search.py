"""A parameter search's Optuna study as figures and a table (the studio's Tune tab).

Takes the study itself (any storage), so it needs no model and no search code: Optuna's own
figures (``optuna.visualization``) in this package's style, and one table row per trial. A
trial's user attributes are the search's (``tuning.search``): ``tasks`` (accuracy per task, a
pruned trial's so far), ``mean`` (the normalized mean accuracy), ``seconds`` and ``recipe``.
In a multi-objective (``pareto``) study every task is an objective, so the history, the
importances and the parallel coordinates follow ``mean`` there.
"""

from __future__ import annotations

import math

import optuna
import optuna.visualization as optuna_figures
import plotly.graph_objects as go

from viz.figures import TEMPLATE

COMPLETE = optuna.trial.TrialState.COMPLETE
MEAN = "mean accuracy ÷ best source's"  # the search's objective (tuning.search.normalized_mean)
FIGURES = ("history", "importance", "parallel", "pareto")


def multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def _mean(trial: optuna.trial.FrozenTrial) -> float:
    value = trial.user_attrs.get("mean")
    if value is None and trial.values is not None and len(trial.values) == 1:
        value = trial.values[0]
    return float("nan") if value is None else float(value)


def _target(study: optuna.Study) -> dict:
    """The keyword arguments that make a figure plot the objective (``mean`` of a pareto study)."""
    return {"target": _mean, "target_name": MEAN} if multi_objective(study) else {"target_name": MEAN}


def _styled(figure: go.Figure, title: str) -> go.Figure:
    figure.update_layout(template=TEMPLATE, title_text=title, height=420)
    return figure


def objective_names(study: optuna.Study) -> list[str]:
    """What each objective of ``study`` is: its tasks in the suite's order (then perplexity when
    one more objective is minimized), else the search's mean."""
    if not multi_objective(study):
        return [MEAN]
    done = [t for t in study.get_trials(deepcopy=False, states=(COMPLETE,))]
    tasks = list(done[0].user_attrs.get("tasks", {})) if done else []
    names = [f"{task} accuracy" for task in tasks]
    names += ["perplexity"] * (len(study.directions) - len(names))
    return names[:len(study.directions)]


def history_figure(study: optuna.Study) -> go.Figure:
    """Each finished trial's objective and the best so far (Optuna's optimization history)."""
    return _styled(optuna_figures.plot_optimization_history(study, **_target(study)), "Optimization history")


def importance_figure(study: optuna.Study) -> go.Figure | None:
    """How much each parameter explains the objective (Optuna's default PED-ANOVA evaluator), over
    the parameters every finished trial has; None before two finished trials over two parameters,
    or when the objective has not varied yet."""
    done = study.get_trials(deepcopy=False, states=(COMPLETE,))
    common = set.intersection(*(set(t.params) for t in done)) if done else set()
    values = {_mean(t) for t in done}
    if len(done) < 2 or len(common) < 2 or len(values) < 2:
        return None
    try:
        figure = optuna_figures.plot_param_importances(study, **_target(study))
    except (ValueError, RuntimeError, ZeroDivisionError):  # too few distinct trials for the evaluator
        return None
    return _styled(figure, "Parameter importances")


def parallel_figure(study: optuna.Study) -> go.Figure | None:
    """Every finished trial's parameters and objective as one line across parallel axes."""
    if not study.get_trials(deepcopy=False, states=(COMPLETE,)):
        return None
    return _styled(optuna_figures.plot_parallel_coordinate(study, **_target(study)), "Parallel coordinates")


def pareto_figure(study: optuna.Study) -> go.Figure | None:
    """The trials of a multi-objective study in objective space, the Pareto front highlighted (the
    first three objectives when there are more); None for a single objective."""
    if not multi_objective(study) or not study.get_trials(deepcopy=False, states=(COMPLETE,)):
        return None
    names = objective_names(study)
    if len(names) <= 3:
        figure = optuna_figures.plot_pareto_front(study, target_names=names)
    else:
        figure = optuna_figures.plot_pareto_front(study, target_names=names[:3], targets=lambda t: t.values[:3])
    return _styled(figure, "Pareto front" if len(names) <= 3 else f"Pareto front ({', '.join(names[:3])})")


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best finished trial so far (of a pareto study: the front's trial with the highest mean,
    as ``tuning.search`` reports it), or None."""
    if not study.get_trials(deepcopy=False, states=(COMPLETE,)):
        return None
    if multi_objective(study):
        return max(study.best_trials, key=_mean)
    return study.best_trial


def search_figures(study: optuna.Study) -> dict[str, go.Figure | None]:
    """{name: figure or None} for ``FIGURES``: history, importance, parallel, pareto."""
    return {"history": history_figure(study), "importance": importance_figure(study),
            "parallel": parallel_figure(study), "pareto": pareto_figure(study)}


def trial_rows(study: optuna.Study, method: str | None = None) -> list[dict]:
    """One row per trial: number, state, method (``method`` when the study does not search it),
    the objective (``mean`` of a pareto study), accuracy per task in %, seconds, parameters."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        value = _mean(trial) if trial.state == COMPLETE else float("nan")
        state = "stopped" if trial.user_attrs.get("stopped") else trial.state.name.lower()
        row = {"trial": trial.number, "state": state,
               "method": trial.params.get("merge_method", method or ""),
               "value": None if math.isnan(value) else round(value, 3)}
        row.update({task: round(100 * score, 1) for task, score in trial.user_attrs.get("tasks", {}).items()})
        row["seconds"] = trial.user_attrs.get("seconds")
        row["parameters"] = ", ".join(f"{name}={_short(v)}" for name, v in trial.params.items() if name != "merge_method")
        rows.append(row)
    return rows


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


__all__ = [
    "FIGURES",
    "MEAN",
    "best_trial",
    "history_figure",
    "importance_figure",
    "multi_objective",
    "objective_names",
    "parallel_figure",
    "pareto_figure",
    "search_figures",
    "trial_rows",
]
