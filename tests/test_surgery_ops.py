"""The ops and layers the channel analysis understands (autoslim.surgery), each checked against the masked model.

The masked model is the original with the removed channels' producer outputs zeroed (filters and biases, and
the entries of every BatchNorm/GroupNorm that then sees only zeros): removing those channels physically must
not change the output. Random weights and random BatchNorm statistics; small inputs.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from autoslim.errors import UsageError
from helpers import one_thread, seed_each_test  # noqa: F401 (autouse fixtures)
from autoslim.surgery import apply_architecture_spec, architecture_spec, channel_groups, remove_channels


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize(model: nn.Module) -> nn.Module:
    """Eval mode, random BatchNorm statistics and affine parameters, random layer scales and zero-initialised heads."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
        for name, p in model.named_parameters():
            if name.endswith("layer_scale") or (p.dim() == 2 and not p.any()):
                p.uniform_(0.5, 1.5) if name.endswith("layer_scale") else p.normal_(0, 0.05)
    return model.eval()


def filters(m: nn.Module) -> torch.Tensor:
    """The tensor whose rows are ``m``'s output channels (also under weight_norm/spectral_norm)."""
    if parametrize.is_parametrized(m, "weight"):
        p = m.parametrizations.weight
        return p.original0 if hasattr(p, "original0") else p.original
    return getattr(m, "weight_g", getattr(m, "weight_orig", m.weight))


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.PReLU)


@torch.no_grad()
def mask(model: nn.Module, x: torch.Tensor, gone: dict) -> None:
    """Zero channels ``gone[group]`` of each group's producers, then every norm entry that sees only zeros."""
    groups = {g.name: g for g in channel_groups(model, example_input=x)}
    for name, idx in gone.items():
        for p in groups[name].producers:
            m = model.get_submodule(p)
            filters(m)[idx] = 0
            if m.bias is not None:
                m.bias[idx] = 0

    def zero_norm_entries(m, inputs):
        dead = (inputs[0].transpose(0, 1).flatten(1) == 0).all(1)
        if isinstance(m, nn.GroupNorm):
            dead = dead.view(m.num_groups, -1).all(1).repeat_interleave(m.num_channels // m.num_groups)
        m.weight[dead], m.bias[dead] = 0, 0

    # activations pass their input on during this run, so that only the removed channels are exactly zero
    activations = [m for m in model.modules() if isinstance(m, ACTIVATIONS)]
    inplace = [getattr(m, "inplace", False) for m in activations]
    for m in activations:
        m.inplace = False
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))]
    hooks = [m.register_forward_pre_hook(zero_norm_entries) for m in norms]
    hooks += [m.register_forward_hook(lambda m, inputs, out: inputs[0]) for m in activations]
    model(x)
    for h in hooks:
        h.remove()
    for m, flag in zip(activations, inplace):
        m.inplace = flag


def fraction_of_groups(model: nn.Module, x: torch.Tensor, fraction: float = 1 / 3) -> tuple[dict, dict]:
    """A random ``fraction`` of every group (in whole blocks where the group has a granularity): (gone, keep)."""
    gone, keep = {}, {}
    for g in channel_groups(model, example_input=x):
        blocks = torch.randperm(g.size // g.granularity)[: int(fraction * g.size // g.granularity)].tolist()
        out = sorted(j for b in blocks for j in range(b * g.granularity, (b + 1) * g.granularity))
        if out:
            gone[g.name], keep[g.name] = out, [j for j in range(g.size) if j not in out]
    return gone, keep


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check_against_masked(model: nn.Module, x: torch.Tensor, gone: dict, keep: dict) -> nn.Module:
    """Remove ``gone`` from ``model`` and assert that the result computes what the masked model computes."""
    small = remove_channels(model, keep, example_input=x)
    mask(model, x, gone)
    with torch.no_grad():
        reference, output = model(x), small.eval()(x)
    assert relative_error(output, reference) < 1e-5
    return small


def remove_a_third(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, dict]:
    gone, keep = fraction_of_groups(model, x)
    assert keep, "no group to remove channels from"
    return check_against_masked(model, x, gone, keep), keep


def kept(keep: dict, group: str, size: int) -> int:
    return len(keep.get(group, range(size)))


# --- interpolate / Upsample and pad -------------------------------------------------------------------------
class UpsamplePad(nn.Module):
    """Upsample, reflection padding and interpolate on spatial dims; a constant pad of the channel dim."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.up = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Upsample(scale_factor=2)
        self.conv2, self.conv3, self.fc = nn.Conv2d(8, 6, 3), nn.Conv2d(6 + 3, 5, 1), nn.Linear(5, 10)

    def forward(self, x):
        x = self.up(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.conv2(F.pad(x, (1, 1, 1, 1), mode="reflect")))
        x = F.pad(F.interpolate(x, size=(5, 5), mode="bilinear"), (0, 0, 0, 0, 2, 1), value=0.5)
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv3(x)), 1).flatten(1))


def test_interpolate_upsample_and_pad():
    model, x = randomize(UpsamplePad()), torch.randn(2, 3, 6, 6)
    assert [g.name for g in channel_groups(model, example_input=x)] == ["conv1", "conv2", "conv3"]
    small, keep = remove_a_third(model, x)
    k1, k2, k3 = (kept(keep, g, s) for g, s in (("conv1", 8), ("conv2", 6), ("conv3", 5)))
    assert n_params(small) == 28 * k1 + 2 * k1 + (9 * k1 + 1) * k2 + (k2 + 3 + 1) * k3 + 10 * k3 + 10
    assert small.conv3.in_channels == k2 + 3  # the padded channels stay


# --- view / reshape / unsqueeze / squeeze -----------------------------------------------------------------------
class Views(nn.Module):
    """A squeeze-excitation gate reshaped with view (a literal or a computed channel count) and unsqueeze."""

    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.literal = literal
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 8)
        self.conv2, self.fc = nn.Conv2d(8, 6, 3), nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        n, c = x.size(0), x.size(1)
        y = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        x = x * torch.sigmoid(y.view(n, 8, 1, 1) if self.literal else y.view(n, c, 1, 1))
        x = F.relu(self.conv2(x)).unsqueeze(1).squeeze(1)
        return self.fc(F.adaptive_max_pool2d(x, 2).reshape(n, -1))


def test_view_with_computed_sizes_passes_channels():
    model, x = randomize(Views(literal=False)), torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in channel_groups(model, example_input=x)}
    assert groups["conv1"].producers == ("conv1", "fc2") and set(groups) == {"conv1", "fc1", "conv2"}
    small, keep = remove_a_third(model, x)
    assert small.fc.in_features == 4 * kept(keep, "conv2", 6)


def test_view_with_a_literal_channel_count_fixes_those_channels():
    """``y.view(n, 8, 1, 1)`` cannot follow a removal: the channels it reshapes are not offered (the old
    analysis let them pass, and the removal then failed inside view)."""
    model, x = randomize(Views(literal=True)), torch.randn(2, 3, 8, 8)
    assert {g.name for g in channel_groups(model, example_input=x)} == {"fc1", "conv2"}
    small, _ = remove_a_third(model, x)
    assert small.conv1.out_channels == 8


class Reinterpret(nn.Module):
    """A view that reinterprets memory: (N, C, H, W) read as (N, H, C, W), with C == H."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = x.view(x.size(0), x.size(2), x.size(1), x.size(3))
        return self.conv2(x).mean((1, 2, 3))


def test_a_removal_that_breaks_a_view_is_caught_naming_the_op():
    model, x = Reinterpret(), torch.randn(2, 3, 6, 6)
    with pytest.raises(RuntimeError, match=r"operation 'view' gives shape \(2, 6, 4, 6\) after the removal"):
        remove_channels(model, {"conv1": [0, 1, 2, 3]}, example_input=x)


# --- chunk / split / narrow / slicing and channel shuffle ---------------------------------------------------------
def conv_bn(cin: int, cout: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3 if groups > 1 else 1, padding=1 if groups > 1 else 0, groups=groups),
                         nn.BatchNorm2d(cout))


class ShuffleUnit(nn.Module):
    """ShuffleNet's unit by hand: channel split, a branch on one half, concatenation, channel shuffle."""

    def __init__(self, split: str) -> None:
        super().__init__()
        self.split = split
        self.stem = nn.Sequential(conv_bn(3, 8), nn.ReLU())
        self.branch = nn.Sequential(conv_bn(4, 6), nn.ReLU(), conv_bn(6, 6, groups=6), conv_bn(6, 4), nn.ReLU())
        self.head, self.fc = nn.Sequential(conv_bn(8, 5), nn.ReLU()), nn.Linear(5, 10)

    def forward(self, x):
        x = self.stem(x)
        if self.split == "chunk":
            a, b = x.chunk(2, dim=1)
        elif self.split == "split":
            a, b = torch.split(x, x.size(1) // 2, dim=1)
        else:  # literal bounds
            a, b = x[:, :4], x.narrow(1, 4, 4)
        x = torch.cat([a, self.branch(b)], dim=1)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, -1, h, w)
        return self.fc(self.head(F.channel_shuffle(x, 2)).mean((2, 3)))


@pytest.mark.parametrize("split", ["chunk", "split", "literal"])
def test_channel_split_and_shuffle(split):
    model, x = randomize(ShuffleUnit(split)), torch.randn(2, 3, 5, 5)
    groups = {g.name: g for g in channel_groups(model, example_input=x)}
    # the split ties each channel of the first half to one of the second (literal bounds fix them), and the
    # shuffle ties the branch's output to the stem's: only the branch's inner width and the head are free
    assert set(groups) == {"branch.0.0", "head.0.0"} and groups["branch.0.0"].producers == ("branch.0.0", "branch.2.0")
    small, keep = remove_a_third(model, x)
    assert small.branch[3][0].in_channels == kept(keep, "branch.0.0", 6)


def test_chunk_ties_positions_across_the_halves():
    """Each half of a chunk loses the same positions, so that chunk still splits the reduced tensor right."""

    class Halves(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.left, self.right = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(4, 5, 1)

        def forward(self, x):
            a, b = torch.cat([self.conv(x), self.left(x)], 1).chunk(2, dim=1)
            return self.right(F.relu(a) + F.relu(b)).mean((2, 3))

    model, x = randomize(Halves()), torch.randn(2, 3, 4, 4)
    groups = channel_groups(model, example_input=x)
    assert [(g.name, g.producers) for g in groups] == [("conv", ("conv", "left"))]
    check_against_masked(model, x, {"conv": [1, 2]}, {"conv": [0, 3]})


# --- channel-last blocks: permute, LayerNorm, Linear on the last dim, a learned per-channel scale ----------------
class ChannelLast(nn.Module):
    """ConvNeXt's block by hand: depthwise conv, permute to (N, H, W, C), LayerNorm, MLP, permute back, scale."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.dw = nn.Conv2d(3, 8, 2, stride=2), nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 32), nn.Linear(32, 8)
        self.gamma, self.head = nn.Parameter(torch.rand(8, 1, 1) + 0.5), nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.head((x + self.gamma * y).mean((2, 3)))


def test_channel_last_block_prunes_the_mlp_and_fixes_what_layernorm_sees():
    model, x = randomize(ChannelLast()), torch.randn(2, 3, 8, 8)
    groups = channel_groups(model, example_input=x)
    assert [(g.name, g.size, g.channel_dim) for g in groups] == [("fc1", 32, 3)]
    small, keep = remove_a_third(model, x)
    k = kept(keep, "fc1", 32)
    assert n_params(small) == n_params(model) - (32 - k) * (8 + 1 + 8)
    assert small.gamma.shape == (8, 1, 1)


class Scale(nn.Module):
    """A user's learned per-channel scale: a vector viewed onto the channel dim."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        return x * self.s.view(1, -1, 1, 1)


class LayerScale(nn.Module):
    """ConvNeXt's kind: a (C, 1, 1) parameter broadcast over the map, and a buffer of the same shape."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.register_buffer("shift", torch.zeros(c, 1, 1))

    def forward(self, x):
        return self.gamma * x + self.shift


class ScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.scale1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), Scale(8)
        self.conv2, self.scale2, self.fc = nn.Conv2d(8, 6, 3), LayerScale(6), nn.Linear(6, 10)

    def forward(self, x):
        x = self.scale1(F.relu(self.bn1(self.conv1(x))))
        return self.fc(self.scale2(F.relu(self.conv2(x))).mean((2, 3)))


def test_per_channel_parameters_of_custom_modules_are_sliced():
    model, x = randomize(ScaleNet()), torch.randn(2, 3, 7, 7)
    assert [g.name for g in channel_groups(model, example_input=x)] == ["conv1", "conv2"]
    small, keep = remove_a_third(model, x)
    k1, k2 = kept(keep, "conv1", 8), kept(keep, "conv2", 6)
    assert small.scale1.s.shape == (k1,) and small.scale2.gamma.shape == small.scale2.shift.shape == (k2, 1, 1)
    assert torch.equal(small.scale1.s, model.scale1.s[keep["conv1"]])


# --- PReLU, GroupNorm, LayerNorm over channels ------------------------------------------------------------------
class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.gn1, self.act1 = nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.PReLU(8)
        self.conv2, self.gn2, self.act2 = nn.Conv2d(8, 6, 3), nn.GroupNorm(2, 6), nn.PReLU()
        self.conv3, self.fc = nn.Conv2d(6, 4, 1), nn.Linear(4, 10)

    def forward(self, x):
        x = self.act2(self.gn2(self.conv2(self.act1(self.gn1(self.conv1(x))))))
        x = self.conv3(x).permute(0, 2, 3, 1)
        return self.fc(F.layer_norm(x, (4,)).mean((1, 2)))


def randomize_group_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.PReLU)):
                m.weight.uniform_(0.5, 1.5)
            if isinstance(m, nn.GroupNorm):
                m.bias.uniform_(-0.2, 0.2)
    return model


def test_groupnorm_removes_whole_groups_and_prelu_is_sliced():
    model, x = randomize_group_norms(randomize(Norms())), torch.randn(2, 3, 7, 7)
    groups = {g.name: g for g in channel_groups(model, example_input=x)}
    assert {n: g.granularity for n, g in groups.items()} == {"conv1": 2, "conv2": 3}  # conv3 reaches a LayerNorm
    small = check_against_masked(model, x, {"conv1": [2, 3, 6, 7], "conv2": [0, 1, 2]},
                                 {"conv1": [0, 1, 4, 5], "conv2": [3, 4, 5]})
    assert (small.gn1.num_groups, small.gn1.num_channels, small.gn2.num_groups) == (2, 4, 1)
    assert small.act1.num_parameters == 4 and torch.equal(small.act1.weight, model.act1.weight[[0, 1, 4, 5]])
    with pytest.raises(UsageError, match=r"keep\['conv1'\].*whole blocks of 2.*channels 2\.\.3 are split"):
        remove_channels(model, {"conv1": [0, 1, 2, 4, 5]}, example_input=x)


# --- weight_norm and spectral_norm -------------------------------------------------------------------------------
class NormedConvs(nn.Module):
    def __init__(self, wrap) -> None:
        super().__init__()
        self.conv1, self.conv2, self.fc = wrap(nn.Conv2d(3, 8, 3)), wrap(nn.Conv2d(8, 6, 3)), nn.Linear(6, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


WRAPS = {"weight_norm": nn.utils.weight_norm, "spectral_norm": nn.utils.spectral_norm,
         "parametrizations.weight_norm": parametrizations.weight_norm,
         "parametrizations.spectral_norm": parametrizations.spectral_norm}


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated")
@pytest.mark.parametrize("wrap", list(WRAPS))
def test_weight_norm_and_spectral_norm_convs(wrap):
    model, x = NormedConvs(WRAPS[wrap]).eval(), torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        for m in (model.conv1, model.conv2):
            if "weight_norm" in wrap:
                filters(m).uniform_(0.5, 1.5)  # g, so that the filter norms differ
    groups = [g.name for g in channel_groups(model, example_input=x)]
    # removing inputs of a spectral-normed layer would change its sigma: the channels feeding conv2 stay
    assert groups == (["conv2"] if "spectral" in wrap else ["conv1", "conv2"])
    small, keep = remove_a_third(model, x)
    k1, k2 = kept(keep, "conv1", 8), kept(keep, "conv2", 6)
    assert small.conv2.weight.shape == (k2, k1, 3, 3) and filters(small.conv2).shape[0] == k2
    assert n_params(small) < n_params(model)


def test_spectral_norm_sigma_is_unchanged_by_removing_zero_filters():
    conv = parametrizations.spectral_norm(nn.Conv2d(4, 6, 3)).eval()
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(6, 2, 1), nn.Flatten(), nn.Linear(2 * 16, 3)).eval()
    x = torch.randn(2, 4, 6, 6)
    small = check_against_masked(model, x, {"0": [1, 4]}, {"0": [0, 2, 3, 5]})
    assert small[0].parametrizations.weight[0]._u.shape == (4,)


class SpatialAttention(nn.Module):
    """CBAM's spatial attention: the mean and the max over the channels gate every channel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.att, self.conv2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(2, 1, 3, padding=1), \
            nn.Conv2d(8, 6, 3), nn.Linear(6, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        pooled = torch.cat([x.mean(1, keepdim=True), torch.max(x, 1, keepdim=True).values], dim=1)
        x = x * torch.sigmoid(self.att(pooled))
        return self.fc(F.relu(self.conv2(x)).amax((2, 3)))


def test_reductions_over_channels_fix_them():
    """A mean or a max over the channels changes when zero channels leave it: those channels stay."""
    model, x = SpatialAttention().eval(), torch.randn(2, 3, 7, 7)
    assert [g.name for g in channel_groups(model, example_input=x)] == ["att", "conv2"]  # not conv1
    remove_a_third(model, x)


# --- Conv1d and Linear on N-d inputs -------------------------------------------------------------------------------
class Sequence1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(4, 8, 3), nn.BatchNorm1d(8)
        self.conv2, self.pool, self.fc = nn.Conv1d(8, 6, 3), nn.AdaptiveAvgPool1d(2), nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.pool(x).flatten(1))


class TokenMLP(nn.Module):
    """Tokens (N, L, D) through two Linear layers applied to the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 12), nn.Linear(12, 8), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.gelu(self.fc1(x)))).mean(1))


def test_conv1d():
    model, x = randomize(Sequence1d()), torch.randn(2, 4, 9)
    small, keep = remove_a_third(model, x)
    k1, k2 = kept(keep, "conv1", 8), kept(keep, "conv2", 6)
    assert n_params(small) == (12 + 1) * k1 + 2 * k1 + (3 * k1 + 1) * k2 + (2 * k2 + 1) * 10


def test_linear_on_tokens():
    model, x = TokenMLP().eval(), torch.randn(2, 5, 6)
    groups = channel_groups(model, example_input=x)
    assert [(g.name, g.channel_dim) for g in groups] == [("fc1", 2), ("fc2", 2)]
    small, keep = remove_a_third(model, x)
    assert small.fc2.weight.shape == (kept(keep, "fc2", 8), kept(keep, "fc1", 12))


# --- architecture spec of the new layer kinds ---------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated")
@pytest.mark.parametrize("build,shape", [
    (Norms, (3, 7, 7)), (ScaleNet, (3, 7, 7)), (Sequence1d, (4, 9)),
    (lambda: NormedConvs(nn.utils.weight_norm), (3, 7, 7)),
    (lambda: NormedConvs(parametrizations.weight_norm), (3, 7, 7)),
])
def test_architecture_spec_round_trip(build, shape):
    model, x = randomize(build()), torch.randn(2, *shape)
    _, keep = fraction_of_groups(model, x)
    small = remove_channels(model, keep, example_input=x)
    assert n_params(small) < n_params(model)
    spec = json.loads(json.dumps(architecture_spec(small)))
    rebuilt = apply_architecture_spec(build(), spec)
    rebuilt.load_state_dict(small.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), small(x))


# --- what stays unsupported is refused in one line naming the op -----------------------------------------------------
class Middle(nn.Module):
    def __init__(self, middle) -> None:
        super().__init__()
        self.conv, self.middle, self.fc = nn.Conv2d(3, 8, 3), middle, nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.middle(F.relu(self.conv(x))).mean((2, 3)))


class Flip(nn.Module):
    def forward(self, x):
        return torch.flip(x, dims=[1])


class Gather(nn.Module):
    def forward(self, x):
        return x[:, torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])]


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        return self.attention(tokens, tokens, tokens)[0].transpose(1, 2).unsqueeze(-1)


class DataDependent(nn.Module):
    """A custom module that owns a parameter and branches on values: torch.fx cannot trace into it."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x * self.s.view(1, -1, 1, 1) if x.sum() > 0 else x


def orthogonal_conv() -> nn.Module:
    return parametrizations.orthogonal(nn.Conv2d(8, 8, 1))


@pytest.mark.parametrize("middle,message", [
    (Flip(), r"operation 'flip' in 'middle' \(Flip\)"),
    (Gather(), r"operation 'getitem' in 'middle' \(Gather\)"),
    (Attention(), r"layer 'middle\.attention' \(MultiheadAttention\)"),
    (orthogonal_conv(), r"layer 'middle' \(ParametrizedConv2d\)"),
    (nn.LocalResponseNorm(2), r"layer 'middle' \(LocalResponseNorm\)"),
    (DataDependent(), r"layer 'middle' \(DataDependent\)"),
])
def test_unsupported_ops_are_refused_in_one_line(middle, message):
    with pytest.raises(UsageError, match=message + r".*group\(s\) conv flow into it") as e:
        channel_groups(Middle(middle).eval(), example_input=torch.randn(2, 3, 6, 6))
    assert "\n" not in str(e.value)


# --- torchvision models that the analysis refused before --------------------------------------------------------------
TORCHVISION = {"shufflenet_v2_x0_5": 32, "convnext_tiny": 32, "swin_t": 32}  # refused by name before


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_models_match_the_masked_model(name):
    model = randomize(torchvision.models.get_model(name, num_classes=10))
    x = torch.randn(2, 3, TORCHVISION[name], TORCHVISION[name])
    before = n_params(model)
    small, _ = remove_a_third(model, x)
    assert n_params(small) < 0.9 * before
