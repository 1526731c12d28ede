"""Exact removal where the last zoo run was not (issue 16): a constant that a zero-padded conv reads is not
folded (the filter is kept), DenseNet's concatenated channels fold the constant each later layer's own
BatchNorm and ReLU make of them, GoogLeNet is compressed by every structured method. Each test compares the
reduced model with the masked one (the same model with the removed structures zeroed, not removed)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from helpers import one_thread, randomize_batchnorm  # noqa: F401 (autouse fixture)

from autoslim.config import DataConfig, TrainConfig
from autoslim.data import load_data
from autoslim.errors import UsageError
from autoslim.measure import count_params
from autoslim.methods import TrialContext, get_method
from autoslim.methods.l1l2 import prunable_groups, remove_small_filters
from autoslim.methods.sss import Scales, remove_zero_structures
from autoslim.methods.trimming import remove_trimmed
from autoslim.selection import SizeTarget
from autoslim.surgery import channel_groups, constant_inputs, remove_blocks, residual_branches, zero_padded

LIMIT = 1e-5


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


class PaddedChain(nn.Module):
    """conv -> ReLU -> zero-padded 3x3 conv -> pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act = nn.Conv2d(3, 6, 3), nn.ReLU()
        self.conv2, self.fc = nn.Conv2d(6, 5, 3, padding=1), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(self.conv2(self.act(self.conv1(x))).mean((2, 3)))


def padded_chain() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = PaddedChain().eval(), torch.randn(8, 3, 10, 10)
    with torch.no_grad():
        model.conv1.weight[[1, 2, 4]] = 0  # what l1l2's regularizer leaves: zero rows, biases kept
        model.conv1.bias[[1, 4]] = torch.tensor([0.7, 0.3])  # relu(b) > 0: a constant the padded conv reads
        model.conv1.bias[2] = -0.5  # relu(b) = 0: nothing to fold, exact to remove
    return model, x


def test_zero_padded_tells_the_convolutions_whose_border_reads_padding():
    assert zero_padded(nn.Conv2d(2, 2, 3, padding=1)) and zero_padded(nn.Conv2d(2, 2, 3, padding="same"))
    assert not zero_padded(nn.Conv2d(2, 2, 3)) and not zero_padded(nn.Conv2d(2, 2, 1, padding="same"))
    assert not zero_padded(nn.Conv2d(2, 2, 3, padding=1, padding_mode="replicate"))
    assert not zero_padded(nn.Linear(2, 2))


def test_l1l2_keeps_a_filter_whose_non_zero_constant_a_padded_conv_reads_and_removes_the_zero_one():
    """Old code folded relu(bias) into the padded conv's bias: its border outputs moved (alexnet 7e-3, regnet
    5e-1 in the zoo)."""
    model, x = padded_chain()
    with torch.no_grad():
        masked = model(x)
    small, removal = remove_small_filters(model, prunable_groups(model, example_input=x), threshold=1e-3,
                                          example_input=x)
    assert removal.removed["conv1"] == [2] and removal.padded == {"conv1": [1, 4]} and not removal.kept
    assert small.conv1.out_channels == 5 and small.conv2.in_channels == 5
    with torch.no_grad():
        assert rel(small(x), masked) < LIMIT


def test_l1l2_reports_the_filters_kept_for_a_padded_conv_in_its_log_and_info():
    model, _ = padded_chain()
    data = load_data(DataConfig(name="synthetic", num_samples=32, image_shape=[3, 10, 10], num_classes=4))
    lines: list[str] = []
    ctx = TrialContext(data=data, train_config=TrainConfig(epochs=0), log=lines.append)
    params = {**get_method("l1l2").search_space().defaults(), "finetune_epochs": 0}
    result = get_method("l1l2").compress(model, ctx, params)
    assert result.info["removed"]["conv1"] == 1 and result.info["kept_padded"] == {"conv1": [1, 4]}
    assert "kept 2 small ones whose non-zero constant a zero-padded conv reads" in lines[-1]
    assert result.info["output_change"]["removal"] < LIMIT


def sigmoid_before_padded_conv() -> tuple[nn.Sequential, torch.Tensor, Scales]:
    """conv -> BN -> sigmoid -> zero-padded conv -> BN -> ReLU -> pool -> Linear, with SSS's channel factors and
    factor 0 of each group set to 0: the first leaves sigmoid(0) = 0.5, which the padded conv reads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sigmoid(), nn.Conv2d(4, 3, 3, padding=1),
                          nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    x = torch.randn(8, 3, 10, 10)
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    model.eval()
    scales = Scales(model, level="channel", example_input=x)
    with torch.no_grad():
        for s in scales:
            s.factor[0] = 0.0
    return model, x, scales


def test_sss_keeps_a_zero_channel_whose_constant_a_padded_conv_reads():
    """A zero factor before a sigmoid leaves 0.5, which a padded conv's border does not see everywhere."""
    model, x, scales = sigmoid_before_padded_conv()
    with torch.no_grad():
        masked = model(x)
    small, removed = remove_zero_structures(model, scales, threshold=0.0, example_input=x)
    assert removed["kept_padded"] == {"0": 1} and removed["channels"]["0"] == 0
    assert removed["channels"]["3"] == 1  # 3 -> BN -> ReLU -> pool -> Linear: relu(0) folds exactly
    with torch.no_grad():
        assert rel(small(x), masked) < LIMIT


def _conv2_out(model: PaddedChain, x: torch.Tensor) -> torch.Tensor:
    return model.conv2(model.act(model.conv1(x)))


def test_l1l2_with_border_fold_removes_the_padded_filters_exact_inside_the_image_and_measures_the_border():
    """``border="fold"``: the constant is folded all the same; inside the image the padded conv's outputs are
    those of the masked model, in its border windows they differ, and the network's output change is not 0."""
    model, x = padded_chain()
    with torch.no_grad():
        masked, masked_conv2 = model(x), _conv2_out(model, x)
    small, removal = remove_small_filters(model, prunable_groups(model, example_input=x), threshold=1e-3,
                                          example_input=x, border="fold")
    assert removal.removed["conv1"] == [1, 2, 4] and removal.folded_border == {"conv1": [1, 4]}
    assert not removal.padded and small.conv1.out_channels == 3 and small.conv2.in_channels == 3
    with torch.no_grad():
        conv2 = _conv2_out(small, x)
        assert rel(conv2[..., 1:-1, 1:-1], masked_conv2[..., 1:-1, 1:-1]) < LIMIT  # exact inside the image
        assert rel(conv2[..., 0, :], masked_conv2[..., 0, :]) > 1e-3  # the top row's windows read padding
        assert rel(small(x), masked) > 1e-4


def test_constant_inputs_refuses_an_unknown_border_by_name():
    model, x = padded_chain()
    with pytest.raises(UsageError, match="border: unknown value 'clip'; accepted: exact, fold"):
        constant_inputs(model, {"conv1": [1]}, example_input=x, border="clip")


@pytest.mark.parametrize("border,folds", [("auto", True), ("fold", True), ("exact", False)])
def test_l1l2_under_a_target_folds_the_padded_filters_it_needs_unless_told_exact(border, folds):
    """A target that the zero filters would make is reached by folding them (``auto`` under a target), the change
    is measured and logged; ``border: exact`` keeps the two whose constant the padded conv reads and selects
    again without them (here conv2's filters: zeroing them moves the output, their removal does not)."""
    model, _ = padded_chain()
    data = load_data(DataConfig(name="synthetic", num_samples=32, image_shape=[3, 10, 10], num_classes=4))
    lines: list[str] = []
    full = count_params(model)
    per_filter = 3 * 9 + 1 + 5 * 9  # a conv1 filter, its bias, its column of conv2
    ctx = TrialContext(data=data, train_config=TrainConfig(epochs=0), log=lines.append,
                       target=SizeTarget(full - 3 * per_filter))
    params = {**get_method("l1l2").search_space().defaults(), "finetune_epochs": 0, "border": border}
    result = get_method("l1l2").compress(model, ctx, params)
    info = result.info
    if folds:
        assert info["folded_border"] == {"conv1": [1, 4]} and info["kept_padded"] == {}
        assert info["target"]["reached"] and count_params(result.model) == full - 3 * per_filter
        assert info["output_change"]["removal"] > 1e-4  # the border windows: measured, not assumed
        assert "(2 removed although a zero-padded conv reads their non-zero constant: folded" in lines[-1]
    else:
        assert info["folded_border"] == {} and result.model.conv1.out_channels == 5  # only the zero-constant one
        assert info["target"]["reached"] and info["output_change"]["removal"] < LIMIT


def test_sss_with_border_fold_removes_a_zero_channel_a_padded_conv_reads_and_measures_the_change():
    model, x, scales = sigmoid_before_padded_conv()
    with torch.no_grad():
        masked = model[:4](x)  # the padded conv's output (the scales act through hooks on these modules)
    small, removed = remove_zero_structures(model, scales, threshold=0.0, example_input=x, border="fold")
    assert removed["folded_border"] == {"0": 1} and removed["kept_padded"] == {} and removed["channels"]["0"] == 1
    assert small[0].out_channels == 3 and small[3].in_channels == 3
    with torch.no_grad():
        out = small[:4](x)  # its channel 0 was removed too (relu(0) folds exactly downstream): 1 and 2 remain
        assert rel(out[..., 1:-1, 1:-1], masked[:, 1:, 1:-1, 1:-1]) < LIMIT  # 0.5 folded: exact inside the image,
        assert rel(out[..., 0, :], masked[:, 1:, 0, :]) > 1e-3  # not in the windows that read padding


# ------------------------------------------------------------------ DenseNet: one constant per consumer

def densenet() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None, num_classes=10)
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    return model.eval(), torch.randn(2, 3, 32, 32)


FIRST = "features.denseblock1.denselayer1.conv2"  # 32 channels concatenated into every later layer of block 1


def test_trimming_folds_what_each_densenet_consumer_makes_of_a_removed_channel():
    """A dead filter of a dense layer is 0 in the concatenation but relu(BN_k(0)), a different constant, at
    every later layer k: old code folded nothing (error 0.5-0.9 in the zoo)."""
    model, x = densenet()
    dead = [0, 3, 5, 17]
    with torch.no_grad():
        model.get_submodule(FIRST).weight[dead] = 0
        masked = model(x)
    found = constant_inputs(model, {FIRST: dead}, example_input=x)
    folded = [c for c in found.constants.values() if c.abs().sum() > 0]
    assert len(folded) >= 6 and not found.varying and not found.padded  # five later layers, the transition
    keep = {FIRST: torch.tensor([j for j in range(32) if j not in dead])}
    small = remove_trimmed(model, keep, sizes={FIRST: 32}, example_input=x, sample=x)
    assert small.get_submodule(FIRST).out_channels == 28
    with torch.no_grad():
        assert rel(small(x), masked) < LIMIT


@pytest.mark.parametrize("method", ["l1l2", "sss"])
def test_l1l2_and_sss_remove_densenet_channels_exactly(method):
    model, x = densenet()
    groups = {g.name: g for g in channel_groups(model, example_input=x)}
    bottleneck = "features.denseblock2.denselayer3.conv1"  # -> norm2 -> ReLU -> padded 3x3 conv2
    with torch.no_grad():
        for name in (FIRST, bottleneck):
            model.get_submodule(name).weight[:5] = 0
    if method == "l1l2":
        with torch.no_grad():
            masked = model(x)
        small, removal = remove_small_filters(model, [groups[FIRST], groups[bottleneck]], threshold=1e-3,
                                              example_input=x)
        assert removal.removed[FIRST] == list(range(5))
        assert len(removal.removed[bottleneck]) + len(removal.padded.get(bottleneck, [])) == 5
    else:
        scales = Scales(model, level="channel", example_input=x)
        with torch.no_grad():
            for s in scales:
                s.factor[:3] = 0.0
            masked = model(x)
        small, removed = remove_zero_structures(model, scales, threshold=0.0, example_input=x)
        assert sum(removed["channels"].values()) > 0
    with torch.no_grad():
        assert rel(small(x), masked) < LIMIT


# ------------------------------------------------------------------ GoogLeNet: every structured method acts

@pytest.mark.parametrize("method", ["trimming", "l1l2"])
def test_googlenet_is_compressed_by_trimming_and_l1l2(method):
    """The zoo run made before the merge of issue 16 items 1-4 found nothing to remove in GoogLeNet for trimming
    and l1l2 (BasicConv2d applies a functional relu after its BN); a regression test: it passes since that
    merge. Untrained, init_weights leaves BN shifts 0: l1l2's zeroed filters read 0 everywhere, also at the
    padded 3x3 convs, and are all removed."""
    torch.manual_seed(0)
    model = torchvision.models.googlenet(weights=None, num_classes=4, aux_logits=False, init_weights=True)
    data = load_data(DataConfig(name="synthetic", num_samples=16, image_shape=[3, 64, 64], num_classes=4))
    x = data.val.x[:4]
    before = sum(p.numel() for p in model.parameters())
    m = get_method(method)
    params = {**m.search_space().defaults(), "finetune_epochs": 0, "retrain_epochs": 0, "rounds": 1,
              "layers": "all", "rule": "fraction", "fraction": 0.3}
    with torch.no_grad():  # what l1l2's regularizer would leave: a few zero filters per layer
        for conv in [c for c in model.modules() if isinstance(c, nn.Conv2d)] if method == "l1l2" else []:
            conv.weight[:4] = 0
    m.check(model, example_input=x, params=params)
    ctx = TrialContext(data=data, train_config=TrainConfig(epochs=0))
    result = m.compress(copy.deepcopy(model), ctx, params)
    assert sum(p.numel() for p in result.model.parameters()) < before


# ------------------------------------------------------------------ blocks with two sums in a row (MaxViT)

class TwoSums(nn.Module):
    """``x = x + f(x); x = x + g(x)`` in one module, then a layer that reads the second sum (MaxViT's partition
    attention layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        x = x + self.f(x)
        x = x + self.g(x)
        return self.out(x)


@pytest.mark.parametrize("chosen", [["block[0]"], ["block[1]"], ["block[0]", "block[1]"]])
def test_removing_consecutive_sums_of_one_block_rewrites_each_to_its_current_shortcut(chosen):
    """Old code replaced the second sum by the node of the first, already erased: the graph did not run
    (maxvit_t's SSS cell crashed: "Argument 'add_1' of Node 'departition_swap' was used before it has been
    defined")."""
    torch.manual_seed(0)
    model, x = nn.Sequential(), torch.randn(4, 6)
    model.add_module("block", TwoSums())
    assert [b.name for b in residual_branches(model)] == ["block[0]", "block[1]"]
    with torch.no_grad():
        for name in chosen:
            branch = model.block.f if name == "block[0]" else model.block.g
            branch.weight.zero_(), branch.bias.zero_()
        masked = model(x)
        assert rel(remove_blocks(model, chosen)(x), masked) < LIMIT
