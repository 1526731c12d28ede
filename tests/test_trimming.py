import copy

import pytest
import torch
from torch import nn

from autoslim.config import TrainConfig
from autoslim.data import Split
from autoslim.methods import TrialContext, get_method
from autoslim.methods.trimming import apoz, channels_to_keep
from autoslim.models import create_model
from autoslim.surgery import channel_groups, remove_channels


def test_apoz_equals_a_hand_count():
    torch.manual_seed(0)
    model = create_model("lenet5", in_shape=(1, 8, 8), num_classes=3).eval()
    x = torch.randn(37, 1, 8, 8)
    split = Split(x, torch.zeros(37, dtype=torch.long))
    groups = {g.name: g for g in channel_groups(model, example_input=x[:1])}
    assert groups["features.conv2"].activations == ("features_relu2",)
    assert groups["classifier.fc1"].activations == ("classifier_relu3",)
    scores = apoz(model, split, [groups["features.conv2"], groups["classifier.fc1"]], batch_size=10)
    scores = {"a": scores["features.conv2"], "b": scores["classifier.fc1"]}
    feat = model.features(x)  # after pool2: take relu2's output by hand instead
    with torch.no_grad():
        r2 = model.features[:5](x)       # conv1 relu1 pool1 conv2 relu2
        r3 = model.classifier[:3](model.features(x))
    hand_a = (r2 == 0).float().mean(dim=(0, 2, 3))
    hand_b = (r3 == 0).float().mean(dim=0)
    assert feat.shape[1] == 50
    assert torch.allclose(scores["a"], hand_a) and torch.allclose(scores["b"], hand_b)


def test_std_rule_removes_exactly_the_channels_above_mean_plus_alpha_std():
    torch.manual_seed(1)
    scores = torch.rand(40)
    for alpha in (0.0, 0.5, 1.0, 1.5):
        thr = scores.mean() + alpha * scores.std(unbiased=False)
        keep = channels_to_keep(scores, rule="std", alpha=alpha)
        assert keep.tolist() == [i for i in range(40) if scores[i] <= thr]


def test_fraction_rule_removes_the_highest_apoz():
    scores = torch.tensor([0.5, 0.9, 0.1, 0.8, 0.3, 0.7, 0.2, 0.6, 0.4, 0.0])
    assert channels_to_keep(scores, rule="fraction", fraction=0.3).tolist() == [0, 2, 4, 6, 7, 8, 9]  # drops 0.9, 0.8, 0.7


def test_a_layer_keeps_at_least_one_channel():
    assert channels_to_keep(torch.ones(5), rule="fraction", fraction=1.0).numel() == 1


def masked_copy(model, group, pruned):
    """The same network with the pruned channels' producers zeroed (their ReLU outputs are exactly 0)."""
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for name in group.producers:
            modules[name].weight[pruned] = 0
            modules[name].bias[pruned] = -1.0  # relu(-1) == 0 for every input: the channel is dead
    return masked


@pytest.mark.parametrize("layer", ["features.conv1", "features.conv2", "classifier.fc1"])
def test_trimmed_model_equals_masked_model_and_counts_match(layer):
    torch.manual_seed(0)
    model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10).eval()
    x = torch.randn(4, 1, 28, 28)
    group = next(g for g in channel_groups(model, example_input=x) if layer in g.producers)
    pruned = torch.tensor([0, 3, 5, 7])
    keep = torch.tensor([i for i in range(group.size) if i not in pruned.tolist()])
    masked = masked_copy(model, group, pruned)
    trimmed = remove_channels(masked, {group.name: keep}, example_input=x)
    assert torch.allclose(trimmed(x), masked(x), atol=1e-5)
    widths = {"features.conv1": 20, "features.conv2": 50, "classifier.fc1": 500}
    widths[layer] -= 4
    c1, c2, f1 = widths.values()
    analytic = (25 * c1 + c1) + (25 * c1 * c2 + c2) + (16 * c2 * f1 + f1) + (f1 * 10 + 10)
    assert sum(p.numel() for p in trimmed.parameters()) == analytic


def test_trimming_method_removes_dead_channels_and_retrains(synthetic):
    model = create_model("lenet5", in_shape=synthetic.in_shape, num_classes=synthetic.num_classes)
    ctx = TrialContext(data=synthetic, train_config=TrainConfig(epochs=1, batch_size=32))
    space = get_method("trimming").search_space()
    params = {**space.defaults(), "rounds": 2, "retrain_epochs": 1, "rule": "fraction", "fraction": 0.2}
    result = get_method("trimming").compress(model, ctx, params)
    widths = [m.weight.shape[0] for m in result.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # floor(0.2 * width) channels go per round: 20 -> 16 -> 13, 50 -> 40 -> 32, 500 -> 400 -> 320
    assert widths == [13, 32, 320, synthetic.num_classes]
    assert [r["phase"] for r in ctx.history] == ["train", "retrain1", "retrain2"]
    assert len(result.info["rounds"]) == 2
