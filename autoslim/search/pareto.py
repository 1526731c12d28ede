"""The result of a study: its Pareto front, its hypervolume, and the table users read.

The hypervolume is measured in normalised units against the study's reference
point (stored with the study; by default accuracy 0 and the uncompressed
network's parameters, FLOPs and latency): accuracy counts as is and each
minimised objective is divided by its reference value. With (accuracy, params)
it is the area, in [0, 1], of the region the front dominates in
(accuracy in [0, 1]) x (fraction of the uncompressed parameters in [0, 1]).

>>> pareto_mask([[0.9, 100], [0.8, 50], [0.7, 80]], ["maximize", "minimize"]).tolist()
[True, True, False]
>>> round(hypervolume([[0.9, 50], [0.8, 20]], ["maximize", "minimize"], [0.0, 100]), 4)
0.69

:func:`box_hypervolume` measures fronts of different studies in one fixed box
instead (``benchmarks/bench_search.py``: validation error 0-5% by log10
parameters from 2 to log10 of the uncompressed size).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState


def _minimized(values, directions: Sequence[str]) -> np.ndarray:
    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return np.asarray(values, dtype=float).reshape(-1, len(directions)) * sign


def pareto_mask(values, directions: Sequence[str]) -> np.ndarray:
    """True for each point that no other point dominates (ties on every objective are kept)."""
    v = _minimized(values, directions)
    better_eq = (v[None, :, :] <= v[:, None, :]).all(-1)   # [i, j]: j is at least as good as i everywhere
    strictly = (v[None, :, :] < v[:, None, :]).any(-1)     # [i, j]: j is better somewhere
    return ~(better_eq & strictly).any(1)


def is_feasible(trial: FrozenTrial) -> bool:
    """Optuna's rule: feasible when every constraint value is zero or less."""
    return all(c <= 0 for c in trial.constraints.values())


def hypervolume(values, directions: Sequence[str], reference: Sequence[float]) -> float:
    """Normalised hypervolume of ``values`` against ``reference`` (points beyond it count for nothing)."""
    from optuna._hypervolume import compute_hypervolume

    ref = np.asarray(reference, dtype=float)
    scale = np.array([1.0 if d == "maximize" else 1.0 / r for d, r in zip(directions, ref)])
    loss = _minimized(values, directions) * scale
    ref_loss = _minimized(ref, directions)[0] * scale
    inside = loss[(loss < ref_loss).all(1)]
    if len(inside) == 0:
        return 0.0
    return float(compute_hypervolume(inside, ref_loss))


def box_hypervolume(points, *, lower: Sequence[float], upper: Sequence[float]) -> float:
    """The share of the box ``[lower, upper]`` that ``points`` dominate, every objective minimised.

    Each coordinate is mapped onto [0, 1] (``lower`` to 0, ``upper`` to 1), so the
    result lies in [0, 1]. A point outside the box contributes its clipped part:
    each coordinate is clipped into [0, 1] first, so a point below ``lower``
    counts as if on it, and a point at or beyond ``upper`` in any objective
    dominates nothing inside the box and contributes nothing.

    Hand computation, box error [0, 0.05] x log10 parameters [2, 5]: (0.01, 3)
    maps to (0.2, 1/3) and dominates 0.8 x 2/3 = 0.5333; (0.03, 2.5) maps to
    (0.6, 1/6) and adds 0.4 x (1/3 - 1/6) = 0.0667; (0.06, 2.2) lies beyond 5%
    error and adds nothing; one network below both lower bounds fills the box.

    >>> round(box_hypervolume([[0.01, 3.0], [0.03, 2.5], [0.06, 2.2]], lower=[0, 2], upper=[0.05, 5]), 4)
    0.6
    >>> box_hypervolume([[0.0, 1.0]], lower=[0, 2], upper=[0.05, 5])
    1.0
    """
    lo, hi = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    if lo.shape != hi.shape or not (hi > lo).all():
        raise ValueError(f"box_hypervolume: upper {list(hi)} must exceed lower {list(lo)} in every objective")
    unit = np.clip((np.asarray(points, dtype=float).reshape(-1, len(lo)) - lo) / (hi - lo), 0.0, 1.0)
    if len(unit) == 0:
        return 0.0
    return hypervolume(unit, ["minimize"] * len(lo), [1.0] * len(lo))


def reference_point(study: optuna.Study) -> list[float]:
    """The study's stored reference point, in the order of its objectives."""
    ref = study.user_attrs.get("reference_point")
    if ref is None:
        raise ValueError(f"study {study.study_name!r} has no reference point (not created by autoslim)")
    return [ref[name] for name in (study.metric_names or [])]


def hypervolume_history(study: optuna.Study) -> list[tuple[int, float]]:
    """``(trial number, hypervolume of the feasible front after it)`` for every finished trial."""
    directions = [d.name.lower() for d in study.directions]
    ref = reference_point(study)
    points, history = [], []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == TrialState.COMPLETE and is_feasible(t):
            points.append(t.values)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            history.append((t.number, hypervolume(points, directions, ref) if points else 0.0))
    return history


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Completed, feasible trials not dominated by another, ordered by the first objective."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_feasible(t)]
    if not trials:
        return []
    directions = [d.name.lower() for d in study.directions]
    mask = pareto_mask([t.values for t in trials], directions)
    front = [t for t, keep in zip(trials, mask) if keep]
    return sorted(front, key=lambda t: (-t.values[0] if directions[0] == "maximize" else t.values[0], t.number))


COLUMNS = ["trial", "method", "accuracy", "test_accuracy", "params", "nonzeros", "flops", "latency_ms",
           "compression", "hyperparameters"]


def summary(study: optuna.Study) -> dict:
    """The result of a study: its feasible Pareto front, hypervolume, reference point and history; ``trials``
    counts the finished trials (``pruned``, ``failed``, ``infeasible`` among them), ``running`` and ``waiting``
    (queued: warm starts, retries, the slots of ``--n-trials``) the others."""
    history = hypervolume_history(study)
    front = pareto_front(study)
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    return {"study": study.study_name, "objectives": list(study.metric_names or []),
            "reference_point": dict(zip(study.metric_names or [], reference_point(study))),
            "hypervolume": history[-1][1] if history else 0.0,
            "trials": sum(s.is_finished() for s in states),
            "infeasible": sum(t.state == TrialState.COMPLETE and not is_feasible(t) for t in trials),
            "pruned": states.count(TrialState.PRUNED), "failed": states.count(TrialState.FAIL),
            "running": states.count(TrialState.RUNNING), "waiting": states.count(TrialState.WAITING),
            "front": trials_table(front).to_dict(orient="records"),
            "hypervolume_history": [{"trial": n, "hypervolume": hv} for n, hv in history]}


def trials_table(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """One row per trial: its measurements and its method's hyperparameters (first its size target, where it had
    one: ``target_params=4000``, or ``cap_params=10000`` for a warm start capped at the budget)."""
    rows = []
    for t in trials:
        a = t.user_attrs
        # The sampled hyperparameters (pinned ones are the same in every trial), without the method prefix (which
        # may itself hold dots: an import string 'package.module:Class').
        method = str(t.params.get("method", a.get("method")))
        params = {k[len(method) + 1:]: v for k, v in t.params.items() if k.startswith(f"{method}.")}
        target = (a.get("config") or {}).get("target")  # the size it removed down to (TrialConfig.target)
        if target:
            params = {f"{target['rule']}_{target['measure']}": target["value"], **params}
        rows.append({
            "trial": t.number, "method": a.get("method"), "accuracy": a.get("val_accuracy"),
            "test_accuracy": a.get("test_accuracy"), "params": a.get("params"), "nonzeros": a.get("nonzeros"),
            "flops": a.get("flops"), "latency_ms": a.get("latency_ms"), "compression": a.get("compression"),
            "hyperparameters": " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in params.items()),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def format_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(empty: no trial is both completed and feasible)"
    shown = df.copy()
    formats = {"accuracy": lambda v: f"{100 * v:.2f}%", "test_accuracy": lambda v: f"{100 * v:.2f}%",
               "params": lambda v: f"{int(v):,}", "nonzeros": lambda v: f"{int(v):,}", "flops": lambda v: f"{int(v):,}",
               "latency_ms": lambda v: f"{v:.3f}", "compression": lambda v: f"{v:.1f}x"}
    for col, fmt in formats.items():  # a trial not made by autoslim lacks the measurements: "-"
        shown[col] = shown[col].map(lambda v, fmt=fmt: "-" if v is None or pd.isna(v) else fmt(v))
    return shown.to_string(index=False)
