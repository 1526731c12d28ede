"""``autoslim report``: one CSV row per trial with flattened scalar user attrs, Pareto and hypervolume charts."""

import warnings

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial

from autoslim.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def make_study(url: str, *, completed: bool = True) -> optuna.Study:
    """A study as autoslim stores it: named objectives, a reference point, trials with nested user attrs."""
    study = optuna.create_study(storage=url, study_name="demo", directions=["maximize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["accuracy", "params"])
    study.set_user_attr("reference_point", {"accuracy": 0.0, "params": 2000.0})
    points = [(0.9, 1000), (0.8, 300), (0.7, 500), (0.95, 1500)] if completed else []
    for i, (acc, params) in enumerate(points):
        study.add_trial(create_trial(
            values=[acc, params], params={"method": "trimming"},
            distributions={"method": optuna.distributions.CategoricalDistribution(["trimming"])},
            user_attrs={"method": "trimming", "params": params, "val_accuracy": acc,
                        "config": {"method": "trimming", "params": {"rounds": i + 1},
                                   "data": {"image_shape": [1, 8, 8]}},
                        "widths_after": {"fc1": 10 * i}, "history": [{"epoch": 1, "loss": 1.0}]}))
    study.add_trial(create_trial(state=TrialState.FAIL))
    study.add_trial(create_trial(state=TrialState.PRUNED, params={}, distributions={}))
    return study


def test_report_writes_one_csv_row_per_trial_and_the_charts(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    study = make_study(url)
    assert main(["report", url, "--out", str(tmp_path / "report")]) == 0
    out = tmp_path / "report"
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == len(study.trials) == 6
    assert df["state"].tolist() == ["COMPLETE"] * 4 + ["FAIL", "PRUNED"]
    assert df["values_accuracy"].tolist()[:4] == [0.9, 0.8, 0.7, 0.95]
    assert df["user_attrs_config.params.rounds"].tolist()[:4] == [1, 2, 3, 4]
    assert "user_attrs_widths_after.fc1" in df and "params_method" in df
    assert not any("history" in c or "image_shape" in c for c in df.columns)  # lists are left out
    for name in ("pareto.png", "hypervolume.png"):
        assert (out / name).read_bytes()[:8] == PNG
    for name in ("pareto.html", "hypervolume.html"):
        html = (out / name).read_text()
        assert "plotly.min.js" in html and "Plotly.newPlot" in html
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    assert "reference point: accuracy 0, params 2,000" in (out / "hypervolume.html").read_text()
    assert str(out / "trials.csv") in capsys.readouterr().out


def test_report_of_a_study_without_completed_trials_is_refused(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    make_study(url, completed=False)
    assert main(["report", url, "--out", str(tmp_path / "report")]) == 2
    assert "has no completed trials yet" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("target", ["sqlite:///{tmp}/missing.db", "{tmp}/nothing.yaml"])
def test_report_of_a_missing_study_is_one_line(tmp_path, capsys, target):
    assert main(["report", target.format(tmp=tmp_path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoslim: error: ") and err.count("\n") == 1
    assert not (tmp_path / "report").exists()
