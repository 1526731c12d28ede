import pytest
import torch
from torch import nn

from helpers import randomize_batchnorm

from autoslim.config import DataConfig, TrainConfig, TrialConfig
from autoslim.data import load_data
from autoslim.errors import UsageError
from autoslim.methods import TrialContext, get_method
from autoslim.methods.sss import APG, Scales, remove_zero_structures
from autoslim.models import create_model
from autoslim.trial import run_trial
from autoslim.surgery import ShortcutPath


def reference_apg(p: list[float], v: list[float], g: list[float], *, eta: float, gamma: float, mu: float = 0.9):
    """methods.md section 4, element by element, with the clamp lambda' >= 0."""
    new_p, new_v = [], []
    for pi, vi, gi in zip(p, v, g):
        z = pi - eta * gi
        s = (1 if z > 0 else -1) * max(abs(z) - eta * gamma, 0.0)
        vi = s - pi + mu * vi
        new_p.append(max(s + mu * vi, 0.0))
        new_v.append(vi)
    return new_p, new_v


def test_two_apg_steps_follow_the_equations():
    p0 = [1.0, 0.5, 0.0625, 0.0625, 0.25]
    g1 = [0.5, 3.0, 0.25, 1.0, -1.0]  # plain step | s > 0 but clamped | |z| == eta*gamma | z < 0 | growth
    g2 = [-0.5, 0.0, 0.0, 0.0, 2.0]
    param = nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = APG([param], lr=0.125, gamma=0.25)
    param.grad = torch.tensor(g1, dtype=torch.float64)
    opt.step()
    p1, v1 = reference_apg(p0, [0.0] * 5, g1, eta=0.125, gamma=0.25)
    assert param.tolist() == pytest.approx(p1, abs=1e-15) and opt.state[param]["v"].tolist() == pytest.approx(v1)
    assert param[1:4].tolist() == [0.0, 0.0, 0.0]  # exact zeros: soft threshold and clamp
    assert param[0].item() == pytest.approx(1 - 0.0625 - 0.03125 + 0.9 * (1 - 0.0625 - 0.03125 - 1))
    opt.param_groups[0]["lr"] = 0.0625  # the schedule's eta_t
    param.grad = torch.tensor(g2, dtype=torch.float64)
    opt.step()
    p2, v2 = reference_apg(p1, v1, g2, eta=0.0625, gamma=0.25)
    assert param.tolist() == pytest.approx(p2, abs=1e-15) and opt.state[param]["v"].tolist() == pytest.approx(v2)
    assert param[1].item() == 0.0  # v < 0 keeps a zero factor at zero


def test_factors_are_outside_the_model_and_receive_no_weight_decay(digits):
    """A neuron whose output is zero gives its factor a zero gradient: with gamma 0, only weight decay could
    move the factor, and it stays exactly 1 while the other factors train."""
    model = create_model("lenet300_100", in_shape=digits.in_shape, num_classes=digits.num_classes)
    fc1 = model.classifier.fc1
    with torch.no_grad():
        fc1.weight[3] = 0
        fc1.bias[3] = 0
    fc1.requires_grad_(False)
    scales = Scales(model, level="channel", example_input=digits.val.x[:2])
    assert not {id(f) for f in scales.parameters()} & {id(p) for p in model.parameters()}
    ctx = TrialContext(data=digits, train_config=TrainConfig(epochs=1, batch_size=256, weight_decay=0.5))
    ctx.train(model, extra_optimizers=[APG(scales.parameters(), lr=0.05, gamma=0.0)])
    factor = scales.parameters()[0]
    assert factor[3].item() == 1.0 and (factor != 1.0).sum() > 250


def _set_factors(scales: Scales, gen: torch.Generator, *, zero_blocks: set[str] = frozenset()) -> None:
    """Random positive factors; about half the channels of every group and the blocks ``zero_blocks`` at 0."""
    with torch.no_grad():
        for s in scales:
            f = torch.rand(s.factor.shape, generator=gen) + 0.5
            if s.kind == "channel":
                f[torch.rand(f.shape, generator=gen) < 0.5] = 0
            elif s.structure in zero_blocks:
                f.zero_()
            s.factor.copy_(f)


@pytest.mark.parametrize("name,kwargs,level,in_shape", [
    ("resnet20", {}, "channel", (3, 8, 8)),
    ("resnet20", {}, "block", (3, 8, 8)),
    ("resnet20", {}, "both", (3, 8, 8)),
    ("vgg11", {"width": 0.25}, "channel", (3, 8, 8)),
    ("lenet5", {}, "channel", (1, 28, 28)),
])
def test_removing_zero_structures_keeps_the_outputs(name, kwargs, level, in_shape):
    gen = torch.Generator().manual_seed(0)
    model = create_model(name, in_shape=in_shape, num_classes=5, **kwargs)
    randomize_batchnorm(model, gen)
    model.eval()
    x = torch.randn(4, *in_shape, generator=gen)
    scales = Scales(model, level=level, example_input=x)
    zero_blocks = {"layer1.1", "layer2.0", "layer3.2"}  # layer2.0 has a projection shortcut
    _set_factors(scales, gen, zero_blocks=zero_blocks)
    with torch.no_grad():
        before = model(x)
    small, removed = remove_zero_structures(model, scales, threshold=0.0, example_input=x)
    with torch.no_grad():
        assert torch.allclose(small.eval()(x), before, atol=1e-5, rtol=1e-4)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    if level != "channel":
        assert set(removed["blocks"]) == zero_blocks
        assert sum(isinstance(m, ShortcutPath) for m in small.modules()) == 3
    if level != "block":
        assert sum(removed["channels"].values()) > 0


def test_parameter_counts_after_removal_are_the_analytic_ones():
    model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10)
    x = torch.randn(2, 1, 28, 28)
    scales = Scales(model, level="channel", example_input=x)
    kept = {"features.conv1": 7, "features.conv2": 11, "classifier.fc1": 30}
    with torch.no_grad():
        for s in scales:
            s.factor[kept[s.structure]:] = 0
    small, removed = remove_zero_structures(model, scales, threshold=0.0, example_input=x)
    assert removed["channels"] == {"features.conv1": 13, "features.conv2": 39, "classifier.fc1": 470}
    c1, c2, f1 = kept.values()  # 4x4 maps before fc1
    analytic = (25 * c1 + c1) + (25 * c1 * c2 + c2) + (16 * c2 * f1 + f1) + (10 * f1 + 10)
    assert sum(p.numel() for p in small.parameters()) == analytic

    resnet = create_model("resnet20", in_shape=(3, 8, 8), num_classes=10)
    scales = Scales(resnet, level="block", example_input=torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        for s in scales:
            s.factor.fill_(0.0 if s.structure in ("layer1.1", "layer3.2") else 1.0)
    small, _ = remove_zero_structures(resnet, scales, threshold=0.0, example_input=torch.randn(2, 3, 8, 8))
    block = lambda c: 2 * (9 * c * c + 2 * c)  # two 3x3 convs without bias and two BatchNorms
    assert sum(p.numel() for p in small.parameters()) == 272_474 - block(16) - block(64)


def test_threshold_removes_small_factors_too():
    model = create_model("lenet300_100", in_shape=(1, 8, 8), num_classes=4)
    x = torch.randn(2, 1, 8, 8)
    scales = Scales(model, level="channel", example_input=x)
    with torch.no_grad():
        scales.parameters()[0][:100] = 5e-4
    _, removed = remove_zero_structures(model, scales, threshold=1e-3, example_input=x)
    assert removed["channels"] == {"classifier.fc1": 100, "classifier.fc2": 0}


def test_block_level_needs_residual_blocks():
    with pytest.raises(UsageError, match="no structure to scale"):
        Scales(create_model("vgg11", in_shape=(1, 8, 8), num_classes=4, width=0.25), level="block",
               example_input=torch.randn(2, 1, 8, 8))


def test_sss_runs_end_to_end_with_its_defaults_on_resnet20():
    data = load_data(DataConfig(name="synthetic", num_samples=48, image_shape=[1, 8, 8], num_classes=4))
    config = TrialConfig(method="sss", params=get_method("sss").search_space().defaults(), model="resnet20",
                         data=DataConfig(name="synthetic"), train=TrainConfig(epochs=1, batch_size=16))
    result = run_trial(config, data=data)
    assert [r["phase"] for r in result.history] == ["sparse"]
    assert len(result.info["factors"]) == 18 and result.params <= result.baseline_params


def test_sss_sparsifies_and_removes_while_training():
    data = load_data(DataConfig(name="synthetic", num_samples=160, image_shape=[1, 8, 8], num_classes=4))
    params = {"gamma": 0.05, "level": "channel", "threshold": 0.0, "finetune_epochs": 1}
    config = TrialConfig(method="sss", params=params, model="lenet300_100", data=DataConfig(name="synthetic"),
                         train=TrainConfig(epochs=3, batch_size=16, lr=0.2))
    result = run_trial(config, data=data)
    assert [r["phase"] for r in result.history] == ["sparse"] * 3 + ["finetune"]
    assert sum(result.info["channels"].values()) > 0 and result.params < result.baseline_params
