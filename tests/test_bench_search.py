"""The search benchmark (benchmarks/bench_search.py): its arms' pieces, its study file and its arguments."""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from autoslim.config import TrainConfig
from autoslim.errors import UsageError
from autoslim.measure import count_params
from autoslim.models import create_model
from autoslim.train import Callback, train

pytest.importorskip("torch_pruning")  # arm (p) needs the optional extra `bench` (in `dev`)

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_search.py"
_SPEC = importlib.util.spec_from_file_location("bench_search", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_search"] = bench
_SPEC.loader.exec_module(bench)


class CountSteps(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, model, step) -> None:
        self.steps += 1


def test_a_passed_deadline_stops_training_at_its_first_step(digits):
    """(p) and (c) stop a running trial (or the base training) at the first optimizer step after the budget."""
    counter = CountSteps()
    model = create_model("lenet5", in_shape=digits.in_shape, num_classes=10)
    with pytest.raises(optuna.TrialPruned, match="budget"):
        train(model, digits, config=TrainConfig(epochs=2), callbacks=[counter, bench.BudgetReached(time.time())])
    assert counter.steps == 1
    counter = CountSteps()  # a deadline ahead: the training runs to its end
    train(model, digits, config=TrainConfig(epochs=1, batch_size=512), callbacks=[counter,
          bench.BudgetReached(time.time() + 3600)])
    assert counter.steps == -(-len(digits.train) // 512)


def test_the_peer_prunes_channels_globally_and_keeps_the_classifier(digits):
    """Torch-Pruning's global ratio removes that share of all prunable channels (conv1, conv2, fc1: 570), the
    classifier keeps its 10 outputs, and the parameters are counted on the smaller dense model."""
    torch.manual_seed(0)
    base = create_model("lenet5", in_shape=digits.in_shape, num_classes=10)
    model = bench.torch_pruning_step(copy.deepcopy(base), ratio=0.5, example=digits.val.x[:1])
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    widths = [m.weight.shape[0] for m in layers]
    assert widths[-1] == 10 and sum(widths[:-1]) == 570 // 2
    assert model(digits.val.x[:4]).shape == (4, 10)
    c1, c2, f1 = widths[:-1]
    hand = (25 * c1 + c1) + (25 * c1 * c2 + c2) + (layers[2].weight.shape[1] * f1 + f1) + (f1 * 10 + 10)
    assert count_params(model) == hand < count_params(base)


def test_the_budget_study_lists_every_method_and_narrows_nothing():
    cfg = bench.study_config("a", data_dir="unused", data="digits")
    assert list(cfg.methods) == ["trimming", "l1l2", "sss", "iht", "thriftynet"]
    assert all(m.space == {} and m.train == {} and m.data == {} and m.rungs is None for m in cfg.methods.values())
    assert cfg.constraints.max_params == 10_000 and cfg.sampler.name == "tpe"
    assert cfg.early_stopping.enabled and cfg.early_stopping.rungs is None and cfg.warm_start
    narrowed = bench.study_config("n", data_dir="unused", data="digits")
    assert (cfg.train, cfg.data, cfg.model) == (narrowed.train, narrowed.data, narrowed.model)


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"arms": "apnc", "budget": 60.0, "threads": None, "out": None, **kw})


def test_the_study_databases_never_go_into_the_repository_nor_over_an_earlier_run(tmp_path):
    with pytest.raises(UsageError, match="--out: .* inside the repository"):
        bench.check_args(_args(out=str(_PATH.parent / "runs")))
    assert not (_PATH.parent / "runs").exists()
    (tmp_path / "n.db").write_bytes(b"")
    with pytest.raises(UsageError, match="already holds n.db"):
        bench.check_args(_args(out=str(tmp_path)))
    assert bench.check_args(_args(out=str(tmp_path), arms="ap")) == tmp_path.resolve()
    for bad in (dict(arms="ax"), dict(arms=""), dict(budget=0.0), dict(threads=0)):
        with pytest.raises(UsageError):
            bench.check_args(_args(out=str(tmp_path), **bad))


def test_a_study_autoslim_refuses_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    """The other searches go on: the refused one is reported with autoslim's line, and no study is stored."""
    study = tmp_path / "refused.yaml"
    study.write_text("name: refused\ndata: {name: digits}\nmodel: lenet5\nmethods: [no_such_method]\n")
    monkeypatch.setitem(bench.STUDIES, "a", str(study))  # an absolute path: ROOT / "studies" / it is it
    arm, outcome, _ = bench._run_arm_job(("a", dict(budget=5, data_dir="unused", data="digits", out=tmp_path,
                                                    threads=1)))
    assert arm == "a" and not outcome.ran and outcome.trials == []
    assert outcome.note.startswith("refused by autoslim before any trial: ") and "no_such_method" in outcome.note
    assert not (tmp_path / "a.db").exists()
