"""The zoo benchmark's cells (benchmarks/bench_zoo.py) classify what a method's removal step did."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from autoslim.errors import UsageError
from autoslim.methods import CompressionResult, Method, get_method
from autoslim.space import SearchSpace

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_zoo.py"
_SPEC = importlib.util.spec_from_file_location("bench_zoo", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_zoo"] = bench
_SPEC.loader.exec_module(bench)


class TinyCNN(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv1x1 -> BN -> ReLU -> global pool -> Linear: every removal here is exact."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU()
        self.mix = ChannelMix(10) if mix else nn.Identity()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(10, 12, 1), nn.BatchNorm2d(12), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(12, 5)

    def forward(self, x):
        x = self.mix(self.act1(self.bn1(self.conv1(x))))
        return self.fc(self.pool(self.act2(self.bn2(self.conv2(x)))).flatten(1))


class ChannelMix(nn.Module):
    """A custom layer that mixes channels with its own (C, C) matrix: no surgery can slice it safely."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c))

    def forward(self, x):
        return torch.einsum("oc,nchw->nohw", self.weight, x)


def tiny(mix: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    return bench.randomize(TinyCNN(mix), x, torch.Generator().manual_seed(0)), x


@pytest.mark.parametrize("method", ["trimming", "l1l2", "sss"])
def test_a_structured_method_compresses_a_plain_cnn_exactly(method):
    model, x = tiny()
    cell = bench.run_cell(model, x, method=get_method(method), spec=bench.CELLS[method], name="tiny")
    assert cell.outcome == "compressed", cell
    assert cell.params_after < cell.params_before == sum(p.numel() for p in TinyCNN().parameters())
    assert cell.error < 1e-5 and cell.seconds > 0


def test_iht_cell_counts_non_zeros():
    model, x = tiny()
    cell = bench.run_cell(model, x, method=get_method("iht"), spec=bench.CELLS["iht"], name="tiny")
    assert cell.outcome == "compressed" and cell.error is None
    layers = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert cell.params_before - cell.params_after == pytest.approx(0.3 * layers, abs=3)


def test_an_unsupported_layer_is_a_refusal_naming_it():
    model, x = tiny(mix=True)
    cell = bench.run_cell(model, x, method=get_method("trimming"), spec=bench.CELLS["trimming"], name="mix")
    assert cell.outcome in ("refused up front", "refused late")
    assert "'mix' (ChannelMix) is not supported" in cell.message
    assert cell.params_after is None


class Scripted(Method):
    """A method whose compress does what the test says, before or after its training phase."""

    name = "scripted"

    def __init__(self, before=None, after=None) -> None:
        self.before, self.after = before, after

    @classmethod
    def search_space(cls) -> SearchSpace:
        return SearchSpace(method="scripted", params={})

    def compress(self, model, ctx, params):
        if self.before:
            raise self.before
        ctx.train(model, phase="train")
        if self.after:
            raise self.after
        return CompressionResult(model)


@pytest.mark.parametrize("method, outcome", [
    (Scripted(before=UsageError("scripted: no")), "refused up front"),
    (Scripted(after=UsageError("scripted: no")), "refused late"),
    (Scripted(), "nothing removed"),
    (Scripted(after=KeyError("conv9")), "crashed"),
])
def test_outcomes(method, outcome):
    model, x = tiny()
    spec = bench.MethodCell({})
    cell = bench.guarded("tiny", method.name, 60, lambda: bench.run_cell(model, x, method=method, spec=spec))
    assert cell.outcome == outcome
    assert cell.message == {"refused up front": "scripted: no", "refused late": "scripted: no",
                            "nothing removed": ""}.get(outcome, cell.message)
    if outcome == "crashed":
        assert cell.message.startswith("KeyError: 'conv9' (test_bench_zoo.py:")


def test_a_check_runs_before_compress():
    class Checked(Scripted):
        def check(self, model, *, example_input):
            raise UsageError(f"scripted: refused on a {tuple(example_input.shape)} input")

    model, x = tiny()
    cell = bench.run_cell(model, x, method=Checked(), spec=bench.MethodCell({}))
    assert (cell.outcome, cell.message) == ("refused up front", "scripted: refused on a (4, 3, 16, 16) input")


def test_classify_separates_inexact_removal():
    assert bench.classify(10, 8, 2e-6) == "compressed"
    assert bench.classify(10, 8, 1e-3) == "inexact"
    assert bench.classify(10, 8, float("nan")) == "inexact"
    assert bench.classify(10, 10, 0.0) == "nothing removed"


def test_heads_cell():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=4,
                                               hidden_dim=16, mlp_dim=32, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    cell = bench.run_heads_cell(bench.randomize(vit, x, torch.Generator().manual_seed(0)), x)
    assert cell.outcome == "compressed" and cell.error < 1e-5, cell
    assert cell.message == "1 heads"  # int(0.3 * 4) heads
    model, x = tiny()
    assert bench.run_heads_cell(model, x).outcome == "n/a"


def test_every_zoo_model_has_a_family_and_selection_checks_names():
    zoo = torchvision.models.list_models(module=torchvision.models)
    assert {bench.family_of(m) for m in zoo} == set(bench.FAMILIES)
    assert bench.select_models(["vgg", "resnet18"]) == ["resnet18", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn",
                                                        "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]
    with pytest.raises(UsageError, match="--models: unknown value 'resnet19'"):
        bench.select_models(["resnet19"])


def test_report_tables_and_targets():
    cells = [bench.Cell("resnet18", "sss", "compressed", 100, 70, 1e-7, 0.5),
             bench.Cell("resnet34", "sss", "inexact", 100, 70, 1e-2, 0.5),
             bench.Cell("vgg11", "sss", "refused late", message="surgery: no"),
             bench.Cell("vgg11", "heads", "n/a", message="no attention layer")]
    text = bench.report(cells, [], ["sss", "heads"], command="bench", size=64, seconds=60)
    assert "| resnet18 | resnet | 0.1k | -30.0% · 1e-07 · 0.5s |  |" in text
    assert "| resnet34 | resnet | 0.1k | **INEXACT** -30.0% · 1e-02 · 0.5s |  |" in text
    assert "| vgg11 | vgg |  | refused late [1] | n/a |" in text
    assert "| resnet | 2 | 1/2 | n/a |" in text and "| vgg | 1 | 0/1 | n/a |" in text
    assert "1. refused late: surgery: no" in text
    assert "every cell compressed or refused up front: 1/3 cells; the others: 1 inexact, 1 refused late" in text
    assert "families: sss 0/2, heads 0/0" in text
    assert "max 1.0e-02 over 2 measured cells, 1 above" in text


def test_a_saved_run_is_reported_again(tmp_path, capsys):
    cells = [bench.Cell("resnext50_32x4d", "sss", "compressed", 25_028_904, 25_018_904, 0.0, 1.1)]
    saved = {"command": "python benchmarks/bench_zoo.py --json x", "seconds": 120, "methods": ["sss"], "size": 64,
             "cells": [bench.dataclasses.asdict(c) for c in cells], "trials": []}
    (tmp_path / "run.json").write_text(bench.json.dumps(saved))
    bench.main(["--report-from", str(tmp_path / "run.json"), "--markdown", str(tmp_path / "zoo.md")])
    text = (tmp_path / "zoo.md").read_text()
    assert text == bench.report(cells, [], ["sss"], command=saved["command"], size=64, seconds=120)
    assert "| resnext50_32x4d | resnext | 25.03M | -0.040% (<1%) · 0e+00 · 1.1s |" in text
    assert "sss 1/1; removing at least 1% of every model's parameters: sss 0/1" in text
    assert text in capsys.readouterr().out
