"""The result of a study: its Pareto front and the table users read.

>>> pareto_mask([[0.9, 100], [0.8, 50], [0.7, 80]], ["maximize", "minimize"]).tolist()
[True, True, False]
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
    constraints = trial.system_attrs.get("constraints")
    return constraints is None or all(c <= 0 for c in constraints)


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


def trials_table(trials: Sequence[FrozenTrial]) -> pd.DataFrame:
    """One row per trial: its measurements and its method's hyperparameters."""
    rows = []
    for t in trials:
        a = t.user_attrs
        params = a.get("config", {}).get("params", {})
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
        return "(no completed trials)"
    shown = df.copy()
    for col in ("accuracy", "test_accuracy"):
        shown[col] = shown[col].map(lambda v: f"{100 * v:.2f}%")
    for col in ("params", "nonzeros", "flops"):
        shown[col] = shown[col].map(lambda v: f"{int(v):,}")
    shown["latency_ms"] = shown["latency_ms"].map(lambda v: f"{v:.3f}")
    shown["compression"] = shown["compression"].map(lambda v: f"{v:.1f}x")
    return shown.to_string(index=False)
