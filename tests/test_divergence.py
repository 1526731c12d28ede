"""A diverging trial is pruned with its reason; a trial whose method raises fails with its message; the study goes on."""

import json

import pytest
import yaml
from optuna.trial import TrialState

from helpers import tiny_study

from autoslim.config import load_study
from autoslim.methods import base as methods_base
from autoslim.methods import get_method
from autoslim.methods.base import Method, register_method
from autoslim.recover import slot_of
from autoslim.study import optimize

TINY = tiny_study(warm_start=False)


def run(tmp_path, body: dict, lines: list[str]):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(body))
    return optimize(load_study(path), log=lines.append)


def test_a_nan_loss_prunes_the_trial_with_its_reason_and_the_study_goes_on(tmp_path):
    lines = []
    study = run(tmp_path, {**TINY, "train": {**TINY["train"], "lr": 1.0e12}}, lines)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.PRUNED]
    for t in trials:
        reason = t.user_attrs["pruned_reason"]
        assert reason.startswith("diverged: training loss is ") and "at epoch 1 (lr 1e+12)" in reason
        assert f"[trial {t.number}] pruned: {reason}" in lines


@pytest.fixture
def flaky_method():
    """A registered method whose first trial raises a two-line error; later trials run Network Trimming."""

    @register_method
    class Flaky(Method):
        name = "flaky"
        calls = 0

        @classmethod
        def search_space(cls):
            return get_method("trimming").search_space()

        def compress(self, model, ctx, params):
            type(self).calls += 1
            if type(self).calls == 1:
                raise RuntimeError("the method broke\n  on a second line")
            return get_method("trimming").compress(model, ctx, params)

    yield "flaky"
    methods_base.METHODS.remove("flaky")


def test_a_method_that_raises_fails_its_trial_with_the_message_and_the_study_goes_on(tmp_path, capsys,
                                                                                      flaky_method):
    lines = []
    study = run(tmp_path, {**TINY, "methods": {flaky_method: TINY["methods"]["trimming"]}}, lines)
    trials = study.get_trials(deepcopy=False)
    # a failure uses up one of this run's attempts; a fresh trial takes its slot (autoslim.distributed), and the
    # next run of the study runs it
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.WAITING]
    assert slot_of(trials[2]) == slot_of(trials[0]) == 0
    rerun = run(tmp_path, {**TINY, "methods": {flaky_method: TINY["methods"]["trimming"]}}, lines)
    assert [t.state for t in rerun.get_trials(deepcopy=False)] == [TrialState.FAIL] + [TrialState.COMPLETE] * 2
    error = "RuntimeError: the method broke on a second line"
    assert trials[0].user_attrs["error"] == error
    assert f"[trial 0] failed: {error}" in lines
    assert "Traceback" not in capsys.readouterr().err  # Optuna's own multi-line report is silenced
    assert json.dumps(trials[1].user_attrs["config"])  # the next trials ran normally
