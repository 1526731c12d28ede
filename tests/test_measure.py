import io

import torch
from torch import nn

from autoslim.measure import count_flops, count_nonzeros, count_params, layer_widths, measure, saved_size
from autoslim.models import create_model


def test_lenet5_flops_equal_the_hand_count():
    model = create_model("lenet5", in_shape=(1, 28, 28), num_classes=10)
    macs = 24 * 24 * 20 * 25 + 8 * 8 * 50 * 20 * 25 + 800 * 500 + 500 * 10
    assert count_flops(model, in_shape=(1, 28, 28)) == 2 * macs


def test_nonzeros_and_size():
    model = nn.Sequential(nn.Linear(10, 4))
    with torch.no_grad():
        model[0].weight[:2] = 0
    assert count_params(model) == 44 and count_nonzeros(model) == 24
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    assert saved_size(model) == buf.tell()


def test_measure_leaves_the_model_alone():
    model = create_model("resnet20", in_shape=(3, 32, 32), num_classes=10).train()
    m = measure(model, in_shape=(3, 32, 32), latency_repeats=3)
    assert model.training and m.latency_ms > 0 and m.params == count_params(model)
    assert layer_widths(model)["layer1.0.conv1"] == 16 and layer_widths(model)["fc"] == 10
