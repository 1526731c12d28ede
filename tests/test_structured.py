"""The structured methods (trimming, l1l2, sss) on the models people write: functional and reused activations,
residual blocks, torchvision classifiers; refusals before training; trials that removed nothing."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
import torchvision
from optuna.trial import TrialState
from torch import nn

from helpers import one_thread, randomize_batchnorm, tiny_study  # noqa: F401 (autouse fixture)

from autoslim.config import DataConfig, StudyConfig, TrainConfig, TrialConfig
from autoslim.data import Split, load_data
from autoslim.errors import UsageError
from autoslim.methods import TrialContext, get_method, list_methods
from autoslim.methods.l1l2 import prunable_groups, remove_small_filters
from autoslim.methods.sss import Scales, remove_zero_structures
from autoslim.methods.trimming import apoz, channels_to_keep, measurable_groups
from autoslim import trial as objective
from autoslim.trial import run_trial
from autoslim.study import optimize
from autoslim.train import Callback
from autoslim.surgery import (ResidualShortcut, ShortcutPath, apply_architecture_spec, architecture_spec,
                              channel_groups, remove_channels)

STRUCTURED = [m for m in list_methods() if m in ("trimming", "l1l2", "sss")]


# ------------------------------------------------------------------ three ways to write the same CNN

class Block(nn.Module):
    """``act(x + bn2(conv2(act(bn1(conv1(x))))))`` with the activations given as callables."""

    def __init__(self, c: int, act1, act2) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act1, self.act2 = act1, act2

    def forward(self, x):
        return self.act2(x + self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))))


class SmallCNN(nn.Module):
    """stem conv-BN-act, a residual block, max-pool, an unpadded conv-act, flatten, fc-act, fc.

    ``style``: ``modules`` (one nn.ReLU per call), ``functional`` (F.relu, torch.relu, x.relu()),
    ``reused`` (one nn.ReLU module called everywhere)."""

    def __init__(self, style: str, in_shape=(3, 8, 8), num_classes: int = 10) -> None:
        super().__init__()
        self.style = style
        c, h, w = in_shape
        if style == "modules":
            acts = [nn.ReLU() for _ in range(5)]
        elif style == "reused":
            self.relu = nn.ReLU()
            acts = [self.relu] * 5
        else:
            acts = [F.relu, torch.relu, lambda x: x.relu(), F.relu, torch.relu]
        self.stem, self.bn = nn.Conv2d(c, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.block = Block(8, acts[1], acts[2])
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(8, 12, 3)
        self.fc1, self.fc2 = nn.Linear(12 * (h // 2 - 2) * (w // 2 - 2), 16), nn.Linear(16, num_classes)
        self.acts = acts if style == "modules" else None
        self.act0, self.act3, self.act4 = acts[0], acts[3], acts[4]

    def forward(self, x):
        x = self.pool(self.block(self.act0(self.bn(self.stem(x)))))
        return self.fc2(self.act4(self.fc1(torch.flatten(self.act3(self.conv(x)), 1))))


STYLES = ("modules", "functional", "reused")


class Residual(nn.Module):
    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return x + self.branch(x)


class GroupNormCNN(nn.Module):
    """stem conv-GN-relu, a residual block whose convs are followed by GroupNorm, pool, fc-relu, fc: with 2
    channels per GroupNorm group, its conv channels can only go in pairs."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.block = Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                                            nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8)))
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, num_classes)

    def forward(self, x):
        x = F.relu(self.block(F.relu(self.gn(self.stem(x)))))
        return self.fc2(F.relu(self.fc1(x.mean((2, 3)))))


class ChannelLastBlock(nn.Module):
    """ConvNeXt's pattern: permute to channel-last, LayerNorm, Linear-GELU-Linear on the last dim, permute back."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(self.norm(x.permute(0, 2, 3, 1)))))
        return x + y.permute(0, 3, 1, 2)


class ChannelLastNet(nn.Module):
    """A stem conv, two channel-last MLP blocks (their hidden width is a group on the last dim), pool, fc."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 2, stride=2)
        self.blocks = nn.Sequential(ChannelLastBlock(6), ChannelLastBlock(6))
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_every_activation_call_is_a_site_whatever_the_style():
    """Old code: an activation module called more than once, or a function, was no group's activation."""
    x = torch.randn(2, 3, 8, 8)
    for style in STYLES:
        groups = {g.name: g for g in channel_groups(SmallCNN(style), example_input=x)}
        assert list(groups) == ["stem", "block.conv1", "conv", "fc1"], style
        assert [len(g.sites) for g in groups.values()] == [2, 1, 1, 1], style  # the stream: stem act, block act2
        assert groups["stem"].producers == ("stem", "block.conv2") and groups["stem"].batchnorms == ("bn", "block.bn2")


# ------------------------------------------------------------------ registry: every method's removal on many models

def _tv(name: str, **kw):
    return lambda: getattr(torchvision.models, name)(num_classes=10, **kw)


MODELS = {
    "modules": (lambda: SmallCNN("modules"), (3, 8, 8)),
    "functional": (lambda: SmallCNN("functional"), (3, 8, 8)),
    "reused": (lambda: SmallCNN("reused"), (3, 8, 8)),
    "groupnorm": (GroupNormCNN, (3, 8, 8)),
    "channel_last": (ChannelLastNet, (3, 8, 8)),
    "tv_resnet18": (_tv("resnet18"), (3, 32, 32)),
    "tv_mobilenet_v2": (_tv("mobilenet_v2", width_mult=0.5), (3, 32, 32)),
    "tv_efficientnet_b0": (_tv("efficientnet_b0"), (3, 32, 32)),
}


def build(arch: str) -> tuple[nn.Module, torch.Tensor]:
    factory, shape = MODELS[arch]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = factory()
    randomize_batchnorm(model, gen)
    return model.eval(), torch.randn(4, *shape, generator=gen)


def dead_channels(group) -> list[int]:
    """A third of ``group``'s channels, in whole GroupNorm blocks (none of a group of one)."""
    g = group.granularity
    return [b + i for b in range(0, group.size, 3 * g) for i in range(g)] if group.size > g else []


def kill(model: nn.Module, group, idx) -> None:
    """Channels ``idx`` of ``group`` output exactly 0 after every producer and norm layer (dead channels)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in group.producers + group.batchnorms + group.groupnorms:
            for attr in ("weight", "bias"):
                if getattr(modules[name], attr, None) is not None:
                    getattr(modules[name], attr)[idx] = 0


def trimming_removal(model, x):
    groups = measurable_groups(model, example_input=x)
    dead = {g.name: dead_channels(g) for g in groups if dead_channels(g)}
    for g in groups:
        kill(model, g, dead.get(g.name, []))
    scores = apoz(model, Split(x, torch.zeros(len(x), dtype=torch.long)), groups)
    for g, idx in dead.items():  # measured where the zeros are: the dead channels have the highest APoZ
        live = [j for j in range(len(scores[g])) if j not in idx]
        assert scores[g][idx].min() >= scores[g][live].max() and scores[g][idx].min() > 0.5
    granularity = {g.name: g.granularity for g in groups}
    keep = {g: channels_to_keep(scores[g], rule="fraction", fraction=len(idx) / len(scores[g]),
                                granularity=granularity[g]) for g, idx in dead.items()}
    return remove_channels(model, keep, example_input=x)


def l1l2_removal(model, x):
    groups = prunable_groups(model, example_input=x)
    for g in groups:
        kill(model, g, dead_channels(g))
    small, removal = remove_small_filters(model, groups, threshold=1e-3, example_input=x)
    assert sum(map(len, removal.removed.values())) > 0
    return small


def sss_removal(model, x):
    scales = Scales(model, level="both", example_input=x)  # every model here has residual blocks
    with torch.no_grad():
        for s in scales:
            if s.kind == "channel":
                s.factor[::3] = 0  # one factor per channel, or per GroupNorm block
        for s in [s for s in scales if s.kind == "block"][::2]:
            s.factor.zero_()
    masked = model(x)
    small, removed = remove_zero_structures(model, scales, threshold=0.0, example_input=x)
    assert sum(removed["channels"].values()) > 0 and removed["blocks"]
    return small, masked


@pytest.mark.parametrize("method", STRUCTURED)
@pytest.mark.parametrize("arch", list(MODELS))
def test_each_structured_method_removes_channels_exactly_on_each_model(arch, method):
    """The removal acts (parameters drop) and its output equals the masked model's (relative error < 1e-5)."""
    model, x = build(arch)
    before = sum(p.numel() for p in model.parameters())
    if method == "sss":
        small, masked = sss_removal(model, x)
    else:
        small = {"trimming": trimming_removal, "l1l2": l1l2_removal}[method](model, x)
        with torch.no_grad():
            masked = model(x)
    with torch.no_grad():
        out = small.eval()(x)
    assert sum(p.numel() for p in small.parameters()) < before
    assert ((out - masked).norm() / masked.norm()).item() < 1e-5


# ------------------------------------------------------------------ l1l2: the constant each consumer sees

class Path(nn.Module):
    """A producer (filters 1 and 4 zero, positive biases), what lies between it and its consumer, a head."""

    CONSUMERS = {"relu_bn_conv1x1": lambda: nn.Conv2d(6, 5, 1),
                 "relu_bn_pool_linear": lambda: nn.Linear(6, 5),
                 "bn_relu_maxpool_flatten_linear": lambda: nn.Linear(6 * 3 * 3, 5),
                 "linear_relu_bn1d": lambda: nn.Linear(6, 5),
                 "bn_relu_padded_conv": lambda: nn.Conv2d(6, 5, 3, padding=1),
                 "relu_gate_conv": lambda: nn.Conv2d(6, 5, 1)}

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, conv = kind, kind != "linear_relu_bn1d"
        self.producer = nn.Conv2d(3, 6, 3) if conv else nn.Linear(12, 6)
        self.bn = nn.BatchNorm2d(6) if conv else nn.BatchNorm1d(6)
        self.consumer, self.gate, self.act = self.CONSUMERS[kind](), nn.Conv2d(3, 1, 1), nn.ReLU()
        self.head = nn.LazyLinear(4)

    def forward(self, x):
        k = self.kind
        if k == "linear_relu_bn1d":
            return self.head(self.consumer(self.bn(self.act(self.producer(x.flatten(1)[:, :12])))))
        y = self.producer(x)
        if k == "relu_bn_conv1x1":
            y = self.consumer(self.bn(self.act(y)))
        elif k == "relu_bn_pool_linear":
            y = self.consumer(F.adaptive_avg_pool2d(self.bn(self.act(y)), 1).flatten(1))
        elif k == "bn_relu_maxpool_flatten_linear":
            y = self.consumer(F.max_pool2d(self.act(self.bn(y)), 2, ceil_mode=True).flatten(1))
        elif k == "bn_relu_padded_conv":
            y = self.consumer(self.act(self.bn(y)))
        else:  # relu_gate_conv: the channel is multiplied by an input-dependent gate before the consumer
            y = self.consumer(self.act(y) * torch.sigmoid(self.gate(x[:, :, 1:-1, 1:-1])))
        return self.head(y.flatten(1))


EXACT_PATHS = ["relu_bn_conv1x1", "relu_bn_pool_linear", "bn_relu_maxpool_flatten_linear", "linear_relu_bn1d"]


def path_model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = Path(kind), torch.randn(16, 3, 8, 8)
    model(x)  # materialise the lazy head
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5), model.bn.bias.uniform_(-1, 1)
        model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 1.5)
        model.producer.bias.uniform_(0.2, 1.0)  # relu(bias) > 0: a zero filter's channel is a non-zero constant
        model.producer.weight[[1, 4]] = 0
    return model.eval(), x


@pytest.mark.parametrize("kind", EXACT_PATHS)
def test_l1l2_folds_what_each_consumer_sees(kind):
    """Old code folded the constant read after the activation: a BatchNorm after it moved the output by 21-27%."""
    model, x = path_model(kind)
    with torch.no_grad():
        before = model(x)
    small, removal = remove_small_filters(model, prunable_groups(model, example_input=x), threshold=1e-3,
                                          example_input=x)
    assert removal.removed["producer"] == [1, 4] and not removal.kept
    with torch.no_grad():
        after = small(x)
    assert small.producer.weight.shape[0] == 4
    assert ((after - before).norm() / before.norm()).item() < 1e-6


def test_l1l2_keeps_a_filter_whose_channel_is_not_constant_at_a_consumer():
    model, x = path_model("relu_gate_conv")
    with torch.no_grad():
        before = model(x)
    small, removal = remove_small_filters(model, prunable_groups(model, example_input=x), threshold=1e-3,
                                          example_input=x)
    assert removal.removed["producer"] == [] and removal.kept == {"producer": [1, 4]}
    with torch.no_grad():
        torch.testing.assert_close(small(x), before)


def test_l1l2_keeps_the_filters_whose_constant_a_zero_padded_consumer_reads():
    """Folding into a zero-padded conv would change its border outputs (the old code folded and measured the
    change): the filters are kept, reported in the trial's info and log line, and the output does not move."""
    model, _ = path_model("bn_relu_padded_conv")
    data = synthetic()
    lines: list[str] = []
    ctx = TrialContext(data=data, train_config=TrainConfig(epochs=0), log=lines.append)
    params = {**get_method("l1l2").search_space().defaults(), "finetune_epochs": 0}
    with torch.no_grad():
        reference = model(data.val.x)
    result = get_method("l1l2").compress(model, ctx, params)
    with torch.no_grad():
        measured = ((result.model(data.val.x) - reference).norm() / reference.norm()).item()
    change = result.info["output_change"]
    kept = result.info["kept_padded"]["producer"]  # relu(BN(bias)) > 0; where it is 0 the filter goes
    assert kept and result.info["removed"]["producer"] + len(kept) == 2
    assert change["zeroing"] == 0.0 and change["removal"] < 1e-6 and measured < 1e-6
    assert f"kept {len(kept)} small ones whose non-zero constant a zero-padded conv reads" in lines[-1]


def test_l1l2_folds_the_constant_a_channel_last_consumer_reads_on_the_last_dim():
    """The hidden width of a channel-last MLP lies on the last dim: zero filters with a bias give GELU(bias)
    there, read and folded along that dim (the old reading took dim 1, and trimming/l1l2 saw no such group)."""
    torch.manual_seed(0)
    model, x = ChannelLastNet().eval(), torch.randn(8, 3, 8, 8)
    fc1 = model.blocks[0].fc1
    with torch.no_grad():
        fc1.weight[[2, 5, 11]] = 0
        fc1.bias[[2, 5, 11]] = torch.tensor([0.8, -0.3, 1.5])  # GELU of each: a different non-zero constant
        before = model(x)
    groups = prunable_groups(model, example_input=x)
    assert [(g.name, g.channel_dim) for g in groups] == [("blocks.0.fc1", 3), ("blocks.1.fc1", 3)]
    small, removal = remove_small_filters(model, groups, threshold=1e-3, example_input=x)
    assert removal.removed == {"blocks.0.fc1": [2, 5, 11], "blocks.1.fc1": []}
    assert small.blocks[0].fc1.out_features == 21 and small.blocks[0].fc2.in_features == 21
    with torch.no_grad():
        torch.testing.assert_close(small(x), before, rtol=1e-5, atol=1e-6)


def test_l1l2_measures_and_removes_whole_groupnorm_blocks():
    """A filter is small only with the rest of its GroupNorm group: one zero filter of a pair stays (per-filter
    norms would split the pair, which the surgery refuses)."""
    model, x = build("groupnorm")
    group = next(g for g in prunable_groups(model, example_input=x) if g.name == "block.branch.0")
    assert group.granularity == 2
    with torch.no_grad():
        model.block.branch[0].weight[[0, 1, 2]] = 0  # all of block 0, half of block 1
        model.block.branch[1].bias[[0, 1]] = -1.0  # block 0 reads relu(GN shift) = 0 at the padded conv
    small, removal = remove_small_filters(model, [group], threshold=1e-3, example_input=x)
    assert removal.removed == {"block.branch.0": [0, 1]} and small.block.branch[1].num_groups == 3


# ------------------------------------------------------------------ SSS: blocks of torchvision ResNets and x + f(x)

@pytest.mark.parametrize("arch,blocks", [
    (_tv("resnet18"), ["layer1.1", "layer2.0", "layer4.1"]),
    (_tv("resnet50"), ["layer1.2", "layer3.0"]),
    (_tv("mobilenet_v2", width_mult=0.5), ["features.3", "features.13"]),
], ids=["resnet18", "resnet50", "mobilenet_v2"])
def test_sss_block_level_removes_residual_blocks(arch, blocks):
    """Old code: 'no structure to scale at level block' on every model but the built-in ResNets."""
    torch.manual_seed(0)
    model = arch().eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 32, 32)
    scales = Scales(model, level="block", example_input=x)
    with torch.no_grad():
        for s in scales:
            s.factor.fill_(0.0 if s.structure in blocks else 0.7)
        masked = model(x)
    small, removed = remove_zero_structures(model, scales, threshold=0.0, example_input=x)
    assert removed["blocks"] == blocks
    assert all(isinstance(small.get_submodule(b), (ShortcutPath, ResidualShortcut)) for b in blocks)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked, rtol=1e-4, atol=1e-5)
    spec = architecture_spec(small)  # what export and autoslim.load_model rebuild from
    assert spec["removed"] == blocks
    rebuilt = apply_architecture_spec(arch(), spec)
    rebuilt.load_state_dict(small.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), small(x))


WEIGHT_NORMS = {"parametrizations": nn.utils.parametrizations.weight_norm, "hooks": nn.utils.weight_norm}


class WeightNormed(nn.Module):
    """conv -> relu -> x + conv(relu(conv(x))) -> relu -> pool -> fc, the block's convs under weight_norm: the SSS
    factors of the inner channels and of the branch sit on weight-normed layers."""

    def __init__(self, wrap) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.block = Residual(nn.Sequential(wrap(nn.Conv2d(6, 6, 3, padding=1)), nn.ReLU(),
                                            wrap(nn.Conv2d(6, 6, 3, padding=1))))
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(F.relu(self.block(F.relu(self.conv(x)))).mean((2, 3)))


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated")
@pytest.mark.parametrize("norm", list(WEIGHT_NORMS))
def test_sss_folds_its_factors_into_weight_normed_layers(norm):
    """The weight of a weight-normed layer is computed from g and v: the old fold scaled that computed weight, and
    the factors were lost at the next forward pass."""
    torch.manual_seed(0)
    model, x = WeightNormed(WEIGHT_NORMS[norm]).eval(), torch.randn(4, 3, 8, 8)
    scales = Scales(model, level="both", example_input=x)
    assert [(s.kind, s.site) for s in scales] == [("channel", "block.branch.0"), ("block", "block.branch.2")]
    with torch.no_grad():
        scales.scales[0].factor.copy_(torch.tensor([0.5, 0.0, 1.5, 0.7, 0.0, 1.2]))
        scales.scales[1].factor.fill_(0.6)  # the branch stays, scaled
        masked = model(x)
    small, removed = remove_zero_structures(model, scales, threshold=0.0, example_input=x)
    assert removed == {"channels": {"block.branch.0": 2}, "blocks": [], "kept_padded": {}, "folded_border": {}}
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked, rtol=1e-5, atol=1e-6)


class SpectralStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 6, 3))
        self.conv2, self.fc = nn.Conv2d(6, 8, 3), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


def test_a_spectral_normed_producer_gets_no_sss_factor_and_no_l1l2_regularizer():
    """Scaling or zeroing rows of a spectral-normed weight changes sigma, so every other row: such a group is left
    alone (the old fold wrote the computed weight)."""
    model, x = SpectralStem().eval(), torch.randn(2, 3, 8, 8)
    assert [g.name for g in channel_groups(model, example_input=x)] == ["conv1", "conv2"]
    assert [s.structure for s in Scales(model, level="channel", example_input=x)] == ["conv2"]
    assert [g.name for g in prunable_groups(model, example_input=x)] == ["conv2"]


# ------------------------------------------------------------------ whole trials on user-written models

def synthetic(n: int = 64):
    return load_data(DataConfig(name="synthetic", num_samples=n, image_shape=[3, 8, 8], num_classes=4))


class Epochs(Callback):
    def __init__(self) -> None:
        self.seen = 0

    def on_epoch_end(self, model, record) -> None:
        self.seen += 1


def trial(monkeypatch, factory, method: str, params: dict, *, epochs: int = 1, batch_size: int = 16, data=None,
          fit: str | None = None):
    """run_trial on a model the registry does not know; returns the result and the epochs trained."""
    monkeypatch.setattr(objective, "build_model", lambda config, **kw: factory())
    config = TrialConfig(method=method, params={**get_method(method).search_space().defaults(), **params},
                         model="lenet5", train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.1, fit=fit))
    epochs_seen = Epochs()
    return run_trial(config, data=data or synthetic(), callbacks=[epochs_seen]), epochs_seen


@pytest.mark.parametrize("style", ["functional", "reused"])
def test_trimming_compresses_functional_and_reused_relu_cnns(monkeypatch, style):
    """Old code: no group had an activation; 'layers: highest' crashed with max() of an empty sequence after
    training, 'all' removed nothing."""
    for layers in ("highest", "all"):
        result, _ = trial(monkeypatch, lambda: SmallCNN(style, num_classes=4), "trimming",
                          {"rounds": 1, "retrain_epochs": 1, "rule": "fraction", "fraction": 0.3, "layers": layers})
        assert result.params < result.baseline_params and result.nothing_removed is None


@pytest.mark.parametrize("style", ["functional", "reused"])
def test_l1l2_compresses_functional_and_reused_relu_cnns(monkeypatch, style):
    """Old code: no group had an activation module called once, so nothing was regularized or removed."""
    result, _ = trial(monkeypatch, lambda: SmallCNN(style, num_classes=4), "l1l2",
                      {"lambda": 1.0, "threshold": 1e-2, "finetune_epochs": 0}, epochs=4, batch_size=8,
                      data=synthetic(160))
    assert sum(result.info["removed"].values()) > 0 and result.params < result.baseline_params


_LOOP_RESULTS: dict = {}


@pytest.mark.parametrize("fit", [None, "helpers:autoslim_like_fit"], ids=["autoslim_loop", "user_fit"])
@pytest.mark.parametrize("method", STRUCTURED)
@pytest.mark.parametrize("arch", ["groupnorm", "channel_last"])
def test_trials_on_groupnorm_and_channel_last_models(monkeypatch, arch, method, fit):
    """Each method's whole trial: GroupNorm channels leave in whole groups (a split block is refused by the
    surgery), SSS multiplies the channels of a channel-last MLP on the last dim and folds its factors exactly.
    Run with autoslim's loop and with a user fit doing the same work: the same compression on the same seed."""
    params = {"trimming": {"rounds": 1, "retrain_epochs": 1, "rule": "fraction", "fraction": 0.3, "layers": "all"},
              "l1l2": {"lambda": 1.0, "threshold": 1e-2, "finetune_epochs": 0},
              "sss": {"level": "both", "gamma": 0.05, "threshold": 1e-3}}[method]
    result, epochs = trial(monkeypatch, lambda: MODELS[arch][0](num_classes=4), method, params, epochs=2, fit=fit)
    got = (result.widths_after, result.params, result.info.get("removed"), result.info.get("channels"))
    assert got == _LOOP_RESULTS.setdefault((arch, method), got)
    assert epochs.seen == 2 + (method == "trimming")
    norms = [m for m in result.model.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_channels == 2 * m.num_groups for m in norms) and len(norms) == 3 * (arch == "groupnorm")
    if method == "trimming":
        assert result.params < result.baseline_params
    if method == "sss":
        assert result.info["removal_change"] < 1e-5


class NoActivation(nn.Module):
    """conv-BN-conv-pool-fc: no activation, so no APoZ anywhere, and no residual branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv2(self.bn(self.conv1(x))).mean((2, 3)))


class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return torch.einsum("nchw,dc->ndhw", x, self.w)


class Unsupported(nn.Module):
    """A custom layer that owns a parameter and mixes the channels of the first conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.mix, self.fc = nn.Conv2d(3, 8, 3), Mixer(), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.mix(F.relu(self.conv(x))).mean((2, 3)))


@pytest.mark.parametrize("method,factory,params,message", [
    ("trimming", NoActivation, {}, "^trimming: NoActivation has no removable channel group that passes an activation"),
    ("trimming", Unsupported, {"layers": "highest"}, r"operation 'einsum' in 'mix' \(Mixer\) is not supported"),
    ("l1l2", Unsupported, {}, r"operation 'einsum' in 'mix' \(Mixer\) is not supported"),
    ("sss", Unsupported, {"level": "channel"}, r"operation 'einsum' in 'mix' \(Mixer\) is not supported"),
    ("sss", NoActivation, {"level": "block"}, "^sss: no structure to scale at level 'block': NoActivation has no "
                                              "residual branch"),
    ("sss", lambda: SmallCNN("modules"), {"level": "both"}, None),
], ids=["trimming-no-activation", "trimming-unsupported", "l1l2-unsupported", "sss-unsupported", "sss-no-block",
        "sss-block-accepted"])
def test_a_model_a_method_cannot_compress_is_refused_before_any_epoch(monkeypatch, method, factory, params, message):
    """Old code trained first: trimming analysed the model only after its training phase."""
    if message is None:
        result, epochs = trial(monkeypatch, factory, method, params)
        assert epochs.seen == 1 and "block" in {s.split(".")[0] for s in result.info["factors"]}
        return
    with pytest.raises(UsageError, match=message) as refused:
        trial(monkeypatch, factory, method, params)
    assert "\n" not in str(refused.value)


def test_refusals_name_the_op_before_training_for_every_structured_method(monkeypatch):
    epochs = Epochs()
    monkeypatch.setattr(objective, "build_model", lambda config, **kw: Unsupported())
    for method in STRUCTURED:
        config = TrialConfig(method=method, params={**get_method(method).search_space().defaults(), "level": "channel"}
                             if method == "sss" else get_method(method).search_space().defaults(), model="lenet5",
                             train=TrainConfig(epochs=1, batch_size=16))
        with pytest.raises(UsageError, match="Mixer"):
            run_trial(config, data=synthetic(), callbacks=[epochs])
    assert epochs.seen == 0


class HardCodedView(nn.Module):
    """A squeeze-excitation gate that writes the channel count as a number: ``.view(N, 16, 1, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.fc, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 16), nn.Conv2d(16, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        gate = torch.sigmoid(self.fc(x.mean((2, 3)))).view(x.shape[0], 16, 1, 1)
        return self.head(F.relu(self.conv2(x * gate)).mean((2, 3)))


def test_a_hard_coded_channel_count_fixes_those_channels():
    """Old code let conv1's channels through the view; removing them failed with a raw RuntimeError."""
    model, x = HardCodedView().eval(), torch.randn(2, 3, 8, 8)
    assert [g.name for g in channel_groups(model, example_input=x)] == ["conv2"]
    get_method("trimming").check(model, example_input=x, params={})
    small = remove_channels(model, {"conv2": [0, 2]}, example_input=x)
    assert small.conv2.out_channels == 2 and small.conv1.out_channels == 16


def test_a_failure_inside_removal_is_one_line_naming_the_layer_or_op(monkeypatch):
    """Whatever breaks while a layer is sliced, or makes the reduced model fail, is one UsageError line."""
    from autoslim.surgery import remove as surgery

    model, x = build("functional")
    resize = surgery._resize

    def failing(m, in_keep, out_keep):
        if isinstance(m, nn.Linear) and m.out_features == 16:
            raise KeyError("weight_orig")
        resize(m, in_keep, out_keep)

    monkeypatch.setattr(surgery, "_resize", failing)
    with pytest.raises(UsageError, match=r"^surgery: layer 'fc1' \(Linear\) cannot be resized: 'weight_orig'$"):
        remove_channels(model, {"fc1": [0, 1]}, example_input=x)

    def forgetful(m, in_keep, out_keep):  # leaves fc2's inputs as they were: the reduced model cannot run
        resize(m, None if isinstance(m, nn.Linear) and m.out_features == 10 else in_keep, out_keep)

    monkeypatch.setattr(surgery, "_resize", forgetful)
    with pytest.raises(UsageError, match=r"^surgery: the reduced model does not run: layer 'fc2' \(Linear\) fails: "
                                         r"mat1 and mat2 shapes cannot be multiplied"):
        remove_channels(model, {"fc1": [0, 1]}, example_input=x)


# ------------------------------------------------------------------ a trial that removed nothing says so

def test_a_trial_that_removed_nothing_is_marked_and_pruned_unless_kept():
    """Old code completed it at 1.0x with only a log line 'removed 0 filters'."""
    noop = {"l1l2": {"lambda": 1.0e-4, "threshold": 1.0e-4, "finetune_epochs": 0, "layers": "all"}}
    for policy, state in (("prune", TrialState.PRUNED), ("keep", TrialState.COMPLETE)):
        lines: list[str] = []
        cfg = StudyConfig.from_dict(tiny_study(methods=noop, n_trials=1, warm_start=False, nothing_removed=policy))
        study = optimize(cfg, storage="sqlite:///:memory:", log=lines.append)
        (t,) = study.trials
        assert t.state == state and t.user_attrs["nothing_removed"].startswith("removed nothing: l1l2 left ")
        assert any("[trial 0] removed nothing: l1l2 left" in line for line in lines)
        assert (t.user_attrs.get("pruned_reason") == t.user_attrs["nothing_removed"]) == (policy == "prune")


@pytest.mark.parametrize("method", ["thriftynet", "iht"])
def test_a_method_that_builds_its_model_or_sparsifies_is_not_marked(method):
    data = load_data(DataConfig(name="digits", train_subset=100))
    params = {"thriftynet": {"budget": 2000, "iterations": 4, "history": 1},
              "iht": {"cycles": 1, "sparse_epochs": 1}}[method]
    config = TrialConfig(method=method, params={**get_method(method).search_space().defaults(), **params},
                         model="lenet300_100", train=TrainConfig(epochs=1, batch_size=64))
    result = run_trial(config, data=data)
    assert result.nothing_removed is None and "nothing_removed" not in result.user_attrs()
    if method == "iht":
        assert result.params == result.measurements.nonzeros < result.baseline_params
