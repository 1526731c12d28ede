"""``autoslim report``: a study's trials as CSV, its Pareto front and hypervolume history as HTML and PNG.

Files written to the output folder:

- ``trials.csv``: ``study.trials_dataframe()`` (number, state, objective
  values, times, sampled parameters) plus every scalar user attr, nested
  ones flattened (``user_attrs_config.params.rounds``); lists (the training
  history) are left out. One row per trial, whatever its state.
- ``pareto.html`` (interactive, :func:`optuna.visualization.plot_pareto_front`)
  and ``pareto.png`` (accuracy against parameters, log scale; a third
  objective is not drawn).
- ``hypervolume.html`` / ``hypervolume.png``: the normalised hypervolume of the
  feasible front after each finished trial, against the study's reference
  point (:func:`autoslim.search.pareto.hypervolume_history`, as ``autoslim show``).

The HTML files share one ``plotly.min.js`` written beside them (no network needed).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from autoslim.config import STUDY_NAME, STUDY_NAME_RULE
from autoslim.errors import UsageError
from autoslim.search.pareto import hypervolume_history, is_feasible, pareto_front, reference_point


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """``study.trials_dataframe()`` without its raw user-attr columns, plus the flattened scalar user attrs.

    >>> trials_frame(study)[["number", "state", "values_accuracy", "user_attrs_method"]]  # doctest: +SKIP
    """
    df = study.trials_dataframe(attrs=("number", "state", "values", "datetime_start", "datetime_complete",
                                       "duration", "params"))
    attrs = pd.json_normalize([t.user_attrs for t in study.trials], sep=".")
    scalar = [c for c in attrs.columns if not attrs[c].map(lambda v: isinstance(v, (list, dict))).any()]
    return pd.concat([df.reset_index(drop=True), attrs[scalar].add_prefix("user_attrs_")], axis=1)


def default_report_dir(study_name: str) -> Path:
    """``reports/<study name>``; a UsageError line if the name is not one a study file accepts (a study
    made elsewhere may be named ``../x``): pass ``--out`` then.

    >>> default_report_dir("quickstart")
    PosixPath('reports/quickstart')
    """

    if not STUDY_NAME.fullmatch(study_name):
        raise UsageError(f"--out: study name {study_name!r} cannot name a folder (accepted: {STUDY_NAME_RULE}); "
                         "pass --out DIR")
    return Path("reports") / study_name


def write_report(study: optuna.Study, *, out: str | Path) -> dict[str, Path]:
    """Write trials.csv, pareto.html/.png and hypervolume.html/.png into ``out``; return them by name.

    >>> write_report(study, out="reports/quickstart")  # doctest: +SKIP
    {'trials.csv': PosixPath('reports/quickstart/trials.csv'), 'pareto.html': ..., ...}
    """
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise UsageError(f"report: study {study.study_name!r} has no completed trials yet")
    try:
        ref = reference_point(study)
    except ValueError as e:
        raise UsageError(f"report: {e}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("trials.csv", "pareto.html", "pareto.png", "hypervolume.html",
                                           "hypervolume.png")}
    trials_frame(study).to_csv(paths["trials.csv"], index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fig = optuna.visualization.plot_pareto_front(study)
    fig.write_html(paths["pareto.html"], include_plotlyjs="directory")
    _pareto_png(study, paths["pareto.png"])
    history = hypervolume_history(study)
    ref_text = ", ".join(f"{name} {v:,.6g}" for name, v in zip(study.metric_names or [], ref))
    title = f"Hypervolume of study {study.study_name!r} (normalised; reference point: {ref_text})"
    _hypervolume_html(history, paths["hypervolume.html"], title=title)
    _hypervolume_png(history, paths["hypervolume.png"], title=title)
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _pareto_png(study: optuna.Study, path: Path) -> None:
    plt = _pyplot()
    names = list(study.metric_names or ["accuracy", "params"])
    acc, par = names.index("accuracy"), names.index("params")
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = sorted(pareto_front(study), key=lambda t: t.values[par])
    on_front = {t.number for t in front}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for feasible in (True, False):
        pts = [t for t in done if is_feasible(t) == feasible and t.number not in on_front]
        if pts:
            ax.scatter([t.values[par] for t in pts], [100 * t.values[acc] for t in pts], s=25,
                       c="#b0b0b0" if feasible else "none", edgecolors="#b0b0b0",
                       label="other trials" if feasible else "infeasible")
    ax.step([t.values[par] for t in front], [100 * t.values[acc] for t in front], where="post", color="#1f77b4",
            alpha=0.5)
    for method in dict.fromkeys(t.user_attrs.get("method", "?") for t in front):
        pts = [t for t in front if t.user_attrs.get("method", "?") == method]
        ax.scatter([t.values[par] for t in pts], [100 * t.values[acc] for t in pts], s=45, zorder=3,
                   label=f"Pareto front: {method}")
    for t in front:
        ax.annotate(str(t.number), (t.values[par], 100 * t.values[acc]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (non-zeros for sparse results; log scale)")
    ax.set_ylabel("validation accuracy (%)")
    extra = f"; {names[2]} not shown" if len(names) > 2 else ""
    ax.set_title(f"Study {study.study_name!r}: {len(front)} of {len(done)} completed trials on the front{extra}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _hypervolume_html(history: list[tuple[int, float]], path: Path, *, title: str) -> None:
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[n for n, _ in history], y=[hv for _, hv in history], mode="lines+markers",
                               name="hypervolume"))
    fig.update_layout(title=title, xaxis_title="trial", yaxis_title="hypervolume", template="plotly_white")
    fig.write_html(path, include_plotlyjs="directory")


def _hypervolume_png(history: list[tuple[int, float]], path: Path, *, title: str) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([n for n, _ in history], [hv for _, hv in history], "o-", drawstyle="steps-post")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("hypervolume")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
