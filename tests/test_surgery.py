"""Physical removal of channels and residual blocks (autoslim.surgery)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

from autoslim.errors import UsageError
from helpers import one_thread, seed_each_test  # noqa: F401 (autouse fixtures)
from autoslim.models import create_model
from autoslim.surgery import (ChannelGroup, ShortcutPath, apply_architecture_spec, architecture_spec,
                              channel_groups, remove_blocks, remove_channels)


class UserNet(nn.Module):
    """A user's own model: depthwise conv, squeeze-excitation gate, concatenation, 2x2 pooling, view-flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU()
        self.dw, self.bn2, self.act2 = nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.ReLU6()
        self.gate = nn.Conv2d(12, 12, 1)
        self.left, self.act3 = nn.Conv2d(12, 8, 1), nn.LeakyReLU()
        self.right, self.act4 = nn.Conv2d(12, 6, 1), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1, self.act5, self.drop = nn.Linear(14 * 4, 20), nn.ReLU(), nn.Dropout(0.1)
        self.fc2 = nn.Linear(20, 10)

    def forward(self, x):
        x = self.act2(self.bn2(self.dw(self.act1(self.bn1(self.conv1(x))))))
        x = x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))
        y = self.pool(torch.cat([self.act3(self.left(x)), self.act4(self.right(x))], dim=1))
        return self.fc2(self.drop(self.act5(self.fc1(y.view(y.size(0), -1)))))


ARCHS = {
    "lenet5_28": (lambda: create_model("lenet5", in_shape=(1, 28, 28), num_classes=10), (1, 28, 28)),
    "lenet5_8": (lambda: create_model("lenet5", in_shape=(1, 8, 8), num_classes=10), (1, 8, 8)),
    "lenet300_100": (lambda: create_model("lenet300_100", in_shape=(1, 28, 28), num_classes=10), (1, 28, 28)),
    "vgg11": (lambda: create_model("vgg11", in_shape=(3, 16, 16), num_classes=10, width=0.25), (3, 16, 16)),
    "resnet20": (lambda: create_model("resnet20", in_shape=(3, 16, 16), num_classes=10), (3, 16, 16)),
    "resnet56": (lambda: create_model("resnet56", in_shape=(3, 16, 16), num_classes=10), (3, 16, 16)),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 32, 32)),
    "user": (UserNet, (3, 8, 8)),
}


def build(arch: str) -> tuple[nn.Module, torch.Tensor]:
    """The model in eval mode with random BatchNorm statistics, and a random batch."""
    factory, shape = ARCHS[arch]
    model = factory().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(3, *shape)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def zero_channels(model: nn.Module, group: ChannelGroup, idx) -> None:
    """Make channels ``idx`` of ``group`` exactly zero after every producer and BatchNorm."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in group.producers + group.batchnorms:
            modules[name].weight[idx] = 0
            if modules[name].bias is not None:
                modules[name].bias[idx] = 0


def mask_and_remove(model: nn.Module, x: torch.Tensor, fraction: float = 0.3) -> tuple[nn.Module, dict]:
    """Zero a random ``fraction`` of every group, then remove those channels physically."""
    keep = {}
    for g in channel_groups(model, example_input=x):
        gone = torch.randperm(g.size)[: int(fraction * g.size)]
        zero_channels(model, g, gone)
        keep[g.name] = sorted(set(range(g.size)) - set(gone.tolist()))
    return remove_channels(model, keep, example_input=x), keep


@pytest.mark.parametrize("arch", list(ARCHS))
def test_removed_channels_match_masked_model(arch):
    model, x = build(arch)
    classifier = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert all(classifier not in g.producers for g in channel_groups(model, example_input=x))
    small, _ = mask_and_remove(model, x)
    assert n_params(small) < n_params(model)
    torch.testing.assert_close(small.eval()(x), model(x), rtol=1e-4, atol=1e-5)


def test_lenet5_parameter_count_and_flatten_columns():
    model, x = build("lenet5_28")
    fc1 = model.classifier.fc1.weight.detach().clone()
    small, keep = mask_and_remove(model, x)
    k1, k2, k3 = (len(keep[g]) for g in ("features.conv1", "features.conv2", "classifier.fc1"))
    assert n_params(small) == (25 + 1) * k1 + (25 * k1 + 1) * k2 + (16 * k2 + 1) * k3 + (k3 + 1) * 10
    expected = fc1.view(500, 50, 16)[keep["classifier.fc1"]][:, keep["features.conv2"]].reshape(k3, 16 * k2)
    assert torch.equal(small.classifier.fc1.weight, expected)
    assert small.classifier.fc1.in_features == 16 * k2 and small.features.conv2.out_channels == k2


def test_lenet300_100_parameter_count():
    model, x = build("lenet300_100")
    small, keep = mask_and_remove(model, x, fraction=0.5)
    a, b = len(keep["classifier.fc1"]), len(keep["classifier.fc2"])
    assert n_params(small) == 785 * a + (a + 1) * b + (b + 1) * 10
    assert repr(small.classifier.fc2) == f"Linear(in_features={a}, out_features={b}, bias=True)"


def test_resnet20_residual_ties_and_parameter_count():
    model, x = build("resnet20")
    groups = {g.name: g for g in channel_groups(model, example_input=x)}
    stage = ["conv1", "layer2.0.conv2", "layer3.0.conv2"]
    assert groups["conv1"].producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")
    assert "layer2.0.shortcut.0" in groups["layer2.0.conv2"].producers
    assert groups["conv1"].batchnorms == ("bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2")
    # every activation call the channels pass: the stem's ReLU and the ReLU after each residual sum of the stage
    assert groups["conv1"].activations == ("relu", "layer1_0_relu2", "layer1_1_relu2", "layer1_2_relu2")
    assert groups["layer1.0.conv1"].activations == ("layer1_0_relu1",)
    assert len(groups) == 3 + 9
    small, keep = mask_and_remove(model, x)
    s = [len(keep[g]) for g in stage]
    for conv in ("conv1", "layer1.0.conv2", "layer1.2.conv2"):
        assert small.get_submodule(conv).out_channels == s[0]
    assert small.layer2[0].conv1.in_channels == small.layer2[0].shortcut[0].in_channels == s[0]
    expected = 27 * s[0] + 2 * s[0] + 10 * s[2] + 10
    for i in range(3):
        for j in range(3):
            mid = len(keep[f"layer{i + 1}.{j}.conv1"])
            cin, cout = s[i - 1 if j == 0 and i > 0 else i], s[i]
            expected += 9 * cin * mid + 2 * mid + 9 * mid * cout + 2 * cout
            expected += (cin * cout + 2 * cout) if j == 0 and i > 0 else 0
    assert n_params(small) == expected


def test_keep_validation_and_noop():
    model, x = build("lenet5_8")
    before = n_params(model)
    same = remove_channels(model, {"features.conv1": range(20)}, example_input=x)
    assert same is not model and n_params(same) == before
    small = remove_channels(model, {"features.conv1": torch.tensor([3, 4])}, example_input=x)
    assert small.features.conv1.out_channels == 2 and n_params(model) == before  # the input is untouched
    for keep, message in [({"features.conv1": []}, "all 20 channels"), ({"nope": [0]}, "nope"),
                          ({"features.conv1": [20]}, "[0, 20)"), ({"features.conv1": torch.ones(20).bool()}, "bool"),
                          ({"classifier.fc2": [0]}, "classifier.fc2")]:
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            remove_channels(model, keep, example_input=x)
    with pytest.raises(UsageError, match="expected 20 values"):
        remove_channels(model, {"features.conv1": [0]}, example_input=x, fold_constants={"features.conv1": [1.0]})


def test_user_model_groups_leave_the_model_untouched():
    model, x = build("user")
    model.train()
    stats = model.bn1.running_mean.clone()
    groups = {g.name: g for g in channel_groups(model, example_input=x)}
    assert list(groups) == ["conv1", "left", "right", "fc1"]  # concatenated branches stay separate
    assert groups["conv1"].producers == ("conv1", "dw", "gate") and groups["conv1"].batchnorms == ("bn1", "bn2")
    assert groups["conv1"].activations == ("act1", "act2", "sigmoid") and groups["left"].activations == ("act3",)
    assert model.training and model.bn1.training and torch.equal(model.bn1.running_mean, stats)


@pytest.mark.parametrize("arch,blocks", [("resnet20", ["layer1.1", "layer3.0"]),
                                         ("tv_resnet18", ["layer2.1", "layer3.0"])])
def test_remove_blocks_with_zero_branch(arch, blocks):
    model, x = build(arch)
    with torch.no_grad():
        for name in blocks:
            bn = model.get_submodule(name + ".bn2")
            bn.weight.zero_(), bn.bias.zero_()
    shallow = remove_blocks(model, blocks)
    assert all(isinstance(shallow.get_submodule(b), ShortcutPath) for b in blocks)
    assert n_params(shallow) < n_params(model)
    torch.testing.assert_close(shallow(x), model(x), rtol=1e-5, atol=1e-5)


def test_remove_blocks_refuses_non_blocks():
    model, _ = build("resnet20")
    with pytest.raises(UsageError, match=r"'layer1\.0\.conv1' \(Conv2d\)"):
        remove_blocks(model, ["layer1.0.conv1"])
    with pytest.raises(UsageError, match="layer9"):
        remove_blocks(model, ["layer9"])


class Mix(nn.Module):
    """A custom layer with its own parameter, used in a way surgery cannot know."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, c))

    def forward(self, x):
        return torch.einsum("nchw,dc->ndhw", x, self.w)


class Shuffle(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=1)


class ConvHead(nn.Module):
    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.conv, self.act, self.middle = nn.Conv2d(3, 8, 3), nn.ReLU(), middle
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        return torch.log_softmax(self.fc(self.pool(self.middle(self.act(self.conv(x)))).flatten(1)), dim=1)


class LSTMNet(nn.Module):
    """Reads one unbatched sequence (T, 4): a prunable Linear feeds the LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.lstm, self.fc = nn.Linear(4, 8), nn.LSTM(8, 8), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.lstm(torch.relu(self.fc0(x)))[0][-1:])


class RolledInput(nn.Module):
    """Unknown ops on the input image and a softmax over the classes touch no removable channel."""

    def __init__(self) -> None:
        super().__init__()
        self.head = ConvHead(nn.Identity())

    def forward(self, x):
        return self.head(torch.roll(x, 1, dims=1))


@pytest.mark.parametrize("model,x,message", [
    (ConvHead(Mix(8)), torch.randn(2, 3, 8, 8), r"'einsum' in 'middle' \(Mix\)"),
    (ConvHead(Shuffle()), torch.randn(2, 3, 8, 8), r"'roll' in 'middle' \(Shuffle\)"),
    (LSTMNet(), torch.randn(5, 4), r"layer 'lstm' \(LSTM\)"),
])
def test_unsupported_layers_are_refused_by_name(model, x, message):
    with pytest.raises(UsageError, match=message):
        channel_groups(model, example_input=x)
    with pytest.raises(UsageError, match=message):
        remove_channels(model, {}, example_input=x)


def test_unknown_ops_on_fixed_channels_are_allowed():
    groups = channel_groups(RolledInput(), example_input=torch.randn(1, 3, 8, 8))
    assert [(g.name, g.activations) for g in groups] == [("head.conv", ("head_act",))]


@pytest.mark.parametrize("arch", ["resnet20", "tv_mobilenet_v2", "lenet5_8", "user"])
def test_architecture_spec_round_trip(arch):
    model, x = build(arch)
    small, _ = mask_and_remove(model, x, fraction=0.4)
    if arch == "resnet20":
        small = remove_blocks(small, ["layer2.1", "layer3.0"])
    spec = json.loads(json.dumps(architecture_spec(small)))
    rebuilt = apply_architecture_spec(ARCHS[arch][0](), spec)
    rebuilt.load_state_dict(small.state_dict())
    assert n_params(rebuilt) == n_params(small)
    torch.testing.assert_close(rebuilt.eval()(x), small(x))


def test_architecture_spec_refuses_a_different_model():
    model, x = build("lenet5_8")
    spec = architecture_spec(remove_channels(model, {"features.conv1": [0]}, example_input=x))
    with pytest.raises(UsageError, match="features.conv1"):
        apply_architecture_spec(create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=10), spec)


def constant_channels(model: nn.Module, layer: str, idx, values: torch.Tensor) -> None:
    """Channels ``idx`` of ``layer`` output ``values`` whatever the input (zero weights, bias = value)."""
    with torch.no_grad():
        model.get_submodule(layer).weight[idx] = 0
        model.get_submodule(layer).bias[idx] = values


@pytest.mark.parametrize("arch,group", [
    ("lenet300_100", "classifier.fc1"),  # Linear consumer
    ("lenet5_28", "features.conv2"),  # Linear after flatten: H*W columns per channel
    ("lenet5_28", "features.conv1"),  # unpadded conv consumer
])
def test_fold_constants_is_exact(arch, group):
    model, x = build(arch)
    size = model.get_submodule(group).out_channels if "conv" in group else model.get_submodule(group).out_features
    gone = [0, 3, 5]
    values = torch.zeros(size)
    values[gone] = torch.tensor([0.7, 1.3, 0.4])
    constant_channels(model, group, gone, values[gone])  # positive, so the ReLU passes them on
    keep = {group: [j for j in range(size) if j not in gone]}
    folded = remove_channels(model, keep, example_input=x, fold_constants={group: values})
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(remove_channels(model, keep, example_input=x)(x), model(x), atol=1e-3)


def test_fold_constants_after_batchnorm_and_global_pooling():
    model, x = build("vgg11")
    group, gone = f"features.{len(model.features) - 3}", [1, 2]
    bn = model.features[-2]
    with torch.no_grad():
        model.features[-3].weight[gone] = 0  # the BatchNorm then outputs a constant, 0.5 after the ReLU
        bn.bias[gone] = bn.running_mean[gone] * bn.weight[gone] / (bn.running_var[gone] + bn.eps).sqrt() + 0.5
    values = torch.relu(bn(torch.zeros(1, bn.num_features, 1, 1))).flatten()
    torch.testing.assert_close(values[gone], torch.tensor([0.5, 0.5]))
    keep = {group: [j for j in range(len(values)) if j not in gone]}
    folded = remove_channels(model, keep, example_input=x, fold_constants={group: values})
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_fold_constants_into_padded_conv_differs_only_at_the_border():
    model = create_model("lenet5", in_shape=(1, 12, 12), num_classes=10).eval()  # convs zero-padded by 2
    x = torch.randn(3, 1, 12, 12)
    values = torch.zeros(20)
    values[[2, 7]] = torch.tensor([0.5, 0.9])
    constant_channels(model, "features.conv1", [2, 7], values[[2, 7]])
    keep = {"features.conv1": [j for j in range(20) if j not in (2, 7)]}
    folded = remove_channels(model, keep, example_input=x, fold_constants={"features.conv1": values})
    conv2_out = lambda m: m.features.conv2(m.features.pool1(m.features.relu1(m.features.conv1(x))))  # noqa: E731
    diff = (conv2_out(folded) - conv2_out(model)).abs()  # 6x6 maps: windows of rows/columns 2..3 lie inside
    assert diff[..., 2:-2, 2:-2].max() < 1e-5 and diff.max() > 1e-3
